import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import every_token_mixer, get_config
from mem_lm.config import ModelConfig, token_mixers
from mem_lm.model import LanguageModel
from train.optim import learning_rate_schedule, make_optimizer, weight_decay_mask

MIXERS = token_mixers()


def test_no_weight_decay_on_norms_biases_gates_and_vectors():
    params = {"embed": {"embedding": jnp.ones((8, 4))},
              "layer_0": {"mixer": {"q_proj": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((4,))},
                                    "A_log": jnp.ones((2,)), "a_proj": {"kernel": jnp.ones((4, 2))},
                                    "gk_proj_b": {"kernel": jnp.ones((4, 2, 2))}},
                          "mlp": {"w_gate": {"kernel": jnp.ones((4, 8))}},
                          "mixer_norm": {"scale": jnp.ones((4,))}}}
    mask = weight_decay_mask(params, get_config().optim.no_decay_patterns)
    assert mask["embed"]["embedding"] and mask["layer_0"]["mixer"]["q_proj"]["kernel"]
    assert not mask["layer_0"]["mixer"]["q_proj"]["bias"]
    assert not mask["layer_0"]["mixer"]["A_log"] and not mask["layer_0"]["mixer_norm"]["scale"]
    assert not mask["layer_0"]["mixer"]["a_proj"]["kernel"] and not mask["layer_0"]["mixer"]["gk_proj_b"]["kernel"]
    assert mask["layer_0"]["mlp"]["w_gate"]["kernel"]   # SwiGLU's gate is an ordinary matrix


# What every mixer's parameters are, by the name inside a block: never decayed (norm scales,
# biases, per-head gate parameters, the decay/step gate projections) or decayed (the matrices).
# Titans MAG / MAC keep parts in submodules: mixer/attn, mixer/memory, mixer/cell(/memory).
SUB = r"((attn|memory|cell|cell/memory)/)?"
NO_DECAY = re.compile(r"(^|/)(final_norm|mixer_norm|mlp_norm|o_norm|attn_out_norm|"
                      r"memory_out_norm|read_norm|q_norm|kv_norm)/scale$|/bias$|"
                      rf"/mixer/{SUB}(A_log|D|dt_bias|sinks|lr_bias|momentum_bias|decay_bias)$|"
                      rf"/mixer/{SUB}(memory_w1|memory_w2)$|"   # titans' learned initial memory
                      rf"/mixer/{SUB}(persistent_k|persistent_v)$|"   # its persistent tokens
                      # brt's attention temperatures, state norm, gate biases, learned
                      # initial state and state position embeddings
                      r"/mixer/((state_)?(attn|cross)_scale|state_norm|(gate|forget|input)_bias|"
                      r"initial_state|state_pos)$|"
                      rf"/mixer/{SUB}(shared_)?(a_proj|b_proj|dt_proj|gk_proj_a|gk_proj_b|"
                      r"lr_proj|momentum_proj|decay_proj)/kernel$")
DECAY = re.compile(r"^embed/embedding$|^lm_head/kernel$|/mlp/(w_gate|w_up|w_out)/kernel$|"
                   rf"/mixer/{SUB}(shared_)?(q_proj|k_proj|v_proj|o_proj|g_proj|g_proj_a|g_proj_b|"
                   r"q_conv|k_conv|"
                   r"v_conv|k_branches_conv|v_branches_conv|router|z_proj|x_proj|B_proj|C_proj|"
                   r"x_conv|B_conv|C_conv|q2_proj|read_q_proj|read_conv|read_proj|"
                   r"q_down_proj|q_up_proj|kv_down_proj|kv_up_proj)/kernel$|"
                   r"/mixer/(state_q|state_k|state_v|state_q2|state_out|forget_gate|input_gate)$")


def _names(params, scan: bool, groups: int, pattern_len: int):
    """{path with the layer index removed ("block_j/mixer/A_log"): (per-layer shape, leaf)}:
    layer_i of the unscanned model is block_{i % len(pattern)}; the scanned model's params are
    groups/block_j with a leading axis of one entry per group."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        shape = getattr(nn.meta.unbox(leaf), "shape", None)
        if scan and name.startswith("groups/"):
            name = name[len("groups/"):]
            if shape is not None:
                assert shape[0] == groups, (name, shape)
                shape = shape[1:]
        elif not scan and name.startswith("layer_"):
            i, rest = name[len("layer_"):].split("/", 1)
            name = f"block_{int(i) % pattern_len}/{rest}"
        out[name] = (shape, leaf)
    return out


@pytest.fixture(scope="module")
def every_mixer_params():
    """Boxed param shapes (no compile) of a tiny model with every mixer, short convs, sinks and
    an untied head, two pattern groups; for scan_layers False and True."""
    out = {}
    for scan in (False, True):
        mixers = every_token_mixer(short_conv=True)
        mixers["attn"].update(sinks=True)
        mixers["gla"].update(gate_rank=4)
        mixers["la"].update(feature_dim=4)
        cfg = ModelConfig(vocab_size=16, d_model=16, num_layers=2 * len(MIXERS), num_heads=2,
                          pattern=MIXERS, mixers={**mixers, "swiglu": {"d_ff": 16}},
                          tie_embeddings=False, chunk_size=8, scan_layers=scan)
        out[scan] = jax.eval_shape(lambda: LanguageModel(cfg).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return out


def test_weight_decay_follows_names_same_with_and_without_scan_layers(every_mixer_params):
    patterns = get_config().optim.no_decay_patterns
    decayed = {}
    for scan, boxed in every_mixer_params.items():
        params = _names(nn.meta.unbox(boxed), scan, 2, len(MIXERS))
        mask = _names(weight_decay_mask(nn.meta.unbox(boxed), patterns), scan, 2, len(MIXERS))
        assert mask.keys() == params.keys()
        # Boxed (logically partitioned) params get the same mask, in boxes.
        assert nn.meta.unbox(weight_decay_mask(boxed, patterns)) == \
            weight_decay_mask(nn.meta.unbox(boxed), patterns)
        for name, (shape, _) in params.items():
            exempt, matrix = NO_DECAY.search(name), DECAY.search(name)
            assert bool(exempt) != bool(matrix), \
                f"{name} {shape}: classify it (no_decay_patterns, and NO_DECAY or DECAY here)"
            if matrix:
                assert len(shape) >= 2 and mask[name][1] is True, f"{name} {shape} is not decayed"
            else:
                assert mask[name][1] is False, f"{name} {shape} is decayed (scan_layers={scan})"
            if len(shape) < 2:   # a per-layer vector or scalar: never decayed
                assert mask[name][1] is False, name
        decayed[scan] = {n for n, (_, m) in mask.items() if m}
    assert decayed[True] == decayed[False]
    names = set(_names(nn.meta.unbox(every_mixer_params[False]), False, 2, len(MIXERS)))
    for want in ("A_log", "D", "dt_bias", "sinks", "o_norm/scale", "gk_proj_b/bias",
                 "conv/kernel", "lm_head/kernel"):   # the model really has them all
        assert any(n.endswith(want) for n in names), want


def test_bad_no_decay_pattern_names_the_field():
    with pytest.raises(ValueError, match="optim.no_decay_patterns: '\\(' is not a regex"):
        weight_decay_mask({"w": jnp.ones((2, 2))}, "norm,(")


def test_schedule_warmup_then_cosine_to_end_factor():
    o = get_config().optim
    o.update(learning_rate=1.0, warmup_steps=10, decay_steps=110, end_lr_factor=0.1)
    s = learning_rate_schedule(o)
    assert float(s(0)) == 0.0 and np.isclose(float(s(5)), 0.5) and np.isclose(float(s(10)), 1.0)
    assert np.isclose(float(s(110)), 0.1) and np.isclose(float(s(60)), 0.55, atol=1e-3)


def test_clipping_and_decay_applied():
    o = get_config().optim
    o.update(learning_rate=0.1, warmup_steps=0, decay_steps=10, grad_clip_norm=1.0, weight_decay=0.5)
    tx = make_optimizer(o)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    state = tx.init(params)
    grads = {"w": jnp.zeros((2, 2)), "norm": {"scale": jnp.zeros((2,))}}
    upd, _ = tx.update(grads, state, params)
    assert float(jnp.abs(upd["w"]).max()) > 0          # decay moves w with zero gradient
    assert float(jnp.abs(upd["norm"]["scale"]).max()) == 0.0


def test_no_weight_decay_on_rmt_segment_memory():
    """RMT's learned first memory is a state, like brt's initial_state: not decayed (decay would
    pull the m vectors to zero and together); the embeddings beside it are."""
    for scan in (False, True):
        cfg = ModelConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, pattern=("attn",),
                          scan_layers=scan, segments={"length": 4, "memory_tokens": 2})
        params = jax.eval_shape(lambda: LanguageModel(cfg).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
        mask = weight_decay_mask(nn.meta.unbox(params), get_config().optim.no_decay_patterns)
        assert mask["segment_memory"] is False and mask["embed"]["embedding"] is True
