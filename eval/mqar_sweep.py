"""MQAR sweep: recall accuracy against recurrent state size, one 2-layer mixer-only model per
(mixer, width, learning rate), as in Zoology; each (mixer, width) reports its best learning rate.

    python -m eval.mqar_sweep --out out/mqar_sweep [--mixers attn swa la ...] [--widths 32 64]
                              [--lrs 1e-3 1e-2] [--short_conv all|default|none] [--steps N]
                              [--override optim.b2=0.999 ...] [--reuse_only] [--quick]

Each model is trained by the project's trainer (`train.run` on `configs/mqar.py`, with
`model.pattern`, `model.d_model`, `model.num_heads`, `optim.learning_rate` set per run) and
scored on held-out MQAR examples (the trainer's validation split, drawn with the test seeds of
`train.tasks.mqar.mqar_seed`): the accuracy over the queried positions. `--short_conv all` (the
default) gives every mixer the q/k/v short convs that gdn and deltanet have built in, so that
the comparison is between memories, not between token shifts (without them, attention sits on
the MQAR plateau far longer than a CPU budget allows). The optimiser is the config's, changed
with `--override` (attention and the recurrent models want different ones: configs/mqar.py).
The recurrent state size is the number of floats the model carries per sequence while decoding
at the task's length (its decode cache, from `mem_lm.init_cache`, conv inputs included; for
`attn` that is the whole KV cache, for `swa` the window's). Finished
runs are kept in OUT/runs/NAME/result.json and reused when the sweep is rerun with the same
settings; `--fresh` retrains.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

from eval import common

MIXERS = ("attn", "swa", "la", "retnet", "gla", "deltanet", "gdn", "mom")
SHORT_CONV = {"all": True, "none": False, "default": None}


def state_size(model_cfg, seq_len: int) -> int:
    """Floats of decode state per sequence after `seq_len` tokens (all layers)."""
    import jax
    from mem_lm import init_cache

    cache = jax.eval_shape(lambda: init_cache(model_cfg, 1, seq_len))
    return int(sum(a.size for a in jax.tree_util.tree_leaves(cache["layers"])))


def run_config(base_config: str, mixer: str, width: int, lr: float, args):
    from layers import registry

    conv = SHORT_CONV[args.short_conv]
    if conv is None:
        conv = registry.get(mixer).settings["short_conv"].default
    overrides = [f"model.pattern={(mixer,)!r}", f"model.d_model={width}",
                 f"model.mixers.{mixer}.short_conv={conv}",
                 f"model.num_heads={args.num_heads}", f"model.mixers.swa.window={args.window}",
                 f"train.seq_len={args.seq_len}", f"data.num_kv_pairs={args.num_kv_pairs}",
                 f"data.vocab_size={args.vocab_size}", f"train.steps={args.steps}",
                 f"train.batch_size={args.batch_size}", f"optim.learning_rate={lr}",
                 f"train.eval_batches={max(1, -(-args.eval_examples // args.batch_size))}",
                 "train.eval_every=0", "checkpoint.enabled=False", "logging.tensorboard=False",
                 "logging.progress_bar=False"]
    return common.load_config_file(base_config, overrides + list(args.override))


def train_or_reuse(args, out, mixer: str, width: int, lr: float, counter: str) -> dict:
    """One run's result row: trained now, or read back from OUT/runs/NAME/result.json when a
    run with the same resolved config finished before (None with --reuse_only when none did).
    A failed run gives a row with `error` (and is not cached), so that one crash does not lose
    the rest of the sweep."""
    from train.config import model_config_from

    name = f"{mixer}_d{width}_lr{lr:g}"
    cfg = run_config(args.config, mixer, width, lr, args)
    resolved = common.resolve_config(cfg)
    model_cfg = model_config_from(resolved)
    workdir = out / "runs" / name
    cached = workdir / "result.json"
    key = json.loads(json.dumps(resolved.to_dict(), default=str))
    kept, done = common.kept_row(cached, key, f"{counter} {name}", fresh=args.fresh,
                                 reuse_only=args.reuse_only, field="config")
    if done:
        return kept
    print(f"{counter} training {name} ({args.steps} steps)", flush=True)
    row = {"mixer": mixer, "d_model": width, "lr": lr,
           "state_size": state_size(model_cfg, args.seq_len)}
    t0 = time.perf_counter()
    try:
        r = common.train_model(cfg, workdir, progress=True)
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"    {name} failed ({msg}); not cached, rerun the sweep to retry",
              file=sys.stderr, flush=True)
        return {**row, "accuracy": None, "error": msg}
    row.update(params=r.get("num_params"), accuracy=r.get("eval_accuracy"),
               eval_loss=r.get("eval_loss"), train_loss=r.get("loss"), steps=r.get("step"),
               train_seconds=time.perf_counter() - t0)
    print(f"    accuracy {row['accuracy']:.3f}, state {row['state_size']:,} floats, "
          f"{row['train_seconds']:.0f}s", flush=True)
    common.write_json(cached, {"config": key, "row": row})
    return row


def best_per_cell(runs: Sequence[dict]) -> list:
    """The best-accuracy run of each (mixer, d_model), in first-seen order (failed runs count
    as accuracy −1, so a cell is only reported failed when all of its runs failed)."""
    best = {}
    for r in runs:
        cell = (r["mixer"], r["d_model"])
        score = -1 if r["accuracy"] is None else r["accuracy"]
        if cell not in best or score > best[cell][0]:
            best[cell] = (score, r)
    return [r for _, r in best.values()]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.mqar_sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mqar.py", help="the base training config")
    ap.add_argument("--mixers", nargs="+", default=list(MIXERS))
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--num_heads", type=int, default=2)
    ap.add_argument("--window", type=int, default=16, help="swa window (small on purpose)")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--num_kv_pairs", type=int, default=16)
    ap.add_argument("--vocab_size", type=int, default=512,
                    help="Zoology uses 8192; the output layer dominates CPU time, so smaller here")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lrs", type=float, nargs="+",
                    help="learning rates tried per (mixer, width), the best reported "
                         "(default 1e-3 1e-2; --quick: 1e-3)")
    ap.add_argument("--short_conv", choices=tuple(SHORT_CONV), default="all",
                    help="q/k/v short convs for all mixers, none, or each mixer's default")
    ap.add_argument("--eval_examples", type=int, default=512)
    ap.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="more config overrides for every run")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: widths 16, seq_len 32, 4 pairs, vocab 64, 10 steps, "
                         "one learning rate")
    common.add_reuse_flags(ap)
    ap.add_argument("--out", default="out/mqar_sweep")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.seq_len, args.num_kv_pairs, args.vocab_size = [16], 32, 4, 64
        args.steps, args.batch_size, args.eval_examples, args.window = 10, 8, 16, 8
    args.lrs = args.lrs or ([1e-3] if args.quick else [1e-3, 1e-2])
    bad = [m for m in args.mixers if m not in common.mixer_names()]
    if bad:
        common.fail(f"--mixers: unknown {bad}; known: {common.mixer_names()}")
    from train.tasks.mqar import check_mqar_args
    try:
        check_mqar_args(args.vocab_size, args.seq_len, args.num_kv_pairs)
    except ValueError as e:
        common.fail(str(e))

    out = common.out_dir(args.out)
    runs = [(m, w, lr) for m in args.mixers for w in args.widths for lr in args.lrs]
    all_runs = [train_or_reuse(args, out, mixer, width, lr, f"[{i + 1}/{len(runs)}]")
                for i, (mixer, width, lr) in enumerate(runs)]
    all_runs = [r for r in all_runs if r is not None]
    rows = best_per_cell(all_runs)

    common.print_table(rows, ["mixer", "d_model", "state_size", "params", "lr", "accuracy",
                              "eval_loss", "train_seconds"], floatfmt=".3g",
                       title=f"MQAR: seq_len {args.seq_len}, {args.num_kv_pairs} pairs, "
                             f"vocab {args.vocab_size}, {args.steps} steps, best of lr "
                             f"{args.lrs}, short convs: {args.short_conv}")
    result = {"task": "mqar_sweep",
              "settings": {k: getattr(args, k) for k in
                           ("config", "seq_len", "num_kv_pairs", "vocab_size", "steps",
                            "batch_size", "lrs", "short_conv", "window", "num_heads",
                            "eval_examples")},
              "results": rows, "all_runs": all_runs}
    common.write_json(out / "mqar_sweep.json", result)
    series = {}
    for m in args.mixers:
        pts = sorted((r["state_size"], r["accuracy"]) for r in rows
                     if r["mixer"] == m and r["accuracy"] is not None)
        if pts:
            series[m] = ([p[0] for p in pts], [p[1] for p in pts])
    common.plot_lines(out / "mqar_sweep.png", series, xlabel="recurrent state size (floats)",
                      ylabel="MQAR accuracy", logx=True, ylim=(-0.02, 1.02),
                      title=f"MQAR, seq_len {args.seq_len}, {args.num_kv_pairs} kv pairs")
    print(f"wrote {out / 'mqar_sweep.json'} and {out / 'mqar_sweep.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
