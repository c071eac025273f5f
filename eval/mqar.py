"""MQAR accuracy of a trained model: `evaluate_mqar` and `python -m eval.mqar --checkpoint PATH`.

The task and its generator (`make_mqar`, `mqar_seed`, numpy only) are in `train.tasks.mqar`;
JAX, the model and `eval.common` are imported lazily.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

from train.tasks.mqar import make_mqar, mqar_seed


def evaluate_mqar(model, variables, inputs: np.ndarray, labels: np.ndarray,
                  batch_size: int = 64, progress: bool = False) -> dict:
    """Accuracy of `model` over the labelled positions (greedy next-token prediction)."""
    from eval.common import batched_apply, label_hits

    correct = total = 0
    for s, logits in batched_apply(model, variables, inputs, batch_size, progress, "mqar eval"):
        hits, mask = label_hits(logits, labels[s:s + len(logits)])
        correct += int(hits.sum())
        total += int(mask.sum())
    return {"accuracy": correct / max(total, 1), "correct": correct, "total": total,
            "num_examples": len(inputs)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """`python -m eval.mqar --checkpoint PATH`: MQAR accuracy of a trained model on a test set."""
    from eval import common

    ap = argparse.ArgumentParser(prog="python -m eval.mqar", description=main.__doc__)
    ap.add_argument("--checkpoint", required=True, help="workdir or checkpoint directory")
    ap.add_argument("--num_examples", type=int, default=1000)
    ap.add_argument("--vocab_size", type=int, default=None,
                    help="default: the model's vocabulary size")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--num_kv_pairs", type=int, nargs="+", default=[16])
    ap.add_argument("--power_a", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--out", default="out/mqar")
    args = ap.parse_args(argv)

    model, variables = common.load_checkpoint(args.checkpoint)
    vocab = args.vocab_size or common.model_vocab_size(model)
    rows = []
    for p in args.num_kv_pairs:
        try:
            x, y = make_mqar(args.num_examples, vocab, args.seq_len, p, args.power_a,
                             seed=mqar_seed(args.seed, "test"))
        except ValueError as e:
            common.fail(str(e))
        r = evaluate_mqar(model, variables, x, y, args.batch_size, progress=True)
        rows.append({"seq_len": args.seq_len, "num_kv_pairs": p, **r})
    common.print_table(rows, ["seq_len", "num_kv_pairs", "accuracy", "total"])
    result = {"task": "mqar", "checkpoint": str(args.checkpoint), "vocab_size": vocab,
              "results": rows}
    out = common.out_dir(args.out)
    common.write_json(out / "mqar.json", result)
    common.plot_lines(out / "mqar.png",
                      {"accuracy": ([r["num_kv_pairs"] for r in rows],
                                    [r["accuracy"] for r in rows])},
                      xlabel="key-value pairs", ylabel="accuracy",
                      title=f"MQAR, seq_len {args.seq_len}")
    print(f"wrote {out / 'mqar.json'} and {out / 'mqar.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
