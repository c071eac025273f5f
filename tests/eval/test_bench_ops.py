"""eval.bench_ops on CPU at toy sizes: the cells, the peer process and the time budget report
what they promise (no timings are asserted, only that they were taken and how they combine)."""
import json

import pytest

from eval import bench_ops


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("MEMLM_NO_PROGRESS", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")   # main() sets it; restored after the test


def _lines(path):
    return [json.loads(line) for line in (path / "bench_ops.jsonl").read_text().splitlines()]


def test_cells_peers_and_table(tmp_path):
    r = bench_ops.main(["--ops", "gdn", "attn", "--shapes", "2x64", "1x64", "--heads", "2",
                        "--head_dim", "16", "--impls", "reference", "xla", "--reps", "1",
                        "--quick", "--peers", "on", "--out", str(tmp_path)])
    lines = _lines(tmp_path)
    assert "settings" in lines[0] and lines[0]["settings"]["shapes"] == [[1, 64], [2, 64]]
    cells = [x for x in lines if "impl" in x and not x.get("peer")]
    assert [(c["op"], c["B"], c["impl"]) for c in cells] == [
        (op, B, impl) for B in (1, 2) for op in ("gdn", "attn") for impl in ("reference", "xla")]
    for c in cells:
        assert c["fwd_ms"] > 0 and c["fwd_bwd_ms"] > 0 and c["xla_mb"] > 0
        assert c["fwd_compile_s"] > 0 and c["fwd_bwd_compile_s"] > 0
        assert "peak_mb" not in c                 # the CPU allocator keeps no statistics
    mem = {(c["op"], c["B"], c["impl"]): c["xla_mb"] for c in cells}
    assert mem["attn", 2, "xla"] > mem["attn", 1, "xla"]
    # The peer process ran (this machine has no torch / CUDA): each peer cell says why not.
    peers = [x for x in lines if x.get("peer")]
    assert len(peers) == 4 and all("skipped" in p for p in peers)
    assert {p["impl"] for p in peers} == {"fla chunk_gated_delta_rule", "torch sdpa flash"}
    table = {(row["op"], row["B"], row["impl"]): row for row in r["table"]}
    xla, ref = table["gdn", 2, "xla"], table["gdn", 2, "reference"]
    assert xla["× ref"] == pytest.approx(ref["f+b ms"] / xla["f+b ms"])
    assert "f+b / peer" not in xla                 # no peer timings, no ratio column
    assert (tmp_path / "bench_ops.png").stat().st_size > 0
    assert json.loads((tmp_path / "bench_ops.json").read_text())["results"] == json.loads(
        json.dumps(r["results"]))


def test_neural_memory_cells(tmp_path):
    """nm1 / nm2 (neural_memory depth 1 / 2): fwd and fwd+bwd timed (gradients of every
    input, the initial memory included; the xla impl: the reference's cells work as every
    op's do); no peer process for ops without a peer; the nominal FLOP count of the MLP
    memory is its documented formula."""
    r = bench_ops.main(["--ops", "nm1", "nm2", "--shapes", "1x24", "--heads", "2",
                        "--head_dim", "8", "--impls", "xla", "--reps", "1", "--quick",
                        "--peers", "on", "--out", str(tmp_path)])
    cells = [x for x in _lines(tmp_path) if "impl" in x]
    assert [(c["op"], c["impl"]) for c in cells] == [("nm1", "xla"), ("nm2", "xla")]
    for c in cells:
        assert c["fwd_ms"] > 0 and c["fwd_bwd_ms"] > 0 and c["xla_mb"] > 0, c
    assert not r["peers"]
    K, E = 8, 8 * bench_ops.NM_EXPANSION
    assert bench_ops.nominal_flops("nm2", 1, 24, 2, K, K) == 2 * (4 * K * E + 5 * E * K) * 48
    assert bench_ops.op_impls("nm2", "gpu", None) == ["xla", "pallas"]


def test_peer_ratio_columns(tmp_path):
    ours = [{"op": "gdn", "B": 1, "T": 8, "impl": "xla", "fwd_ms": 2.0, "fwd_bwd_ms": 6.0}]
    peer = [{"op": "gdn", "B": 1, "T": 8, "impl": "fla", "fwd_ms": 1.0, "fwd_bwd_ms": 4.0,
             "peak_mb": 3.0, "peer": True}]
    rows = bench_ops._table_rows(ours, peer)
    assert list(rows[0])[-2:] == ["fwd / peer", "f+b / peer"]       # the last columns
    assert rows[0]["fwd / peer"] == 2.0 and rows[0]["f+b / peer"] == 1.5
    assert rows[1]["impl"] == "fla" and "f+b / peer" not in rows[1]


def test_time_budget_skips_with_reason(tmp_path):
    r = bench_ops.main(["--ops", "la_g", "--impls", "xla", "--shapes", "1x64", "--heads", "2",
                        "--head_dim", "16", "--peers", "off", "--time_budget", "0",
                        "--out", str(tmp_path)])
    (cell,) = r["results"]
    assert "--time_budget" in cell["skipped"] and "fwd_ms" not in cell
    assert any("--time_budget" in n for n in r["notes"])


def test_unknown_impl_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_ops.main(["--impls", "magic", "--out", str(tmp_path)])
    assert e.value.code == 2 and "magic" in capsys.readouterr().err


def test_default_impls_per_backend():
    assert "pallas" not in bench_ops.op_impls("gdn", "cpu", None)
    assert bench_ops.op_impls("gdn", "gpu", None) == ["xla", "pallas"]
    assert "reference" not in bench_ops.op_impls("attn", "gpu", None)
    assert bench_ops.op_impls("la_g", "gpu", ["xla", "cudnn"]) == ["xla"]   # attention's only


def test_nsa_block_indices():
    """Each token lists NSA_S distinct key blocks at or before its own (its own among them),
    all of them while there are at most NSA_S, padded with T; numpy and jnp agree."""
    import jax.numpy as jnp
    import numpy as np

    from eval.bench_fla import NSA_BLOCK, NSA_S, nsa_block_indices
    T = 40 * NSA_BLOCK + 5
    idx = np.asarray(nsa_block_indices(T, np))
    assert idx.shape == (T, NSA_S) and (idx == np.asarray(nsa_block_indices(T, jnp))).all()
    for t in (0, NSA_BLOCK * 3 + 7, NSA_BLOCK * NSA_S, T - 1):
        own = t // NSA_BLOCK
        listed = [int(i) for i in idx[t] if i != T]
        assert len(set(listed)) == len(listed) == min(own + 1, NSA_S)
        assert max(listed) == own and min(listed) == 0


@pytest.mark.slow
def test_kda_and_nsa_cells(tmp_path):
    bench_ops.main(["--ops", "kda", "nsa", "--shapes", "1x128", "--heads", "16",
                    "--head_dim", "16", "--impls", "reference", "xla", "--reps", "1", "--quick",
                    "--out", str(tmp_path)])
    cells = [x for x in _lines(tmp_path) if "impl" in x]
    assert [(c["op"], c["impl"]) for c in cells] == [
        ("kda", "reference"), ("kda", "xla"), ("nsa", "reference"), ("nsa", "xla")]
    for c in cells:
        assert c["fwd_ms"] > 0 and c["fwd_bwd_ms"] > 0, c
