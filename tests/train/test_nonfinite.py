"""A non-finite loss skips the update and is counted; N in a row stop the run, keeping the last
good checkpoint."""
import json

import numpy as np
import pytest

from configs import base
from configs.tiny import get_config
from train import data as data_lib
from train.config import resolve
from train.loop import NonFiniteError, Trainer, run


def _config():
    c = get_config()
    # The mechanism does not depend on the mixer: the cheapest model to compile.
    c.model = base.model_config(d_model=16, num_layers=1, num_heads=1, pattern=("attn",), use_mlp=False)
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
