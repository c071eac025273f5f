"""Cross-segment recall: accuracy against the distance, in segments, from a fact to its question,
for memory models that carry state across segments and baselines that do not.

    python -m eval.segment_recall --out out/segment_recall [--models armt rmt ...]
                                  [--steps N] [--distances 1 2 4] [--override FIELD=VALUE ...]
                                  [--quick] [--fresh] [--reuse_only]

The task (`train.tasks.segment_recall`, ARMT's associative-retrieval facts): rows of
`--segments` segments of `--segment_len` tokens; each segment opens with `--facts` facts
`k1 k2 SEP v EOS` (2-symbol keys, 1-symbol values, `--symbols` symbols) and asks about the
facts of a segment d earlier (`k1 k2 GEN` -> v). Every model trains on the same data (d drawn
per segment, 1 .. `--max_distance`) through the project's trainer (`train.run` on
`--config`, configs/segment_recall.py, with the model and sizes set per run), then is scored on
held-out rows (the test seeds of `segment_recall_seed`) with every question at one distance d,
for each d: the share of answers whose greedy prediction is the value (chance 1 / symbols).

Models (all `--num_layers` x `--d_model`, `--num_heads` heads, SwiGLU MLPs):

    armt           attention in each segment + ARMT's per-layer associative memories
                   (`--armt_memory_tokens` write tokens, d_mem `--d_mem`, nu `--nu`)
    rmt            attention in each segment + RMT's `--rmt_memory_tokens` memory tokens
    segment_local  attention in each segment, nothing carried (rmt with 0 memory tokens): the
                   floor; it can answer nothing from an earlier segment
    brt            sliding-window attention (window = a segment) + a Block-Recurrent layer
                   (window = a segment, `--brt_state` state vectors); no segmentation
    gdn            Gated DeltaNet over the whole row (its state crosses segments)
    swa            sliding-window attention over the whole row, window `--swa_window`

`state` in the table is the floats a model carries from one segment to the next per row: the
memory (rmt: m·d; armt: every layer's A and z, layers · 2·nu·d_mem · (d + 1)), or for the
unsegmented models their decode cache (`mem_lm.init_cache`: gdn's states and conv inputs,
swa's window of keys and values, brt's state and caches). The defaults size gdn and swa near
armt's state. Finished runs are kept in OUT/runs/NAME/result.json and reused when rerun with
the same settings (`--fresh` retrains).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import numpy as np

from eval import common

MODELS = ("armt", "rmt", "segment_local", "brt", "gdn", "swa")


def model_group(name: str, args):
    """The `config.model` group of model `name`."""
    from configs import base

    S = args.segment_len
    kw = dict(d_model=args.d_model, num_layers=args.num_layers, num_heads=args.num_heads,
              pattern=("attn",))
    if name == "armt":
        kw["segments"] = {"kind": "armt", "length": S, "memory_tokens": args.armt_memory_tokens,
                          "bptt": None, "d_mem": args.d_mem, "nu": args.nu, "correction": True}
    elif name in ("rmt", "segment_local"):
        kw["segments"] = {"kind": "rmt", "length": S, "bptt": None,
                          "memory_tokens": args.rmt_memory_tokens if name == "rmt" else 0}
    elif name == "brt":
        kw.update(pattern=("swa", "brt"), mixers={"swa": {"window": S},
                                                  "brt": {"window": S,
                                                          "state_size": args.brt_state}})
    elif name == "gdn":
        kw["pattern"] = ("gdn",)
    elif name == "swa":
        kw.update(pattern=("swa",), mixers={"swa": {"window": args.swa_window}})
    else:
        raise ValueError(name)
    return base.model_config(**kw)


def carried_state(model_cfg, seq_len: int) -> int:
    """Floats carried from one segment to the next per row (see the module doc)."""
    s = model_cfg.segment_settings
    if s is None:
        from eval.mqar_sweep import state_size
        return state_size(model_cfg, seq_len)
    if s["kind"] == "rmt":
        return s["memory_tokens"] * model_cfg.d_model
    return model_cfg.num_layers * 2 * s["nu"] * s["d_mem"] * (model_cfg.d_model + 1)


def run_config(name: str, args):
    cfg = common.load_config_file(args.config)
    cfg.model = model_group(name, args)
    cfg.data.update(source="segment_recall", vocab_size=4 + args.symbols,
                    num_kv_pairs=args.facts, segment_len=args.segment_len, distance=0,
                    max_distance=args.max_distance)
    # The trainer's own validation (mixed distances) at the end; not in --quick (a compile).
    cfg.train.update(steps=args.steps, batch_size=args.batch_size,
                     seq_len=args.segment_len * args.segments, eval_every=0,
                     eval_batches=0 if args.quick else max(1, -(-args.eval_examples
                                                                 // args.batch_size)),
                     checkpoint_every=0, seed=args.seed)
    cfg.optim.learning_rate = args.lr
    cfg.checkpoint.enabled = False
    cfg.logging.update(tensorboard=False, progress_bar=False)
    cfg.sample.enabled = False
    return common.apply_overrides(cfg, args.override, flag="--override")


def accuracy_by_distance(model, variables, distances: Sequence[int], args) -> dict:
    """{d: accuracy over every question of `--eval_examples` held-out rows at distance d}."""
    from train.tasks.segment_recall import make_segment_recall, segment_recall_seed

    out = {}
    for d in distances:
        x, y, _ = make_segment_recall(args.eval_examples, 4 + args.symbols,
                                      args.segment_len * args.segments, args.segment_len,
                                      args.facts, distance=d,
                                      seed=(*segment_recall_seed(args.seed, "test"), d))
        hits = total = 0
        for s, logits in common.batched_apply(model, variables, x, args.batch_size):
            h, m = common.label_hits(logits, y[s:s + len(logits)])
            hits, total = hits + int(h.sum()), total + int(m.sum())
        out[int(d)] = hits / total
    return out


def train_and_score(name: str, args, out, distances, counter: str) -> Optional[dict]:
    from mem_lm import LanguageModel
    from train.config import model_config_from

    cfg = run_config(name, args)
    resolved = common.resolve_config(cfg)
    model_cfg = model_config_from(resolved)
    workdir = out / "runs" / name
    cached = workdir / "result.json"
    key = json.loads(json.dumps({"config": resolved.to_dict(), "distances": list(distances),
                                 "eval_examples": args.eval_examples}, default=str))
    kept, done = common.kept_row(cached, key, f"{counter} {name}", fresh=args.fresh,
                                 reuse_only=args.reuse_only)
    if done:
        return kept
    print(f"{counter} training {name} ({args.steps} steps)", flush=True)
    row = {"model": name, "pattern": list(model_cfg.pattern),
           "segments": model_cfg.segment_settings,
           "state": carried_state(model_cfg, resolved.train.seq_len)}
    t0 = time.perf_counter()
    try:
        r = common.train_model(cfg, workdir, progress=not args.quick, return_state=True)
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"    {name} failed ({msg}); not cached, rerun to retry", file=sys.stderr,
              flush=True)
        return {**row, "error": msg, "accuracy": {}}
    seconds = time.perf_counter() - t0
    import jax
    variables = {"params": jax.device_get(r["state"]["params"])}
    acc = accuracy_by_distance(LanguageModel(model_cfg), variables, distances, args)
    row.update(params=r.get("num_params"), train_loss=r.get("loss"), eval_loss=r.get("eval_loss"),
               eval_accuracy=r.get("eval_accuracy"), steps=r.get("step"), train_seconds=seconds,
               accuracy=acc, mean_accuracy=float(np.mean(list(acc.values()))))
    print(f"    {name}: accuracy by distance "
          + ", ".join(f"{d}: {a:.2f}" for d, a in acc.items())
          + f"; state {row['state']:,} floats, {seconds:.0f}s", flush=True)
    common.write_json(cached, {"key": key, "row": row})
    return row


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.segment_recall", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/segment_recall.py",
                    help="the base training config (optimizer, logging)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--segment_len", type=int, default=16)
    ap.add_argument("--segments", type=int, default=8, help="segments per row")
    ap.add_argument("--facts", type=int, default=1, help="facts (and questions) per segment")
    ap.add_argument("--symbols", type=int, default=16, help="key / value symbols")
    ap.add_argument("--max_distance", type=int, default=0,
                    help="largest training distance (0: segments - 1)")
    ap.add_argument("--distances", type=int, nargs="+",
                    help="distances scored (default 1 .. segments - 1)")
    ap.add_argument("--d_model", type=int, default=64)
    ap.add_argument("--num_layers", type=int, default=2)
    ap.add_argument("--num_heads", type=int, default=2)
    ap.add_argument("--armt_memory_tokens", type=int, default=4,
                    help="ARMT's write tokens (the recipe's MEMORY_SIZE=4)")
    ap.add_argument("--d_mem", type=int, default=10, help="ARMT's d_mem")
    ap.add_argument("--nu", type=int, default=3, help="ARMT's DPFP order")
    ap.add_argument("--rmt_memory_tokens", type=int, default=16)
    ap.add_argument("--brt_state", type=int, default=16, help="brt state vectors")
    ap.add_argument("--swa_window", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval_examples", type=int, default=256, help="held-out rows per distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="more config overrides for every run (e.g. optim.weight_decay=0)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3 segments of 12 tokens, width 16, 2 steps")
    common.add_reuse_flags(ap)
    ap.add_argument("--out", default="out/segment_recall")
    args = ap.parse_args(argv)
    if args.quick:
        args.__dict__.update(segment_len=12, segments=3, symbols=8, d_model=16, steps=2,
                             batch_size=4, eval_examples=8, armt_memory_tokens=2, d_mem=4,
                             rmt_memory_tokens=2, brt_state=4, swa_window=8)
    n = args.segments
    distances = args.distances or list(range(1, n))
    from train.tasks.segment_recall import check_segment_recall_args
    try:
        check_segment_recall_args(4 + args.symbols, args.segment_len * n, args.segment_len,
                                  args.facts, None, args.max_distance or None)
        for d in distances:
            check_segment_recall_args(4 + args.symbols, args.segment_len * n,
                                      args.segment_len, args.facts, d)
    except ValueError as e:
        common.fail(str(e).replace("`seq_len`", "--segments x --segment_len"))

    out = common.out_dir(args.out)
    rows = [train_and_score(m, args, out, distances, f"[{i + 1}/{len(args.models)}]")
            for i, m in enumerate(args.models)]
    rows = [r for r in rows if r is not None]
    table = [{"model": r["model"], "state": r["state"], "params": r.get("params"),
              **{f"d={d}": r["accuracy"].get(d, r["accuracy"].get(str(d))) for d in distances},
              "mean": r.get("mean_accuracy"), "train s": r.get("train_seconds")} for r in rows]
    title = (f"cross-segment recall: {n} segments of {args.segment_len}, {args.facts} fact(s) a "
             f"segment, {args.symbols} symbols (chance {1 / args.symbols:.3f}), {args.steps} "
             f"steps")
    common.print_table(table, floatfmt=".3g", title=title)
    result = {"task": "segment_recall",
              "settings": {k: v for k, v in vars(args).items()
                           if k not in ("fresh", "reuse_only", "out")},
              "distances": distances, "chance": 1 / args.symbols, "results": rows}
    common.write_json(out / "segment_recall.json", result)
    series = {}
    for r in rows:
        accs = [r["accuracy"].get(d, r["accuracy"].get(str(d))) for d in distances]
        if any(a is not None for a in accs):
            series[f"{r['model']} ({r['state']:,} floats)"] = (distances, accs)
    common.plot_lines(out / "segment_recall.png", series,
                      xlabel="distance from fact to question (segments)", ylabel="accuracy",
                      ylim=(-0.02, 1.02),
                      title=f"cross-segment recall: {n} segments of {args.segment_len} "
                            f"(chance {1 / args.symbols:.2f})")
    print(f"wrote {out / 'segment_recall.json'} and {out / 'segment_recall.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
