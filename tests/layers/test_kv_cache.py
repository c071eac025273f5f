"""The cascading KV cache (layers/kv_cache.py) against a slow Python simulation of the policy
written from its description: lists for the FIFOs, a pending slot per later cascade, numpy
float64 attention. Outputs at every step and the positions kept at the end must agree."""
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.kv_cache import cascade_attention, cascade_layout, init_cascade_cache


class Policy:
    """One batch row's cache, token by token."""

    def __init__(self, sinks, cascades, per, decay, sink_logits=None):
        self.S, self.C, self.N, self.decay = sinks, cascades, per, decay
        self.sink_logits = sink_logits
        self.sinks, self.fifos = [], [deque() for _ in range(cascades)]
        self.pending = [None] * (cascades - 1)
        self.margins = []        # |score difference| of every pair decided

    def entries(self):
        return (self.sinks + [e for f in self.fifos for e in f]
                + [e for e in self.pending if e is not None])

    def step(self, q, k, v, t):
        """q [H, D], k, v [Hkv, D] -> o [H, D]; then the token enters."""
        H, D = q.shape
        G = H // k.shape[0]
        ents = self.entries()
        keys = np.stack([e["k"] for e in ents] + [k])          # [n, Hkv, D]
        vals = np.stack([e["v"] for e in ents] + [v])
        o, mass = np.zeros((H, D)), np.zeros(len(keys))
        for h in range(H):
            s = keys[:, h // G] @ q[h] / np.sqrt(D)
            z = np.exp(s - s.max())
            denom = z.sum()
            if self.sink_logits is not None:
                denom += np.exp(self.sink_logits[h] - s.max())
            p = z / denom
            o[h] = p @ vals[:, h // G]
            mass += p
        for e, m in zip(ents, mass[:-1]):
            e["score"] = self.decay * e["score"] + m
        item = {"k": k, "v": v, "pos": t, "score": mass[-1]}
        if t < self.S:
            self.sinks.append(item)
            return o
        for c in range(self.C):
            fifo = self.fifos[c]
            if len(fifo) < self.N:
                fifo.append(item)
                return o
            evicted = fifo.popleft()
            fifo.append(item)
            if c == self.C - 1:
                return o
            if self.pending[c] is None:
                self.pending[c] = evicted
                return o
            waiting, self.pending[c] = self.pending[c], None
            self.margins.append(abs(evicted["score"] - waiting["score"]))
            item = evicted if evicted["score"] > waiting["score"] else waiting
        return o

    def positions(self):
        return sorted(e["pos"] for e in self.entries())


def simulate(q, k, v, sinks, cascades, per, decay, sink_logits=None):
    out, kept, margins = np.zeros(q.shape), [], []
    for b in range(q.shape[0]):
        pol = Policy(sinks, cascades, per, decay, sink_logits)
        for t in range(q.shape[1]):
            out[b, t] = pol.step(q[b, t], k[b, t], v[b, t], t)
        kept.append(pol.positions())
        margins += pol.margins
    return out, kept, margins


def kept_positions(cache):
    return [sorted(int(p) for p in row if p >= 0) for row in np.asarray(cache["pos"])]


# One cascade (sliding window + sinks) is also checked in make test against the swa forward
# (test_attention_layer_with_a_cascading_cache); its simulation case runs under -m slow.
@pytest.mark.parametrize("cascades, use_sinks",
                         [(3, True), pytest.param(1, False, marks=pytest.mark.slow)])
def test_matches_python_simulation_float64(x64, rng, cascades, use_sinks):
    """Two rows with different data (their choices differ), GQA, learned sink logits; the
    tokens fed in two calls (a prompt, then the rest) as prefill + decode would."""
    B, T, H, Hkv, D, S, size, decay = 2, 41, 4, 2, 8, 2, 14, 0.9
    per = cascade_layout(size, S, cascades)
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, Hkv, D))
    v = rng.standard_normal((B, T, Hkv, D))
    sink_logits = rng.standard_normal(H) if use_sinks else None
    want, kept, margins = simulate(q, k, v, S, cascades, per, decay, sink_logits)
    if cascades > 1:
        # Every pair was decided by a clear margin, so float rounding cannot flip a choice.
        assert len(margins) > 10 and min(margins) > 1e-6
    cache = init_cascade_cache(B, size, Hkv, D, sinks=S, cascades=cascades, dtype=jnp.float64)
    run = jax.jit(lambda q, k, v, c, start: cascade_attention(
        q, k, v, c, start, sinks=S, score_decay=decay,
        sink_logits=None if sink_logits is None else jnp.asarray(sink_logits)))
    cut = 17
    o1, cache = run(q[:, :cut], k[:, :cut], v[:, :cut], cache, 0)
    o2, cache = run(q[:, cut:], k[:, cut:], v[:, cut:], cache, cut)
    np.testing.assert_allclose(np.concatenate([o1, o2], 1), want, rtol=1e-10, atol=1e-12)
    assert kept_positions(cache) == kept
    if cascades == 1:
        # One cascade is the sliding window with sinks: the first S and the last `per`.
        assert kept == [list(range(S)) + list(range(T - per, T))] * B
    else:
        assert kept[0] != kept[1]                   # rows choose by their own scores
        # The same slots reach further back than the window: one of every 2^c in cascade c.
        assert min(p for p in kept[0] if p >= S) < T - size


def test_layout_errors_and_sizes():
    assert cascade_layout(14, 2, 3) == 3            # 2 sinks + 3·3 + 2 pending = 13 of 14
    with pytest.raises(ValueError, match="cannot hold"):
        cascade_layout(5, 4, 2)


def _model(pattern, **settings):
    from mem_lm import LanguageModel, ModelConfig
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, pattern=pattern,
                      mixers={"attn": settings, "swa": {"window": 6}})
    model = LanguageModel(cfg)
    return cfg, model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


def _streamed(cfg, model, variables, tokens, cut):
    """Logits of a prefill of tokens[:, :cut], then one decode step per token."""
    from mem_lm import decode_step, init_cache
    first, cache = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))(
        variables, tokens[:, :cut], init_cache(cfg, tokens.shape[0], tokens.shape[1]))
    logits = [first]
    for t in range(cut, tokens.shape[1]):
        step, cache = decode_step(model, variables, tokens[:, t], cache)
        logits.append(step[:, None])
    return jnp.concatenate(logits, 1)


def test_attention_layer_with_a_cascading_cache(rng):
    """In the model, through prefill + decode: a cache that evicts nothing is full attention
    (the forward without a cache); one cascade without sinks keeps the last N tokens, i.e. a
    sliding window of N + 1 (the `swa` forward, same weights); with eviction and cascades
    the logits differ from both."""
    B, T = 2, 14
    tokens = jnp.asarray(rng.integers(0, 32, (B, T)), jnp.int32)
    # 2 sinks + cascade 0 of (30 − 2 − 1) // 2 = 13 slots: the 14 tokens never evict one.
    cfg, model, variables = _model(("attn",), cache="cascade", cache_size=30, cache_sinks=2,
                                   cascades=2, sinks=True, short_conv=True)
    full = model.apply(variables, tokens)
    np.testing.assert_allclose(_streamed(cfg, model, variables, tokens, 5), full,
                               rtol=2e-5, atol=2e-5)

    cfg, model, variables = _model(("attn",), cache="cascade", cache_size=5, cache_sinks=0,
                                   cascades=1)
    swa_cfg, swa, _ = _model(("swa",))
    window = swa.apply(variables, tokens)
    np.testing.assert_allclose(_streamed(cfg, model, variables, tokens, 5), window,
                               rtol=2e-5, atol=2e-5)

    cfg, model, variables = _model(("attn",), cache="cascade", cache_size=7, cache_sinks=1,
                                   cascades=2)
    streamed = _streamed(cfg, model, variables, tokens, 5)
    assert np.abs(np.asarray(streamed - model.apply(variables, tokens))).max() > 1e-3


@pytest.mark.parametrize("settings, field", [
    (dict(cache="ring"), "cache"), (dict(cache="cascade"), "cache_size"),
    (dict(cache="cascade", cache_size=4, cache_sinks=4), "cache_size"),
    (dict(score_decay=1.5), "score_decay"), (dict(cascades=0), "cascades")])
def test_cache_settings_name_the_field(settings, field):
    from mem_lm import ModelConfig
    with pytest.raises(ValueError, match=f"attn.{field}"):
        ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, pattern=("attn",),
                    mixers={"attn": settings})
