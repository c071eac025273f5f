"""Bad configs fail before anything compiles, with an error naming the field."""
import subprocess
import sys

import pytest

from train_testlib import TINY, subprocess_env
from configs.tiny import get_config
from train.config import ConfigError, resolve


def _err(mutate, num_devices=8, process_count=1):
    c = get_config()
    mutate(c)
    with pytest.raises(ConfigError) as e:
        resolve(c, num_devices=num_devices, process_count=process_count)
    return str(e.value)


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.train.__setattr__("stpes", 3), "config.train.stpes: unknown field"),
    (lambda c: c.__setattr__("trian", {}), "config.trian: unknown field"),
    (lambda c: c.mesh.update(tensor=0), "config.mesh.tensor: must be a positive size or -1"),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), "config.mesh.fsdp: only one mesh axis may be -1"),
    (lambda c: c.mesh.update(data=-1, fsdp=3), "config.mesh.data: -1 cannot fill"),
    (lambda c: c.mesh.update(data=4, tensor=4), "config.mesh: shape (data, fsdp, tensor, context) = (4, 1, 4, 1) needs 16 devices, only 8 exist"),
    (lambda c: c.train.update(batch_size=12), "config.train.batch_size: train.batch_size is not divisible by the batch axes mesh.data*mesh.fsdp = 8"),
    (lambda c: c.train.update(batch_size=16, grad_accum_steps=4), "config.train.batch_size: train.batch_size / train.grad_accum_steps = 4"),
    (lambda c: c.train.update(grad_accum_steps=3), "config.train.batch_size: 8 is not divisible by train.grad_accum_steps=3"),
    (lambda c: c.train.update(steps=0), "config.train.steps: must be a positive integer"),
    (lambda c: c.train.update(compute_dtype="float16"), "config.train.compute_dtype"),
    (lambda c: c.data.update(source="wiki"), "config.data.source: 'wiki' is not one of"),
    (lambda c: c.data.update(source="text"), "config.data.paths: data.source='text' needs paths"),
    (lambda c: c.data.update(source="text", paths="/nonexistent/*.txt"), "config.data.paths: '/nonexistent/*.txt' is not a file, a directory or a glob"),
    (lambda c: c.model.update(vocab_size=100), "config.model.vocab_size: 100 is smaller than the data's vocabulary (256)"),
    (lambda c: c.model.update(num_heads=5), "config.model.num_heads: must divide d_model = 32"),
    (lambda c: c.model.mixers.swa.update(window=0), "config.model.mixers.swa.window: must be >= 1, got 0"),
    (lambda c: c.model.__setattr__("windw", 3), "config.model.windw: unknown field"),
    (lambda c: c.train.update(seed=-1), "config.train.seed: must be an integer >= 0"),
    (lambda c: c.optim.update(no_decay_patterns="norm,(bias"), "config.optim.no_decay_patterns: '(bias' is not a regex"),
    (lambda c: c.data.update(num_workers=-1), "config.data.num_workers: must be >= 0"),
    (lambda c: c.data.update(source="mqar", num_kv_pairs=10), "config.train.seq_len: `seq_len`=32 is too short for `num_kv_pairs`=10"),
    (lambda c: c.data.update(source="mqar", num_kv_pairs=4, power_a=0.0), "config.data.power_a: `power_a` must be a positive number"),
    (lambda c: c.data.update(source="copy", copy_length=0), "config.data.copy_length: must be >= 1"),
    (lambda c: c.sample.update(enabled=True, top_k=300), "config.sample.top_k: must be in [1, model.vocab_size = 256]"),
    (lambda c: c.rules.update(embed="model"), "config.rules.embed: 'model' is not a mesh axis"),
    (lambda c: c.optim.update(learning_rate=0.0), "config.optim.learning_rate: must be > 0"),
    (lambda c: c.optim.update(b2=1.0), "config.optim.b2"),
    (lambda c: c.data.update(source="mqar", num_kv_pairs=20), "config.data.num_kv_pairs: 20 pairs do not fit"),
])
def test_bad_config_names_the_field(mutate, field):
    assert field in _err(mutate)


def test_batch_must_split_over_processes():
    assert "config.train.batch_size: 8 is not divisible by the 3 processes" in _err(lambda c: None, 3, 3)


def test_multiprocess_mesh_must_use_all_devices():
    assert "must use them all" in _err(lambda c: c.mesh.update(data=2), 4, 2)


def test_resolve_fills_derived_fields():
    c = get_config()
    c.mesh.update(data=2, fsdp=-1, tensor=2)
    r = resolve(c, num_devices=8)
    assert (r.mesh.data, r.mesh.fsdp, r.mesh.tensor) == (2, 2, 2)
    assert r.model.vocab_size == 256 and r.optim.decay_steps == c.train.steps
    assert c.mesh.fsdp == -1  # the input is not modified


def test_cli_bad_overrides_are_named_errors(tmp_path):
    env = subprocess_env(devices=8)
    procs = [subprocess.Popen([sys.executable, "-m", "train", "--config", TINY, "--workdir", str(tmp_path),
                               *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for args in (["--config.train.stepz=3"],
                          ["--config.model.mixers.swa.windw=3"],
                          ["--config.train.steps=abc"],
                          ["--config.mesh.data=8", "--config.train.batch_size=12"],
                          ["--config.mesh.data=2", "--config.mesh.tensor=4",
                           "--config.model.pattern=('attn',)", "--validate_only"])]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out, first_line in zip(procs, outs, [
            "error: config.train.stepz: unknown field (did you mean 'steps'?); known fields of config.train: [",
            "error: config.model.mixers.swa.windw: unknown field (did you mean 'window'?); known fields of config.model.mixers.swa: [",
            "error: config.train.steps: cannot set it to 'abc': invalid literal for int()",
            "error: config.train.batch_size: train.batch_size is not divisible by the batch axes mesh.data*mesh.fsdp = 8"]):
        assert p.returncode == 2, out[-2000:]
        assert first_line in out and "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "config.json").exists()
    assert procs[4].returncode == 0 and '"tensor": 4' in outs[4], outs[4][-2000:]
    assert '"pattern": [\n      "attn"\n    ]' in outs[4], outs[4][-2000:]


def test_segment_settings_are_overridable_fields():
    """model.segments is None in the schema and a dict in a config file that sets it
    (configs/rmt_small.py): the command line may name its settings, and only those; bptt None
    (full) is an int placeholder there, so --config.model.segments.bptt=2 parses."""
    from configs.rmt_small import get_config as rmt_config
    from train.config import check_override

    for field in ("kind", "length", "memory_tokens", "bptt", "replay", "d_mem", "nu",
                  "correction"):     # every kind's settings (ARMT's too)
        check_override(f"model.segments.{field}")
    with pytest.raises(ConfigError, match=r"config.model.segments.lenght: unknown field \(did you "
                                          r"mean 'length'\?\)"):
        check_override("model.segments.lenght")
    c = rmt_config()
    assert c.model.segments.bptt is None and c.model.segments.to_dict()["bptt"] is None
    c.model.segments.bptt = 2
    r = resolve(c, num_devices=1)
    assert r.model.segments.bptt == 2 and r.model.segments.length == 64
