"""block_sparse_attention against float64 references: the dense-mask reference against a
numpy loop over queries, the blocked xla impl and the Pallas kernels (both layouts, interpret
mode) against the reference in outputs and gradients (odd lengths, windows, GQA, packed
documents, causal or not; per query block and per token), sliding-window-only against the
dense attention op, per-token selection against fla's naive NSA selection (a fixture), bf16,
and bad input."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention
from pallas_kernels.sparse_attention import block_sparse_attention
from pallas_kernels.sparse_attention.blocks import Config, block_table, transposed_table
from pallas_kernels.sparse_attention import pallas as sparse_pallas
from pallas_kernels.sparse_attention.pallas import block_sparse_attention_pallas

BS = 16


def loop_reference(q, k, v, idx, *, bs, window=None, causal=True, seg=None, qbs=None):
    """Independent float64 numpy reference, one query at a time (query blocks of `qbs`
    tokens, default bs)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    o = np.zeros((B, T, H, v.shape[-1]))
    s_pos = np.arange(T)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                listed = np.isin(s_pos // bs, np.asarray(idx)[b, h // G, t // (qbs or bs)])
                ok = listed | ((t - s_pos < window) & (s_pos <= t) if window else False)
                if causal:
                    ok &= s_pos <= t
                if seg is not None:
                    ok &= seg[b] == seg[b, t]
                if not ok.any():
                    continue
                s = k[b, ok, h // G] @ q[b, t, h] / np.sqrt(D)
                w = np.exp(s - s.max())
                o[b, t, h] = w / w.sum() @ v[b, ok, h // G]
    return o


def make_inputs(rng, B=2, T=45, H=4, Hkv=2, D=8, Dv=6, S=3, dtype=np.float64, qbs=BS):
    """q, k, v and block indices (per query block of `qbs` tokens) with −1 padding,
    out-of-range entries and a duplicate."""
    NQ, NK = -(-T // qbs), -(-T // BS)
    q = rng.standard_normal((B, T, H, D)).astype(dtype)
    k = rng.standard_normal((B, T, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, T, Hkv, Dv)).astype(dtype)
    idx = rng.integers(-1, NK + 1, (B, Hkv, NQ, S)).astype(np.int32)
    idx[..., -1] = idx[..., 0]
    return q, k, v, idx


def packed_segments(rng, B, T):
    cuts = np.sort(rng.choice(np.arange(1, T), size=(B, 2), replace=False), axis=1)
    return (np.arange(T)[None] >= cuts[:, :1]).astype(np.int32) + (
        np.arange(T)[None] >= cuts[:, 1:]) + 3


CASES = {  # name -> op keywords (segment ids drawn per test)
    "causal": dict(),
    "window_packed": dict(window=21, packed=True),
    "noncausal": dict(causal=False),
}


def _kw(rng, case, B, T):
    kw = dict(CASES[case])
    if kw.pop("packed", False):
        kw["segment_ids"] = packed_segments(rng, B, T)
    return kw


def vjp_all(fn, q, k, v, ct):
    o, pull = jax.vjp(fn, q, k, v)
    return (o,) + pull(ct)


def assert_all_close(got, want, atol, names=("o", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   atol=atol, err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_loop(x64, rng, case):
    q, k, v, idx = make_inputs(rng, B=1, T=37, H=2, Hkv=1)
    kw = _kw(rng, case, 1, 37)
    o = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, idx, block_size=BS,
                                                       impl="reference", **kw))(q, k, v)
    ref_kw = dict(kw, seg=kw.pop("segment_ids", None))
    np.testing.assert_allclose(np.asarray(o), loop_reference(q, k, v, idx, bs=BS, **ref_kw),
                               atol=1e-12)


@pytest.mark.parametrize("case", [pytest.param("causal", marks=pytest.mark.slow),
                                  pytest.param("noncausal", marks=pytest.mark.slow),
                                  "window_packed"])
def test_xla_matches_reference(x64, rng, case):
    q, k, v, idx = (jnp.asarray(a) for a in make_inputs(rng))
    kw = _kw(rng, case, 2, 45)
    ct = jnp.asarray(rng.standard_normal((2, 45, 4, 6)))

    def op(impl):
        return jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, idx, block_size=BS,
                                                              impl=impl, **kw))

    assert_all_close(vjp_all(op("xla"), q, k, v, ct), vjp_all(op("reference"), q, k, v, ct),
                     1e-12)


@pytest.mark.parametrize("layout", ["tpu", "gpu"])
def test_pallas_matches_reference(x64, rng, layout, monkeypatch):
    """One call per layout covers GQA (G = 3, not a power of two), an odd length, a window,
    packed documents, duplicates and out-of-range indices, in outputs and gradients; the GPU
    layout in two row tiles per query block."""
    monkeypatch.setattr(sparse_pallas, "GPU_ROWS", 32)
    q, k, v, idx = (jnp.asarray(a) for a in make_inputs(rng, B=1, T=45, H=6, Hkv=2, S=2))
    seg = jnp.asarray(packed_segments(rng, 1, 45))
    kw = dict(block_size=BS, window=21, causal=True, segment_ids=seg)
    ct = jnp.asarray(rng.standard_normal((1, 45, 6, 6)))
    pal = jax.jit(lambda q, k, v: block_sparse_attention_pallas(
        q, k, v, idx, scale=8 ** -0.5, backend=layout, interpret=True, **kw))
    ref = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, idx, impl="reference", **kw))
    assert_all_close(vjp_all(pal, q, k, v, ct), vjp_all(ref, q, k, v, ct), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tpu", "gpu"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pallas_cases(x64, rng, layout, case):
    q, k, v, idx = (jnp.asarray(a) for a in make_inputs(rng, B=2, T=50, H=4, Hkv=1, S=3))
    kw = _kw(rng, case, 2, 50)
    kw = dict(dict(window=None, causal=True, segment_ids=None), **kw)
    ct = jnp.asarray(rng.standard_normal((2, 50, 4, 6)))
    pal = lambda q, k, v: block_sparse_attention_pallas(
        q, k, v, idx, block_size=BS, scale=8 ** -0.5, backend=layout, interpret=True, **kw)
    ref = lambda q, k, v: block_sparse_attention(q, k, v, idx, block_size=BS,
                                                 impl="reference", **kw)
    assert_all_close(vjp_all(pal, q, k, v, ct), vjp_all(ref, q, k, v, ct), 1e-12)


def test_per_token_reference_matches_loop(x64, rng):
    """query_block_size=1 (NSA's per-token selection): every token its own list, a window and
    packed documents."""
    q, k, v, idx = make_inputs(rng, B=1, T=37, H=2, Hkv=1, qbs=1)
    seg = packed_segments(rng, 1, 37)
    o = jax.jit(lambda q, k, v: block_sparse_attention(
        q, k, v, idx, block_size=BS, query_block_size=1, window=5, segment_ids=seg,
        impl="reference"))(q, k, v)
    want = loop_reference(q, k, v, idx, bs=BS, qbs=1, window=5, seg=seg)
    np.testing.assert_allclose(np.asarray(o), want, atol=1e-12)


@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "tpu", "gpu"])
def test_per_token_matches_reference(x64, rng, impl):
    """Per-token lists through the xla impl and both Pallas layouts (interpret mode; one
    program per token and kv head, the GQA group as its rows): o, dq, dk, dv with GQA 2, an
    odd length, a window and packed documents."""
    T = 21
    q, k, v, idx = (jnp.asarray(a) for a in make_inputs(rng, B=1, T=T, H=4, Hkv=2, S=2, qbs=1))
    kw = dict(block_size=BS, query_block_size=1, window=5, causal=True,
              segment_ids=jnp.asarray(packed_segments(rng, 1, T)))
    ct = jnp.asarray(rng.standard_normal((1, T, 4, 6)))
    if impl == "xla":
        got = lambda q, k, v: block_sparse_attention(q, k, v, idx, impl="xla", **kw)
    else:
        got = lambda q, k, v: block_sparse_attention_pallas(
            q, k, v, idx, scale=8 ** -0.5, backend=impl, interpret=True, **kw)
    ref = lambda q, k, v: block_sparse_attention(q, k, v, idx, impl="reference", **kw)
    assert_all_close(vjp_all(jax.jit(got), q, k, v, ct), vjp_all(jax.jit(ref), q, k, v, ct),
                     1e-12)


@pytest.mark.slow
def test_vmap_checkpoint_scan(rng):
    """grad of checkpoint, vmapped over a leading axis and scanned over another, equals the
    reference's gradient call by call."""
    q, k, v, idx = (jnp.asarray(a) for a in make_inputs(rng, B=1, T=40, H=2, Hkv=1, S=2,
                                                         dtype=np.float32))
    stack = lambda x: jnp.stack([x, 0.5 * x])

    def grad(impl):
        op = lambda q, k, v: block_sparse_attention(q, k, v, idx, block_size=BS, window=9,
                                                    impl=impl)
        return jax.grad(lambda *a: jnp.sum(jnp.sin(jax.checkpoint(op)(*a))), argnums=(0, 1, 2))

    def scanned(q, k, v):
        return jax.lax.scan(lambda c, x: (c, jax.vmap(grad("xla"))(*x)), 0,
                            (stack(stack(q)), stack(stack(k)), stack(stack(v))))[1]

    got = jax.jit(scanned)(q, k, v)
    ref = jax.jit(grad("reference"))
    for a in range(2):
        for b in range(2):
            want = ref(*(0.5 ** (a + b) * x for x in (q, k, v)))
            for g, w in zip(got, want):
                np.testing.assert_allclose(np.asarray(g[a, b]), np.asarray(w), atol=1e-5)


def test_sliding_window_is_dense_window_attention(x64, rng):
    """No listed blocks: exactly the dense attention op with that window (and documents)."""
    q, k, v, _ = make_inputs(rng, B=2, T=45, H=4, Hkv=2, D=8, Dv=8)
    seg = jnp.asarray(packed_segments(rng, 2, 45))
    none = np.full((2, 2, 3, 0), -1, np.int32)

    o, want = jax.jit(lambda q, k, v: (
        block_sparse_attention(q, k, v, none, block_size=BS, window=20, segment_ids=seg,
                               impl="xla"),
        attention(q, k, v, window=20, segment_ids=seg, impl="reference")))(q, k, v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(want), atol=1e-12)


def test_cu_seqlens_equals_segment_ids(x64, rng):
    q, k, v, idx = make_inputs(rng, B=1, T=45)
    cu = np.array([0, 10, 30, 41], np.int32)
    seg = np.searchsorted(cu[1:], np.arange(45), side="right")[None].astype(np.int32)
    o, want = jax.jit(lambda q, k, v: [
        block_sparse_attention(q, k, v, idx, block_size=BS, window=9, impl="reference", **kw)
        for kw in (dict(cu_seqlens=cu), dict(segment_ids=seg))])(q, k, v)
    np.testing.assert_allclose(np.asarray(o)[:, :41], np.asarray(want)[:, :41], atol=1e-12)
    np.testing.assert_array_equal(np.asarray(o)[:, 41:], 0.0)  # past cu[N]


def test_block_table(x64):
    """Sorted, deduplicated (a selected window block keeps its flag), future and out-of-range
    blocks dropped, live entries first; the transposed table lists every live pair once."""
    cfg = Config(T=64, bs=16, G=1, NQ=4, L=3 + 2, causal=True, window=17, scale=1.0,
                 segments=False, acc="float64", cd="float64", out="float64")
    idx = jnp.asarray([[[[-1, 7, 3], [0, 0, 1], [2, 3, 0], [1, -1, 1]]]], jnp.int32)
    codes, count = jax.jit(block_table, static_argnums=1)(idx, cfg)
    np.testing.assert_array_equal(count[0, 0], [1, 2, 3, 3])
    np.testing.assert_array_equal(codes[0, 0],
                                  [[0, 0, 0, 0, 0], [1, 3, 3, 3, 3], [1, 2, 5, 5, 5],
                                   [3, 4, 6, 6, 6]])
    kbT, qcT, nT, start, cnt = jax.jit(transposed_table, static_argnums=2)(codes, count, cfg)
    assert int(nT[0, 0]) == 9
    np.testing.assert_array_equal(cnt[0, 0], [3, 3, 2, 1])
    np.testing.assert_array_equal(start[0, 0], [0, 3, 6, 8])
    np.testing.assert_array_equal(kbT[0, 0, :9], [0, 0, 0, 1, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(qcT[0, 0, :9], [0, 3, 5, 3, 4, 7, 5, 6, 6])


def test_bfloat16(rng):
    q, k, v, idx = make_inputs(rng, dtype=np.float32)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    o = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, idx, block_size=BS, window=9,
                                                       impl="xla"))(*bf)
    assert o.dtype == jnp.bfloat16
    want = loop_reference(*(np.asarray(a, np.float32) for a in bf), idx, bs=BS, window=9)
    np.testing.assert_allclose(np.asarray(o, np.float32), want, atol=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tpu", "gpu"])
def test_pallas_bfloat16(rng, layout):
    q, k, v, idx = make_inputs(rng, B=1, T=45, H=4, Hkv=2, S=2, dtype=np.float32)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    o = block_sparse_attention_pallas(*bf, idx, block_size=BS, window=9, causal=True,
                                      scale=8 ** -0.5, segment_ids=None, backend=layout,
                                      interpret=True)
    assert o.dtype == jnp.bfloat16
    want = loop_reference(*(np.asarray(a, np.float32) for a in bf), idx, bs=BS, window=9)
    np.testing.assert_allclose(np.asarray(o, np.float32), want, atol=3e-2)


def test_no_entries_and_empty_inputs(rng):
    q, k, v, idx = make_inputs(rng, dtype=np.float32)
    o = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, np.full_like(idx, -1),
                                                       block_size=BS, impl="xla"))(q, k, v)
    np.testing.assert_array_equal(np.asarray(o), 0.0)
    o = block_sparse_attention(q[:, :0], k[:, :0], v[:, :0], idx[:, :, :0], block_size=BS)
    assert o.shape == (2, 0, 4, 6)


@pytest.mark.parametrize("change, match", [
    (dict(q=np.zeros((2, 45, 4))), "`q` must have rank 4"),
    (dict(k=np.zeros((2, 44, 2, 8))), r"`k` must have shape \[B, T, Hkv, D\]"),
    (dict(v=np.zeros((2, 45, 3, 6))), r"`v` must have shape \[B, T, Hkv, Dv\]"),
    (dict(k=np.zeros((2, 45, 3, 8)), v=np.zeros((2, 45, 3, 6))), "multiple of k/v heads"),
    (dict(block_indices=np.zeros((2, 2, 2, 3), np.int32)), r"\(2, 2, 3, S\)"),
    (dict(block_indices=np.zeros((2, 2, 3, 3))), "`block_indices` must be an integer"),
    (dict(block_size=12), "`block_size` must be a positive power of two"),
    (dict(block_size=True), "`block_size`"),
    (dict(query_block_size=3), "`query_block_size` must be a positive power of two"),
    (dict(query_block_size=32), "`query_block_size` must be at most block_size = 16"),
    (dict(window=0), "`window` must be a positive int"),
    (dict(window=4, causal=False), "`window` needs causal"),
    (dict(segment_ids=np.zeros((2, 44), np.int32)), r"`segment_ids` must have shape \(2, 45\)"),
    (dict(segment_ids=np.zeros((2, 45))), "`segment_ids` must be an integer"),
    (dict(cu_seqlens=np.array([0, 45])), "B == 1"),
    (dict(impl="triton"), "`impl` must be one of"),
    (dict(scale=float("nan")), "`scale` must be a finite real number"),
])
def test_bad_input(rng, change, match):
    q, k, v, idx = make_inputs(rng, dtype=np.float32)
    args = dict(q=q, k=k, v=v, block_indices=idx, block_size=BS)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(**args)


def test_per_token_matches_flas_naive_nsa_selection():
    """fla's naive_nsa_selection (tests/fixtures/make_fla_nsa_fixtures.py: 32 query heads on 2
    kv heads, per-token lists of 4 blocks of 4, −1 padded, chosen by fla's naive top-k) is
    this op with query_block_size=1."""
    e = np.load(os.path.join(os.path.dirname(__file__), "..", "fixtures", "fla", "nsa_op.npz"))
    idx = np.transpose(e["idx"], (0, 2, 1, 3)).astype(np.int32)      # [B, T, H, S] -> ours
    o = jax.jit(lambda q, k, v: block_sparse_attention(
        q, k, v, idx, block_size=4, query_block_size=1, impl="xla"))(e["q"], e["k"], e["v"])
    np.testing.assert_allclose(np.asarray(o), e["o_sel"], atol=2e-5)
