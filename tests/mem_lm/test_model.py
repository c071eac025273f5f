"""The language model: cached decoding == full forward, packed == separate, logical axis
names, the parameter count against the documented formulas, config validation and its JSON
form, channel patterns, scan/remat equivalence, training."""
import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import registry
from layers.common import AXIS_NAMES
from mem_lm import (LanguageModel, ModelConfig, decode_step, generate, param_count, prefill,
                    sample_logits, token_mixers)

MIXERS = token_mixers()
TINY = dict(vocab_size=37, d_model=16, num_heads=2, chunk_size=4)


def tiny(pattern, num_layers=None, mixers=None, **kw):
    # brt: windows and a state small enough that T = 15 crosses several state updates; titans
    # MAC: segments of 4 in chunks of 2 (the decode steps cross segments and chunks).
    mixers = {"swa": {"window": 3}, "brt": {"window": 4, "state_size": 4},
              "titans_mag": {"window": 3, "memory_chunk": 2},
              "titans_mac": {"segment_length": 4, "memory_chunk": 2},
              # mla in DeepSeek's form (RoPE, low-rank query); Kimi's NoPE in test_mla.py.
              "mla": {"rope": True, "q_lora_rank": 6}, **(mixers or {})}
    return ModelConfig(num_layers=num_layers or len(pattern), pattern=pattern, mixers=mixers,
                       **{**TINY, **kw})


def every_mixer(**settings):
    """The same settings for every token mixer that has them."""
    from configs.base import every_token_mixer
    return every_token_mixer(**settings)


def _init(cfg, B=2, T=8):
    model = LanguageModel(cfg)
    tokens = jnp.zeros((B, T), jnp.int32)
    return model, nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))


CASES = [((m,), None) for m in MIXERS] + [(("gdn", "swa", "attn"), None),
                                         (("attn", "swa", "la", "gla"), True),
                                         (("gdn", "ssd"), False)]
# Under -m slow only: mechanisms whose own test files check decoding and packed documents
# against their own references (tests/layers/test_mom.py, test_nsa.py), and the gdn-swa-attn
# hybrid (attn-swa-la-gla+conv mixes KV, window, recurrent and conv caches in make test).
OWN_DECODE_TESTS = ("mom", "nsa")
SLOW_HYBRIDS = (("gdn", "swa", "attn"),)


@pytest.mark.parametrize("pattern, short_conv", [
    pytest.param(p, c, id="-".join(p) + {None: "", True: "+conv", False: "-noconv"}[c],
                 marks=[pytest.mark.slow] if p in SLOW_HYBRIDS
                 or (p[0] in OWN_DECODE_TESTS and len(p) == 1) else [])
    for p, c in CASES])
def test_cached_decoding_and_packing_match_full_forward(pattern, short_conv, rng):
    cfg = tiny(pattern, mixers=None if short_conv is None else every_mixer(short_conv=short_conv))
    _check_decoding_and_packing(cfg, rng)


def test_gated_attention_decoding_and_packing_match_full_forward(rng):
    """Qwen3-Next's attention options (output gate from q_proj, q/k norms, partial RoPE) and
    zero-centred norms, with every norm scale moved off its start (the (1 + w) path acts)."""
    cfg = tiny(("attn",), mixers={"attn": {"output_gate": True, "qk_norm": True,
                                           "rope_fraction": 0.5, "num_kv_heads": 1}},
               zero_centred_norms=True)
    move = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if path[-1].key == "scale" else a, p)
    _check_decoding_and_packing(cfg, rng, tweak=move)


@pytest.mark.parametrize("settings, named", [
    (dict(rope_fraction=0.0), "must be in \\(0, 1\\]"),
    (dict(rope_fraction=0.1), "rotates int\\(8 · 0.1\\) = 0 dims"),
    (dict(rope_fraction=0.375), "= 3 dims"),
    (dict(rope_fraction=0.5, cache="cascade", cache_size=8), "cascading cache")])
def test_partial_rope_settings_name_the_field(settings, named):
    with pytest.raises(ValueError, match=f"mixers.attn.rope_fraction: .*{named}"):
        tiny(("attn",), mixers={"attn": settings})


# Channel mixers beyond the default swiglu, with settings that use all their parts.
CHANNELS = {
    # Sigmoid router with the correction bias and groups, a gated shared expert.
    "moe": {"num_experts": 8, "top_k": 2, "d_expert": 8, "router": "sigmoid",
            "score_correction_bias": True, "n_group": 4, "topk_group": 2, "d_shared": 8,
            "shared_gate": True},
}


@pytest.mark.parametrize("channel", CHANNELS)
def test_channel_mixer_decoding_and_packing_match_full_forward(channel, rng):
    _check_decoding_and_packing(tiny(("gdn", "swa"), channel_pattern=(channel,),
                                     mixers={channel: CHANNELS[channel]}), rng)


# Segment recurrence (mem_lm/segments.py) around a hybrid and around attention: the prompt (6)
# ends inside a segment and the decode steps cross segment boundaries (the write pass). No
# packing check: a document that starts mid-segment is not the same as alone (by design; see
# test_segments.py), and a decode row holds one document.
SEGMENT_CASES = {
    "rmt-gdn-swa": (("gdn", "swa"), {"kind": "rmt", "length": 4, "memory_tokens": 2}),
    "armt-attn": (("attn",), {"kind": "armt", "length": 5, "memory_tokens": 2, "d_mem": 3,
                              "nu": 2}),
}


@pytest.mark.parametrize("case", SEGMENT_CASES)
def test_segment_recurrent_decoding_matches_full_forward(case, rng):
    pattern, segments = SEGMENT_CASES[case]
    # ARMT's W_mv starts at zero (an empty memory): random values make the memory carry.
    fill = lambda path, a: (jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype)
                            if "W_mv" in jax.tree_util.keystr(path) else a)
    _check_decoding_and_packing(tiny(pattern, segments=segments), rng, packing=False,
                                tweak=lambda p: jax.tree_util.tree_map_with_path(fill, p))


def _check_decoding_and_packing(cfg, rng, packing=True, tweak=None):
    model, params = _init(cfg)
    if tweak is not None:
        params = tweak(params)
    fwd = jax.jit(model.apply)
    B, T0, T = 2, 6, 15
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    docs = [(0, 0, 5), (0, 5, 12), (0, 12, 15), (1, 0, 9), (1, 9, 15)]
    alone = np.zeros((len(docs), T), np.int32)
    for i, (b, s, e) in enumerate(docs):
        alone[i, :e - s] = np.asarray(tokens)[b, s:e]
    # One forward (one compile) for the sequences and the documents alone.
    full = fwd(params, jnp.concatenate([tokens, jnp.asarray(alone)]))

    # Prefill T0 tokens, then one token at a time (teacher-forced): the same logits.
    last, cache = prefill(model, params, tokens[:, :T0], T)
    logits = [last]
    for t in range(T0, T):
        step_logits, cache = decode_step(model, params, tokens[:, t], cache)
        logits.append(step_logits)
    cached = jnp.stack(logits, axis=1)                       # logits at positions T0-1 .. T-1
    np.testing.assert_allclose(cached, full[:B, T0 - 1:], atol=2e-4, rtol=2e-4)
    assert (jnp.argmax(cached, -1) == jnp.argmax(full[:B, T0 - 1:], -1)).all()
    assert int(cache["pos"]) == T
    if not packing:
        return

    # Packed rows with segment ids == each document alone (padded at the end, causal).
    seg = np.array([[1] * 5 + [2] * 7 + [3] * 3, [4] * 9 + [0] * 6], np.int32)
    packed = fwd(params, tokens, segment_ids=jnp.asarray(seg))
    for i, (b, s, e) in enumerate(docs):
        np.testing.assert_allclose(packed[b, s:e], full[B + i, :e - s], atol=2e-4, rtol=2e-4)


def test_generate_greedy_and_sampling():
    cfg = tiny(("la", "swa"), num_layers=2)
    model, params = _init(cfg)
    prompt = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    out = generate(model, params, prompt, 7)
    assert out.shape == (2, 11) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :4], prompt)
    # Greedy: every new token is the argmax of the full forward on the growing sequence.
    full = jax.jit(model.apply)(params, out)
    np.testing.assert_array_equal(jnp.argmax(full[:, 3:-1], -1), out[:, 4:])
    # Sampling: reproducible from the key.
    sample = lambda seed: generate(model, params, prompt, 7, temperature=0.7, top_k=20,
                                   top_p=0.9, rng=jax.random.PRNGKey(seed))
    s1 = sample(3)
    np.testing.assert_array_equal(s1, sample(3))
    assert s1.min() >= 0 and s1.max() < cfg.vocab_size
    assert generate(model, params, prompt, 0).shape == (2, 4)


def test_sample_logits_truncation():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.PRNGKey(0)
    assert (sample_logits(logits, keys, 0.0) == 0).all()
    assert (sample_logits(logits, keys, 1.0, top_k=1) == 0).all()
    top2 = np.asarray(sample_logits(logits, keys, 1.0, top_k=2))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sample_logits(logits, keys, 1.0, top_p=0.7))   # 0.5 + 0.3 >= 0.7
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).mean() - 0.5 / 0.8) < 0.05


ALL = tuple(MIXERS)


def documented_param_count(cfg: ModelConfig) -> int:
    """The parameter formulas of the README (per mechanism, from its settings)."""
    d, H, D = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    HD = H * D

    def token(mixer):
        s = cfg.settings(mixer)
        if mixer == "brt":
            # Tokens and state alike: q, k, v, q2, two attention scales, the projection of
            # [self; cross]; the state's initial value, position embeddings and norm; the gate
            # (a bias, or LSTM forget and input kernels + biases).
            gate = d if s["gate"] == "fixed" else 2 * (2 * HD * d + d)
            return 2 * (4 * d * HD + 2 * H + 2 * HD * d) + 2 * s["state_size"] * d + d + gate
        if mixer == "mla":     # q (direct, or down + norm + up), latent down + norm, up, o
            Hm, rq, b = s["heads"] or H, s["q_lora_rank"], s["attention_bias"]
            R, dn, dv = s["kv_lora_rank"] or 4 * D, s["qk_nope_head_dim"] or D, s["v_head_dim"] or D
            dr = D // 2 if s["qk_rope_head_dim"] is None else s["qk_rope_head_dim"]
            q = d * Hm * (dn + dr) if rq is None else (d + b + 1) * rq + rq * Hm * (dn + dr)
            return q + (d + b) * (R + dr) + R + R * Hm * (dn + dv) + Hm * dv * d + d * b
        conv = s["conv_size"] if s["short_conv"] else 0     # per q/k/v channel
        if mixer == "ssd":     # z, x, B, C, dt; x/B/C convs + biases; dt_bias, A_log, D;
            GN = s["ngroups"] * s["d_state"]                  # o_norm, o_proj
            return (3 * d * HD + 2 * d * GN + d * H + (conv + (conv > 0)) * (HD + 2 * GN)
                    + 3 * H + HD)
        if mixer == "nsa":     # q, k/v of three branches, gates, compression, o_proj, convs
            kv = (s["num_kv_heads"] or H) * D
            return (2 * d * HD + 6 * d * kv + 3 * d * H + 2 * s["cmp_block"] * D * D
                    + conv * (HD + 6 * kv))
        if mixer in ("attn", "swa"):
            kv = (s["num_kv_heads"] or H) * D
            return d * HD + 2 * d * kv + HD * d + (H if s["sinks"] else 0) + conv * (HD + 2 * kv)
        if mixer == "mom":
            M, V = s["num_memories"], H * int(round(D * s["expand_v"]))
            memory = d * (HD + V + 2 * H)         # k, v, β, decay projections of one memory
            n = d * M + d * HD + conv * (2 * HD + V) + 2 * H   # router, q, convs, A_log, dt_bias
            n += (M + s["shared_memory"]) * memory
            return n + d * V + V // H + V * d                          # gate, o_norm, o_proj
        E = int(round(D * s.get("expansion", 0)))
        memory = 2 * H * D * E if s.get("depth") == 2 else 0     # the learned initial MLP
        inputs = 3 * d * HD + 3 * (d * H + H)       # q, k, v, θ/η/α projections + biases
        persistent = 2 * s.get("persistent_tokens", 0) * HD
        if mixer == "titans":  # + convs, gate, o_norm, o_proj
            n = inputs + conv * 3 * HD + memory
            return n + (d * HD if s["use_gate"] else 0) + D + HD * d
        if mixer == "titans_mag":   # swa (q, k, v, o) + persistent tokens, titans, gate norms
            titans = inputs + conv * 3 * HD + memory + (d * HD if s["use_gate"] else 0) + D
            return 4 * d * HD + persistent + titans + HD * d + 2 * d
        if mixer == "titans_mac":   # read query + conv, memory, attention q/k/v/o, read-out
            # norm + projection, persistent tokens, memory inputs from y, o_norm, o_proj, gate
            return (d * HD + conv * HD + memory + 4 * d * HD + D + HD * d + persistent + inputs
                    + D + HD * d + 2 * d)
        if mixer in ("gdn", "deltanet"):
            V = H * int(round(D * s["expand_v"]))
            n = 2 * d * HD + d * V + conv * (2 * HD + V) + d * H      # q, k, v, convs, β
            if mixer == "gdn":
                n += d * H + 2 * H                                     # a_proj, A_log, dt_bias
            return n + d * V * s["use_gate"] + V // H + V * d          # gate, o_norm, o_proj
        if mixer == "kda":     # as gdn, the decay and gate low-rank (rank Vh = value head width)
            Vh = int(round(D * s["expand_v"]))
            V = H * Vh
            n = 2 * d * HD + d * V + conv * (2 * HD + V) + d * H      # q, k, v, convs, β
            n += d * Vh + Vh * HD + HD + H                 # gk_proj_a, gk_proj_b, dt_bias, A_log
            return n + d * Vh + Vh * V + V + Vh + V * d    # g_proj_a/_b + bias, o_norm, o_proj
        V = H * int(round(D * s.get("expand_v", 1.0)))                 # value width
        if mixer == "la" and s["feature_map"] == "taylor":
            f = s["feature_dim"]
            n = 2 * d * H * f + d * HD + conv * (2 * H * f + HD)
        else:
            n = 2 * d * HD + d * V + conv * (2 * HD + V)
        n += V * d + (0 if mixer == "lightning" else V // H)           # o_proj, o_norm
        if mixer != "la":
            n += d * V                                                 # output gate
        if mixer == "gla":
            n += d * s["gate_rank"] + s["gate_rank"] * HD + HD
        return n

    def channel(name):
        if name == "none":
            return 0
        s = cfg.settings(name)
        if name == "moe":      # mlp_norm, router, experts, score bias, shared expert + gate
            E = s["num_experts"]
            F = s["d_expert"] or -(-int(np.ceil(8 * d / 3 / s["top_k"])) // 8) * 8
            return (d + d * E + 3 * E * d * F + E * s["score_correction_bias"]
                    + 3 * d * s["d_shared"] + d * s["shared_gate"])
        d_ff = s["d_ff"] or -(-int(np.ceil(s["mlp_ratio"] * d)) // 8) * 8
        return d + 3 * d * d_ff                                        # mlp_norm + SwiGLU

    n = cfg.vocab_size * d + d + (0 if cfg.tie_embeddings else d * cfg.vocab_size)
    for i in range(cfg.num_layers):
        t, c = cfg.layer_kinds(i)
        n += d + token(t) + channel(c)
    return n


@pytest.mark.parametrize("kw", [
    dict(),
    dict(scan_layers=True, tie_embeddings=False, channel_pattern=("none",)),
    dict(mixers={**every_mixer(short_conv=True), "attn": dict(num_kv_heads=1, sinks=True),
                 "gdn": dict(expand_v=2.0), "la": dict(feature_map="taylor"),
                 "swiglu": dict(d_ff=24)}, head_dim=4),
    # A channel pattern as long as the mixer pattern: MLPs placed per layer at no extra layers
    # (tracing is the cost here; a period of 3 would triple the model to 3 * len(ALL) layers).
    dict(mixers=every_mixer(short_conv=False),
         channel_pattern=tuple("none" if i % 3 == 1 else "swiglu" for i in range(len(ALL)))),
    # MoE beside SwiGLU: every moe parameter (default expert width, score bias, shared
    # expert and its gate).
    dict(channel_pattern=tuple(("moe", "swiglu")[i % 2] for i in range(len(ALL))),
         mixers={"moe": dict(top_k=3, router="sigmoid", score_correction_bias=True, n_group=2,
                             d_shared=8, shared_gate=True)}),
], ids=["plain", "scan-untied-nomlp", "gqa-sinks-expandv-taylor-conv", "noconv-channels",
        "moe"])
def test_logical_axes_and_param_count(kw):
    layers = math.lcm(len(ALL), len(kw.get("channel_pattern", ())) or 1)
    cfg = ModelConfig(num_layers=layers, pattern=ALL, **{**TINY, **kw})
    model = LanguageModel(cfg)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= set(AXIS_NAMES) | {None}, leaf.names
        assert any(n is not None for n in leaf.names), leaf.names
    n = sum(int(np.prod(x.value.shape)) for x in leaves)
    assert n == param_count(cfg) == documented_param_count(cfg)


@pytest.mark.parametrize("field, kw", [
    ("num_heads", dict(d_model=10, num_heads=3)),
    ("pattern", dict(pattern=("gdn", "mamba7"))),
    ("pattern", dict(pattern=())),
    ("pattern", dict(pattern=("swiglu",))),
    ("channel_pattern", dict(channel_pattern=("gdn",))),
    ("mixers.swa.window", dict(pattern=("swa",), mixers={"swa": {"window": 0}})),
    ("num_layers", dict(num_layers=3, pattern=("gdn", "swa"))),
    ("num_layers", dict(num_layers=4, channel_pattern=("swiglu", "none", "none"))),
    ("mixers.attn.num_kv_heads", dict(pattern=("attn",), mixers={"attn": {"num_kv_heads": 3}})),
    ("dtype", dict(dtype="float16")),
    ("remat", dict(remat="some")),
    ("mixers.la.feature_map", dict(pattern=("la",), mixers={"la": {"feature_map": "relu"}})),
    ("chunk_size", dict(chunk_size=6)),
    ("mixers.gdn.short_conv", dict(mixers={"gdn": {"short_conv": "yes"}})),
    ("mixers.gdn.expand_v", dict(mixers={"gdn": {"expand_v": 0.3}})),
    ("mixers.gdn.expnd_v", dict(mixers={"gdn": {"expnd_v": 2.0}})),
    ("mixers.kda.lower_bound", dict(pattern=("kda",), mixers={"kda": {"lower_bound": 0.0}})),
    ("mixers.kda.num_v_heads", dict(pattern=("kda",), mixers={"kda": {"num_v_heads": 3}})),
    ("mixers", dict(mixers={"mamba7": {}})),
    ("mixers", dict(mixers=[1, 2])),
    ("head_dim", dict(pattern=("attn",), head_dim=3)),
])
def test_bad_config_names_the_field(field, kw):
    base = dict(vocab_size=11, d_model=16, num_layers=2, num_heads=2, pattern=("gdn",))
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**{**base, **kw})


def test_unknown_setting_error_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"known: \['allow_neg_eigval', 'conv_size', 'expand_v'"):
        tiny(("gdn",), mixers={"gdn": {"expnd_v": 2.0}})
    with pytest.raises(ValueError, match="known: .*'gdn'"):
        tiny(("gdn",), mixers={"gdnn": {}})


def test_config_json_round_trip_and_equality():
    cfg = tiny(("gdn", "swa"), num_layers=4, mixers={"attn": {"num_kv_heads": 1}})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert isinstance(d["pattern"], list) and d["mixers"]["swa"]["window"] == 3
    assert "attn" not in d["mixers"]          # settings of mechanisms the model does not use
    assert ModelConfig.from_dict(d) == cfg
    assert hash(ModelConfig.from_dict(d)) == hash(cfg)
    # Spelling out a default builds the same model, so the configs are equal.
    assert tiny(("gdn", "swa"), num_layers=4, mixers={"gdn": {"expand_v": 1.0}}) == cfg


def test_flat_fields_of_old_checkpoints_move_to_mixers():
    old = dict(vocab_size=37, d_model=16, num_layers=2, num_heads=2, pattern=["gdn", "swa"],
               window=5, expand_v=2.0, use_mlp=False, short_conv=True, d_ff=None,
               num_kv_heads=None, attn_sinks=False)
    with pytest.warns(DeprecationWarning, match="window"):
        cfg = ModelConfig.from_dict(old)
    # The migrated values, every other setting at its registered default.
    defaults = {f: s.default for f, s in registry.get("swa").settings.items()}
    assert defaults["window"] != 5 and not defaults["short_conv"]
    assert cfg.settings("swa") == {**defaults, "window": 5, "short_conv": True}
    assert cfg.settings("gdn")["expand_v"] == 2.0
    assert cfg.channel_pattern == ("none",)


def test_channel_pattern_places_mlps_by_layer(rng):
    """channel_pattern repeats on its own period: with scan_layers the group is the lcm of the
    two patterns, and the scanned model computes what the plain one does."""
    cfg = tiny(("gdn", "swa"), num_layers=6, channel_pattern=("none", "swiglu", "none"))
    assert [cfg.layer_kinds(i) for i in range(6)] == [
        ("gdn", "none"), ("swa", "swiglu"), ("gdn", "none"),
        ("swa", "none"), ("gdn", "swiglu"), ("swa", "none")]
    model, params = _init(cfg)
    p = params["params"]
    assert [i for i in range(6) if "mlp" in p[f"layer_{i}"]] == [1, 4]
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    ref = jax.jit(model.apply)(params, tokens)
    scfg = dataclasses.replace(cfg, scan_layers=True)
    assert scfg.group_size == 6 and scfg.num_groups == 1
    sp = {"params": {"embed": p["embed"], "final_norm": p["final_norm"],
                     "groups": {f"block_{j}": jax.tree.map(lambda a: a[None], p[f"layer_{j}"])
                                for j in range(6)}}}
    np.testing.assert_allclose(jax.jit(LanguageModel(scfg).apply)(sp, tokens), ref, atol=1e-5)


def test_scan_remat_match_plain(rng):
    # lightning's decays depend on the layer index, which the scan must pass through.
    cfg = tiny(("lightning", "swa"), num_layers=4)
    model, params = _init(cfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    ref = jax.jit(model.apply)(params, tokens)
    # The scanned model's params are the plain model's, stacked over the groups.
    scfg = dataclasses.replace(cfg, scan_layers=True, remat="dots")
    smodel = LanguageModel(scfg)
    p = params["params"]
    groups = {f"block_{j}": jax.tree.map(lambda *a: jnp.stack(a),
                                         *[p[f"layer_{g * 2 + j}"] for g in range(2)])
              for j in range(2)}
    sp = {"params": {"embed": p["embed"], "final_norm": p["final_norm"], "groups": groups}}
    np.testing.assert_allclose(jax.jit(smodel.apply)(sp, tokens), ref, atol=1e-5)
    # Cached decoding through the scan: prefill + steps == the plain model's forward.
    last, cache = prefill(smodel, sp, tokens[:, :5], 9)
    logits = [last]
    for t in range(5, 9):
        step_logits, cache = decode_step(smodel, sp, tokens[:, t], cache)
        logits.append(step_logits)
    np.testing.assert_allclose(jnp.stack(logits, 1), ref[:, 4:], atol=2e-4, rtol=2e-4)


# Norm-relative logit error of bfloat16 compute against float32, 2-layer models, init_std 0.1,
# 8 x 64 tokens: at most 0.0154 (lightning) and 0.0075 (swa) over 20 seeds; the bounds are
# about twice that. init_std 0.1 because at the default 0.02 the mixers barely move the logits
# (a mixer's output 5% off changes them by under 1%, bf16 rounding alone by 0.4%): a wrong bf16
# mixer would not show.
BF16_REL_BOUND = {"lightning": 0.03, "swa": 0.015}


@pytest.mark.parametrize("mixer", sorted(BF16_REL_BOUND))
def test_bfloat16_compute_close_to_float32(mixer, rng):
    cfg = tiny((mixer,), num_layers=2, init_std=0.1)
    model, params = _init(cfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 64)), jnp.int32)
    fwd = jax.jit(model.apply)
    ref = fwd(params, tokens)
    rel = lambda logits: float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    lb = jax.jit(LanguageModel(dataclasses.replace(cfg, dtype="bfloat16")).apply)(params, tokens)
    assert lb.dtype == jnp.float32
    bound = BF16_REL_BOUND[mixer]
    # Above 1e-3: the model really computed in bfloat16 (float32 would agree to ~1e-7).
    assert 1e-3 < rel(lb) < bound, rel(lb)
    # The bound is tight enough to matter: either mixer's output 10% off lands outside it.
    for layer in ("layer_0", "layer_1"):
        wrong = jax.tree.map(lambda x: x, params)
        wrong["params"][layer]["mixer"]["o_proj"]["kernel"] *= 1.1
        assert rel(fwd(wrong, tokens)) > bound, layer


def test_loss_goes_down_with_sgd(rng):
    cfg = tiny(("gdn",), remat="full")
    model, params = _init(cfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 9)), jnp.int32)

    def loss_fn(p):
        logits = model.apply(p, tokens[:, :-1])
        lp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

    @jax.jit
    def step(p):
        loss, g = jax.value_and_grad(loss_fn)(p)
        return jax.tree.map(lambda a, b: a - 1.0 * b, p, g), loss

    losses = []
    for _ in range(4):
        params, loss = step(params)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.1, losses


def test_chunked_prefill_matches_full_forward(rng):
    """Feeding a sequence through the cache in chunks (the ring already filled, recurrent
    states carried) gives the full forward's logits."""
    from mem_lm import init_cache
    cfg = tiny(("swa", "ssd"), num_layers=2)   # ring, conv inputs and state carried
    model, params = _init(cfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 15)), jnp.int32)
    full = jax.jit(model.apply)(params, tokens)
    cache = init_cache(cfg, 2, 15)
    apply = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
    outs = []
    for s, e in ((0, 5), (5, 15)):
        logits, cache = apply(params, tokens[:, s:e], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-4, rtol=2e-4)


def test_pallas_impl_gradients_under_scan_and_remat(rng):
    """impl="pallas" (interpret mode on CPU) differentiates inside the scanned, rematerialised
    block stack (nn.scan + nn.remat with the "dots" policy: the kernels' custom_vjp under
    lax.scan and jax.checkpoint) and gives the same loss gradients as impl="xla" on the same
    params. gdn and gla reach both pallas ops (gated delta rule with g, linear attention with
    gk); T = 21 with chunk 16 leaves a partial chunk."""
    cfg = tiny(("gdn", "gla"), num_layers=4, scan_layers=True, remat="dots", impl="xla",
               chunk_size=16)
    model, params = _init(cfg)
    pallas_model = LanguageModel(dataclasses.replace(cfg, impl="pallas"))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 22)), jnp.int32)

    def grads(model):
        def loss_fn(p):
            lp = jax.nn.log_softmax(model.apply(p, tokens[:, :-1]))
            return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))
        return jax.jit(jax.value_and_grad(loss_fn))(params)

    (loss, want), (loss_p, got) = grads(model), grads(pallas_model)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    assert len(flat_want) == len(jax.tree.leaves(got))
    for (path, w), g in zip(flat_want, jax.tree.leaves(got)):
        w, g = np.asarray(w), np.asarray(g)
        assert np.abs(w).max() > 0, f"{jax.tree_util.keystr(path)}: zero gradient"
        err = np.abs(g - w).max() / np.abs(w).max()
        assert err < 1e-4, f"{jax.tree_util.keystr(path)}: relative error {err:.3g}"
