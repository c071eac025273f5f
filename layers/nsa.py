"""Native Sparse Attention (NSA, Yuan et al. 2025), token mixer `nsa`: three attention
branches per query head, combined by learned sigmoid gates,

    o_t = g_cmp · Attn(q_t, compressed blocks) + g_sel · Attn(q_t, selected blocks)
          + g_win · Attn(q_t, sliding window),

each branch with its own keys and values (one k_proj / v_proj gives all three, as the paper's
independent branch keys), GQA, RoPE on q and on every branch's keys.

* compressed: every `cmp_block` tokens at stride `cmp_stride` are compressed to one key and
  one value by a learned linear map of the whole block (`k_conv` / `v_conv`: a strided
  convolution, its kernel position-dependent across the block: the paper's compression MLP
  with intra-block position encoding, as one linear layer). A query sees a compressed block
  once the block has ended (its last token <= the query).
* selected: the keys of `sel_blocks` blocks of `sel_block` tokens, shared by the GQA group
  (`pallas_kernels.sparse_attention.block_sparse_attention`). A block's importance is the
  compressed branch's attention weight on the compressed blocks overlapping it (by overlap
  fraction), summed over the group's heads and the queries. The op selects per query block of
  `sel_block` tokens; so that no token's selection depends on later tokens, query block i ranks
  the blocks by the importance that the queries of block i − 1 gave them (a one-block lag),
  and always takes blocks i, i − 1 and the first block of its document (the paper's local and
  initial blocks).
* window: causal sliding window of `window` tokens.

With `short_conv` (off by default; not in the paper, but attn and swa have it, so a comparison
can give every model the same input path) q and each branch's k and v first go through
SiLU(causal depthwise conv), and the decode cache also holds their last `conv_size` − 1 inputs.

Packed documents: no branch attends across documents (compressed blocks that straddle a
boundary are dropped). The blocks are aligned to the row, not to each document, so a document
that starts inside a block is cut into blocks differently from the same document alone: packed
equals separate exactly only for documents starting at multiples of `sel_block` (and of
`cmp_stride`, which divides it).

Decode cache: every branch's keys and values for `max_len` tokens, the compressed keys and
values so far, the current query block's selection and the importance its queries have given
so far. A step writes the token's keys (and the compressed block it completes), re-selects when
it opens a query block, and attends in O(max_len). A multi-token call into an empty cache
(prefill) is the full forward, whose keys, compressed blocks, last selection and importance
are then cached; a multi-token call at a later position runs the steps in a scan.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers.attention import _own, check_own_heads
from layers.common import constrain, dense, document_ids, init, segment_starts
from layers.conv import conv_settings, qkv_conv_cache, short_conv_qkv
from layers.registry import Mechanism, Setting, SettingError, Shared, positive_int, register
from layers.rope import apply_rope
from pallas_kernels.attention import attention
from pallas_kernels.sparse_attention import block_sparse_attention

# Added to the scores of the blocks always taken (initial and local): above any importance.
FORCED = 1e9


def num_compressed(T: int, l: int, d: int) -> int:
    return max(0, (T - l) // d + 1)


def overlap_matrix(M: int, NS: int, l: int, d: int, bs: int) -> np.ndarray:
    """[M, NS]: the fraction of compressed block m (tokens m·d .. m·d + l − 1) inside
    selection block j (tokens j·bs .. j·bs + bs − 1)."""
    m = np.arange(M)[:, None] * d
    j = np.arange(NS)[None] * bs
    return np.clip(np.minimum(m + l, j + bs) - np.maximum(m, j), 0, None) / l


def select_blocks(imp, i, first, n: int):
    """Top-n block indices [..., n] (−1 where fewer exist) of query block i, whose document
    begins in block `first`, from the importance [..., NS] its previous block's queries gave:
    only blocks first .. i are candidates; blocks i, i − 1 and `first` are always taken (in
    that order of priority when n < 3)."""
    j = jnp.arange(imp.shape[-1])
    first = jnp.asarray(first)[..., None]
    bonus = (3 * (j == i) + 2 * (j == i - 1) + (j == first)) * FORCED
    score = jnp.where((j <= i) & (j >= first), imp + bonus, -jnp.inf)
    val, idx = jax.lax.top_k(score, n)
    return jnp.where(val == -jnp.inf, -1, idx).astype(jnp.int32)


def masked_attend(q, k, v, mask, scale):
    """q [B, H, D] against k, v [B, L, Hkv, D] where mask [B, Hkv, L] (decode steps): float32
    (float64 for float64 q) softmax, zeros where nothing is visible."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    B, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D).astype(acc)
    s = jnp.einsum("bhgd,blhd->bhgl", qg, k.astype(acc)) * scale
    s = jnp.where(mask[:, :, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask[:, :, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den == 0, 1.0, den)
    return jnp.einsum("bhgl,blhd->bhgd", p, v.astype(acc)).reshape(B, H, v.shape[-1])


class Compress(nn.Module):
    """The compression kernel [length, D, D] of one branch: a block's key (or value) is
    Σ_p x[p] W[p] over its `length` tokens (`compress`). The module only holds the kernel, so
    decode steps can use it inside a scan."""
    length: int
    head_dim: int
    init_std: float

    @nn.compact
    def __call__(self):
        D = self.head_dim
        return self.param("kernel", init(self.init_std / np.sqrt(self.length),
                                         (None, "kv", None)), (self.length, D, D), jnp.float32)


def compress(blocks, kernel, dtype):
    """[..., length, Hkv, D] -> [..., Hkv, D]."""
    return jnp.einsum("...lhd,lde->...he", blocks.astype(dtype), kernel.astype(dtype))


class NSA(nn.Module):
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cmp_block: int = 32
    cmp_stride: int = 16
    sel_block: int = 64
    sel_blocks: int = 16
    window: int = 512
    use_short_conv: bool = False
    conv_size: int = 4
    rope_theta: float = 10000.0
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    def init_cache(self, batch: int, max_len: int) -> dict:
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        M = num_compressed(max_len, self.cmp_block, self.cmp_stride)
        NS = -(-max_len // self.sel_block)
        zeros = lambda *s: jnp.zeros(s, self.dtype)
        cache = {"k": zeros(batch, max_len, 3, Hkv, D), "v": zeros(batch, max_len, 3, Hkv, D),
                 "kc": zeros(batch, M, Hkv, D), "vc": zeros(batch, M, Hkv, D),
                 "imp": jnp.zeros((batch, Hkv, NS), jnp.float32),
                 "sel": jnp.full((batch, Hkv, min(self.sel_blocks, NS)), -1, jnp.int32)}
        if self.use_short_conv:
            cache.update(qkv_conv_cache(batch, {"q": (H, D), "k_branches": (3, Hkv, D),
                                                "v_branches": (3, Hkv, D)},
                                        self.conv_size, self.dtype))
        return cache

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        q = dense((H, D), ("embed", "heads", "kv"), name="q_proj", **kw)(x)
        k = dense((3, Hkv, D), ("embed", None, "heads", "kv"), name="k_proj", **kw)(x)
        v = dense((3, Hkv, D), ("embed", None, "heads", "kv"), name="v_proj", **kw)(x)
        g = jax.nn.sigmoid(dense((H, 3), ("embed", "heads", None), name="g_proj", **kw)(x))
        conv_cache = {}
        if self.use_short_conv:
            # "k_branches": the three branches' keys ("k_conv" is the compression kernel).
            ax = (None, "heads", "kv")
            qkv, conv_cache = short_conv_qkv({"q": q, "k_branches": k, "v_branches": v},
                                             self.conv_size, segment_ids, cache, self.dtype,
                                             axes={"k_branches": ax, "v_branches": ax})
            q, k, v = qkv["q"], qkv["k_branches"], qkv["v_branches"]
        q = constrain(apply_rope(q, positions, self.rope_theta), ("batch", "length", "heads", "kv"))
        rope_k = jax.vmap(lambda kb: apply_rope(kb, positions, self.rope_theta), 2, 2)
        k = rope_k(k)
        k_conv = Compress(self.cmp_block, D, self.init_std, name="k_conv")()
        v_conv = Compress(self.cmp_block, D, self.init_std, name="v_conv")()
        if cache is None:
            o, _ = self._forward(q, k, v, k_conv, v_conv, segment_ids)
            new_cache = None
        else:
            kv = {n: c for n, c in cache.items() if not n.startswith("conv_")}
            o, new_cache = self._cached(q, k, v, k_conv, v_conv, kv, cache_pos)
            new_cache.update(conv_cache)
        o = jnp.einsum("bthc,bthcd->bthd", g.astype(o.dtype), o)
        o = constrain(o.astype(self.dtype), ("batch", "length", "heads", "kv"))
        y = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj", **kw)(o)
        return y, new_cache

    # ------------------------------------------------------------------ full sequence
    def _forward(self, q, k, v, k_conv, v_conv, segment_ids):
        """The three branches' outputs [B, T, H, 3, D], and what a prefill caches: compressed
        keys / values, per query block the importance its queries gave and its selection."""
        B, T, H, D = q.shape
        l, d, bs = self.cmp_block, self.cmp_stride, self.sel_block
        scale = D ** -0.5
        doc = (jnp.ones((B, T), jnp.int32) if segment_ids is None
               else document_ids(segment_ids))
        M, NQ = num_compressed(T, l, d), -(-T // bs)

        if M:
            tok = np.arange(M)[:, None] * d + np.arange(l)                # [M, l]
            kc = compress(k[:, tok, 0], k_conv, self.dtype)               # [B, M, Hkv, D]
            vc = compress(v[:, tok, 0], v_conv, self.dtype)
            ends = jnp.asarray(tok[:, -1], jnp.int32)
            whole = doc[:, tok[:, 0]] == doc[:, tok[:, -1]]               # [B, M]
            kc_pos = jnp.where(whole, ends, -1)
            o_cmp = attention(q, kc.astype(q.dtype), vc.astype(q.dtype), causal=True,
                              q_positions=jnp.arange(T, dtype=jnp.int32), kv_positions=kc_pos,
                              segment_ids=doc, kv_segment_ids=doc[:, tok[:, -1]],
                              impl="xla")
            imp = self._importance(q, kc, kc_pos, doc, doc[:, tok[:, -1]], scale)
        else:
            kc = vc = jnp.zeros((B, 0) + k.shape[3:], self.dtype)
            o_cmp = jnp.zeros_like(q)
            imp = jnp.zeros((B, NQ, self.num_kv_heads, NQ), jnp.float32)
        # Query block i ranks by what block i − 1's queries gave (see the module docstring).
        prev = jnp.concatenate([jnp.zeros_like(imp[:, :1]), imp[:, :-1]], axis=1)
        n = min(self.sel_blocks, NQ)
        # The block where the document of each query block's first token begins.
        t = jnp.arange(T, dtype=jnp.int32)
        start = jax.lax.cummax(jnp.where(segment_starts(doc), t, 0), axis=1)
        first = start[:, ::bs] // bs                                      # [B, NQ]
        idx = jax.vmap(lambda p, i, f: select_blocks(p, i, f[:, None], n), (1, 0, 1), 2)(
            prev, jnp.arange(NQ), first)                                  # [B, Hkv, NQ, n]
        idx = jax.lax.stop_gradient(idx)
        seg = None if segment_ids is None else doc
        o_sel = block_sparse_attention(q, k[:, :, 1], v[:, :, 1], idx, block_size=bs,
                                       causal=True, segment_ids=seg, impl=self.impl)
        # "auto": a library kernel (cuDNN, splash) where it serves the window, else xla.
        o_win = attention(q, k[:, :, 2], v[:, :, 2], window=self.window, segment_ids=seg,
                          impl="auto")
        state = dict(kc=kc, vc=vc, imp=imp, idx=idx)
        return jnp.stack([o_cmp, o_sel, o_win], axis=3), state

    def _importance(self, q, kc, kc_pos, q_doc, kc_doc, scale):
        """[B, NQ, Hkv, NS]: per query block, the compressed attention weights of its queries
        and the group's heads, spread over the selection blocks by overlap."""
        B, T, H, D = q.shape
        Hkv, bs = self.num_kv_heads, self.sel_block
        NQ, M = -(-T // bs), kc.shape[1]
        over = jnp.asarray(overlap_matrix(M, NQ, self.cmp_block, self.cmp_stride, bs),
                           jnp.float32)
        pad = NQ * bs - T
        qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, NQ, bs, Hkv, H // Hkv, D)
        qd = jnp.pad(q_doc, ((0, 0), (0, pad)), constant_values=-1).reshape(B, NQ, bs)
        t = jnp.arange(NQ * bs, dtype=jnp.int32).reshape(NQ, bs)
        kcf = jax.lax.stop_gradient(kc).astype(jnp.float32)

        def one(args):
            qi, di, ti = args                                  # [B, bs, Hkv, G, D], [B, bs], [bs]
            s = jnp.einsum("bthgd,bmhd->bthgm", jax.lax.stop_gradient(qi).astype(jnp.float32),
                           kcf) * scale
            ok = ((kc_pos[:, None] >= 0) & (kc_pos[:, None] <= ti[None, :, None])
                  & (kc_doc[:, None] == di[..., None]))[:, :, None, None]
            s = jnp.where(ok, s, -jnp.inf)
            mx = jnp.max(s, axis=-1, keepdims=True)
            p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
            p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
            p = jnp.where((ti < T)[None, :, None, None, None], p, 0.0)  # padding rows
            return jnp.einsum("bthgm,ms->bhs", p, over)

        imp = jax.lax.map(one, (jnp.moveaxis(qb, 1, 0), jnp.moveaxis(qd, 1, 0), t))
        return jnp.moveaxis(imp, 0, 1)                          # [B, NQ, Hkv, NS]

    # ------------------------------------------------------------------ decoding
    def _cached(self, q, k, v, k_conv, v_conv, cache, cache_pos):
        """Several tokens into an empty cache: the full forward, then its state cached;
        otherwise the tokens one at a time (see the module docstring)."""
        def step(c, xs):
            qt, kt, vt, t = xs
            o, c = self._step(qt, kt, vt, k_conv, v_conv, c, t)
            return c, o

        def steps():
            ts = cache_pos + jnp.arange(T, dtype=jnp.int32)
            c, o = jax.lax.scan(step, cache, (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0),
                                              jnp.moveaxis(v, 1, 0), ts))
            return jnp.moveaxis(o, 0, 1), c

        T = q.shape[1]
        if T == 1:
            return steps()
        return jax.lax.cond(cache_pos == 0,
                            lambda: self._prefill(q, k, v, k_conv, v_conv, cache), steps)

    def _prefill(self, q, k, v, k_conv, v_conv, cache):
        o, st = self._forward(q, k, v, k_conv, v_conv, None)
        NQ, M = st["imp"].shape[1], st["kc"].shape[1]
        put = lambda buf, x: buf.at[:, :x.shape[1]].set(x.astype(buf.dtype))
        # The block of the last token: the importance its queries gave so far, its selection.
        imp = jnp.zeros_like(cache["imp"]).at[..., :NQ].set(st["imp"][:, NQ - 1])
        sel = st["idx"][:, :, NQ - 1]
        new = {"k": put(cache["k"], k), "v": put(cache["v"], v),
               "kc": put(cache["kc"], st["kc"][:, :M]), "vc": put(cache["vc"], st["vc"][:, :M]),
               "imp": imp,
               "sel": jnp.full_like(cache["sel"], -1).at[..., :sel.shape[-1]].set(sel)}
        return o.astype(q.dtype), new

    def _step(self, q, k, v, k_conv, v_conv, cache, t):
        """One token at position t: q [B, H, D], k, v [B, 3, Hkv, D] -> ([B, H, 3, D], cache)."""
        B, H, D = q.shape
        l, d, bs, W = self.cmp_block, self.cmp_stride, self.sel_block, self.window
        scale = D ** -0.5
        L = cache["k"].shape[1]
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k[:, None].astype(cache["k"].dtype),
                                                 t, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v[:, None].astype(cache["v"].dtype),
                                                 t, axis=1)
        kc, vc = cache["kc"], cache["vc"]
        M = kc.shape[1]
        pos = jnp.arange(L, dtype=jnp.int32)
        if M:  # the compressed block ending at t, if one does
            start = t + 1 - l
            done = (start >= 0) & (jnp.maximum(start, 0) % d == 0)
            m = jnp.clip(start // d, 0, M - 1)
            blk = lambda c, br: jax.lax.dynamic_slice_in_dim(c[:, :, br], jnp.maximum(start, 0),
                                                             l, axis=1)
            new_k = compress(blk(ck, 0), k_conv, self.dtype)
            new_v = compress(blk(cv, 0), v_conv, self.dtype)
            old_k = jax.lax.dynamic_index_in_dim(kc, m, 1, keepdims=False)
            old_v = jax.lax.dynamic_index_in_dim(vc, m, 1, keepdims=False)
            kc = jax.lax.dynamic_update_index_in_dim(
                kc, jnp.where(done, new_k.astype(kc.dtype), old_k), m, 1)
            vc = jax.lax.dynamic_update_index_in_dim(
                vc, jnp.where(done, new_v.astype(vc.dtype), old_v), m, 1)
            cmp_seen = (jnp.arange(M) * d + l - 1 <= t)
            cmp_mask = jnp.broadcast_to(cmp_seen, (B, self.num_kv_heads, M))
            o_cmp = masked_attend(q, kc, vc, cmp_mask, scale)
            p = self._step_weights(q, kc, cmp_mask, scale)          # [B, Hkv, M]
            NS = cache["imp"].shape[-1]
            over = jnp.asarray(overlap_matrix(M, NS, l, d, bs), jnp.float32)
            gained = jnp.einsum("bhm,ms->bhs", p, over)
        else:
            o_cmp = jnp.zeros_like(q)
            gained = jnp.zeros_like(cache["imp"])
        i = t // bs
        opens = t % bs == 0
        n = cache["sel"].shape[-1]
        sel = jnp.where(opens, select_blocks(cache["imp"], i, 0, n), cache["sel"])
        imp = jnp.where(opens, 0.0, cache["imp"]) + gained
        in_sel = jnp.any((pos // bs)[None, None, :, None] == sel[:, :, None, :], axis=-1)
        o_sel = masked_attend(q, ck[:, :, 1], cv[:, :, 1], in_sel & (pos <= t), scale)
        win = jnp.broadcast_to((pos <= t) & (t - pos < W), (B, self.num_kv_heads, L))
        o_win = masked_attend(q, ck[:, :, 2], cv[:, :, 2], win, scale)
        o = jnp.stack([o_cmp, o_sel, o_win], axis=2).astype(q.dtype)
        return o, {"k": ck, "v": cv, "kc": kc, "vc": vc, "imp": imp, "sel": sel}

    def _step_weights(self, q, kc, mask, scale):
        """The compressed branch's attention weights of the token, summed over each group."""
        B, H, D = q.shape
        Hkv = self.num_kv_heads
        s = jnp.einsum("bhgd,bmhd->bhgm", q.reshape(B, Hkv, H // Hkv, D).astype(jnp.float32),
                       kc.astype(jnp.float32)) * scale
        s = jnp.where(mask[:, :, None], s, -jnp.inf)
        mx = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(mask[:, :, None], jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
        p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
        return jnp.sum(p, axis=2)


# ---------------------------------------------------------------------------- registration
def _settings() -> dict:
    return {
        "heads": Setting(None, int, "query heads (None: the model's num_heads)", optional=True),
        "head_size": Setting(None, int, "head width (None: the model's head_dim)", optional=True),
        "num_kv_heads": Setting(None, int, "GQA key/value heads, sharing a selection "
                                           "(None: heads)", optional=True),
        "rope_base": Setting(None, float, "RoPE base (None: the model's rope_theta)",
                             optional=True),
        "cmp_block": Setting(32, int, "tokens compressed into one key/value"),
        "cmp_stride": Setting(16, int, "stride between compressed blocks (divides cmp_block "
                                       "and sel_block)"),
        "sel_block": Setting(64, int, "selection block (a power of two)"),
        "sel_blocks": Setting(16, int, "blocks selected per query block"),
        "window": Setting(512, int, "sliding-window keys each query sees, itself included"),
        # Not in the paper; the other attention mixers have them, so that a comparison can
        # give every model the same input path.
        **conv_settings(False),
    }


def _check(shared: Shared, s) -> None:
    positive_int(s, "cmp_block", "cmp_stride", "sel_block", "sel_blocks", "window",
                 "conv_size")
    check_own_heads(shared, s)
    if s["sel_block"] & (s["sel_block"] - 1):
        raise SettingError("sel_block", f"must be a power of two, got {s['sel_block']}")
    for f in ("cmp_block", "sel_block"):
        if s[f] % s["cmp_stride"]:
            raise SettingError("cmp_stride", f"must divide {f} = {s[f]}, got {s['cmp_stride']}")


def _build(shared: Shared, s, name):
    shared = _own(shared, s)
    return NSA(d_model=shared.d_model, num_heads=shared.num_heads,
               num_kv_heads=s["num_kv_heads"] or shared.num_heads, head_dim=shared.head_dim,
               cmp_block=s["cmp_block"], cmp_stride=s["cmp_stride"], sel_block=s["sel_block"],
               sel_blocks=s["sel_blocks"], window=s["window"], use_short_conv=s["short_conv"],
               conv_size=s["conv_size"], rope_theta=shared.rope_theta,
               init_std=shared.init_std, dtype=shared.dtype,
               impl=shared.impl if shared.impl in ("reference", "xla", "pallas") else "auto",
               name=name)


def _span(s, T: int) -> int:
    return min(T, num_compressed(T, s["cmp_block"], s["cmp_stride"])
               + s["sel_blocks"] * s["sel_block"] + s["window"])


register(Mechanism("nsa", "token", _build, _settings(), _check,
                   "native sparse attention: compressed + selected blocks + sliding window, "
                   "gated", attention_span=_span))
