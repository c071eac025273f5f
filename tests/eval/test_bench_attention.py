"""eval.bench_attention at tiny sizes: both kinds at two lengths, ratios, per-token growth,
the skip rule, JSON and PNG; the random block lists are causal, distinct and −1 padded."""
import json

import numpy as np

from eval import bench_attention


def test_random_block_indices_are_causal_and_distinct():
    idx = bench_attention.random_block_indices(np.random.default_rng(0), 2, 1, 5, 3)
    for i in range(5):
        for row in idx[:, 0, i]:
            live = row[row >= 0]
            assert len(live) == min(3, i + 1) == len(set(live)) and live.max() <= i
            assert (row[len(live):] == -1).all()


def test_tiny_run(tmp_path, capsys):
    bench_attention.main(["--seq_lens", "64", "128", "--block_size", "16", "--selected", "2",
                          "--window", "16", "--heads", "2", "--head_dim", "8", "--reps", "1",
                          "--max_seconds", "1e-9", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_attention.json").read_text())["rows"]
    first = {r["kind"]: r for r in rows if r["T"] == 64}
    assert first["sparse"]["fwd_ms"] > 0 and first["dense"]["fwd_bwd_ms"] > 0
    assert first["sparse"]["dense_fb/sparse"] == (first["dense"]["fwd_bwd_ms"]
                                                  / first["sparse"]["fwd_bwd_ms"])
    assert first["sparse"]["fb_per_token_vs_first"] == 1.0
    # Every later cell is extrapolated past --max_seconds and skipped, with the reason.
    assert all("skipped" in r["note"] for r in rows if r["T"] == 128)
    out = capsys.readouterr().out
    assert "machine:" in out and "|   kind | impl |" in out
    assert (tmp_path / "bench_attention.png").stat().st_size > 0
