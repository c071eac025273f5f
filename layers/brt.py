"""The Block-Recurrent Transformer's recurrent layer as a token mixer (`brt`; Hutchins, Schlag,
Wu, Dyer, Neyshabur 2022, "Block-Recurrent Transformers"; reference code google-research/meliad,
transformer/memory/transformer_layer.py + transformer_base.py, gates in nn_components.MLP).

The sequence is cut into windows of W tokens; S state vectors of width d_model are carried from
one window to the next. Per window n, with state_n (the learned initial state at window 0):

  vertical (tokens): q, k, v, q2 = the token projections, q, k, q2 L2-normalised
    self  = softmax(|a| · rope(q_t)·rope(k_j)) v_j over the W tokens *before* t (t − W ≤ j < t,
            the current and the previous window; not t itself, as the reference's mask)
    cross = softmax(|a2| · q2_t·rk_i) rv_i over the S state vectors of state_n
    y_t   = o_proj([self; cross])                   (the two concatenated over heads)
  horizontal (state), after the window's last token:
    h = RMSNorm(state_n) + P (learned state position embeddings, the state "IDs")
    rq, rk, rv, rq2 = the state projections of h, rq, rk, rq2 L2-normalised
    self  = softmax(|b| · rq_i·rk_j) rv_j over the S state vectors (no mask)
    cross = softmax(|b2| · rq2_i·k_j) v_j over the tokens of windows n − 1 and n (no mask: the
            update runs after the window)
    u = W_s [self; cross]
    "fixed": g = sigmoid(b_g),                     state_{n+1} = state_n ⊙ g + u ⊙ (1 − g)
    "lstm":  f = sigmoid(W_f [..] + b_f + 1), i = sigmoid(W_i [..] + b_i − 1),
                                                   state_{n+1} = state_n ⊙ f + u ⊙ i
The keys and values of each direction serve its self-attention and the other direction's
cross-attention (the token keys k, v are what the state reads; the state keys rk, rv are what
the tokens read); the four query sets are separate. The reference's "skip" layout (no
feed-forward in the recurrent direction) with the fixed gate is its recommended configuration
(README: recurrent/bias_skip.gin, "the fixed:skip configuration") and is what is built here;
the block's own residual, norm and MLP are the vertical direction's.

A token never sees a state written from its own or a later window. Windows are counted from
the start of each document: a partial last window does not update the state (its tokens are
still read by the next update through the cache, when decoding continues). The state of the
cache after a call is the state the next token's window starts from, and the cache keeps the
last 2W token keys/values (unrotated) and their positions.

Packed documents (segment_ids): every document restarts from the learned initial state with
its windows counted from its own first token, and no query (token or state) sees a key of
another document; so a packed row gives exactly what each document gives alone. The windows
are processed in blocks of W tokens aligned to the row (or to the cache position); a block may
then hold the end of one document window and the start of other documents: within a block
only the document it starts in can complete a window (a document that starts later in the
block reaches its first window end at or after the block's end), so a block has at most one
state update, and each token reads the state of its own document: the block's incoming state,
the updated one (tokens of that document after the update point) or the initial one (tokens
of documents that start inside the block).

Blocks run under `lax.scan` (the state and the last 2W keys/values as the carry; the body
under `jax.checkpoint`), so compile time does not grow with T.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import constrain, dense, segment_positions
from layers.registry import (MAX_INT, Mechanism, Setting, SettingError, Shared, positive_int,
                             register)
from layers.rope import apply_rope, check_rope_head_dim
from pallas_kernels.common import l2_normalize

GATES = ("fixed", "lstm")
_QK_EPS = 1e-6          # the reference's epsilon of the key/query normalisation


def _normalize(x, acc):
    """x / sqrt(|x|² + 1e-6) over the last axis in `acc`, as the reference normalises keys and
    queries."""
    return l2_normalize(x.astype(acc), _QK_EPS)


def _attend(q, k, v, scale, mask=None):
    """softmax(scale · q·k) v per head: q [B, Q, H, D], k, v [B, K, H, D], scale [H], mask
    broadcastable to [B, Q, K]. A query with no key under the mask gets 0 (the reference's
    safe softmax attends to nothing then)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale[None, :, None, None]
    if mask is not None:
        m = mask[:, None]
        s = jnp.where(m, s, -1e30)
    p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    if mask is not None:
        p = jnp.where(m, p, 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(p.dtype))


def _blocks(x, nb, L):
    """[B, T, ...] -> [nb, B, L, ...], zero-padded at the end."""
    B, T = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, nb * L - T)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((B, nb, L) + x.shape[2:]), 1, 0)


class BlockRecurrent(nn.Module):
    d_model: int
    num_heads: int
    head_dim: int
    state_size: int = 512
    window: int = 512
    gate: str = "fixed"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The state, and a buffer of the last min(2W, max_len) tokens' (unrotated, normalised)
        keys and values with their positions (−1: empty)."""
        H, D, S, d = self.num_heads, self.head_dim, self.state_size, self.d_model
        Lb = min(2 * self.window, max_len)
        return {"state": jnp.zeros((batch, S, d), jnp.float32),
                "k": jnp.zeros((batch, Lb, H, D), self.dtype),
                "v": jnp.zeros((batch, Lb, H, D), self.dtype),
                "slot_pos": jnp.full((Lb,), -1, jnp.int32)}

    # ------------------------------------------------------------------ parameters
    def _state_params(self) -> dict:
        H, D, S, d = self.num_heads, self.head_dim, self.state_size, self.d_model
        normal = lambda std, axes: nn.with_logical_partitioning(nn.initializers.normal(std), axes)
        ones = lambda axes: nn.with_logical_partitioning(nn.initializers.ones, axes)
        qkv_axes = ("embed", "heads", "kv")
        out_axes = ("heads", "kv", "embed")
        p = {
            # The reference: N(0, 0.1²) ("small, but large enough that adafactor will scale
            # updates to a reasonable value"), and N(0, 1) state position embeddings.
            "initial_state": self.param("initial_state", normal(0.1, (None, "embed")), (S, d),
                                        jnp.float32),
            "state_pos": self.param("state_pos", normal(1.0, (None, "embed")), (S, d),
                                    jnp.float32),
            "state_norm": self.param("state_norm", ones(("embed",)), (d,), jnp.float32),
            "state_out": self.param("state_out", normal(self.init_std, out_axes), (2 * H, D, d),
                                    jnp.float32),
        }
        for n in ("q", "k", "v", "q2"):
            p[f"state_{n}"] = self.param(f"state_{n}", normal(self.init_std, qkv_axes), (d, H, D),
                                         jnp.float32)
        for n in ("state_attn_scale", "state_cross_scale"):
            p[n] = self.param(n, ones(("heads",)), (H,), jnp.float32)
        if self.gate == "fixed":
            p["gate_bias"] = self.param("gate_bias", normal(0.1, ("embed",)), (d,), jnp.float32)
        else:
            # The reference's gate Dense layers: kernel variance_scaling(0.1, fan_in, truncated
            # normal), bias N(0, 0.1²); the +1 (forget) / −1 (input) offsets are added in the
            # forward, as there.
            kinit = nn.with_logical_partitioning(
                nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal",
                                                 in_axis=(0, 1), out_axis=2), out_axes)
            for n in ("forget", "input"):
                p[f"{n}_gate"] = self.param(f"{n}_gate", kinit, (2 * H, D, d), jnp.float32)
                p[f"{n}_bias"] = self.param(f"{n}_bias", normal(0.1, ("embed",)), (d,),
                                            jnp.float32)
        return p

    # ------------------------------------------------------------------ the state direction
    def _state_kvq(self, p, state):
        """rq, rk, rv, rq2 [B, S, H, D] of a state [B, S, d]."""
        acc = jnp.promote_types(self.dtype, jnp.float32)
        s = state.astype(jnp.float32)
        h = s * jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + self.norm_eps)
        h = (h * p["state_norm"] + p["state_pos"]).astype(self.dtype)
        proj = lambda n: jnp.einsum("bsd,dhk->bshk", h, p[f"state_{n}"].astype(self.dtype))
        return {"q": _normalize(proj("q"), acc), "k": _normalize(proj("k"), acc),
                "v": proj("v").astype(acc), "q2": _normalize(proj("q2"), acc)}

    def _update(self, p, state, kv, keys, values, mask):
        """The state after a window: state [B, S, d] float32, kv its _state_kvq, keys/values
        [B, K, H, D] the tokens it reads under mask [B, K]."""
        r_self = _attend(kv["q"], kv["k"], kv["v"], jnp.abs(p["state_attn_scale"]))
        r_cross = _attend(kv["q2"], keys, values, jnp.abs(p["state_cross_scale"]),
                          mask[:, None, :])
        h = jnp.concatenate([r_self, r_cross], axis=2).astype(self.dtype)   # [B, S, 2H, D]
        mix = lambda w: jnp.einsum("bshk,hkd->bsd", h, w.astype(self.dtype)).astype(jnp.float32)
        u = mix(p["state_out"])
        if self.gate == "fixed":
            g = jax.nn.sigmoid(p["gate_bias"])
            return state * g + u * (1 - g)
        f = jax.nn.sigmoid(mix(p["forget_gate"]) + p["forget_bias"] + 1.0)
        i = jax.nn.sigmoid(mix(p["input_gate"]) + p["input_bias"] - 1.0)
        return state * f + u * i

    # ------------------------------------------------------------------ the layer
    @nn.compact
    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        B, T = x.shape[:2]
        H, D, S, W = self.num_heads, self.head_dim, self.state_size, self.window
        acc = jnp.promote_types(self.dtype, jnp.float32)
        kw = dict(std=self.init_std, dtype=self.dtype)
        proj = lambda n: dense((H, D), ("embed", "heads", "kv"), name=f"{n}_proj", **kw)(x)
        q, k, q2 = (_normalize(proj(n), acc) for n in ("q", "k", "q2"))
        v = proj("v").astype(acc)
        scale = {n: jnp.abs(self.param(n, nn.with_logical_partitioning(
            nn.initializers.ones, ("heads",)), (H,), jnp.float32)) for n in ("attn_scale",
                                                                          "cross_scale")}
        p = self._state_params()

        # Positions: `pos` counts tokens from the cache's start (RoPE and distances), `seg`
        # from the token's document start (windows, document masks).
        base = jnp.int32(0) if cache is None else jnp.asarray(cache_pos, jnp.int32)
        pos = base + jnp.arange(T, dtype=jnp.int32)
        seg = (segment_positions(segment_ids.astype(jnp.int32)) if segment_ids is not None
               else jnp.broadcast_to(pos[None], (B, T)))
        q = apply_rope(q, pos[None], self.rope_theta)
        q, q2 = constrain(q, ("batch", "length", "heads", "kv")), constrain(
            q2, ("batch", "length", "heads", "kv"))

        # Without a cache or documents every block starts a window and ends one (or the row).
        aligned = cache is None and segment_ids is None
        L = min(W, T)
        nb = -(-T // L)
        Lb = cache["k"].shape[1] if cache is not None else min(2 * W, T)
        span2 = min(2 * W - 1, MAX_INT)          # the update reads tokens e − 2W < j <= e

        init = p["initial_state"]
        init_kv = jax.tree.map(lambda a: jnp.broadcast_to(a, (B,) + a.shape[1:]),
                               self._state_kvq(p, init[None]))
        init_b = jnp.broadcast_to(init[None], (B, S, self.d_model))
        if cache is None:
            carry = (init_b, jnp.zeros((B, Lb, H, D), acc), jnp.zeros((B, Lb, H, D), acc),
                     jnp.full((Lb,), -1, jnp.int32))
        else:
            carry = (cache["state"].astype(jnp.float32), cache["k"].astype(acc),
                     cache["v"].astype(acc), cache["slot_pos"])
        # Padding after the last token: never a document start, never a window end, never a key.
        pad_pos = base + jnp.arange(nb * L, dtype=jnp.int32)
        pad_seg = jnp.concatenate([seg, seg[:, -1:] + 1 + jnp.arange(nb * L - T, dtype=jnp.int32)],
                                  axis=1)
        xs = {"q": _blocks(q, nb, L), "q2": _blocks(q2, nb, L), "k": _blocks(k, nb, L),
              "v": _blocks(v, nb, L), "pos": pad_pos.reshape(nb, L),
              "seg": jnp.moveaxis(pad_seg.reshape(B, nb, L), 1, 0),
              "valid": (jnp.arange(nb * L) < T).reshape(nb, L)}

        def block(carry, b):
            state, kbuf, vbuf, pbuf = carry
            keys = jnp.concatenate([kbuf, b["k"]], axis=1)             # [B, Lb + L, H, D]
            values = jnp.concatenate([vbuf, b["v"]], axis=1)
            kpos = jnp.concatenate([pbuf, b["pos"]])
            kok = jnp.concatenate([pbuf >= 0, b["valid"]])
            # Token self-attention: the W tokens before each query, in its document.
            s0 = Lb - min(Lb, W)
            ks = apply_rope(keys[:, s0:], jnp.maximum(kpos[s0:], 0)[None], self.rope_theta)
            dist = b["pos"][:, None] - kpos[None, s0:]                   # [L, K]
            lim = jnp.minimum(W, b["seg"])[..., None]                    # [B, L, 1]
            m_self = kok[None, None, s0:] & (dist[None] >= 1) & (dist[None] <= lim)
            o_self = _attend(b["q"], ks, values[:, s0:], scale["attn_scale"], m_self)

            # The state the block's first document starts from.
            starts = b["seg"] == 0                                       # [B, L]
            lead = state if aligned else jnp.where(starts[:, :1, None], init_b, state)
            kv = self._state_kvq(p, lead)
            o_cross = _attend(b["q2"], kv["k"], kv["v"], scale["cross_scale"])

            # The one window end this block may hold (of the document it starts in).
            if aligned:
                newdoc = None
                has = b["valid"][-1] & ((b["seg"][:, -1] + 1) % W == 0)  # [B]
                e_pos = jnp.broadcast_to(b["pos"][-1], (B,))
                e_seg = b["seg"][:, -1]
                u0 = s0                      # the update reads the previous W and the block
            else:
                newdoc = jnp.cumsum(starts.at[:, 0].set(False), axis=1) > 0   # [B, L]
                ends = b["valid"][None] & ((b["seg"] + 1) % W == 0) & ~newdoc
                has = jnp.any(ends, axis=1)
                e_idx = jnp.argmax(ends, axis=1)
                e_pos = b["pos"][e_idx]
                e_seg = jnp.take_along_axis(b["seg"], e_idx[:, None], axis=1)[:, 0]
                u0 = 0
            de = e_pos[:, None] - kpos[None, u0:]                       # [B, K]
            m_upd = kok[None, u0:] & (de >= 0) & (de <= jnp.minimum(span2, e_seg)[:, None])
            new = self._update(p, lead, kv, keys[:, u0:], values[:, u0:], m_upd)
            upd = jnp.where(has[:, None, None], new, lead)

            if aligned:
                out_state = upd
            else:
                out_state = jnp.where(newdoc[:, -1:, None], init_b, upd)
                if L > 1:   # tokens after the update read it; new documents the initial state
                    after = has[:, None] & (jnp.arange(L)[None] > e_idx[:, None])
                    ukv = self._state_kvq(p, upd)
                    o_upd = _attend(b["q2"], ukv["k"], ukv["v"], scale["cross_scale"])
                    o_init = _attend(b["q2"], init_kv["k"], init_kv["v"], scale["cross_scale"])
                    o_cross = jnp.where(newdoc[..., None, None], o_init,
                                        jnp.where(after[..., None, None], o_upd, o_cross))
            carry = (out_state, keys[:, -Lb:], values[:, -Lb:], kpos[-Lb:])
            return carry, jnp.concatenate([o_self, o_cross], axis=2).astype(self.dtype)

        carry, o = jax.lax.scan(jax.checkpoint(block), carry, xs)
        o = jnp.moveaxis(o, 0, 1).reshape((B, nb * L) + o.shape[3:])[:, :T]   # [B, T, 2H, D]
        o = constrain(o, ("batch", "length", "heads", "kv"))
        y = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj", **kw)(o)
        if cache is None:
            return y, None
        new_cache = {
            "state": carry[0],
            "k": jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)[:, -Lb:],
            "v": jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)[:, -Lb:],
            "slot_pos": jnp.concatenate([cache["slot_pos"], pos])[-Lb:],
        }
        return y, new_cache


_SETTINGS = {
    "state_size": Setting(512, int, "S, the recurrent state vectors (width d_model); the "
                                    "reference's recurrent_num_states 512"),
    "window": Setting(512, int, "W, tokens per window: each token attends to the W tokens "
                                "before it, and the state updates after every W tokens of a "
                                "document (the reference's window_length 512)"),
    "gate": Setting("fixed", str, "the state update's gate, one of ('fixed', 'lstm'): "
                                  "sigmoid of a learned bias (the reference's 'bias' gate, its "
                                  "fixed:skip configuration), or LSTM input/forget gates "
                                  "(biases offset by -1/+1)"),
}


def _check(shared: Shared, s) -> None:
    positive_int(s, "state_size", "window")
    if s["gate"] not in GATES:
        raise SettingError("gate", f"must be one of {GATES}, got {s['gate']!r}")
    check_rope_head_dim(shared)


def _build(shared: Shared, s, name):
    return BlockRecurrent(d_model=shared.d_model, num_heads=shared.num_heads,
                          head_dim=shared.head_dim, state_size=s["state_size"],
                          window=s["window"], gate=s["gate"], rope_theta=shared.rope_theta,
                          norm_eps=shared.norm_eps, init_std=shared.init_std,
                          dtype=shared.dtype, name=name)


def _span(s, T: int) -> int:
    """Keys per token, the state's work spread over its window's tokens: W previous tokens, S
    state vectors, and per window the state's S x S self- and S x 2W cross-attention."""
    W, S = min(s["window"], T), s["state_size"]
    return W + S + (S * (S + 2 * W)) // W if T >= s["window"] else W + S


register(Mechanism("brt", "token", _build, _SETTINGS, _check,
                   "Block-Recurrent Transformer layer: sliding-window attention plus cross-"
                   "attention to S state vectors, which a gated transformer step updates "
                   "after every window", recurrent=True, attention_span=_span))
