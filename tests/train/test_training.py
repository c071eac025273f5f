"""End-to-end trainer tests on configs/tiny.py (subprocesses: flags must be set before JAX starts).

One module-scoped set of runs is shared by the tests:
  * `uninterrupted`: 30 steps, a checkpoint every 5;
  * `resumed`: the same command SIGKILLed after step 12 and started again;
  * `meshes`: 3 steps on meshes 1x4x2 and 2x2x2 (and, when the slow tests are selected,
    8x1x1: pure data parallelism, which 2x2x2's data axis covers) in one process with 8 fake
    devices (the one-device reference is the uninterrupted run: warmup makes its first steps
    the same);
  * `multiprocess`: 3 steps on 2 local processes joined by jax.distributed on 127.0.0.1
    (`slow`: started only when its test is selected).
They start concurrently and each test waits only for the runs it needs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from train_testlib import REPO, finish, free_port, start, subprocess_env, train_cmd, train_losses

STEPS, EVERY, KILL_AFTER = 30, 5, 12
SHORT = ("train.steps=3", "train.eval_every=0", "train.eval_batches=0", "logging.tensorboard=False")


def _publish(path: Path, result: dict) -> None:
    """Write a run's result atomically: other xdist workers poll for the file and read it at once."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


class Runs:
    """The shared runs. Under pytest-xdist the tests of this module may land on several workers:
    the first worker to claim `root/owner` starts the runs and a thread that drives them (the
    SIGKILL and restart included) and writes `NAME.done` as each finishes; every worker's
    `get(NAME)` waits for that file."""

    NAMES = ("uninterrupted", "resumed", "meshes", "multi")

    def __init__(self, root: Path, cache: str, slow: bool):
        self.root, self.multi = root, slow
        try:
            (root / "owner").mkdir()
        except FileExistsError:
            self.thread = None
            return
        env = subprocess_env(cache)
        common = (f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}")
        self.procs = {
            "uninterrupted": start(train_cmd(root / "full", *common), env, root / "full.log"),
            "killed": start(train_cmd(root / "resumed", *common), env, root / "killed.log"),
            "meshes": start([sys.executable, str(REPO / "tests/train/sharding_worker.py"),
                             str(root / "meshes.json"), str(root / "meshes"), "3",
                             *(["8x1x1"] if slow else []), "1x4x2", "2x2x2"],
                            subprocess_env(cache, devices=8), root / "meshes.log"),
        }
        port = free_port()
        for i in range(2 if slow else 0):
            cmd = train_cmd(root / "multi", *SHORT) + [
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
            self.procs[f"multi{i}"] = start(cmd, subprocess_env(cache, devices=1), root / f"multi{i}.log")
        self.thread = threading.Thread(target=self._drive, args=(env, common), daemon=True)
        self.thread.start()

    def _mark(self, name, fn):
        try:
            res = dict(ok=True, **(fn() or {}))
        except BaseException as e:  # noqa: BLE001 - reported by the test that needs it
            res = dict(ok=False, error=f"{type(e).__name__}: {e}")
        _publish(self.root / f"{name}.done", res)

    def _drive(self, env, common):
        r, procs = self.root, self.procs

        def kill_and_restart():
            proc, metrics = procs["killed"], r / "resumed" / "metrics.jsonl"
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None:
                if metrics.exists() and max(train_losses(r / "resumed") or {0: 0}) >= KILL_AFTER:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before it could be killed:\n" + (r / "killed.log").read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            procs["restart"] = start(train_cmd(r / "resumed", *common), env, r / "restart.log")
            return dict(killed_at=max(train_losses(r / "resumed")))

        killed = {}
        try:
            killed = kill_and_restart()
        except BaseException as e:  # noqa: BLE001
            _publish(r / "resumed.done", dict(ok=False, error=f"{type(e).__name__}: {e}"))
        self._mark("uninterrupted", lambda: finish(procs["uninterrupted"], r / "full.log", 600) and None)
        if killed:
            self._mark("resumed", lambda: dict(killed_at=killed["killed_at"], log=finish(
                procs["restart"], r / "restart.log", 600)[-3000:]))
        self._mark("meshes", lambda: finish(procs["meshes"], r / "meshes.log", 600) and None)
        if self.multi:
            self._mark("multi", lambda: [finish(procs[f"multi{i}"], r / f"multi{i}.log", 600)
                                         for i in range(2)] and None)

    def get(self, name: str) -> dict:
        done = self.root / f"{name}.done"
        deadline = time.time() + 900
        while not done.exists():
            assert time.time() < deadline, f"timed out waiting for the {name} run"
            time.sleep(0.2)
        res = json.loads(done.read_text())
        if not res["ok"]:
            pytest.fail(f"the {name} run failed: {res['error'][-4000:]}")
        return res

    def close(self):
        if self.thread is not None:
            self.thread.join(timeout=900)
            for p in self.procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, compile_cache):
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "train_runs"
    root.mkdir(exist_ok=True)
    # Every xdist worker collects the same selection, so the worker that owns the runs knows
    # whether the slow tests (the two-process one among them) are selected.
    slow = any(item.name == test_two_processes_agree_with_one.__name__
               for item in request.session.items)
    r = Runs(root, compile_cache, slow)
    yield r
    r.close()


def test_loss_decreases_and_outputs(runs):
    runs.get("uninterrupted")
    wd = runs.root / "full"
    losses = train_losses(wd)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)])
    assert last < first - 1.0, (first, last)
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    assert {"step", "loss", "learning_rate", "tokens_per_second", "mfu"} <= set(rows[-3])
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 30]
    assert all(np.isclose(r["eval_perplexity"], np.exp(r["eval_loss"]), rtol=1e-5) for r in evals)
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["train"]["steps"] == STEPS and cfg["model"]["vocab_size"] == 256 and cfg["mesh"]["data"] == 1
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd / "tensorboard"))
    assert sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()) == [20, 25, 30]  # keep=3


def test_sigkill_and_resume_reproduces_losses(runs):
    runs.get("uninterrupted")
    full = train_losses(runs.root / "full")
    res = runs.get("resumed")
    resumed = train_losses(runs.root / "resumed")
    assert res["killed_at"] >= KILL_AFTER
    assert "resumed from" in res["log"]
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in range(KILL_AFTER + 1, STEPS + 1):
        assert resumed[s] == pytest.approx(full[s], rel=1e-6, abs=1e-6), s


def test_meshes_match_one_device_and_params_are_sharded(runs):
    runs.get("uninterrupted")
    runs.get("meshes")
    r = json.loads((runs.root / "meshes.json").read_text())
    ref = train_losses(runs.root / "full")
    assert {"1x4x2", "2x2x2"} <= set(r), sorted(r)
    for mesh in r:
        assert sorted(r[mesh]["losses"]) == ["1", "2", "3"]
        for s, loss in r[mesh]["losses"].items():
            assert loss == pytest.approx(ref[int(s)], abs=1e-4), (mesh, s)
    # The rules of configs/base.py: vocab -> tensor, embed -> fsdp, mlp -> tensor, heads -> tensor.
    params = r["1x4x2"]["params"]
    emb = next(v for k, v in params.items() if "embed" in k and len(v["shape"]) == 2)
    assert emb["spec"] == "P('tensor', 'fsdp')", emb
    assert emb["shard"] == [emb["shape"][0] // 2, emb["shape"][1] // 4]
    assert emb["devices"] == 8
    for mesh in r:
        f, t = (int(n) for n in mesh.split("x")[1:])
        for k, v in r[mesh]["params"].items():
            spec = v["spec"]
            expect = [n // (f if a == "fsdp" else t if a == "tensor" else 1)
                      for n, a in zip(v["shape"], _spec_axes(spec, len(v["shape"])))]
            assert v["shard"] == expect, (mesh, k, v)
    sharded = [k for k, v in r["2x2x2"]["params"].items() if v["shard"] != v["shape"]]
    assert len(sharded) >= len(r["2x2x2"]["params"]) // 2, sharded


def _spec_axes(spec: str, ndim: int) -> list:
    inner = spec[len("P("):-1]
    parts = [p.strip().strip("'") for p in inner.split(",") if p.strip()] if inner else []
    parts = [None if p == "None" else p for p in parts]
    return parts + [None] * (ndim - len(parts))


@pytest.mark.slow
def test_two_processes_agree_with_one(runs):
    runs.get("multi")
    runs.get("uninterrupted")
    wd = runs.root / "multi"
    multi = train_losses(wd)
    ref = train_losses(runs.root / "full")
    assert sorted(multi) == [1, 2, 3]
    for s, loss in multi.items():
        assert loss == pytest.approx(ref[s], abs=1e-4), s
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["mesh"]["data"] == 2
    assert (wd / "checkpoints" / "3").is_dir()  # saved by both processes through orbax


def test_load_pretrained_in_a_process_without_training_code(runs, tmp_path):
    import jax
    from ml_collections import ConfigDict

    from train.checkpoint import Checkpointer
    from train.config import resolve
    from train.data import eval_batches
    from train.loop import Trainer
    runs.get("uninterrupted")
    wd = runs.root / "full"
    cfg = ConfigDict(json.loads((wd / "config.json").read_text()))
    batches = eval_batches(cfg)
    b = {k: np.stack([batch[k] for batch in batches]) for k in batches[0]}
    np.savez(tmp_path / "batches.npz", **b)
    final_eval = [json.loads(l) for l in open(wd / "metrics.jsonl")][-1]
    assert final_eval["step"] == STEPS and "eval_loss" in final_eval
    script = f"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from mem_lm.pretrained import load_pretrained
model, variables = load_pretrained({str(wd)!r})
b = np.load({str(tmp_path / 'batches.npz')!r})
apply = jax.jit(model.apply)
np.save("logits.npy", np.stack([apply(variables, jnp.asarray(x), segment_ids=jnp.asarray(s))
                                for x, s in zip(b["inputs"], b["segment_ids"])]))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("train", "configs", "optax", "grain", "eval"))
print(json.dumps(dict(leaked=leaked, is_dict=isinstance(variables["params"], dict))))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["leaked"] == [] and res["is_dict"]
    logits = np.load(tmp_path / "logits.npy").astype(np.float64)

    # The trainer evaluated these batches with the params it held in memory at step 30, just
    # before saving them: the loss from the loaded model's logits is that eval loss (measured
    # 8e-8 apart; the step-25 checkpoint's loss is 0.8% off).
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    loss = (nll * b["weights"]).sum() / b["weights"].sum()
    assert loss == pytest.approx(final_eval["eval_loss"], rel=1e-6)

    # Logit for logit: the trainer's own model on the params it resumes from at step 30.
    trainer = Trainer(resolve(cfg, num_devices=1), str(wd))
    ckpt = Checkpointer(str(wd / "checkpoints"))
    state, _, step = ckpt.restore_latest(trainer.abstract_state)
    ckpt.close()
    assert step == STEPS
    with trainer.context():
        apply = jax.jit(trainer.model.apply)
        ref = np.stack([apply({"params": state["params"]}, x, segment_ids=s)
                        for x, s in zip(b["inputs"], b["segment_ids"])])
    np.testing.assert_allclose(logits, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_corrupt_or_incomplete_newest_checkpoint_falls_back(runs, tmp_path):
    from ml_collections import ConfigDict

    from mem_lm.pretrained import load_pretrained
    from train.checkpoint import Checkpointer
    from train.config import resolve
    from train.loop import Trainer
    wd = tmp_path / "copy"
    runs.get("uninterrupted")
    shutil.copytree(runs.root / "full", wd)
    ck = wd / "checkpoints"
    for f in (ck / "30" / "params").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"garbage")
    (ck / "35.orbax-checkpoint-tmp-1234").mkdir()
    cfg = resolve(ConfigDict(json.loads((wd / "config.json").read_text())), num_devices=1)
    trainer = Trainer(cfg, str(wd))
    with pytest.warns(UserWarning) as rec:
        state, data_state, step = Checkpointer(str(ck)).restore_latest(trainer.abstract_state)
    msgs = " ".join(str(w.message) for w in rec)
    assert step == 25 and int(state["step"]) == 25 and data_state == {"next_index": 25}
    assert "step 30" in msgs and "incomplete" in msgs
    with pytest.warns(UserWarning, match="cannot be read"):
        model, variables = load_pretrained(str(wd))
    assert set(variables) == {"params"}
