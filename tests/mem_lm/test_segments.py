"""RMT segment recurrence (mem_lm/segments.py, `ModelConfig.segments`): the scanned model
equals a plain Python loop over segments that calls the block stack on [memory; segment;
memory] and passes the memory on; gradients cross exactly `bptt` transitions at the end of the
input; causality within and across segments; packed rows with documents at segment starts equal
separate runs; named config errors; a hybrid backbone; training steps."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mem_lm import LanguageModel, ModelConfig
from mem_lm.model import Stack, apply_with_aux, init_cache

VOCAB = 18


def tiny(segments, pattern=("attn",), **kw):
    kw = {"vocab_size": VOCAB, "d_model": 16, "num_layers": 2, "num_heads": 2,
          "pattern": pattern, "segments": segments, **kw}
    return ModelConfig(**kw)


def init(cfg, T=14, seed=0):
    model = LanguageModel(cfg)
    tokens = jnp.zeros((1, T), jnp.int32)
    return model, nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens))["params"]


def loop_logits(cfg, params, tokens):
    """The oracle: segment by segment by hand, the last segment unpadded (as the reference
    splits), the block stack of the unsegmented model on [memory; segment; memory]."""
    s = cfg.segment_settings
    S, m = s["length"], s["memory_tokens"]
    E = params["embed"]["embedding"]
    stack_params = {k: v for k, v in params.items()
                    if k not in ("embed", "segment_memory", "lm_head")}
    plain = tiny(None, pattern=cfg.pattern, mixers=dict(cfg.to_dict()["mixers"]),
                 scan_layers=cfg.scan_layers, remat=cfg.remat)
    B, T = tokens.shape
    mem = jnp.broadcast_to(params["segment_memory"][None], (B, m, cfg.d_model))
    out = []
    for start in range(0, T, S):
        seg = E[tokens[:, start:start + S]]
        L = seg.shape[1]
        h = jnp.concatenate([mem, seg, mem], axis=1)
        hid, _ = Stack(plain).apply({"params": stack_params}, h,
                                    jnp.arange(2 * m + L)[None], None, None, None, {})
        head = E.T if cfg.tie_embeddings else params["lm_head"]["kernel"]
        out.append(hid[:, m:m + L] @ head)
        mem = hid[:, m + L:]
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("pattern, kw", [
    (("attn",), {}),
    (("gdn", "swa"), {"mixers": {"swa": {"window": 3}}}),
    (("gdn", "swa"), {"mixers": {"swa": {"window": 3}}, "scan_layers": True, "remat": "full"}),
])
def test_matches_plain_loop_over_segments(pattern, kw, rng):
    cfg = tiny({"kind": "rmt", "length": 4, "memory_tokens": 2, "bptt": 1}, pattern, **kw)
    model, params = init(cfg)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 14)), jnp.int32)   # 4 segments, last 2
    f = jax.jit(lambda p, t: model.apply({"params": p}, t))
    got = f(params, tokens)
    want = jax.jit(lambda p, t: loop_logits(cfg, p, t))(params, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # The memory is read: another M0 changes every segment's logits.
    other = dict(params, segment_memory=params["segment_memory"] + 1.0)
    diff = jnp.abs(f(other, tokens) - got).max(axis=(0, 2))
    assert (diff > 1e-4).all()


@pytest.mark.parametrize("bptt", [None, 0, 2])
def test_gradients_cross_exactly_bptt_transitions_at_the_end(bptt, rng):
    """d loss(segment i) / d input embeddings of segment j is nonzero iff j == i, or j < i
    and every memory transition j+1 .. i keeps its gradient (entering segment t >= n - bptt)."""
    S, n = 3, 6
    cfg = tiny({"length": S, "memory_tokens": 1, "bptt": bptt}, tie_embeddings=False)
    model, params = init(cfg, T=S * n)
    tokens = jnp.arange(S * n, dtype=jnp.int32)[None]       # token t at position t: one row each
    w = jnp.asarray(rng.standard_normal((1, S * n, VOCAB)), jnp.float32)

    def seg_losses(p):
        logits = model.apply({"params": p}, tokens)
        return jnp.sum((logits * w).reshape(n, S, VOCAB), axis=(1, 2))

    # jac[i] = d loss(segment i) / d embedding table; row t = the input at position t.
    jac = jax.jit(jax.jacrev(lambda p: seg_losses(p)))(params)["embed"]["embedding"]
    per_seg = np.abs(np.asarray(jac)).reshape(n, n, S, -1).max(axis=(2, 3))   # [i, j]
    for i in range(n):
        for j in range(n):
            kept = j == i or (j < i and (bptt is None or j + 1 >= n - bptt))
            assert (per_seg[i, j] > 0) == kept, (bptt, i, j, per_seg)
    # bptt changes gradients only, not the forward.
    full = tiny({"length": S, "memory_tokens": 1, "bptt": None}, tie_embeddings=False)
    fwd = lambda mdl: jax.jit(lambda p: mdl.apply({"params": p}, tokens))(params)
    np.testing.assert_array_equal(fwd(LanguageModel(full)), fwd(model))


def test_causal_within_and_across_segments(rng):
    cfg = tiny({"length": 4, "memory_tokens": 2}, ("gdn", "swa"),
               mixers={"swa": {"window": 3}})
    model, params = init(cfg)
    f = jax.jit(lambda t: model.apply({"params": params}, t))
    tokens = jnp.asarray(rng.integers(0, VOCAB, (1, 14)), jnp.int32)
    base = f(tokens)
    for t in (0, 2, 3, 4, 7, 8, 12):          # inside segments and at their edges
        changed = f(tokens.at[0, t + 1].set((tokens[0, t + 1] + 1) % VOCAB))
        np.testing.assert_array_equal(changed[:, :t + 1], base[:, :t + 1])
        assert jnp.abs(changed[:, t + 1] - base[:, t + 1]).max() > 0


def test_packed_rows_with_documents_at_segment_starts_equal_separate(rng):
    cfg = tiny({"length": 4, "memory_tokens": 2}, ("gdn", "swa"),
               mixers={"swa": {"window": 3}})
    model, params = init(cfg, T=12)
    f = jax.jit(lambda t, s: model.apply({"params": params}, t, segment_ids=s))
    a = jnp.asarray(rng.integers(0, VOCAB, (1, 8)), jnp.int32)
    b = jnp.asarray(rng.integers(0, VOCAB, (1, 3)), jnp.int32)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 1), jnp.int32)], axis=1)
    ids = jnp.asarray([[1] * 8 + [2] * 3 + [0]], jnp.int32)
    got = f(packed, ids)
    alone = jax.jit(lambda t: model.apply({"params": params}, t))
    np.testing.assert_allclose(got[:, :8], alone(a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[:, 8:11], alone(b), atol=1e-5, rtol=1e-5)


def test_config_errors_defaults_and_round_trip():
    base = dict(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2)
    for seg, msg in [
        ({"kind": "rmt", "length": 0}, "ModelConfig.segments.length: must be >= 1, got 0"),
        ({"length": 4, "memory_tokens": 0}, "ModelConfig.segments.memory_tokens: must be >= 1"),
        ({"length": 4, "bptt": -1}, "ModelConfig.segments.bptt: must be >= 0, got -1"),
        ({"length": 4, "bptt": 1.5}, "ModelConfig.segments.bptt: must be None (full) or an int"),
        ({"length": True}, "ModelConfig.segments.length: must be an int"),
        ({"memory_tokens": 2}, "ModelConfig.segments.length: required"),
        ({"length": 4, "kind": "armt"}, "ModelConfig.segments.kind: must be one of ('rmt',)"),
        ({"length": 4, "size": 3}, "ModelConfig.segments.size: unknown setting"),
        (7, "ModelConfig.segments: must be None or map"),
    ]:
        with pytest.raises(ValueError) as e:
            ModelConfig(**base, segments=seg)
        assert str(e.value).startswith(msg), str(e.value)
    cfg = ModelConfig(**base, segments={"length": 4})
    assert cfg.segment_settings == {"kind": "rmt", "length": 4, "memory_tokens": 10,
                                    "bptt": None}
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)
    plain = ModelConfig(**base)
    assert plain.segments is None and plain.to_dict()["segments"] is None
    old = {k: v for k, v in plain.to_dict().items() if k != "segments"}   # older checkpoints
    assert ModelConfig.from_dict(old) == plain


def test_decoding_is_not_built_and_says_so():
    cfg = tiny({"length": 4, "memory_tokens": 2})
    model, params = init(cfg)
    cache = init_cache(cfg, 1, 8)
    with pytest.raises(NotImplementedError, match="segments"):
        model.apply({"params": params}, jnp.zeros((1, 2), jnp.int32), cache=cache)


def test_trains_a_few_steps(rng):
    cfg = tiny({"length": 4, "memory_tokens": 2, "bptt": 2})
    model, params = init(cfg)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (4, 14)), jnp.int32)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss, g

    losses = []
    for _ in range(8):
        params, state, loss, g = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
    assert jnp.abs(g["segment_memory"]).max() > 0


def test_aux_outputs_average_over_segments(rng):
    """Sowed losses and metrics come out per layer, as without segments (averaged over the
    segments the scan stacks them over), under scan_layers."""
    cfg = tiny({"length": 4, "memory_tokens": 2}, ("mom",), scan_layers=True,
               mixers={"mom": {"num_memories": 2, "top_k": 1, "short_conv": False}})
    model, params = init(cfg)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (1, 14)), jnp.int32)
    _, aux = jax.jit(lambda p: apply_with_aux(model, {"params": p}, tokens))(params)
    assert list(aux["losses"]) == ["mom_load_balance"] and aux["metrics"]
    for v in jax.tree.leaves(aux):
        assert v.shape == () and np.isfinite(v)
