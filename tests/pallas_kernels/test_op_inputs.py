"""What the recurrent ops accept (`pallas_kernels.common.INPUT_CONTRACT`): NumPy arrays, Python
and NumPy scalars and JAX arrays alike, eager or under jit; concrete offsets are checked,
traced ones are not; empty batches and sequences.

Regression (issue 11): eager calls with a NumPy `initial_state`, or with `cu_seqlens`, raised
TracerArrayConversionError from inside `lax.scan` (impl="xla": the chunk scan indexed the NumPy
state with a traced row; impl="reference": the token scan did the same with cu_seqlens).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (gated_delta_rule, gated_delta_rule_step, linear_attention,
                            linear_attention_step)

B, T, H, K, V = 1, 11, 2, 4, 3
CU = np.array([0, 4, 4, 9])  # an empty sequence and two tokens past the last offset
N = len(CU) - 1


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, H, K))
    return dict(q=rng.standard_normal((B, T, H, K)).astype(np.float32),
                k=(k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32),
                v=rng.standard_normal((B, T, H, V)).astype(np.float32),
                beta=rng.uniform(0, 1, (B, T, H)).astype(np.float32),
                g=rng.uniform(-1, 0, (B, T, H)).astype(np.float32),
                gk=rng.uniform(-1, 0, (B, T, H, K)).astype(np.float32),
                h0=rng.standard_normal((B, H, K, V)).astype(np.float32),
                h0_packed=rng.standard_normal((N, H, K, V)).astype(np.float32))


def _call(op, x, **kw):
    if op == "gdn":
        return gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"],
                                output_final_state=True, **kw)
    return linear_attention(x["q"], x["k"], x["v"], x["g"], x["gk"], output_final_state=True,
                            **kw)


def _assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["gdn", "la"])
@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("packed", [False, True], ids=["initial_state", "cu_seqlens"])
def test_eager_numpy_equals_jitted_jax(op, impl, packed):
    """Every array NumPy (offsets int64), called eagerly, equals the jitted call on JAX arrays."""
    x = _inputs()
    kw = dict(impl=impl, chunk_size=4)
    if packed:
        kw.update(initial_state=x["h0_packed"], cu_seqlens=CU)
    else:
        kw.update(initial_state=x["h0"])
    eager = _call(op, x, **kw)

    xj = {n: jnp.asarray(a) for n, a in x.items()}
    jit_kw = {n: jnp.asarray(a) for n, a in kw.items() if n in ("initial_state", "cu_seqlens")}
    if packed:
        jit_kw["cu_seqlens"] = jit_kw["cu_seqlens"].astype(jnp.int32)
    static = {n: a for n, a in kw.items() if n not in jit_kw}
    jitted = jax.jit(lambda xj, jk: _call(op, xj, **jk, **static))(xj, jit_kw)
    _assert_same(eager, jitted)
    assert eager[0].dtype == jnp.float32 and eager[1].shape == ((N if packed else B), H, K, V)
    if packed:  # tokens past the last offset give zeros
        assert np.all(np.asarray(eager[0])[:, CU[-1]:] == 0)


@pytest.mark.parametrize("op", ["gdn", "la"])
def test_numpy_constants_inside_jit(op):
    """NumPy state and offsets closed over by a jitted function (constants in the trace)."""
    x = _inputs()
    kw = dict(impl="xla", chunk_size=4, initial_state=x["h0_packed"], cu_seqlens=CU)
    _assert_same(jax.jit(lambda: _call(op, x, **kw))(), _call(op, x, **kw))


@pytest.mark.parametrize("op", ["gdn", "la"])
def test_scalars_and_lists(op):
    """NumPy / 0-d JAX scalars for `scale`, NumPy integers for `chunk_size`, nested lists for
    arrays: all accepted, same result as Python numbers and arrays."""
    x = _inputs()
    base = _call(op, x, impl="xla", chunk_size=4, scale=0.5, cu_seqlens=CU)
    _assert_same(_call(op, x, impl="xla", chunk_size=np.int64(4), scale=np.float32(0.5),
                       cu_seqlens=CU.tolist()), base)
    _assert_same(_call(op, x, impl="xla", chunk_size=4, scale=jnp.asarray(0.5),
                       cu_seqlens=jnp.asarray(CU, jnp.int32)), base)
    as_lists = {n: a.tolist() for n, a in x.items()}
    _assert_same(_call(op, as_lists, impl="xla", chunk_size=4, scale=0.5, cu_seqlens=CU), base)


@pytest.mark.parametrize("op", ["gdn", "la"])
def test_step_takes_numpy(op):
    x = {n: a[:, 0] if a.ndim > 1 and a.shape[1] == T else a for n, a in _inputs().items()}
    if op == "gdn":
        step = lambda x, state: gated_delta_rule_step(x["q"], x["k"], x["v"], x["beta"], x["g"],
                                                      state=state, scale=np.float32(0.5))
    else:
        step = lambda x, state: linear_attention_step(x["q"], x["k"], x["v"], x["g"], x["gk"],
                                                      state=state, scale=np.float32(0.5))
    eager = step(x, x["h0"])
    jitted = jax.jit(step)({n: jnp.asarray(a) for n, a in x.items()}, jnp.asarray(x["h0"]))
    _assert_same(eager, jitted)


@pytest.mark.parametrize("op", ["gdn", "la"])
@pytest.mark.parametrize("cu, what", [
    ([0, 5, 3, 9], "unsorted"), ([1, 5, 9], "not starting at 0"), ([0, 5, T + 1], "past T"),
    ([0, -1, 9], "negative"),
])
def test_concrete_offsets_are_checked(op, cu, what):
    x = _inputs()
    for offsets in (np.array(cu), jnp.asarray(cu, jnp.int32)):
        with pytest.raises(ValueError, match="`cu_seqlens`"):
            _call(op, x, impl="xla", cu_seqlens=offsets)


@pytest.mark.parametrize("op", ["gdn", "la"])
def test_traced_offsets_are_not_checked(op):
    """Under jit offsets are trusted: out-of-contract ones give some output, never an error."""
    x = _inputs()
    run = jax.jit(lambda cu: _call(op, x, impl="xla", chunk_size=4, cu_seqlens=cu))
    for cu in ([0, 5, 3, 9], [0, 5, T + 7]):
        o, state = run(jnp.asarray(cu, jnp.int32))
        assert o.shape == (B, T, H, V) and state.shape == (2 if len(cu) == 3 else 3, H, K, V)


@pytest.mark.parametrize("op", ["gdn", "la"])
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("shape", [(1, 0), (0, 5)], ids=["T=0", "B=0"])
def test_empty_batch_or_sequence(op, impl, shape):
    """No tokens: o is empty and each sequence keeps its initial state."""
    b, t = shape
    x = {n: (a[:b, :t] if n not in ("h0", "h0_packed") else a[:b]) for n, a in _inputs().items()}
    o, state = _call(op, x, impl=impl, initial_state=x["h0"])
    assert o.shape == (b, t, H, V) and o.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(state), x["h0"][:b])
    if b:  # packed: every sequence is empty
        o, state = _call(op, x, impl=impl, cu_seqlens=np.zeros(3, np.int32))
        assert o.shape == (1, 0, H, V) and np.all(np.asarray(state) == 0)


@pytest.mark.parametrize("op", ["gdn", "la"])
@pytest.mark.parametrize("dim, name", [("H", "q"), ("K", "q"), ("V", "v")])
def test_zero_heads_or_features_are_rejected(op, dim, name):
    x = _inputs()
    if dim == "H":
        for n in ("q", "k", "v", "beta", "g", "gk"):
            x[n] = x[n][:, :, :0]
    else:
        for n in ("q", "k", "gk") if dim == "K" else ("v",):
            x[n] = x[n][..., :0]
    with pytest.raises(ValueError, match=f"`{name}`"):
        _call(op, x, impl="xla")
