"""Needle in a haystack: retrieval accuracy as a depth x context-length heatmap.

    python -m eval.niah --checkpoint WORKDIR [WORKDIR ...] --out out/niah
    python -m eval.niah --config configs/niah.py --patterns gdn hybrid attn --out out/niah

With `--checkpoint`, each model is evaluated as it is. With `--config`, one model per entry of
`--patterns` is first trained on the synthetic task (through `train.run`, into OUT/train/NAME),
then evaluated. The task is the synthetic-vocabulary needle (`train.tasks.niah.make_niah`) for
models trained on `data.source = "niah"`, else the byte-level passkey (`make_passkey`); force
it with `--task`. Context lengths default to 1/2, 1, 2, 4 and 8 times the training length.

A needle counts as found when every answer token is the model's greedy next-token prediction
(teacher-forced, which equals greedy decoding when all of them are right).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from eval import common
from train.tasks.niah import make_niah, make_passkey

TASKS = ("auto", "synthetic", "passkey")
# Named mixer patterns for --patterns (anything else is read as a comma-separated pattern).
PATTERNS = {
    "gdn": ("gdn",),
    "attn": ("attn",),
    "transformer": ("attn",),
    "hybrid": ("gdn", "swa"),
    "la": ("la",),
    "swa": ("swa",),
    "deltanet": ("deltanet",),
    "gla": ("gla",),
    "retnet": ("retnet",),
}


def parse_pattern(name: str) -> tuple:
    return PATTERNS.get(name) or tuple(p.strip() for p in name.split(",") if p.strip())


def niah_examples(task: str, n: int, seq_len: int, depth: float, vocab_size: int, seed: int):
    if task == "synthetic":
        x, y, _ = make_niah(n, vocab_size, seq_len, depth=depth, seed=seed)
    else:
        x, y, _ = make_passkey(n, seq_len, depth=depth, seed=seed)
    return x, y


def evaluate_grid(model, variables, task: str, lengths: Sequence[int], depths: Sequence[float],
                  num_examples: int, vocab_size: int, batch_size: int = 8, seed: int = 1234,
                  progress: bool = True) -> np.ndarray:
    """Accuracy [len(depths), len(lengths)]: share of needles retrieved."""
    acc = np.zeros((len(depths), len(lengths)))
    cells = [(i, j) for j in range(len(lengths)) for i in range(len(depths))]
    for i, j in common.progress_bar(cells, disable=not progress, desc="niah"):
        x, y = niah_examples(task, num_examples, lengths[j], depths[i], vocab_size,
                             seed=(seed, i, j))
        found = []
        for s, logits in common.batched_apply(model, variables, x, batch_size):
            hits, mask = common.label_hits(logits, y[s:s + len(logits)])
            found.append((hits == mask).all(axis=1))
        acc[i, j] = float(np.concatenate(found).mean())
    return acc


def _train_models(args, out) -> list:
    """Train one model per --patterns entry on --config; returns [(name, workdir)]."""
    runs = []
    for name in args.patterns:
        pattern = parse_pattern(name)
        overrides = list(args.override) + [f"model.pattern={pattern!r}"]
        if args.steps:
            overrides.append(f"train.steps={args.steps}")
        cfg = common.load_config_file(args.config, overrides)
        workdir = out / "train" / name.replace(",", "-")
        print(f"training {name} (pattern {pattern}) for {cfg.train.steps} steps -> {workdir}",
              flush=True)
        common.train_model(cfg, workdir)
        runs.append((name, workdir))
    return runs


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.niah", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", help="training workdir(s) or checkpoint dir(s)")
    src.add_argument("--config", help="train on this config first (e.g. configs/niah.py)")
    ap.add_argument("--names", nargs="+", help="labels for the checkpoints (default: dir names)")
    ap.add_argument("--patterns", nargs="+", default=["gdn", "hybrid", "attn"],
                    help="with --config: the models to train (names or comma-separated patterns)")
    ap.add_argument("--steps", type=int, default=0, help="with --config: override train.steps")
    ap.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="with --config: config overrides, e.g. train.batch_size=16; with "
                         "--checkpoint: model fields that keep parameter shapes, e.g. "
                         "model.mixers.attn.topk_blocks=8")
    ap.add_argument("--task", choices=TASKS, default="auto")
    ap.add_argument("--lengths", type=int, nargs="+",
                    help="context lengths (default: 0.5, 1, 2, 4, 8 x the training length)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--num_examples", type=int, default=32, help="needles per cell")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default="out/niah")
    args = ap.parse_args(argv)
    for d in args.depths:
        if not 0 <= d <= 1:
            common.fail(f"--depths: {d} is not in [0, 1]")
    if args.num_examples < 1:
        common.fail(f"--num_examples must be >= 1, got {args.num_examples}")
    out = common.out_dir(args.out)

    if args.config:
        runs = _train_models(args, out)
    else:
        names = args.names or [Path(p).resolve().name for p in args.checkpoint]
        if len(names) != len(args.checkpoint):
            common.fail(f"--names has {len(names)} entries for {len(args.checkpoint)} checkpoints")
        runs = list(zip(names, args.checkpoint))

    models, rows = {}, []
    for name, path in runs:
        # With --config the overrides were the training's; with --checkpoint they switch the
        # trained model (model.* fields that keep parameter shapes).
        model, variables, _, tcfg = common.load_model(
            path, overrides=() if args.config else args.override)
        data = tcfg.get("data", {})
        train_len = int(tcfg.get("train", {}).get("seq_len", 0)) or None
        task = args.task
        if task == "auto":
            task = "synthetic" if data.get("source") == "niah" else "passkey"
        vocab = common.model_vocab_size(model)
        if task == "synthetic":
            vocab = int(data.get("vocab_size", vocab))
        floor = 8 if task == "synthetic" else 128     # the passkey's needle + question
        lengths = args.lengths or sorted({max(floor, int(f * train_len))
                                          for f in (0.5, 1, 2, 4, 8)} if train_len else
                                         [256, 512, 1024, 2048])
        try:
            acc = evaluate_grid(model, variables, task, lengths, args.depths, args.num_examples,
                                vocab, args.batch_size, args.seed)
        except ValueError as e:
            common.fail(f"{name}: {e}")
        pattern = list(getattr(common.model_config_of(model), "pattern", ()))
        models[name] = {"checkpoint": str(path), "task": task, "pattern": pattern,
                        "train_seq_len": train_len, "lengths": list(lengths),
                        "depths": list(args.depths), "accuracy": acc.tolist(),
                        "accuracy_by_length": acc.mean(0).tolist()}
        for i, d in enumerate(args.depths):
            rows.append({"model": name, "depth": d,
                         **{f"L={L}": acc[i, j] for j, L in enumerate(lengths)}})
        rows.append({"model": name, "depth": "mean",
                     **{f"L={L}": acc[:, j].mean() for j, L in enumerate(lengths)}})

    common.print_table(rows, floatfmt=".2f",
                       title=f"needle retrieval accuracy ({args.num_examples} needles per cell)")
    result = {"task": "niah", "num_examples": args.num_examples, "models": models}
    common.write_json(out / "niah.json", result)
    first = next(iter(models.values()))
    common.plot_heatmaps(out / "niah.png",
                         {n: np.asarray(m["accuracy"]) for n, m in models.items()},
                         row_labels=args.depths, col_labels=first["lengths"],
                         xlabel="context length", ylabel="needle depth",
                         title="needle in a haystack: accuracy")
    print(f"wrote {out / 'niah.json'} and {out / 'niah.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
