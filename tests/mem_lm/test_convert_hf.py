"""mem_lm.convert --from/--to hf against transformers' own modelling code: the fixtures
(tests/fixtures/hf/, made by tests/fixtures/make_hf_fixtures.py with torch 2.13 + transformers
5.24 on the CPU, their torch path) hold tiny random Mamba2ForCausalLM checkpoints and the logits
transformers computed for fixed prompts. No torch here."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mem_lm import LanguageModel, decode_step, load_pretrained, prefill
from mem_lm.convert import (ConversionError, config_from_hf, config_to_hf, export_hf,
                            import_hf, main)

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
KINDS = ("mamba2", "mamba2_tied")
REL_TOL = 1e-4      # max |logit diff| / max |logit|


def fixture(kind):
    path = os.path.join(FIXTURES, kind)
    e = np.load(os.path.join(path, "expected.npz"))
    return path, np.asarray(e["tokens"], np.int32), e["logits"]


def hf_config(kind):
    with open(os.path.join(FIXTURES, kind, "config.json")) as f:
        return json.load(f)


# mamba2: two groups of heads, conv bias, untied head. mamba2_tied: one group, no conv bias
# (imported as zero biases, so its export writes them), a width-3 conv, tied embeddings.
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_and_export_is_exact(kind, tmp_path):
    path, tokens, expected = fixture(kind)
    cfg, params = import_hf(path)
    assert cfg.pattern == ("ssd",) and cfg.channel_pattern == ("none",)
    logits = np.asarray(jax.jit(LanguageModel(cfg).apply)({"params": params}, tokens))
    rel = np.abs(logits - expected).max() / np.abs(expected).max()
    assert rel <= REL_TOL, f"max |logit diff| / max |logit| vs transformers = {rel:.1e}"

    export_hf(cfg, params, str(tmp_path))
    original = load_file(os.path.join(path, "model.safetensors"))
    exported = load_file(str(tmp_path / "model.safetensors"))
    no_bias = not hf_config(kind).get("use_conv_bias", True)
    for name, w in exported.items():
        if no_bias and name.endswith("conv1d.bias"):
            assert not w.any(), name
            continue
        assert w.shape == original[name].shape and w.tobytes() == original[name].tobytes(), name
    assert set(original) <= set(exported)
    cfg2, params2 = import_hf(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_decoding_continues_like_transformers():
    """Prefill 8 tokens, then decode the rest one at a time (the op's one-token step, the conv
    caches with biases, groups of heads): every step's logits are transformers'."""
    path, tokens, expected = fixture("mamba2")
    cfg, params = import_hf(path)
    model, variables = LanguageModel(cfg), {"params": params}
    T0, T = 8, tokens.shape[1]
    logits, cache = prefill(model, variables, tokens[:, :T0], T)
    steps = [logits]
    for t in range(T0, T):
        logits, cache = decode_step(model, variables, tokens[:, t], cache)
        steps.append(logits)
    want = expected[:, T0 - 1:]
    rel = np.abs(np.stack(steps, axis=1) - want).max() / np.abs(want).max()
    assert rel <= REL_TOL, f"max |logit diff| / max |logit| vs transformers = {rel:.1e}"


def test_config_fields():
    cfg = config_from_hf(hf_config("mamba2"))
    assert (cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_layers) == (16, 4, 8, 2)
    assert cfg.settings("ssd") == dict(d_state=8, ngroups=2, conv_size=4, short_conv=True)
    assert (cfg.norm_eps, cfg.tie_embeddings) == (1e-5, False)
    out = config_to_hf(cfg)
    assert {k: out[k] for k in ("expand", "n_groups", "state_size", "head_dim")} == \
        dict(expand=2, n_groups=2, state_size=8, head_dim=8)


@pytest.mark.parametrize("field, value, named", [
    ("use_bias", True, "use_bias"),
    ("time_step_limit", [0.0, 0.1], "time_step_limit"),
    ("hidden_act", "gelu", "hidden_act"),
    ("norm_before_gate", True, "norm_before_gate"),       # not a field of transformers' Mamba2
    ("expand", 3, "expand"),
    ("model_type", "mamba", "model_type"),
])
def test_unsupported_configs_are_named(field, value, named):
    with pytest.raises(ConversionError, match=named):
        config_from_hf({**hf_config("mamba2"), field: value})


def test_checkpoint_errors_name_the_tensors(tmp_path):
    src, _, _ = fixture("mamba2")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    broken = {n: w for n, w in tensors.items() if n != "backbone.layers.1.mixer.D"}
    broken["backbone.layers.0.mixer.extra"] = tensors["backbone.layers.0.mixer.D"]
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"layers\.1\.mixer\.D(.|\n)*mixer\.extra"):
        import_hf(str(tmp_path))
    wrong = dict(tensors)
    wrong["backbone.layers.0.mixer.in_proj.weight"] = wrong[
        "backbone.layers.0.mixer.in_proj.weight"][:-1]
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"in_proj\.weight: shape \(99, 16\)"):
        import_hf(str(tmp_path))


def test_export_refuses_what_mamba2_cannot_express():
    cfg = config_from_hf(hf_config("mamba2"))
    with pytest.raises(ConversionError, match="MLP"):
        config_to_hf(dataclasses.replace(cfg, channel_pattern=("swiglu",)))
    with pytest.raises(ConversionError, match="expand"):
        config_to_hf(dataclasses.replace(cfg, head_dim=6))


def test_cli_import_writes_a_loadable_workdir(tmp_path):
    src, _, _ = fixture("mamba2_tied")
    out = str(tmp_path / "imported")
    assert main(["--from", "hf", src, "--out", out]) == 0
    model, variables = load_pretrained(out)
    cfg, params = import_hf(src)
    assert model.config == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), params)
    assert main(["--to", "hf", out, "--out", str(tmp_path / "back")]) == 0
    assert import_hf(str(tmp_path / "back"))[0] == cfg
