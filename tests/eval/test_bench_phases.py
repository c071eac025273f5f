"""eval.bench_phases at toy sizes (interpret mode): every phase of each op is timed and its
compile time recorded, per block-policy variant."""
import json

from eval import bench_phases


def test_every_phase_timed(tmp_path):
    bench_phases.main(["--ops", "gdn", "la_g", "--B", "1", "--T", "40", "--H", "1", "--K", "16",
                       "--V", "16", "--reps", "1", "--variants", "default", "tile32",
                       "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["op"], r["variant"]) for r in rows] == [
        ("gdn", "default"), ("gdn", "tile32"), ("la_g", "default"), ("la_g", "tile32")]
    phases = {"gdn": ["ut", "state_fwd", "output", "dv_intra", "state_bwd", "chunk_grads"],
              "la_g": ["state_fwd", "output", "state_bwd", "chunk_grads"]}
    for r in rows:
        assert list(r["ms"]) == phases[r["op"]], r
        assert all(v > 0 for v in r["ms"].values()) and all(
            v > 0 for v in r["compile_s"].values())
    assert (tmp_path / "phases.png").stat().st_size > 0
