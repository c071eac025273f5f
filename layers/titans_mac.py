"""Titans MAC, memory as context (`titans_mac`; Behrouz et al. 2025, "Titans: Learning to
Memorize at Test Time", Sec. 4.1, Eq. 21–25). The sequence is cut into segments of
`segment_length` tokens; per segment S (tokens x_1 … x_S):

  h_i = M*(r_i)           the memory as it was when the segment began, read (no write) with
                          the memory's query of each token, r = ℓ2(SiLU(conv4(W_r x)))
                          (Eq. 21);
  y_i = Attn(q_i; [p_1 … p_P], h_≤i, x_≤i)
                          causal softmax attention inside the segment over the persistent
                          tokens (`persistent_tokens` learned keys/values per head, no RoPE,
                          seen by every query: the op's prefix keys), the read-outs and the
                          segment's tokens (Eq. 22–23), then W_o to the model width; a
                          read-out enters as a token: RMSNorm per head, W_h to the model width,
                          then the attention's own W_K, W_V (RoPE at its token's position);
  M ← M(y)                the memory learns from the attention output: q, k, v = SiLU(W y)
                          (q, k ℓ2-normalised), θ, η, α from y, the `neural_memory` rule with
                          momentum and forgetting (Eq. 24);
  m_i = M_{t'}(q_i)       read back with y's query, memory_chunk semantics: t' the start of
                          token i's chunk of `memory_chunk` tokens, chunks counted from the
                          segment's start (Eq. 25's M*_t(y_t));
  o = RMSNorm(y) ⊙ sigmoid(RMSNorm(W_m RMSNorm(m)))   (Eq. 25's ⊗, as `titans_mag`'s gate:
                          `titans.gate_outputs`).

Causality (choices where the paper's equations let a token see later ones): Eq. 22 puts all S
read-outs before the segment, and h_j is read with x_j's query, so token i would see h_j of
later tokens j > i; here h_j sits at x_j's position (token i sees h_≤i: the last token of a
segment sees them all, as in the paper). Eq. 25 reads the memory after the whole segment's
update, which holds later tokens' writes; here token i reads the memory of its chunk's start
(all earlier segments and the earlier chunks of its own): `memory_chunk` 1 is the closest
causal form (reads after every earlier token's write). Attention does not cross segments: the
memory is the only path from one segment to the next.

Packed documents (segment_ids): segments are counted from each document's start and the memory
restarts from its learned initial state at each: documents are moved to start on segment
boundaries (`pallas_kernels.common.chunk_layout` with chunk = segment) when a row holds at most
`docs_per_row(T, segment_length)` documents, else a token scan that restarts at every document
(exact for any number, sequential). Decode cache: the memory when the segment began, the
memory, momentum and chunk-boundary memory of the `neural_memory_step` recurrence, the keys and
values of the segment's read-outs and tokens so far (2 · segment_length slots), the read conv's
inputs; the position in the segment is the cache position's. Prefills and decode tokens run the
token step (exact; a prefill is sequential in its length).

Parameters used inside the segment and token loops live in one submodule (`cell`) and are called
through `Module.apply` on its parameters, so the loops are plain `lax.scan`s (the op, the
packing helpers and `blocked_token_scan` take pure functions).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import (blocked_token_scan, constrain, dense, docs_per_row, init, pack_rows,
                           packed_or_scanned)
from layers.conv import conv_settings, qkv_conv_cache, short_conv_qkv
from layers.norm import GatedRMSNorm
from layers.registry import Mechanism, Setting, Shared, positive_int, register
from layers.rope import apply_rope, check_rope_head_dim
from layers.titans import (_SETTINGS as _MEMORY_SETTINGS, _check as _check_memory, _select,
                           MemoryInputs, broadcast_rows, gate_outputs, initial_memory,
                           memory_step, zero_memory)
from layers.titans_mag import check_persistent, persistent_setting
from pallas_kernels.attention import attention
from pallas_kernels.common import chunk_layout, l2_normalize
from pallas_kernels.neural_memory import neural_memory, neural_memory_read


class _Cell(nn.Module):
    """The parameters MAC uses inside its loops: the attention's q/k/v/o projections, the
    read-out's norm and projection to the model width, the persistent tokens, and the memory's
    inputs from the attention output (`MemoryInputs` without short convs)."""
    d_model: int
    num_heads: int
    head_dim: int
    persistent_tokens: int
    rope_theta: float
    lr_max: float
    norm_eps: float
    init_std: float
    dtype: jnp.dtype
    attn_impl: str

    def setup(self):
        H, D = self.num_heads, self.head_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        self.q_proj, self.k_proj, self.v_proj = (dense((H, D), ("embed", "heads", "kv"), **kw)
                                                 for _ in range(3))
        self.o_proj = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), **kw)
        self.read_norm = GatedRMSNorm(self.norm_eps, self.dtype)
        self.read_proj = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), **kw)
        self.memory = MemoryInputs(H, D, self.lr_max, use_short_conv=False,
                                   init_std=self.init_std, dtype=self.dtype)
        if self.persistent_tokens:
            shape = (self.persistent_tokens, H, D)
            self.persistent_k, self.persistent_v = (
                self.param(f"persistent_{n}", init(self.init_std, (None, "heads", "kv")), shape,
                           jnp.float32) for n in "kv")

    def token_inputs(self, x, positions):
        """q, k (RoPE at `positions` [B, T]) and v of the segment tokens x [B, T, d]."""
        rope = lambda t: apply_rope(t, positions, self.rope_theta)
        return rope(self.q_proj(x)), rope(self.k_proj(x)), self.v_proj(x)

    def read_inputs(self, h, positions):
        """Keys (RoPE at their tokens' positions) and values of the read-outs h [B, T, H, D]."""
        hm = self.read_proj(self.read_norm(h))
        return apply_rope(self.k_proj(hm), positions, self.rope_theta), self.v_proj(hm)

    def attend(self, q, k, v, q_positions, kv_positions):
        """y = W_o Attn(q; persistent tokens, k/v by positions) [B, T, d], and the memory's
        inputs (q, k, v, θ, η, α) from y."""
        prefix = ({} if not self.persistent_tokens else
                  {"prefix_k": self.persistent_k, "prefix_v": self.persistent_v})
        impl = "auto" if self.attn_impl in ("cudnn", "splash") else self.attn_impl
        a = attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions, impl=impl,
                      **prefix)
        y = self.o_proj(constrain(a, ("batch", "length", "heads", "kv")))
        return y, self.memory(y)[0]


class TitansMAC(nn.Module):
    d_model: int
    num_heads: int
    head_dim: int
    segment_length: int = 64
    persistent_tokens: int = 4
    rope_theta: float = 10000.0
    depth: int = 2
    expansion: float = 4.0
    chunk_size: int = 8
    lr_max: float = 1.0
    conv_size: int = 4
    use_short_conv: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    attn_impl: str = "auto"

    @property
    def hidden(self) -> int:
        return int(round(self.head_dim * self.expansion))

    def _cell(self, **name):
        return _Cell(self.d_model, self.num_heads, self.head_dim, self.persistent_tokens,
                     self.rope_theta, self.lr_max, self.norm_eps, self.init_std, self.dtype,
                     self.attn_impl, **name)

    def init_cache(self, batch: int, max_len: int) -> dict:
        H, D = self.num_heads, self.head_dim
        S = min(self.segment_length, max_len)
        zeros = lambda: zero_memory((batch, H), D, self.hidden, self.depth)
        buf = jnp.zeros((batch, 2 * S, H, D), self.dtype)
        cache = {"segment_memory": zeros(), "k": buf, "v": buf,
                 "state": {"memory": zeros(), "momentum": zeros(), "chunk_memory": zeros()}}
        if self.use_short_conv:
            cache.update(qkv_conv_cache(batch, {"read": (H, D)}, self.conv_size, self.dtype))
        return cache

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        B, T = x.shape[:2]
        H, D = self.num_heads, self.head_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        r = dense((H, D), ("embed", "heads", "kv"), name="read_q_proj", **kw)(x)
        if self.use_short_conv:
            r, conv_cache = short_conv_qkv({"read": r}, self.conv_size, segment_ids, cache,
                                           self.dtype, std=self.init_std)
            r = r["read"]
        else:
            r, conv_cache = jax.nn.silu(r), {}
        r = l2_normalize(constrain(r, ("batch", "length", "heads", "kv")))
        memory0 = initial_memory(self, H, D, self.hidden, self.depth)
        positions = jnp.broadcast_to(positions, (B, T)).astype(jnp.int32)

        cell = self._cell(name="cell")
        q, k, v = cell.token_inputs(x, positions)
        acc = jnp.promote_types(q.dtype, jnp.float32)    # the op's state dtype
        memory0 = jax.tree.map(lambda w: w.astype(acc), memory0)
        if self.is_initializing():          # the parameters only the loops use
            y0, _ = cell.attend(q[:, :1], *cell.read_inputs(r[:, :1], positions[:, :1]),
                                jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
        params = cell.variables["params"]
        unbound = self._cell()
        call = lambda method, *a: unbound.apply({"params": params}, *a, method=method)
        xs = (q, k, v, r, positions)

        new_cache = None
        if segment_ids is not None:
            y, o = self._documents(call, xs, memory0, segment_ids)
        elif cache is None:
            y, o = self._segments(call, xs, memory0, min(self.segment_length, T))
        else:
            y, o, new_cache = self._cached(call, xs, memory0, cache, cache_pos)
            new_cache.update(conv_cache)
        o = GatedRMSNorm(self.norm_eps, self.dtype, name="o_norm")(o)
        o = constrain(o, ("batch", "length", "heads", "kv"))
        m = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj", **kw)(o)
        return gate_outputs(y, m, self.norm_eps, self.dtype), new_cache

    # ---------------------------------------------------------------- one segment, one token
    def _segment(self, call, memory0, carry, inp):
        """One segment of every row: inp = ((q, k, v, r, positions) [B, S, ...], reset [B] or
        None: the segment starts a document). Returns ((memory, momentum), (y, o))."""
        (q, k, v, r, pos), reset = inp
        memory, momentum = carry
        if reset is not None:
            memory0 = broadcast_rows(memory0, q.shape[0])
            memory, momentum = _select(reset, (memory0, jax.tree.map(jnp.zeros_like, memory0)),
                                       (memory, momentum))
        kh, vh = call("read_inputs", neural_memory_read(r, memory), pos)
        i = jnp.arange(q.shape[1], dtype=jnp.int32)
        y, args = call("attend", q, jnp.concatenate([kh, k], 1), jnp.concatenate([vh, v], 1),
                       i, jnp.concatenate([i, i]))
        o, state = neural_memory(*args, depth=self.depth, chunk_size=self.chunk_size, scale=1.0,
                                 initial_state=(memory, momentum), output_final_state=True,
                                 impl=self.impl)
        return state, (y, o)

    def _token(self, call, memory0, carry, inp):
        """One token of every row: inp = ((q, k, v, r, position) [B, ...], start [B]: it
        begins a document, real [B]: not padding). carry = (the memory when the segment began,
        memory, momentum, chunk-boundary memory, tokens into the document [B], k and v
        [B, 2·S, H, D]: slot i the read-out of the segment's token i, slot S + i the token)."""
        (q, k, v, r, pos), start, real = inp
        seg_memory, memory, momentum, chunk_memory, n, kb, vb = carry
        B, S = q.shape[0], kb.shape[1] // 2
        memory0 = broadcast_rows(memory0, B)
        memory, momentum = _select(start, (memory0, jax.tree.map(jnp.zeros_like, memory0)),
                                   (memory, momentum))
        n = jnp.where(start, 0, n)
        i = n % S                                               # [B] position in the segment
        seg_memory = _select(i == 0, memory, seg_memory)
        kh, vh = call("read_inputs", neural_memory_read(r[:, None], seg_memory), pos[:, None])
        slots = jnp.arange(S, dtype=jnp.int32)
        here = (slots[None] == i[:, None])[:, :, None, None]   # [B, S, 1, 1]
        kb = jnp.concatenate([jnp.where(here, kh, kb[:, :S]),
                              jnp.where(here, k[:, None], kb[:, S:])], 1).astype(kb.dtype)
        vb = jnp.concatenate([jnp.where(here, vh, vb[:, :S]),
                              jnp.where(here, v[:, None], vb[:, S:])], 1).astype(vb.dtype)
        seen = jnp.where(slots[None] <= i[:, None], slots[None], -1)     # [B, S]
        y, args = call("attend", q[:, None], kb.astype(q.dtype), vb.astype(q.dtype), i[:, None],
                       jnp.concatenate([seen, seen], 1))
        o, (memory, momentum, chunk_memory, _) = memory_step(
            tuple(a[:, 0] for a in args), (memory, momentum, chunk_memory, i), self.chunk_size,
            self.depth)
        new = (seg_memory, memory, momentum, chunk_memory, n + 1, kb, vb)
        # The padding after the last token leaves the carry as it is.
        return _select(real, new, carry), (y[:, 0], o)

    # ------------------------------------------------------------------ the three modes
    def _segments(self, call, xs, memory0, S, resets=None):
        """The scan over segments of S tokens of [B, T, ...] inputs (T padded to whole
        segments; `resets` [B, T / S] when documents start on segment boundaries) -> (y, o)
        [B, T, ...]."""
        B, T = xs[0].shape[:2]
        n = -(-T // S)

        def segments(a):    # [B, T, ...] -> [n, B, S, ...]
            a = jnp.pad(a, [(0, 0), (0, n * S - T)] + [(0, 0)] * (a.ndim - 2))
            return jnp.moveaxis(a.reshape((B, n, S) + a.shape[2:]), 1, 0)

        memory = broadcast_rows(memory0, B)
        body = jax.checkpoint(lambda c, i: self._segment(call, memory0, c, i))
        _, (y, o) = jax.lax.scan(body, (memory, jax.tree.map(jnp.zeros_like, memory)),
                                 (tuple(segments(a) for a in xs),
                                  None if resets is None else jnp.moveaxis(resets, 1, 0)))
        whole = lambda a: jnp.moveaxis(a, 0, 1).reshape((B, n * S) + a.shape[3:])[:, :T]
        return whole(y), whole(o)

    def _documents(self, call, xs, memory0, segment_ids):
        T = segment_ids.shape[1]
        S = min(self.segment_length, T)
        rows = pack_rows(segment_ids, docs_per_row(T, S))

        def row(cu, *a):    # one row's documents, each from a segment boundary
            layout = chunk_layout(1, T, S, cu)
            flat = lambda t: t.reshape((1, layout.T_pad) + t.shape[3:])
            laid = tuple(flat(layout.to_chunks(t[None])) for t in a)
            y, o = self._segments(call, laid, memory0, S, resets=layout.reset)
            back = lambda t: layout.from_chunks(t.reshape((1, -1, S) + t.shape[2:]))[0]
            return back(y), back(o)

        def scan(a):
            B = a[0].shape[0]
            carry = self._fresh_carry(memory0, B, S, a[0].dtype)
            _, out = blocked_token_scan(
                lambda c, i: self._token(call, memory0, c, i), carry,
                (tuple(a), rows.starts, jnp.ones((B, T), bool)), T)
            return out

        return packed_or_scanned(rows, row, scan, xs)

    def _fresh_carry(self, memory0, B, S, dtype):
        memory = broadcast_rows(memory0, B)
        buf = jnp.zeros((B, 2 * S, self.num_heads, self.head_dim), dtype)
        return (memory, memory, jax.tree.map(jnp.zeros_like, memory), memory,
                jnp.zeros((B,), jnp.int32), buf, buf)

    def _cached(self, call, xs, memory0, cache, cache_pos):
        """From the cache at position cache_pos (the model's tokens seen; the learned initial
        memory at 0), token by token. Returns (y, o, the new cache without conv entries)."""
        B, T = xs[0].shape[:2]
        st = cache["state"]
        carry = (cache["segment_memory"], st["memory"], st["momentum"], st["chunk_memory"],
                 jnp.broadcast_to(jnp.asarray(cache_pos, jnp.int32), (B,)), cache["k"],
                 cache["v"])
        start = jnp.broadcast_to(cache_pos + jnp.arange(T, dtype=jnp.int32) == 0, (B, T))
        token = lambda c, i: self._token(call, memory0, c, i)
        if T == 1:
            carry, (y, o) = token(carry, (tuple(a[:, 0] for a in xs), start[:, 0],
                                          jnp.ones((B,), bool)))
            y, o = y[:, None], o[:, None]
        else:
            carry, (y, o) = blocked_token_scan(token, carry,
                                               (tuple(xs), start, jnp.ones((B, T), bool)), T)
        seg_memory, memory, momentum, chunk_memory, _, kb, vb = carry
        return y, o, {"segment_memory": seg_memory, "k": kb, "v": vb,
                      "state": {"memory": memory, "momentum": momentum,
                                "chunk_memory": chunk_memory}}


_SETTINGS = {
    "segment_length": Setting(64, int, "tokens per segment: attention stays inside a segment; "
                                       "the memory is read when it begins and carries "
                                       "everything across segments"),
    "persistent_tokens": persistent_setting(4),
    **{n: s for n, s in _MEMORY_SETTINGS.items() if n != "use_gate"},
    "memory_chunk": Setting(8, int, "tokens whose memory gradients and read-backs share the "
                                    "chunk-start memory, chunks counted from each segment's "
                                    "start (1: the exact online rule; segment_length: the "
                                    "paper's one update per segment)"),
    **conv_settings(True),
    "short_conv": Setting(True, bool, "SiLU(causal depthwise conv) on the memory's query of x "
                                      "(the read-out's); the memory's inputs from the "
                                      "attention output have none"),
}


def _check(shared: Shared, s) -> None:
    check_rope_head_dim(shared)
    positive_int(s, "segment_length")
    check_persistent(s)
    _check_memory(shared, s)


def _build(shared: Shared, s, name):
    return TitansMAC(d_model=shared.d_model, num_heads=shared.num_heads,
                     head_dim=shared.head_dim, segment_length=s["segment_length"],
                     persistent_tokens=s["persistent_tokens"], rope_theta=shared.rope_theta,
                     depth=s["depth"], expansion=s["expansion"], chunk_size=s["memory_chunk"],
                     lr_max=s["lr_max"], conv_size=s["conv_size"],
                     use_short_conv=s["short_conv"], norm_eps=shared.norm_eps,
                     init_std=shared.init_std, dtype=shared.dtype, impl=shared.impl,
                     attn_impl=shared.attn_impl, name=name)


register(Mechanism("titans_mac", "token", _build, _SETTINGS, _check,
                   "Titans MAC: per segment, attention over persistent tokens, read-outs of "
                   "the neural long-term memory and the segment; the memory learns from the "
                   "attention output and gates it",
                   attention_span=lambda s, T: 2 * min(s["segment_length"], T)
                   + s["persistent_tokens"]))
