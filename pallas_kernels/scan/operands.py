"""The operands of the sequential state passes, in one order for both backends (`sequential_tpu`,
`sequential_gpu`): what goes in and comes out, each with its block kind (which the backend maps to
its own BlockSpec), and how a kernel names its refs. Kinds: "key" [BH, T_pad, Kp], "val"
[BH, T_pad, BV tile], "col" / "kcol" (gates, `Spec.kinds`), "h0" (initial states), "states"
[BH, NC, Kp, Vp] (one per chunk), "fin" (final states: one per chunk with packed sequences).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class ForwardRefs(NamedTuple):
    k: object
    u: object             # U (delta rule) or V
    w: Optional[object]   # W (delta rule)
    extras: tuple
    h0: object
    h: object             # out: the state entering each chunk
    vn: Optional[object]  # out: U − W S (delta rule)
    fin: object           # out: final states


class BackwardRefs(NamedTuple):
    q: object
    k: object
    w: Optional[object]
    extras: tuple
    do: object
    dvo: Optional[object]  # Pᵀ do (delta rule)
    dfin: object
    dh: object             # out: cotangent of each chunk's outgoing state
    dh0: object            # out: cotangents of the initial states


def _states(cfg, BH, n, dtype):
    return jax.ShapeDtypeStruct((BH, n, cfg.Kp, cfg.Vp), jnp.dtype(dtype))


def forward_io(cfg, k, u, w, extras, h0):
    """(inputs [(array, kind)], outputs [(ShapeDtypeStruct, kind)]) of the forward pass."""
    BH, T_pad, _ = k.shape
    delta = cfg.spec.delta
    ins = ([(k, "key"), (u, "val")] + ([(w, "key")] if delta else [])
           + list(zip(extras, cfg.kinds)) + [(h0, "h0")])
    outs = ([(_states(cfg, BH, cfg.NC, cfg.spec.cd), "states")]
            + ([(jax.ShapeDtypeStruct((BH, T_pad, cfg.Vp), jnp.dtype(cfg.spec.cd)), "val")]
               if delta else [])
            + [(_states(cfg, BH, cfg.NC if cfg.varlen else 1, cfg.acc), "fin")])
    return ins, outs


def _reader(refs):
    """take(cond=True): the next ref in order, or None (taking nothing) where not `cond`."""
    refs = list(refs)
    return lambda cond=True: refs.pop(0) if cond else None


def forward_refs(cfg, refs) -> ForwardRefs:
    """The kernel's refs (after the two index arrays, before any scratch) by name."""
    take = _reader(refs)
    delta = cfg.spec.delta
    k, u, w = take(), take(), take(delta)
    extras = tuple(take() for _ in cfg.kinds)
    return ForwardRefs(k, u, w, extras, take(), take(), take(delta), take())


def forward_results(cfg, outs, u):
    """(h, vn — u itself for linear attention —, final states) from the pass's outputs."""
    h, *rest = outs
    return (h, *rest) if cfg.spec.delta else (h, u, rest[0])


def backward_io(cfg, q, k, w, extras, do, dvo, dfin, h0):
    """As `forward_io`, for the reverse pass."""
    BH = q.shape[0]
    delta = cfg.spec.delta
    ins = ([(q, "key"), (k, "key")] + ([(w, "key")] if delta else [])
           + list(zip(extras, cfg.kinds)) + [(do, "val")] + ([(dvo, "val")] if delta else [])
           + [(dfin, "fin")])
    outs = [(_states(cfg, BH, cfg.NC, cfg.spec.cd), "states"),
            (jax.ShapeDtypeStruct(h0.shape, jnp.dtype(cfg.acc)), "h0")]
    return ins, outs


def backward_refs(cfg, refs) -> BackwardRefs:
    take = _reader(refs)
    delta = cfg.spec.delta
    q, k, w = take(), take(), take(delta)
    extras = tuple(take() for _ in cfg.kinds)
    return BackwardRefs(q, k, w, extras, take(), take(delta), take(), take(), take())
