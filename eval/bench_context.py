"""Context parallelism: per-device memory and collective traffic of one training step against
sequence length, for each size of the mesh's `context` axis.

    python -m eval.bench_context [--devices 1 2 4 8] [--lengths 2048 8192 32768]
                                 [--models gdn attn] [--budget_mb 512] [--time] [--quick]
                                 --out out/bench_context

Each cell (model, context size D, length T) compiles one training step -- loss (cross entropy)
and gradients with respect to every parameter, `jax.jit` over a mesh {context: D} with the
[batch, T] tokens split over T (train.sharding.batch_sharding, the trainer's rules; parameters
replicated) -- and reads from the compiled program, per device:

  * memory: `compiled.memory_analysis()`, temp + argument + output bytes (XLA's account of the
    partitioned program, i.e. of one device);
  * collective bytes: the result sizes of the all-gather / all-reduce / reduce-scatter /
    collective-permute / all-to-all ops in the compiled HLO text (per-device shapes after SPMD
    partitioning), split into parameter-gradient sums (all-reduces whose result has the shape
    of a parameter) and the rest (activations: states, K/V, halos, scalars). Each op is counted
    once where it appears in the program text: an op inside a loop body counts once, not once
    per iteration;
  * with --time, the wall time of one step on the (simulated) devices: NOT a speed measure --
    simulated CPU devices share the host's cores.

Models: a tiny LM of one mixer (`gdn`, `attn` or any registered mixer that has a
context-parallel path), d_model 256, 2 layers, 4 heads, vocab 256, batch 1, float32 (each flag
overrides).

Devices: D simulated CPU devices need XLA_FLAGS=--xla_force_host_platform_device_count=N set
before JAX starts, so the script re-runs itself in a subprocess with that flag (and
JAX_PLATFORMS=cpu) unless the current environment already gives enough devices (e.g. a
multi-GPU host: run with --backend gpu, no re-exec).

Written to --out: results.json (every cell), memory.png (per-device memory vs T, one line per
model and D), collectives.png (collective bytes per device vs T). The summary line gives, per
model, the longest T whose per-device memory stays under --budget_mb with D = 1 and with the
largest D.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Optional, Sequence

from eval import common

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
# `%name = SHAPE op(` where SHAPE is one array type or a (tuple, of, types); op a collective,
# possibly the `-start` half of an async pair (the `-done` half is skipped: same buffer).
_OP = re.compile(r"=\s*(\(.*?\)|[a-z]+[0-9]*[a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                 r"(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _arrays(shape_text: str) -> list:
    """[(dtype, dims)] of the array types in an HLO shape (one array or a tuple)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _nbytes(dtype: str, dims: tuple) -> int:
    n = DTYPE_BYTES[dtype]
    for d in dims:
        n *= d
    return n


def _squeeze(dims: tuple) -> tuple:
    return tuple(d for d in dims if d != 1)


def parse_collectives(hlo_text: str, param_shapes=()) -> list:
    """The collective ops of an HLO module's text: one dict per op, {op, bytes, grad_bytes,
    shapes}. `bytes` is the size of its result (a tuple's elements summed: XLA combines many
    all-reduces into one; for an async `-start` op other than all-reduce, whose tuple also
    holds the operand, the largest element). `grad_bytes`: the part of an all-reduce /
    reduce-scatter result whose elements have the shape of a parameter (size-1 dims ignored):
    the sums of parameter gradients over the devices."""
    pshapes = {_squeeze(tuple(s)) for s in param_shapes}
    ops = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        shape_text, op, start = m.groups()
        arrays = _arrays(shape_text)
        if not arrays:
            continue
        sizes = [_nbytes(d, s) for d, s in arrays]
        nbytes = max(sizes) if start and op != "all-reduce" else sum(sizes)
        grad = 0
        if op in ("all-reduce", "reduce-scatter"):
            grad = sum(n for n, (_, s) in zip(sizes, arrays) if s and _squeeze(s) in pshapes)
        ops.append(dict(op=op, bytes=nbytes, grad_bytes=grad,
                        shapes=[list(s) for _, s in arrays]))
    return ops


def summarize_collectives(ops: list) -> dict:
    by_op = {}
    for o in ops:
        by_op[o["op"]] = by_op.get(o["op"], 0) + o["bytes"]
    grad = sum(o["grad_bytes"] for o in ops)
    total = sum(o["bytes"] for o in ops)
    return dict(collective_bytes=total, grad_collective_bytes=grad,
                act_collective_bytes=total - grad, collective_ops=len(ops),
                collective_bytes_by_op=by_op)


# ----------------------------------------------------------------------------- one cell
def model_config(name: str, args):
    from mem_lm import ModelConfig
    return ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model,
                       num_layers=args.num_layers, num_heads=args.num_heads, pattern=(name,),
                       dtype=args.dtype, chunk_size=args.chunk_size)


def bench_cell(name: str, D: int, T: int, args) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs.base import get_config
    from mem_lm import LanguageModel
    from train.config import logical_axis_rules
    from train.sharding import batch_sharding, make_mesh

    config = get_config()
    config.mesh.context = D
    rules = logical_axis_rules(config)
    mesh = make_mesh((1, 1, 1, D))
    cfg = model_config(name, args)
    model = LanguageModel(cfg)
    B = args.batch
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    param_shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(shapes)]

    def loss_fn(params, tokens, labels):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels).mean()

    step = jax.value_and_grad(loss_fn)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        rep = NamedSharding(mesh, P())
        sh = batch_sharding(config, mesh)
        params = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)
        tok = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh)
        jitted = jax.jit(step)
        t0 = time.perf_counter()
        compiled = jitted.lower(params, tok, tok).compile()
        compile_s = time.perf_counter() - t0
        m = compiled.memory_analysis()
        ops = parse_collectives(compiled.as_text(), param_shapes)
        r = dict(model=name, context=D, length=T,
                 temp_mb=m.temp_size_in_bytes / 2**20,
                 argument_mb=m.argument_size_in_bytes / 2**20,
                 output_mb=m.output_size_in_bytes / 2**20,
                 memory_mb=(m.temp_size_in_bytes + m.argument_size_in_bytes
                            + m.output_size_in_bytes) / 2**20,
                 compile_seconds=compile_s, **summarize_collectives(ops))
        r["collective_kb"] = r["collective_bytes"] / 2**10
        r["grad_collective_kb"] = r["grad_collective_bytes"] / 2**10
        r["act_collective_kb"] = r["act_collective_bytes"] / 2**10
        if args.time:
            p = jax.device_put(nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros(
                (1, 8), jnp.int32))["params"]), rep)
            t = jax.device_put(np.random.default_rng(0).integers(
                0, cfg.vocab_size, (B, T)).astype(np.int32), sh)
            jax.block_until_ready(compiled(p, t, t))
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(p, t, t))
            r["step_seconds_simulated"] = time.perf_counter() - t0
    return r


def longest_under(rows, budget_mb: float) -> Optional[int]:
    ok = [r["length"] for r in rows if r["memory_mb"] is not None and r["memory_mb"] <= budget_mb]
    return max(ok) if ok else None


# ----------------------------------------------------------------------------- driver
def _device_flag_count() -> int:
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else 1


def reexec(argv: Sequence[str], devices: int) -> int:
    """Re-run this script in a subprocess that sees `devices` simulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", _BENCH_CONTEXT_CHILD="1")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return subprocess.call([sys.executable, "-m", "eval.bench_context", *argv], env=env)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.bench_context", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default="cpu",
                    help="cpu: simulated devices (the script re-runs itself with the XLA flag)")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="context-axis sizes D")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--models", nargs="+", default=["gdn", "attn"],
                    help="mixers (a model of that mixer alone)")
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--num_layers", type=int, default=2)
    ap.add_argument("--num_heads", type=int, default=4)
    ap.add_argument("--vocab_size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk_size", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--budget_mb", type=float, default=256.0,
                    help="per-device memory budget of the summary line")
    ap.add_argument("--time", action="store_true",
                    help="also time one step (simulated devices: not meaningful for speed)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: D in {1, 2}, T in {128, 256}, gdn, d_model 32, 1 layer")
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.quick:
        args.devices, args.lengths, args.models = [1, 2], [128, 256], ["gdn"]
        args.d_model, args.num_layers, args.chunk_size = 32, 1, 16
    for T in args.lengths:
        for D in args.devices:
            if T % D or (T // D) % args.chunk_size:
                common.fail(f"--lengths {T} does not split into {D} slices of whole chunks "
                            f"(--chunk_size {args.chunk_size})")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    need = max(args.devices)
    if (args.backend == "cpu" and _device_flag_count() < need
            and not os.environ.get("_BENCH_CONTEXT_CHILD")):
        rc = reexec(argv, need)
        if rc:
            raise SystemExit(rc)
        import json
        return json.loads((common.out_dir(args.out) / "results.json").read_text())
    os.environ.setdefault("JAX_PLATFORMS", common.jax_platforms(args.backend))
    import jax
    if jax.device_count() < need:
        common.fail(f"--devices {need} needs {need} devices; JAX sees {jax.device_count()}")
    out = common.out_dir(args.out)
    cells = [(m, D, T) for m in args.models for D in args.devices for T in args.lengths]
    rows = []
    for name, D, T in common.progress_bar(cells, disable=args.no_progress, desc="cells"):
        try:
            rows.append(bench_cell(name, D, T, args))
        except Exception as e:  # noqa: BLE001 - one failed cell should not end the sweep
            rows.append(dict(model=name, context=D, length=T, memory_mb=None,
                             error=f"{type(e).__name__}: {str(e)[:300]}"))
    cols = ["model", "context", "length", "memory_mb", "temp_mb", "argument_mb", "output_mb",
            "collective_kb", "act_collective_kb", "grad_collective_kb", "collective_ops"]
    if args.time:
        cols.append("step_seconds_simulated")
    if any("error" in r for r in rows):
        cols.append("error")
    common.print_table(rows, cols, floatfmt=".4g",
                       title="per device: memory (MiB) and collective result sizes (KiB)")
    summary = {}
    for name in args.models:
        mrows = [r for r in rows if r["model"] == name]
        summary[name] = {f"D={D}": longest_under([r for r in mrows if r["context"] == D],
                                                 args.budget_mb) for D in args.devices}
        lo, hi = min(args.devices), max(args.devices)
        print(f"{name}: longest T under {args.budget_mb:g} MiB per device: "
              f"{summary[name][f'D={lo}']} with D={lo}, {summary[name][f'D={hi}']} with D={hi} "
              f"(of the lengths measured)", flush=True)
    result = dict(args={k: v for k, v in vars(args).items()}, rows=rows,
                  budget_summary=summary, backend=jax.default_backend(),
                  note="per-device numbers from the compiled SPMD program; collective bytes "
                       "are result sizes of each op as it appears once in the HLO text")
    common.write_json(out / "results.json", result)
    for key, fname, ylabel in (("memory_mb", "memory.png", "per-device memory (MiB)"),
                               ("collective_kb", "collectives.png",
                                "collective result bytes per device (KiB)")):
        series = {}
        for name in args.models:
            for D in args.devices:
                rr = sorted((r for r in rows if r["model"] == name and r["context"] == D),
                            key=lambda r: r["length"])
                series[f"{name} D={D}"] = ([r["length"] for r in rr], [r.get(key) for r in rr])
        try:
            common.plot_lines(out / fname, series, xlabel="sequence length T", ylabel=ylabel,
                              title="context parallelism, one training step", logx=True,
                              logy=key == "memory_mb")
        except Exception as e:  # noqa: BLE001 - no matplotlib: the JSON still stands
            print(f"plot {fname} skipped: {e}", file=sys.stderr)
    return result


if __name__ == "__main__":
    try:
        main()
    except common.EvalError:
        sys.exit(2)
