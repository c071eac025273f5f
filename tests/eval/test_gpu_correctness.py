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

        def g(a, cu, *, impl, window):
            out = f(a, cu, impl=impl, window=window)
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
