"""Every op and impl against the float64 reference, on the machine at hand (meant for a GPU or
TPU, where the Pallas kernels run compiled rather than in interpret mode).

    python -m eval.gpu_correctness [--small] [--ops gdn deltanet la la_g la_gk attn]
                                   [--impls xla pallas] [--time_budget SECONDS] [--out DIR]

Recurrent ops (gdn = gated_delta_rule with β and g, deltanet = without g, la = linear_attention
without gates, la_g with g, la_gk with gk), each impl (default xla and pallas), three cases:

    dense     B=2, T=300 (not a multiple of the chunk), H=2, K=V=128, initial state; bfloat16
              (first: what training runs) and float32
    packed    B=1, T=301, cu_seqlens [0, 37, 37, 200, 290] (an empty sequence, boundaries
              inside chunks, 11 tokens outside every sequence), initial states; float32

and softmax attention (the impls of `pallas_kernels.attention.IMPLS` but the reference and
those of eval.bench_ops.ELSEWHERE for this platform; "auto" included: what users get), two
cases, float32 and bfloat16:

    causal      B=2, T=300, H=4, D=128
    window_gqa  B=1, T=256 (splash takes multiples of 128), H=4 over 2 k/v heads, window 96

Compared: the output, the final state, and the gradient of every input (random cotangents on
o and the state) with the `reference` impl run in float64 (jax.enable_x64) on the same values;
error = max |got − want| / max |want| per tensor, against a tolerance per dtype (float32 under
jax.default_matmul_precision("highest"), so that TF32 rounding does not hide in it). An
attention impl that declines a case (ValueError / NotImplementedError: e.g. cuDNN takes no
float32) is SKIP; any other exception is ERROR. --small shrinks every size (K=V=D=16, T≈40)
so that the script runs on a CPU in interpret mode, for testing it.

Prints one PASS / FAIL / SKIP / ERROR / NOT RUN line per check and writes gpu_correctness.json
after each; exits 1 if any check failed or erred.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from typing import Optional, Sequence

import numpy as np

from eval import common
from eval.bench_fla import error_text
from eval.bench_ops import ELSEWHERE

TOL = {"float32": 1e-4, "bfloat16": 5e-2}
RECURRENT = ("gdn", "deltanet", "la", "la_g", "la_gk")
# op -> (family, the gate inputs it takes)
OPS = {"gdn": ("gated_delta_rule", ("beta", "g")), "deltanet": ("gated_delta_rule", ("beta",)),
       "la": ("linear_attention", ()), "la_g": ("linear_attention", ("g",)),
       "la_gk": ("linear_attention", ("gk",))}


def cases(small: bool) -> dict:
    """name -> sizes; recurrent cases carry cu_seqlens (or None), attention ones a window."""
    if small:
        return {"dense": dict(B=2, T=45, H=2, K=16, cu=None, dtypes=("bfloat16", "float32")),
                "packed": dict(B=1, T=50, H=2, K=16, cu=[0, 5, 5, 30, 47], dtypes=("float32",)),
                "causal": dict(B=2, T=40, H=4, Hkv=4, K=16, window=None),
                "window_gqa": dict(B=1, T=128, H=4, Hkv=2, K=16, window=8)}
    return {"dense": dict(B=2, T=300, H=2, K=128, cu=None, dtypes=("bfloat16", "float32")),
            "packed": dict(B=1, T=301, H=2, K=128, cu=[0, 37, 37, 200, 290],
                           dtypes=("float32",)),
            "causal": dict(B=2, T=300, H=4, Hkv=4, K=128, window=None),
            "window_gqa": dict(B=1, T=256, H=4, Hkv=2, K=128, window=96)}


def op_fn(op: str):
    """f(args dict, cu_seqlens) -> (o, final state) | o, for any impl given as `impl=`."""
    import pallas_kernels
    from pallas_kernels.attention import attention

    if op == "attn":
        def f(a, cu, *, impl, window):
            return attention(a["q"], a["k"], a["v"], causal=True, window=window, impl=impl)
        return f
    family, _ = OPS[op]

    def f(a, cu, *, impl, window):
        return getattr(pallas_kernels, family)(**a, cu_seqlens=cu, output_final_state=True,
                                               impl=impl)
    return f


def make_values(rng, op: str, c: dict) -> dict:
    """float64 numpy inputs for one case."""
    B, T, H, K = c["B"], c["T"], c["H"], c["K"]
    Hkv = c.get("Hkv", H)
    k = rng.standard_normal((B, T, Hkv, K))
    a = {"q": rng.standard_normal((B, T, H, K)), "v": rng.standard_normal((B, T, Hkv, K)),
         # unit keys: the delta rule's stability condition, harmless for the others
         "k": k / np.linalg.norm(k, axis=-1, keepdims=True) if op != "attn" else k}
    if op == "attn":
        return a
    gates = OPS[op][1]
    if "beta" in gates:
        a["beta"] = rng.uniform(0.0, 1.0, (B, T, H))
    if "g" in gates:
        a["g"] = rng.uniform(-0.4, 0.0, (B, T, H))
    if "gk" in gates:
        a["gk"] = rng.uniform(-0.4, 0.0, (B, T, H, K))
    N = B if c["cu"] is None else len(c["cu"]) - 1
    a["initial_state"] = rng.standard_normal((N, H, K, K))
    return a


@functools.cache
def vjp_runner(op: str, impl: str, window):
    """jit of (args, cu, cotangents) -> (outputs, grads of every array in args)."""
    import jax
    f = op_fn(op)

    def run(args, cu, cts):
        out, pull = jax.vjp(lambda a: f(a, cu, impl=impl, window=window), args)
        return out, pull(cts)[0]
    return jax.jit(run)


def evaluate(op, impl, values, cts, cu, dtype_name, window):
    """(got, want): dicts of float64 numpy arrays, impl in `dtype_name` vs float64 reference."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    # State and cotangent of the state stay float32, as the ops keep them.
    args = {n: jnp.asarray(x, jnp.float32 if n == "initial_state" else dtype)
            for n, x in values.items()}
    ct = tuple(jnp.asarray(x, jnp.float32 if i == 1 else dtype) for i, x in enumerate(cts))
    ct = ct if op != "attn" else ct[0]
    cu_j = None if cu is None else jnp.asarray(cu, jnp.int32)
    precision = (jax.default_matmul_precision("highest") if dtype_name == "float32"
                 else contextlib.nullcontext())
    with precision:
        out, grads = vjp_runner(op, impl, window)(args, cu_j, ct)
    got = _flat(out, grads)
    # The reference sees exactly the values the impl saw (rounded to dtype), in float64.
    rounded = {n: np.asarray(x, np.float64) for n, x in args.items()}
    rounded_ct = jax.tree.map(lambda x: np.asarray(x, np.float64), ct)
    with jax.enable_x64(True):
        ref_args = {n: jnp.asarray(x, jnp.float64) for n, x in rounded.items()}
        ref_ct = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), rounded_ct)
        cu_r = None if cu is None else jnp.asarray(cu, jnp.int32)
        out_r, grads_r = vjp_runner(op, "reference", window)(ref_args, cu_r, ref_ct)
        want = _flat(out_r, grads_r)
    return got, want


def _flat(out, grads) -> dict:
    outs = out if isinstance(out, tuple) else (out,)
    d = {name: np.asarray(np.asarray(x, np.float32) if x.dtype.itemsize == 2 else x, np.float64)
         for name, x in zip(("o", "state"), outs)}
    d.update({f"d{n}": np.asarray(np.asarray(g, np.float32) if g.dtype.itemsize == 2 else g,
                                  np.float64) for n, g in grads.items()})
    return d


def rel_errors(got: dict, want: dict) -> dict:
    """name -> max |got − want| / max |want| (inf where got is not finite or shapes differ)."""
    errs = {}
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape or not np.all(np.isfinite(g)):
            errs[name] = float("inf")
            continue
        errs[name] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)) if w.size else 0.0
    return errs


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.gpu_correctness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=[*RECURRENT, "attn"],
                    choices=[*RECURRENT, "attn"])
    ap.add_argument("--impls", nargs="+", default=["xla", "pallas"],
                    help="recurrent-op impls (attention: all of its IMPLS but the reference)")
    ap.add_argument("--attn_impls", nargs="+", default=None,
                    help="default: see above")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for a CPU")
    ap.add_argument("--time_budget", type=float, default=None,
                    help="seconds; no check starts past it (reported NOT RUN)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/gpu_correctness")
    args = ap.parse_args(argv)

    import jax
    from pallas_kernels.attention import IMPLS as ATTN_IMPLS
    from pallas_kernels.common import IMPLS as OP_IMPLS

    bad = set(args.impls) - set(OP_IMPLS)
    if bad:
        common.fail(f"--impls: unknown {sorted(bad)}; known: {list(OP_IMPLS)}")
    device = jax.devices()[0]
    attn_impls = args.attn_impls or [i for i in ATTN_IMPLS if i != "reference"
                                     and i not in ELSEWHERE.get(device.platform, ())]
    bad = set(attn_impls) - set(ATTN_IMPLS)
    if bad:
        common.fail(f"--attn_impls: unknown {sorted(bad)}; known: {list(ATTN_IMPLS)}")
    out = common.out_dir(args.out)
    print(f"device: {device.platform} {device.device_kind}; jax {jax.__version__}", flush=True)

    cs = cases(args.small)
    # Breadth first, so that a time budget cut leaves every op checked at least once: the
    # first tier has each op's main case (bf16 for attention, which cuDNN needs), the later
    # tiers the other dtype and the packed / windowed cases.
    tiers = {("dense", "float32"): 0, ("causal", "bfloat16"): 0, ("dense", "bfloat16"): 1,
             ("causal", "float32"): 1, ("packed", "float32"): 2, ("window_gqa", "bfloat16"): 2,
             ("window_gqa", "float32"): 3}
    plan = []
    for op in args.ops:
        if op == "attn":
            plan += [(op, impl, dt, name) for name in ("causal", "window_gqa")
                     for dt in ("float32", "bfloat16") for impl in attn_impls]
        else:
            plan += [(op, impl, dt, name) for name in ("dense", "packed")
                     for dt in cs[name]["dtypes"] for impl in args.impls]
    plan.sort(key=lambda p: tiers[p[3], p[2]])

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    values = {}     # (op, case) -> (inputs, cotangents): every impl and dtype sees the same
    checks = []
    for op, impl, dt, name in plan:
        c = cs[name]
        r = {"op": op, "impl": impl, "dtype": dt, "case": name, "tol": TOL[dt],
             "sizes": {k: v for k, v in c.items() if k != "dtypes"}}
        elapsed = time.perf_counter() - start
        if args.time_budget is not None and elapsed > args.time_budget:
            r.update(status="NOT RUN", reason=f"{elapsed:.0f} s spent of --time_budget "
                                              f"{args.time_budget:g}")
        else:
            if (op, name) not in values:
                v = make_values(rng, op, c)
                N = None if op == "attn" else v["initial_state"].shape[0]
                cts = (rng.standard_normal(v["q"].shape[:3] + (v["v"].shape[-1],)),)
                if N is not None:
                    cts += (rng.standard_normal((N, c["H"], c["K"], c["K"])),)
                values[op, name] = (v, cts)
            v, cts = values[op, name]
            t0 = time.perf_counter()
            try:
                got, want = evaluate(op, impl, v, cts, c.get("cu"), dt, c.get("window"))
                errs = rel_errors(got, want)
                worst = max(errs.values())
                r.update(status="PASS" if worst <= TOL[dt] else "FAIL", max_error=worst,
                         errors=errs)
            except (ValueError, NotImplementedError) as e:
                r.update(status="SKIP" if op == "attn" else "ERROR", reason=error_text(e))
            except Exception as e:  # noqa: BLE001 - a kernel that does not compile, ...
                r.update(status="ERROR", reason=error_text(e))
            r["seconds"] = time.perf_counter() - t0
        checks.append(r)
        print(_line(r), flush=True)
        common.write_json(out / "gpu_correctness.json", {
            "device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
            "small": args.small, "checks": checks})

    counts = {s: sum(r["status"] == s for r in checks)
              for s in ("PASS", "FAIL", "ERROR", "SKIP", "NOT RUN")}
    print("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), flush=True)
    print(f"wrote {out / 'gpu_correctness.json'}")
    return 1 if counts["FAIL"] or counts["ERROR"] else 0


def _line(r: dict) -> str:
    head = f"{r['status']:<7} {r['op']}/{r['impl']} {r['dtype']} {r['case']}"
    if "max_error" in r:
        worst = sorted(r["errors"].items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{k} {v:.2g}" for k, v in worst)
        return (f"{head}: max rel error {r['max_error']:.2g} (tol {r['tol']:g}; {detail}) "
                f"{r['seconds']:.1f} s")
    return f"{head}: {r.get('reason', '')}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
