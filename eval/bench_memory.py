"""Training step time and memory of a model whose middle MLP is a memory layer, as the value
table grows (64k -> 1M slots), against a dense MLP of the same parameter count.

    python -m eval.bench_memory [--backend cpu|gpu|tpu] [--n_keys 256 512 1024]
                                [--quick] --out out/bench_memory

The model: `--num_layers` attention blocks of width `--d_model`, SwiGLU MLPs, and the middle
block's MLP replaced by

    memory_plus   a Memory+ layer of n_keys² slots (4 heads, top-32, key dim d_model / 2)
    dense         a SwiGLU MLP whose width d_ff gives it the memory layer's parameter count
                  (3 · d_model · d_ff ≈ the memory layer's), the same parameters spent densely

Each cell times one full training step (forward, backward, and the trainer's optimizer:
`train.optim.make_optimizer`, values in their own fixed-rate AdamW group) with
`eval.bench_model.bench_cell`, the median of `--reps` calls after a compiling warm-up, and
separately the forward + backward alone (`grad s`): the optimizer's update of the whole
table (and its moments) costs O(N · D) a step whatever the tokens read, the lookup itself
O(tokens · heads · k · D). Memory is XLA's account of the compiled step. Cells whose estimated
step time (from the previous size, linear in the parameters) exceeds `--max_step_seconds`
are compiled for their memory but not timed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from eval import common
from eval.bench_model import bench_cell

PRESETS = {
    "cpu": dict(d_model=256, num_layers=4, num_heads=4, vocab_size=256, batch=4, seq_len=256,
                dtype="float32", reps=3),
    "gpu": dict(d_model=1024, num_layers=4, num_heads=8, vocab_size=32768, batch=8,
                seq_len=2048, dtype="bfloat16", reps=5),
}
PRESETS["tpu"] = PRESETS["gpu"]


def model_config(args, channel: str, **mlp):
    from mem_lm import ModelConfig

    pattern = ["swiglu"] * args.num_layers
    pattern[args.num_layers // 2] = channel
    return ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model,
                       num_layers=args.num_layers, num_heads=args.num_heads,
                       pattern=("attn",), channel_pattern=tuple(pattern), dtype=args.dtype,
                       mixers={channel: mlp} if mlp else {})


def layer_params(cfg) -> int:
    """Parameters of the middle block's MLP (the memory layer's, shared table included)."""
    import dataclasses
    from mem_lm import param_count

    pattern = list(cfg.channel_pattern)
    pattern[len(pattern) // 2] = "none"
    return param_count(cfg) - param_count(dataclasses.replace(
        cfg, channel_pattern=tuple(pattern), mixers={}))


def grad_seconds(cfg, batch: int, seq_len: int, reps: int) -> float:
    """Median seconds of one forward + backward (no optimizer) of the training loss."""
    import jax
    import optax
    from mem_lm import LanguageModel

    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens[:, :8])["params"]

    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    fn = jax.jit(jax.grad(loss))
    jax.block_until_ready(fn(params))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=tuple(PRESETS), default="cpu")
    ap.add_argument("--n_keys", type=int, nargs="+", default=[256, 512, 1024],
                    help="sub-keys per half (n_keys² slots); default 256 512 1024 = 64k..1M")
    ap.add_argument("--d_model", type=int)
    ap.add_argument("--num_layers", type=int)
    ap.add_argument("--num_heads", type=int)
    ap.add_argument("--vocab_size", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq_len", type=int)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int)
    ap.add_argument("--no_dense", action="store_true", help="skip the dense contrast")
    ap.add_argument("--max_step_seconds", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--out", default="out/bench_memory")
    args = ap.parse_args(argv)
    preset = dict(PRESETS[args.backend])
    if args.quick:
        preset.update(d_model=16, num_layers=2, num_heads=2, batch=1, seq_len=16, reps=1)
        if args.n_keys == ap.get_default("n_keys"):
            args.n_keys = [4, 8]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.n_keys) < 1 or args.num_layers < 1 or args.batch < 1 or args.reps < 1:
        common.fail("--n_keys, --num_layers, --batch and --reps must be >= 1")

    os.environ["JAX_PLATFORMS"] = common.jax_platforms(args.backend)
    import jax
    try:
        device = jax.devices()[0]
    except RuntimeError as e:
        common.fail(f"--backend {args.backend}: no such device ({e})")
    machine = f"{device.platform} {device.device_kind} x{jax.device_count()}, " \
              f"host {cpu_name()} ({os.cpu_count()} cores)"
    print(f"device: {machine}; batch {args.batch} x {args.seq_len} tokens; {args.dtype}; "
          f"d_model {args.d_model}, {args.num_layers} layers (layer {args.num_layers // 2}: "
          f"memory / dense)", flush=True)
    out = common.out_dir(args.out)

    rows, last = [], {}
    for n_keys in sorted(args.n_keys):
        topk = min(32, n_keys)
        try:
            mem = model_config(args, "memory_plus", n_keys=n_keys, topk=topk)
        except ValueError as e:
            common.fail(str(e))
        p_layer = layer_params(mem)
        row = {"slots": n_keys ** 2, "layer params (M)": p_layer / 1e6}
        variants = {"memory": mem}
        if not args.no_dense:
            d_ff = max(8, round(p_layer / (3 * args.d_model) / 8) * 8)
            variants["dense"] = model_config(args, "swiglu", d_ff=d_ff)
            row["dense d_ff"] = d_ff
        for name, cfg in variants.items():
            est = None
            if name in last:
                est = last[name][1] * layer_params(cfg) / last[name][0]
            timed = est is None or est <= args.max_step_seconds
            r = bench_cell(cfg, args.seq_len, args.batch, args.reps, timed=timed)
            row[f"{name} step s"] = r.get("step_seconds")
            row[f"{name} MB"] = r["memory_mb"]
            if timed:
                last[name] = (layer_params(cfg), r["step_seconds"])
            if name == "memory":
                row["memory grad s"] = grad_seconds(cfg, args.batch, args.seq_len, args.reps)
            print(f"{n_keys ** 2:>9,} slots {name:>6}: step "
                  f"{r.get('step_seconds') or float('nan'):.3f}s, {r['memory_mb'] or 0:,.0f} MB"
                  + ("" if timed else f" (not timed: estimated {est:.0f}s)"), flush=True)
        rows.append(row)
    first = rows[0]
    for row in rows:
        row["memory step / first"] = row["memory step s"] / first["memory step s"]
        row["memory grad / first"] = row["memory grad s"] / first["memory grad s"]
        if row.get("dense step s"):
            row["dense / memory step"] = row["dense step s"] / row["memory step s"]
    common.print_table(rows, floatfmt=",.4g",
                       title=f"train step vs value-table size ({machine})")
    result = {"task": "bench_memory", "machine": machine, "args": vars(args), "table": rows}
    common.write_json(out / "bench_memory.json", result)
    _plot(out / "bench_memory.png", rows, machine)
    print(f"wrote {out / 'bench_memory.json'} and {out / 'bench_memory.png'}")
    return result


def _plot(path, rows, machine):
    plt = common._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    slots = [r["slots"] for r in rows]
    for key, label in (("memory step s", "memory: train step"),
                       ("memory grad s", "memory: forward + backward"),
                       ("dense step s", "dense MLP, same params: train step")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            axes[0].plot(slots, [np.nan if y is None else y for y in ys], marker="o",
                         label=label)
    for key, label in (("memory MB", "memory layer"), ("dense MB", "dense MLP")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            axes[1].plot(slots, [np.nan if y is None else y for y in ys], marker="o",
                         label=label)
    for ax, ylabel in zip(axes, ("seconds per step", "step memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("value slots (n_keys²)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"memory layer vs value-table size ({machine})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
