"""Native Sparse Attention (NSA, Yuan et al. 2025), token mixer `nsa`: three attention
branches per query head, combined by learned sigmoid gates,

    o_t = g_cmp · Attn(q_t, compressed blocks) + g_sel · Attn(q_t, selected blocks)
          + g_win · Attn(q_t, sliding window),

each branch with its own keys and values (one k_proj / v_proj gives all three, as the paper's
independent branch keys; `shared_kv` gives one k / v to all three, as fla), GQA, RoPE.

* compressed: every `cmp_block` tokens at stride `cmp_stride` are compressed to one key and
  one value. `compress="linear"` (the paper's φ): a learned linear map of the whole block
  (`k_conv` / `v_conv`, a kernel per position in the block: the paper's compression MLP with
  intra-block position encoding, as one linear layer) of the keys *before* RoPE; the
  compressed key is then rotated at its block's first position, so its scores depend on
  distances only (shifting every position leaves them unchanged). `compress="mean"` (fla):
  the mean of the block's rotated keys and of its values, no parameters (also distance-only:
  a mean of rotations is linear). A query sees a compressed block once the block has ended
  (its last token <= the query).
* selected: the keys of `sel_blocks` blocks of `sel_block` tokens, shared by the GQA group
  (`pallas_kernels.sparse_attention.block_sparse_attention`). A block's importance for query
  token t is the compressed branch's attention weight of t on the compressed blocks
  overlapping it (by overlap fraction), summed over the group's heads (the paper's eq. 8-10).
  `selection="token"` (the paper): every token ranks the blocks up to its own by its own
  importance and takes the top `sel_blocks`, of which the first block of its document and
  its own and the previous block (the paper's 1 initial and 2 local blocks) are always
  taken; the op runs with one query token per program. `selection="block"` (faster, not the
  paper): one selection per query block of `sel_block` tokens, ranked by the importance the
  previous block's queries gave (a one-block lag keeps it causal).
* window: causal sliding window of `window` tokens (0: no window branch, as fla's
  `window_size=0`).

fla's NSA (`fla.layers.nsa`) is `compress="mean"`, `shared_kv=True`, `cmp_block =
cmp_stride = sel_block`, `selection="token"` (tests/layers/test_nsa.py checks it against fla's
naive reference).

With `short_conv` (off by default; not in the paper, but attn and swa have it, so a comparison
can give every model the same input path) q and each branch's k and v first go through
SiLU(causal depthwise conv), and the decode cache also holds their last `conv_size` − 1 inputs.

Packed documents: no branch attends across documents (compressed blocks that straddle a
boundary are dropped). The blocks are aligned to the row, not to each document, so a document
that starts inside a block is cut into blocks differently from the same document alone: packed
equals separate exactly only for documents starting at multiples of `sel_block` (and of
`cmp_stride`, which divides it).

Decode cache: the keys and values every branch reads for `max_len` tokens (the compression's
input keys: un-rotated for "linear"), the compressed keys and values so far and, with
`selection="block"`, the current query block's selection and the importance its queries have
given so far. A step writes the token's keys (and the compressed block it completes), selects
(per token; or when it opens a query block) and attends in O(max_len). A multi-token call into
an empty cache (prefill) is the full forward, whose keys, compressed blocks (and last
selection and importance) are then cached; a multi-token call at a later position runs the
steps in a scan.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers.attention import _own, check_own_heads
from layers.common import constrain, dense, document_ids, init, segment_starts
from layers.conv import conv_settings, qkv_conv_cache, short_conv_qkv
from layers.registry import (MAX_INT, Mechanism, Setting, SettingError, Shared, positive_int,
                             register)
from layers.rope import apply_rope
from pallas_kernels.attention import attention
from pallas_kernels.sparse_attention import block_sparse_attention

# Added to the scores of the blocks always taken (initial and local): above any importance.
FORCED = 1e9
# Blocks always taken: the document's first block and the query's own and previous blocks.
NUM_FORCED = 3
SELECTIONS = ("token", "block")
COMPRESSIONS = ("linear", "mean")


def num_compressed(T: int, l: int, d: int) -> int:
    return max(0, (T - l) // d + 1)


def overlap_matrix(M: int, NS: int, l: int, d: int, bs: int) -> np.ndarray:
    """[M, NS]: the fraction of compressed block m (tokens m·d .. m·d + l − 1) inside
    selection block j (tokens j·bs .. j·bs + bs − 1)."""
    m = np.arange(M)[:, None] * d
    j = np.arange(NS)[None] * bs
    return np.clip(np.minimum(m + l, j + bs) - np.maximum(m, j), 0, None) / l


def select_blocks(imp, i, first, n: int):
    """Top-n block indices [..., n] (−1 where fewer exist) from the importance [..., NS] of a
    query in block i whose document begins in block `first` (i, first broadcast against
    imp's leading dims): only blocks first .. i are candidates; blocks i, i − 1 and `first`
    are always taken (in that order of priority when n < 3)."""
    j = jnp.arange(imp.shape[-1])
    i, first = jnp.asarray(i)[..., None], jnp.asarray(first)[..., None]
    bonus = (3 * (j == i) + 2 * (j == i - 1) + (j == first)) * FORCED
    score = jnp.where((j <= i) & (j >= first), imp + bonus, -jnp.inf)
    val, idx = jax.lax.top_k(score, n)
    return jnp.where(val == -jnp.inf, -1, idx).astype(jnp.int32)


def masked_softmax(s, mask):
    """Softmax over the last axis where mask, zeros where nothing is visible."""
    m = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(den == 0, 1.0, den)


def masked_attend(q, k, v, mask, scale):
    """q [B, H, D] against k, v [B, L, Hkv, D] where mask [B, Hkv, L] (decode steps): float32
    (float64 for float64 q) softmax, zeros where nothing is visible."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    B, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D).astype(acc)
    s = jnp.einsum("bhgd,blhd->bhgl", qg, k.astype(acc)) * scale
    p = masked_softmax(s, mask[:, :, None])
    return jnp.einsum("bhgl,blhd->bhgd", p, v.astype(acc)).reshape(B, H, v.shape[-1])


def group_weights(q, kc, mask, scale):
    """The compressed branch's attention weights, summed over each GQA group (the paper's
    shared importance): q [..., Hkv, G, D], kc [B, M, Hkv, D] (q's leading dims start with B),
    mask broadcasting to [..., Hkv, 1, M] -> [..., Hkv, M], float32, no gradient."""
    q, kc = (jax.lax.stop_gradient(x).astype(jnp.float32) for x in (q, kc))
    s = jnp.einsum("b...hgd,bmhd->b...hgm", q, kc) * scale
    return jnp.sum(masked_softmax(s, mask), axis=-2)


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
    """[..., length, Hkv, D] -> [..., Hkv, D]: the learned map, or the mean (kernel None)."""
    if kernel is None:
        return jnp.mean(blocks.astype(jnp.promote_types(dtype, jnp.float32)), axis=-3
                        ).astype(dtype)
    return jnp.einsum("...lhd,lde->...he", blocks.astype(dtype), kernel.astype(dtype))


def slot(x, branch: int):
    """The keys (values) branch 0 / 1 / 2 (compressed / selected / window) reads from the
    stack x [B, T, n, Hkv, D]: a branch without its own slot reads the last one."""
    return x[:, :, min(branch, x.shape[2] - 1)]


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
    selection: str = "token"
    compression: str = "linear"
    shared_kv: bool = False
    use_short_conv: bool = False
    conv_size: int = 4
    rope_theta: float = 10000.0
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @property
    def kv_branches(self) -> int:
        """Key / value projections: one per branch, or one for all."""
        return 1 if self.shared_kv else 3

    @property
    def key_slots(self) -> int:
        """Key stacks the branches read (see `_keys`)."""
        return 2 if self.shared_kv and self.compression == "linear" else self.kv_branches

    def init_cache(self, batch: int, max_len: int) -> dict:
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        M = num_compressed(max_len, self.cmp_block, self.cmp_stride)
        NS = -(-max_len // self.sel_block)
        zeros = lambda *s: jnp.zeros(s, self.dtype)
        cache = {"k": zeros(batch, max_len, self.key_slots, Hkv, D),
                 "v": zeros(batch, max_len, self.kv_branches, Hkv, D),
                 "kc": zeros(batch, M, Hkv, D), "vc": zeros(batch, M, Hkv, D)}
        if self.selection == "block":
            cache["imp"] = jnp.zeros((batch, Hkv, NS), jnp.float32)
            cache["sel"] = jnp.full((batch, Hkv, min(self.sel_blocks, NS)), -1, jnp.int32)
        if self.use_short_conv:
            kv = (self.kv_branches, Hkv, D)
            cache.update(qkv_conv_cache(batch, {"q": (H, D), "k_branches": kv,
                                                "v_branches": kv}, self.conv_size, self.dtype))
        return cache

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        H, Hkv, D, nb = self.num_heads, self.num_kv_heads, self.head_dim, self.kv_branches
        kw = dict(std=self.init_std, dtype=self.dtype)
        q = dense((H, D), ("embed", "heads", "kv"), name="q_proj", **kw)(x)
        k = dense((nb, Hkv, D), ("embed", None, "heads", "kv"), name="k_proj", **kw)(x)
        v = dense((nb, Hkv, D), ("embed", None, "heads", "kv"), name="v_proj", **kw)(x)
        g = jax.nn.sigmoid(dense((H, 3), ("embed", "heads", None), name="g_proj", **kw)(x))
        conv_cache = {}
        if self.use_short_conv:
            # "k_branches": the branches' keys ("k_conv" is the compression kernel).
            ax = (None, "heads", "kv")
            qkv, conv_cache = short_conv_qkv({"q": q, "k_branches": k, "v_branches": v},
                                             self.conv_size, segment_ids, cache, self.dtype,
                                             axes={"k_branches": ax, "v_branches": ax},
                                             std=self.init_std)
            q, k, v = qkv["q"], qkv["k_branches"], qkv["v_branches"]
        q = constrain(apply_rope(q, positions, self.rope_theta), ("batch", "length", "heads", "kv"))
        k = self._keys(k, positions)
        kernels = None
        if self.compression == "linear":
            kernels = (Compress(self.cmp_block, D, self.init_std, name="k_conv")(),
                       Compress(self.cmp_block, D, self.init_std, name="v_conv")())
        if cache is None:
            o, _ = self._forward(q, k, v, kernels, positions, segment_ids)
            new_cache = None
        else:
            kv = {n: c for n, c in cache.items() if not n.startswith("conv_")}
            o, new_cache = self._cached(q, k, v, kernels, positions, kv, cache_pos)
            new_cache.update(conv_cache)
        o = jnp.einsum("bthc,bthcd->bthd", g.astype(o.dtype), o)
        o = constrain(o.astype(self.dtype), ("batch", "length", "heads", "kv"))
        y = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj", **kw)(o)
        return y, new_cache

    def _keys(self, k, positions):
        """The key stack [B, T, key_slots, Hkv, D] the branches read (`slot`): slot 0 the
        compression's input (the keys before RoPE for "linear", rotated for "mean"), the
        others the selected and window branches' rotated keys."""
        rot = jax.vmap(lambda kb: apply_rope(kb, positions, self.rope_theta), 2, 2)(k)
        first = k[:, :, :1] if self.compression == "linear" else rot[:, :, :1]
        rest = rot[:, :, 1:] if not self.shared_kv else (
            rot if self.compression == "linear" else rot[:, :, :0])
        return jnp.concatenate([first, rest], axis=2)

    def _compressed(self, kb, vb, kernels, pos):
        """Compressed keys and values of blocks kb, vb [B, ..., l, Hkv, D]; `pos` [B|1, ...]
        (or [B]): the position of each block's first token (where a "linear" key is
        rotated)."""
        kk, vk = (None, None) if kernels is None else kernels
        kc, vc = compress(kb, kk, self.dtype), compress(vb, vk, self.dtype)
        if self.compression == "linear":
            flat = kc.reshape(kc.shape[0], -1, *kc.shape[-2:])
            pos = jnp.broadcast_to(pos, kc.shape[:-2]).reshape(kc.shape[0], -1)
            kc = apply_rope(flat, pos, self.rope_theta).reshape(kc.shape)
        return kc, vc

    # ------------------------------------------------------------------ full sequence
    def _forward(self, q, k, v, kernels, positions, segment_ids):
        """The three branches' outputs [B, T, H, 3, D], and what a prefill caches: compressed
        keys / values (and, with block selection, per query block the importance its queries
        gave and its selection)."""
        B, T, H, D = q.shape
        l, d, bs = self.cmp_block, self.cmp_stride, self.sel_block
        scale = D ** -0.5
        doc = (jnp.ones((B, T), jnp.int32) if segment_ids is None
               else document_ids(segment_ids))
        M, NS = num_compressed(T, l, d), -(-T // bs)
        # The block where the document of each token begins.
        t = jnp.arange(T, dtype=jnp.int32)
        first = jax.lax.cummax(jnp.where(segment_starts(doc), t, 0), axis=1) // bs   # [B, T]

        if M:
            tok = np.arange(M)[:, None] * d + np.arange(l)                # [M, l]
            kc, vc = self._compressed(slot(k, 0)[:, tok], slot(v, 0)[:, tok], kernels,
                                      positions[:, tok[:, 0]])             # [B, M, Hkv, D]
            whole = doc[:, tok[:, 0]] == doc[:, tok[:, -1]]               # [B, M]
            kc_pos = jnp.where(whole, jnp.asarray(tok[:, -1], jnp.int32), -1)
            kc_doc = doc[:, tok[:, -1]]
            o_cmp = attention(q, kc.astype(q.dtype), vc.astype(q.dtype), causal=True,
                              q_positions=t, kv_positions=kc_pos, segment_ids=doc,
                              kv_segment_ids=kc_doc, impl="xla")
            imp = self._importance(q, kc, kc_pos, doc, kc_doc, first, scale)
        else:
            kc = vc = jnp.zeros((B, 0) + k.shape[3:], self.dtype)
            o_cmp = jnp.zeros_like(q)
            imp = self._importance(q, None, None, doc, None, first, scale)
        seg = None if segment_ids is None else doc
        state = dict(kc=kc, vc=vc)
        if self.selection == "token":
            idx, qbs = imp, 1
        else:
            # Query block i ranks by what block i − 1's queries gave (see the module docstring).
            prev = jnp.concatenate([jnp.zeros_like(imp[:, :1]), imp[:, :-1]], axis=1)
            n = min(self.sel_blocks, NS)
            idx = jax.vmap(lambda p, i, f: select_blocks(p, i, f[:, None], n), (1, 0, 1), 2)(
                prev, jnp.arange(NS), first[:, ::bs])                    # [B, Hkv, NS, n]
            state.update(imp=imp, idx=idx)
            qbs = bs
        o_sel = block_sparse_attention(q, slot(k, 1), slot(v, 1), jax.lax.stop_gradient(idx),
                                       block_size=bs, query_block_size=qbs, causal=True,
                                       segment_ids=seg, impl=self.impl)
        if self.window:
            # "auto": a library kernel (cuDNN, splash) where it serves the window, else xla.
            o_win = attention(q, slot(k, 2), slot(v, 2), window=self.window, segment_ids=seg,
                              impl="auto")
        else:
            o_win = jnp.zeros_like(o_sel)
        return jnp.stack([o_cmp, o_sel, o_win], axis=3), state

    def _importance(self, q, kc, kc_pos, q_doc, kc_doc, first, scale):
        """Per chunk of `sel_block` queries (a `lax.map`, so memory stays O(sel_block · M)):
        each query's compressed attention weights summed over its group, spread over the
        selection blocks by overlap; "token": its selection [B, Hkv, T, n]; "block": the
        importance [B, NQ, Hkv, NS] each query block's queries gave together."""
        B, T, H, D = q.shape
        Hkv, bs = self.num_kv_heads, self.sel_block
        NS = -(-T // bs)
        n = min(self.sel_blocks, NS)
        pad = NS * bs - T
        qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, NS, bs, Hkv, H // Hkv, D)
        qd = jnp.pad(q_doc, ((0, 0), (0, pad)), constant_values=-1).reshape(B, NS, bs)
        fb = jnp.pad(first, ((0, 0), (0, pad))).reshape(B, NS, bs)
        t = jnp.arange(NS * bs, dtype=jnp.int32).reshape(NS, bs)
        over = None if kc is None else jnp.asarray(
            overlap_matrix(kc.shape[1], NS, self.cmp_block, self.cmp_stride, bs), jnp.float32)

        def one(args):
            qi, di, fi, ti = args           # [B, bs, Hkv, G, D], [B, bs], [B, bs], [bs]
            if kc is None:
                imp = jnp.zeros((B, bs, Hkv, NS), jnp.float32)
            else:
                ok = ((kc_pos[:, None] >= 0) & (kc_pos[:, None] <= ti[None, :, None])
                      & (kc_doc[:, None] == di[..., None]))               # [B, bs, M]
                p = group_weights(qi, kc, ok[:, :, None, None], scale)   # [B, bs, Hkv, M]
                imp = jnp.einsum("bthm,ms->bths", p, over)
            if self.selection == "token":
                return select_blocks(imp, (ti // bs)[None, :, None], fi[..., None], n)
            return jnp.sum(jnp.where((ti < T)[None, :, None, None], imp, 0.0), axis=1)

        out = jax.lax.map(one, tuple(jnp.moveaxis(a, 1, 0) for a in (qb, qd, fb)) + (t,))
        if self.selection == "token":                                    # [NS, B, bs, Hkv, n]
            out = jnp.moveaxis(out, 0, 1).reshape(B, NS * bs, Hkv, n)[:, :T]
            return jnp.transpose(out, (0, 2, 1, 3))
        return jnp.moveaxis(out, 0, 1)                                   # [B, NS, Hkv, NS]

    # ------------------------------------------------------------------ decoding
    def _cached(self, q, k, v, kernels, positions, cache, cache_pos):
        """Several tokens into an empty cache: the full forward, then its state cached;
        otherwise the tokens one at a time (see the module docstring)."""
        T = q.shape[1]
        pos = jnp.broadcast_to(positions, q.shape[:2])

        def step(c, xs):
            qt, kt, vt, t, pt = xs
            o, c = self._step(qt, kt, vt, kernels, c, t, pt)
            return c, o

        def steps():
            ts = cache_pos + jnp.arange(T, dtype=jnp.int32)
            c, o = jax.lax.scan(step, cache, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v))
                                + (ts, jnp.moveaxis(pos, 1, 0)))
            return jnp.moveaxis(o, 0, 1), c

        if T == 1:
            return steps()
        return jax.lax.cond(cache_pos == 0,
                            lambda: self._prefill(q, k, v, kernels, positions, cache), steps)

    def _prefill(self, q, k, v, kernels, positions, cache):
        o, st = self._forward(q, k, v, kernels, positions, None)
        M = st["kc"].shape[1]
        put = lambda buf, x: buf.at[:, :x.shape[1]].set(x.astype(buf.dtype))
        new = {"k": put(cache["k"], k), "v": put(cache["v"], v),
               "kc": put(cache["kc"], st["kc"][:, :M]), "vc": put(cache["vc"], st["vc"][:, :M])}
        if self.selection == "block":
            # The block of the last token: the importance its queries gave so far, its selection.
            NQ = st["imp"].shape[1]
            sel = st["idx"][:, :, NQ - 1]
            new["imp"] = jnp.zeros_like(cache["imp"]).at[..., :NQ].set(st["imp"][:, NQ - 1])
            new["sel"] = jnp.full_like(cache["sel"], -1).at[..., :sel.shape[-1]].set(sel)
        return o.astype(q.dtype), new

    def _step(self, q, k, v, kernels, cache, t, pos):
        """One token at cache index t and RoPE position pos: q [B, H, D], k, v [B, slots, Hkv,
        D] -> ([B, H, 3, D], cache)."""
        B, H, D = q.shape
        l, d, bs, W = self.cmp_block, self.cmp_stride, self.sel_block, self.window
        scale = D ** -0.5
        L = cache["k"].shape[1]
        put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x[:, None].astype(c.dtype),
                                                                 t, axis=1)
        ck, cv = put(cache["k"], k), put(cache["v"], v)
        kc, vc = cache["kc"], cache["vc"]
        M = kc.shape[1]
        NS = -(-L // bs)
        keys = jnp.arange(L, dtype=jnp.int32)
        new = {}
        if M:  # the compressed block ending at t, if one does
            start = t + 1 - l
            done = (start >= 0) & (jnp.maximum(start, 0) % d == 0)
            m = jnp.clip(start // d, 0, M - 1)
            blk = lambda c: jax.lax.dynamic_slice_in_dim(slot(c, 0), jnp.maximum(start, 0), l,
                                                         axis=1)
            new_k, new_v = self._compressed(blk(ck), blk(cv), kernels, pos - (l - 1))
            upd = lambda c, x: jax.lax.dynamic_update_index_in_dim(
                c, jnp.where(done, x.astype(c.dtype),
                             jax.lax.dynamic_index_in_dim(c, m, 1, keepdims=False)), m, 1)
            kc, vc = upd(kc, new_k), upd(vc, new_v)
            cmp_mask = jnp.broadcast_to(jnp.arange(M) * d + l - 1 <= t,
                                        (B, self.num_kv_heads, M))
            o_cmp = masked_attend(q, kc, vc, cmp_mask, scale)
            p = group_weights(q.reshape(B, self.num_kv_heads, -1, D), kc,
                              cmp_mask[:, :, None], scale)                  # [B, Hkv, M]
            gained = jnp.einsum("bhm,ms->bhs", p, jnp.asarray(
                overlap_matrix(M, NS, l, d, bs), jnp.float32))
        else:
            o_cmp = jnp.zeros_like(q)
            gained = jnp.zeros((B, self.num_kv_heads, NS), jnp.float32)
        i = t // bs
        n = min(self.sel_blocks, NS)
        if self.selection == "token":
            sel = select_blocks(gained, i, 0, n)
        else:
            opens = t % bs == 0
            sel = jnp.where(opens, select_blocks(cache["imp"], i, 0, n), cache["sel"])
            new = {"imp": jnp.where(opens, 0.0, cache["imp"]) + gained, "sel": sel}
        in_sel = jnp.any((keys // bs)[None, None, :, None] == sel[:, :, None, :], axis=-1)
        o_sel = masked_attend(q, slot(ck, 1), slot(cv, 1), in_sel & (keys <= t), scale)
        if W:
            win = jnp.broadcast_to((keys <= t) & (t - keys < W), (B, self.num_kv_heads, L))
            o_win = masked_attend(q, slot(ck, 2), slot(cv, 2), win, scale)
        else:
            o_win = jnp.zeros_like(o_sel)
        o = jnp.stack([o_cmp, o_sel, o_win], axis=2).astype(q.dtype)
        return o, {"k": ck, "v": cv, "kc": kc, "vc": vc, **new}


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
        "sel_blocks": Setting(16, int, f"blocks selected per query, the {NUM_FORCED} always "
                                       "taken (initial, previous, own) included, as the "
                                       "paper's n = 16"),
        "window": Setting(512, int, "sliding-window keys each query sees, itself included "
                                    "(0: no window branch)"),
        "selection": Setting("token", str, f"one of {SELECTIONS}: per query token (the "
                                           "paper) or per query block of sel_block tokens "
                                           "ranked by the previous block's queries (faster)"),
        "compress": Setting("linear", str, f"one of {COMPRESSIONS}: a learned map of the keys "
                                           "before RoPE (the paper) or the mean of the "
                                           "rotated keys (fla)"),
        "shared_kv": Setting(False, bool, "one k / v for all three branches (fla) instead of "
                                          "one per branch (the paper)"),
        # Not in the paper; the other attention mixers have them, so that a comparison can
        # give every model the same input path.
        **conv_settings(False),
    }


def _check(shared: Shared, s) -> None:
    positive_int(s, "cmp_block", "cmp_stride", "sel_block", "sel_blocks", "conv_size")
    check_own_heads(shared, s)
    if not 0 <= s["window"] <= MAX_INT:
        raise SettingError("window", f"must be in [0, 2**31 - 1] (0: no window branch), "
                                     f"got {s['window']}")
    if s["sel_block"] & (s["sel_block"] - 1):
        raise SettingError("sel_block", f"must be a power of two, got {s['sel_block']}")
    for f in ("cmp_block", "sel_block"):
        if s[f] % s["cmp_stride"]:
            raise SettingError("cmp_stride", f"must divide {f} = {s[f]}, got {s['cmp_stride']}")
    if s["sel_blocks"] <= NUM_FORCED:
        raise SettingError("sel_blocks", f"must be more than the {NUM_FORCED} blocks always "
                                         f"taken (the document's first, the previous and the "
                                         f"query's own), or no block is selected by "
                                         f"importance; got {s['sel_blocks']}")
    for f, options in (("selection", SELECTIONS), ("compress", COMPRESSIONS)):
        if s[f] not in options:
            raise SettingError(f, f"must be one of {options}, got {s[f]!r}")


def _build(shared: Shared, s, name):
    shared = _own(shared, s)
    return NSA(d_model=shared.d_model, num_heads=shared.num_heads,
               num_kv_heads=s["num_kv_heads"] or shared.num_heads, head_dim=shared.head_dim,
               cmp_block=s["cmp_block"], cmp_stride=s["cmp_stride"], sel_block=s["sel_block"],
               sel_blocks=s["sel_blocks"], window=s["window"], selection=s["selection"],
               compression=s["compress"], shared_kv=s["shared_kv"],
               use_short_conv=s["short_conv"], conv_size=s["conv_size"],
               rope_theta=shared.rope_theta, init_std=shared.init_std, dtype=shared.dtype,
               impl=shared.impl if shared.impl in ("reference", "xla", "pallas") else "auto",
               name=name)


def _span(s, T: int) -> int:
    return min(T, num_compressed(T, s["cmp_block"], s["cmp_stride"])
               + s["sel_blocks"] * s["sel_block"] + s["window"])


register(Mechanism("nsa", "token", _build, _settings(), _check,
                   "native sparse attention: compressed + selected blocks + sliding window, "
                   "gated", attention_span=_span))
