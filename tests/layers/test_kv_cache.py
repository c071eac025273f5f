"""The cascading KV cache (layers/kv_cache.py) against the reference code's rule as read.

The authors' code (github.com/jeffwillette/cascading_kv_cache: the Triton kernel
`_update_kv_cache_inner` and `_update_positional_idx` in cascade/models/cascading_cache.py,
`cascade_attn_eager` in cascade/models/cascade_attention.py) needs CUDA, so there is no
runnable oracle on a CPU. `Reference` below is a float64 NumPy simulation written from that
code's algorithm, in its terms: per cascade a ring of slots with a start index and a stored
count, keys stored without RoPE and rotated at attention time by the positions the reference
gives them (`_update_positional_idx` plus the sink shift of `get_vals`, the query at the
largest position + 1; or the original positions with `do_og_pos`), the `pow2` acceptance clock
with eager fill, comparisons against a cascade's newest slot (`(start − 1) % stored`), and the
EMA β·s + (1 − β)·mean over query heads of the attention, with one token per step
(`cascade_stride=1`). Outputs at every step and the positions kept at the end must agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.kv_cache import cascade_attention, cascade_layout, init_cascade_cache

THETA = 10000.0


def rope(x, pos):
    """Rotate-half RoPE of x [n, h, D] at positions [n], in float64 (the project's and the
    reference's Llama convention)."""
    half = x.shape[-1] // 2
    ang = np.asarray(pos, np.float64)[:, None, None] * THETA ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


class Reference:
    """One batch row's cascading cache, one token per step, as the reference code runs it."""

    def __init__(self, sinks, cascades, window, beta, positions, fill, sink_logits=None):
        self.S, self.C, self.W, self.beta = sinks, cascades, window, beta
        self.positions, self.eager, self.sink_logits = positions, fill == "eager", sink_logits
        self.sink = []                                           # entries, in stream order
        self.slots = [[None] * window for _ in range(cascades)]  # the rings
        self.start, self.stored = [0] * cascades, [0] * cascades
        self.margins = []       # |score difference| of every comparison made

    def held(self, t):
        """[(entry, position)] of every token cached before step t, positions as the
        reference gives them."""
        out = [(e, j) for j, e in enumerate(self.sink)]
        if self.positions == "stream":
            return out + [(e, e["pos"]) for ring in self.slots for e in ring if e is not None]
        # _update_positional_idx: walking down from the number of stored tokens, cascade i
        # gets the segment below the previous one, slot j at (j − start) mod segment.
        shift = self.S if t > self.S else 0                     # get_vals' pos_shift
        ub = sum(self.stored)
        for i in range(self.C):
            seg = min(self.W, self.stored[i])
            for j in range(self.W):
                if self.slots[i][j] is not None:
                    out.append((self.slots[i][j], (j + seg - self.start[i]) % seg + ub - seg
                                + shift))
            ub -= self.W
            if ub <= 0:
                break
        return out

    def step(self, q, k, v, t):
        """q [H, D], k, v [Hkv, D] without RoPE -> o [H, D]; then the token enters."""
        H, D = q.shape
        G = H // k.shape[0]
        held = self.held(t)
        if self.positions == "stream":
            qpos = t
        else:
            qpos = max([p for _, p in held], default=-1) + 1
        keys = np.concatenate([rope(np.stack([e["k"] for e, _ in held]), [p for _, p in held]),
                               rope(k[None], [qpos])]) if held else rope(k[None], [qpos])
        vals = np.stack([e["v"] for e, _ in held] + [v])
        qr = rope(q[None], [qpos])[0]
        o, p_mean = np.zeros((H, D)), np.zeros(len(keys))
        for h in range(H):
            s = keys[:, h // G] @ qr[h] / np.sqrt(D)
            z = np.exp(s - s.max())
            denom = z.sum()
            if self.sink_logits is not None:
                denom += np.exp(self.sink_logits[h] - s.max())
            p = z / denom
            o[h] = p @ vals[:, h // G]
            p_mean += p / H
        for (e, _), m in zip(held, p_mean[:-1]):
            if "score" in e:
                e["score"] = self.beta * e["score"] + (1 - self.beta) * m
        item = {"k": k, "v": v, "pos": t, "score": (1 - self.beta) * p_mean[-1]}
        if len(self.sink) < self.S:
            del item["score"]                                    # sinks have no score
            self.sink.append(item)
            return o
        eager = self.eager and t <= self.C * self.W + self.S
        for i in range(self.C):
            ring, start, stored = self.slots[i], self.start[i], self.stored[i]
            if eager or (t - self.S) % 2 ** i == 0:
                if stored < self.W:                              # append
                    ring[start + stored] = item
                    self.stored[i] += 1
                    return o
                ring[start], item = item, ring[start]            # evict the oldest
                self.start[i] = (start + 1) % self.W
                continue                                         # (dropped after the last)
            if stored == 0:
                ring[start] = item
                self.stored[i] = 1
                return o
            newest = (start - 1) % stored
            self.margins.append(abs(item["score"] - ring[newest]["score"]))
            if item["score"] >= ring[newest]["score"]:
                ring[newest] = item
            return o
        return o

    def kept(self):
        return sorted(e["pos"] for e, _ in self.held(0))


def simulate(q, k, v, sinks, cascades, window, beta, positions, fill, sink_logits=None):
    out, kept, margins = np.zeros(q.shape), [], []
    for b in range(q.shape[0]):
        ref = Reference(sinks, cascades, window, beta, positions, fill, sink_logits)
        for t in range(q.shape[1]):
            out[b, t] = ref.step(q[b, t], k[b, t], v[b, t], t)
        kept.append(ref.kept())
        margins += ref.margins
    return out, kept, margins


def kept_positions(cache):
    return [sorted(int(p) for p in row if p >= 0) for row in np.asarray(cache["pos"])]


# One cascade (sliding window + sinks) is also checked in make test against the swa forward
# (test_attention_layer_with_a_cascading_cache); its simulation case runs under -m slow.
@pytest.mark.parametrize("cascades, use_sinks, positions, fill", [
    (3, True, "cache", "eager"), (3, False, "stream", "lazy"),
    pytest.param(1, False, "cache", "eager", marks=pytest.mark.slow)])
def test_matches_reference_rule_float64(x64, rng, cascades, use_sinks, positions, fill):
    """Two rows with different data (their choices differ), GQA, learned sink logits; the
    tokens fed in two calls (a prompt, then the rest) as prefill + decode would. 44 tokens
    through 2 sinks + 12 slots: with eager fill selection starts at token 15."""
    B, T, H, Hkv, D, S, size, beta = 2, 44, 4, 2, 8, 2, 14, 0.9999
    per = cascade_layout(size, S, cascades)
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, Hkv, D))
    v = rng.standard_normal((B, T, Hkv, D))
    sink_logits = rng.standard_normal(H) if use_sinks else None
    want, kept, margins = simulate(q, k, v, S, cascades, per, beta, positions, fill,
                                   sink_logits)
    if cascades > 1:
        # Every pair was decided by a clear margin (in attention mass; the scores carry
        # 1 − β of it), far above the ~1e-7 the float32 RoPE angles move it, so rounding
        # cannot flip a choice.
        assert len(margins) > 10 and min(margins) / (1 - beta) > 1e-5
    cache = init_cascade_cache(B, size, Hkv, D, sinks=S, cascades=cascades, dtype=jnp.float64)
    run = jax.jit(lambda q, k, v, c, start: cascade_attention(
        q, k, v, c, start, sinks=S, score_decay=beta, positions=positions, fill=fill,
        rope_theta=THETA, sink_logits=None if sink_logits is None else jnp.asarray(sink_logits)))
    cut = 17
    o1, cache = run(q[:, :cut], k[:, :cut], v[:, :cut], cache, 0)
    o2, cache = run(q[:, cut:], k[:, cut:], v[:, cut:], cache, cut)
    # apply_rope computes its angles in float32: agreement to ~1e-6, not float64's 1e-12.
    np.testing.assert_allclose(np.concatenate([o1, o2], 1), want, rtol=1e-5, atol=1e-5)
    assert kept_positions(cache) == kept
    if cascades == 1:
        # One cascade is the sliding window with sinks: the first S and the last `per`.
        assert kept == [list(range(S)) + list(range(T - per, T))] * B
    else:
        assert kept[0] != kept[1]                   # rows choose by their own scores
        # The same slots reach further back than the window: one of every 2^c in cascade c.
        assert min(p for p in kept[0] if p >= S) < T - size


def test_layout_errors_and_sizes():
    assert cascade_layout(14, 2, 3) == 4            # 2 sinks + 3·4 = 14
    assert cascade_layout(15, 2, 3) == 4            # one slot unused
    with pytest.raises(ValueError, match="cannot hold"):
        cascade_layout(5, 4, 2)


def _model(pattern, **settings):
    from mem_lm import LanguageModel, ModelConfig
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, pattern=pattern,
                      mixers={"attn": settings, "swa": {"window": 6}})
    model = LanguageModel(cfg)
    return cfg, model, jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


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
    (the forward without a cache: in-cache positions are then the stream positions); one
    cascade without sinks, with stream positions, keeps the last N tokens, i.e. a sliding
    window of N + 1 (the `swa` forward, same weights); with eviction and cascades the logits
    differ from the forward."""
    B, T = 2, 14
    tokens = jnp.asarray(rng.integers(0, 32, (B, T)), jnp.int32)
    # 2 sinks + 2 cascades of (30 − 2) // 2 = 14 slots: the 14 tokens never evict one.
    cfg, model, variables = _model(("attn",), cache="cascade", cache_size=30, cache_sinks=2,
                                   cascades=2, sinks=True, short_conv=True)
    full = jax.jit(model.apply)(variables, tokens)
    np.testing.assert_allclose(_streamed(cfg, model, variables, tokens, 5), full,
                               rtol=2e-5, atol=2e-5)

    cfg, model, variables = _model(("attn",), cache="cascade", cache_size=5, cache_sinks=0,
                                   cascades=1, cache_positions="stream")
    swa_cfg, swa, _ = _model(("swa",))
    window = jax.jit(swa.apply)(variables, tokens)
    np.testing.assert_allclose(_streamed(cfg, model, variables, tokens, 5), window,
                               rtol=2e-5, atol=2e-5)

    cfg, model, variables = _model(("attn",), cache="cascade", cache_size=7, cache_sinks=1,
                                   cascades=2)
    streamed = _streamed(cfg, model, variables, tokens, 5)
    assert np.abs(np.asarray(streamed - jax.jit(model.apply)(variables, tokens))).max() > 1e-3


@pytest.mark.parametrize("settings, field", [
    (dict(cache="ring"), "cache"), (dict(cache="cascade"), "cache_size"),
    (dict(cache="cascade", cache_size=4, cache_sinks=4), "cache_size"),
    (dict(score_decay=1.0), "score_decay"), (dict(cascades=0), "cascades"),
    (dict(cache_positions="rope"), "cache_positions"), (dict(cache_fill="late"), "cache_fill")])
def test_cache_settings_name_the_field(settings, field):
    from mem_lm import ModelConfig
    with pytest.raises(ValueError, match=f"attn.{field}"):
        ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, pattern=("attn",),
                    mixers={"attn": settings})
