"""The nsa token mixer: prefill + a chunk + decode steps (a separate per-token implementation
with its own masks) equal the full forward in float64 at lengths where every branch and the
selection by importance matter (per-token and block selection, fla's variant, short convs);
packed documents starting on block boundaries equal each document alone; the per-token
selection equals a float64 loop over the paper's rule and reaches the output; shifting every
position leaves the output unchanged; fla's naive NSA (selection and the gated branches) and
its NativeSparseAttention layer give the same as our layer in fla's settings (fixtures made by
tests/fixtures/make_fla_nsa_fixtures.py); gradients reach every parameter; bad settings name
their field."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import nsa, registry
from layers.nsa import NSA, overlap_matrix, select_blocks
from mem_lm import ModelConfig

# 10 selection blocks at T = 37: from block 4 on, a token chooses the 4th of its 4 blocks (after
# the 3 always taken) by importance among 2 or more candidates.
SMALL = dict(cmp_block=4, cmp_stride=2, sel_block=4, sel_blocks=4, window=6)
# fla's NSA: mean-pooled compression of the rotated keys, one k / v, compressed = selection
# blocks, no window branch.
FLA = dict(compression="mean", shared_kv=True, cmp_block=4, cmp_stride=4, window=0)
VARIANTS = {"paper": {}, "paper_conv": dict(use_short_conv=True), "block": dict(selection="block"),
            "fla": FLA}


def make(dtype=jnp.float64, **kw):
    return NSA(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8, init_std=0.3, dtype=dtype,
               impl="xla", **{**SMALL, **kw})


def init(layer, x, rng):
    """Random parameters of the layer's shapes (no compile of `init`'s forward)."""
    pos = jnp.arange(x.shape[1])[None]
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda x: layer.init(jax.random.PRNGKey(0), x, positions=pos), x))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        shapes)


@pytest.mark.parametrize("variant", ["paper", "fla", pytest.param("paper_conv", marks=pytest.mark.slow),
                                     pytest.param("block", marks=pytest.mark.slow)])
def test_decode_equals_full_forward(x64, rng, variant):
    B, T, T0 = 2, 37, 13
    layer = make(**VARIANTS[variant])
    x = jnp.asarray(rng.standard_normal((B, T, 16)))
    pos = jnp.arange(T)[None]
    params = init(layer, x, rng)
    full, _ = jax.jit(lambda p, x: layer.apply(p, x, positions=pos))(params, x)
    # One compile for the prefill, one for every step (a traced position).
    call = jax.jit(lambda x, cache, t: layer.apply(
        params, x, positions=t + jnp.arange(x.shape[1])[None], cache=cache, cache_pos=t))
    # A prefill (the parallel path), a chunk of the same length (steps; the same compile).
    y0, cache = call(x[:, :T0], layer.init_cache(B, T), jnp.int32(0))
    y1, cache = call(x[:, T0:2 * T0], cache, jnp.int32(T0))
    ys = [y0, y1]
    for t in range(2 * T0, T):
        y, cache = call(x[:, t:t + 1], cache, jnp.int32(t))
        ys.append(y)
    # The short convs compute in float32 (layers/conv.py): the two compiled paths may round
    # them differently.
    np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, axis=1)), np.asarray(full),
                               atol=1e-6 if variant == "paper_conv" else 1e-10)


@pytest.mark.parametrize("short_conv", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_packed_documents_on_block_boundaries(x64, rng, short_conv):
    """The middle document (6 blocks) is long enough for selection by importance."""
    T = 32
    layer = make(use_short_conv=short_conv)
    x = jnp.asarray(rng.standard_normal((1, T, 16)))
    seg = jnp.asarray([[1] * 4 + [2] * 24 + [3] * 4], jnp.int32)
    params = init(layer, x, rng)
    doc_pos = jnp.asarray([list(range(4)) + list(range(24)) + list(range(4))])
    apply = jax.jit(lambda x, pos, seg: layer.apply(params, x, positions=pos,
                                                    segment_ids=seg)[0])
    packed = apply(x, doc_pos, seg)
    # The documents alone, padded at the end to the packed length (causal: no effect).
    for s, e in ((0, 4), (4, 28), (28, 32)):
        alone = apply(jnp.pad(x[:, s:e], ((0, 0), (0, T - e + s), (0, 0))),
                      jnp.arange(T)[None], jnp.ones((1, T), jnp.int32))
        np.testing.assert_allclose(np.asarray(packed[:, s:e]), np.asarray(alone[:, :e - s]),
                                   atol=1e-10)


def selection_loop(q, kc, *, l, d, bs, n):
    """The paper's per-token selection as a float64 loop (sets of block indices per (b, kv
    head, t)): the compressed attention weights of query t on the compressed blocks that have
    ended, summed over the GQA group, spread over the selection blocks by overlap; the first,
    previous and own block always, then the most important of the other blocks up to t's."""
    q, kc = np.asarray(q, np.float64), np.asarray(kc, np.float64)
    B, T, H, D = q.shape
    M, Hkv = kc.shape[1], kc.shape[2]
    G = H // Hkv
    out = {}
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                i = t // bs
                imp = np.zeros(i + 1)
                seen = [m for m in range(M) if m * d + l - 1 <= t]
                for hq in range(h * G, (h + 1) * G):
                    if not seen:
                        continue
                    s = np.array([q[b, t, hq] @ kc[b, m, h] for m in seen]) / np.sqrt(D)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    for pm, m in zip(p, seen):
                        for j in range(i + 1):   # the share of block m's tokens inside block j
                            inside = min(m * d + l, (j + 1) * bs) - max(m * d, j * bs)
                            imp[j] += pm * max(inside, 0) / l
                forced = {0, i, max(i - 1, 0)}
                rest = sorted(set(range(i + 1)) - forced, key=lambda j: -imp[j])
                out[b, h, t] = forced | set(rest[:n - len(forced)])
    return out


def test_per_token_selection_is_the_papers(x64, rng):
    """Importance really selects: the layer's per-token selection equals the loop on random
    queries and compressed keys, and at many tokens it takes a block other than the
    lowest-numbered candidate (so importance, not position, decided)."""
    B, T, l, d, bs, n = 2, 29, 4, 2, 4, 5
    layer = make(sel_blocks=n)
    M = (T - l) // d + 1
    q = jnp.asarray(rng.standard_normal((B, T, 4, 8)))
    kc = jnp.asarray(rng.standard_normal((B, M, 2, 8)))
    ends = jnp.broadcast_to(jnp.arange(M) * d + l - 1, (B, M))
    ones = jnp.ones((B, T), jnp.int32)
    idx = jax.jit(lambda q, kc: layer._importance(q, kc, ends, ones, ones[:, :M],
                                                   0 * ones, 8 ** -0.5))(q, kc)
    want = selection_loop(q, kc, l=l, d=d, bs=bs, n=n)
    choices = by_importance = 0
    for (b, h, t), blocks in want.items():
        got = set(np.asarray(idx[b, h, t]).tolist()) - {-1}
        assert got == blocks, (b, h, t)
        i = t // bs
        if i + 1 > n:
            forced = {0, i - 1, i}
            lowest = forced | set(sorted(set(range(i + 1)) - forced)[:n - 3])
            choices += 1
            by_importance += blocks != lowest
    assert choices >= 30 and by_importance > choices // 2


def test_selection_reaches_the_output(x64, rng, monkeypatch):
    """Choosing the least important blocks instead changes the output exactly at the tokens
    that have a choice (from block 4 on), and nowhere before."""
    T = 24
    layer = make()
    x = jnp.asarray(rng.standard_normal((1, T, 16)))
    params = init(layer, x, rng)
    # A fresh trace per call, so the second one sees the patched selection.
    apply = lambda: jax.jit(lambda p: layer.apply(p, x, positions=jnp.arange(T)[None])[0])(
        params)
    y = apply()
    select = nsa.select_blocks
    monkeypatch.setattr(nsa, "select_blocks", lambda imp, *a: select(-imp, *a))
    change = np.abs(np.asarray(apply() - y)).max(axis=(0, 2))
    np.testing.assert_array_equal(change[:16], 0.0)
    assert (change[16:] > 1e-3).all()


@pytest.mark.parametrize("variant", ["paper", "fla"])
def test_shifted_positions_leave_the_output_unchanged(x64, rng, variant):
    """Every branch scores by distance only: positions shifted by 1000 give the same output
    (up to RoPE's float32 angles), compressed branch included."""
    T = 24
    layer = make(**VARIANTS[variant])
    x = jnp.asarray(rng.standard_normal((1, T, 16)))
    params = init(layer, x, rng)
    apply = jax.jit(lambda pos: layer.apply(params, x, positions=pos)[0])
    pos = jnp.arange(T)[None]
    y = apply(pos)
    np.testing.assert_allclose(np.asarray(apply(pos + 1000)), np.asarray(y), atol=2e-4)


@pytest.mark.slow
def test_gradients_reach_every_parameter(rng):
    layer = make(jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 24, 16)), jnp.float32)
    pos = jnp.arange(24)[None]
    params = init(layer, x, rng)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x, positions=pos)[0] ** 2)))(
        params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(getattr(g, "value", g))
        assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_selection_rules():
    over = overlap_matrix(M=3, NS=2, l=4, d=2, bs=4)   # blocks at tokens 0-3, 2-5, 4-7
    np.testing.assert_allclose(over, [[1, 0], [0.5, 0.5], [0, 1]])
    imp = jnp.asarray([0.0, 0.3, 0.9, 0.2, 0.5, 0.1])
    sel = jax.jit(select_blocks, static_argnums=3)
    # Query block 4: blocks 0, 3, 4 always, then the most important of the rest (2); never 5.
    np.testing.assert_array_equal(np.sort(sel(imp, 4, 0, 4)), [0, 2, 3, 4])
    np.testing.assert_array_equal(sel(imp, 0, 0, 3), [0, -1, -1])
    # A document beginning in block 2: only blocks 2..4, the local ones first.
    np.testing.assert_array_equal(sel(imp, 4, 2, 2), [4, 3])


@pytest.mark.parametrize("field, value", [("sel_block", 48), ("cmp_stride", 3),
                                          ("num_kv_heads", 3), ("window", -1),
                                          ("sel_blocks", 3), ("selection", "query"),
                                          ("compress", "max")])
def test_bad_settings_name_the_field(field, value):
    assert "nsa" in registry.names("token")
    with pytest.raises(ValueError, match=f"mixers.nsa.{field}"):
        ModelConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, pattern=("nsa",),
                    mixers={"nsa": {field: value}})


# ------------------------------------------------------------------ fla's NSA as the oracle
# Made by tests/fixtures/make_fla_nsa_fixtures.py from fla-core 0.6.0's torch references.
FLA_FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "fla")
FLA_BLOCKS = dict(FLA, cmp_block=4, cmp_stride=4, sel_block=4, sel_blocks=4)


def fla_fixture(name):
    return dict(np.load(os.path.join(FLA_FIXTURES, f"nsa_{name}.npz")))


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_selection_and_branches_match_flas_naive_nsa(packed):
    """fla's naive_nsa_topk and naive_nsa on the same q, k, v, gates (one k / v, blocks of 4,
    4 selected per token; whole, and as two packed sequences): the same blocks per token and
    kv head, and the same gated sum of the three branches with a window of 5 and without."""
    e, tag = fla_fixture("op"), "_varlen" if packed else ""
    q, k, v = (jnp.asarray(e[n]) for n in "qkv")
    T, H = q.shape[1:3]
    seg = jnp.asarray((np.arange(T) >= 8)[None].astype(np.int32)) if packed else None
    gates = jnp.stack([jnp.asarray(e[n]) for n in ("g_cmp", "g_slc", "g_swa")], -1)

    def run(window):
        layer = NSA(d_model=16, num_heads=H, num_kv_heads=k.shape[2], head_dim=8, impl="xla",
                    **dict(FLA_BLOCKS, window=window))
        o, _ = layer._forward(q, k[:, :, None], v[:, :, None], None, jnp.arange(T)[None], seg)
        return jnp.einsum("bthc,bthcd->bthd", gates, o)

    o, o_nowin = jax.jit(lambda: (run(5), run(0)))()
    np.testing.assert_allclose(np.asarray(o), e["o" + tag], atol=2e-5)
    np.testing.assert_allclose(np.asarray(o_nowin), e["o_nowin" + tag], atol=2e-5)

    layer = NSA(d_model=16, num_heads=H, num_kv_heads=k.shape[2], head_dim=8, **FLA_BLOCKS)
    doc = jnp.ones((1, T), jnp.int32) if seg is None else seg + 1
    first = jnp.where(jnp.arange(T) >= 8, 2, 0)[None] if packed else 0 * doc
    kc = k.reshape(1, T // 4, 4, *k.shape[2:]).mean(2)
    ends = jnp.arange(T // 4)[None] * 4 + 3
    idx = jax.jit(lambda: layer._importance(q, kc, ends, doc, doc[:, 3::4], first,
                                            8 ** -0.5))()
    # fla numbers a packed sequence's blocks from its own start (block 2 of the row here).
    want = e["idx" + tag][0] + np.where((np.arange(T) >= 8) & packed, 2, 0)[:, None, None]
    want = np.where(e["idx" + tag][0] < 0, -1, want)
    for t in range(T):
        for h in range(k.shape[2]):
            assert set(np.asarray(idx[0, h, t]).tolist()) == set(want[t, h].tolist()), (t, h)


def test_layer_matches_flas_native_sparse_attention():
    """fla's NativeSparseAttention layer (window_size=0; q, k, v, gate and output projections,
    RoPE) with random weights: the same output from our layer in fla's settings."""
    e = fla_fixture("layer")
    x = jnp.asarray(e["x"])
    H, D, d = 16, 8, x.shape[-1]
    Hkv = e["k_proj.weight"].shape[0] // D
    kernel = lambda name, *shape: jnp.asarray(e[f"{name}.weight"].T.reshape(shape))
    params = {"params": {"q_proj": {"kernel": kernel("q_proj", d, H, D)},
                         "k_proj": {"kernel": kernel("k_proj", d, 1, Hkv, D)},
                         "v_proj": {"kernel": kernel("v_proj", d, 1, Hkv, D)},
                         "g_proj": {"kernel": kernel("g_proj", d, H, 3)},
                         "o_proj": {"kernel": kernel("o_proj", H, D, d)}}}
    layer = NSA(d_model=d, num_heads=H, num_kv_heads=Hkv, head_dim=D, impl="xla",
                **dict(FLA_BLOCKS, window=0))
    y, _ = jax.jit(lambda p, x: layer.apply(p, x, positions=jnp.arange(x.shape[1])[None]))(
        params, x)
    np.testing.assert_allclose(np.asarray(y), e["y"], atol=2e-5)
