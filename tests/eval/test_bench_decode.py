"""eval.bench_decode runs end to end on a tiny model and reports what it promises."""
import json

from eval import bench_decode


def test_bench_decode_tiny(tmp_path):
    bench_decode.main(["--contexts", "16", "64", "--models", "gdn", "attn", "--d_model", "32",
                       "--num_layers", "1", "--num_heads", "2", "--window", "8",
                       "--warmup", "1", "--steps", "3", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench_decode.json").read_text())
    rows = {(r["model"], r["context"]): r for r in res["rows"]}
    assert set(rows) == {("gdn", 16), ("gdn", 64), ("attn", 16), ("attn", 64)}
    # The recurrent cache does not grow with the context; attention's does.
    assert rows["gdn", 16]["cache_MiB"] == rows["gdn", 64]["cache_MiB"]
    assert rows["attn", 64]["cache_MiB"] > 2 * rows["attn", 16]["cache_MiB"]
    assert all(r["ms_per_token"] > 0 for r in rows.values())
    assert (tmp_path / "decode_latency.png").exists() and (tmp_path / "cache_bytes.png").exists()
