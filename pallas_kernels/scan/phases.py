"""The Pallas chunked scans as one differentiable function: phases, custom_vjp, block policy,
and the token <-> kernel layout. The chunk math is in `chunk_math`; the kernels that run over
all chunks at once in `parallel` (the same code for both backends); the sequential state
passes in `sequential_tpu` (Mosaic) and `sequential_gpu` (Pallas' Triton backend).

Chunk-parallel: the sequential dimension carries only the state recurrence.

  forward   1. W, U (and the UT inverse T) for every chunk at once (delta rule only)
                                                                      parallel.ut_transform
            2. one pass over chunks per (batch·head, value tile):
               S_in -> h[c];  vn = U − W S_in;  S <- d S + Ksᵀ vn     scan_*.state_forward
            3. o = Qe h[c] + P vn for every chunk at once             parallel.output
  backward  1. Pᵀ do for every chunk at once (delta rule only)        parallel.intra_dv
            2. one reverse pass: dS_in = d dS + Qeᵀ do − Wᵀ(Pᵀdo + Ks dS),
               writing the cotangent of every chunk's outgoing state  scan_*.state_backward
            3. every chunk's input gradients at once, written out (matmuls and elementwise
               work, no autodiff in a kernel): dvn = Pᵀdo + Ks dS_out; dq, dk, dg from
               the read-out, the outgoing state and P; for the delta rule dW, dU → through
               the saved T (dL = −Tᵀ dT Tᵀ) → dk, dv, dβ, dg     parallel.chunk_grads

The forward keeps the chunk-boundary states h [BH, NC, K, V] (in the matmul dtype), W, vn =
U − W S, the UT inverses [BH, T, C] and the inputs as residuals, never a state per token.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from .. import common
from . import parallel, sequential_gpu, sequential_tpu
from .chunk_math import SUB, Spec


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Static description of one kernel call (hashable: a nondiff argument of custom_vjp)."""
    spec: Spec
    acc: str               # accumulation / state dtype
    out: str               # o's dtype
    H: int
    C: int
    NC: int
    Kp: int
    Vp: int
    BV: int                # value tile of the chunk-parallel kernels
    BV_seq: int            # value tile of the sequential passes
    backend: str           # "tpu" | "gpu"
    interpret: bool
    varlen: bool           # packed sequences: a final state after every chunk
    warps: int = 4         # GPU: warps per program of the chunk-parallel kernels
    warps_seq: int = 4     # GPU: warps per program of the sequential passes

    @property
    def kinds(self) -> tuple:
        return self.spec.kinds

    def extra_shape(self, kind: str, BH: int, T_pad: int) -> tuple:
        return {"col": (BH, T_pad, 1), "key": (BH, T_pad, self.Kp),
                "kcol": (BH, self.NC, self.Kp, 1)}[kind]


def sequential(cfg):
    """The module of `cfg`'s backend with the sequential passes (sequential_tpu or sequential_gpu)."""
    return sequential_tpu if cfg.backend == "tpu" else sequential_gpu


def _forward(cfg, q, k, v, extras, h0, reset, hidx):
    """(o, final states, residuals (h, W, the chunks' UT inverses))."""
    w, u, tri = (parallel.ut_transform(cfg, k, v, extras) if cfg.spec.delta
                 else (None, v, None))
    h, vn, fin = sequential(cfg).state_forward(cfg, k, u, w, extras, h0, reset, hidx)
    o = parallel.output(cfg, q, k, vn, extras, h)
    return o, fin, (h, w, tri, vn if cfg.spec.delta else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, q, k, v, extras, h0, reset, hidx):
    o, fin, _ = _forward(cfg, q, k, v, extras, h0, reset, hidx)
    return o, fin


def _scan_fwd(cfg, q, k, v, extras, h0, reset, hidx):
    o, fin, res = _forward(cfg, q, k, v, extras, h0, reset, hidx)
    return (o, fin), (q, k, v, extras, h0, reset, hidx) + res


def _scan_bwd(cfg, res, cts):
    q, k, v, extras, h0, reset, hidx, h, w, tri, vn = res
    do, dfin = cts
    do = do.astype(cfg.out)
    dvo = parallel.intra_dv(cfg, q, k, do, extras) if cfg.spec.delta else None
    dh, dh0 = sequential(cfg).state_backward(cfg, q, k, w, extras, do, dvo, dfin, h0,
                                              reset, hidx)
    dq, dk, dv, dex = parallel.chunk_grads(cfg, q, k, v, extras, h, tri, vn, do, dvo, dh)
    dex = tuple(d.astype(e.dtype) for d, e in zip(dex, extras))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dex,
            dh0.astype(h0.dtype), None, None)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------- block policy
# The value tiles of one call, from its parallelism — the one table of the rule: a pass whose
# grid would have fewer than `programs` programs at the policy's tile takes tiles `div` times
# smaller (the first row that applies; never below the backend's `align`, so TPU tiles stay
# 128 lanes). The sequential passes have B·H·(Vp / tile) programs, so this is where small
# B·H shows (at B=1, H=16, V=128 the state passes ran 32 programs on an H200's 132 SMs; now
# 128 with tiles of 16); the chunk-parallel kernels have B·H·NC·(Vp / tile), so short T at
# small B·H. Rows chosen to reach about one program per SM of an H100/H200; not yet tuned
# on one (`eval.bench_phases` times both passes' tiles).
#            (programs below, tile divided by)
TILE_RULE = ((48, 4),
             (96, 2))


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A backend's block-shape policy: K and V are padded to multiples of `align` (and to a
    power of two if `pow2`); value tiles of at most `v_tile` (chunk-parallel kernels) and
    `v_tile_seq` (sequential passes), each halved for float32 inputs (`f32_halve`: the GPU's
    shared memory holds half as many float32 operands) and made smaller for calls with few
    programs (`tile_rule`: `TILE_RULE`, or () to keep them); on GPU, `warps` / `warps_seq`
    warps per program of the chunk-parallel kernels / sequential passes.

    `tf32`: float32 inputs are multiplied at the backend's default precision — TF32 tensor
    cores on a GPU, as fla — instead of full float32 (the UT inverse stays at full precision
    either way). TF32 keeps 10 of float32's 23 mantissa bits (each operand rounded to within
    2^-11 ≈ 5e-4 relative), so outputs and gradients then match the float64 reference to about
    1e-3 relative at T of a few thousand, against about 1e-5 at full precision (derived from
    the rounding, not yet measured on a GPU). bfloat16 inputs are unaffected."""
    backend: str
    align: int
    v_tile: int
    v_tile_seq: int
    pow2: bool
    f32_halve: bool
    warps: int = 4
    warps_seq: int = 4
    tf32: bool = False
    tile_rule: tuple = TILE_RULE


# TPU (Mosaic): K and V padded to multiples of 128 lanes, value tiles of 128; the sequential
# passes walk the chunks as the last ("arbitrary") grid axis with the float32 state in VMEM.
# float32 at full precision (the TPU's default would round operands to bfloat16).
TPU_BLOCKS = Blocks("tpu", align=128, v_tile=128, v_tile_seq=128, pow2=False, f32_halve=False)
# GPU (Pallas' Triton backend): K and V padded to powers of two >= 16 (Triton's tensor shapes);
# the sequential passes loop over chunks inside one program per (batch·head, value tile of 64)
# with the float32 state in registers; the chunk-parallel kernels take value tiles of 128 (on
# an H200 at B=4, T=4096, H=16, K=V=128, bf16, the per-chunk vjp ran in 3.4 ms with 128 against
# 5.8 ms with 64: it recomputed W for every value tile; the written-out backward still redoes
# its key-side work per tile), 4 warps (8 were slower in every phase but one):
# `python -m eval.bench_phases`. float32 inputs as TF32, as fla.
GPU_BLOCKS = Blocks("gpu", align=16, v_tile=128, v_tile_seq=64, pow2=True, f32_halve=True,
                    tf32=True)
BLOCKS = {"tpu": TPU_BLOCKS, "gpu": GPU_BLOCKS}


def blocks_for(backend: Optional[str], tf32: Optional[bool] = None) -> Blocks:
    """The block policy of `backend` ("tpu" | "gpu"; None: the default device's layout), with
    `tf32` replaced where given."""
    backend = backend or common.default_backend()
    if backend not in BLOCKS:
        raise ValueError(f"`backend` must be 'tpu' or 'gpu', got {backend!r}")
    blocks = BLOCKS[backend]
    return blocks if tf32 is None else dataclasses.replace(blocks, tf32=bool(tf32))


def _pad_dim(d: int, blocks: Blocks) -> int:
    if blocks.pow2:
        p = blocks.align
        while p < d:
            p *= 2
        return p
    return -(-d // blocks.align) * blocks.align


def value_tile(blocks: Blocks, tile: int, Vp: int, f32: bool, rows: Optional[int]) -> int:
    """The value tile of a pass with `rows` programs per value tile (B·H for the sequential
    passes, B·H·NC for the chunk-parallel ones) over padded values `Vp`, from the policy's
    `tile` and its `tile_rule` (not applied when `rows` is None: interpret mode, which runs the
    programs one after another, so that more of them would only cost time)."""
    if f32 and blocks.f32_halve:
        tile //= 2
    tile = min(max(tile, blocks.align), Vp)
    for programs, div in blocks.tile_rule if rows is not None else ():
        if rows * (Vp // tile) < programs:
            return max(tile // div, blocks.align)
    return tile


# ----------------------------------------------------------------------------- the op wrapper
def prepare(family: str, q, k, v, *, beta=None, g=None, gk=None, scale: float,
            initial_state=None, cu_seqlens=None, chunk_size: int = 64, blocks: Blocks,
            interpret: Optional[bool] = None):
    """Validated [B, T, H, D] inputs -> (ScanConfig, the kernels' inputs (q, k, v, extras, h0,
    reset, hidx) in the [B·H, T_pad, D] layout, the ChunkLayout).

    family: "la" (linear attention) or "gdn" (gated delta rule)."""
    if interpret is None:
        interpret = common.default_interpret()
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = common.acc_dtype(q)
    cd = jnp.result_type(q, k, v)
    cd = cd if jnp.dtype(cd).itemsize < 4 else acc
    # Per-key gates form a [C, C, K] block inside the kernel: keep their chunk small.
    C = SUB if gk is not None else max(common.fitted_chunk(chunk_size, T), SUB)
    layout = common.chunk_layout(B, T, C, cu_seqlens)
    NC, T_pad, N = layout.num_chunks, layout.T_pad, layout.num_seqs
    Kp, Vp = _pad_dim(K, blocks), _pad_dim(V, blocks)
    f32 = jnp.dtype(cd).itemsize >= 4
    # programs per value tile of the chunk-parallel kernels and of the sequential passes
    rows, rows_seq = (None, None) if interpret else (B * H * NC, B * H)

    def tokens(x, width, dtype=None, cumsum=False):
        """[B, T, H(, D)] -> [B·H, T_pad, width]; gates become within-chunk cumulative sums."""
        if dtype is not None:
            x = x.astype(dtype)
        if x.ndim == 3:
            x = x[..., None]
        x = layout.to_chunks(x)                            # [B, NC, C, H, D]
        if cumsum:
            x = jnp.cumsum(x, axis=2)
        x = x.reshape(B, T_pad, H, x.shape[-1]).transpose(0, 2, 1, 3)
        x = x.reshape(B * H, T_pad, x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, 0), (0, width - x.shape[-1])))

    extras = []
    if beta is not None:
        extras.append(tokens(beta, 1, acc))
    if g is not None:
        extras.append(tokens(g, 1, acc, cumsum=True))
    if gk is not None:
        gk_cum = tokens(gk, Kp, acc, cumsum=True)
        extras.append(gk_cum)
        extras.append(gk_cum.reshape(B * H, NC, C, Kp)[:, :, C - 1, :, None])  # [BH, NC, Kp, 1]

    if initial_state is None:
        h0 = jnp.zeros((N * H, Kp, Vp), acc)
    else:
        h0 = initial_state.astype(acc)
        if layout.empty is not None:  # an empty sequence's state bypasses the kernel
            h0 = jnp.where(layout.empty[:, None, None, None], lax.stop_gradient(h0), h0)
        h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))).reshape(N * H, Kp, Vp)
    reset = layout.reset.reshape(-1).astype(jnp.int32)
    hidx = layout.seq.reshape(-1).astype(jnp.int32)

    spec = Spec(delta=family == "gdn", has_g=g is not None, has_gk=gk is not None,
                scale=float(scale), cd=jnp.dtype(cd).name, precise=not blocks.tf32)
    cfg = ScanConfig(
        spec=spec, acc=jnp.dtype(acc).name, out=jnp.dtype(q.dtype).name, H=H, C=C, NC=NC,
        Kp=Kp, Vp=Vp, BV=value_tile(blocks, blocks.v_tile, Vp, f32, rows),
        BV_seq=value_tile(blocks, blocks.v_tile_seq, Vp, f32, rows_seq),
        backend=blocks.backend,
        interpret=bool(interpret), varlen=cu_seqlens is not None, warps=blocks.warps,
        warps_seq=blocks.warps_seq)
    args = (tokens(q, Kp), tokens(k, Kp), tokens(v, Vp), tuple(extras), h0, reset, hidx)
    return cfg, args, layout


def chunked_scan(family: str, q, k, v, *, initial_state=None, **kw):
    """Run one op family's Pallas kernels on validated [B, T, H, D] inputs (arguments as for
    `prepare`). Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in the
    accumulation dtype)."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    cfg, args, layout = prepare(family, q, k, v, initial_state=initial_state, **kw)
    o, states = _scan(cfg, *args)
    o = o[..., :V].reshape(B, H, layout.T_pad, V).transpose(0, 2, 1, 3)
    o = layout.from_chunks(o.reshape(B, cfg.NC, cfg.C, H, V))
    states = states[..., :K, :V].reshape(B, H, -1, K, V).transpose(0, 2, 1, 3, 4)
    h0_user = None if initial_state is None else initial_state.astype(common.acc_dtype(q))
    return o.astype(q.dtype), layout.final_states(states, h0_user)
