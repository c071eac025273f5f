"""The math of one chunk of the neural memory, for one head: 2-D arrays only, so the same code
runs vmapped in the XLA impl and inside the Pallas kernels (both backends). Pure functions of
arrays: no refs, no grids.

A chunk of C tokens enters with parameters P and momentum Z (tuples: (M,) for depth 1,
(W1, W2) for depth 2). q is already scaled; w0, w1 [C, 1] are the tokens' weights in the
chunk-end memory and momentum (−θ_s times the 2×2 recurrence's coefficients, see xla.py) and
a, b, d [1, 1] the chunk's transition:

    o   = M_P(q)                                    (`read`)
    G_j = Σ_s w_j,s ∇ℓ_s(P)                         (each layer's ∇ℓ_s is x_s ε_sᵀ: rank one)
    P'  = a P + b Z + G_0,   Z' = d Z + G_1         (`update`)

Per layer the gradient is written out: depth 1 x = k, ε = e = Mᵀk − v; depth 2 (h = W1ᵀk,
a = GELU(h), e = W2ᵀa − v, δ = (W2 e) ⊙ GELU′(h)) layer 1 x = k, ε = δ, layer 2 x = a, ε = e.
`chunk_vjp` is the backward of the whole chunk written out the same way (for depth 2 it holds
the Hessian-vector product of the MLP loss: GELU″ appears), so no autodiff runs inside a chunk.
Matmuls accumulate in float32 (float64 for float64 inputs) at full precision. Every function
takes the `erf` it uses (`lax.erf`, or `erf_rational` where a compiler has no erf).
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax

from ..scan.chunk_math import matmul

_mm = matmul()


# Eigen's / XLA's float32 erf: x·P(x²)/Q(x²) on x clamped to [−4, 4].
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def erf_rational(x):
    """erf from multiplies and one division (Pallas' Triton lowering has no erf): within
    7e-8 of erf in float64 arithmetic, 4e-7 in float32 (a few float32 ulps)."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    horner = lambda cs: functools.reduce(lambda acc, c: acc * x2 + c, cs, jnp.zeros_like(x))
    return x * horner(_ERF_P) / horner(_ERF_Q)


def gelu_and_grads(h, erf=lax.erf):
    """Exact GELU(h) = h Φ(h), GELU′(h) = Φ(h) + h φ(h) and GELU″(h) = φ(h) (2 − h²)."""
    cdf = 0.5 * (1 + erf(h * (1 / math.sqrt(2))))
    pdf = jnp.exp(-0.5 * h * h) * (1 / math.sqrt(2 * math.pi))
    return h * cdf, cdf + h * pdf, pdf * (2 - h * h)


def _dot(a, b, ta=False, tb=False):
    return _mm(a, b, a.dtype, ta, tb)


def _total(x):
    """Σ of all entries as a [1, 1] array (two keepdims reductions: fine in every kernel)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def read(params: tuple, q, erf=lax.erf):
    """M_P(q): q [C, K] -> [C, V]."""
    if len(params) == 1:
        return _dot(q, params[0])
    W1, W2 = params
    return _dot(gelu_and_grads(_dot(q, W1), erf)[0], W2)


def _layers(params: tuple, k, v, erf):
    """(x, ε) per layer (∇ℓ_s of that layer's weight = x_s ε_sᵀ) and the depth-2 pre-activations
    with their GELU′ and GELU″ (None for depth 1)."""
    if len(params) == 1:
        return ((k, _dot(k, params[0]) - v),), None
    W1, W2 = params
    h = _dot(k, W1)
    a, g1, g2 = gelu_and_grads(h, erf)
    e = _dot(a, W2) - v
    return ((k, _dot(e, W2, tb=True) * g1), (a, e)), (e, g1, g2)


def gradient_sums(params: tuple, k, v, w0, w1, erf=lax.erf) -> tuple:
    """(G_0, G_1): Σ_s w_j,s ∇ℓ_s(P) for the two weight columns w0, w1 [C, 1]."""
    layers, _ = _layers(params, k, v, erf)
    return tuple(tuple(_dot(x, w * eps, ta=True) for x, eps in layers) for w in (w0, w1))


def update(params: tuple, mom: tuple, k, v, w0, w1, a, b, d, erf=lax.erf) -> tuple:
    """(P', Z') at the chunk's end."""
    G0, G1 = gradient_sums(params, k, v, w0, w1, erf)
    return (tuple(a * p + b * z + g for p, z, g in zip(params, mom, G0)),
            tuple(d * z + g for z, g in zip(mom, G1)))


def _weighted_sums_bwd(x, eps, w0, w1, dG0, dG1):
    """Backward of G_j = xᵀ (w_j ⊙ ε) (j = 0, 1) with cotangents dG_j: (dx, dε, dw0, dw1)."""
    xdG0, xdG1 = _dot(x, dG0), _dot(x, dG1)
    deps = w0 * xdG0 + w1 * xdG1
    dx = _dot(w0 * eps, dG0, tb=True) + _dot(w1 * eps, dG1, tb=True)
    return (dx, deps, jnp.sum(xdG0 * eps, axis=1, keepdims=True),
            jnp.sum(xdG1 * eps, axis=1, keepdims=True))


def chunk_vjp(params: tuple, mom: tuple, q, k, v, w0, w1, a, b, d, do, dP: tuple, dZ: tuple,
              erf=lax.erf):
    """The vjp of (o, P', Z') w.r.t. everything, at the chunk's entering (P, Z), with
    cotangents do [C, V], dP, dZ (those of P', Z'). Returns (dparams, dmom, dq, dk, dv, dw0,
    dw1, da, db, dd)."""
    layers, mid = _layers(params, k, v, erf)
    da = sum(_total(p * g) for p, g in zip(params, dP))
    db = sum(_total(z * g) for z, g in zip(mom, dP))
    dd = sum(_total(z * g) for z, g in zip(mom, dZ))
    dmom = tuple(b * gp + d * gz for gp, gz in zip(dP, dZ))
    back = [_weighted_sums_bwd(x, eps, w0, w1, gp, gz)
            for (x, eps), gp, gz in zip(layers, dP, dZ)]
    dw0 = sum(r[2] for r in back)
    dw1 = sum(r[3] for r in back)
    if mid is None:                            # depth 1: e = k M − v, o = q M
        (M,), (dk, de, _, _) = params, back[0]
        dM = a * dP[0] + _dot(k, de, ta=True) + _dot(q, do, ta=True)
        return ((dM,), dmom, _dot(do, M, tb=True), dk + _dot(de, M, tb=True), -de,
                dw0, dw1, da, db, dd)
    W1, W2 = params
    e, g1, g2 = mid
    (dk, ddelta, _, _), (dact, de, _, _) = back
    act = layers[1][0]
    # δ = (e W2ᵀ) ⊙ GELU′(h)
    dEW = ddelta * g1
    de = de + _dot(dEW, W2)
    dW2 = a * dP[1] + _dot(dEW, e, ta=True)
    dh = ddelta * _dot(e, W2, tb=True) * g2
    # e = act W2 − v
    dact = dact + _dot(de, W2, tb=True)
    dW2 = dW2 + _dot(act, de, ta=True)
    # act = GELU(h), h = k W1
    dh = dh + dact * g1
    dk = dk + _dot(dh, W1, tb=True)
    dW1 = a * dP[0] + _dot(k, dh, ta=True)
    # o = GELU(q W1) W2
    aq, gq, _ = gelu_and_grads(_dot(q, W1), erf)
    dW2 = dW2 + _dot(aq, do, ta=True)
    dhq = _dot(do, W2, tb=True) * gq
    dW1 = dW1 + _dot(q, dhq, ta=True)
    return ((dW1, dW2), dmom, _dot(dhq, W1, tb=True), dk, -de, dw0, dw1, da, db, dd)
