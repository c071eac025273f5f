"""linear_attention (and its decoding step) against the token-scan reference in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention, linear_attention_step
from recurrent_testing import (PACKED_N, PACKED_T, as_numpy, assert_close,
                                check_against_reference, check_packed_against_separate, spec)

IMPLS = ["xla"]  # the chunked forms checked against impl="reference"
CHUNK = 16
H, K, V = 2, 8, 12  # K != V


def np_linear_attention(q, k, v, g=None, gk=None, scale=K ** -0.5, h0=None):
    """The recurrence, one token at a time in float64 numpy: an oracle independent of JAX."""
    B, T = q.shape[:2]
    S = np.zeros((B, H, K, V)) if h0 is None else np.array(h0, np.float64)
    o = np.zeros((B, T, H, V))
    for t in range(T):
        decay = np.ones((B, H, K))
        if g is not None:
            decay = decay * np.exp(g[:, t])[..., None]
        if gk is not None:
            decay = decay * np.exp(gk[:, t])
        S = decay[..., None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", scale * q[:, t], S)
    return o, S


def make_inputs(rng, B, T, *, g=False, gk=False, h0=False, N=None, decay=(-1.0, 0.0),
                dtype=jnp.float64):
    """Random inputs as a dict of the differentiable arguments."""
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    args = dict(q=normal(B, T, H, K), k=normal(B, T, H, K), v=normal(B, T, H, V))
    if g:
        args["g"] = jnp.asarray(rng.uniform(*decay, (B, T, H)), dtype)
    if gk:
        args["gk"] = jnp.asarray(rng.uniform(*decay, (B, T, H, K)), dtype)
    if h0:
        args["initial_state"] = normal(N or B, H, K, V).astype(jnp.promote_types(dtype, jnp.float32))
    return args


def test_reference_matches_numpy_loop(x64, rng):
    args = make_inputs(rng, 2, 11, g=True, gk=True, h0=True)
    o, state = linear_attention(**args, impl="reference", output_final_state=True)
    a = as_numpy(args)
    o_np, s_np = np_linear_attention(a["q"], a["k"], a["v"], a["g"], a["gk"], h0=a["initial_state"])
    assert o.dtype == jnp.float64 and state.dtype == jnp.float64
    assert linear_attention(**args, impl="reference")[1] is None  # output_final_state=False
    assert_close(o, o_np, 1e-12, "o")
    assert_close(state, s_np, 1e-12, "state")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T, g, gk, h0", [
    (1, True, True, True),
    (63, False, False, False),  # vanilla linear attention
    (65, True, False, True),    # per-head decay (RetNet / Mamba2)
    (131, False, True, True),   # per-key decay (GLA)
    (131, True, True, False),
])
def test_matches_reference(x64, rng, impl, T, g, gk, h0):
    args = make_inputs(rng, 2, T, g=g, gk=gk, h0=h0)
    check_against_reference(linear_attention, args, rng, impl=impl, tol=1e-9,
                            chunk_size=CHUNK, scale=0.3)


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_packed_sequences_match_separate_runs_under_one_compilation(x64, rng, impl):
    args = make_inputs(rng, 1, PACKED_T, g=True, gk=True, h0=True, N=PACKED_N)
    check_packed_against_separate(linear_attention, np_linear_attention, args, ("q", "k", "v", "g", "gk"),
                                  rng, impl=impl, chunk_size=CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(x64, rng, impl):
    args = make_inputs(rng, 2, 65, g=True, gk=True, h0=True, decay=(-0.3, 0.0),
                       dtype=jnp.bfloat16)
    check_against_reference(linear_attention, args, rng, impl=impl, tol=2e-2,
                            ref_dtype=jnp.float64, chunk_size=CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
def test_strong_decays_stay_finite_and_exact(x64, rng, impl):
    # Log decays down to -20 per token: exp of a within-chunk cumsum would under/overflow.
    args = make_inputs(rng, 1, 67, g=True, gk=True, h0=True, decay=(-20.0, 0.0),
                       dtype=jnp.float32)
    check_against_reference(linear_attention, args, rng, impl=impl, tol=1e-4,
                            ref_dtype=jnp.float64, chunk_size=CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
def test_long_sequence_forward_is_finite(impl):
    rng = np.random.default_rng(0)
    T = 65_536
    q, k = (jnp.asarray(rng.standard_normal((1, T, 1, 16)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((1, T, 1, 16)), jnp.float32)
    g = jnp.asarray(rng.uniform(-0.1, 0.0, (1, T, 1)), jnp.float32)
    for gate in (None, g):  # no decay: the state grows without bound, linearly
        o, state = linear_attention(q, k, v, gate, impl=impl, output_final_state=True)
        assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(state)))


def test_step_chained_equals_full_op(x64, rng):
    T = 9
    args = make_inputs(rng, 2, T, g=True, gk=True, h0=True)
    o_full, s_full = linear_attention(**args, impl="auto", chunk_size=CHUNK, output_final_state=True)
    step = jax.jit(linear_attention_step)
    state = args["initial_state"]
    for t in range(T):
        o, state = step(*(args[x][:, t] for x in ("q", "k", "v", "g", "gk")), state=state)
        assert_close(o, o_full[:, t], 1e-12, f"o at step {t}")
    assert_close(state, s_full, 1e-12, "state")


def test_step_keeps_dtypes(rng):
    q = jnp.asarray(rng.standard_normal((2, H, K)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, H, V)), jnp.bfloat16)
    o, state = linear_attention_step(q, q, v, state=jnp.zeros((2, H, K, V), jnp.float32))
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32


# ----------------------------------------------------------------------------- bad input
GOOD = dict(q=spec(2, 5, H, K), k=spec(2, 5, H, K), v=spec(2, 5, H, V))


@pytest.mark.parametrize("name, bad", [
    ("q", dict(q=spec(5, H, K))),
    ("q", dict(q=spec(2, 5, H, K, dtype=jnp.int32), k=spec(2, 5, H, K, dtype=jnp.int32))),
    ("k", dict(k=spec(2, 5, H + 1, K))),
    ("v", dict(v=spec(2, 4, H, V))),
    ("g", dict(g=spec(2, 5, H, 1))),
    ("gk", dict(gk=spec(2, 5, H))),
    ("initial_state", dict(initial_state=spec(2, H, V, K))),
    ("cu_seqlens", dict(cu_seqlens=spec(3, dtype=jnp.int32))),  # B == 2
    ("chunk_size", dict(chunk_size=48)),
    ("impl", dict(impl="triton")),
])
def test_bad_input_names_the_argument(name, bad):
    with pytest.raises(ValueError, match=f"`{name}`"):
        linear_attention(**{**GOOD, **bad})


def test_bad_packed_state_names_the_argument():
    args = dict(q=spec(1, 5, H, K), k=spec(1, 5, H, K), v=spec(1, 5, H, V),
                cu_seqlens=spec(4, dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"`initial_state`.*\(3, 2, 8, 12\)"):
        linear_attention(**args, initial_state=spec(1, H, K, V))


@pytest.mark.parametrize("name, bad", [
    ("q", dict(q=spec(2, 1, H, K))),
    ("v", dict(v=spec(3, H, V))),
    ("gk", dict(gk=spec(2, H))),
    ("state", dict(state=spec(2, H, K, K))),
])
def test_bad_step_input_names_the_argument(name, bad):
    good = dict(q=spec(2, H, K), k=spec(2, H, K), v=spec(2, H, V), state=spec(2, H, K, V))
    with pytest.raises(ValueError, match=f"`{name}`"):
        linear_attention_step(**{**good, **bad})
