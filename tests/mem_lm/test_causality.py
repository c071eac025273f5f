"""Teacher-forced causality of the whole model: changing the tokens after position t leaves the
logits at positions <= t unchanged, for every registered token mixer (with its defaults, so a
new mechanism is tested by registering) and for the settings that change which keys a query
sees: top-k blocks with each score, sliding windows, NSA with a selection that selects, MoM
with a capacity, short convs, memory layers and the sparse MoE in the MLP slot, packed
documents, and the cascading cache (which acts only with a cache: there the prompt goes through
the cache in one call).

Each case is one model and one compiled call, fed a batch that stacks the sequence and its
perturbations (several per cut, so that a leak through a discrete choice, such as a block
selection, is not missed by chance): at every cut t, the perturbed rows' logits at <= t must
equal the original row's.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mem_lm import LanguageModel, ModelConfig, token_mixers
from mem_lm.model import init_cache

T = 16
# Cuts inside a 4-token block (the top-k blocks here are 4 tokens, NSA's 2), at a block's last
# token and right after a block boundary.
CUTS = (2, 6, 9, 11, 12)
PERTURBATIONS = 3           # per cut
TINY = dict(vocab_size=37, d_model=16, num_heads=2, chunk_size=4)

# Per registered mixer, settings under which its mechanism acts at T = 16 (with the defaults a
# window or a selection would cover every key); a mixer missing here is tested with its
# defaults.
ACTIVE = {
    "swa": {"window": 3},
    # 8 selection blocks of 2 tokens and a window of 2: sel_blocks = 5 (the initial, previous
    # and own blocks included) leaves 2 blocks to importance.
    "nsa": {"cmp_block": 4, "cmp_stride": 2, "sel_block": 2, "sel_blocks": 5, "window": 2},
    # Tokens past a memory's capacity are dropped: which ones must not depend on later tokens.
    "mom": {"capacity_factor": 0.5},
    # Windows of 4: cuts inside a window, at its last token and after it; state updates at
    # 3, 7, 11.
    "brt": {"window": 4, "state_size": 4},
    # Titans MAG: a window of 3 beside the memory; MAC: segments of 4 (cuts inside segments,
    # at a segment's last token and after it), chunks of 2.
    "titans_mag": {"window": 3, "memory_chunk": 2},
    "titans_mac": {"segment_length": 4, "memory_chunk": 2},
}
# 4 blocks of 4 tokens, one selected, a one-token window.
TOPK = {"topk_blocks": 1, "topk_block_size": 4, "topk_window": 1}
MEMORY = {"n_keys": 4, "heads": 2, "topk": 2, "k_dim": 8}


def case(name, pattern, mixers=None, channels=("swiglu",), packed=False, cached=False,
         slow=False, **model):
    """`model`: other ModelConfig fields (segment recurrence)."""
    return pytest.param(tuple(pattern), channels, mixers or {}, packed, cached, model, id=name,
                        marks=[pytest.mark.slow] if slow else [])


def _short_conv_off():
    """The mixers whose short convs are off by default."""
    from layers import registry
    conv = {m: registry.get(m).settings.get("short_conv") for m in token_mixers()}
    return [m for m, s in conv.items() if s is not None and not s.default]


CASES = [case(m, (m,), {m: ACTIVE.get(m, {})}) for m in token_mixers()] + [
    case("attn-topk-bound", ("attn",), {"attn": {**TOPK, "topk_score": "bound"}}),
    case("attn-topk-mean", ("attn",), {"attn": {**TOPK, "topk_score": "mean"}}),
    # Prefill: the prompt in one call through the decode cache.
    case("attn-topk-prefill", ("attn",), {"attn": TOPK}, cached=True),
    case("attn-topk-mean-prefill", ("attn",), {"attn": {**TOPK, "topk_score": "mean"}},
         cached=True, slow=True),
    # The cascading cache acts only with a cache: 8 slots for 16 tokens, so the prompt evicts.
    case("attn-cascade-prefill", ("attn",),
         {"attn": {"cache": "cascade", "cache_size": 8, "cache_sinks": 1, "cascades": 2}},
         cached=True),
    # Qwen3-Next's gated attention (output gate, q/k norms with (1 + w) scales, partial RoPE)
    # over packed documents.
    case("attn-gated-packed", ("attn",),
         {"attn": {"output_gate": True, "qk_norm": True, "rope_fraction": 0.5}}, packed=True,
         zero_centred_norms=True),
    # mla (default: Kimi's NoPE above) in DeepSeek's form, the prompt through its latent cache.
    case("mla-rope-prefill", ("mla",), {"mla": {"rope": True, "q_lora_rank": 4}}, cached=True),
    case("mom-defaults", ("mom",), slow=True),
    # fla's variants: q convolved over each memory's own tokens; NSA with mean-pooled
    # compression, one k/v for the branches and no window branch.
    case("mom-q-conv-per-memory", ("mom",),
         {"mom": {**ACTIVE["mom"], "q_conv_per_memory": True}}, slow=True),
    case("nsa-fla", ("nsa",), {"nsa": {**ACTIVE["nsa"], "compress": "mean", "shared_kv": True,
                                       "window": 0}}, slow=True),
    # Packed documents through a hybrid with short convs, memory layers in the MLP slot and
    # NSA's block-granular selection (one-block lag).
    case("hybrid-memory-packed", ("attn", "swa", "nsa"),
         {"attn": {**TOPK, "short_conv": True}, "swa": {**ACTIVE["swa"], "short_conv": True},
          "nsa": {**ACTIVE["nsa"], "selection": "block", "short_conv": True},
          "pkm": MEMORY, "memory_plus": MEMORY}, channels=("pkm", "memory_plus", "swiglu"),
         packed=True),
    # The sparse MoE in the MLP slot (a per-token routing: no token's experts depend on
    # another's), with both routers.
    case("moe-packed", ("gdn", "swa"),
         {"swa": ACTIVE["swa"], "moe": {"num_experts": 4, "top_k": 2, "d_expert": 8,
                                         "d_shared": 8, "shared_gate": True}},
         channels=("moe",), packed=True),
    case("moe-sigmoid", ("swa",),
         {"swa": ACTIVE["swa"], "moe": {"num_experts": 8, "top_k": 2, "d_expert": 8,
                                         "router": "sigmoid", "score_correction_bias": True,
                                         "n_group": 4, "topk_group": 2}},
         channels=("moe",)),
    case("short-convs", _short_conv_off(),
         {m: {**ACTIVE.get(m, {}), "short_conv": True} for m in _short_conv_off()}, slow=True),
    case("every-mixer-packed", token_mixers(), {m: ACTIVE.get(m, {}) for m in token_mixers()},
         packed=True, slow=True),
    # RMT over a hybrid: segments of 5 (cuts inside segments and on their last token), the
    # memory carrying each segment's tokens to the next ones.
    case("rmt-gdn-swa", ("gdn", "swa"), {"swa": ACTIVE["swa"]},
         segments={"kind": "rmt", "length": 5, "memory_tokens": 2}),
    # ARMT over attention: every layer's associative memory written at the memory tokens
    # after each segment of 5 and read by every token of the later ones.
    case("armt-attn", ("attn",), segments={"kind": "armt", "length": 5, "memory_tokens": 2,
                                           "d_mem": 4, "nu": 2}),
]


def _batch(rng, vocab):
    """[1 + len(CUTS) * PERTURBATIONS, T] tokens: the sequence, then per cut t its copies with
    every token after t redrawn (each different from the original's)."""
    x = rng.integers(0, vocab, T)
    rows = [x]
    for t in CUTS:
        for _ in range(PERTURBATIONS):
            y = x.copy()
            y[t + 1:] = (x[t + 1:] + rng.integers(1, vocab, T - t - 1)) % vocab
            rows.append(y)
    return jnp.asarray(np.stack(rows), jnp.int32)


def _segments():
    """Segment ids like `_batch`'s rows: documents of 5, 7 and 4 tokens, and per cut ids after
    it that cut the rest into other documents (later documents must not matter either)."""
    seg = np.repeat([1, 2, 3], [5, 7, 4])
    rows = [seg]
    for t in CUTS:
        for p in range(PERTURBATIONS):
            s = seg.copy()
            s[t + 1:] = 7 + (np.arange(T - t - 1) + p) // (p + 1)
            rows.append(s)
    return jnp.asarray(np.stack(rows), jnp.int32)


def _compile(fn, *args):
    # Unoptimised machine code: a third of the compile time, and every row of the batch runs
    # the same code, which is all the comparison needs.
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})


@pytest.mark.parametrize("pattern, channels, mixers, packed, cached, model_kw", CASES)
def test_logits_before_a_cut_do_not_see_tokens_after_it(pattern, channels, mixers, packed,
                                                        cached, model_kw, rng):
    cfg = ModelConfig(num_layers=math.lcm(len(pattern), len(channels)), pattern=pattern,
                      channel_pattern=channels, mixers=mixers, **TINY, **model_kw)
    model = LanguageModel(cfg)
    tokens = _batch(rng, cfg.vocab_size)
    B = tokens.shape[0]
    # Random parameters of a useful size (no compiled init): sharp attention and gates.
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens[:1]))
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                          shapes)
    if cached:
        logits = _compile(lambda p, x: model.apply(p, x, cache=init_cache(cfg, B, T))[0],
                          params, tokens)(params, tokens)
    else:
        seg = _segments() if packed else None
        logits = _compile(lambda p, x, s: model.apply(p, x, segment_ids=s),
                          params, tokens, seg)(params, tokens, seg)
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    scale = np.abs(logits[0]).max()
    row = 1
    for t in CUTS:
        for _ in range(PERTURBATIONS):
            np.testing.assert_allclose(logits[row, :t + 1], logits[0, :t + 1], rtol=0,
                                       atol=1e-5 * scale, err_msg=f"tokens after t = {t} "
                                                                  f"changed the logits at <= t")
            row += 1
    # The perturbations do reach the positions after each cut (the check is not vacuous).
    assert np.abs(logits[1:, -1] - logits[0, -1]).max() > 1e-3 * scale
