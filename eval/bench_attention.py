"""Block-sparse attention against dense causal attention: forward and forward + backward time
at growing lengths, side by side in one run, as ratios; and whether the sparse op grows
linearly in T at a fixed number of selected blocks.

    python -m eval.bench_attention [--seq_lens 4096 8192 16384] [--long] [--batch 1]
                                   [--heads 4] [--kv_heads 1] [--head_dim 64]
                                   [--block_size 64] [--selected 16] [--window 512]
                                   [--dtype float32] [--reps 3] [--max_seconds 120]
                                   [--out out/bench_attention]

The sparse call is NSA's shape of work: per query block (--block_size, the paper's selection
block 64) --selected distinct key blocks drawn at random among the causal ones (the paper's
16), plus a sliding --window (512), GQA with the indices shared by the group. Dense is the
same q, k, v under full causal attention (`pallas_kernels.attention`). Impls per platform:

    cpu   sparse: xla; dense: xla (Pallas would run in interpret mode)
    gpu   sparse: pallas, xla; dense: cudnn (cuDNN flash attention, bf16 / fp16 only), xla
    tpu   sparse: pallas, xla; dense: splash, xla

Per (impl, T): the best of --reps calls of the jitted forward and of the jitted gradient of
<o, random cotangent> w.r.t. q, k, v, after a warm-up call (compile time excluded). A cell
whose time, extrapolated from the impl's previous length (linearly for sparse, quadratically
for dense), would exceed --max_seconds per call is skipped and says so. --long adds 32k and
64k tokens. Ratios: dense time / sparse time at the same T (> 1: sparse is faster), each
sparse impl against the fastest dense impl of that T. Linear growth: the sparse op's time per
token at each T over its time per token at the shortest T (1.0 = exactly linear).

Writes bench_attention.json and bench_attention.png (time against T, log-log); the table
names the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from eval import common

IMPLS = {"cpu": (["xla"], ["xla"]), "gpu": (["pallas", "xla"], ["cudnn", "xla"]),
         "tpu": (["pallas", "xla"], ["splash", "xla"])}
LONG = (32768, 65536)


def machine() -> str:
    """The CPU model and core count, and the JAX device."""
    import jax
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return (f"{model}, {os.cpu_count()} cores; jax {jax.__version__} on {dev.platform} "
            f"({dev.device_kind})")


def random_block_indices(rng, B, Hkv, NQ, S):
    """[B, Hkv, NQ, S]: per query block i, min(S, i + 1) distinct blocks of 0..i, −1 padded."""
    idx = np.full((B, Hkv, NQ, S), -1, np.int32)
    for i in range(NQ):
        n = min(S, i + 1)
        scores = rng.random((B, Hkv, i + 1))
        idx[..., i, :n] = np.argsort(scores, axis=-1)[..., :n]
    return idx


def timed(fn, args, reps: int) -> float:
    """Best seconds of `reps` calls after a warm-up call (the least disturbed by other load
    on a shared machine)."""
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(min(times))


def programs(kind, impl, idx, args, ct):
    """(jitted forward, jitted gradient w.r.t. q, k, v) of one variant."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention import attention
    from pallas_kernels.sparse_attention import block_sparse_attention

    if kind == "sparse":
        op = lambda q, k, v: block_sparse_attention(q, k, v, idx, block_size=args.block_size,
                                                    window=args.window, impl=impl)
    else:
        op = lambda q, k, v: attention(q, k, v, causal=True, impl=impl)
    loss = lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32) * ct)
    return jax.jit(op), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_attention",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default=None, choices=["cpu", "gpu", "tpu"],
                    help="JAX platform (default: JAX's default device)")
    ap.add_argument("--seq_lens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--long", action="store_true", help="also 32k and 64k tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=1)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--selected", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, else bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max_seconds", type=float, default=120.0)
    ap.add_argument("--impls", nargs="+", default=None,
                    help="override, as kind:impl (e.g. sparse:xla dense:cudnn)")
    ap.add_argument("--out", default="out/bench_attention")
    args = ap.parse_args(argv)
    if args.backend:
        os.environ["JAX_PLATFORMS"] = common.jax_platforms(args.backend)
    import jax
    import jax.numpy as jnp

    backend = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    if args.impls:
        variants = [tuple(s.split(":", 1)) for s in args.impls]
    else:
        sparse, dense = IMPLS.get(backend, IMPLS["cpu"])
        variants = [("sparse", i) for i in sparse] + [("dense", i) for i in dense]
    seq_lens = sorted(set(args.seq_lens + (list(LONG) if args.long else [])))
    out = common.out_dir(args.out)
    where = machine()
    print(f"machine: {where}", flush=True)

    rng = np.random.default_rng(0)
    rows, last = [], {}
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    for T in seq_lens:
        NQ = -(-T // args.block_size)
        q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
        k, v = (jnp.asarray(rng.standard_normal((B, T, Hkv, D)), dtype) for _ in range(2))
        ct = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
        idx = jnp.asarray(random_block_indices(rng, B, Hkv, NQ, args.selected))
        for kind, impl in variants:
            row = dict(kind=kind, impl=impl, T=T)
            prev = last.get((kind, impl))
            if prev is not None:
                growth = (T / prev[0]) ** (1 if kind == "sparse" else 2)
                if prev[1] * growth > args.max_seconds:
                    row["note"] = (f"skipped: about {prev[1] * growth:.0f} s per fwd+bwd call "
                                   f"expected > --max_seconds {args.max_seconds:g}")
                    rows.append(row)
                    print(row, flush=True)
                    continue
            try:
                fwd, grad = programs(kind, impl, idx, args, ct)
                row["fwd_ms"] = 1e3 * timed(fwd, (q, k, v), args.reps)
                row["fwd_bwd_ms"] = 1e3 * timed(grad, (q, k, v), args.reps)
                last[(kind, impl)] = (T, row["fwd_bwd_ms"] / 1e3)
            except Exception as e:  # noqa: BLE001 - an impl that cannot serve the call is reported
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            print(row, flush=True)

    for row in rows:
        dense = [r for r in rows if r["kind"] == "dense" and r["T"] == row["T"] and "fwd_ms" in r]
        if row["kind"] == "sparse" and "fwd_ms" in row and dense:
            row["dense_fwd/sparse"] = min(r["fwd_ms"] for r in dense) / row["fwd_ms"]
            row["dense_fb/sparse"] = min(r["fwd_bwd_ms"] for r in dense) / row["fwd_bwd_ms"]
        base = next((r for r in rows if r["kind"] == row["kind"] and r["impl"] == row["impl"]
                     and "fwd_ms" in r), None)
        if row["kind"] == "sparse" and "fwd_ms" in row:
            row["fb_per_token_vs_first"] = (row["fwd_bwd_ms"] / row["T"]) / (
                base["fwd_bwd_ms"] / base["T"])

    title = (f"block-sparse (bs {args.block_size}, {args.selected} selected, window "
             f"{args.window}) vs dense causal attention: B={B}, H={H}, Hkv={Hkv}, D={D}, "
             f"{dtype.name}, best of {args.reps}; {where}")
    columns = ["kind", "impl", "T", "fwd_ms", "fwd_bwd_ms", "dense_fwd/sparse",
               "dense_fb/sparse", "fb_per_token_vs_first", "note"]
    table = common.print_table(rows, columns, floatfmt=".3g", title=title)
    common.write_json(out / "bench_attention.json",
                      dict(args=vars(args), machine=where, rows=rows, table=table))
    series = {}
    for kind, impl in variants:
        done = [r for r in rows if (r["kind"], r["impl"]) == (kind, impl) and "fwd_ms" in r]
        if done:
            series[f"{kind} {impl} fwd"] = ([r["T"] for r in done], [r["fwd_ms"] for r in done])
            series[f"{kind} {impl} fwd+bwd"] = ([r["T"] for r in done],
                                                [r["fwd_bwd_ms"] for r in done])
    common.plot_lines(out / "bench_attention.png", series, xlabel="tokens T", ylabel="ms",
                      title=f"block-sparse vs dense attention ({backend}, {dtype.name})",
                      logx=True, logy=True)
    print(f"wrote {out}/bench_attention.json and bench_attention.png")
    return rows


if __name__ == "__main__":
    main()
