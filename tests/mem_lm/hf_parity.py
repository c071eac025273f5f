"""What the transformers-checkpoint tests (test_convert_hf_qwen3_next.py,
test_convert_hf_kimi_linear.py) share: the fixtures under tests/fixtures/hf (made by
tests/fixtures/make_hf_*_fixtures.py with transformers' own modelling code) and the two
parity checks every imported architecture passes."""
import json
import os

import jax
import numpy as np
from safetensors.numpy import load_file

from mem_lm import LanguageModel, generate
from mem_lm.convert import config_from_hf, config_to_hf, export_hf, import_hf

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
REL_TOL = 1e-4      # max |logit diff| / max |logit|


def fixture(kind):
    """(checkpoint dir, expected.npz as a dict: tokens, logits, generated)."""
    path = os.path.join(FIXTURES, kind)
    return path, dict(np.load(os.path.join(path, "expected.npz")))


def hf_config(kind):
    with open(os.path.join(FIXTURES, kind, "config.json")) as f:
        return json.load(f)


def check_import_and_export(kind, pattern, channels, out_dir):
    """The import has the expected layout and transformers' logits (≤ REL_TOL); the export
    writes every original tensor back bit for bit and re-imports to the same config and params.
    Returns (config_to_hf of the import, the fixture's config.json) for per-model checks."""
    path, e = fixture(kind)
    cfg, params = import_hf(path)
    assert (cfg.pattern, cfg.channel_pattern) == (pattern, channels)
    logits = np.asarray(jax.jit(LanguageModel(cfg).apply)({"params": params},
                                                          e["tokens"].astype(np.int32)))
    rel = np.abs(logits - e["logits"]).max() / np.abs(e["logits"]).max()
    assert rel <= REL_TOL, f"max |logit diff| / max |logit| vs transformers = {rel:.1e}"

    export_hf(cfg, params, str(out_dir))
    original = load_file(os.path.join(path, "model.safetensors"))
    exported = load_file(os.path.join(str(out_dir), "model.safetensors"))
    assert set(exported) == set(original)
    for name, w in exported.items():
        assert w.shape == original[name].shape and w.tobytes() == original[name].tobytes(), name
    cfg2, params2 = import_hf(str(out_dir))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    ours = config_to_hf(cfg)
    assert config_from_hf(ours) == cfg
    return ours, hf_config(kind)


def check_greedy_generation(kind):
    """mem_lm.generate (prefill + our decode caches) continues the fixture's prompt with the
    greedy tokens transformers generated with its own caches."""
    path, e = fixture(kind)
    cfg, params = import_hf(path)
    prompt = e["tokens"].astype(np.int32)
    new = e["generated"].shape[1] - prompt.shape[1]
    out = generate(LanguageModel(cfg), {"params": params}, prompt, new)
    np.testing.assert_array_equal(np.asarray(out), e["generated"])
