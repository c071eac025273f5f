"""The Pallas kernels (impl="pallas") in interpret mode against the token-scan references.

Both kernel layouts run on CPU with `interpret=True`: the TPU one (grid over chunks, VMEM
scratch, scalar prefetch) and the GPU one (chunk loop inside the kernel). Checked in float64:
outputs, final states and the gradients of every input (q, k, v, gates, β, initial_state), at
odd lengths, K ≠ V (V split into several tiles), with packed sequences (cu_seqlens, including an
empty one), in bfloat16, and the impl="auto" dispatch.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.scan import chunk_math
from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference
from pallas_kernels.linear_attention.pallas import linear_attention_pallas
from pallas_kernels.linear_attention.reference import linear_attention_reference

LAYOUTS = ("tpu", "gpu")
# name -> (reference, pallas, which optional inputs the op gets)
VARIANTS = {
    "la": (linear_attention_reference, linear_attention_pallas, ()),
    "la_g": (linear_attention_reference, linear_attention_pallas, ("g",)),
    "la_gk": (linear_attention_reference, linear_attention_pallas, ("g", "gk")),
    "deltanet": (gated_delta_rule_reference, gated_delta_rule_pallas, ("beta",)),
    "gdn": (gated_delta_rule_reference, gated_delta_rule_pallas, ("beta", "g")),
    "kda": (gated_delta_rule_reference, gated_delta_rule_pallas, ("beta", "gk")),
}


def make_inputs(rng, variant, B, T, H, K, V, N, dtype, h0=True):
    """Positional args of the op (q, k, v, g, gk) or (q, k, v, beta, g, gk), and
    initial_state."""
    names = VARIANTS[variant][2]

    def arr(*shape, lo=None, hi=None):
        x = rng.uniform(lo, hi, shape) if lo is not None else rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)

    q, k, v = arr(B, T, H, K), arr(B, T, H, K) / np.sqrt(K), arr(B, T, H, V)
    g = arr(B, T, H, lo=-0.4, hi=0.0) if "g" in names else None
    gk = arr(B, T, H, K, lo=-0.4, hi=0.0) if "gk" in names else None
    beta = arr(B, T, H, lo=0.0, hi=1.0) if "beta" in names else None
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    args = (q, k, v, beta, g, gk) if "beta" in names else (q, k, v, g, gk)
    init = arr(N, H, K, V) if h0 else None
    return args, init


def vjp_all(fn, args, init, cts, **kw):
    """(o, final state) and the gradients of every array input under fixed cotangents, in one
    jitted computation (one compilation instead of many eager ones)."""
    K = args[0].shape[-1]

    @jax.jit
    def run(args, init, cts):
        out, pull = jax.vjp(lambda a, s: fn(*a, scale=K ** -0.5, initial_state=s, **kw),
                            args, init)
        return out, pull(cts)

    return run(args, init, cts)


def cotangents(rng, args, N):
    """Random cotangents for (o [B, T, H, V] in q's dtype, final state [N, H, K, V])."""
    q, v = args[0], args[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    shapes = ((v.shape, q.dtype), ((N, q.shape[2], q.shape[3], v.shape[3]), acc))
    return tuple(jnp.asarray(rng.standard_normal(s), d) for s, d in shapes)


def assert_close(got, want, tol, what):
    for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        err = np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)
        assert err < tol, f"{what}: leaf {i} relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_reference(x64, rng, variant):
    """Odd length (padding), K != V (two V tiles on the GPU layout), initial state, all grads."""
    ref, pal, _ = VARIANTS[variant]
    args, init = make_inputs(rng, variant, B=2, T=37, H=2, K=16, V=80, N=2, dtype=jnp.float64)
    cts = cotangents(rng, args, init.shape[0])
    out_ref, grads_ref = vjp_all(ref, args, init, cts, cu_seqlens=None)
    for layout in LAYOUTS:
        out, grads = vjp_all(pal, args, init, cts, cu_seqlens=None, chunk_size=32,
                             backend=layout)
        assert out[0].dtype == jnp.float64 and out[1].shape == (2, 2, 16, 80)
        assert_close(out, out_ref, 1e-10, f"{variant}/{layout} forward")
        assert_close(grads, grads_ref, 1e-9, f"{variant}/{layout} gradients")


# kda's packed case runs under -m slow: its packing is gdn's, its gates la_gk's.
@pytest.mark.parametrize("variant", [pytest.param(v, marks=[pytest.mark.slow] if v == "kda"
                                                  else []) for v in sorted(VARIANTS)])
def test_packed_sequences(x64, rng, variant):
    """cu_seqlens with an empty sequence and boundaries inside chunks; layouts alternate."""
    ref, pal, _ = VARIANTS[variant]
    cu = jnp.asarray([0, 5, 5, 30, 47], jnp.int32)
    args, init = make_inputs(rng, variant, B=1, T=50, H=2, K=16, V=16, N=4,
                             dtype=jnp.float64)
    cts = cotangents(rng, args, init.shape[0])
    out_ref, grads_ref = vjp_all(ref, args, init, cts, cu_seqlens=cu)
    layout = LAYOUTS[sorted(VARIANTS).index(variant) % 2]
    out, grads = vjp_all(pal, args, init, cts, cu_seqlens=cu, chunk_size=16, backend=layout)
    assert_close(out, out_ref, 1e-10, f"{variant}/{layout} packed forward")
    assert_close(grads, grads_ref, 1e-9, f"{variant}/{layout} packed gradients")


@pytest.mark.parametrize("variant,layout", [("la_gk", "tpu"), ("gdn", "gpu")])
def test_bfloat16(rng, variant, layout):
    """bf16 q, k, v (f32 gates and state) against the float32 reference on the same inputs."""
    ref, pal, _ = VARIANTS[variant]
    args, init = make_inputs(rng, variant, B=1, T=40, H=2, K=32, V=32, N=1,
                             dtype=jnp.bfloat16)
    args = tuple(None if a is None else (a if a.dtype == jnp.bfloat16 else
                                         a.astype(jnp.float32)) for a in args)
    init = init.astype(jnp.float32)
    cts = cotangents(rng, args, init.shape[0])
    out_ref, grads_ref = vjp_all(ref, args, init, cts, cu_seqlens=None)
    out, grads = vjp_all(pal, args, init, cts, cu_seqlens=None, chunk_size=32, backend=layout)
    assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.float32
    assert grads[0][0].dtype == jnp.bfloat16
    assert_close(out, out_ref, 3e-2, f"{variant}/{layout} bf16 forward")
    assert_close(grads, grads_ref, 5e-2, f"{variant}/{layout} bf16 gradients")


def test_tpu_layout_several_value_tiles(x64, rng):
    """V = 136 pads to two 128-lane tiles on the TPU layout: per-tile partial dq/dk summed."""
    ref, pal, _ = VARIANTS["gdn"]
    args, init = make_inputs(rng, "gdn", B=1, T=20, H=1, K=8, V=136, N=1, dtype=jnp.float64)
    cts = cotangents(rng, args, 1)
    out_ref, grads_ref = vjp_all(ref, args, init, cts, cu_seqlens=None)
    out, grads = vjp_all(pal, args, init, cts, cu_seqlens=None, chunk_size=16, backend="tpu")
    assert_close(out, out_ref, 1e-10, "gdn/tpu V=136 forward")
    assert_close(grads, grads_ref, 1e-9, "gdn/tpu V=136 gradients")


def test_ut_inverse_is_the_inverse(x64, rng):
    """Blocked forward substitution + block merge equals (I + L)^-1 for C = 16, 32, 64, 128."""
    for C in (16, 32, 64, 128):
        L = np.tril(rng.standard_normal((C, C)) * 0.3, -1)
        T = np.asarray(jax.jit(chunk_math.ut_inverse)(jnp.asarray(L)))
        np.testing.assert_allclose(T @ (np.eye(C) + L), np.eye(C), atol=1e-9)
    # and the closed-form gradient the backward uses, against that of a dense inverse
    L = jnp.asarray(np.tril(rng.standard_normal((32, 32)) * 0.3, -1))
    ct = jnp.asarray(rng.standard_normal((32, 32)))
    mask = np.tril(np.ones((32, 32)), -1)
    got = chunk_math.inverse_bwd(chunk_math.ut_inverse(L), ct)
    want = jax.grad(lambda L: jnp.sum(jnp.linalg.inv(jnp.eye(32) + L) * ct))(L)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want) * mask, atol=1e-9)


def test_value_tiles_follow_the_rule():
    """`phases.TILE_RULE`: smaller value tiles where a pass would have few programs, never
    below the backend's alignment (TPU tiles stay 128), none in interpret mode."""
    from pallas_kernels.scan import phases
    gpu, tpu = phases.GPU_BLOCKS, phases.TPU_BLOCKS

    def seq(blocks, BH, f32=False):
        return phases.value_tile(blocks, blocks.v_tile_seq, 128, f32, BH)

    # the sequential pass at V = 128: B·H = 16 -> 32 programs at 64 -> tiles of 16 (128)
    assert [seq(gpu, bh) for bh in (1, 16, 32, 47, 48)] == [16, 16, 32, 32, 64]
    assert seq(gpu, 16, f32=True) == 16 and seq(gpu, 64, f32=True) == 32
    assert [seq(tpu, bh) for bh in (1, 16, 64)] == [128, 128, 128]
    assert phases.value_tile(gpu, 64, 128, False, None) == 64       # interpret mode
    assert phases.value_tile(gpu, 128, 128, False, 16 * 512) == 128  # B·H·NC at T=32k
    no_rule = dataclasses.replace(gpu, tile_rule=())
    assert seq(no_rule, 1) == 64
    # and `prepare` takes both passes' tiles from it (B=1, H=4, T=256: 4 chunks of 64)
    x = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    cfg, _, _ = phases.prepare("la", x, x, x, scale=1.0, blocks=gpu, interpret=False)
    assert (cfg.BV, cfg.BV_seq) == (32, 16)
    cfg, _, _ = phases.prepare("la", x, x, x, scale=1.0, blocks=gpu, interpret=True)
    assert (cfg.BV, cfg.BV_seq) == (128, 64)


def test_public_dispatch(rng, monkeypatch):
    """impl='pallas' runs through the public op; 'auto' is xla on CPU and pallas on TPU/GPU.
    Undifferentiated calls take the kernels' forward-only variant (only the last state kept)."""
    from pallas_kernels import gated_delta_rule, linear_attention
    args, _ = make_inputs(rng, "gdn", B=1, T=9, H=1, K=16, V=16, N=1, dtype=jnp.float32)
    q, k, v, beta, g, _ = args
    want = gated_delta_rule(q, k, v, beta, g, impl="reference", output_final_state=True)
    got = gated_delta_rule(q, k, v, beta, g, impl="pallas", output_final_state=True)
    assert_close(got, want, 1e-5, "public gated_delta_rule impl=pallas (TPU layout)")
    got = gated_delta_rule_pallas(q, k, v, beta, g, scale=16 ** -0.5, initial_state=None,
                                  cu_seqlens=None, chunk_size=16, backend="gpu")
    assert_close(got, want, 1e-5, "gated_delta_rule_pallas forward-only, GPU layout")
    o_p, _ = linear_attention(q, k, v, g, impl="pallas")
    o_r, _ = linear_attention(q, k, v, g, impl="reference")
    assert_close(o_p, o_r, 1e-5, "public linear_attention impl=pallas")

    pkg = "pallas_kernels.linear_attention"
    assert common.select_impl(pkg, "linear_attention", "auto", 64).func.__name__ == (
        "linear_attention_xla")
    for platform, layout in (("tpu", "tpu"), ("gpu", "gpu")):
        monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
        fn = common.select_impl(pkg, "linear_attention", "auto", 64)
        assert fn.func.__name__ == "linear_attention_pallas"
        assert common.default_backend() == layout
        assert not common.default_interpret()
