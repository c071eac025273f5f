"""gated_delta_rule (and its decoding step) against the token-scan reference in float64, and
its per-key gates (gk: Kimi Delta Attention) against fla's naive KDA (tests/fixtures/fla/
kda_op.npz, made by tests/fixtures/make_fla_kda_fixtures.py)."""
import os

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


def np_gated_delta_rule(q, k, v, beta, g=None, gk=None, scale=K ** -0.5, h0=None):
    """The recurrence as written, S = (I − β k kᵀ) D S + β k vᵀ with D = exp(g) Diag(exp(gk)),
    in float64 numpy."""
    B, T = q.shape[:2]
    S = np.zeros((B, H, K, V)) if h0 is None else np.array(h0, np.float64)
    o = np.zeros((B, T, H, V))
    for t in range(T):
        kt, b = k[:, t], beta[:, t][..., None, None]
        decay = np.ones((B, H, K))
        if g is not None:
            decay = decay * np.exp(g[:, t])[..., None]
        if gk is not None:
            decay = decay * np.exp(gk[:, t])
        P = np.eye(K) - b * np.einsum("bhi,bhj->bhij", kt, kt)
        S = P @ (decay[..., None] * S) + b * np.einsum("bhk,bhv->bhkv", kt, v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", scale * q[:, t], S)
    return o, S


def make_inputs(rng, B, T, *, g=True, gk=False, h0=False, N=None, decay=(-1.0, 0.0),
                beta=(0.0, 1.0), dtype=jnp.float64):
    """Random inputs (unit-norm keys, as the delta rule expects) as a dict."""
    def normal(*shape):
        return rng.standard_normal(shape)

    k = normal(B, T, H, K)
    args = dict(q=normal(B, T, H, K), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
                v=normal(B, T, H, V), beta=rng.uniform(*beta, (B, T, H)))
    if g:
        args["g"] = rng.uniform(*decay, (B, T, H))
    if gk:
        args["gk"] = rng.uniform(*decay, (B, T, H, K))
    args = {name: jnp.asarray(x, dtype) for name, x in args.items()}
    if h0:
        args["initial_state"] = jnp.asarray(normal(N or B, H, K, V),
                                            jnp.promote_types(dtype, jnp.float32))
    return args


# Which gates a case has: g (per head), gk (per key: KDA), both, or neither (DeltaNet).
GATES = {"g": dict(g=True), "none": dict(g=False), "gk": dict(g=False, gk=True),
         "g+gk": dict(g=True, gk=True)}


@pytest.mark.parametrize("gates", sorted(GATES))
def test_reference_matches_numpy_loop(x64, rng, gates):
    args = make_inputs(rng, 2, 11, h0=True, **GATES[gates])
    o, state = gated_delta_rule(**args, impl="reference", output_final_state=True)
    a = as_numpy(args)
    o_np, s_np = np_gated_delta_rule(a["q"], a["k"], a["v"], a["beta"], a.get("g"),
                                     a.get("gk"), h0=a["initial_state"])
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
@pytest.mark.parametrize("T, gates, h0", [
    (1, "g", True),
    (63, "none", True),  # DeltaNet
    (65, "g", False),
    (131, "g", True),
    (37, "gk", True),    # KDA: chunks that do not divide T, gradients of gk and h0
    (32, "g+gk", True),  # both gates (their sum), chunks that divide T
])
def test_matches_reference(x64, rng, impl, T, gates, h0):
    args = make_inputs(rng, 2, T, h0=h0, **GATES[gates])
    check_against_reference(gated_delta_rule, args, rng, impl=impl, tol=1e-9,
                            chunk_size=CHUNK, scale=0.3)


@pytest.mark.parametrize("impl, gates", [("reference", "g"), ("xla", "g"), ("xla", "gk")])
def test_packed_sequences_match_separate_runs_under_one_compilation(x64, rng, impl, gates):
    args = make_inputs(rng, 1, PACKED_T, h0=True, N=PACKED_N, **GATES[gates])
    names = ("q", "k", "v", "beta", gates)
    np_op = lambda q, k, v, beta, gate, h0: np_gated_delta_rule(q, k, v, beta, h0=h0,
                                                                **{gates: gate})
    check_packed_against_separate(gated_delta_rule, np_op, args, names, rng, impl=impl,
                                  chunk_size=CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(x64, rng, impl):
    args = make_inputs(rng, 2, 65, h0=True, decay=(-0.3, 0.0), dtype=jnp.bfloat16)
    check_against_reference(gated_delta_rule, args, rng, impl=impl, tol=2e-2,
                            ref_dtype=jnp.float64, chunk_size=CHUNK)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta, gates", [((0.0, 0.0), "g"), ((1.0, 1.0), "g"), ("mixed", "g"),
                                         ("mixed", "gk")])
def test_strong_decays_and_extreme_beta(x64, rng, impl, beta, gates):
    # Log decays down to -20 per token (per key for gk: some keys forget at once, others keep,
    # so within-chunk decays span e^-600); β exactly 0 (no write), exactly 1 (full
    # replacement).
    mixed = beta == "mixed"
    args = make_inputs(rng, 1, 67, h0=True, decay=(-20.0, 0.0), dtype=jnp.float32,
                       beta=(0.0, 1.0) if mixed else beta, **GATES[gates])
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


@pytest.mark.parametrize("use_qk_l2norm, gates", [(False, "g"), (True, "g"), (True, "g+gk")])
def test_step_chained_equals_full_op(x64, rng, use_qk_l2norm, gates):
    T = 9
    args = make_inputs(rng, 2, T, h0=True, **GATES[gates])
    o_full, s_full = gated_delta_rule(**args, impl="auto", chunk_size=CHUNK,
                                      output_final_state=True, use_qk_l2norm=use_qk_l2norm)
    step = jax.jit(gated_delta_rule_step, static_argnames="use_qk_l2norm")
    state = args["initial_state"]
    for t in range(T):
        o, state = step(*(args[x][:, t] if x in args else None
                          for x in ("q", "k", "v", "beta", "g", "gk")), state=state,
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
    ("gk", dict(gk=spec(2, 5, H))),
    ("gk", dict(gk=spec(2, 5, H, K, dtype=jnp.int32))),
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
    ("gk", dict(gk=spec(2, H))),
    ("state", dict(state=spec(1, H, K, V))),
])
def test_bad_step_input_names_the_argument(name, bad):
    good = dict(q=spec(2, H, K), k=spec(2, H, K), v=spec(2, H, V), beta=spec(2, H),
                state=spec(2, H, K, V))
    with pytest.raises(ValueError, match=f"`{name}`"):
        gated_delta_rule_step(**{**good, **bad})


# ----------------------------------------------------------------------------- fla's KDA
FLA_KDA = os.path.join(os.path.dirname(__file__), "..", "fixtures", "fla", "kda_op.npz")


@pytest.mark.parametrize("impl", ["reference", "xla",
                                  pytest.param("pallas", marks=pytest.mark.slow)])
def test_per_key_gates_match_flas_naive_kda(impl):
    """gk is fla's KDA: float32 inputs (fla's gate on random pre-activations, an initial
    state, scale 0.3) give fla.ops.kda.naive's outputs and final state (naive_recurrent_kda;
    its naive_chunk_kda agrees) within 1e-5 relative, in float32, with chunks of 16 (dividing
    T = 32) for the chunked impls (pallas, interpret mode, under -m slow: test_pallas checks
    its kernels against the reference)."""
    f = np.load(FLA_KDA)
    o, state = gated_delta_rule(f["q"], f["k"], f["v"], f["beta"], gk=f["gk"],
                                scale=float(f["scale"]), initial_state=f["initial_state"],
                                output_final_state=True, impl=impl, chunk_size=16)
    assert o.dtype == jnp.float32
    for which in ("recurrent", "chunk"):
        assert_close(o, f[f"o_{which}"], 1e-5, f"o vs fla naive_{which}_kda")
        assert_close(state, f[f"state_{which}"], 1e-5, f"state vs fla naive_{which}_kda")
