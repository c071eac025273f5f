"""Smoke runs of eval.bench_memory and eval.phonebook at their --quick sizes (slow: each
compiles several models); they assert on the JSON the scripts write."""
import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MEMLM_NO_PROGRESS", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_bench_memory_quick(tmp_path):
    from eval import bench_memory

    bench_memory.main(["--quick", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "bench_memory.json").read_text())
    assert [row["slots"] for row in r["table"]] == [16, 64]
    for row in r["table"]:
        assert row["memory step s"] > 0 and row["dense step s"] > 0 and row["memory MB"] > 0
        # The dense contrast has the memory layer's parameter count, to within a d_ff step.
        assert abs(3 * 16 * row["dense d_ff"] - row["layer params (M)"] * 1e6) <= 3 * 16 * 8
    assert (tmp_path / "bench_memory.png").stat().st_size > 0


def test_phonebook_quick(tmp_path):
    from eval import phonebook

    phonebook.main(["--quick", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "phonebook.json").read_text())
    rows = {row["model"]: row for row in r["table"]}
    assert 0 <= rows["dense"]["book accuracy"] <= 1 and 0 <= rows["memory"]["book accuracy"] <= 1
    assert rows["dense"]["key usage/step"] is None
    assert 0 < rows["memory"]["key usage (whole book)"] <= 1
    assert (tmp_path / "phonebook.png").stat().st_size > 0
