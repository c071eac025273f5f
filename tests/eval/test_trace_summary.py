"""eval.trace_summary: HLO instructions classified, overlapping events split, and a real CPU
trace of a jitted program summarised with rows that sum to its window."""
import jax
import jax.numpy as jnp
import pytest

from eval import trace_summary

HLO = '''HloModule jit_step, is_scheduled=true

%fused_dot (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, metadata={op_name="a"}
}

%fused_add (p0: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  ROOT %add.2 = f32[8,8]{1,0} add(%p0, %p0)
}

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %fusion.7 = f32[8,8]{1,0} fusion(%p), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[8,8]{1,0}) tuple(%p, %fusion.7)
}

ENTRY %main.9 (a: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  %custom-call.3 = (f32[8,8]{1,0}, s32[]) custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", backend_config={name="gdn_state_fwd_gpu", ir="..."}
  %custom-call.4 = f32[8,8]{1,0} custom-call(%a, %a), custom_call_target="__cublas$lt$matmul"
  %custom-call.5 = f32[8,8]{1,0} custom-call(%a), custom_call_target="__cudnn$fmhaSoftmax"
  %fusion.1 = f32[8,8]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
  %all-reduce.6 = f32[8,8]{1,0} all-reduce(%a), replica_groups={}, to_apply=%fused_add
  %while.8 = (s32[], f32[8,8]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %copy.2 = f32[8,8]{1,0} copy(%a)
}
'''


def test_hlo_categories():
    module, table, kernels = trace_summary.hlo_categories(HLO)
    assert module == "jit_step"
    assert {n: table[n] for n in ("custom-call.3", "custom-call.4", "custom-call.5", "fusion.1",
                                  "all-reduce.6", "while.8", "fusion.7", "copy.2")} == {
        "custom-call.3": "pallas", "custom-call.4": "matmul", "custom-call.5": "attention",
        "fusion.1": "matmul", "all-reduce.6": "collective", "while.8": None,
        "fusion.7": "other", "copy.2": "other"}
    assert kernels == {"gdn_state_fwd_gpu": "pallas"}


def test_split_time_shares_overlaps_and_counts_idle():
    ns = trace_summary.split_time([(0, 10, "matmul"), (5, 15, "pallas"), (20, 30, "other")])
    assert ns == pytest.approx({"pallas": 7.5, "matmul": 7.5, "attention": 0, "collective": 0,
                                "other": 10, "idle": 5})


def test_summary_of_a_cpu_trace(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a) * 2)
    compiled = f.lower(jnp.ones((256, 256))).compile()
    x = jnp.ones((256, 256))
    jax.block_until_ready(compiled(x))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(compiled(x))
    s = trace_summary.summarize(str(tmp_path), compiled.as_text(), steps=2)
    rows = {r["category"]: r for r in s["rows"]}
    assert s["events"] >= 2 and rows["matmul"]["ms_per_step"] > 0
    assert sum(r["ms_per_step"] for r in s["rows"]) == pytest.approx(s["window_ms"] / 2)
    assert sum(r["percent"] for r in s["rows"]) == pytest.approx(100)
