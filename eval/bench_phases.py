"""Where the time of the Pallas chunked scans goes: every phase timed on its own, for several
block policies side by side (the tuning table behind `pallas_kernels.scan.phases.GPU_BLOCKS` / `TPU_BLOCKS`).

    python -m eval.bench_phases [--ops gdn la_g la_gk] [--B 4 --T 4096 --H 16 --K 128 --V 128]
                                [--dtype bfloat16] [--variants default warps8 tile32 ...]
                                [--reps 10] [--out out/bench_phases]

Phases (see `pallas_kernels.scan.phases`): forward `ut` (W, U; delta rule only), `state_fwd`,
`output`; backward `dv_intra` (delta rule only), `state_bwd`, `chunk_grads` (the written-out
gradients of every chunk). Each is jitted alone
on the same inputs; ms is the median of `--reps` calls after a warm-up, compile s the time of
lowering + compiling it. A table per op, results.json, and phases.png (stacked bars per
variant). On CPU the kernels run in interpret mode: use tiny shapes there (the numbers only
show the script works).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from eval import bench_ops

# Block-policy variants, as changes to the backend's default policy.
VARIANTS = {
    "default": {},
    "warps8": {"warps": 8},
    "seq_warps8": {"warps_seq": 8},
    "tile32": {"v_tile": 32, "v_tile_seq": 32},
    "tile128": {"v_tile": 128},
    "seq_tile32": {"v_tile_seq": 32},
    "no_tile_rule": {"tile_rule": ()},     # the policy's tiles whatever the call's size
    "f32_full": {"tf32": False},           # float32 inputs at full precision (GPU)
}


def run_phases(cfg, args, reps):
    """name -> (median ms, compile s) of every phase, in execution order, on the prepared
    inputs; each phase is compiled (timed) before it first runs, then feeds the next."""
    import jax
    from pallas_kernels.scan import parallel, phases

    seq = phases.sequential(cfg)
    q, k, v, extras, h0, reset, hidx = args
    delta = cfg.spec.delta
    cells = {}

    def stage(name, fn, *fargs):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*fargs).compile()
        compile_s = time.perf_counter() - t0
        out = jax.block_until_ready(compiled(*fargs))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*fargs))
            times.append(time.perf_counter() - t0)
        cells[name] = (float(np.median(times)) * 1e3, compile_s)
        return out

    w, u, tri = (stage("ut", lambda k, v, e: parallel.ut_transform(cfg, k, v, e),
                       k, v, extras) if delta else (None, v, None))
    h, vn, fin = stage("state_fwd", lambda k, u, w, e, h0: seq.state_forward(
        cfg, k, u, w, e, h0, reset, hidx), k, u, w, extras, h0)
    stage("output", lambda q, k, vn, e, h: parallel.output(cfg, q, k, vn, e, h),
          q, k, vn, extras, h)
    do = v.astype(cfg.out)  # any cotangent of o's shape: the timing does not depend on it
    dvo = (stage("dv_intra", lambda q, k, do, e: parallel.intra_dv(cfg, q, k, do, e),
                 q, k, do, extras) if delta else None)
    dh, _ = stage("state_bwd", lambda q, k, w, e, do, dvo, fin: seq.state_backward(
        cfg, q, k, w, e, do, dvo, fin, h0, reset, hidx), q, k, w, extras, do, dvo, fin)
    stage("chunk_grads", lambda q, k, v, e, h, tri, vn, do, dvo, dh: parallel.chunk_grads(
        cfg, q, k, v, e, h, tri, vn, do, dvo, dh), q, k, v, extras, h, tri,
        vn if delta else None, do, dvo, dh)
    return cells


def run(args):
    import jax
    import jax.numpy as jnp
    from pallas_kernels.scan import phases

    os.makedirs(args.out, exist_ok=True)
    base = phases.blocks_for(args.backend)
    results = []
    for op in args.ops:
        x = bench_ops.make_inputs(op, args.B, args.T, args.H, args.K, jnp.dtype(args.dtype),
                                  V=args.V)
        family = "gdn" if op == "gdn" else "la"
        for name in args.variants:
            blocks = dataclasses.replace(base, **VARIANTS[name])
            try:
                cfg, kargs, _ = phases.prepare(
                    family, x["q"], x["k"], x["v"], beta=x.get("beta"), g=x.get("g"),
                    gk=x.get("gk"), scale=args.K ** -0.5, chunk_size=64, blocks=blocks)
                cells = run_phases(cfg, kargs, args.reps)
            except Exception as e:  # noqa: BLE001 - a variant that does not fit is reported
                print(f"{op}/{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                results.append({"op": op, "variant": name, "error": str(e)[:1000]})
                continue
            row = {"op": op, "variant": name, "ms": {p: c[0] for p, c in cells.items()},
                   "compile_s": {p: c[1] for p, c in cells.items()},
                   "tiles": {"BV": cfg.BV, "BV_seq": cfg.BV_seq},
                   "device": jax.devices()[0].device_kind}
            results.append(row)
            print(f"{op:6s} {name:12s} BV {cfg.BV:3d}/{cfg.BV_seq:3d} " + "  ".join(
                f"{p} {c[0]:7.3f} ms ({c[1]:4.1f} s)" for p, c in cells.items())
                + f"  total {sum(c[0] for c in cells.values()):7.3f} ms", flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "phases.png"))
    return results


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "ms" in r]
    if not rows:
        return
    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        mine = [r for r in rows if r["op"] == op]
        bottom = np.zeros(len(mine))
        for ph in mine[0]["ms"]:
            vals = np.array([r["ms"].get(ph, 0.0) for r in mine])
            ax.bar([r["variant"] for r in mine], vals, bottom=bottom, label=ph)
            bottom += vals
        ax.set_title(op)
        ax.set_ylabel("ms (fwd phases + bwd phases)")
        ax.tick_params(axis="x", rotation=45)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("tpu", "gpu"), default=None,
                   help="kernel layout (default: the default device's)")
    p.add_argument("--ops", nargs="+", default=["gdn", "la_g", "la_gk"],
                   choices=("gdn", "la_g", "la_gk"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    for name, default in (("B", 4), ("T", 4096), ("H", 16), ("K", 128), ("V", 128)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="out/bench_phases")
    args = p.parse_args(argv)
    print(f"bench_phases: {vars(args)}", flush=True)
    run(args)


if __name__ == "__main__":
    main()
