"""Every Pallas kernel, forward and backward, lowers for TPU (Mosaic) and for CUDA (Triton) from
this CPU-only machine: `jax.jit(f).trace(*args).lower(lowering_platforms=(...))`.

Lowering runs the Pallas -> Mosaic / Triton IR lowering of the kernel bodies, so it catches
block-shape, layout, dtype and unsupported-primitive errors without the hardware (it does not
run the device compilers' later passes). If this jax build cannot lower a trivial Pallas kernel
for a platform at all, that platform's tests are skipped with the reason.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir
from jax._src.lib import triton
from jax._src.lib.mlir import ir
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.linear_attention.pallas import linear_attention_pallas
from pallas_kernels.sparse_attention.pallas import block_sparse_attention_pallas

# platform -> (kernel layout, the custom call a lowered kernel becomes)
PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "cuda": ("gpu", "__gpu$xla.gpu.triton")}
# Kernels per call. Forward: (W, U for all chunks,) the sequential state pass, the outputs for
# all chunks; backward: (Pᵀdo for all chunks,) the reverse state pass, the per-chunk vjps.
KERNELS = {"la": (2, 4), "gdn": (3, 6)}
VARIANTS = {
    "la": (linear_attention_pallas, ()),
    "la_g": (linear_attention_pallas, ("g",)),
    "la_gk": (linear_attention_pallas, ("gk",)),
    "la_g_gk": (linear_attention_pallas, ("g", "gk")),
    "deltanet": (gated_delta_rule_pallas, ("beta",)),
    "gdn": (gated_delta_rule_pallas, ("beta", "g")),
    "kda": (gated_delta_rule_pallas, ("beta", "gk")),
}


@functools.lru_cache(maxsize=None)
def platform_unavailable(platform: str):
    """None if a trivial Pallas kernel lowers for `platform` here, else the reason."""
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1

    if platform == "cuda":  # the backend our GPU kernels use: Pallas' Triton lowering
        from jax.experimental.pallas import triton as pltr
        params = pltr.CompilerParams(num_warps=4)
    else:
        from jax.experimental.pallas import tpu as pltpu
        params = pltpu.CompilerParams()

    def f(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              compiler_params=params)(x)

    try:
        jax.jit(f).trace(jnp.zeros((8, 128), jnp.float32)).lower(lowering_platforms=(platform,))
    except Exception as e:  # noqa: BLE001 - reported verbatim as the skip reason
        return f"this jax build cannot lower any Pallas kernel for {platform}: {e!r}"
    return None


def inputs(variant, dtype, B=2, T=100, H=2, K=64, V=128):
    names = VARIANTS[variant][1]
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), dtype)
    g = jnp.full((B, T, H), -0.1, jnp.float32) if "g" in names else None
    gk = jnp.full((B, T, H, K), -0.1, jnp.float32) if "gk" in names else None
    beta = jnp.full((B, T, H), 0.5, jnp.float32) if "beta" in names else None
    args = (q, k, v, beta, g, gk) if "beta" in names else (q, k, v, g, gk)
    return args, jnp.zeros((B, H, K, V), jnp.float32)


def lower(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def forward_and_grad(op, layout, cu_seqlens=None):
    def fwd(args, h0):
        return op(*args, scale=0.125, initial_state=h0, cu_seqlens=cu_seqlens, chunk_size=64,
                  backend=layout, interpret=False)

    def loss(args, h0):
        o, s = fwd(args, h0)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    return fwd, jax.grad(loss, argnums=(0, 1))


# kda in float32 runs under -m slow (bf16 reaches the same kernel bodies).
@pytest.mark.parametrize("platform, variant, dtype", [
    pytest.param(p, v, d, id=f"{d}-{v}-{p}",
                 marks=[pytest.mark.slow] if (v, d) == ("kda", "float32") else [])
    for d in ("bfloat16", "float32") for v in sorted(VARIANTS) for p in sorted(PLATFORMS)])
def test_lowers(platform, variant, dtype):
    reason = platform_unavailable(platform)
    if reason:
        pytest.skip(reason)
    layout, target = PLATFORMS[platform]
    op = VARIANTS[variant][0]
    args, h0 = inputs(variant, jnp.dtype(dtype))
    n_fwd, n_both = KERNELS["gdn" if op is gated_delta_rule_pallas else "la"]
    fwd, grad = forward_and_grad(op, layout)
    text = lower(fwd, (args, h0), platform)
    assert text.count(target) == n_fwd, f"forward: expected {n_fwd} {target} kernels"
    text = lower(grad, (args, h0), platform)
    assert text.count(target) == n_both, f"forward+backward: expected {n_both} kernels"


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("variant", ["la_g", "gdn"])
def test_lowers_packed_sequences(platform, variant):
    """cu_seqlens (traced offsets, per-chunk reset flags and state rows) lower too."""
    reason = platform_unavailable(platform)
    if reason:
        pytest.skip(reason)
    layout, target = PLATFORMS[platform]
    op = VARIANTS[variant][0]
    args, _ = inputs(variant, jnp.bfloat16, B=1, T=300)
    h0 = jnp.zeros((3, 2, 64, 128), jnp.float32)
    cu = jnp.asarray([0, 70, 200, 300], jnp.int32)
    n_fwd, n_both = KERNELS["gdn" if op is gated_delta_rule_pallas else "la"]
    fwd, grad = forward_and_grad(op, layout, cu_seqlens=cu)
    assert lower(fwd, (args, h0), platform).count(target) == n_fwd
    assert lower(grad, (args, h0), platform).count(target) == n_both


def triton_dots(lowered) -> list:
    """The `tt.dot` lines of every Triton kernel in a lowered module (each kernel's Triton IR
    travels as bytecode in its custom call's backend config)."""
    blobs = []

    def visit(op):
        op = op.operation
        if op.name == "stablehlo.custom_call" and "triton" in str(
                op.attributes["call_target_name"]):
            blobs.append(ir.DictAttr(op.attributes["mhlo.backend_config"])["ir"])
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    ctx = mlir.make_ir_context()
    triton.dialect.register_dialect(ctx)
    with ctx:
        return [line for b in blobs
                for line in str(ir.Module.parse(ir.StringAttr(b).value_bytes)).splitlines()
                if "tt.dot" in line]


def test_float32_dots_are_tf32_on_gpu_unless_asked():
    """float32 GDN forward + backward for CUDA: TF32 dots by default (as fla; the UT inverse
    stays IEEE), none with tf32=False, the same dots either way."""
    reason = platform_unavailable("cuda")
    if reason:
        pytest.skip(reason)
    args, h0 = inputs("gdn", jnp.float32)
    counts = {}
    for tf32 in (None, False):
        op = functools.partial(gated_delta_rule_pallas, tf32=tf32)
        _, grad = forward_and_grad(op, "gpu")
        dots = triton_dots(jax.jit(grad).trace(args, h0).lower(lowering_platforms=("cuda",)))
        counts[tf32] = (len(dots), sum("inputPrecision = tf32" in d for d in dots))
    (n, n_tf32), (n_full, n_full_tf32) = counts[None], counts[False]
    assert n == n_full > 0 and n_full_tf32 == 0
    assert 0 < n_tf32 < n, counts  # all but the inverse's substitution and merge


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_block_sparse_attention_lowers(platform, dtype):
    """Forward (1 kernel) and forward + backward (3: forward, dq, dk/dv) with GQA 3, an odd
    length, a window and segment ids."""
    reason = platform_unavailable(platform)
    if reason:
        pytest.skip(reason)
    layout, target = PLATFORMS[platform]
    B, T, H, Hkv, D, bs = 1, 200, 6, 2, 64, 64
    q = jnp.zeros((B, T, H, D), dtype)
    k, v = (jnp.zeros((B, T, Hkv, D), dtype) for _ in range(2))
    idx = jnp.zeros((B, Hkv, 4, 2), jnp.int32)
    seg = jnp.zeros((B, T), jnp.int32)

    def fwd(q, k, v):
        return block_sparse_attention_pallas(q, k, v, idx, block_size=bs, window=100,
                                             causal=True, scale=0.125, segment_ids=seg,
                                             backend=layout, interpret=False)

    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    assert lower(fwd, (q, k, v), platform).count(target) == 1
    assert lower(grad, (q, k, v), platform).count(target) == 3


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_per_token_selection_lowers(platform):
    """NSA's per-token selection (`query_block_size=1`: one program per query token and kv
    head, the 16 heads of its GQA group as the rows), bf16, forward (1 kernel) and forward +
    backward (3), with segment ids."""
    reason = platform_unavailable(platform)
    if reason:
        pytest.skip(reason)
    layout, target = PLATFORMS[platform]
    B, T, H, Hkv, D, bs = 1, 200, 16, 1, 64, 64
    q = jnp.zeros((B, T, H, D), jnp.bfloat16)
    k, v = (jnp.zeros((B, T, Hkv, D), jnp.bfloat16) for _ in range(2))
    idx = jnp.zeros((B, Hkv, T, 3), jnp.int32)
    seg = jnp.zeros((B, T), jnp.int32)

    def fwd(q, k, v):
        return block_sparse_attention_pallas(q, k, v, idx, block_size=bs, query_block_size=1,
                                             window=None, causal=True, scale=0.125,
                                             segment_ids=seg, backend=layout, interpret=False)

    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    assert lower(fwd, (q, k, v), platform).count(target) == 1
    assert lower(grad, (q, k, v), platform).count(target) == 3
