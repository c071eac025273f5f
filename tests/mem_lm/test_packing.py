"""Packed documents are exact: a batch of rows holding several documents (segment ids) gives,
at every position, what each document gives run alone, for every token mixer, plain and with
scan_layers + remat (two mixers in `make test`, all under -m slow), on both paths of the
recurrent mixers (each row a packed row with cu_seqlens; token by token when a row holds more
documents than that path has room for); and the packing helper's offsets.

"Alone" is the model (or op) without segment ids on a batch with one document per row,
zero-padded at the end: causal, so a document's outputs do not depend on the padding after
it, and one compile serves every document of both layouts (compiles dominate this file).
"""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.common import docs_per_row, document_ids, pack_rows, step_or_chunk
from mem_lm import LanguageModel, ModelConfig
from mem_lm.config import token_mixers
from pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from pallas_kernels.linear_attention import linear_attention, linear_attention_step

T, CHUNK, VOCAB = 38, 8, 32
# Rows as (segment id, length) runs. FEW fits the packed path (at most docs_per_row(T, CHUNK)
# documents a row): odd, different lengths; a one-token document; a document inside one chunk
# (positions 3..7); an id that comes back after another id (a new document all the same);
# row 1 is one document that crosses nothing.
FEW = [[(4, 3), (9, 5), (4, 1), (9, 29)], [(2, 38)]]
# MANY has more documents in row 0 than the packed path has room for: token by token.
MANY = [[(1, 1), (2, 3), (3, 1), (4, 5), (5, 7), (6, 1), (7, 9), (8, 11)], [(1, 13), (0, 25)]]
LAYOUTS = (FEW, MANY)
ALL_ROWS = FEW + MANY     # both layouts stacked: rows of the same shape [2, T] each


def segment_ids(rows):
    return jnp.asarray([[i for i, n in row for _ in range(n)] for row in rows], jnp.int32)


def spans(rows):
    """(row, start, end) of every document."""
    out = []
    for b, row in enumerate(rows):
        s = 0
        for _, n in row:
            out.append((b, s, s + n))
            s += n
        assert s == T
    return out


def alone_batch(x, rows):
    """[n_docs, T, ...]: each document of x [B, T, ...] in its own row, zeros after it."""
    docs = spans(rows)
    out = np.zeros((len(docs),) + x.shape[1:], x.dtype)
    for i, (b, s, e) in enumerate(docs):
        out[i, :e - s] = x[b, s:e]
    return out


def assert_documents_match(packed, alone, rows, rtol=1e-5):
    """packed [B, T, ...] against alone [n_docs, T, ...], to `rtol` of the values' scale."""
    packed, alone = np.asarray(packed), np.asarray(alone)
    scale = np.abs(alone).max()
    assert scale > 0
    for i, (b, s, e) in enumerate(spans(rows)):
        err = np.abs(packed[b, s:e] - alone[i, :e - s]).max()
        assert err <= rtol * scale, f"document {i} (row {b}, {s}:{e}): {err:.2e} vs {scale:.2e}"


def test_layouts_take_both_paths():
    cap = docs_per_row(T, CHUNK)
    assert cap == 4
    assert bool(pack_rows(segment_ids(FEW), cap).fits)
    assert not bool(pack_rows(segment_ids(MANY), cap).fits)


def test_pack_rows_hand_example():
    seg = jnp.asarray([[7, 7, 7, 2, 9, 9, 9, 9, 7, 7],
                       [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                       [-1, 5, 5, 5, 5, 5, 5, 5, 5, 3]], jnp.int32)
    rows = pack_rows(seg, capacity=4)
    # A document starts at each row start and each change of id; unused offsets equal T.
    assert rows.cu_seqlens.dtype == jnp.int32
    assert rows.cu_seqlens.tolist() == [[0, 3, 4, 8, 10], [0, 10, 10, 10, 10],
                                        [0, 1, 9, 10, 10]]
    assert rows.starts[0].tolist() == [True, False, False, True, True, False, False, False,
                                       True, False]
    assert rows.starts[:, 0].all()
    assert bool(rows.fits)
    assert not bool(pack_rows(seg, capacity=3).fits)     # row 0 holds 4 documents
    assert document_ids(seg).tolist() == [[1, 1, 1, 2, 3, 3, 3, 3, 4, 4], [1] * 10,
                                          [1, 2, 2, 2, 2, 2, 2, 2, 2, 3]]


def test_pack_rows_offsets_are_traced():
    traces = []

    @jax.jit
    def offsets(seg):
        traces.append(seg.shape)
        return pack_rows(seg, capacity=3).cu_seqlens

    a = offsets(jnp.asarray([[1, 1, 2, 2, 2, 3]], jnp.int32))
    b = offsets(jnp.asarray([[4, 5, 5, 5, 5, 5]], jnp.int32))
    assert a.tolist() == [[0, 2, 5, 6]] and b.tolist() == [[0, 1, 6, 6]]
    assert len(traces) == 1


# ----------------------------------------------------------------------------- the ops
def _op_inputs(gates, B, rng):
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    H, K = 2, 8
    q, k, v = f32(B, T, H, K), f32(B, T, H, K), f32(B, T, H, K)
    if gates == "gdn":   # q, k, v, beta, g
        return (q, k, v, jax.nn.sigmoid(f32(B, T, H)), -jax.nn.softplus(f32(B, T, H)))
    if gates == "kda":   # q, k, v, beta, g, gk
        return (q, k, v, jax.nn.sigmoid(f32(B, T, H)), None, -jax.nn.softplus(f32(B, T, H, K)))
    return (q, k, v, None, -jax.nn.softplus(f32(B, T, H, K)))   # gla: q, k, v, g, gk


OPS = {"gdn": (gated_delta_rule, gated_delta_rule_step, dict(use_qk_l2norm=True)),
       "kda": (gated_delta_rule, gated_delta_rule_step, dict(use_qk_l2norm=True)),
       "gla": (linear_attention, linear_attention_step, {})}


# kda under -m slow: gdn's restart paths, its per-key gates tested by the op's own tests.
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n == "kda" else [])
                                  for n in OPS])
def test_step_or_chunk_restarts_documents_with_gradients(name, rng):
    """Outputs and the gradients of every input, through lax.cond, checkpoint and vmap, on
    both paths (one compile serves both layouts)."""
    op, step, kw = OPS[name]
    args = _op_inputs(name, len(ALL_ROWS), rng)
    ct = jnp.asarray(rng.standard_normal(args[2].shape), jnp.float32)

    @jax.jit
    @functools.partial(jax.grad, has_aux=True)
    def packed_grads(args, seg, ct):
        o, _ = step_or_chunk(op, step, *args, state=None, segment_ids=seg, impl="xla",
                             chunk_size=CHUNK, **kw)
        return jnp.sum(o * ct), o

    @jax.jit
    def alone_grads(args, ct):
        f = lambda args: op(*args, impl="xla", chunk_size=CHUNK, **kw)[0]
        o, vjp = jax.vjp(f, args)
        return o, vjp(ct)[0]

    rows = lambda x, i: None if x is None else x[2 * i:2 * i + 2]
    outs, grads = [], []
    for i, layout in enumerate(LAYOUTS):
        g, o = packed_grads(tuple(rows(x, i) for x in args), segment_ids(layout), rows(ct, i))
        grads.append(g)
        outs.append(o)
    split = lambda x: None if x is None else jnp.asarray(alone_batch(np.asarray(x), ALL_ROWS))
    o_alone, g_alone = alone_grads(tuple(map(split, args)), split(ct))
    assert_documents_match(jnp.concatenate(outs), o_alone, ALL_ROWS)
    for j, ga in enumerate(g_alone):
        if ga is not None:
            assert_documents_match(jnp.concatenate([g[j] for g in grads]), ga, ALL_ROWS)


# ----------------------------------------------------------------------------- the model
def _config(mixer, **kw):
    return ModelConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                       pattern=(mixer,), chunk_size=CHUNK,
                       mixers={"swa": {"window": 5}, "brt": {"window": 4, "state_size": 4},
                               "titans_mag": {"window": 5},
                               "titans_mac": {"segment_length": 8, "memory_chunk": 4}},
                       **{"impl": "xla", **kw})


def scanned_variables(variables, cfg, scanned_cfg):
    """The plain model's parameters in the scan_layers layout: groups/block_j holds layers
    j, j + P, ... stacked (P the group size), as mem_lm.model documents."""
    params = dict(variables["params"])
    layers = [params.pop(f"layer_{i}") for i in range(cfg.num_layers)]
    P = cfg.group_size
    params["groups"] = {f"block_{j}": jax.tree.map(lambda *x: jnp.stack(x), *layers[j::P])
                        for j in range(P)}
    want = jax.eval_shape(LanguageModel(scanned_cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 1), jnp.int32))
    chex.assert_trees_all_equal_shapes_and_dtypes({"params": params}, nn.meta.unbox(want))
    return {"params": params}


# Impls other than xla, each checked for some mixers on the plain model.
OTHER_IMPLS = {"gdn": ("reference",), "la": ("reference",)}


# scan_layers + remat is checked for these in `make test`, for the others under -m slow (the
# scanned compile is most of each case's time; the scan wraps every mixer the same way).
SCANNED_IN_MAKE_TEST = ("gdn", "swa")


def _model_cases():
    """The other mixers' cases run under -m slow: in `make test` every mixer's packed rows are
    checked against its documents alone by tests/mem_lm/test_model.py's decode-and-packing
    test (one layout, sharing that test's compile), and both layouts here through gdn and swa."""
    for m in token_mixers():
        if m in SCANNED_IN_MAKE_TEST:
            yield pytest.param(m, True, id=f"{m}-scan")
        else:
            yield pytest.param(m, False, id=m, marks=pytest.mark.slow)
            yield pytest.param(m, True, id=f"{m}-scan", marks=pytest.mark.slow)


@pytest.mark.parametrize("mixer, scan", list(_model_cases()))
def test_packed_rows_equal_documents_alone(mixer, scan, rng):
    """Packed rows (both layouts) of the plain model, with `scan` of the same weights under
    scan_layers + remat="dots", and with other impls, against the plain model on each
    document alone (one init and one reference compile serve them all)."""
    cfg = _config(mixer)
    model = LanguageModel(cfg)
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    tokens = rng.integers(0, VOCAB, (len(ALL_ROWS), T)).astype(np.int32)
    alone = jax.jit(model.apply)(variables, jnp.asarray(alone_batch(tokens, ALL_ROWS)))
    variants = {"plain": (cfg, variables)}
    if scan:
        scanned = _config(mixer, scan_layers=True, remat="dots")
        variants["scan_remat"] = (scanned, scanned_variables(variables, cfg, scanned))
    for impl in OTHER_IMPLS.get(mixer, ()):
        variants[impl] = (_config(mixer, impl=impl), variables)
    for name, (c, v) in variants.items():
        packed = jax.jit(LanguageModel(c).apply)
        logits = [packed(v, jnp.asarray(tokens[2 * i:2 * i + 2]),
                         segment_ids=segment_ids(layout)) for i, layout in enumerate(LAYOUTS)]
        try:
            assert_documents_match(jnp.concatenate(logits), alone, ALL_ROWS)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
