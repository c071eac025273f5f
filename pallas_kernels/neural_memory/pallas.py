"""`impl="pallas"`: the neural memory as Pallas kernels, forward and backward.

TPU: Mosaic kernels; GPU: Pallas' Triton backend; elsewhere (CPU) the TPU layout in interpret
mode (`backend` and `interpret` override the choice, as for the scans). The chunk math is
`chunk_math` (the same code the XLA impl vmaps); the phases follow `pallas_kernels.scan`:

  forward   1. one pass over chunks per batch·head carrying (P, Z): it writes the (P, Z)
               entering every chunk, h[c], and applies the chunk's gradient sums
               (`chunk_math.update`: the gradients are taken at the chunk-start memory, so
               they belong to the sequential pass)                              _state_forward
            2. o = M_{h[c]}(q) for every chunk at once                          _read
  backward  1. one reverse pass carrying the cotangents of (P, Z): writes the cotangent of
               every chunk's outgoing (P, Z), dh[c], and dh0 at sequence starts (the state
               part of `chunk_math.chunk_vjp`, recomputed at h[c])          _state_backward
            2. every chunk's input gradients at once (`chunk_math.chunk_vjp` at h[c] with
               cotangents (do, dh[c]))                                          _chunk_grads

No V tiles: the MLP's two layers are coupled (and a depth-1 memory is one [K, V] block, as
the scans' TPU tile), so a program holds a whole (P, Z); the residuals are h [BH, NC, ...]
and the inputs, never a memory per token. Chunks are padded to the backend's row multiple
(8 sublanes on TPU, a power of two >= 16 on GPU) with zero-weight tokens; K, V and the
hidden width E are padded by the scans' block policy (`scan.phases.blocks_for`). Matmuls
run in the accumulation dtype (float32 for bf16 inputs).

Per-token weights and per-chunk transitions travel in one array `coef` [BH, T_pad, 8]:
columns w0, w1, and a, b, d on the chunk's first row (zero elsewhere, so a column sum over
the chunk reads them).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .. import common
from ..common import div, rem
from ..scan import parallel, phases
from . import chunk_math
from .xla import chunk_inputs

_COEF = 8   # coef columns: w0, w1, a, b, d, padding


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one kernel call (a nondiff argument of the custom_vjp)."""
    depth: int
    acc: str
    H: int
    C: int                 # padded chunk
    NC: int
    Kp: int
    Vp: int
    Ep: int                # padded hidden width (depth 2), else 0
    backend: str
    interpret: bool
    varlen: bool
    warps: int = 4         # GPU warps per program (`scan.parallel.compiler_params`)

    @property
    def erf(self):
        """Triton has no erf: compiled GPU kernels take `chunk_math.erf_rational`."""
        if self.backend == "gpu" and not self.interpret:
            return chunk_math.erf_rational
        return lax.erf

    @property
    def leaf_shapes(self) -> tuple:
        """Shapes of the parameter leaves; momentum has the same."""
        if self.depth == 1:
            return ((self.Kp, self.Vp),)
        return ((self.Kp, self.Ep), (self.Ep, self.Vp))

    @property
    def state_shapes(self) -> tuple:
        return self.leaf_shapes * 2     # (P leaves, Z leaves)


def _split(cfg, leaves):
    d = cfg.depth
    return tuple(leaves[:d]), tuple(leaves[d:])


def _coef(x):
    """coef block [C, 8] -> (w0, w1 [C, 1], a, b, d [1, 1])."""
    lane = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    col = lambda j: jnp.sum(jnp.where(lane == j, x, 0), axis=1, keepdims=True)
    first = lambda c: jnp.sum(c, axis=0, keepdims=True)
    return col(0), col(1), first(col(2)), first(col(3)), first(col(4))


def _coef_grad(dw0, dw1, da, db, dd):
    """The inverse layout of `_coef` for the cotangents."""
    shape = (dw0.shape[0], _COEF)
    lane = lax.broadcasted_iota(jnp.int32, shape, 1)
    first = lax.broadcasted_iota(jnp.int32, shape, 0) == 0
    out = jnp.where(lane == 0, dw0, 0) + jnp.where(lane == 1, dw1, 0)
    for j, x in ((2, da), (3, db), (4, dd)):
        out = out + jnp.where((lane == j) & first, x, 0)
    return out


def _ld(cfg):
    acc = jnp.dtype(cfg.acc)
    return lambda x: x.astype(acc)


def _chunk_vjp(cfg, S, q, k, v, coef, do, dS):
    P, Z = _split(cfg, S)
    dP, dZ = _split(cfg, dS)
    return chunk_math.chunk_vjp(P, Z, q, k, v, *_coef(coef), do, dP, dZ, erf=cfg.erf)


# ----------------------------------------------------------------------------- chunk-parallel
def _parallel_call(cfg, kernel, name, ins, out_shapes, out_kinds, *args):
    """Grid (bh, c); `ins` / `out_kinds`: block kinds "tok" [C, D] or "state" [r, c] per
    chunk (the array's own trailing dims)."""
    BH = args[0].shape[0]

    def spec(kind, shape):
        if kind == "tok":
            return pl.BlockSpec((None, cfg.C, shape[-1]), lambda bh, c: (bh, c, 0))
        return pl.BlockSpec((None, None) + tuple(shape[-2:]), lambda bh, c: (bh, c, 0, 0))

    return common.varying_call(lambda out_shape, *a: pl.pallas_call(
        kernel, grid=(BH, cfg.NC), in_specs=[spec(kd, x.shape) for kd, x in zip(ins, a)],
        out_specs=[spec(kd, s.shape) for kd, s in zip(out_kinds, out_shape)],
        out_shape=out_shape, compiler_params=parallel.compiler_params(cfg, 2),
        interpret=cfg.interpret, name=f"nm{cfg.depth}_{name}_{cfg.backend}")(*a),
        out_shapes, *args)


def _read(cfg, q, h):
    """o [BH, T_pad, Vp] = M_{h[c]}(q), all chunks at once."""
    ld, d = _ld(cfg), cfg.depth

    def kernel(q_ref, *refs):
        P, o_ref = refs[:d], refs[d]
        o_ref[...] = chunk_math.read(tuple(ld(p[...]) for p in P), ld(q_ref[...]), cfg.erf)

    BH, T_pad, _ = q.shape
    out = jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), jnp.dtype(cfg.acc))
    return _parallel_call(cfg, kernel, "read", ["tok"] + ["state"] * d, [out], ["tok"],
                          q, *h[:d])[0]


def _chunk_grads(cfg, q, k, v, coef, do, h, dh):
    """(dq, dk, dv, dcoef) of every chunk at once."""
    ld, n = _ld(cfg), len(h)

    def kernel(q_ref, k_ref, v_ref, c_ref, do_ref, *refs):
        S, dS, outs = refs[:n], refs[n:2 * n], refs[2 * n:]
        _, _, dq, dk, dv, *dcoef = _chunk_vjp(
            cfg, [ld(s[...]) for s in S], ld(q_ref[...]), ld(k_ref[...]), ld(v_ref[...]),
            ld(c_ref[...]), ld(do_ref[...]), [ld(s[...]) for s in dS])
        for r, x in zip(outs, (dq, dk, dv, _coef_grad(*dcoef))):
            r[...] = x

    acc = jnp.dtype(cfg.acc)
    outs = [jax.ShapeDtypeStruct(x.shape, acc) for x in (q, k, v, coef)]
    return _parallel_call(cfg, kernel, "grads", ["tok"] * 5 + ["state"] * (2 * n), outs,
                          ["tok"] * 4, q, k, v, coef, do, *h, *dh)


# ----------------------------------------------------------------------------- sequential
# TPU: grid (bh, c) with the chunk axis "arbitrary", the float32 (P, Z) in VMEM scratch, the
# reset flags and initial-state rows scalar-prefetched (as `scan.sequential_tpu`). GPU: one
# program per bh loops over the chunks with (P, Z) as the loop carry (as `scan.sequential_gpu`).
def _states_out(cfg, BH, n):
    return [jax.ShapeDtypeStruct((BH, n) + s, jnp.dtype(cfg.acc)) for s in cfg.state_shapes]


def _tpu_call(cfg, kernel, name, ins, outs, reverse, reset, hidx):
    """ins: [(array, kind)], outs: [(ShapeDtypeStruct, kind)]; kinds "tok" (a chunk's rows),
    "states" (one per chunk), "fin" (final states: one per chunk with packed sequences, else
    one), "h0" (the chunk's sequence's initial-state row)."""
    from jax.experimental.pallas import tpu as pltpu
    NC, H = cfg.NC, cfg.H
    ch = (lambda c: NC - 1 - c) if reverse else (lambda c: c)

    def row(bh, c, s):
        return s[div(bh, H) * NC + ch(c)] * H + rem(bh, H)

    def spec(kind, shape):
        if kind == "tok":
            return pl.BlockSpec((None, cfg.C, shape[-1]), lambda bh, c, r, s: (bh, ch(c), 0))
        blk = tuple(shape[-2:])
        if kind == "h0":
            return pl.BlockSpec((None,) + blk, lambda bh, c, r, s: (row(bh, c, s), 0, 0))
        if kind == "states" or cfg.varlen:
            return pl.BlockSpec((None, None) + blk, lambda bh, c, r, s: (bh, ch(c), 0, 0))
        return pl.BlockSpec((None, None) + blk, lambda bh, c, r, s: (bh, 0, 0, 0))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(ins[0][0].shape[0], NC),
        in_specs=[spec(kd, x.shape) for x, kd in ins],
        out_specs=[spec(kd, s.shape) for s, kd in outs],
        scratch_shapes=[pltpu.VMEM(s, jnp.dtype(cfg.acc)) for s in cfg.state_shapes])
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    return common.varying_call(lambda out_shape, *a: pl.pallas_call(
        kernel, grid_spec=grid_spec, compiler_params=params, interpret=cfg.interpret,
        out_shape=out_shape, name=f"nm{cfg.depth}_{name}_tpu")(*a),
        [s for s, _ in outs], reset, hidx, *[x for x, _ in ins])


def _gpu_call(cfg, kernel, name, ins, outs, reset, hidx):
    """As `_tpu_call`: a program's block is the whole of its batch·head (h0: every row)."""
    from jax.experimental.pallas import triton as pltr

    def whole(x):
        n = len(x.shape)
        return pl.BlockSpec((None,) + tuple(x.shape[1:]), lambda bh: (bh,) + (0,) * (n - 1))

    def full(x):
        n = len(x.shape)
        return pl.BlockSpec(tuple(x.shape), lambda bh: (0,) * n)

    specs = [full(reset), full(hidx)] + [full(x) if kd == "h0" else whole(x) for x, kd in ins]
    return common.varying_call(lambda out_shape, *a: pl.pallas_call(
        kernel, grid=(ins[0][0].shape[0],), in_specs=specs,
        out_specs=[full(s) if kd == "h0" else whole(s) for s, kd in outs],
        out_shape=out_shape, compiler_params=pltr.CompilerParams(num_warps=cfg.warps,
                                                                 num_stages=2),
        interpret=cfg.interpret, name=f"nm{cfg.depth}_{name}_gpu")(*a),
        [s for s, _ in outs], reset, hidx, *[x for x, _ in ins])


def _gpu_chunk(cfg, r_ref, s_ref, bh, c):
    """(starts a sequence, initial-state row, token rows) of chunk c of batch·head bh."""
    i = div(bh, cfg.H) * cfg.NC + c
    return ((c == 0) | (r_ref[i] != 0), s_ref[i] * cfg.H + rem(bh, cfg.H),
            pl.ds(pl.multiple_of(c * cfg.C, cfg.C), cfg.C))


def _state_forward(cfg, k, v, coef, h0, reset, hidx):
    """(h: the (P, Z) entering every chunk, [BH, NC, ...] per leaf; final states [BH, 1 or
    NC, ...] per leaf)."""
    ld, n, BH = _ld(cfg), len(h0), k.shape[0]
    ins = [(k, "tok"), (v, "tok"), (coef, "tok")] + [(x, "h0") for x in h0]
    outs = ([(s, "states") for s in _states_out(cfg, BH, cfg.NC)]
            + [(s, "fin") for s in _states_out(cfg, BH, cfg.NC if cfg.varlen else 1)])

    def step(S, k, v, coef):
        P, Z = _split(cfg, S)
        P, Z = chunk_math.update(P, Z, k, v, *_coef(coef), erf=cfg.erf)
        return list(P) + list(Z)

    if cfg.backend == "tpu":
        def kernel(r_ref, s_ref, k_ref, v_ref, c_ref, *refs):
            h0r, hr, fr, scr = (refs[i * n:(i + 1) * n] for i in range(4))
            c = pl.program_id(1)

            @pl.when((c == 0) | (r_ref[div(pl.program_id(0), cfg.H) * cfg.NC + c] != 0))
            def _():
                for s, x in zip(scr, h0r):
                    s[...] = ld(x[...])

            S = [s[...] for s in scr]
            for r, x in zip(hr, S):
                r[...] = x
            S = step(S, ld(k_ref[...]), ld(v_ref[...]), ld(c_ref[...]))
            for s, f, x in zip(scr, fr, S):
                s[...] = x
                f[...] = x

        res = _tpu_call(cfg, kernel, "state_fwd", ins, outs, False, reset, hidx)
    else:
        def kernel(r_ref, s_ref, k_ref, v_ref, c_ref, *refs):
            h0r, hr, fr = (refs[i * n:(i + 1) * n] for i in range(3))
            bh = pl.program_id(0)

            def body(c, S):
                flag, row, t = _gpu_chunk(cfg, r_ref, s_ref, bh, c)
                S = [jnp.where(flag, ld(x[row]), s) for s, x in zip(S, h0r)]
                for r, x in zip(hr, S):
                    r[c] = x
                S = step(S, ld(k_ref[t, :]), ld(v_ref[t, :]), ld(c_ref[t, :]))
                if cfg.varlen:
                    for f, x in zip(fr, S):
                        f[c] = x
                return S

            S = lax.fori_loop(0, cfg.NC, body,
                              [jnp.zeros(s, jnp.dtype(cfg.acc)) for s in cfg.state_shapes])
            if not cfg.varlen:
                for f, x in zip(fr, S):
                    f[0] = x

        res = _gpu_call(cfg, kernel, "state_fwd", ins, outs, reset, hidx)
    return res[:n], res[n:]


def _state_backward(cfg, q, k, v, coef, do, h, dfin, h0, reset, hidx):
    """(dh: the cotangent of every chunk's outgoing (P, Z) per leaf; dh0 per leaf)."""
    ld, n, BH = _ld(cfg), len(h), q.shape[0]
    ins = ([(x, "tok") for x in (q, k, v, coef, do)] + [(x, "states") for x in h]
           + [(x, "fin") for x in dfin])
    outs = ([(s, "states") for s in _states_out(cfg, BH, cfg.NC)]
            + [(jax.ShapeDtypeStruct(x.shape, jnp.dtype(cfg.acc)), "h0") for x in h0])

    def step(S, dS, q, k, v, coef, do):
        dP, dZ, *_ = _chunk_vjp(cfg, S, q, k, v, coef, do, dS)
        return list(dP) + list(dZ)

    if cfg.backend == "tpu":
        def kernel(r_ref, s_ref, q_ref, k_ref, v_ref, c_ref, do_ref, *refs):
            hr, dfr, dhr, dh0r, scr = (refs[i * n:(i + 1) * n] for i in range(5))
            j = pl.program_id(1)
            c = cfg.NC - 1 - j
            flag = (c == 0) | (r_ref[div(pl.program_id(0), cfg.H) * cfg.NC + c] != 0)

            @pl.when(j == 0)
            def _():   # without packed sequences only the last chunk's state is an output
                for s, x in zip(scr, dfr):
                    s[...] = jnp.zeros(s.shape, s.dtype) if cfg.varlen else ld(x[...])

            dS = [s[...] + ld(x[...]) if cfg.varlen else s[...] for s, x in zip(scr, dfr)]
            for r, x in zip(dhr, dS):
                r[...] = x
            d_in = step([ld(x[...]) for x in hr], dS, ld(q_ref[...]), ld(k_ref[...]),
                        ld(v_ref[...]), ld(c_ref[...]), ld(do_ref[...]))
            for s, x in zip(scr, d_in):
                s[...] = jnp.where(flag, jnp.zeros_like(x), x)

            @pl.when(flag)
            def _():
                for r, x in zip(dh0r, d_in):
                    r[...] = x

        return _split_out(n, _tpu_call(cfg, kernel, "state_bwd", ins, outs, True, reset,
                                       hidx))

    def kernel(r_ref, s_ref, q_ref, k_ref, v_ref, c_ref, do_ref, *refs):
        hr, dfr, dhr, dh0r = (refs[i * n:(i + 1) * n] for i in range(4))
        bh = pl.program_id(0)

        def body(j, dS):
            c = cfg.NC - 1 - j
            flag, row, t = _gpu_chunk(cfg, r_ref, s_ref, bh, c)
            if cfg.varlen:
                dS = [s + ld(x[c]) for s, x in zip(dS, dfr)]
            for r, x in zip(dhr, dS):
                r[c] = x
            d_in = step([ld(x[c]) for x in hr], dS, ld(q_ref[t, :]), ld(k_ref[t, :]),
                        ld(v_ref[t, :]), ld(c_ref[t, :]), ld(do_ref[t, :]))

            @pl.when(flag)
            def _():
                for r, x in zip(dh0r, d_in):
                    r[row] = x

            return [jnp.where(flag, jnp.zeros_like(x), x) for x in d_in]

        init = ([jnp.zeros(s, jnp.dtype(cfg.acc)) for s in cfg.state_shapes] if cfg.varlen
                else [ld(x[0]) for x in dfr])
        lax.fori_loop(0, cfg.NC, body, init)

    return _split_out(n, _gpu_call(cfg, kernel, "state_bwd", ins, outs, reset, hidx))


def _split_out(n, res):
    return tuple(res[:n]), tuple(res[n:])


# ----------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernels(cfg, q, k, v, coef, h0, reset, hidx):
    h, fin = _state_forward(cfg, k, v, coef, h0, reset, hidx)
    return _read(cfg, q, h), fin


def _kernels_fwd(cfg, q, k, v, coef, h0, reset, hidx):
    h, fin = _state_forward(cfg, k, v, coef, h0, reset, hidx)
    return (_read(cfg, q, h), fin), (q, k, v, coef, h0, reset, hidx, h)


def _kernels_bwd(cfg, res, cts):
    q, k, v, coef, h0, reset, hidx, h = res
    do, dfin = cts
    dh, dh0 = _state_backward(cfg, q, k, v, coef, do, h, dfin, h0, reset, hidx)
    dq, dk, dv, dcoef = _chunk_grads(cfg, q, k, v, coef, do, h, dh)
    return dq, dk, dv, dcoef, dh0, None, None


_kernels.defvjp(_kernels_fwd, _kernels_bwd)


# ----------------------------------------------------------------------------- the op
def _pad_chunk(C: int, backend: str) -> int:
    """Rows of a chunk block: a multiple of 8 sublanes (TPU), a power of two >= 16 (GPU)."""
    if backend == "tpu":
        return -(-C // 8) * 8
    return phases._pad_dim(C, phases.GPU_BLOCKS)


def neural_memory_pallas(q, k, v, lr, momentum, decay, *, depth, scale, initial_state,
                         cu_seqlens, chunk_size, backend: Optional[str] = None,
                         interpret: Optional[bool] = None):
    """Validated inputs as for the other impls -> (o in q's dtype, (params, mom) of each
    sequence, tuples [N, H, ...] in the accumulation dtype)."""
    if interpret is None:
        interpret = common.default_interpret()
    blocks = phases.blocks_for(backend)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = common.acc_dtype(q)
    layout = common.chunk_layout(B, T, chunk_size, cu_seqlens)
    init_params, init_mom = jax.tree.map(lambda x: x.astype(acc), initial_state)
    E = init_params[0].shape[-1] if depth == 2 else 0
    C, NC = chunk_size, layout.num_chunks
    cfg = Config(depth=depth, acc=jnp.dtype(acc).name, H=H, C=_pad_chunk(C, blocks.backend),
                 NC=NC, Kp=phases._pad_dim(K, blocks), Vp=phases._pad_dim(V, blocks),
                 Ep=phases._pad_dim(E, blocks) if depth == 2 else 0, backend=blocks.backend,
                 interpret=bool(interpret), varlen=cu_seqlens is not None,
                 warps=blocks.warps)

    x = chunk_inputs(layout, q, k, v, lr, momentum, decay, scale, acc)   # [NC, B, H, C, D]
    first = (jnp.arange(C) == 0)[:, None]
    coef = jnp.concatenate([x["w0"], x["w1"]] + [jnp.where(first, x[n], 0) for n in "abd"],
                           axis=-1)

    def tokens(t, width):   # [NC, B, H, C, D] -> [B·H, NC·Cp, width]
        t = jnp.pad(jnp.moveaxis(t, 0, 2), ((0, 0),) * 3 + ((0, cfg.C - C), (0, width
                                                                            - t.shape[-1])))
        return t.reshape(B * H, NC * cfg.C, width)

    def state_rows(p, shape):   # [N, H, r, c] -> [N·H, rp, cp]
        p = jnp.pad(p, ((0, 0), (0, 0), (0, shape[0] - p.shape[2]), (0, shape[1] - p.shape[3])))
        return p.reshape((-1,) + shape)

    h0 = [state_rows(p, s) for p, s in zip(init_params + init_mom, cfg.state_shapes)]
    if layout.empty is not None:   # an empty sequence's state bypasses the kernels
        h0 = [jnp.where(layout.empty.repeat(H)[:, None, None], lax.stop_gradient(p), p)
              for p in h0]
    o, fin = _kernels(cfg, tokens(x["q"], cfg.Kp), tokens(x["k"], cfg.Kp),
                      tokens(x["v"], cfg.Vp), tokens(coef, _COEF), tuple(h0),
                      layout.reset.reshape(-1).astype(jnp.int32),
                      layout.seq.reshape(-1).astype(jnp.int32))
    o = o.reshape(B, H, NC, cfg.C, cfg.Vp)[:, :, :, :C, :V]
    o = layout.from_chunks(jnp.moveaxis(o, 1, 3))                        # [B, T, H, V]
    shapes = [p.shape[2:] for p in init_params + init_mom]
    fin = [f.reshape((B, H, -1) + f.shape[2:])[..., :r, :c] for f, (r, c) in zip(fin, shapes)]
    if cfg.varlen:
        fin = [layout.final_states(jnp.moveaxis(f, 2, 1), h)
               for f, h in zip(fin, init_params + init_mom)]
    else:
        fin = [f[:, :, 0] for f in fin]
    return o.astype(q.dtype), (tuple(fin[:depth]), tuple(fin[depth:]))
