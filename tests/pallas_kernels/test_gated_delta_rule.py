"""gated_delta_rule (and its decoding step) against the token-scan reference in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_delta_rule, gated_delta_rule_step
from recurrent_testing import (PACKED_N, PACKED_T, as_numpy, assert_close,
                                check_against_reference, check_packed_against_separate, spec)

IMPLS = ["xla"]  # the chunked forms checked against impl="reference"
CHUNK = 16
H, K, V = 2, 8, 12  # K != V


def np_gated_delta_rule(q, k, v, beta, g=None, scale=K ** -0.5, h0=None):
    """The recurrence as written, S = exp(g)(I − β k kᵀ) S + β k vᵀ, in float64 numpy."""
    B, T = q.shape[:2]
    S = np.zeros((B, H, K, V)) if h0 is None else np.array(h0, np.float64)
    o = np.zeros((B, T, H, V))
    for t in range(T):
        kt, b = k[:, t], beta[:, t][..., None, None]
        decay = np.ones((B, H)) if g is None else np.exp(g[:, t])
        P = np.eye(K) - b * np.einsum("bhi,bhj->bhij", kt, kt)
        S = decay[..., None, None] * (P @ S) + b * np.einsum("bhk,bhv->bhkv", kt, v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", scale * q[:, t], S)
    return o, S


def make_inputs(rng, B, T, *, g=True, h0=False, N=None, decay=(-1.0, 0.0), beta=(0.0, 1.0),
                dtype=jnp.float64):
    """Random inputs (unit-norm keys, as the delta rule expects) as a dict."""
    def normal(*shape):
        return rng.standard_normal(shape)

    k = normal(B, T, H, K)
    args = dict(q=normal(B, T, H, K), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
                v=normal(B, T, H, V), beta=rng.uniform(*beta, (B, T, H)))
    if g:
        args["g"] = rng.uniform(*decay, (B, T, H))
    args = {name: jnp.asarray(x, dtype) for name, x in args.items()}
    if h0:
        args["initial_state"] = jnp.asarray(normal(N or B, H, K, V),
                                            jnp.promote_types(dtype, jnp.float32))
    return args


@pytest.mark.parametrize("g", [True, False])
def test_reference_matches_numpy_loop(x64, rng, g):
    args = make_inputs(rng, 2, 11, g=g, h0=True)
    o, state = gated_delta_rule(**args, impl="reference", output_final_state=True)
    a = as_numpy(args)
    o_np, s_np = np_gated_delta_rule(a["q"], a["k"], a["v"], a["beta"], a.get("g"),
                                     h0=a["initial_state"])
    assert o.dtype == jnp.float64 and state.dtype == jnp.float64
    assert gated_delta_rule(**args, impl="reference")[1] is None  # output_final_state=False
    assert_close(o, o_np, 1e-12, "o")
    assert_close(state, s_np, 1e-12, "state")


def test_qk_l2norm_normalises_q_and_k_first(x64, rng):
    args = make_inputs(rng, 1, 7, h0=True)
    args["q"], args["k"] = 3 * args["q"], 0.5 * args["k"]
    o, state = gated_delta_rule(**args, use_qk_l2norm=True, impl="reference",
                                output_final_state=True)
    a = as_numpy(args)
    q, k = (a[x] / np.sqrt(np.sum(a[x] ** 2, -1, keepdims=True) + 1e-6) for x in ("q", "k"))
    o_np, s_np = np_gated_delta_rule(q, k, a["v"], a["beta"], a["g"], h0=a["initial_state"])
    assert_close(o, o_np, 1e-9, "o")
    assert_close(state, s_np, 1e-9, "state")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T, g, h0", [
    (1, True, True),
    (63, False, True),  # DeltaNet
    (65, True, False),
    (131, True, True),
])
def test_matches_reference(x64, rng, impl, T, g, h0):
    args = make_inputs(rng, 2, T, g=g, h0=h0)
    check_against_reference(gated_delta_rule, args, rng, impl=impl, tol=1e-9,
                            chunk_size=CHUNK, scale=0.3)


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_packed_sequences_match_separate_runs_under_one_compilation(x64, rng, impl):
    args = make_inputs(rng, 1, PACKED_T, h0=True, N=PACKED_N)
    check_packed_against_separate(gated_delta_rule, np_gated_delta_rule, args, ("q", "k", "v", "beta", "g"),
                                  rng, impl=impl, chunk_size=CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(x64, rng, impl):
    args = make_inputs(rng, 2, 65, h0=True, decay=(-0.3, 0.0), dtype=jnp.bfloat16)
    check_against_reference(gated_delta_rule, args, rng, impl=impl, tol=2e-2,
                            ref_dtype=jnp.float64, chunk_size=CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [(0.0, 0.0), (1.0, 1.0), "mixed"])
def test_strong_decays_and_extreme_beta(x64, rng, impl, beta):
    # Log decays down to -20 per token; β exactly 0 (no write), exactly 1 (full replacement).
    mixed = beta == "mixed"
    args = make_inputs(rng, 1, 67, h0=True, decay=(-20.0, 0.0), dtype=jnp.float32,
                       beta=(0.0, 1.0) if mixed else beta)
    if mixed:
        args["beta"] = jnp.asarray(rng.choice([0.0, 1.0], args["beta"].shape), jnp.float32)
    check_against_reference(gated_delta_rule, args, rng, impl=impl, tol=1e-4,
                            ref_dtype=jnp.float64, chunk_size=CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
def test_long_sequence_forward_is_finite(impl):
    rng = np.random.default_rng(0)
    T = 65_536
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, 1, 16)), jnp.float32) for _ in range(3))
    beta = jnp.asarray(rng.uniform(0.0, 1.0, (1, T, 1)), jnp.float32)
    for g in (None, jnp.asarray(rng.uniform(-0.1, 0.0, (1, T, 1)), jnp.float32)):
        o, state = gated_delta_rule(q, k, v, beta, g, use_qk_l2norm=True, impl=impl,
                                    output_final_state=True)
        assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(state)))


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_step_chained_equals_full_op(x64, rng, use_qk_l2norm):
    T = 9
    args = make_inputs(rng, 2, T, h0=True)
    o_full, s_full = gated_delta_rule(**args, impl="auto", chunk_size=CHUNK,
                                      output_final_state=True, use_qk_l2norm=use_qk_l2norm)
    step = jax.jit(gated_delta_rule_step, static_argnames="use_qk_l2norm")
    state = args["initial_state"]
    for t in range(T):
        o, state = step(*(args[x][:, t] for x in ("q", "k", "v", "beta", "g")), state=state,
                        use_qk_l2norm=use_qk_l2norm)
        assert_close(o, o_full[:, t], 1e-12, f"o at step {t}")
    assert_close(state, s_full, 1e-12, "state")


def test_step_keeps_dtypes(rng):
    q = jnp.asarray(rng.standard_normal((2, H, K)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, H, V)), jnp.bfloat16)
    beta = jnp.full((2, H), 0.5, jnp.bfloat16)
    o, state = gated_delta_rule_step(q, q, v, beta, state=jnp.zeros((2, H, K, V), jnp.float32))
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32


# ----------------------------------------------------------------------------- bad input
GOOD = dict(q=spec(2, 5, H, K), k=spec(2, 5, H, K), v=spec(2, 5, H, V), beta=spec(2, 5, H))


@pytest.mark.parametrize("name, bad", [
    ("q", dict(q=spec(2, 5, H * K))),
    ("k", dict(k=spec(2, 5, H, K + 1))),
    ("v", dict(v=spec(2, 5, H + 1, V))),
    ("beta", dict(beta=spec(2, 5, H, 1))),
    ("beta", dict(beta=None)),
    ("g", dict(g=spec(2, 5))),
    ("initial_state", dict(initial_state=spec(1, H, K, V))),
    ("cu_seqlens", dict(cu_seqlens=spec(3, dtype=jnp.int32))),  # B == 2
    ("cu_seqlens", dict(cu_seqlens=spec(3, dtype=jnp.float32))),
    ("chunk_size", dict(chunk_size=12)),
    ("impl", dict(impl="cuda")),
])
def test_bad_input_names_the_argument(name, bad):
    with pytest.raises(ValueError, match=f"`{name}`"):
        gated_delta_rule(**{**GOOD, **bad})


@pytest.mark.parametrize("name, bad", [
    ("k", dict(k=spec(3, H, K))),
    ("beta", dict(beta=spec(2, H, 1))),
    ("g", dict(g=spec(2, H, K))),
    ("state", dict(state=spec(1, H, K, V))),
])
def test_bad_step_input_names_the_argument(name, bad):
    good = dict(q=spec(2, H, K), k=spec(2, H, K), v=spec(2, H, V), beta=spec(2, H),
                state=spec(2, H, K, V))
    with pytest.raises(ValueError, match=f"`{name}`"):
        gated_delta_rule_step(**{**good, **bad})
