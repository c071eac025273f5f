"""eval.segment_recall: the per-distance scoring against an oracle that recalls facts up to a
set number of segments back, and a --quick run of ARMT with its state size and the reuse of
finished runs; all six models in a slow test."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.tasks.segment_recall import GEN, SEP


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MEMLM_NO_PROGRESS", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


class FactOracle:
    """A causal stand-in that answers a question (at its GEN token) with the value of the fact
    with the same key, if that fact is at most `reach` segments back; else 0 (never a value)."""

    def __init__(self, vocab_size, segment_len, reach):
        self.config = types.SimpleNamespace(vocab_size=vocab_size)
        self.S, self.reach = segment_len, reach

    def apply(self, variables, x):
        T = x.shape[1]
        t = jnp.arange(T)
        back = lambda j: jnp.pad(x, ((0, 0), (j, 0)), constant_values=-1)[:, :T]
        k1, k2 = back(2), back(1)
        match = (t[None, :] < t[:, None]) & (t[:, None] // self.S - t[None, :] // self.S
                                             <= self.reach)
        match = (match[None] & (x[:, None, :] == SEP) & (k1[:, :, None] == k1[:, None, :])
                 & (k2[:, :, None] == k2[:, None, :]))
        pred = jnp.take_along_axis(x, jnp.minimum(jnp.argmax(match, -1) + 1, T - 1), axis=1)
        pred = jnp.where(match.any(-1) & (x == GEN), pred, 0)
        return jax.nn.one_hot(pred, self.config.vocab_size)


def test_accuracy_by_distance_scores_an_oracle():
    from eval.segment_recall import accuracy_by_distance
    args = types.SimpleNamespace(eval_examples=6, symbols=16, segment_len=12, segments=5,
                                 facts=1, seed=0, batch_size=4)
    acc = accuracy_by_distance(FactOracle(20, 12, reach=2), {}, [1, 2, 3, 4], args)
    assert acc == {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0}
    args.facts, args.segment_len = 2, 20          # two facts a segment, in a random order
    acc = accuracy_by_distance(FactOracle(20, 20, reach=3), {}, [1, 3, 4], args)
    assert acc == {1: 1.0, 3: 1.0, 4: 0.0}


def _run(tmp_path, models, extra=()):
    from eval import segment_recall
    segment_recall.main(["--quick", "--models", *models, "--out", str(tmp_path), *extra])
    return json.loads((tmp_path / "segment_recall.json").read_text())


@pytest.mark.slow   # 7 s of training through train.run; the scoring is tested above
def test_quick_run_and_reuse(tmp_path, capsys):
    r = _run(tmp_path, ["armt"])
    (row,) = r["results"]
    assert r["distances"] == [1, 2] and row["model"] == "armt" and "error" not in row
    assert row["steps"] == 2 and row["params"] > 0 and row["segments"]["kind"] == "armt"
    assert set(row["accuracy"]) == {"1", "2"}
    assert all(0 <= a <= 1 for a in row["accuracy"].values())
    # 2 layers x (A: 2 nu d_mem x d + z: 2 nu d_mem) at nu 3, d_mem 4, d 16.
    assert row["state"] == 2 * 24 * 17
    assert (tmp_path / "segment_recall.png").stat().st_size > 0
    capsys.readouterr()
    assert _run(tmp_path, ["armt"])["results"] == r["results"]
    assert capsys.readouterr().out.count("reusing") == 1


@pytest.mark.slow
def test_quick_run_every_model(tmp_path):
    r = _run(tmp_path, ["armt", "rmt", "segment_local", "brt", "gdn", "swa"])
    rows = {row["model"]: row for row in r["results"]}
    assert len(rows) == 6 and not any("error" in row for row in rows.values())
    assert rows["segment_local"]["state"] == 0 and rows["rmt"]["state"] == 2 * 16
    assert rows["gdn"]["segments"] is None and rows["gdn"]["state"] > 0
