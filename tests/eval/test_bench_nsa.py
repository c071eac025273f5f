"""eval.bench_nsa at a tiny size: both selections timed, the ratio, the JSON."""
import json

import pytest

from eval import bench_nsa


@pytest.mark.slow   # four compiles of the layer (forward and gradient, both selections): ~1 min
def test_tiny_run(tmp_path, capsys):
    bench_nsa.main(["--seq_lens", "64", "--d_model", "16", "--heads", "2", "--head_dim", "8",
                    "--reps", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_nsa.json").read_text())["rows"]
    token, block = rows
    assert (token["selection"], block["selection"]) == ("token", "block")
    assert token["fwd_ms"] > 0 and block["fwd_bwd_ms"] > 0
    assert token["token_over_block_fwd"] == token["fwd_ms"] / block["fwd_ms"]
    assert "| selection |" in capsys.readouterr().out
