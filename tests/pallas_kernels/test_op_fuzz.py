"""Property-based fuzz (hypothesis) of the recurrent ops' input contract
(`pallas_kernels.common.INPUT_CONTRACT`).

Each example is one random call of `linear_attention` / `gated_delta_rule` (or of its `_step`)
with tiny shapes (B or T sometimes 0): NumPy, JAX or nested-list arrays; float32 / bfloat16 /
float16 inputs, mixed; with or without gates (per head g, per key gk -- KDA for the gated
delta rule --, either or both; decays, strong decays down to -40, positive gates up to +0.3,
zeros), initial state, packed offsets (`cu_seqlens`, int32 or int64, NumPy
or JAX, with empty sequences and dropped tail tokens), l2-norm, scale; impl "xla",
"reference" or "auto" with chunk sizes 1 to 64; called eagerly, under `jit` with the arrays
traced, or under `jit` with the arrays closed over as constants. Every call must

  * valid, finite values: return o in q's dtype and the final state (float32) equal to a
    float64 NumPy loop of the recurrence on the same (rounded) inputs, within a tolerance of
    the least precise input dtype (`test_valid_calls`);
  * valid, one NaN / +inf / -inf planted in a gate (half the calls), beta, q, k, v or the
    initial state: return, with every other sequence (batch row or packed sequence) still
    equal to the loop; a NaN gate leaves its sequence's final state NaN
    (`test_nonfinite_values`);
  * one corruption -- a wrong rank, size or dtype (int, bool, complex) of any array, zero
    heads or features, a non-array (string, dict, ragged list, None), bad offsets (B != 1,
    float, rank 2, too short, unsorted, not starting at 0, past T, negative), too many
    initial states, a bad `chunk_size` (0, negative, not a power of two, float, bool, string),
    `scale` (NaN, inf, a vector, a string, bool, complex, traced), `impl` or flag: raise a
    ValueError whose message names that argument, having compiled nothing; out-of-contract
    offsets that are traced (under jit) are not checked: the call returns
    (`test_invalid_calls`).

Nothing else: no TypeError, no error from inside JAX. Counts, derandomized (the same calls in
every run): 1,000 calls per sequence op -- 120 valid, 40 with a non-finite value, 840
corrupted -- and 400 per step function (about half valid). Not 1,000 valid calls per op: a
valid call compiles (0.2-0.8 s of CPU each on the 2-core test machine; repeated structures
hit jit's cache), so 160 valid ones per op keep this file near a minute of wall time with
two pytest workers, about 110 s of CPU. `make test` runs a sixth of each count (`FAST_SHARE`);
the full counts run under the `slow` marker (`make test-all`).
"""
from __future__ import annotations

import contextlib
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import (gated_delta_rule, gated_delta_rule_step, linear_attention,
                            linear_attention_step)

VALID_EXAMPLES = 120     # per sequence op: each compiles (0.2-0.8 s of CPU)
NONFINITE_EXAMPLES = 40  # per sequence op: valid calls with a NaN / inf planted
INVALID_EXAMPLES = 840   # per sequence op: milliseconds each
STEP_EXAMPLES = 400     # per step function, half of them valid

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
# Each test runs twice: a sixth of its examples in the fast set, all of them under `slow`.
FAST_SHARE = 6
SIZES = [pytest.param(FAST_SHARE, id="fast"),
         pytest.param(1, id="full", marks=pytest.mark.slow)]


def fuzz(body, examples: int, share: int) -> None:
    """Run `body(data)` as a hypothesis test with `examples // share` derandomized examples."""
    settings(FUZZ, max_examples=max(1, examples // share))(given(data=st.data())(body))()

OPS = {"la": linear_attention, "gdn": gated_delta_rule}
STEPS = {"la": linear_attention_step, "gdn": gated_delta_rule_step}
# (B, T, H, K, V): few shapes, so that jit's cache serves repeated structures.
SHAPES = [(1, 5, 2, 4, 3), (2, 7, 1, 2, 4), (1, 9, 1, 1, 2), (1, 5, 2, 4, 3), (2, 7, 1, 2, 4)]
EMPTY_SHAPES = [(1, 0, 1, 2, 2), (0, 3, 1, 2, 2)]
BF16 = np.dtype(jnp.bfloat16)
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
DTYPES = [(F32, F32), (F32, F32), (BF16, BF16), (BF16, F32), (F16, F16)]  # (q k v, the rest)
TOL = {F32: 2e-4, F16: 5e-3, BF16: 3e-2}
NONFINITE = (np.nan, np.inf, -np.inf)


def _seq_arrays(op):
    return (("q", "k", "v", "beta", "g", "gk") if op == "gdn" else ("q", "k", "v", "g", "gk")) + (
        "initial_state", "cu_seqlens")


# ----------------------------------------------------------------------------- the oracle
def np_recurrence(op, x, *, B, T, H, K, V, cu, scale, l2norm, step=False):
    """o [B, T, H, V] and final states [N, H, K, V] of the recurrence, token by token in float64
    NumPy, from the arrays as the op sees them (x: name -> float64 array or None)."""
    q, k = x["q"], x["k"]
    if step:  # one token, the state is given per batch row
        q, k, v = q[:, None], k[:, None], x["v"][:, None]
        gates = {n: None if x.get(n) is None else x[n][:, None] for n in ("beta", "g", "gk")}
        h0, T, spans = x["state"], 1, [(b, 0, 1, b) for b in range(B)]
        N = B
    else:
        v, h0 = x["v"], x.get("initial_state")
        gates = {n: x.get(n) for n in ("beta", "g", "gk")}
        N = B if cu is None else len(cu) - 1
        spans = ([(b, 0, T, b) for b in range(B)] if cu is None
                 else [(0, cu[n], cu[n + 1], n) for n in range(N)])
    if l2norm:
        q, k = x["q_l2"], x["k_l2"]
        if step:
            q, k = q[:, None], k[:, None]
    scale = K ** -0.5 if scale is None else scale
    o, final = np.zeros((B, T, H, V)), np.zeros((N, H, K, V))
    with np.errstate(all="ignore"):
        for b, s, e, n in spans:
            S = np.zeros((H, K, V)) if h0 is None else np.array(h0[n], np.float64)
            for t in range(s, e):
                if gates["g"] is not None:
                    S = S * np.exp(gates["g"][b, t])[:, None, None]
                if gates["gk"] is not None:
                    S = S * np.exp(gates["gk"][b, t])[:, :, None]
                if op == "la":
                    S = S + k[b, t][:, :, None] * v[b, t][:, None, :]
                else:
                    kS = np.einsum("hk,hkv->hv", k[b, t], S)
                    u = gates["beta"][b, t][:, None] * (v[b, t] - kS)
                    S = S + k[b, t][:, :, None] * u[:, None, :]
                o[b, t] = np.einsum("hk,hkv->hv", scale * q[b, t], S)
            final[n] = S
    return o, final


def _seen(x):
    """An argument as the op sees it (after `jnp.asarray`), as float64 NumPy."""
    return None if x is None else np.asarray(jnp.asarray(np.asarray(x)), np.float64)


def _l2(x, dtype):
    """The op's `l2_normalize` (in float32, rounded to x's dtype), in float64."""
    xf = np.asarray(jnp.asarray(np.asarray(x)).astype(jnp.float32), np.float64)
    with np.errstate(all="ignore"):
        y = xf / np.sqrt(np.sum(xf * xf, axis=-1, keepdims=True) + 1e-6)
    return np.asarray(jnp.asarray(y, dtype), np.float64)


# ----------------------------------------------------------------------------- calling
@functools.lru_cache(maxsize=None)
def _jitted(fn, static_items, none_names):
    """One jitted function per (op, static arguments, absent arrays): jit's own cache then
    serves every call of the same shapes and dtypes."""
    static = dict(static_items)
    return jax.jit(lambda arrays: fn(**arrays, **{n: None for n in none_names}, **static))


def _is_array(x):
    return isinstance(x, (np.ndarray, jax.Array))


def _call(fn, arrays, static, mode, cache=True):
    """fn(**arrays, **static), eagerly, under jit with the arrays traced, or under jit with
    everything closed over (NumPy arrays become constants of the trace)."""
    if mode == "eager":
        return fn(**arrays, **static)
    if mode == "closure":
        return jax.jit(lambda: fn(**arrays, **static))()
    traced = {n: x for n, x in arrays.items() if _is_array(x)}
    rest = {n: x for n, x in arrays.items() if n not in traced}
    if cache and all(x is None for x in rest.values()):
        return _jitted(fn, tuple(sorted(static.items())), tuple(sorted(rest)))(traced)
    return jax.jit(lambda t: fn(**t, **rest, **static))(traced)


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling"):
            self.names.append(msg[:100])


@contextlib.contextmanager
def _no_compiles():
    """Fails if XLA compiles anything inside (JAX logs each compilation)."""
    handler, logger = _Compiles(), logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield
    finally:
        logger.removeHandler(handler)
    assert not handler.names, f"compiled before the ValueError: {handler.names}"


# ----------------------------------------------------------------------------- drawing calls
def _container(draw, x, dtype, lists):
    """The array in the form a user might pass it: NumPy, JAX, or (if `lists`) a nested list."""
    kind = draw(st.sampled_from(["numpy", "jax", "numpy", "jax"] + (["list"] if lists else [])))
    x = np.asarray(x).astype(dtype)
    if kind == "jax":
        return jnp.asarray(x)
    return x.tolist() if kind == "list" and x.size else x  # an empty list loses its shape


def _offsets(draw, T):
    n = draw(st.integers(1, 3))
    cuts = sorted(draw(st.lists(st.integers(0, T), min_size=n, max_size=n)))
    return np.array([0] + cuts[:-1] + [cuts[-1] if draw(st.booleans()) else T], np.int64)


def _gate_values(draw, rng, shape):
    kind = draw(st.sampled_from(["decay", "decay", "strong", "positive", "zero"]))
    lo, hi = {"decay": (-1, 0), "strong": (-40, 0), "positive": (0, 0.3), "zero": (0, 0)}[kind]
    return rng.uniform(lo, hi, shape)


def draw_seq_call(draw, op):
    """(arrays, static, structure) of a valid random call of a sequence op."""
    rare_empty = draw(st.integers(0, 19)) == 11
    B, T, H, K, V = draw(st.sampled_from(EMPTY_SHAPES if rare_empty else SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    dq, dr = draw(st.sampled_from(DTYPES))
    cu = _offsets(draw, T) if B == 1 and draw(st.booleans()) else None
    N = B if cu is None else len(cu) - 1
    l2norm = op == "gdn" and draw(st.booleans())
    k = rng.standard_normal((B, T, H, K))
    if op == "gdn":  # keys of norm <= 1: (I - beta k k^T) contracts, as the delta rule expects
        k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-3)
        k = k * rng.uniform(0.2, 1.0, (B, T, H, 1))
    x = dict(q=rng.standard_normal((B, T, H, K)), k=k, v=rng.standard_normal((B, T, H, V)))
    if op == "gdn":
        x["beta"] = rng.uniform(0, 1, (B, T, H))
    if draw(st.booleans()) or op == "gdn" and draw(st.booleans()):
        x["g"] = _gate_values(draw, rng, (B, T, H))
    if draw(st.booleans()):
        x["gk"] = _gate_values(draw, rng, (B, T, H, K))
    if draw(st.booleans()):
        x["initial_state"] = rng.standard_normal((N, H, K, V))
    lists = draw(st.integers(0, 3)) == 3
    arrays = {n: _container(draw, a, dq if n in ("q", "k", "v") else dr, lists)
              for n, a in x.items()}
    if cu is not None:
        arrays["cu_seqlens"] = (jnp.asarray(cu, jnp.int32) if draw(st.booleans())
                                else cu.astype(draw(st.sampled_from([np.int32, np.int64]))))
    for n in _seq_arrays(op):
        arrays.setdefault(n, None)
    impl = draw(st.sampled_from(["xla", "reference", "xla", "reference", "auto"]))
    static = dict(impl=impl, output_final_state=draw(st.integers(0, 9)) > 0,
                  scale=draw(st.sampled_from([None, None, 0.7])))
    if impl != "reference":  # the chunk size only matters to the chunked impls
        static["chunk_size"] = draw(st.sampled_from([1, 2, 4, 16, 64]))
    if op == "gdn":
        static["use_qk_l2norm"] = l2norm
    dims = dict(B=B, T=T, H=H, K=K, V=V)
    return arrays, static, dict(dims=dims, cu=cu, N=N, dtypes=(dq, dr))


def _plant_nonfinite(draw, arrays, struct, names):
    """Put one NaN / +inf / -inf into one array (a gate in half the draws, where there is
    one); return (name, value, affected sequence)."""
    present = [n for n in names if arrays.get(n) is not None
               and np.asarray(arrays[n]).size > 0]
    gates = [n for n in present if n in ("g", "gk")]
    if gates and draw(st.booleans()):
        present = gates
    if not present:
        return None
    name = draw(st.sampled_from(present))
    value = draw(st.sampled_from(NONFINITE))
    a = np.array(np.asarray(arrays[name]))
    idx = tuple(draw(st.integers(0, d - 1)) for d in a.shape)
    a[idx] = value
    arrays[name] = jnp.asarray(a) if isinstance(arrays[name], jax.Array) else a
    if name in ("initial_state", "state"):
        return name, value, idx[0]
    b, t = idx[0], idx[1]
    cu = struct.get("cu")
    if cu is None:
        return name, value, b
    seq = int(np.searchsorted(cu[1:], t, side="right"))
    return name, value, (seq if seq < len(cu) - 1 else None)  # None: a dropped token


def _tolerance(arrays, names):
    dtypes = {np.asarray(arrays[n]).dtype if not isinstance(arrays[n], jax.Array)
              else np.dtype(arrays[n].dtype) for n in names if arrays.get(n) is not None}
    return max(TOL.get(d, TOL[F32]) for d in dtypes)


def _check_close(actual, expected, tol, what, keep=None):
    """|actual - expected| <= tol * max|expected| (+ a tiny absolute floor) where `keep`."""
    a = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    assert a.shape == expected.shape, f"{what}: shape {a.shape} != {expected.shape}"
    if keep is not None:
        a, expected = a[keep], expected[keep]
    assert np.all(np.isfinite(a)), f"{what}: not finite"
    if a.size:
        scale = max(np.max(np.abs(expected)), 1e-3)
        err = np.max(np.abs(a - expected))
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def _seq_mask(struct, affected):
    """Boolean masks (tokens [B, T], states [N]) of the sequences other than `affected`."""
    d, cu = struct["dims"], struct["cu"]
    tokens, states = np.ones((d["B"], d["T"]), bool), np.ones(struct["N"], bool)
    if affected is None:
        return tokens, states
    states[affected] = False
    if cu is None:
        tokens[affected] = False
    else:
        tokens[0, cu[affected]:cu[affected + 1]] = False
    return tokens, states


def check_valid(fn, op, arrays, static, struct, mode, planted, step=False):
    out = _call(fn, arrays, static, mode)
    d = struct["dims"]
    x = {n: _seen(a) for n, a in arrays.items() if n != "cu_seqlens"}
    q_dtype = np.dtype(jnp.asarray(np.asarray(arrays["q"])).dtype)
    if static.get("use_qk_l2norm"):
        x["q_l2"], x["k_l2"] = _l2(arrays["q"], q_dtype), _l2(arrays["k"], np.dtype(
            jnp.asarray(np.asarray(arrays["k"])).dtype))
    o_ref, s_ref = np_recurrence(op, x, **d, cu=struct["cu"], scale=static.get("scale"),
                                 l2norm=static.get("use_qk_l2norm", False), step=step)
    o, state = out
    tol = _tolerance(arrays, [n for n in arrays if n != "cu_seqlens"])
    if step:
        o_ref = o_ref[:, 0]
    else:
        assert (state is None) == (not static["output_final_state"])
    assert o.dtype == q_dtype, f"o has dtype {o.dtype}, q {q_dtype}"
    keep_o = keep_s = None
    if planted is not None:
        name, value, affected = planted
        tokens, keep_s = _seq_mask(struct, affected)
        keep_o = tokens[:, 0] if step else tokens
        if (state is not None and affected is not None and np.isnan(value)
                and name in ("g", "gk")):
            assert np.isnan(np.asarray(state[affected])).any(), "a NaN gate vanished"
    _check_close(o, o_ref, tol, "o", keep_o)
    if state is not None:
        assert state.dtype == jnp.float32
        _check_close(state, s_ref, tol, "final state", keep_s)


# ----------------------------------------------------------------------------- corruptions
def _bad_dtype(draw):
    return draw(st.sampled_from([np.int32, np.int8, np.bool_, np.complex64, np.uint8]))


def _garbage(draw, required):
    kinds = ["str", "dict", "ragged"] + (["none"] if required else [])
    kind = draw(st.sampled_from(kinds))
    return {"str": "abc", "dict": {"a": 1}, "ragged": [[1.0, 2.0], [3.0]], "none": None}[kind]


def corrupt_seq(draw, op, arrays, static, struct):
    """Apply one corruption; return (argument names the error may name, traced_ok), where
    traced_ok means: a value error that is only detectable on concrete offsets."""
    d = struct["dims"]
    B, T, H, K, V = (d[n] for n in "BTHKV")
    kind = draw(st.sampled_from(["rank", "dim", "dtype", "garbage", "zero", "offsets",
                                 "offset_values", "chunk_size", "scale", "impl", "flag",
                                 "state_rows"]))
    names = [n for n in _seq_arrays(op) if n != "cu_seqlens"]
    rng = np.random.default_rng(0)
    if kind in ("rank", "dim", "dtype", "garbage"):
        name = draw(st.sampled_from(names))
        shape = dict(q=(B, T, H, K), k=(B, T, H, K), v=(B, T, H, V), beta=(B, T, H),
                     g=(B, T, H), gk=(B, T, H, K), initial_state=(struct["N"], H, K, V))[name]
        if kind == "garbage":
            arrays[name] = _garbage(draw, name in ("q", "k", "v", "beta"))
            return {name}, False
        if kind == "rank":
            shape = shape[:-1] if draw(st.booleans()) and len(shape) > 1 else shape + (2,)
        elif kind == "dim":
            axes = range(len(shape) - 1) if name == "v" else range(len(shape))
            ax = draw(st.sampled_from(list(axes)))
            shape = shape[:ax] + (shape[ax] + draw(st.sampled_from([1, 2])),) + shape[ax + 1:]
        dtype = _bad_dtype(draw) if kind == "dtype" else np.float32
        arrays[name] = rng.standard_normal(shape).astype(dtype)
        return ({name, "k"} if name == "q" and kind != "dtype" else {name}), False
    if kind == "zero":
        dim = draw(st.sampled_from("HKV"))
        for n in names:
            a = arrays.get(n)
            if a is None or n == "initial_state":
                continue
            a = np.asarray(a)
            if dim == "H" and a.ndim >= 3:
                arrays[n] = a[:, :, :0]
            elif dim == "K" and n in ("q", "k", "gk"):
                arrays[n] = a[..., :0]
            elif dim == "V" and n == "v":
                arrays[n] = a[..., :0]
        return ({"v"} if dim == "V" else {"q"}), False
    if kind == "offsets":  # statically wrong cu_seqlens
        what = draw(st.sampled_from(["batch", "float", "rank2", "short", "garbage"]))
        if what == "batch":
            if B == 1:  # make a batch of two rows
                for n in names:
                    if arrays.get(n) is not None and n != "initial_state":
                        a = np.asarray(arrays[n])
                        arrays[n] = np.concatenate([a, a]) if a.ndim else a
            arrays["cu_seqlens"] = np.array([0, T], np.int32)
        elif what == "float":
            arrays["cu_seqlens"] = np.array([0.0, T], np.float32)
        elif what == "rank2":
            arrays["cu_seqlens"] = np.array([[0, T]], np.int32)
        elif what == "short":
            arrays["cu_seqlens"] = np.array([0], np.int32)
        else:
            arrays["cu_seqlens"] = _garbage(draw, False)
        return {"cu_seqlens"}, False
    if kind in ("offset_values", "state_rows"):  # need a packed call (B == 1)
        if B != 1:
            arrays["cu_seqlens"] = np.array([0, T], np.int32)  # B != 1
            return {"cu_seqlens"}, False
        if kind == "state_rows":
            N = struct["N"] if struct["cu"] is not None else 1
            arrays["cu_seqlens"] = (struct["cu"] if struct["cu"] is not None
                                    else np.array([0, T]))
            arrays["initial_state"] = rng.standard_normal((N + 1, H, K, V)).astype(np.float32)
            return {"initial_state"}, False
        what = draw(st.sampled_from(["unsorted", "start", "end", "negative"]))
        cu = {"unsorted": [0, T + 2, 1, T], "start": [1, T], "end": [0, T + 1],
              "negative": [0, -1, T]}[what]
        arrays["cu_seqlens"] = (jnp.asarray(cu, jnp.int32) if draw(st.booleans())
                                else np.array(cu))
        arrays["initial_state"] = None
        return {"cu_seqlens"}, True
    if kind == "chunk_size":
        static["chunk_size"] = draw(st.sampled_from(
            [0, -4, 3, 12, 2.0, True, "64", None, np.int32(6), [4]]))
        return {"chunk_size"}, False
    if kind == "scale":
        static["scale"] = draw(st.sampled_from(
            [np.nan, np.inf, -np.inf, "a", [1.0, 2.0], np.ones(2), True, 1j, "traced"]))
        return {"scale"}, False
    if kind == "impl":
        static["impl"] = draw(st.sampled_from(["cuda", None, 3, "XLA", ["xla"]]))
        return {"impl"}, False
    flag = draw(st.sampled_from(["output_final_state"] + (["use_qk_l2norm"] if op == "gdn"
                                                           else [])))
    static[flag] = draw(st.sampled_from(["yes", 2, np.array([True, False]), None]))
    return {flag}, False


def check_invalid(fn, arrays, static, mode, names, traced_ok):
    if isinstance(static.get("scale"), str) and static["scale"] == "traced":
        static = {n: v for n, v in static.items() if n != "scale"}
        traced = {n: a for n, a in arrays.items() if _is_array(a)}
        rest = {n: a for n, a in arrays.items() if n not in traced}
        call = lambda: jax.jit(lambda a, s: fn(**a, **rest, **static, scale=s))(traced, 0.5)
    else:
        call = lambda: _call(fn, arrays, static, mode, cache=False)
    if traced_ok and mode == "jit":  # traced offsets are trusted: any output, no error
        out = _call(fn, arrays, static, mode)
        q, v = np.asarray(arrays["q"]), np.asarray(arrays["v"])
        assert out[0].shape == q.shape[:-1] + v.shape[-1:]
        return
    with _no_compiles():
        with pytest.raises(ValueError) as err:
            call()
    message = str(err.value)
    assert any(f"`{n}`" in message for n in names), (
        f"the error does not name {sorted(names)}: {message}")


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("share", SIZES)
@pytest.mark.parametrize("op", ["la", "gdn"])
def test_valid_calls(op, share):
    """Valid calls with finite values: the float64 loop's result."""
    def body(data):
        draw = data.draw
        arrays, static, struct = draw_seq_call(draw, op)
        mode = draw(st.sampled_from(["jit"] * 6 + ["eager", "closure"]))
        check_valid(OPS[op], op, arrays, static, struct, mode, None)

    fuzz(body, VALID_EXAMPLES, share)


@pytest.mark.parametrize("share", SIZES)
@pytest.mark.parametrize("op", ["la", "gdn"])
def test_nonfinite_values(op, share):
    """Valid calls with one NaN / inf planted (in a gate in half the calls): they return;
    every other sequence equals the loop; a NaN gate leaves its sequence's state NaN."""
    def body(data):
        draw = data.draw
        arrays, static, struct = draw_seq_call(draw, op)
        mode = draw(st.sampled_from(["jit", "jit", "jit", "eager"]))
        planted = _plant_nonfinite(draw, arrays, struct,
                                   [n for n in _seq_arrays(op) if n != "cu_seqlens"])
        check_valid(OPS[op], op, arrays, static, struct, mode, planted)

    fuzz(body, NONFINITE_EXAMPLES, share)


@pytest.mark.parametrize("share", SIZES)
@pytest.mark.parametrize("op", ["la", "gdn"])
def test_invalid_calls(op, share):
    """Calls with one corruption: a ValueError naming the argument, nothing compiled (or, for
    out-of-contract offsets that are traced, a result)."""
    def body(data):
        draw = data.draw
        arrays, static, struct = draw_seq_call(draw, op)
        mode = draw(st.sampled_from(["jit", "eager", "closure"]))
        names, traced_ok = corrupt_seq(draw, op, arrays, static, struct)
        check_invalid(OPS[op], arrays, static, mode, names, traced_ok)

    fuzz(body, INVALID_EXAMPLES, share)


def draw_step_call(draw, op):
    B, _, H, K, V = draw(st.sampled_from(SHAPES + [(0, 1, 1, 2, 2)]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    dq, dr = draw(st.sampled_from(DTYPES))
    k = rng.standard_normal((B, H, K))
    if op == "gdn":
        k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-3)
    x = dict(q=rng.standard_normal((B, H, K)), k=k, v=rng.standard_normal((B, H, V)),
             state=rng.standard_normal((B, H, K, V)))
    if op == "gdn":
        x["beta"] = rng.uniform(0, 1, (B, H))
    if draw(st.booleans()):
        x["g"] = _gate_values(draw, rng, (B, H))
    if draw(st.booleans()):
        x["gk"] = _gate_values(draw, rng, (B, H, K))
    lists = draw(st.integers(0, 3)) == 3
    arrays = {n: _container(draw, a, dq if n in ("q", "k", "v") else dr, lists)
              for n, a in x.items()}
    for n in ("g", "gk"):
        arrays.setdefault(n, None)
    static = dict(scale=draw(st.sampled_from([None, 0.7])))
    if op == "gdn":
        static["use_qk_l2norm"] = draw(st.booleans())
    return arrays, static, dict(dims=dict(B=B, T=1, H=H, K=K, V=V), cu=None, N=B)


def corrupt_step(draw, op, arrays, static, struct):
    d = struct["dims"]
    B, H, K, V = d["B"], d["H"], d["K"], d["V"]
    names = ["q", "k", "v", "state", "g", "gk"] + (["beta"] if op == "gdn" else [])
    kind = draw(st.sampled_from(["rank", "dim", "dtype", "garbage", "scale", "flag"]))
    if kind in ("rank", "dim", "dtype", "garbage"):
        name = draw(st.sampled_from(names))
        shape = dict(q=(B, H, K), k=(B, H, K), v=(B, H, V), state=(B, H, K, V), g=(B, H),
                     beta=(B, H), gk=(B, H, K))[name]
        if kind == "garbage":
            arrays[name] = _garbage(draw, name not in ("g", "gk"))
            return {name}
        if kind == "rank":
            shape = shape[:-1] if draw(st.booleans()) else shape + (2,)
        elif kind == "dim":
            axes = range(len(shape) - 1) if name == "v" else range(len(shape))
            ax = draw(st.sampled_from(list(axes)))
            shape = shape[:ax] + (shape[ax] + 1,) + shape[ax + 1:]
        dtype = _bad_dtype(draw) if kind == "dtype" else np.float32
        arrays[name] = np.zeros(shape, dtype)
        return {name, "k"} if name == "q" and kind != "dtype" else {name}
    if kind == "scale" or op == "la":
        static["scale"] = draw(st.sampled_from([np.nan, np.inf, "a", np.ones(2), True]))
        return {"scale"}
    static["use_qk_l2norm"] = draw(st.sampled_from(["yes", 2, None]))
    return {"use_qk_l2norm"}


@pytest.mark.parametrize("share", SIZES)
@pytest.mark.parametrize("op", ["la", "gdn"])
def test_step_fuzz(op, share):
    def body(data):
        draw = data.draw
        arrays, static, struct = draw_step_call(draw, op)
        mode = draw(st.sampled_from(["jit", "eager"]))
        fn = STEPS[op]
        if draw(st.booleans()):
            planted = None
            if draw(st.integers(0, 4)) == 0:
                planted = _plant_nonfinite(draw, arrays, struct, list(arrays))
            check_valid(fn, op, arrays, static, struct, mode, planted, step=True)
        else:
            names = corrupt_step(draw, op, arrays, static, struct)
            check_invalid(fn, arrays, static, mode, names, False)

    fuzz(body, STEP_EXAMPLES, share)