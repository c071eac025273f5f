"""eval.bench_tasks at tiny sizes: every generator at every length in the table, JSON and PNG;
the batch-size search on a fake clock."""
import json
import types

import pytest

from eval import bench_tasks


def test_every_task_and_length(tmp_path, capsys):
    bench_tasks.main(["--seq_lens", "128", "256", "--min_seconds", "0", "--repeats", "2",
                      "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_tasks.json").read_text())["rows"]
    assert [(r["task"], r["seq_len"]) for r in rows] == [
        (t, L) for t in ("mqar", "niah", "passkey") for L in (128, 256)]
    for r in rows:
        assert r["batch"] == bench_tasks.FIRST_BATCH and r["seconds"] > 0     # min_seconds 0
        assert r["examples_per_s"] == round(r["batch"] / r["seconds"])
        assert r["Mtokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["seconds"] / 1e6)
    assert "|    task | seq_len | batch |" in capsys.readouterr().out
    assert (tmp_path / "bench_tasks.png").stat().st_size > 0


def test_batch_doubles_until_min_seconds_and_best_repeat_is_kept(monkeypatch):
    clock = types.SimpleNamespace(now=0.0, calls=[])

    def gen(n, seed):
        clock.calls.append((n, seed))
        clock.now += n * 1e-3 * (2 if seed == 2 else 1)     # repeat 2 is disturbed

    monkeypatch.setattr(bench_tasks, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    n, best = bench_tasks.time_generator(gen, min_seconds=0.1, repeats=3)
    # 16, 32, 64 examples take under 0.1 s; 128 take 0.128 s.
    assert clock.calls == [(16, 0), (32, 0), (64, 0), (128, 0), (128, 1), (128, 2), (128, 3)]
    assert n == 128 and best == pytest.approx(0.128)


def test_too_short_for_the_task_names_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_tasks.main(["--tasks", "passkey", "--seq_lens", "50", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "passkey at --seq_lens 50" in capsys.readouterr().err
