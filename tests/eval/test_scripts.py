"""Smoke tests of the eval scripts on a tiny checkpoint: each runs in-process (sharing JAX's
compilation cache) and the tests assert on the JSON it writes.

The checkpoint is a 2-step run of a 16-wide attention model on a small text file: the scripts'
logic is under test here, not the mixers (tests/mem_lm covers those).
"""
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import common


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MEMLM_NO_PROGRESS", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")   # bench_model sets it; restored after the test


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    f = d / "text.py"
    import argparse
    f.write_text(open(argparse.__file__).read()[:20000])
    return f


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
    import train
    from configs import tiny

    c = tiny.get_config()
    c.model.update(d_model=16, pattern=("attn",))
    c.data.update(source="text", paths=str(corpus))
    c.train.update(steps=2, batch_size=2, seq_len=16, eval_every=0, eval_batches=1,
                   checkpoint_every=0)
    c.checkpoint.async_save = False
    c.logging.tensorboard = False
    workdir = tmp_path_factory.mktemp("ck")
    train.run(c, str(workdir), progress=False)
    return workdir


def _json(path):
    assert path.with_suffix(".json").is_file()
    return json.loads(path.with_suffix(".json").read_text())


class InductionHead:
    """A causal stand-in for a model that solves recall: at each position it predicts the token
    that followed the first earlier occurrence of the last `context` tokens (only matches at most
    `window` back, when given). Solves MQAR and the synthetic needle with context 1, the
    passkey with 16 ("The pass key is "). `answer(first, pred)` can spoil chosen predictions;
    `first` is where the match was found. `apply` returns one-hot logits, as a model would."""

    def __init__(self, vocab_size, context=1, window=None, answer=None):
        self.config = types.SimpleNamespace(vocab_size=vocab_size)
        self.context, self.window, self.answer = context, window, answer

    def apply(self, variables, x):
        T = x.shape[1]
        t = jnp.arange(T)
        match = t[None, :] < t[:, None]                                  # [query t, earlier s]
        if self.window:
            match &= t[None, :] >= t[:, None] - self.window
        match = jnp.broadcast_to(match, (x.shape[0], T, T))
        # x[t - j] == x[s - j] for j < context; the two fills keep positions before the start
        # from matching.
        back = lambda j, fill: jnp.pad(x, ((0, 0), (j, 0)), constant_values=fill)[:, :T]
        for j in range(self.context):
            match &= back(j, -1)[:, :, None] == back(j, -2)[:, None, :]
        first = jnp.argmax(match, -1)
        pred = jnp.where(match.any(-1), jnp.take_along_axis(x, first + 1, axis=1), 0)
        if self.answer:
            pred = self.answer(first, pred)
        return jax.nn.one_hot(pred, self.config.vocab_size)


def test_evaluate_mqar_scores_an_oracle():
    from eval.mqar import evaluate_mqar
    from train.tasks.mqar import make_mqar
    n, p = 10, 4
    x, y = make_mqar(n, 64, 32, p, seed=0)
    # 10 examples in batches of 4: the last batch is padded.
    r = evaluate_mqar(InductionHead(64), {}, x, y, batch_size=4)
    assert r == {"accuracy": 1.0, "correct": n * p, "total": n * p, "num_examples": n}
    # The 4 keys sit at 0, 2, 4, 6 and each is asked once: answering 0 (never a value) for the
    # keys at 2 and 6 gets exactly half of every row.
    half = InductionHead(64, answer=lambda first, pred: jnp.where((first // 2) % 2 == 0, pred, 0))
    r = evaluate_mqar(half, {}, x, y, batch_size=4)
    assert r["accuracy"] == 0.5 and r["correct"] == n * p // 2 and r["total"] == n * p


def test_niah_grid_scores_an_oracle():
    from eval.niah import evaluate_grid
    depths, lengths = [0.0, 0.5, 1.0], [32, 64]
    grid = lambda model, task="synthetic", L=lengths: evaluate_grid(
        model, {}, task, L, depths, num_examples=3, vocab_size=64, batch_size=2, progress=False)
    np.testing.assert_array_equal(grid(InductionHead(64)), np.ones((3, 2)))
    # The key sits about depth x (length - 5) tokens in and is asked at the last position: seen
    # from there 30 / 16 / 3 tokens back at length 32, 62 / 32 / 3 at 64. A 24-token window
    # finds only the near ones.
    np.testing.assert_array_equal(grid(InductionHead(64, window=24)),
                                  [[0, 0], [1, 0], [1, 1]])
    np.testing.assert_array_equal(grid(InductionHead(256, context=16), "passkey", [128]),
                                  np.ones((3, 1)))
    # A needle counts only when all 5 digits are right: the last one wrong finds none.
    last_wrong = InductionHead(256, context=16, answer=lambda first, pred: pred.at[:, -1].set(0))
    np.testing.assert_array_equal(grid(last_wrong, "passkey", [128]), np.zeros((3, 1)))


def test_perplexity(checkpoint, tmp_path, capsys):
    from eval import perplexity
    perplexity.main(["--checkpoint", str(checkpoint), str(checkpoint), "--names", "a", "b",
                     "--lengths", "8", "32", "--tokens", "64", "--out", str(tmp_path)])
    r = _json(tmp_path / "perplexity")
    assert set(r["models"]) == {"a", "b"}
    a = r["models"]["a"]
    assert [row["context_length"] for row in a["results"]] == [8, 32]
    assert a["train_seq_len"] == 16
    for row in a["results"]:
        assert row["tokens"] == 64
        assert math.isclose(row["perplexity"], math.exp(row["loss"]), rel_tol=1e-6)
        assert 1 < row["perplexity"] < 2 * 256   # an untrained byte model: about uniform
    assert r["models"]["b"]["results"] == a["results"]    # same model, same windows
    assert (tmp_path / "perplexity.png").stat().st_size > 0
    assert "| context_length |" in capsys.readouterr().out


def test_generate_greedy_is_deterministic(checkpoint, tmp_path):
    from eval import generate
    args = ["--checkpoint", str(checkpoint), "--prompt", "def f(", "--max_new_tokens", "5",
            "--temperature", "0", "--num_samples", "2", "--out", str(tmp_path)]
    r = generate.main(args)
    saved = _json(tmp_path / "generate")
    assert saved["samples"] == r["samples"] and len(r["samples"]) == 2
    assert np.asarray(r["tokens"]).shape == (2, 5)
    assert r["tokens"][0] == r["tokens"][1]                       # greedy: same for both rows
    assert saved["settings"]["temperature"] == 0
    sampled = generate.main(args[:-6] + ["--temperature", "1.0", "--top_k", "5", "--top_p",
                                         "0.9", "--num_samples", "1", "--out", str(tmp_path)])
    assert np.asarray(sampled["tokens"]).shape == (1, 5)


def test_niah_passkey(checkpoint, tmp_path, monkeypatch):
    from eval import niah
    args = ["--checkpoint", str(checkpoint), "--names", "tiny", "--lengths", "128",
            "--depths", "0", "1", "--num_examples", "2", "--out", str(tmp_path)]
    niah.main(args)
    r = _json(tmp_path / "niah")
    m = r["models"]["tiny"]
    assert m["task"] == "passkey"                    # trained on text, not data.source=niah
    assert m["lengths"] == [128] and m["depths"] == [0.0, 1.0]
    acc = np.asarray(m["accuracy"])
    assert acc.shape == (2, 1) and ((acc >= 0) & (acc <= 1)).all()
    assert (tmp_path / "niah.png").stat().st_size > 0
    # The same command with a model that solves the passkey in the checkpoint's place.
    monkeypatch.setattr(common, "load_checkpoint",
                        lambda path: (InductionHead(256, context=16), {}))
    niah.main(args)
    assert _json(tmp_path / "niah")["models"]["tiny"]["accuracy"] == [[1.0], [1.0]]


def test_streaming(checkpoint, tmp_path):
    """A cache with room for the whole window (one cascade: 2 sinks + 38 slots >= 32 tokens)
    streams exactly what the model without a cache computes; two cascades of 19 filled lazily
    (selection from the first token on: the default eager fill would hold all 32) evict."""
    from eval import streaming
    r = streaming.main(["--checkpoint", str(checkpoint), "--length", "32", "--tokens", "64",
                        "--cache_size", "40", "--cache_sinks", "2", "--cascades", "1", "2",
                        "--cache_fill", "lazy", "--out", str(tmp_path)])
    loss = {row["variant"]: row["loss"] for row in r["results"]}
    assert set(loss) == {"full (no cache)", "window + sinks", "cascade x2"}
    assert loss["window + sinks"] == pytest.approx(loss["full (no cache)"], rel=1e-5)
    assert loss["cascade x2"] != pytest.approx(loss["full (no cache)"], rel=1e-5)
    assert (tmp_path / "streaming.png").stat().st_size > 0


def test_mqar_eval(checkpoint, tmp_path, monkeypatch):
    from eval import mqar
    args = ["--checkpoint", str(checkpoint), "--seq_len", "16", "--num_kv_pairs", "2", "4",
            "--num_examples", "5", "--batch_size", "4", "--out", str(tmp_path)]
    mqar.main(args)
    r = _json(tmp_path / "mqar")
    assert r["vocab_size"] == 256
    assert [row["num_kv_pairs"] for row in r["results"]] == [2, 4]
    assert [row["total"] for row in r["results"]] == [10, 20]     # examples x pairs
    assert all(0 <= row["accuracy"] <= 1 for row in r["results"])
    # The same command with a model that solves MQAR in the checkpoint's place.
    monkeypatch.setattr(common, "load_checkpoint", lambda path: (InductionHead(256), {}))
    mqar.main(args)
    assert [(row["accuracy"], row["correct"]) for row in _json(tmp_path / "mqar")["results"]] \
        == [(1.0, 10), (1.0, 20)]


def test_mqar_sweep_quick_and_reuse(tmp_path, capsys):
    from eval import mqar_sweep
    args = ["--quick", "--mixers", "attn", "swa", "--out", str(tmp_path)]
    mqar_sweep.main(args)
    r = _json(tmp_path / "mqar_sweep")
    rows = {row["mixer"]: row for row in r["results"]}
    assert set(rows) == {"attn", "swa"} and r["settings"]["seq_len"] == 32
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["steps"] == 10 and row["params"] > 0
    # 2 layers x ((k + v) x 32 tokens + (q, k, v) x 3 conv inputs) x 16 wide; swa: window 8
    assert rows["attn"]["state_size"] == 2 * (2 * 32 + 3 * 3) * 16
    assert rows["swa"]["state_size"] < rows["attn"]["state_size"]
    assert (tmp_path / "mqar_sweep.png").stat().st_size > 0
    capsys.readouterr()
    mqar_sweep.main(args)                                       # finished runs are reused
    assert capsys.readouterr().out.count("reusing") == 2
    assert _json(tmp_path / "mqar_sweep")["results"] == r["results"]
    # --reuse_only reports the finished runs and trains nothing for the missing lr.
    mqar_sweep.main(args + ["--reuse_only", "--lrs", "1e-3", "1e-2"])
    assert "left out (--reuse_only)" in capsys.readouterr().out
    assert _json(tmp_path / "mqar_sweep")["results"] == r["results"]


def test_bench_model_quick(tmp_path):
    from eval import bench_model
    bench_model.main(["--quick", "--models", "transformer", "--lengths", "32", "64",
                      "--max_step_seconds", "0", "--profile", "--profile_steps", "2",
                      "--out", str(tmp_path)])
    r = _json(tmp_path / "bench_model")
    cell, over = r["models"]["transformer"]["results"]
    assert cell["seq_len"] == 32 and cell["tokens_per_second"] > 0 and cell["memory_mb"] > 0
    assert 0 < cell["mfu"] < 1
    # --profile: the traced steps' time by category (a CPU trace: matmuls and other XLA work)
    prof = {row["category"]: row for row in cell["profile"]["rows"]}
    assert prof["matmul"]["ms_per_step"] > 0 and prof["pallas"]["ms_per_step"] == 0
    assert sum(row["percent"] for row in prof.values()) == pytest.approx(100)
    assert "profile" not in over
    assert r["table"][0]["transformer tok/s"] == cell["tokens_per_second"]
    assert r["table"][0]["transformer MFU %"] == pytest.approx(100 * cell["mfu"])
    # Past --max_step_seconds a cell is not timed, but its compiled memory is still reported.
    assert over["seq_len"] == 64 and "skipped" in over and "tokens_per_second" not in over
    assert over["memory_mb"] > cell["memory_mb"]
    assert r["table"][1]["transformer tok/s"] is None


def test_bench_model_gpu_preset_is_the_issue_run():
    """--backend gpu: the GDN and gdn+swa hybrid LMs of issue 28, >= 350M params each, at
    T = 4k and 16k, head_dim 128, layers scanned."""
    from eval.bench_model import PRESETS, model_configs
    from mem_lm import param_count
    p = PRESETS["gpu"]
    cfgs = model_configs(p["models"], p["d_model"], p["num_layers"], p["num_heads"],
                         p["vocab_size"], p["window"], width_match=p["width_match"],
                         dtype=p["dtype"], scan_layers=p["scan_layers"])
    assert list(cfgs) == ["gdn", "hybrid"]
    assert {n: round(param_count(c) / 1e5) / 10 for n, c in cfgs.items()} == {
        "gdn": 383.6, "hybrid": 370.2}
    assert cfgs["gdn"].resolved_head_dim == 128 and cfgs["hybrid"].scan_layers
    assert (p["batch"], p["lengths"], cfgs["gdn"].dtype) == (2, [4096, 16384], "bfloat16")


def test_bench_model_width_matching():
    from eval.bench_model import model_configs
    from mem_lm import param_count
    cfgs = model_configs(["transformer", "gdn", "hybrid"], 256, 4, 4, 256, 512)
    target = param_count(cfgs["transformer"])
    assert cfgs["transformer"].d_model == 256
    for name in ("gdn", "hybrid"):
        assert abs(param_count(cfgs[name]) / target - 1) < 0.1
        assert cfgs[name].resolved_head_dim % 2 == 0


def test_bench_model_variants():
    """`mixer:field=value,...` is that mixer with those settings; the plain name keeps its
    defaults."""
    from eval.bench_model import model_configs
    cfgs = model_configs(["mom", "mom:top_k=1,shared_memory=False"], 32, 2, 2, 64, 16,
                         width_match=False)
    plain, variant = (c.settings("mom") for c in cfgs.values())
    assert (plain["top_k"], plain["shared_memory"]) == (2, True)
    assert (variant["top_k"], variant["shared_memory"]) == (1, False)
    with pytest.raises(ValueError, match="not FIELD=VALUE"):
        model_configs(["mom:top_k"], 32, 2, 2, 64, 16, width_match=False)


@pytest.mark.parametrize("module, argv, message", [
    ("bench_model", ["--models", "lstm"], "unknown"),
    ("bench_model", ["--models", "gdn", "--baseline", "attn"], "--baseline"),
    ("perplexity", ["--checkpoint", "/nonexistent/run"], "no such file"),
    ("generate", ["--checkpoint", "/nonexistent/run", "--prompt", "x"], "no such file"),
    ("generate", ["--checkpoint", "x", "--prompt", "x", "--top_p", "1.5"], "top_p"),
    ("niah", ["--checkpoint", "x", "--depths", "2"], "depths"),
    ("mqar", ["--checkpoint", "/nonexistent/run"], "no such file"),
    ("mqar_sweep", ["--mixers", "lstm", "--out", "{tmp}"], "unknown"),
    ("mqar_sweep", ["--num_kv_pairs", "200", "--out", "{tmp}"], "num_kv_pairs"),
    ("perplexity", ["--config", "/nonexistent.py"], "no such file"),
])
def test_clear_errors(module, argv, message, tmp_path, capsys):
    import importlib
    mod = importlib.import_module(f"eval.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_table_and_json_helpers(tmp_path):
    text = common.format_table([{"a": 1, "b": 0.5}, {"a": 22, "b": None}], floatfmt=".2f")
    lines = text.splitlines()
    assert lines[0] == "|  a |    b |" and lines[2] == "|  1 | 0.50 |" and lines[3] == "| 22 |    - |"
    p = common.write_json(tmp_path / "x.json", {"v": np.float32(1.5), "a": np.arange(2),
                                                "n": float("nan")})
    assert json.loads(p.read_text()) == {"v": 1.5, "a": [0, 1], "n": None}
