"""eval.gpu_correctness at its --small sizes on CPU: it passes correct impls, and it fails an impl
that is off by more than the float32 tolerance while bf16 (looser) still passes."""
import json

import jax
import pytest

from eval import gpu_correctness


@pytest.fixture(autouse=True)
def _fresh_runners():
    gpu_correctness.vjp_runner.cache_clear()   # jitted runners close over op_fn
    yield
    gpu_correctness.vjp_runner.cache_clear()


def _checks(tmp_path):
    return json.loads((tmp_path / "gpu_correctness.json").read_text())["checks"]


def test_small_run_passes(tmp_path):
    rc = gpu_correctness.main(["--small", "--ops", "gdn", "attn", "--impls", "xla",
                               "--attn_impls", "xla", "--out", str(tmp_path)])
    checks = _checks(tmp_path)
    assert rc == 0
    assert {(c["op"], c["dtype"], c["case"]) for c in checks} == {
        ("gdn", "float32", "dense"), ("gdn", "bfloat16", "dense"), ("gdn", "float32", "packed"),
        *{("attn", dt, case) for dt in ("float32", "bfloat16")
          for case in ("causal", "window_gqa")}}
    for c in checks:
        assert c["status"] == "PASS" and c["max_error"] <= c["tol"]
    gdn = next(c for c in checks if c["op"] == "gdn")
    assert set(gdn["errors"]) == {"o", "state", "dq", "dk", "dv", "dbeta", "dg",
                                  "dinitial_state"}


def test_an_impl_off_by_1e_3_fails_in_float32(tmp_path, monkeypatch, capsys):
    exact = gpu_correctness.op_fn

    def off_by_1e_3(op):
        f = exact(op)

        def g(a, aux, *, impl, static, full):
            out = f(a, aux, impl=impl, static=static, full=full)
            return out if impl == "reference" else jax.tree.map(lambda x: x * 1.001, out)
        return g

    monkeypatch.setattr(gpu_correctness, "op_fn", off_by_1e_3)
    rc = gpu_correctness.main(["--small", "--ops", "la_g", "--impls", "xla",
                               "--out", str(tmp_path)])
    status = {(c["dtype"], c["case"]): c["status"] for c in _checks(tmp_path)}
    assert rc == 1
    assert status == {("float32", "dense"): "FAIL", ("float32", "packed"): "FAIL",
                      ("bfloat16", "dense"): "PASS"}
    assert "FAIL    la_g/xla float32 dense" in capsys.readouterr().out


def test_time_budget_marks_checks_not_run(tmp_path):
    rc = gpu_correctness.main(["--small", "--ops", "la", "--impls", "xla", "--time_budget",
                               "0", "--out", str(tmp_path)])
    assert rc == 0 and {c["status"] for c in _checks(tmp_path)} == {"NOT RUN"}


def test_embedding_bag_and_context_parallel(tmp_path, capsys):
    """ebag's weights and table gradients are checked; context_parallel is SKIP on one device,
    with the reason."""
    rc = gpu_correctness.main(["--small", "--ops", "ebag", "context_parallel", "--impls", "xla",
                               "--dtypes", "float32", "--out", str(tmp_path)])
    bag, cp = sorted(_checks(tmp_path), key=lambda c: c["op"] != "ebag")
    assert rc == 0
    assert bag["status"] == "PASS" and set(bag["errors"]) == {"o", "dweights", "dtable"}
    assert cp["status"] == "SKIP" and "this machine has 1" in cp["reason"]
    assert "SKIP    context_parallel" in capsys.readouterr().out


def test_plan_is_breadth_first():
    """Every op's main case in bfloat16 first, xla before pallas; tf32 only for the scans and
    the neural memory; second cases last."""
    plan = gpu_correctness.plan_checks(["kda", "nm2", "bsa", "attn"], ["pallas", "xla"],
                                       ["cudnn"], ["bfloat16", "float32", "tf32"])
    first = [p for p in plan if p[2] == "bfloat16" and p[3] in ("dense", "token", "causal")]
    assert plan[:len(first)] == first and len(first) == 7
    assert [p[1] for p in plan[:3]] == ["xla", "xla", "xla"]
    assert {p[0] for p in plan if p[2] == "tf32"} == {"kda", "nm2"}
    assert plan[-1][3] in ("packed", "blocks_packed", "window_gqa")


def test_full_precision_pallas_scan_is_tf32_false():
    f = gpu_correctness._pallas_full_precision("gated_delta_rule")
    assert f.keywords == {"chunk_size": 64, "tf32": False}


@pytest.mark.slow
def test_new_ops_pass_small(tmp_path):
    """kda, the neural memory (both depths) and block-sparse attention, each impl, against
    the float64 reference at --small sizes (pallas in interpret mode)."""
    rc = gpu_correctness.main(["--small", "--ops", "kda", "nm1", "nm2", "bsa", "--impls",
                               "xla", "pallas", "--dtypes", "bfloat16", "float32", "tf32",
                               "--out", str(tmp_path)])
    checks = _checks(tmp_path)
    assert rc == 0 and {c["status"] for c in checks} == {"PASS"}
    nm2 = next(c for c in checks if c["op"] == "nm2")
    assert {"state.0.0", "state.0.1", "state.1.1", "dmemory.0", "dmemory.1",
            "dlr"} <= set(nm2["errors"])
    assert {c["op"] for c in checks if c["dtype"] == "tf32"} == {"kda", "nm1", "nm2"}
