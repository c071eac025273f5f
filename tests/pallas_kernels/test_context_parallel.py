"""Context parallelism of the recurrent ops (`context_axis=`): on 4 simulated CPU devices, with
T split over a mesh axis inside `jax.shard_map`, every impl of linear_attention (no gate, g,
gk, both) and gated_delta_rule (DeltaNet, gated, per-key gk = KDA, both; gk under -m slow)
returns the unsharded op's outputs, final state and gradients (q, k, v, gates, β,
initial_state), also with packed documents crossing device boundaries; the compiled
program's collectives move only state-sized operands; and the Pallas kernels (not interpret
mode) lower for CUDA and TPU under shard_map with replication checks. shard_map runs with
check_vma=True except for impl "pallas" (interpret mode here, which JAX cannot type-check:
`common.varying_call`), which so also covers check_vma=False.

The devices need XLA_FLAGS before JAX starts, so the checks run this file as a subprocess
(`tests/layers/simulated_devices.py`), one per test: the fast cases in one, the rest `slow`.
"""
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "_simulated_devices", Path(__file__).resolve().parents[1] / "layers" / "simulated_devices.py")
_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sim)

D, T, H, K, V = 4, 64, 2, 8, 8
# Packed row: documents end on a device boundary (16), start on one (16), are empty, span
# three devices (16..53), and tokens past the last document (61..63) get o = 0.
CU = [0, 5, 16, 16, 53, 61]
TOL = 1e-5       # max |sharded − unsharded| / max |unsharded|, float32 both
HLO_T = 4096     # the collectives check compiles (never runs) a longer sequence

# (op, gates, impl, packed): the fast test runs one case per impl and both op families;
# the slow one every other combination.
# One case per impl family in the fast set: the chunked xla form and the Pallas scan, packed.
FAST = [("la", "g+gk", "xla", True), ("gdn", "g", "pallas", True)]
SLOW = [(op, gates, impl, packed)
        for op, gl in (("la", ("", "g", "gk", "g+gk")), ("gdn", ("", "g", "gk", "g+gk")))
        for gates in gl for impl in ("reference", "xla", "pallas") for packed in (False, True)]
SLOW = [c for c in SLOW if c not in FAST]


def shard_map_fn():
    """`jax.shard_map` (JAX >= 0.6), else the experimental one (check_rep was check_vma)."""
    import jax
    if hasattr(jax, "shard_map"):
        return jax.shard_map
    from jax.experimental.shard_map import shard_map
    return lambda f, **kw: shard_map(f, **{("check_rep" if k == "check_vma" else k): v
                                          for k, v in kw.items()})


def make_inputs(op, gates, packed, T_total, seed=0):
    rng = np.random.default_rng(seed)
    B = 1 if packed else 2
    N = len(CU) - 1 if packed else B
    x = {"q": rng.standard_normal((B, T_total, H, K)), "k": rng.standard_normal((B, T_total, H, K)),
         "v": rng.standard_normal((B, T_total, H, V))}
    if op == "gdn":
        x["beta"] = rng.uniform(0.1, 0.9, (B, T_total, H))
    if "g" in gates.split("+"):
        x["g"] = -rng.uniform(0.0, 0.3, (B, T_total, H))
    if "gk" in gates.split("+"):
        x["gk"] = -rng.uniform(0.0, 0.3, (B, T_total, H, K))
    x = {n: a.astype(np.float32) for n, a in x.items()}
    h0 = (0.5 * rng.standard_normal((N, H, K, V))).astype(np.float32)
    return x, h0


def op_call(op, impl, cu, context_axis):
    import pallas_kernels as pk

    def call(x, h0):
        kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, impl=impl,
                  chunk_size=8, context_axis=context_axis)
        if op == "la":
            return pk.linear_attention(x["q"], x["k"], x["v"], x.get("g"), x.get("gk"), **kw)
        return pk.gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x.get("g"), x.get("gk"),
                                   use_qk_l2norm=True, **kw)
    return call


def loss_and_grads(op, impl, x, h0, cu, mesh, check_vma=True):
    """jit(value_and_grad) of a fixed projection of (o, final state), unsharded (mesh None)
    or under shard_map with T over the mesh's 'context' axis."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(1)
    wo = jnp.asarray(rng.standard_normal(x["v"].shape), jnp.float32)
    ws = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    if mesh is None:
        fwd = op_call(op, impl, cu, None)
    else:
        tok = {n: P(None, "context") for n in x}
        fwd = shard_map_fn()(op_call(op, impl, cu, "context"), mesh=mesh,
                             in_specs=(tok, P()),
                             out_specs=(P(None, "context"), P()), check_vma=check_vma)

    def loss(x, h0):
        o, S = fwd(x, h0)
        return jnp.sum(o * wo) + jnp.sum(S * ws), (o, S)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def collective_sizes(hlo: str) -> list:
    """(kind, largest element count among the shapes on the line) of every collective."""
    sizes = []
    for line in hlo.splitlines():
        m = re.search(r"\b(all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all)"
                      r"(?:-start)?\(", line)
        if not m:
            continue
        counts = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                  for dims in re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", line)]
        sizes.append((m.group(1), max(counts)))
    return sizes


def worker(out):
    which = Path(out).stem           # "fast" | "slow": the cases to run
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    assert jax.device_count() >= D, jax.devices()
    mesh = Mesh(np.array(jax.devices()[:D]), ("context",))
    maxrel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                / (np.max(np.abs(np.asarray(b))) + 1e-30))
    result = {"cases": {}, "seconds": {}}
    for op, gates, impl, packed in (FAST if which == "fast" else SLOW):
        start = time.perf_counter()
        x, h0 = make_inputs(op, gates, packed, T)
        x = {n: jnp.asarray(a) for n, a in x.items()}
        cu = jnp.asarray(CU, jnp.int32) if packed else None
        (l1, (o1, s1)), g1 = loss_and_grads(op, impl, x, h0, cu, None)(x, h0)
        # Pallas' interpret mode has no replication checks (common.varying_call).
        check_vma = impl != "pallas"
        (l4, (o4, s4)), g4 = loss_and_grads(op, impl, x, h0, cu, mesh, check_vma)(x, h0)
        errs = {"o": maxrel(o4, o1), "state": maxrel(s4, s1),
                "dh0": maxrel(g4[1], g1[1])}
        errs.update({f"d{n}": maxrel(g4[0][n], g1[0][n]) for n in x})
        if packed:  # tokens past the last document
            errs["o_pad"] = float(np.max(np.abs(np.asarray(o4)[:, CU[-1]:])))
        name = f"{op}|{gates}|{impl}|{'packed' if packed else 'batch'}"
        result["cases"][name] = errs
        result["seconds"][name] = time.perf_counter() - start

    # The compiled forward + backward: only state-sized collectives.
    result["hlo"] = {}
    for op, gates, packed in ([("gdn", "g", True)] if which == "fast" else [("la", "g+gk", False)]):
        start = time.perf_counter()
        x, h0 = make_inputs(op, gates, packed, HLO_T)
        cu = jnp.asarray(CU, jnp.int32) if packed else None
        hlo = loss_and_grads(op, "xla", x, h0, cu, mesh).lower(x, h0).compile().as_text()
        result["hlo"][op] = dict(sizes=collective_sizes(hlo), N=h0.shape[0], B=x["q"].shape[0])
        result["seconds"][f"hlo {op}"] = time.perf_counter() - start
    if which == "fast":
        start = time.perf_counter()
        result["lowering"] = {plat: lower_for(plat, mesh) for plat in ("cuda", "tpu")}
        result["seconds"]["lowering"] = time.perf_counter() - start
    Path(out).write_text(json.dumps(result, indent=1))


def lower_for(platform, mesh):
    """The Pallas kernels (not interpret mode) of the context-parallel gated delta rule,
    forward and backward, lower for `platform` under shard_map WITH replication checks:
    "ok", "unavailable: ..." (this jax cannot lower any Pallas kernel there), or the error."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.scan import context_parallel
    from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas

    def trivial(x):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] + 1
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
    try:
        jax.jit(trivial).trace(jnp.zeros((8, 128))).lower(lowering_platforms=(platform,))
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {e!r}"[:300]

    layout = "gpu" if platform == "cuda" else "tpu"
    N, Tl = len(CU) - 1, 64

    def local(q, k, v, beta, g, h0, cu):
        def run(v, h0, cu):
            return gated_delta_rule_pallas(q, k, v, beta, g, scale=K ** -0.5, initial_state=h0,
                                           cu_seqlens=cu, chunk_size=64, backend=layout,
                                           interpret=False)
        return context_parallel.run_over_context(
            run, v, h0, cu, context_axis="context", num_states=N, K=K, acc=jnp.float32,
            output_final_state=True)

    tok = P(None, "context")
    f = shard_map_fn()(local, mesh=mesh, in_specs=(tok,) * 5 + (P(), P()),
                       out_specs=(tok, P()), check_vma=True)

    def loss(*a):
        o, S = f(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    args = ([jnp.zeros((1, D * Tl, H, K), jnp.bfloat16)] * 2
            + [jnp.zeros((1, D * Tl, H, V), jnp.bfloat16), jnp.zeros((1, D * Tl, H)),
               jnp.zeros((1, D * Tl, H)), jnp.zeros((N, H, K, V)), jnp.asarray(CU, jnp.int32)])
    try:
        jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*args).lower(
            lowering_platforms=(platform,))
    except Exception as e:  # noqa: BLE001
        return f"error: {e!r}"[:2000]
    return "ok"


def _check(result, cases):
    assert sorted(result["cases"]) == sorted(
        f"{op}|{gates}|{impl}|{'packed' if packed else 'batch'}"
        for op, gates, impl, packed in cases)
    bad = {name: errs for name, errs in result["cases"].items()
           if any(v > (0 if k == "o_pad" else TOL) for k, v in errs.items())}
    assert not bad, json.dumps(bad, indent=1)
    for op, h in result["hlo"].items():
        kinds = {kind for kind, _ in h["sizes"]}
        assert {"all-gather", "all-reduce"} <= kinds, (op, h["sizes"])
        # Gathered maps: D·N·H·K·(K+V) floats. One device's inputs alone are
        # B·(HLO_T/D)·H·K, more than that: token-sized traffic cannot pass.
        bound = D * h["N"] * H * K * (K + V)
        assert max(n for _, n in h["sizes"]) <= bound, (op, bound, h["sizes"])
        assert bound < h["B"] * (HLO_T // D) * H * K, bound


def test_context_parallel_equals_unsharded(tmp_path):
    out = tmp_path / "fast.json"
    _sim.run_with_devices(__file__, out, devices=D)
    r = json.loads(out.read_text())
    _check(r, FAST)
    for platform, status in r["lowering"].items():
        assert not status.startswith("error"), (platform, status)


@pytest.mark.slow
def test_context_parallel_equals_unsharded_all_cases(tmp_path):
    out = tmp_path / "slow.json"
    _sim.run_with_devices(__file__, out, devices=D)
    _check(json.loads(out.read_text()), SLOW)


def test_unbound_context_axis_is_a_named_error():
    import jax
    import pallas_kernels as pk
    x, h0 = make_inputs("gdn", "g", False, 8)
    with pytest.raises(ValueError, match="context_axis"):
        pk.linear_attention(x["q"], x["k"], x["v"], context_axis="context")
    with pytest.raises(ValueError, match="context_axis"):
        jax.jit(lambda q: pk.gated_delta_rule(q, x["k"], x["v"], x["beta"],
                                              context_axis="context")[0])(x["q"])


if __name__ == "__main__":
    worker(sys.argv[1])
