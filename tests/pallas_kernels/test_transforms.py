"""Every impl of the recurrent ops stays differentiable, with the reference's gradient, under
the JAX transformations a model wraps them in: grad, jit(grad), grad(jit), checkpoint with each
of the model's remat policies, lax.scan (scanned layers), vmap (forward and per-example
gradients) and jit(grad(checkpoint)) nested inside lax.scan (DESIGN.md, "The op contract":
"differentiable under jit, grad, vmap, lax.scan and jax.checkpoint, in any nesting").

Plain `jax.grad` of a kernel is not enough: `jax.checkpoint`, `lax.scan` and `grad(jit(f))`
partially evaluate the op's custom_vjp forward rule, which then has to produce a well-formed
(output, residuals) pair from traced values.

Each case compares, in float64, the gradient of every input (q, k, v, gates, β,
initial_state) of  L = <o, c_o> + <final state, c_s>  (random cotangents, so both outputs
are used) with impl="reference" differentiated plainly (or, for the scans, an unrolled Python
loop of it). Inputs are fixed per op variant so the reference runs once per worker and variant.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_delta_rule, linear_attention
from recurrent_testing import assert_close, vjp_fn
from test_pallas import VARIANTS, make_inputs

CHUNK = 16
B, T, H, K, V = 2, 41, 2, 16, 16   # odd T: a partial last chunk; K == V so o can feed q
TOL = 1e-9
# variant -> (public op, the names of its gate inputs); the kernels (VARIANTS) come from
# test_pallas. la_gk carries g as well, so both linear-attention gates get a gradient.
OPS = {
    "gdn": (gated_delta_rule, ("beta", "g")),
    "deltanet": (gated_delta_rule, ("beta",)),
    "la_g": (linear_attention, ("g",)),
    "la_gk": (linear_attention, ("g", "gk")),
    "kda": (gated_delta_rule, ("beta", "gk")),
}
# The remat policies of mem_lm.model._REMAT_POLICIES ("full" is policy=None). Spelled out here
# because tests of pallas_kernels do not import the packages above it.
REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# "pallas" is the public op's dispatch (the TPU kernel layout on CPU, interpret mode);
# "pallas_gpu" calls the kernels with the GPU layout (chunk loop inside the kernel, another
# grid and so another batching of the pallas_call under vmap).
IMPLS = ("reference", "xla", "pallas", "pallas_gpu")
TRANSFORMS = ("grad", "jit_grad", "grad_jit", *(f"remat_{p}" for p in REMAT), "scan", "vmap",
              "scan_of_jit_grad_remat")
# Compile time dominates this file, so the full matrix runs on one op of each family with
# every gate it takes (gdn: β and g; la_gk: g and gk). DeltaNet (g=None) and linear attention
# with g only differ in which inputs are None, which matters to the custom_vjp's residuals and
# to batching: they get the remat and vmap cases of the two chunked impls, as does the gated
# delta rule with per-key gates (KDA: gk among the kernels' inputs, per-key chunk math; its
# pallas cases under -m slow). The GPU layout shares the custom_vjp glue with the TPU one, so
# it gets the cases that reach the kernels differently (batching of another grid; the
# kernels' fwd rule under scan + remat).
FULL = ("gdn", "la_gk")
PARTIAL = {"deltanet": ("remat_dots", "vmap"), "la_g": ("remat_dots", "vmap"),
           "kda": ("remat_dots", "vmap")}
GPU_CASES = {"gdn": ("vmap", "scan_of_jit_grad_remat"), "la_gk": ("vmap", "remat_dots")}


def _wanted(variant, impl, transform):
    if impl == "pallas_gpu":
        return transform in GPU_CASES.get(variant, ())
    if variant in FULL:
        return True
    return impl != "reference" and transform in PARTIAL[variant]


# The cases of a full-matrix impl in `make test` beyond gdn's pallas impl (every transform):
# those that reach a custom_vjp in different ways (plain grad, vmap's batching, the fwd rule
# under scan + jit + remat; for xla also a remat policy and the plain scan). jit(grad),
# grad(jit) and the other remat policies run the same glue as gdn's pallas cases.
IN_MAKE_TEST = {
    ("gdn", "xla"): ("grad", "remat_dots", "scan", "vmap", "scan_of_jit_grad_remat"),
    ("la_gk", "pallas"): ("grad", "vmap", "scan_of_jit_grad_remat"),
}


def _in_make_test(variant, impl, transform):
    """`make test` runs every transform through gdn's pallas impl, the IN_MAKE_TEST cases of
    gdn's xla and la_gk's pallas impls, and every partial and GPU-layout case but kda's
    pallas ones (test_pallas checks its kernels' gradients) and its xla remat case; the plain lax.scan reference,
    la_gk's xla matrix and the other cases run under -m slow."""
    if impl == "reference" or (variant == "la_gk" and impl == "xla"):
        return False
    if variant == "kda" and (impl != "xla" or transform != "vmap"):
        return False
    return transform in IN_MAKE_TEST.get((variant, impl), (transform,))


CASES = [pytest.param(o, i, t, id="-".join((o, i, t)),
                      marks=[] if _in_make_test(o, i, t) else [pytest.mark.slow])
         for o in OPS for i in IMPLS for t in TRANSFORMS if _wanted(o, i, t)]


def run_op(variant, impl, args):
    """(o, final state) of the op on the named inputs, through the public op (impl) or, for
    "pallas_gpu", the kernels called with the GPU layout."""
    op, gates = OPS[variant]
    if impl != "pallas_gpu":
        return op(**args, impl=impl, chunk_size=CHUNK, output_final_state=True)
    pos = ("beta", "g", "gk") if "beta" in gates else ("g", "gk")
    return VARIANTS[variant][1](args["q"], args["k"], args["v"],
                                *(args.get(n) for n in pos),
                                scale=K ** -0.5, initial_state=args["initial_state"],
                                cu_seqlens=None, chunk_size=CHUNK, backend="gpu")


def make_loss(variant, impl):
    """L(args, cts) = <o, c_o> + <state, c_s>: both outputs reach the gradient."""
    def loss(args, cts):
        o, s = run_op(variant, impl, args)
        return jnp.sum(o * cts[0]) + jnp.sum(s * cts[1])
    return loss


@functools.lru_cache(maxsize=None)
def inputs(variant):
    """Random inputs (q, k, v, gates, β, initial_state as a dict) and cotangents, the same for
    every case of a variant (seeded by its name) so the references are computed once."""
    rng = np.random.default_rng(zlib.crc32(variant.encode()))
    pos, init = make_inputs(rng, variant, B=B, T=T, H=H, K=K, V=V, N=B, dtype=jnp.float64)
    names = ("q", "k", "v") + (("beta", "g", "gk") if "beta" in OPS[variant][1] else ("g", "gk"))
    args = {n: x for n, x in zip(names, pos) if x is not None}
    args["initial_state"] = init
    assert set(args) == {"q", "k", "v", "initial_state", *OPS[variant][1]}
    cts = (jnp.asarray(rng.standard_normal((B, T, H, V))),
           jnp.asarray(rng.standard_normal((B, H, K, V))))
    return args, cts


@functools.lru_cache(maxsize=None)
def expected_plain(variant):
    """((o, state), grads) of the reference, through the shared vjp helper."""
    args, cts = inputs(variant)
    return vjp_fn(OPS[variant][0], impl="reference", chunk_size=CHUNK)(args, cts)


def two_layers(variant, impl, scan):
    """Two "layers" of the op on a carried q (q ← q + o, the residual stream of scanned
    layers); k, v, gates, β and the initial state are shared (closed over, like broadcast
    parameters). L sums both layers' losses. `scan`: lax.scan, else an unrolled Python loop."""
    loss = make_loss(variant, impl)

    def f(args, cts):
        def layer(q, _):
            a = {**args, "q": q}
            return q + run_op(variant, impl, a)[0], loss(a, cts)
        if scan:
            return jnp.sum(jax.lax.scan(layer, args["q"], None, length=2)[1])
        q, total = args["q"], 0.0
        for _ in range(2):
            q, l = layer(q, None)
            total = total + l
        return total
    return f


def grads_in_a_loop(variant, impl, scan):
    """Two optimiser-like steps q ← q − ½ dL/dq whose body differentiates the op itself, the
    grad as jit(grad(checkpoint(L))) when `scan` (lax.scan over the steps), plain grad in an
    unrolled Python loop otherwise. Returns the gradients of both steps, stacked."""
    loss = make_loss(variant, impl)
    inner = (jax.jit(jax.grad(jax.checkpoint(loss, policy=REMAT["dots"])))
             if scan else jax.grad(loss))

    def step(args, cts):
        grads = inner(args, cts)
        return {**args, "q": args["q"] - 0.5 * grads["q"]}, grads

    def f(args, cts):
        if scan:
            return jax.lax.scan(lambda a, _: step(a, cts), args, None, length=2)[1]
        out = []
        for _ in range(2):
            args, grads = step(args, cts)
            out.append(grads)
        return jax.tree.map(lambda *g: jnp.stack(g), *out)
    return f


@functools.lru_cache(maxsize=None)
def expected_layers(variant):
    args, cts = inputs(variant)
    return jax.jit(jax.grad(two_layers(variant, "reference", scan=False)))(args, cts)


@functools.lru_cache(maxsize=None)
def expected_loop(variant):
    args, cts = inputs(variant)
    return jax.jit(grads_in_a_loop(variant, "reference", scan=False))(args, cts)


def split_batch(x):
    """[B, ...] -> [B, 1, ...]: the batch becomes a vmapped axis over batch-1 calls."""
    return x.reshape(x.shape[0], 1, *x.shape[1:])


def assert_grads(got, want, what):
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for name in want:
        assert_close(got[name], want[name], TOL, f"{what}: d{name}")


@pytest.mark.parametrize("variant,impl,transform", CASES)
def test_gradient_under_transform(x64, variant, impl, transform):
    args, cts = inputs(variant)
    loss = make_loss(variant, impl)
    what = f"{variant} impl={impl} under {transform}"

    if transform == "scan":
        got = jax.jit(jax.grad(two_layers(variant, impl, scan=True)))(args, cts)
        assert_grads(got, expected_layers(variant), what)
        return
    if transform == "scan_of_jit_grad_remat":
        got = grads_in_a_loop(variant, impl, scan=True)(args, cts)
        assert_grads(got, expected_loop(variant), what)
        return

    (o_ref, s_ref), g_ref = expected_plain(variant)
    if transform == "vmap":
        # One computation: the vmapped forward (the undifferentiated path) and per-example
        # gradients (vmap of grad: the forward and backward kernels batched); the batch of 2
        # is split into 2 vmapped calls of batch 1, so the plain reference still applies.
        @jax.jit
        def run(a, c):
            return jax.vmap(lambda a: run_op(variant, impl, a))(a), jax.vmap(jax.grad(loss))(a, c)

        (o, s), grads = run(*jax.tree.map(split_batch, (args, cts)))
        assert_close(o.reshape(o_ref.shape), o_ref, TOL, f"{what}: o")
        assert_close(s.reshape(s_ref.shape), s_ref, TOL, f"{what}: final state")
        assert_grads({n: x.reshape(g_ref[n].shape) for n, x in grads.items()}, g_ref, what)
        return

    if transform == "grad":
        got = jax.grad(loss)(args, cts)               # eager: no jit anywhere
    elif transform == "jit_grad":
        got = jax.jit(jax.grad(loss))(args, cts)
    elif transform == "grad_jit":
        got = jax.grad(jax.jit(loss))(args, cts)
    else:
        # jit outside, as in a training step (and one compile instead of eager dispatch).
        policy = REMAT[transform.removeprefix("remat_")]
        got = jax.jit(jax.grad(jax.checkpoint(loss, policy=policy)))(args, cts)
    assert_grads(got, g_ref, what)
