"""neural_memory (Titans' long-term memory) and its decoding step, in float64: the reference
against a NumPy loop of the rule, the chunked form (its hand-written custom_vjp) against the
reference (outputs, final state, every gradient), the Pallas kernels (both layouts, interpret
mode) against the chunked form and lowered for TPU and CUDA, the DeltaNet special case,
decoding, packing and input errors."""

import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (gated_delta_rule, neural_memory, neural_memory_read,
                            neural_memory_step)
from recurrent_testing import assert_close

H, K, V, E = 2, 4, 3, 5   # K != V != E


def np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_gelu_grad(x):
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def np_read_and_grad(P, k, q, v):
    """One head: M_P(q) and ∇_P ½‖M_P(k) − v‖², P = [M] or [W1, W2] (NumPy, float64)."""
    if len(P) == 1:
        return q @ P[0], [np.outer(k, k @ P[0] - v)]
    W1, W2 = P
    h = k @ W1
    e = np_gelu(h) @ W2 - v
    return np_gelu(q @ W1) @ W2, [np.outer(k, (W2 @ e) * np_gelu_grad(h)),
                                   np.outer(np_gelu(h), e)]


def np_neural_memory(q, k, v, lr, eta, alpha, P0, Z0, chunk, scale):
    """The rule as written, token by token, one batch row and head at a time."""
    B, T = q.shape[:2]
    o = np.zeros(v.shape)
    P_end, Z_end = [np.zeros_like(p) for p in P0], [np.zeros_like(p) for p in P0]
    for b in range(B):
        for h in range(H):
            P = [p[b, h].copy() for p in P0]
            Z = [z[b, h].copy() for z in Z0]
            for t in range(T):
                if t % chunk == 0:
                    P_start = [p.copy() for p in P]
                o[b, t, h], G = np_read_and_grad(P_start, k[b, t, h], scale * q[b, t, h],
                                                 v[b, t, h])
                Z = [eta[b, t, h] * z - lr[b, t, h] * g for z, g in zip(Z, G)]
                P = [(1 - alpha[b, t, h]) * p + z for p, z in zip(P, Z)]
            for i in range(len(P)):
                P_end[i][b, h], Z_end[i][b, h] = P[i], Z[i]
    return o, P_end, Z_end


def make_inputs(rng, B, T, depth, N=None, momentum=True):
    """Random inputs (unit-norm keys, θ ≤ 0.5, a non-zero initial memory and momentum)."""
    N = N or B
    n = lambda *s: rng.standard_normal(s)
    k = n(B, T, H, K)
    args = dict(q=n(B, T, H, K), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
                v=n(B, T, H, V), lr=rng.uniform(0, 0.5, (B, T, H)),
                momentum=rng.uniform(0, 1, (B, T, H)), decay=rng.uniform(0, 0.3, (B, T, H)))
    args = {name: jnp.asarray(x) for name, x in args.items()}
    shapes = [(N, H, K, V)] if depth == 1 else [(N, H, K, E), (N, H, E, V)]
    P = [jnp.asarray(0.5 * n(*s)) for s in shapes]
    Z = [jnp.asarray(0.1 * n(*s)) for s in shapes] if momentum else None
    pub = lambda t: None if t is None else (t[0] if depth == 1 else tuple(t))
    args["initial_state"] = (pub(P), pub(Z))
    return args


def leaves(state):
    return jax.tree.leaves(state)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [1, 4])
def test_reference_matches_numpy_loop(x64, rng, depth, chunk):
    """chunk 1: the online rule; chunk 4 with T = 10: two full chunks and a partial one."""
    args = make_inputs(rng, 2, 10, depth)
    o, state = neural_memory(**args, depth=depth, chunk_size=chunk, scale=0.7,
                             impl="reference", output_final_state=True)
    a = {n: np.asarray(x) for n, x in args.items() if n != "initial_state"}
    P0 = [np.asarray(x) for x in leaves(args["initial_state"][0])]
    Z0 = [np.asarray(x) for x in leaves(args["initial_state"][1])]
    o_np, P_np, Z_np = np_neural_memory(a["q"], a["k"], a["v"], a["lr"], a["momentum"],
                                        a["decay"], P0, Z0, chunk, 0.7)
    assert o.dtype == jnp.float64
    assert_close(o, o_np, 1e-12, "o")
    for x, y in zip(leaves(state), P_np + Z_np):
        assert_close(x, y, 1e-12, "state")


def test_chunk_size_changes_the_function(x64, rng):
    """chunk_size is part of the rule: chunk 4 reads the chunk-start memory, chunk 1 does not."""
    args = make_inputs(rng, 1, 6, 1)
    o1, _ = neural_memory(**args, depth=1, chunk_size=1, impl="reference")
    o4, _ = neural_memory(**args, depth=1, chunk_size=4, impl="reference")
    assert_close(o4[:, 0], o1[:, 0], 1e-12)              # the first token reads M_0 in both
    assert np.max(np.abs(np.asarray(o4[:, 1:4] - o1[:, 1:4]))) > 1e-3


def test_depth2_gradient_matches_finite_differences(x64, rng):
    """The MLP gradient the reference takes (jax.grad) and the hand-written one of the chunked
    form (chunk_math.gradient_sums) both equal central differences of the loss."""
    from pallas_kernels.neural_memory.chunk_math import gradient_sums
    from pallas_kernels.neural_memory.reference import memory_grad, memory_loss
    P = (jnp.asarray(rng.standard_normal((K, E))), jnp.asarray(rng.standard_normal((E, V))))
    k, v = jnp.asarray(rng.standard_normal(K)), jnp.asarray(rng.standard_normal(V))
    g = memory_grad(P, k, v)
    g2 = gradient_sums(P, k[None], v[None], jnp.ones((1, 1)), jnp.ones((1, 1)))[0]
    eps = 1e-6
    for i, p in enumerate(P):
        fd = np.zeros(p.shape)
        for idx in np.ndindex(p.shape):
            d = jnp.zeros(p.shape).at[idx].set(eps)
            plus = tuple(x + d if j == i else x for j, x in enumerate(P))
            minus = tuple(x - d if j == i else x for j, x in enumerate(P))
            fd[idx] = (memory_loss(plus, k, v) - memory_loss(minus, k, v)) / (2 * eps)
        assert_close(g[i], fd, 1e-7, f"grad {i}")
        assert_close(g2[i], fd, 1e-7, f"chunked grad {i}")


def test_deltanet_special_case(x64, rng):
    """depth 1, α = η = 0, chunk 1: M_t = M_{t−1} + θ_t k_t (v_t − M_{t−1}ᵀk_t)ᵀ is DeltaNet's
    S_t with β = θ (g = 0), but the read differs by one token: o_t = M_{t−1}ᵀ(scale q_t) while
    DeltaNet gives S_tᵀ(scale q_t). So with DeltaNet fed the queries shifted one step
    (q'_t = q_{t+1}), o_{t+1} = o'_t; o_0 reads the initial state; the final states agree."""
    args = make_inputs(rng, 2, 9, 1, momentum=False)
    args["momentum"] = jnp.zeros_like(args["lr"])
    args["decay"] = jnp.zeros_like(args["lr"])
    M0 = args["initial_state"][0]
    o, (M, Z) = neural_memory(**args, depth=1, chunk_size=1, scale=0.5, impl="xla",
                              output_final_state=True)
    q = args["q"]
    q_next = jnp.concatenate([q[:, 1:], q[:, :1]], axis=1)
    o_dn, S = gated_delta_rule(q_next, args["k"], args["v"], args["lr"], scale=0.5,
                               initial_state=M0, output_final_state=True, impl="reference")
    assert_close(o[:, 1:], o_dn[:, :-1], 1e-12, "o_{t+1} vs DeltaNet o'_t")
    assert_close(o[:, 0], jnp.einsum("bhk,bhkv->bhv", 0.5 * q[:, 0], M0), 1e-12, "o_0")
    assert_close(M, S, 1e-12, "final state")


def _vjp(impl, depth, chunk, cu_seqlens=None):
    def f(args, ct):
        op = lambda a: neural_memory(**a, depth=depth, chunk_size=chunk, scale=0.7, impl=impl,
                                     output_final_state=True, cu_seqlens=cu_seqlens)
        out, pull = jax.vjp(op, args)
        return out, pull(ct)[0]
    return jax.jit(f)


def check_xla_against_reference(rng, args, depth, chunk, cu_seqlens=None):
    shapes = jax.eval_shape(lambda a: neural_memory(
        **a, depth=depth, chunk_size=chunk, impl="reference", output_final_state=True,
        cu_seqlens=cu_seqlens), args)
    ct = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
    out_ref, g_ref = _vjp("reference", depth, chunk, cu_seqlens)(args, ct)
    out, g = _vjp("xla", depth, chunk, cu_seqlens)(args, ct)
    assert_close(out[0], out_ref[0], 1e-10, "o")
    for x, y in zip(leaves(out[1]), leaves(out_ref[1])):
        assert_close(x, y, 1e-10, "final state")
    for name in args:
        for x, y in zip(leaves(g[name]), leaves(g_ref[name])):
            assert_close(x, y, 1e-10, f"d{name}")


@pytest.mark.parametrize("depth, chunk, T", [(1, 1, 7), (1, 4, 10), (2, 1, 7), (2, 4, 10),
                                             (2, 16, 5)])
def test_xla_matches_reference_with_gradients(x64, rng, depth, chunk, T):
    """Outputs, final (memory, momentum) and the gradients of q, k, v, lr, momentum, decay and
    the initial memory and momentum, for random cotangents."""
    check_xla_against_reference(rng, make_inputs(rng, 2, T, depth), depth, chunk)


PACKED = dict(lengths=[3, 0, 6], T=11, chunk=4)   # 2 tokens past cu[N]


def packed_inputs(rng, depth):
    cu = jnp.asarray(np.cumsum([0] + PACKED["lengths"]), jnp.int32)
    return make_inputs(rng, 1, PACKED["T"], depth, N=len(PACKED["lengths"])), cu


@pytest.mark.parametrize("depth", [1, 2])
def test_packed_sequences_equal_separate(x64, rng, depth):
    """cu_seqlens: each sequence restarts from its own initial memory and momentum, with its
    chunks counted from its own start (lengths 3, 0, 6, chunk 4, then 2 tokens past cu[N],
    which get o = 0); the empty sequence keeps its initial state."""
    args, cu = packed_inputs(rng, depth)
    T, chunk = PACKED["T"], PACKED["chunk"]
    o, state = neural_memory(**args, depth=depth, chunk_size=chunk, cu_seqlens=cu,
                             output_final_state=True, impl="xla")
    assert_close(o[:, int(cu[-1]):], np.zeros((1, T - int(cu[-1]), H, V)), 0, "past cu[N]")
    for n, (s, e) in enumerate(zip(np.asarray(cu[:-1]), np.asarray(cu[1:]))):
        one = {name: x[:, s:e] for name, x in args.items() if name != "initial_state"}
        one["initial_state"] = jax.tree.map(lambda x: x[n:n + 1], args["initial_state"])
        o_n, state_n = neural_memory(**one, depth=depth, chunk_size=chunk, impl="reference",
                                     output_final_state=True)
        assert_close(o[:, s:e], o_n, 1e-12, f"o of sequence {n}")
        for x, y in zip(leaves(state), leaves(state_n)):
            assert_close(x[n:n + 1], y, 1e-12, f"state of sequence {n}")


@pytest.mark.parametrize("depth", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_packed_xla_matches_reference_with_gradients(x64, rng, depth):
    args, cu = packed_inputs(rng, depth)
    check_xla_against_reference(rng, args, depth, PACKED["chunk"], cu)


@pytest.mark.parametrize("depth, chunk", [(1, 1), (2, 3)])
def test_step_decoding_matches_full_op(x64, rng, depth, chunk):
    """neural_memory_step token by token (the caller refreshing chunk_memory every `chunk`
    tokens) equals neural_memory over the sequence."""
    T = 7
    args = make_inputs(rng, 2, T, depth)
    o, final = neural_memory(**args, depth=depth, chunk_size=chunk, scale=0.7, impl="xla",
                             output_final_state=True)
    state, chunk_memory = args["initial_state"], None
    step = jax.jit(lambda x, s, c: neural_memory_step(**x, depth=depth, scale=0.7, state=s,
                                                      chunk_memory=c))
    for t in range(T):
        if chunk > 1 and t % chunk == 0:
            chunk_memory = state[0]
        x = {n: args[n][:, t] for n in ("q", "k", "v", "lr", "momentum", "decay")}
        o_t, state = step(x, state, chunk_memory)
        assert_close(o_t, o[:, t], 1e-12, f"o_{t}")
    for x, y in zip(leaves(state), leaves(final)):
        assert_close(x, y, 1e-12, "state")


@pytest.mark.parametrize("depth", [1, 2])
def test_read_without_write(x64, rng, depth):
    """neural_memory_read: M(scale · q) of the given memory per row and head (the NumPy read),
    the op's read where nothing has been written yet (a chunk covering every token); named
    errors for a memory of the wrong shape."""
    args = make_inputs(rng, 2, 5, depth)
    memory = args["initial_state"][0]
    P = [np.asarray(x) for x in leaves(memory)]
    o = neural_memory_read(args["q"], memory, scale=0.7)
    ref = np.array([[[np_read_and_grad([p[b, h] for p in P], np.zeros(K), 0.7 * q_th,
                                       np.zeros(V))[0]
                      for h, q_th in enumerate(q_t)] for q_t in args["q"][b]] for b in range(2)])
    assert_close(o, ref, 1e-12, "read")
    o_op, _ = neural_memory(**args, depth=depth, chunk_size=5, scale=0.7)
    assert_close(o, o_op, 1e-12, "the op's first-chunk read")
    bad = P[0][:, :, :-1] if depth == 1 else (P[0], P[1][:, :, :-1])
    with pytest.raises(ValueError, match="`memory"):
        neural_memory_read(args["q"], bad)


def test_dtypes_numpy_inputs_and_empty(rng):
    """NumPy float32 and bfloat16 inputs: o in q's dtype, state float32; T = 0 keeps the
    initial state; momentum None means zeros."""
    args = make_inputs(rng, 1, 5, 2, momentum=False)
    np_args = {n: (x if n == "initial_state" else np.asarray(x, np.float32))
               for n, x in args.items()}
    o, (mem, mom) = neural_memory(**np_args, depth=2, chunk_size=2, output_final_state=True)
    assert o.dtype == jnp.float32 and mem[0].dtype == jnp.float32 and mom[1].dtype == jnp.float32
    bf = {n: (x if n == "initial_state" else jnp.asarray(x, jnp.bfloat16))
          for n, x in args.items()}
    o_bf, (mem_bf, _) = neural_memory(**bf, depth=2, chunk_size=2, output_final_state=True)
    assert o_bf.dtype == jnp.bfloat16 and mem_bf[0].dtype == jnp.float32
    assert_close(o_bf, o, 5e-2, "bf16 o")
    empty = {n: (x if n == "initial_state" else x[:, :0]) for n, x in np_args.items()}
    o0, (mem0, mom0) = neural_memory(**empty, depth=2, chunk_size=2, output_final_state=True)
    assert o0.shape == (1, 0, H, V)
    assert_close(mem0[1], args["initial_state"][0][1], 1e-6)
    assert_close(mom0[0], np.zeros((1, H, K, E)), 0)


def test_named_input_errors(rng):
    args = make_inputs(rng, 1, 4, 2)
    W1, W2 = args["initial_state"][0]
    cases = [
        (dict(lr=args["lr"][:, :3]), "`lr` must have shape"),
        (dict(momentum=args["momentum"][..., None]), "`momentum` must have shape"),
        (dict(initial_state=None), "`initial_state` is required"),
        (dict(initial_state=(W1, None)), r"`initial_state\[0\]` of a depth-2 memory"),
        (dict(initial_state=((W1, W2[:, :, :-1]), None)), r"`initial_state\[0\]\[1\] \(W2\)`"),
        (dict(initial_state=((W1, W2), (W1, W1))), r"`initial_state\[1\]\[1\] \(W2\)`"),
        (dict(initial_state=((W1, W2),)), "must be a pair"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            neural_memory(**{**args, **kw}, depth=2, chunk_size=2)
    with pytest.raises(ValueError, match="`depth` must be 1"):
        neural_memory(**args, depth=3, chunk_size=2)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        neural_memory(**args, depth=2, chunk_size=0)
    with pytest.raises(ValueError, match="`initial_state\\[0\\]` of a depth-1 memory"):
        neural_memory(**args, depth=1, chunk_size=2)
    with pytest.raises(ValueError, match="`state` is required"):
        neural_memory_step(*(args[n][:, 0] for n in ("q", "k", "v", "lr", "momentum",
                                                      "decay")), depth=2, state=None)
    with pytest.raises(ValueError, match="`chunk_memory`"):
        neural_memory_step(*(args[n][:, 0] for n in ("q", "k", "v", "lr", "momentum",
                                                      "decay")), depth=2,
                           state=args["initial_state"], chunk_memory=W1)


# ----------------------------------------------------------------------------- impl="pallas"
def _impl_vjp(fn, depth, chunk, cu_seqlens, **kw):
    """jitted (outputs, gradients of every input) of an impl function under random cotangents,
    the initial state in the impls' own (params, mom) tuple form."""
    def op(a):
        init = tuple(tuple(leaves(x)) for x in a["initial_state"])
        rest = {n: x for n, x in a.items() if n != "initial_state"}
        return fn(**rest, depth=depth, scale=0.7, initial_state=init, cu_seqlens=cu_seqlens,
                  chunk_size=chunk, **kw)

    def f(args, ct):
        out, pull = jax.vjp(op, args)
        return out, pull(ct)[0]
    return jax.jit(f), op


@pytest.mark.parametrize("depth, layout, chunk, packed", [
    (2, "gpu", 3, False), (2, "tpu", 1, True),
    pytest.param(1, "tpu", 4, False, marks=pytest.mark.slow),
    pytest.param(1, "gpu", 4, True, marks=pytest.mark.slow),
    pytest.param(1, "gpu", 1, False, marks=pytest.mark.slow),
    pytest.param(2, "tpu", 4, False, marks=pytest.mark.slow),
    pytest.param(1, "tpu", 4, True, marks=pytest.mark.slow),
    pytest.param(2, "gpu", 4, True, marks=pytest.mark.slow)])
def test_pallas_matches_xla_with_gradients(x64, rng, depth, layout, chunk, packed):
    """The kernels in interpret mode (TPU layout: grid over chunks, VMEM state; GPU layout:
    chunk loop) equal the chunked XLA form: o, final (memory, momentum) and the gradients of
    q, k, v, lr, momentum, decay and the initial memory and momentum. Chunks of 3 and 1 pad
    to the layout's row multiple; packed: lengths 3, 0, 6 and tokens past cu[N]."""
    from pallas_kernels.neural_memory.pallas import neural_memory_pallas
    from pallas_kernels.neural_memory.xla import neural_memory_xla
    args, cu = packed_inputs(rng, depth) if packed else (make_inputs(rng, 2, 7, depth), None)
    f_ref, op = _impl_vjp(neural_memory_xla, depth, chunk, cu)
    ct = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                      jax.eval_shape(op, args))
    out_ref, g_ref = f_ref(args, ct)
    out, g = _impl_vjp(neural_memory_pallas, depth, chunk, cu, backend=layout)[0](args, ct)
    for x, y in zip(leaves(out), leaves(out_ref)):
        assert_close(x, y, 1e-12, "outputs")
    for name in args:
        for x, y in zip(leaves(g[name]), leaves(g_ref[name])):
            assert_close(x, y, 1e-11, f"d{name}")


def test_pallas_public_dispatch_bfloat16(rng):
    """impl="pallas" through the public op (TPU layout, interpret mode on CPU) with bf16 q, k,
    v: o in bf16 and the state float32, close to the xla impl on the same inputs."""
    args = make_inputs(rng, 1, 6, 1)
    args = {n: (x if n == "initial_state" else
                jnp.asarray(x, jnp.bfloat16 if n in "qkv" else jnp.float32))
            for n, x in args.items()}
    both = jax.jit(lambda a: [neural_memory(**a, depth=1, chunk_size=4, impl=impl,
                                            output_final_state=True)
                              for impl in ("pallas", "xla")])
    (o, (mem, _)), (o_x, (mem_x, _)) = both(args)
    assert o.dtype == jnp.bfloat16 and mem.dtype == jnp.float32
    assert_close(o, o_x, 1e-2, "bf16 o")
    assert_close(mem, mem_x, 1e-5, "memory")


def test_erf_rational(x64):
    """The erf the compiled GPU kernels use (Triton has none) against lax.erf."""
    from pallas_kernels.neural_memory.chunk_math import erf_rational
    x = jnp.linspace(-6.0, 6.0, 4001)
    assert np.max(np.abs(np.asarray(erf_rational(x) - jax.lax.erf(x)))) < 1e-7
    x32 = x.astype(jnp.float32)
    assert np.max(np.abs(np.asarray(erf_rational(x32) - jax.lax.erf(x32)))) < 5e-7


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("depth, packed", [(1, True), (2, False),
                                           pytest.param(1, False, marks=pytest.mark.slow),
                                           pytest.param(2, True, marks=pytest.mark.slow)])
def test_pallas_lowers(platform, depth, packed):
    """Forward (2 kernels: the state pass and the reads) and forward + backward (4: and the
    reverse state pass and the per-chunk gradients) lower for TPU (Mosaic) and CUDA (Triton)
    from this CPU: bf16 q, k, v, K = V = 64, E = 256, chunk 8, odd length."""
    from test_pallas_lowering import PLATFORMS, lower, platform_unavailable
    from pallas_kernels.neural_memory.pallas import neural_memory_pallas
    reason = platform_unavailable(platform)
    if reason:
        pytest.skip(reason)
    layout, target = PLATFORMS[platform]
    B, T, H, K, E = 1, 100, 2, 64, 256
    cu = jnp.asarray([0, 30, 100], jnp.int32) if packed else None
    N = 2 if packed else B
    x = {n: jnp.zeros((B, T, H, K), jnp.bfloat16) for n in ("q", "k", "v")}
    x.update({n: jnp.full((B, T, H), 0.1, jnp.float32) for n in ("lr", "momentum", "decay")})
    P = ((jnp.zeros((N, H, K, K)),) if depth == 1 else
         (jnp.zeros((N, H, K, E)), jnp.zeros((N, H, E, K))))
    init = (P, P)

    def fwd(x, init):
        return neural_memory_pallas(**x, depth=depth, scale=0.125, initial_state=init,
                                    cu_seqlens=cu, chunk_size=8, backend=layout,
                                    interpret=False)

    def loss(x, init):
        o, s = fwd(x, init)
        return jnp.sum(o.astype(jnp.float32)) + sum(jnp.sum(l) for l in leaves(s))

    assert lower(fwd, (x, init), platform).count(target) == 2
    assert lower(jax.grad(loss, argnums=(0, 1)), (x, init), platform).count(target) == 4


def test_auto_is_xla_on_every_backend(rng, monkeypatch):
    """impl="auto" runs the XLA form on CPU, GPU and TPU alike (the kernels are not yet timed
    on hardware): the kernels are never called."""
    import importlib
    pallas_mod = importlib.import_module("pallas_kernels.neural_memory.pallas")

    def refuse(*a, **k):
        raise AssertionError("impl='auto' reached the Pallas kernels")

    monkeypatch.setattr(pallas_mod, "neural_memory_pallas", refuse)
    args = make_inputs(rng, 1, 3, 1)
    want, _ = neural_memory(**args, depth=1, chunk_size=2, impl="xla")
    for platform in ("cpu", "gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
        got, _ = neural_memory(**args, depth=1, chunk_size=2, impl="auto")
        assert_close(got, want, 0, f"auto on {platform}")
    with pytest.raises(AssertionError, match="Pallas kernels"):
        neural_memory(**args, depth=1, chunk_size=2, impl="pallas")


@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_custom_vjp_under_transforms(x64, rng, impl):
    """The custom_vjp of each chunked impl under vmap(grad(checkpoint)) (per-example
    gradients) and grad of a lax.scan over calls equals the reference's gradients:
    L = Σ o² + Σ final state, every input."""
    ex = [make_inputs(rng, 1, 5, 1) for _ in range(2)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *ex)

    def loss(a, impl):
        o, s = neural_memory(**a, depth=1, chunk_size=2, impl=impl, output_final_state=True)
        return jnp.sum(o ** 2) + sum(jnp.sum(x) for x in leaves(s))

    def scanned(a):
        return lax.scan(lambda c, x: (c + loss(x, impl), None), 0.0, a)[0]

    per_example = jax.jit(jax.vmap(jax.grad(jax.checkpoint(lambda a: loss(a, impl)))))(stacked)
    summed = jax.jit(jax.grad(scanned))(stacked)
    ref = jax.jit(jax.vmap(jax.grad(lambda a: loss(a, "reference"))))(stacked)
    for name in ex[0]:
        for got, got_scan, want in zip(leaves(per_example[name]), leaves(summed[name]),
                                       leaves(ref[name])):
            assert_close(got, want, 1e-11, f"vmap(grad(checkpoint)) d{name}")
            assert_close(got_scan, want, 1e-11, f"grad(scan) d{name}")
