"""Training throughput, MFU and memory of whole models against sequence length, side by side.

    python -m eval.bench_model [--backend cpu|gpu|tpu] [--lengths 1024 2048 4096 8192 16384]
                               [--quick] [--profile] [--time_budget SECONDS] --out out/bench_model

Models (same number of layers and heads; with --width_match, the CPU default, `gdn` and
`hybrid` get the d_model that brings their parameter count closest to the transformer's):

    transformer   softmax attention + SwiGLU MLP in every layer
    gdn           Gated DeltaNet + MLP in every layer
    hybrid        Gated DeltaNet and sliding-window attention alternating (+ MLP)
    MIXER         any registered token mixer, alone (+ MLP)
    MIXER:F=V,..  the same with its settings changed (Python literals, as in --config
                  overrides), e.g. `mom:top_k=1,shared_memory=False`

Ratios are to `--baseline` (the transformer when it runs, else the first model), e.g. `--baseline gdn` for mom's cost
per token against gdn's.

Defaults per backend (each flag overrides):

    cpu       d_model 256 (transformer; the others width-matched), 4 layers, 4 heads, vocab
              256, batch 1, lengths 1024 ... 16384, float32, 3 reps
    gpu, tpu  gdn and hybrid (the transformer with --models), d_model 1280, 16 layers, 10
              heads (head_dim 128), vocab 32768 (tied embeddings), no width matching: the GDN
              model has 383.6M params, the hybrid 370.2M (the transformer 356.7M); batch 2,
              lengths 4096 and 16384, bfloat16, scan_layers (one layer's program compiled
              once), 5 reps

Each cell times one full training step (forward, backward, AdamW update from the trainer's own
`train.optim.make_optimizer`) on a batch of `--batch` sequences, after a warm-up call that
compiles; the median of `--reps` calls. MFU is the trainer's own estimate
(`train.metrics`: 6·params + the attention score/value products per token, over the device's
peak bf16 FLOP/s; on CPU a rough cores × clock figure). Memory is XLA's own account of the
compiled step (arguments + outputs + temporaries, less donated/aliased buffers): the peak the
step needs on any backend. Cells whose estimated step time exceeds `--max_step_seconds`
(extrapolated from the previous length) are not timed and show "-" for tokens/s, but are
still compiled, so their memory is reported; with --time_budget no cell starts that would,
at the median cell's duration so far, end past it.

--profile: after its timed calls, each cell runs --profile_steps more steps under
`jax.profiler.trace` (into a temporary folder) and prints where their time went
(`eval.trace_summary`: Pallas kernels, matmuls, library attention, collectives, other XLA
work, idle; ms per step and share of the traced window); the table is kept in the cell's
"profile" entry of bench_model.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from eval import common
from eval.bench_fla import error_text

MODELS = {
    "transformer": dict(pattern=("attn",)),
    "gdn": dict(pattern=("gdn",)),
    "hybrid": dict(pattern=("gdn", "swa")),
}
PRESETS = {
    "cpu": dict(models=["transformer", "gdn", "hybrid"], d_model=256, num_layers=4,
                num_heads=4, vocab_size=256, batch=1,
                lengths=[1024, 2048, 4096, 8192, 16384], dtype="float32", reps=3,
                width_match=True, window=512, scan_layers=False),
    # Issue 28's model-level run: >= 350M parameters each, T = 4k and 16k.
    "gpu": dict(models=["gdn", "hybrid"], d_model=1280, num_layers=16, num_heads=10,
                vocab_size=32768, batch=2, lengths=[4096, 16384], dtype="bfloat16", reps=5,
                width_match=False, window=512, scan_layers=True),
}
PRESETS["tpu"] = PRESETS["gpu"]


def parse_model(name: str) -> tuple:
    """`base` or `base:field=value,...` -> (base, {field: value}); values are Python literals
    (a bare word stays a string). ValueError when a part is not field=value."""
    import ast

    base, _, rest = name.partition(":")
    settings = {}
    for part in filter(None, rest.split(",")):
        field, eq, raw = part.partition("=")
        if not eq or not field:
            raise ValueError(f"--models {name!r}: {part!r} is not FIELD=VALUE")
        try:
            settings[field.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            settings[field.strip()] = raw.strip()
    return base, settings


def model_configs(names: Sequence[str], d_model: int, num_layers: int, num_heads: int,
                  vocab_size: int, window: int, width_match: bool = True, **extra) -> dict:
    """ModelConfigs for `names` (presets, mixers, or `mixer:field=value,...` variants); with
    `width_match`, all but the transformer width-matched to its parameter count, else all at
    `d_model`."""
    from mem_lm import ModelConfig, param_count

    def make(name, d):
        base, settings = parse_model(name)
        mixers = {"swa": {"window": window}}
        if settings:
            mixers[base] = {**mixers.get(base, {}), **settings}
        return ModelConfig(vocab_size=vocab_size, d_model=d, num_layers=num_layers,
                           num_heads=num_heads, mixers=mixers,
                           **MODELS.get(base, dict(pattern=(base,))), **extra)

    target = param_count(make("transformer", d_model))
    step = 2 * num_heads                      # even head_dim (RoPE)
    out = {}
    for name in names:
        if name == "transformer" or not width_match:
            out[name] = make(name, d_model)
            continue
        cands = range(max(step, (d_model // 2) // step * step), 2 * d_model + step, step)
        # param_count grows with the width: bisect for the first width at or above the
        # target, then take the closer of it and the one below (each count is an eval_shape).
        lo, hi = 0, len(cands) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if param_count(make(name, cands[mid])) < target else (lo, mid)
        out[name] = min((make(name, cands[i]) for i in {max(lo - 1, 0), lo}),
                        key=lambda c: abs(param_count(c) - target))
    return out


def make_train_step(model, optimizer):
    import jax
    import optax

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype("float32"), tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def memory_bytes(compiled) -> Optional[int]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def bench_cell(cfg, seq_len: int, batch: int, reps: int, seed: int = 0,
               timed: bool = True, profile_steps: int = 0) -> dict:
    """Compile one training step (its memory) and, when `timed`, time `reps` calls of it, then
    trace `profile_steps` more (the "profile" entry: `eval.trace_summary.summarize`)."""
    import jax
    import jax.numpy as jnp
    from configs.base import get_config
    from mem_lm import LanguageModel, param_count
    from train.metrics import peak_flops_per_device, train_flops_per_token
    from train.optim import make_optimizer

    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (batch, seq_len + 1), 0, cfg.vocab_size,
                                dtype=jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), tokens[:, :8])["params"]
    ocfg = get_config().optim
    ocfg.decay_steps = 1000
    optimizer = make_optimizer(ocfg)
    opt_state = optimizer.init(params)
    step = make_train_step(model, optimizer)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, tokens).compile()
    compile_s = time.perf_counter() - t0
    mem = memory_bytes(compiled)
    r = {"memory_mb": None if mem is None else mem / 2**20, "compile_seconds": compile_s}
    if not timed:
        return r
    params, opt_state, loss = compiled(params, opt_state, tokens)   # warm-up
    jax.block_until_ready(loss)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, tokens)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    tps = batch * seq_len / t
    peak = peak_flops_per_device(get_config()) * jax.device_count()
    mfu = tps * train_flops_per_token(param_count(cfg), cfg, seq_len) / peak
    r.update(step_seconds=t, tokens_per_second=tps, mfu=mfu if np.isfinite(mfu) else None,
             loss=float(loss))
    if profile_steps:
        from eval.trace_summary import summarize
        with tempfile.TemporaryDirectory(prefix="bench_model_trace_") as log_dir:
            with jax.profiler.trace(log_dir):
                for _ in range(profile_steps):
                    params, opt_state, loss = compiled(params, opt_state, tokens)
                jax.block_until_ready(loss)
            r["profile"] = summarize(log_dir, compiled.as_text(), profile_steps)
        del r["profile"]["trace"]       # a temporary file, gone now
    return r


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=tuple(PRESETS), default="cpu")
    ap.add_argument("--models", nargs="+",
                    help="presets (" + ", ".join(MODELS) + "), any registered token mixer (a "
                         "model of that mixer alone), or MIXER:FIELD=VALUE,... (that mixer "
                         "with changed settings); default: per backend")
    ap.add_argument("--baseline",
                    help="the model the throughput ratios are taken against (default: the "
                         "transformer when it is benchmarked, else the first of --models)")
    ap.add_argument("--lengths", type=int, nargs="+",
                    help="sequence lengths (default: per backend; --quick: 128 256)")
    ap.add_argument("--batch", type=int, help="sequences per step")
    ap.add_argument("--d_model", type=int, help="the transformer's width")
    ap.add_argument("--num_layers", type=int)
    ap.add_argument("--num_heads", type=int)
    ap.add_argument("--vocab_size", type=int)
    ap.add_argument("--width_match", action=argparse.BooleanOptionalAction, default=None,
                    help="width-match gdn and hybrid to the transformer's parameter count")
    ap.add_argument("--window", type=int, help="the hybrid's attention window (512)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--impl", default="auto", help="ModelConfig.impl (the recurrent ops)")
    ap.add_argument("--attn_impl", default="auto", help="ModelConfig.attn_impl")
    ap.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=None,
                    help="ModelConfig.scan_layers (default: per backend)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--profile", action="store_true",
                    help="trace --profile_steps steps per cell and print where the time went")
    ap.add_argument("--profile_steps", type=int, default=3)
    ap.add_argument("--max_step_seconds", type=float, default=60.0)
    ap.add_argument("--time_budget", type=float, default=None,
                    help="seconds; no cell starts past it")
    ap.add_argument("--quick", action="store_true",
                    help="tiny models and lengths 128, 256 (smoke test)")
    ap.add_argument("--out", default="out/bench_model")
    args = ap.parse_args(argv)
    preset = dict(PRESETS[args.backend])
    if args.quick:
        preset.update(lengths=[128, 256], d_model=32, num_layers=2, num_heads=2, window=64,
                      vocab_size=256, reps=1)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.lengths) < 2 or args.batch < 1 or args.reps < 1:
        common.fail("--lengths must be >= 2, --batch and --reps >= 1")
    known = list(MODELS) + [m for m in common.mixer_names() if m not in MODELS]
    unknown = [n for n in args.models if n.partition(":")[0] not in known]
    if unknown:
        common.fail(f"--models: unknown {unknown}; known: {known}")
    if args.baseline is None:
        args.baseline = "transformer" if "transformer" in args.models else args.models[0]
    if args.baseline not in args.models:
        common.fail(f"--baseline {args.baseline!r} is not one of --models {args.models}")

    os.environ["JAX_PLATFORMS"] = common.jax_platforms(args.backend)
    import jax
    from mem_lm import param_count

    try:
        cfgs = model_configs(args.models, args.d_model, args.num_layers, args.num_heads,
                             args.vocab_size, args.window, width_match=args.width_match,
                             dtype=args.dtype, impl=args.impl, attn_impl=args.attn_impl,
                             scan_layers=args.scan_layers)
    except ValueError as e:
        common.fail(str(e))
    try:
        device = jax.devices()[0]
    except RuntimeError as e:
        common.fail(f"--backend {args.backend}: no such device ({e})")
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; "
          f"batch {args.batch}; {args.dtype}; " + ", ".join(
              f"{n}: d_model {c.d_model}, {param_count(c) / 1e6:.2f}M params"
              for n, c in cfgs.items()), flush=True)

    out = common.out_dir(args.out)
    results = {n: [] for n in cfgs}
    lengths = sorted(args.lengths)
    cells = [(n, L) for L in lengths for n in cfgs]
    last = {}
    start = time.perf_counter()

    def write(**extra) -> dict:   # after every cell: a run stopped from outside keeps its cells
        result = {
            "task": "bench_model", "device": f"{device.platform} {device.device_kind}",
            "device_count": jax.device_count(), "batch": args.batch, "dtype": args.dtype,
            "models": {n: {"config": {k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in c.to_dict().items()},
                           "params": param_count(c), "results": results[n]}
                       for n, c in cfgs.items()}, **extra}
        common.write_json(out / "bench_model.json", result)
        return result

    durations = []
    for name, L in common.progress_bar(cells, desc="bench_model"):
        elapsed = time.perf_counter() - start
        est = float(np.median(durations)) if durations else 0.0
        if args.time_budget is not None and elapsed + est > args.time_budget:
            why = (f"not started: {elapsed:.0f} s spent, a cell takes ~{est:.0f} s, "
                   f"--time_budget {args.time_budget:g}")
            print(f"{name:>12} L={L:>6}: {why}", flush=True)
            results[name].append({"seq_len": L, "skipped": why})
            continue
        prev, skipped = last.get(name), None
        if prev is not None:
            # worst case quadratic growth from the previous length
            est = prev[1] * (L / prev[0]) ** 2
            if est > args.max_step_seconds:
                skipped = f"estimated {est:.0f}s per step"
        t0 = time.perf_counter()
        try:
            r = bench_cell(cfgs[name], L, args.batch, args.reps, timed=skipped is None,
                           profile_steps=args.profile_steps if args.profile else 0)
            durations.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, keep going
            msg = error_text(e, 200)
            print(f"{name} at {L}: {msg}", file=sys.stderr)
            results[name].append({"seq_len": L, "error": msg})
            write()
            continue
        if skipped:
            print(f"{name:>12} L={L:>6}: not timed ({skipped}), {(r['memory_mb'] or 0):>9,.1f} MB",
                  flush=True)
            results[name].append({"seq_len": L, "skipped": skipped, **r})
            write()
            continue
        last[name] = (L, r["step_seconds"])
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        print(f"{name:>12} L={L:>6}: {r['tokens_per_second']:>10,.0f} tok/s{mfu}, "
              f"{(r['memory_mb'] or 0):>9,.1f} MB, step {r['step_seconds']:.3f}s "
              f"(compile {r['compile_seconds']:.0f}s)", flush=True)
        if "profile" in r:
            print_profile(f"{name} L={L}", r["profile"])
        results[name].append({"seq_len": L, **r})
        write()

    def cell(name, L, key):
        for r in results.get(name, []):
            if r["seq_len"] == L:
                return r.get(key)
        return None

    rows = []
    for L in lengths:
        row = {"seq_len": L}
        for n in cfgs:
            row[f"{n} tok/s"] = cell(n, L, "tokens_per_second")
        for n in cfgs:
            mfu = cell(n, L, "mfu")
            row[f"{n} MFU %"] = None if mfu is None else 100 * mfu
        for n in cfgs:
            row[f"{n} MB"] = cell(n, L, "memory_mb")
        base = cell(args.baseline, L, "tokens_per_second")
        for n in cfgs:
            if n != args.baseline:
                v = cell(n, L, "tokens_per_second")
                row[f"{n}/{args.baseline}"] = v / base if v and base else None
        rows.append(row)
    common.print_table(rows, floatfmt=",.4g",
                       title="training tokens/s, MFU and step memory (MB) by sequence length")
    summary = {}
    for n in cfgs:
        for L in (L for L in lengths if L >= 8192 and n != args.baseline):
            ratio = next(r[f"{n}/{args.baseline}"] for r in rows if r["seq_len"] == L)
            if ratio is not None:
                summary[f"{n}/{args.baseline} throughput at {L}"] = ratio
        mem = [(r["seq_len"], r["memory_mb"]) for r in results[n] if r.get("memory_mb")]
        if len(mem) >= 2:
            (l0, m0), (l1, m1) = mem[-2], mem[-1]
            summary[f"{n} memory growth {l0}->{l1} (x{l1 // l0} tokens)"] = m1 / m0
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")

    result = write(table=rows, summary=summary)
    _plot(out / "bench_model.png", cfgs, results, args.batch)
    print(f"wrote {out / 'bench_model.json'} and {out / 'bench_model.png'}")
    return result


def print_profile(title: str, prof: dict) -> None:
    rows = [{"where": row["category"], "ms / step": row["ms_per_step"], "%": row["percent"]}
            for row in prof["rows"]]
    common.print_table(rows, floatfmt=",.3g", title=(
        f"{title}: where a step's time goes ({prof['steps']} traced steps, "
        f"{prof['window_ms'] / prof['steps']:,.1f} ms per step in the trace, {prof['events']} "
        f"device events, {prof['unnamed_events']} classified by kernel name)"))


def _plot(path, cfgs, results, batch):
    plt = common._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for name in cfgs:
        ok = [r for r in results[name] if "tokens_per_second" in r]
        xs = [r["seq_len"] for r in ok]
        axes[0].plot(xs, [r["tokens_per_second"] for r in ok], marker="o", label=name)
        mem = [r for r in results[name] if r.get("memory_mb") is not None]
        axes[1].plot([r["seq_len"] for r in mem], [r["memory_mb"] for r in mem], marker="o",
                     label=name)
    for ax, ylabel in zip(axes, ("training tokens/s", "step memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"sequence length (batch {batch})")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log", base=2)
    fig.suptitle("whole-model training step: throughput and memory")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
