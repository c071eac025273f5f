"""`load_pretrained(workdir, mesh=, rules=)` on 4 simulated CPU devices (mesh data=1, fsdp=2,
tensor=2; configs/base.py's default logical rules): the imported Qwen3-Next fixture
(tests/fixtures/hf/qwen3_next, through `python -m mem_lm.convert --from hf`) lands with each
parameter sharded by its logical axes (the experts' kernels split by expert over tensor, their
embed axis over fsdp), and the sharded model's logits are transformers'.

The devices need XLA_FLAGS before JAX starts, so the test runs this file as a subprocess."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "layers"))
from simulated_devices import run_with_devices  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "qwen3_next"
MESH = (1, 2, 2)           # data, fsdp, tensor


def worker(out):
    import jax
    import numpy as np

    from configs.base import get_config
    from mem_lm import load_pretrained
    from mem_lm.convert import main
    from train.config import logical_axis_rules
    from train.sharding import make_mesh

    assert jax.device_count() == 4, jax.devices()
    workdir = os.path.join(os.path.dirname(out), "imported")
    assert main(["--from", "hf", str(FIXTURE), "--out", workdir]) == 0
    config = get_config()
    mesh = make_mesh(MESH)
    model, variables = load_pretrained(workdir, mesh=mesh, rules=logical_axis_rules(config))
    p = variables["params"]
    experts = p["layer_1"]["mlp"]["w_gate"]                  # [E, embed, mlp]
    e = np.load(FIXTURE / "expected.npz")
    logits = np.asarray(jax.jit(model.apply)(variables, e["tokens"].astype(np.int32)))
    with open(out, "w") as f:
        json.dump({"experts_spec": list(map(str, experts.sharding.spec)),
                   "expert_shard": list(experts.addressable_shards[0].data.shape),
                   "expert_shape": list(experts.shape),
                   "embed_spec": list(map(str, p["embed"]["embedding"].sharding.spec)),
                   "rel": float(np.abs(logits - e["logits"]).max()
                                / np.abs(e["logits"]).max())}, f)


@pytest.mark.slow          # ~10 s: a subprocess that imports, converts and compiles
def test_load_pretrained_places_params_on_a_mesh(tmp_path):
    out = tmp_path / "result.json"
    run_with_devices(__file__, out, devices=4)
    r = json.loads(out.read_text())
    assert r["experts_spec"] == ["tensor", "fsdp", "None"], r
    E, d, F = r["expert_shape"]
    assert r["expert_shard"] == [E // 2, d // 2, F], r
    assert r["embed_spec"] == ["tensor", "fsdp"], r
    assert r["rel"] <= 1e-4, r


if __name__ == "__main__":
    worker(sys.argv[1])
