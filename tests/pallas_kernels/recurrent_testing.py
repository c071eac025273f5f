"""Checks shared by the recurrent-op tests (linear attention, gated delta rule)."""
import jax
import jax.numpy as jnp
import numpy as np


def assert_close(actual, expected, tol, name=""):
    """max |actual − expected| <= tol · max |expected|, and actual finite."""
    a = np.asarray(jnp.asarray(actual, jnp.float32) if actual.dtype == jnp.bfloat16 else actual,
                   np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{name}: not finite"
    if a.size == 0:
        return
    err, ref = np.max(np.abs(a - e)), max(np.max(np.abs(e)), 1e-30)
    assert err <= tol * ref, f"{name}: max error {err:.3g} > {tol:g} x max |expected| {ref:.3g}"


def as_numpy(args):
    return {name: np.asarray(x, np.float64) for name, x in args.items()}


def spec(*shape, dtype=jnp.float32):
    """A stand-in with a shape and a dtype only: input checks that touched the values
    (computed or compiled anything) would fail on it with another error than theirs."""
    return jax.ShapeDtypeStruct(shape, dtype)


def vjp_fn(op, **kwargs):
    """jit of (args, cotangents) -> ((o, state), grads of every array in args) for
    op(**args, output_final_state=True, **kwargs)."""
    def f(args, ct):
        out, pull = jax.vjp(lambda a: op(**a, output_final_state=True, **kwargs), args)
        return out, pull(ct)[0]
    return jax.jit(f)


def check_against_reference(op, args, rng, *, impl, tol, ref_dtype=None, **kwargs):
    """Output, final state and the gradient of every array in `args` (random cotangents) of
    op(..., impl=impl) equal those of impl='reference' (run in `ref_dtype` if given)."""
    ref_args = args if ref_dtype is None else jax.tree.map(lambda x: x.astype(ref_dtype), args)
    ref = vjp_fn(op, impl="reference", **kwargs)
    shapes = jax.eval_shape(lambda a: op(**a, output_final_state=True, impl="reference",
                                         **kwargs), ref_args)
    ct = [rng.standard_normal(s.shape) for s in shapes]
    (o_ref, s_ref), g_ref = ref(ref_args, _like(ct, shapes))
    shapes = jax.eval_shape(lambda a: op(**a, output_final_state=True, impl=impl, **kwargs),
                            args)
    (o, s), g = vjp_fn(op, impl=impl, **kwargs)(args, _like(ct, shapes))
    assert o.dtype == args["q"].dtype, f"o has dtype {o.dtype}, q {args['q'].dtype}"
    assert_close(o, o_ref, tol, "o")
    assert_close(s, s_ref, tol, "final state")
    for name in args:
        assert_close(g[name], g_ref[name], tol, f"d{name}")


def _like(values, shapes):
    return tuple(jnp.asarray(v, s.dtype) for v, s in zip(values, shapes))


# Boundaries off the chunk grid, an empty sequence, and 3 trailing tokens outside all (T = 53).
PACKED_T, PACKED_N = 53, 4
PACKED_OFFSETS = [np.array([0, 5, 5, 37, 50]), np.array([0, 16, 30, 31, 53])]


def check_packed_against_separate(op, np_op, args, token_args, rng, *, impl, chunk_size):
    """Packed sequences (cu_seqlens) equal each sequence run alone through the float64 numpy
    loop `np_op(*token_args sliced, h0=...)`, for two sets of offsets under ONE compilation; the
    chunked impls' gradients on packed input also match the reference."""
    run = jax.jit(lambda args, cu: op(**args, cu_seqlens=cu, impl=impl, chunk_size=chunk_size,
                                      output_final_state=True))
    a = as_numpy(args)
    for cu in PACKED_OFFSETS:
        o, state = run(args, jnp.asarray(cu, jnp.int32))
        for n in range(PACKED_N):
            s, e = cu[n], cu[n + 1]
            o_np, s_np = np_op(*(a[x][:, s:e] for x in token_args), h0=a["initial_state"][n:n + 1])
            assert_close(o[:, s:e], o_np, 1e-9, f"o of sequence {n}")
            assert_close(state[n:n + 1], s_np, 1e-9, f"state of sequence {n}")
        assert np.all(np.asarray(o[:, cu[-1]:]) == 0), "tokens past cu_seqlens[-1]"
    assert run._cache_size() == 1, "new offsets recompiled"
    if impl != "reference":
        check_against_reference(op, args, rng, impl=impl, tol=1e-9, chunk_size=chunk_size,
                                cu_seqlens=jnp.asarray(PACKED_OFFSETS[0], jnp.int32))
