"""Segment recurrence (mem_lm/segments.py, `ModelConfig.segments`).

RMT: the scanned model equals a plain Python loop over segments that calls the block stack on
[memory; segment; memory] and passes the memory on; gradients cross exactly `bptt` transitions
at the end of the input; causality within and across segments; packed rows with documents at
segment starts equal separate runs; named config errors; a hybrid backbone; training steps;
decoding through the cache (one segment's cache and the memory) equals the full forward.

ARMT: its rules (DPFP, the read, the delta-rule write with the gamma-corrected normaliser)
against a float64 NumPy oracle written from the reference's AssociativeLayerWrapper; the model
against a loop over segments that runs the unsegmented model's blocks layer by layer with that
oracle's per-layer memories passed along; the bptt gradient pattern; packing (resets at document
starts, no reads across documents).

Replay (both kinds): gradients equal full backpropagation's, with less temporary memory."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from layers.norm import RMSNorm
from mem_lm import LanguageModel, ModelConfig, generate
from mem_lm.model import Block, Stack, apply_with_aux, init_cache
from mem_lm.segments import associative_read, associative_write, dpfp

VOCAB = 18


def tiny(segments, pattern=("attn",), **kw):
    kw = {"vocab_size": VOCAB, "d_model": 16, "num_layers": 2, "num_heads": 2,
          "pattern": pattern, "segments": segments, **kw}
    return ModelConfig(**kw)


def init(cfg, T=14, seed=0):
    model = LanguageModel(cfg)
    tokens = jnp.zeros((1, T), jnp.int32)
    return model, nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens))["params"]


def activate(params, rng):
    """ARMT's W_mv starts at zero (as the reference's), which leaves every memory empty: random
    values make the memories carry something. A no-op for RMT."""
    def fill(path, a):
        if any(getattr(k, "key", None) == "W_mv" for k in path):
            return jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype)
        return a
    return jax.tree_util.tree_map_with_path(fill, params)


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


@pytest.mark.parametrize("kind, bptt", [("rmt", None), ("rmt", 0), ("rmt", 2), ("armt", 2)])
def test_gradients_cross_exactly_bptt_transitions_at_the_end(kind, bptt, rng):
    """d loss(segment i) / d input embeddings of segment j is nonzero iff j == i, or j < i
    and every memory transition j+1 .. i keeps its gradient (entering segment t >= n - bptt).
    ARMT's transitions are every layer's (A, z)."""
    S, n = 3, 6
    extra = {"d_mem": 3, "nu": 2} if kind == "armt" else {}
    cfg = tiny({"kind": kind, "length": S, "memory_tokens": 1, "bptt": bptt, **extra},
               tie_embeddings=False)
    model, params = init(cfg, T=S * n)
    params = activate(params, rng)
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
    full = tiny({**cfg.segment_settings, "bptt": None}, tie_embeddings=False)
    fwd = lambda mdl: jax.jit(lambda p: mdl.apply({"params": p}, tokens))(params)
    np.testing.assert_array_equal(fwd(LanguageModel(full)), fwd(model))


def test_rmt_without_memory_tokens_is_segment_local(rng):
    """memory_tokens 0: no memory parameter, and each segment's logits are the unsegmented
    model's on that segment alone (the baseline of eval.segment_recall)."""
    cfg = tiny({"length": 4, "memory_tokens": 0})
    model, params = init(cfg, T=12)
    assert "segment_memory" not in params
    tokens = jnp.asarray(rng.integers(0, VOCAB, (1, 12)), jnp.int32)
    got = jax.jit(lambda t: model.apply({"params": params}, t))(tokens)
    alone = jax.jit(lambda t: LanguageModel(tiny(None)).apply({"params": params}, t))(
        tokens.reshape(3, 4))
    np.testing.assert_allclose(got.reshape(3, 4, VOCAB), alone, atol=1e-5, rtol=1e-5)


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
        ({"length": 4, "memory_tokens": -1}, "ModelConfig.segments.memory_tokens: must be >= 0"),
        ({"length": 4, "bptt": -1}, "ModelConfig.segments.bptt: must be >= 0, got -1"),
        ({"length": 4, "bptt": 1.5}, "ModelConfig.segments.bptt: must be None (full) or an int"),
        ({"length": True}, "ModelConfig.segments.length: must be an int"),
        ({"memory_tokens": 2}, "ModelConfig.segments.length: required"),
        ({"length": 4, "kind": "xl"}, "ModelConfig.segments.kind: must be one of ('rmt', "
                                      "'armt')"),
        ({"length": 4, "d_mem": 8}, "ModelConfig.segments.d_mem: a setting of kind 'armt' only"),
        ({"length": 4, "replay": 1}, "ModelConfig.segments.replay: must be True or False"),
        ({"kind": "armt", "length": 4, "memory_tokens": 0},
         "ModelConfig.segments.memory_tokens: must be >= 1 (ARMT writes"),
        ({"kind": "armt", "length": 4, "d_mem": 0}, "ModelConfig.segments.d_mem: must be >= 1"),
        ({"kind": "armt", "length": 4, "d_mem": 2, "nu": 5},
         "ModelConfig.segments.nu: nu = 5 must be <= 2 * d_mem = 4"),
        ({"kind": "armt", "length": 4, "d_mem": 1},
         "ModelConfig.segments.d_mem: nu = 3 must be <= 2 * d_mem = 2"),
        ({"kind": "armt", "length": 4, "nu": 0}, "ModelConfig.segments.nu: must be >= 1"),
        ({"kind": "armt", "length": 4, "correction": "no"},
         "ModelConfig.segments.correction: must be True or False"),
        ({"length": 4, "size": 3}, "ModelConfig.segments.size: unknown setting"),
        (7, "ModelConfig.segments: must be None or map"),
    ]:
        with pytest.raises(ValueError) as e:
            ModelConfig(**base, segments=seg)
        assert str(e.value).startswith(msg), str(e.value)
    cfg = ModelConfig(**base, segments={"length": 4})
    assert cfg.segment_settings == {"kind": "rmt", "length": 4, "memory_tokens": 10,
                                    "bptt": None, "replay": False}
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)
    armt = ModelConfig(**base, segments={"kind": "armt", "length": 4})
    assert armt.segment_settings == {"kind": "armt", "length": 4, "memory_tokens": 10,
                                     "bptt": None, "replay": False, "d_mem": 32, "nu": 3,
                                     "correction": True}
    assert ModelConfig.from_dict(json.loads(json.dumps(armt.to_dict()))) == armt
    # A config written before `replay` existed resolves to the same model.
    assert ModelConfig(**base, segments={"length": 4, "bptt": None}) == cfg
    plain = ModelConfig(**base)
    assert plain.segments is None and plain.to_dict()["segments"] is None
    old = {k: v for k, v in plain.to_dict().items() if k != "segments"}   # older checkpoints
    assert ModelConfig.from_dict(old) == plain


DECODE_CASES = {
    "rmt-attn": ({"kind": "rmt", "length": 4, "memory_tokens": 2}, {}),
    "armt-attn-scan": ({"kind": "armt", "length": 4, "memory_tokens": 2, "d_mem": 3, "nu": 2},
                       {"scan_layers": True}),
    "rmt-nomemory": ({"kind": "rmt", "length": 4, "memory_tokens": 0}, {}),
}


@pytest.mark.parametrize("case", [
    # armt's decoding is also in test_model's fast decode test (without scan_layers).
    "rmt-attn", pytest.param("armt-attn-scan", marks=pytest.mark.slow),
    pytest.param("rmt-nomemory", marks=pytest.mark.slow)])
def test_decoding_matches_the_full_forward(case, rng):
    """Through the cache (mem_lm/segments.py, "Decoding"): a prompt of two whole segments (the
    segment scan, ending on a boundary) with every position's logits, then S + 2 more tokens in
    one call from the traced cache (one token at a time, the write pass at the boundary crossed);
    `generate` from a prompt ending inside a segment (prefill through the cache, steps crossing
    two boundaries) is greedy on the full forward. The cache holds one segment, not max_len.
    (tests/mem_lm/test_model.py: prefill + decode_step, prompts ending inside a segment.)"""
    segments, kw = DECODE_CASES[case]
    cfg = tiny(segments, num_layers=1, **kw)
    S, m = segments["length"], segments["memory_tokens"]
    T = 3 * S + 2
    model, params = init(cfg, T=T)
    variables = {"params": activate(params, rng)}
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, T)), jnp.int32)
    full = jax.jit(model.apply)(variables, tokens)

    prefill = jax.jit(lambda v, t: model.apply(v, t, cache=init_cache(cfg, 2, T)))
    first, cache = prefill(variables, tokens[:, :2 * S])
    buffers = [a.shape[-3] for a in jax.tree.leaves(cache["layers"]) if a.ndim >= 4]
    assert buffers and max(buffers) <= S + 2 * m < T, buffers      # attn's K/V: one segment
    rest, cache = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))(
        variables, tokens[:, 2 * S:], cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), full, atol=2e-5,
                               rtol=2e-5)
    assert int(cache["pos"]) == T

    out = generate(model, variables, tokens[:, :S + 1], T - S - 1)
    np.testing.assert_array_equal(out[:, :S + 1], tokens[:, :S + 1])
    np.testing.assert_array_equal(jnp.argmax(jax.jit(model.apply)(variables, out)[:, S:-1], -1),
                                  out[:, S + 1:])


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


@pytest.mark.slow   # 12 s: the slowest segments test; aux averaging is shared code (apply_with_aux)
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


# ----------------------------------------------------------------------------- ARMT
class NumpyAssociativeLayer:
    """The float64 oracle: the reference's AssociativeLayerWrapper (modeling_amt/
    language_modeling.py) rule by rule, with its state and first-segment flag; weights as
    [in, out] matrices (x @ W), W_mb's bias a scalar."""

    def __init__(self, Wq, Wk, Wv, Wb, bb, nu, correction=True):
        self.W = [np.asarray(w, np.float64) for w in (Wq, Wk, Wv, Wb)]
        self.bb, self.nu, self.correction = float(bb), nu, correction
        self.W_mem, self.z, self.first_seg = 0.0, 0.0, True      # zero_mem
        self.gammas = []

    def phi(self, x):
        x = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)
        rolled = np.concatenate([np.roll(x, j, axis=-1) for j in range(1, self.nu + 1)], -1)
        return np.concatenate([x] * self.nu, axis=-1) * rolled

    def associate(self, h):
        mq = self.phi(np.asarray(h, np.float64) @ self.W[0])
        num = np.einsum("ijk,ikt->ijt", mq, self.W_mem * np.ones((1, mq.shape[-1], 1)))
        denom = np.einsum("ik,ijk->ij", self.z * np.ones((1, mq.shape[-1])), mq)[..., None]
        return num / (denom + 1e-5)

    def read(self, h):
        """forward's read: nothing in the first segment."""
        return h if self.first_seg else h + self.associate(h)

    def update_mem(self, mem_tokens):
        mem_tokens = np.asarray(mem_tokens, np.float64)
        mk = self.phi(mem_tokens @ self.W[1])
        new_mv = mem_tokens @ self.W[2]
        if not self.first_seg:
            num = np.einsum("ijk,ikt->ijt", mk, self.W_mem)
            denom = np.einsum("ij,ikj->ik", self.z, mk)[..., None] + 1e-5
            prev_mv = num / denom
            if self.correction:
                coef = np.clip(1 - denom / (np.linalg.norm(mk, axis=-1) ** 2 + 1e-5)[..., None],
                               0, 1)
                self.gammas.append(coef)
            else:
                coef = 1.0
        else:
            prev_mv, coef = np.zeros_like(new_mv), 1.0
        mv = new_mv - prev_mv
        mb = 1 / (1 + np.exp(-((mem_tokens @ self.W[3])[..., 0] + self.bb)))
        self.W_mem = self.W_mem + np.einsum("ijk,ijt,ij->ikt", mk, mv, mb)
        self.z = self.z + (coef * mk).sum(axis=1)
        self.first_seg = False


@pytest.mark.usefixtures("x64")
def test_armt_rules_match_a_float64_oracle_of_the_reference(rng):
    """dpfp, associative_read and associative_write (float64 here) against the oracle over 4
    segments of random memory tokens (first segment, then the gamma-corrected writes) and random
    queries, with and without the correction."""
    B, m, T, d, r, nu = 2, 3, 5, 6, 4, 3
    for correction in (True, False):
        W = [rng.standard_normal(sh) for sh in ((d, r), (d, r), (d, d), (d, 1))]
        bb = rng.standard_normal()
        ref = NumpyAssociativeLayer(*W, bb, nu, correction)
        x = rng.standard_normal((B, T, r))
        np.testing.assert_allclose(dpfp(jnp.asarray(x), nu), ref.phi(x), rtol=1e-13)
        A = jnp.zeros((B, 2 * nu * r, d), jnp.float64)
        z = jnp.zeros((B, 2 * nu * r), jnp.float64)
        for seg in range(4):
            y = rng.standard_normal((B, m, d))
            k = dpfp(jnp.asarray(y @ W[1]), nu)
            beta = jax.nn.sigmoid(jnp.asarray((y @ W[3])[..., 0] + bb))
            A, z = associative_write(k, jnp.asarray(y @ W[2]), beta, A, z,
                                     jnp.full((B,), seg == 0), correction)
            ref.update_mem(y)
            np.testing.assert_allclose(A, ref.W_mem, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(z, ref.z, rtol=1e-10, atol=1e-12)
            h = rng.standard_normal((B, T, d))
            got = associative_read(dpfp(jnp.asarray(h @ W[0]), nu), A, z)
            np.testing.assert_allclose(got, ref.associate(h), rtol=1e-10, atol=1e-12)
        if correction:
            # The correction acted: gammas strictly inside (0, 1) and clipped ones.
            g = np.concatenate([c.ravel() for c in ref.gammas])
            assert ((g > 0) & (g < 1)).any() and ((g == 0) | (g == 1)).any(), g


def armt_loop_logits(cfg, params, tokens):
    """The oracle: segment by segment by hand (the last one unpadded, as the reference splits),
    [segment; memory tokens] through the unsegmented model's blocks one at a time, each layer
    reading its NumpyAssociativeLayer before the block and writing the block's outputs at the
    memory positions after it; the final norm; logits of the segment positions."""
    s = cfg.segment_settings
    S, m = s["length"], s["memory_tokens"]
    E = params["embed"]["embedding"]
    plain = tiny(None, pattern=cfg.pattern, mixers=dict(cfg.to_dict()["mixers"]))
    layers = []
    for i in range(cfg.num_layers):
        a = params[f"layer_{i}"]["assoc"]
        layers.append(NumpyAssociativeLayer(
            a["W_mq"]["kernel"], a["W_mk"]["kernel"], a["W_mv"]["kernel"], a["W_mb"]["kernel"],
            a["W_mb_bias"][0], s["nu"], s["correction"]))
    B, T = tokens.shape
    out = []
    for start in range(0, T, S):
        seg = E[tokens[:, start:start + S]]
        L = seg.shape[1]
        h = jnp.concatenate([seg, jnp.broadcast_to(params["segment_memory"][None],
                                                   (B, m, cfg.d_model))], axis=1)
        for i, mem in enumerate(layers):
            h = jnp.asarray(mem.read(h), jnp.float32)
            layer = {k: v for k, v in params[f"layer_{i}"].items() if k != "assoc"}
            h, _ = Block(plain, i).apply({"params": layer}, h, jnp.arange(L + m)[None], None,
                                         None, None, jnp.int32(i), {})
            mem.update_mem(h[:, -m:])
        h = RMSNorm(cfg.norm_eps).apply({"params": params["final_norm"]}, h)
        out.append(h[:, :L] @ E.T)
    return jnp.concatenate(out, axis=1)


def test_armt_matches_a_loop_over_segments_with_the_oracle_memories(rng):
    cfg = tiny({"kind": "armt", "length": 4, "memory_tokens": 2, "d_mem": 3, "nu": 2})
    model, params = init(cfg)
    params = activate(params, rng)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 14)), jnp.int32)   # 4 segments, last 2
    f = jax.jit(lambda p, t: model.apply({"params": p}, t))
    got = f(params, tokens)
    np.testing.assert_allclose(got, armt_loop_logits(cfg, params, tokens), atol=2e-5,
                               rtol=2e-5)
    # The memories are read: a larger W_mv changes every later segment, not the first.
    louder = jax.tree_util.tree_map_with_path(
        lambda path, a: 2 * a if "W_mv" in jax.tree_util.keystr(path) else a, params)
    diff = np.abs(np.asarray(f(louder, tokens) - got)).max(axis=(0, 2))
    assert (diff[:4] == 0).all() and (diff[4:] > 1e-6).all(), diff


def test_armt_packing_resets_memory_and_never_reads_across_documents(rng):
    """Under scan_layers (the memories stacked over groups): documents at segment starts give
    what they give alone; a document starting mid-segment reads nothing of the one before (its
    logits do not change when the earlier document does), and has a memory of its own."""
    cfg = tiny({"kind": "armt", "length": 4, "memory_tokens": 2, "d_mem": 3, "nu": 2},
               scan_layers=True)
    model, params = init(cfg, T=12)
    params = activate(params, rng)
    a, b, row = (rng.integers(0, VOCAB, n) for n in (8, 4, 12))
    # Document 2 starts at token 6 (inside the second segment) and runs on into the third:
    # `other` changes document 1, `moved` document 2's first token.
    other, moved = row.copy(), row.copy()
    other[:6] = (row[:6] + rng.integers(1, VOCAB, 6)) % VOCAB
    moved[6] = (row[6] + 1) % VOCAB
    ids = [[1] * 8 + [2] * 4] + [[1] * 6 + [2] * 6] * 3
    got = jax.jit(lambda t, s: model.apply({"params": params}, t, segment_ids=s))(
        jnp.asarray(np.stack([np.concatenate([a, b]), row, other, moved]), jnp.int32),
        jnp.asarray(ids, jnp.int32))
    # Alone: each document first in its own row (what follows it cannot matter, causally).
    junk = rng.integers(0, VOCAB, 12)
    alone = jax.jit(lambda t: model.apply({"params": params}, t))(
        jnp.asarray(np.stack([np.concatenate([a, junk[:4]]), np.concatenate([b, junk[:8]])]),
                    jnp.int32))
    np.testing.assert_allclose(got[0, :8], alone[0, :8], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[0, 8:], alone[1, :4], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[1, 6:], got[2, 6:])
    assert np.abs(got[1, :6] - got[2, :6]).max() > 1e-4
    assert np.abs(got[1, 8:] - got[3, 8:]).max() > 1e-4


# ----------------------------------------------------------------------------- replay
@pytest.mark.parametrize("kind", ["armt", pytest.param("rmt", marks=pytest.mark.slow)])
def test_replay_gradients_equal_full_backprop_with_less_memory(kind, rng):
    """`replay` (each segment recomputed in the backward) gives full backpropagation's
    gradients, and the compiled gradient needs less temporary memory (8 segments)."""
    extra = {"d_mem": 3, "nu": 2} if kind == "armt" else {}
    seg = {"kind": kind, "length": 4, "memory_tokens": 2, "bptt": None, **extra}
    T = 32
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, T)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((2, T, VOCAB)), jnp.float32)
    grads, temp = [], []
    for replay in (False, True):
        model, params = init(tiny({**seg, "replay": replay}, num_layers=1), T=T)
        if not grads:
            params0 = activate(params, rng)
        loss = lambda p: jnp.sum(model.apply({"params": p}, tokens) * w)
        compiled = jax.jit(jax.grad(loss)).lower(params0).compile()
        grads.append(compiled(params0))
        temp.append(compiled.memory_analysis().temp_size_in_bytes)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)
    assert jnp.abs(grads[0]["segment_memory"]).max() > 0
    assert temp[1] < 0.6 * temp[0], temp
