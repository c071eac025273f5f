"""eval.bench_context: the HLO collective parser on a fixed snippet, and a --quick run (gdn,
D in {1, 2}, two short lengths; the script re-runs itself with 2 simulated CPU devices)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.bench_context import parse_collectives, summarize_collectives

REPO = Path(__file__).resolve().parents[2]

HLO = """
ENTRY %main {
  %ppermute.36 = f32[1,3,4,16]{3,2,1,0} collective-permute(%f.5), channel_id=1, source_target_pairs={{0,1}}
  %all_gather.13 = f32[2,1,4,16,32]{4,3,2,1,0} all-gather(%b.103), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %reduce_scatter.14 = f32[1,1,4,16,32]{4,3,2,1,0} reduce-scatter(%p.11), channel_id=1, dimensions={0}, to_apply=%r
  %all-reduce.44 = (f32[], f32[256,64]{1,0}, /*index=2*/f32[1,64]{1,0}, bf16[8]{0}) all-reduce(%a, %b, %c, %d), channel_id=2, to_apply=%add
  %ags = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  %a2a = s32[2,2]{1,0} all-to-all(%y), dimensions={0}
  %gte = f32[256,64]{1,0} get-tuple-element(%all-reduce.44), index=1
  %add.1 = f32[1,64]{1,0} add(%u, %v), metadata={op_name="all-reduce"}
}
"""


def test_parse_collectives_fixed_snippet():
    ops = parse_collectives(HLO, param_shapes=[(256, 64), (64,)])
    assert [o["op"] for o in ops] == ["collective-permute", "all-gather", "reduce-scatter",
                                      "all-reduce", "all-gather", "all-to-all"]
    assert [o["bytes"] for o in ops] == [4 * 192, 4 * 4096, 4 * 2048,
                                         4 + 4 * 256 * 64 + 4 * 64 + 2 * 8, 4 * 64, 4 * 4]
    # parameter-shaped elements of the all-reduce (size-1 dims ignored) are gradient sums
    assert ops[3]["grad_bytes"] == 4 * 256 * 64 + 4 * 64
    assert sum(o["grad_bytes"] for o in ops) == ops[3]["grad_bytes"]
    s = summarize_collectives(ops)
    assert s["collective_bytes"] == sum(o["bytes"] for o in ops)
    assert s["act_collective_bytes"] == s["collective_bytes"] - s["grad_collective_bytes"]
    assert s["collective_bytes_by_op"]["all-gather"] == 4 * 4096 + 4 * 64
    assert s["collective_ops"] == 6


@pytest.mark.slow   # 20 s of compiling in a subprocess; the parser is tested above
def test_quick_run(tmp_path):
    env = dict(os.environ, MEMLM_NO_PROGRESS="1")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p)
    proc = subprocess.run([sys.executable, "-m", "eval.bench_context", "--quick",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "longest T under" in proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"rows", "budget_summary", "args"} <= set(res)
    rows = {(r["context"], r["length"]): r for r in res["rows"]}
    assert set(rows) == {(1, 128), (1, 256), (2, 128), (2, 256)}
    for r in rows.values():
        assert "error" not in r, r
        for k in ("memory_mb", "temp_mb", "argument_mb", "output_mb", "collective_bytes",
                  "grad_collective_bytes", "act_collective_bytes", "collective_bytes_by_op"):
            assert k in r, k
    assert rows[(1, 128)]["collective_bytes"] == 0
    # gdn: state-sized communication, independent of T; per-device temp memory falls with D
    assert rows[(2, 128)]["act_collective_bytes"] > 0
    assert rows[(2, 256)]["collective_bytes"] <= rows[(2, 128)]["collective_bytes"]
    assert rows[(2, 256)]["temp_mb"] < rows[(1, 256)]["temp_mb"]
    assert (tmp_path / "memory.png").exists() and (tmp_path / "collectives.png").exists()
