"""Speed and memory of the memory ops, every implementation side by side.

    python -m eval.bench_ops [--quick] [--backend cpu|gpu] [--impls reference xla pallas]
                             [--lengths 1024 4096 16384] [--out out/bench_ops]

For each op — linear attention with a per-head decay g (`la_g`), linear attention with per-key
decays gk (`la_gk`, GLA) and the gated delta rule (`gdn`) — each impl and each length T, at
B=1, H=4, K=V=64 in float32 (`--dtype`):

- fwd ms, fwd+bwd ms: median wall time of `--reps` calls of the jitted forward (o only) and of
  the jitted gradient of <o, random cotangent> w.r.t. every input, after a compiling warm-up.
- XLA MB: XLA's `compiled.memory_analysis()` of the fwd+bwd program, temporaries + outputs
  (the memory the call needs beyond its inputs). Deterministic, on any backend.
- RSS MB (chunked impls, not with --quick): growth of the process's resident memory during the
  first fwd+bwd call, sampled every millisecond in a fresh subprocess that has its inputs and
  the compiled program already (so: what running one fwd+bwd adds to the process's peak).
- %mm: achieved FLOP/s as a fraction of this machine's float32 matmul rate, measured in the
  same run (a jitted N×N @ N×N, N=2048; 1024 with --quick) before every cell; the best of
  those is the rate, so on a shared, loaded machine %mm errs low.

FLOP count (the same nominal count for every impl, so %mm ratios are speed ratios): the matrix
products of the chunked algorithm at chunk size C=64, per chunk of C tokens and head, 2 FLOPs
per multiply-add:

    la_g, la_gk:  2·(C²K [QKᵀ] + C²V [PV] + 2·CKV [read-out of and update to the state])
    gdn:          2·(2·C²K [KKᵀ, QKᵀ] + C²(K+V) [UT transform applied to βV, βK]
                     + C²K + C²V [P·W, P·U] + CK² + CKV [Kdᵀ·W, Kdᵀ·U] + K²V [state pass]
                     + CKV [read-out])

(elementwise work — decays, masks, the C×C unit-triangular inverse — is not counted), and
fwd+bwd = 3 × fwd. The token scan (`reference`) does fewer FLOPs (O(K·V) per token), so its %mm
under this count is its speed measured in chunked-algorithm units.

The token scan's fwd+bwd stores a state per token; a cell is skipped (and the reason printed)
when its time, extrapolated linearly from the previous length, exceeds --max_seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

from eval import common

OPS = ("la_g", "la_gk", "gdn")
B, H, K, V, C_NOMINAL = 1, 4, 64, 64, 64


# ----------------------------------------------------------------------------- workload
def nominal_flops(op: str, T: int, fwd_only: bool = True) -> float:
    """The FLOP count defined in the module docstring."""
    C = C_NOMINAL
    if op in ("la_g", "la_gk"):
        per_chunk = C * C * K + C * C * V + 2 * C * K * V
    else:
        per_chunk = (2 * C * C * K + C * C * (K + V) + C * C * K + C * C * V + C * K * K
                     + C * K * V + K * K * V + C * K * V)
    fwd = 2.0 * per_chunk * (-(-T // C)) * B * H
    return fwd if fwd_only else 3.0 * fwd


def make_inputs(op: str, T: int, dtype, seed: int = 0) -> dict:
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)
    arr = lambda x: jnp.asarray(x, dtype)
    k = rng.standard_normal((B, T, H, K))
    x = {"q": arr(rng.standard_normal((B, T, H, K))),
         "k": arr(k / np.linalg.norm(k, axis=-1, keepdims=True)),
         "v": arr(rng.standard_normal((B, T, H, V)))}
    if op == "la_gk":
        x["gk"] = arr(np.log(rng.uniform(0.9, 1.0, (B, T, H, K))))
    else:
        x["g"] = arr(np.log(rng.uniform(0.9, 1.0, (B, T, H))))
    if op == "gdn":
        x["beta"] = arr(rng.uniform(0.0, 1.0, (B, T, H)))
    return x


def make_fns(op: str, impl: str, inputs: dict):
    """(jitted forward, jitted fwd+bwd) for one op/impl, both taking the input dict."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.gated_delta_rule import gated_delta_rule
    from pallas_kernels.linear_attention import linear_attention

    def forward(x):
        if op == "gdn":
            return gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], impl=impl)[0]
        return linear_attention(x["q"], x["k"], x["v"], x.get("g"), x.get("gk"), impl=impl)[0]

    ct = jnp.asarray(np.random.default_rng(1).standard_normal(inputs["v"].shape),
                     inputs["v"].dtype)

    def loss(x):
        return jnp.sum(forward(x).astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss))


def time_call(fn, args, reps: int) -> float:
    """Median wall seconds of `fn(args)` over `reps` calls, after one warm-up call."""
    import jax
    jax.block_until_ready(fn(args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def xla_memory_mb(compiled) -> Optional[float]:
    try:
        m = compiled.memory_analysis()
        return (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
    except Exception:  # noqa: BLE001 - some backends have no memory analysis
        return None


def matmul_gflops(n: int, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    return 2.0 * n ** 3 / time_call(mm, x, reps) / 1e9


# ----------------------------------------------------------------------------- RSS subprocess
def _rss_child(op: str, impl: str, T: int, dtype: str) -> None:
    """Run in a subprocess: print the RSS growth (MB) of one fwd+bwd call, as JSON."""
    import threading

    import jax
    import jax.numpy as jnp
    import psutil

    inputs = make_inputs(op, T, jnp.dtype(dtype))
    _, fwd_bwd = make_fns(op, impl, inputs)
    fwd_bwd = fwd_bwd.lower(inputs).compile()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    out = fwd_bwd(inputs)
    jax.block_until_ready(out)
    done.set()
    thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(json.dumps({"rss_growth_mb": (peak[0] - base) / 2**20}))


def rss_growth_mb(op: str, impl: str, T: int, dtype: str, backend: str) -> Optional[float]:
    env = dict(os.environ, JAX_PLATFORMS=backend)
    cmd = [sys.executable, "-m", "eval.bench_ops", "--_rss_child", op, impl, str(T), dtype]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        return json.loads(res.stdout.strip().splitlines()[-1])["rss_growth_mb"]
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"RSS measurement of {op}/{impl} at T={T} failed: {e}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- main
def available_impls(backend: str) -> list:
    import importlib.util
    impls = ["reference", "xla"]
    has_pallas = all(importlib.util.find_spec(f"pallas_kernels.{p}.pallas") is not None
                     for p in ("linear_attention", "gated_delta_rule"))
    if has_pallas and backend != "cpu":  # on CPU the kernels only run in interpret mode
        impls.append("pallas")
    return impls


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--impls", nargs="+", default=None,
                    choices=("reference", "xla", "pallas"),
                    help="default: reference, xla (+ pallas off CPU)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="default 1024 4096 16384 (--quick: 256 1024)")
    ap.add_argument("--backend", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max_seconds", type=float, default=60.0,
                    help="skip a cell whose extrapolated call time exceeds this")
    ap.add_argument("--no_rss", action="store_true", help="skip the RSS subprocesses")
    ap.add_argument("--quick", action="store_true",
                    help="small lengths, no RSS subprocesses: a ~1 minute smoke run")
    ap.add_argument("--out", default="out/bench_ops")
    ap.add_argument("--_rss_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._rss_child:
        op, impl, T, dtype = args._rss_child
        _rss_child(op, impl, int(T), dtype)
        return {}
    os.environ["JAX_PLATFORMS"] = args.backend
    import jax
    import jax.numpy as jnp
    try:
        device = jax.devices()[0]
    except RuntimeError as e:
        common.fail(f"--backend {args.backend}: no such device ({e})")

    lengths = sorted(args.lengths or ([256, 1024] if args.quick else [1024, 4096, 16384]))
    impls = args.impls or available_impls(args.backend)
    if min(lengths) < 1 or args.reps < 1:
        common.fail("--lengths and --reps must be >= 1")
    measure_rss = not (args.quick or args.no_rss)
    dtype = jnp.dtype(args.dtype)

    mm_n = 1024 if args.quick else 2048
    mm_rates = []

    results, last, notes = [], {}, []
    cells = [(op, T, impl) for op in args.ops for T in lengths for impl in impls]
    for op, T, impl in common.progress_bar(cells, desc="bench_ops"):
        mm_rates.append(matmul_gflops(mm_n))
        inputs = make_inputs(op, T, dtype)
        r = {"op": op, "impl": impl, "T": T}
        for name, fn in zip(("fwd", "fwd_bwd"), make_fns(op, impl, inputs)):
            prev = last.get((op, impl, name))
            est = prev[1] * T / prev[0] if prev else 0.0
            if est > args.max_seconds:
                why = (f"{op}/{impl} {name} at T={T} skipped: ~{est:.0f} s per call "
                       f"extrapolated from T={prev[0]} (> --max_seconds {args.max_seconds:g})")
                notes.append(why)
                r[f"{name}_skipped"] = why
                continue
            compiled = fn.lower(inputs).compile()
            sec = time_call(compiled, inputs, args.reps)
            last[(op, impl, name)] = (T, sec)
            r[f"{name}_ms"] = sec * 1e3
            r[f"{name}_gflops"] = nominal_flops(op, T, name == "fwd") / sec / 1e9
            if name == "fwd_bwd":
                r["xla_mb"] = xla_memory_mb(compiled)
        if "fwd_bwd_ms" in r and measure_rss and impl != "reference":
            r["rss_mb"] = rss_growth_mb(op, impl, T, args.dtype, args.backend)
        results.append(r)

    # The machine's matmul rate: the best of the measurements taken before every cell (on a
    # shared machine the others only show the load of the moment), so %mm is conservative.
    mm = max(mm_rates)
    print(f"{device.platform} ({device.device_kind}): float32 matmul {mm:.1f} GFLOP/s "
          f"(best of {len(mm_rates)}; median {np.median(mm_rates):.1f})", flush=True)
    for r in results:
        for name in ("fwd", "fwd_bwd"):
            if f"{name}_gflops" in r:
                r[f"{name}_mm"] = r[f"{name}_gflops"] / mm
    rows = _table_rows(results, args.ops, lengths, impls)
    title = (f"{args.dtype}, B={B} H={H} K=V={K}; %mm = share of {mm:.0f} GFLOP/s float32 "
             f"matmul; XLA MB = temp+output of the compiled fwd+bwd; RSS MB = process growth "
             f"in one fwd+bwd (subprocess)")
    table = common.print_table(rows, floatfmt=",.3g", title=title)
    for n in notes:
        print(n)

    out = common.out_dir(args.out)
    result = {"task": "bench_ops", "device": f"{device.platform} {device.device_kind}",
              "matmul_gflops": mm, "matmul_gflops_all": mm_rates, "dtype": args.dtype, "shape": {"B": B, "H": H, "K": K, "V": V},
              "results": results, "table": rows, "notes": notes, "markdown": table}
    common.write_json(out / "bench_ops.json", result)
    _plot(out / "bench_ops.png", results, args.ops, impls)
    print(f"wrote {out / 'bench_ops.json'} and {out / 'bench_ops.png'}")
    return result


def _table_rows(results, ops, lengths, impls) -> list:
    get = {(r["op"], r["T"], r["impl"]): r for r in results}
    rows = []
    for op in ops:
        for T in lengths:
            row = {"op": op, "T": T}
            cells = {i: get.get((op, T, i), {}) for i in impls}
            for key, label in (("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms"),
                               ("fwd_bwd_mm", "f+b %mm"), ("xla_mb", "XLA MB"),
                               ("rss_mb", "RSS MB")):
                for i in impls:
                    v = cells[i].get(key)
                    if key.endswith("_mm") and v is not None:
                        v = 100.0 * v
                    if key == "rss_mb" and i == "reference":
                        continue
                    row[f"{i} {label}"] = v
            base = cells.get("reference", {})
            for i in impls:
                if i == "reference":
                    continue
                for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "f+b")):
                    a, b = base.get(key), cells[i].get(key)
                    row[f"{i} {label} speedup"] = a / b if a and b else None
            rows.append(row)
    return rows


def _plot(path, results, ops, impls) -> None:
    plt = common._pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=120)
    for op in ops:
        for impl in impls:
            rs = [r for r in results if r["op"] == op and r["impl"] == impl]
            for ax, key in zip(axes, ("fwd_ms", "fwd_bwd_ms", "xla_mb")):
                pts = [(r["T"], r[key]) for r in rs if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{op} {impl}",
                            linestyle="-" if impl != "reference" else "--")
    for ax, ylabel in zip(axes, ("forward ms", "forward+backward ms", "fwd+bwd XLA memory MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"memory ops, B={B} H={H} K=V={K}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
