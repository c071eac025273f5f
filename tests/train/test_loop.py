"""A non-finite loss skips the update and is counted; N in a row stop the run, keeping the last
good checkpoint."""
import json

import numpy as np
import pytest

from configs import base
from configs.tiny import get_config
from train import data as data_lib
from train.config import resolve
from train.loop import NonFiniteError, Trainer, progress_line, run


def _config():
    c = get_config()
    # The mechanism does not depend on the mixer: the cheapest model to compile.
    c.model = base.model_config(d_model=16, num_layers=1, num_heads=1, pattern=("attn",),
                                  channel_pattern=("none",))
    c.train.update(steps=12, eval_every=0, eval_batches=0, checkpoint_every=4, max_consecutive_nonfinite=3)
    c.logging.tensorboard = False
    c.checkpoint.async_save = False
    return c


def test_nonfinite_updates_are_skipped_and_stop_the_run(tmp_path, monkeypatch):
    real = data_lib.make_train_iterator

    class Poisoned:
        """Batches after the 6th have NaN weights, so their loss is NaN."""
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            b = dict(next(self.it))
            self.n += 1
            if self.n > 6:
                b["weights"] = np.full_like(b["weights"], np.nan)
            return b

        def get_state(self):
            return self.it.get_state()

    monkeypatch.setattr(data_lib, "make_train_iterator", lambda *a, **k: Poisoned(real(*a, **k)))
    with pytest.raises(NonFiniteError, match=r"3 consecutive .*last good checkpoint is step 4"):
        run(_config(), str(tmp_path))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["nonfinite_total"] for r in rows if "loss" in r][5:] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


def test_skipped_update_leaves_params_unchanged():
    import jax
    cfg = resolve(_config(), num_devices=1)
    trainer = Trainer(cfg, "/tmp/unused")
    state = trainer.init_state(0)
    before = jax.device_get(state["params"])
    batch = next(data_lib.make_train_iterator(cfg))
    batch["weights"] = np.full_like(batch["weights"], np.nan)
    state, m = trainer.train_step(state, batch)
    after = jax.device_get(state["params"])
    assert int(m["nonfinite"]) == 1 and int(state["nonfinite_streak"]) == 1 and int(state["step"]) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, monkeypatch, capsys):
    import os
    import signal
    real = data_lib.make_train_iterator

    class Interrupting:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            self.n += 1
            if self.n == 6:
                os.kill(os.getpid(), signal.SIGTERM)   # arrives while step 6 runs
            return next(self.it)

        def get_state(self):
            return self.it.get_state()

    monkeypatch.setattr(data_lib, "make_train_iterator", lambda *a, **k: Interrupting(real(*a, **k)))
    before = signal.getsignal(signal.SIGTERM)
    r = run(_config(), str(tmp_path), progress=True)
    assert r["preempted"] and r["step"] == 6
    # Captured stderr is not a terminal: plain progress lines, no bar.
    err = capsys.readouterr().err
    assert "step 1/12, loss " in err and "\r" not in err
    assert signal.getsignal(signal.SIGTERM) == before
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6]
    meta = json.loads((tmp_path / "checkpoints" / "6" / "data" / "metadata").read_text())
    assert meta == {"next_index": 6}


def test_gradient_accumulation_matches_one_big_batch():
    import jax
    c1, c2 = _config(), _config()
    c2.train.grad_accum_steps = 4
    t1 = Trainer(resolve(c1, num_devices=1), "/tmp/unused")
    t2 = Trainer(resolve(c2, num_devices=1), "/tmp/unused")
    batch = next(data_lib.make_train_iterator(resolve(c1, num_devices=1)))
    s1, m1 = t1.train_step(t1.init_state(0), batch)
    s2, m2 = t2.train_step(t2.init_state(0), batch)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(s1["params"]), jax.device_get(s2["params"]))


def test_bfloat16_compute_keeps_float32_params():
    import jax
    losses = {}
    for dtype in ("float32", "bfloat16"):
        c = _config()
        c.train.compute_dtype = dtype
        c = resolve(c, num_devices=1)
        t = Trainer(c, "/tmp/unused")
        state, batch = t.init_state(0), next(data_lib.make_train_iterator(c))
        for _ in range(3):
            state, m = t.train_step(state, batch)
        losses[dtype] = float(m["loss"])
        assert t.model.config.dtype == dtype
        assert {x.dtype for x in jax.tree_util.tree_leaves(state["params"])} == {np.dtype("float32")}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=2e-2)


def test_progress_line_reads_step_loss_throughput_mfu_and_eta():
    line = progress_line(100, 1100, dict(loss=2.5, tokens_per_second=12345.6, mfu=0.4125), 3.7)
    assert line == "step 100/1100, loss 2.5000, 12,346 tok/s, MFU 41.2%, ETA 1:01:40"
