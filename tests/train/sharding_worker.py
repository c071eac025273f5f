"""Run configs/tiny.py on meshes of 8 fake CPU devices in one process.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train/sharding_worker.py OUT.json ROOT STEPS [DxFxT ...]

The meshes default to MESHES.

Writes {mesh: {"losses": {step: loss}, "params": {path: {"spec", "shape", "shard"}}}}.
"""
import json
import sys
from pathlib import Path

import jax

from configs.tiny import get_config
from train import run

# The one-device reference is the uninterrupted tiny run of test_training.py: its first steps
# are the same (warmup does not depend on train.steps), and one compile fewer here.
MESHES = ("8x1x1", "1x4x2", "2x2x2")


def tiny(steps: int, mesh):
    c = get_config()
    c.train.update(steps=steps, eval_every=0, eval_batches=0, log_every=1)
    c.checkpoint.enabled = False
    c.logging.tensorboard = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def main(out, root, steps, meshes=MESHES):
    assert jax.device_count() == 8, jax.devices()
    result = {}
    for name in meshes:
        wd = Path(root) / name
        mesh = tuple(int(n) for n in name.split("x"))
        params = run(tiny(steps, mesh), str(wd), return_state=True)["state"]["params"]
        losses = {}
        for line in open(wd / "metrics.jsonl"):
            row = json.loads(line)
            if "loss" in row:
                losses[row["step"]] = row["loss"]
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        info = {jax.tree_util.keystr(p): dict(spec=str(x.sharding.spec), shape=list(x.shape),
                                              shard=list(x.addressable_shards[0].data.shape),
                                              devices=len(x.sharding.device_set))
                for p, x in flat}
        result[name] = dict(losses=losses, params=info)
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), tuple(sys.argv[4:]) or MESHES)
