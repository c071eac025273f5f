"""Glue layers: the short conv's cache and document masking, RoPE, RMSNorm."""
import jax
import jax.numpy as jnp
import numpy as np

from layers.common import segment_positions, segment_starts
from layers.conv import ShortConv, init_cache
from layers.rope import apply_rope


def test_short_conv_cache_and_segments(rng):
    B, T, C = 2, 9, (2, 3)
    x = jnp.asarray(rng.standard_normal((B, T) + C), jnp.float32)
    conv = ShortConv(width=4)
    params = conv.init(jax.random.PRNGKey(0), x)
    full, _ = conv.apply(params, x)
    # Prefill 5 tokens, then one at a time: the same outputs.
    cache = init_cache(B, C, 4, jnp.float32)
    y0, cache = conv.apply(params, x[:, :5], cache=cache)
    ys = [y0]
    for t in range(5, T):
        y, cache = conv.apply(params, x[:, t:t + 1], cache=cache)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, 1), full, atol=1e-6)
    # Two documents in a row: the second equals the document run alone.
    seg = jnp.asarray([[1] * 4 + [2] * 5] * B, jnp.int32)
    packed, _ = conv.apply(params, x, seg)
    alone, _ = conv.apply(params, x[:, 4:])
    np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-6)
    np.testing.assert_allclose(packed[:, :4], full[:, :4], atol=1e-6)


def test_segment_helpers():
    seg = jnp.asarray([[3, 3, 3, 0, 0, 7, 7]], jnp.int32)
    assert segment_starts(seg)[0].tolist() == [True, False, False, True, False, True, False]
    assert segment_positions(seg)[0].tolist() == [0, 1, 2, 0, 1, 0, 1]


def test_rope_is_relative(rng):
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    dot = lambda i, j: float(jnp.sum(apply_rope(q, jnp.array([[i]])) *
                                     apply_rope(k, jnp.array([[j]]))))
    np.testing.assert_allclose(dot(5, 2), dot(103, 100), rtol=1e-4)


def test_named_library_attention_kernel_still_decodes(rng):
    """attn_impl="cudnn" (or "splash") is for full-sequence calls; a decode cache passes
    explicit positions, which those kernels do not take, so generation must fall back (here on
    CPU, to the XLA path) and give exactly what attn_impl="xla" gives."""
    from mem_lm import LanguageModel, ModelConfig, generate
    prompt = jnp.asarray(rng.integers(0, 64, (1, 5)), jnp.int32)
    outs, variables = [], None
    for impl in ("xla", "cudnn"):
        cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                          pattern=("attn", "swa"), mixers={"swa": {"window": 4}},
                          attn_impl=impl)
        model = LanguageModel(cfg)
        # init runs a full forward, which cuDNN cannot serve on CPU: share the xla params.
        variables = variables or model.init(jax.random.PRNGKey(0), prompt)
        outs.append(generate(model, variables, prompt, 6))
    np.testing.assert_array_equal(outs[0], outs[1])
