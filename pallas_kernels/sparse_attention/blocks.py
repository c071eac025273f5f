"""The blocked impls' shared parts: the static config, the block layout of q / k / v, the
block tables, and the flash-style custom_vjp that both `xla` and `pallas` plug into.

Query blocks hold `qbs` tokens (the query block size: `bs` for block-granular selection, 1
for NSA's per-token selection), key blocks `bs` tokens; qbs divides bs, so query block i lies
inside key block kq = i·qbs // bs.

Block table. For query block i the keys to visit are the union of its selected blocks
(`block_indices`, −1 padded) and, with a window W, the n_w = ceil((W−1)/bs) + 1 key blocks
kq−n_w+1 .. kq that the window can reach. Each entry is coded `kb·2 + selected`; entries are
sorted by key block, a block listed twice (or selected and also a window block) is kept once
with the selected flag, and the live entries come first: `codes [B, Hkv, NQ, L]` (L = S + n_w)
with `count [B, Hkv, NQ]` live ones. Entries past the count repeat the last live one (a TPU
grid step on them then reuses the key block already in VMEM; with none, block NK − 1).
Blocks outside [0, NK) and, when causal, after the query block's key block, are dropped
here, so the kernels never visit them.

The transposed table serves dk / dv: every live (query block, entry) pair sorted by key
block — per (b, kv head) `kbT [E]` (key block), `qcT [E]` (query block·2 + selected), E =
NQ·L, live ones first, the rest repeating the last live one; `nT` live pairs; and per key
block its `start` and `cnt` in that list.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: the nondiff argument of the custom_vjp)."""
    T: int                 # real tokens (the blocks pad to NQ·qbs and NK·bs)
    bs: int                # key block size
    G: int                 # query heads per kv head
    NQ: int                # query blocks
    L: int                 # entries per query block in the table
    causal: bool
    window: Optional[int]
    scale: float
    segments: bool
    acc: str               # accumulation dtype
    cd: str                # matmul operand dtype
    out: str               # o's dtype
    impl: str = "xla"      # "xla" | "pallas"
    backend: str = "tpu"   # Pallas kernel layout: "tpu" | "gpu"
    interpret: bool = False
    qbs: Optional[int] = None   # query block size (None: bs)

    @property
    def q_bs(self) -> int:
        return self.bs if self.qbs is None else self.qbs

    @property
    def NK(self) -> int:
        return -(-self.T // self.bs)

    @property
    def R(self) -> int:
        return self.G * self.q_bs


def window_blocks(window: Optional[int], bs: int, NK: int) -> int:
    return 0 if window is None else min(-(-(window - 1) // bs) + 1, NK)


# ----------------------------------------------------------------------------- layout
def _pad_time(x, T_pad, fill=0):
    return jnp.pad(x, [(0, 0), (0, T_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                   constant_values=fill)


def query_blocks(q, cfg):
    """[B, T, H, D] -> [B, Hkv, NQ, G·qbs, D] (rows of a block: head-major)."""
    B, _, H, D = q.shape
    q = _pad_time(q, cfg.NQ * cfg.q_bs).reshape(B, cfg.NQ, cfg.q_bs, H // cfg.G, cfg.G, D)
    return q.transpose(0, 3, 1, 4, 2, 5).reshape(B, H // cfg.G, cfg.NQ, cfg.R, D)


def from_query_blocks(o, cfg):
    """The inverse of `query_blocks` on the real tokens."""
    B, Hkv, NQ, _, Dv = o.shape
    o = o.reshape(B, Hkv, NQ, cfg.G, cfg.q_bs, Dv).transpose(0, 2, 4, 1, 3, 5)
    return o.reshape(B, NQ * cfg.q_bs, Hkv * cfg.G, Dv)[:, :cfg.T]


def key_blocks(k, cfg):
    """[B, T, Hkv, D] -> [B, Hkv, NK, bs, D]."""
    B, _, Hkv, D = k.shape
    k = _pad_time(k, cfg.NK * cfg.bs).reshape(B, cfg.NK, cfg.bs, Hkv, D)
    return k.transpose(0, 3, 1, 2, 4)


def from_key_blocks(dk, cfg):
    B, Hkv, NK, bs, D = dk.shape
    return dk.transpose(0, 2, 3, 1, 4).reshape(B, NK * bs, Hkv, D)[:, :cfg.T]


def segment_blocks(seg, cfg):
    """segment ids [B, T] -> (rows [B, NQ, R, 1], keys [B, NK, 1, bs]); padding gets −1."""
    B, seg = seg.shape[0], seg.astype(jnp.int32)
    s = _pad_time(seg, cfg.NQ * cfg.q_bs, -1).reshape(B, cfg.NQ, 1, cfg.q_bs)
    rows = jnp.broadcast_to(s, (B, cfg.NQ, cfg.G, cfg.q_bs)).reshape(B, cfg.NQ, cfg.R, 1)
    return rows, _pad_time(seg, cfg.NK * cfg.bs, -1).reshape(B, cfg.NK, 1, cfg.bs)


# ----------------------------------------------------------------------------- tables
def _fill(x, n):
    """Entries past the live count n (along the last axis) repeat entry n − 1."""
    j = jnp.minimum(jnp.arange(x.shape[-1]), jnp.maximum(n[..., None] - 1, 0))
    return jnp.take_along_axis(x, j, axis=-1)


def block_table(block_indices, cfg):
    """(codes [B, Hkv, NQ, L], count [B, Hkv, NQ]) as described in the module docstring."""
    NK, big = cfg.NK, 2 * cfg.NK
    kq = jnp.arange(cfg.NQ, dtype=jnp.int32)[:, None] * cfg.q_bs // cfg.bs
    sel = block_indices.astype(jnp.int32)
    ok = (sel >= 0) & (sel < NK)
    if cfg.causal:
        ok = ok & (sel <= kq)
    codes = jnp.where(ok, 2 * sel + 1, big)
    nw = window_blocks(cfg.window, cfg.bs, NK)
    if nw:
        wb = kq - jnp.arange(nw, dtype=jnp.int32)
        wcodes = jnp.broadcast_to(jnp.where(wb >= 0, 2 * wb, big), codes.shape[:2] + wb.shape)
        codes = jnp.concatenate([codes, wcodes], axis=-1)
    codes = jnp.sort(codes, axis=-1)
    # Of equal blocks the last is kept: it carries the selected flag when any does.
    dup = (codes[..., :-1] // 2) == (codes[..., 1:] // 2)
    dup = jnp.concatenate([dup, jnp.zeros(codes.shape[:-1] + (1,), bool)], axis=-1)
    codes = jnp.sort(jnp.where(dup, big, codes), axis=-1)
    count = jnp.sum(codes < big, axis=-1, dtype=jnp.int32)
    # A query block with no live entry keeps an in-range (and masked) one.
    return jnp.minimum(_fill(codes, count), big - 1), count


def transposed_table(codes, count, cfg):
    """(kbT [B, Hkv, E], qcT [B, Hkv, E], nT [B, Hkv], start [B, Hkv, NK], cnt [B, Hkv, NK])."""
    B, Hkv, NQ, L = codes.shape
    NK = cfg.NK
    live = jnp.arange(L) < count[..., None]
    key = jnp.where(live, codes // 2, NK).reshape(B, Hkv, NQ * L)
    payload = (2 * jnp.arange(NQ, dtype=jnp.int32)[:, None] + codes % 2).reshape(B, Hkv, -1)
    key, payload = jax.lax.sort((key, jnp.broadcast_to(payload, key.shape)), dimension=-1,
                                num_keys=1, is_stable=True)
    nT = jnp.sum(live, axis=(-2, -1), dtype=jnp.int32)
    cnt = jax.vmap(jax.vmap(lambda kk: jnp.zeros(NK + 1, jnp.int32).at[kk].add(1)))(key)[..., :NK]
    start = jnp.cumsum(cnt, axis=-1) - cnt
    return jnp.minimum(_fill(key, nT), NK - 1), _fill(payload, nT), nT, start, cnt


# ----------------------------------------------------------------------------- the vjp
def _impl(cfg):
    if cfg.impl == "pallas":
        from . import pallas as mod
    else:
        from . import xla as mod
    return mod


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend(cfg, q, k, v, codes, count, qseg, kseg):
    """Blocked q [B, Hkv, NQ, R, D], k / v [B, Hkv, NK, bs, D] -> o [B, Hkv, NQ, R, Dv] in
    cfg.out."""
    return _impl(cfg).forward(cfg, q, k, v, codes, count, qseg, kseg)[0]


def _attend_fwd(cfg, q, k, v, codes, count, qseg, kseg):
    o, lse = _impl(cfg).forward(cfg, q, k, v, codes, count, qseg, kseg)
    return o, (q, k, v, o, lse, codes, count, qseg, kseg)


def _attend_bwd(cfg, res, do):
    q, k, v, o, lse, codes, count, qseg, kseg = res
    acc = jnp.dtype(cfg.acc)
    do = do.astype(cfg.out)
    delta = jnp.sum(do.astype(acc) * o.astype(acc), axis=-1, keepdims=True)
    dq, dk, dv = _impl(cfg).backward(cfg, q, k, v, do, lse, delta, codes, count, qseg, kseg)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


attend.defvjp(_attend_fwd, _attend_bwd)


# ----------------------------------------------------------------------------- the op
def blocked(q, k, v, block_indices, *, block_size, window, causal, scale, segment_ids,
            impl: str, backend: str = "tpu", interpret: bool = False,
            query_block_size: Optional[int] = None):
    """Validated [B, T, H, D] inputs -> o [B, T, H, Dv] in q's dtype, by the blocked `impl`."""
    B, T, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    qbs = block_size if query_block_size is None else query_block_size
    NQ = -(-T // qbs)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    cd = jnp.result_type(q, k, v)
    cd = cd if jnp.dtype(cd).itemsize < 4 else acc
    cfg = Config(T=T, bs=block_size, G=H // Hkv, NQ=NQ,
                 L=block_indices.shape[-1] + window_blocks(window, block_size,
                                                           -(-T // block_size)),
                 causal=causal, window=window, scale=scale, segments=segment_ids is not None,
                 acc=jnp.dtype(acc).name, cd=jnp.dtype(cd).name, out=jnp.dtype(q.dtype).name,
                 impl=impl, backend=backend, interpret=interpret,
                 qbs=None if qbs == block_size else qbs)
    if cfg.L == 0:  # nothing listed and no window: every query sees nothing
        return jnp.zeros((B, T, H, Dv), q.dtype)
    codes, count = block_table(block_indices, cfg)
    qseg, kseg = segment_blocks(segment_ids, cfg) if cfg.segments else (None, None)
    o = attend(cfg, query_blocks(q, cfg), key_blocks(k, cfg), key_blocks(v, cfg), codes, count,
               qseg, kseg)
    return from_query_blocks(o, cfg)
