"""Speed of the synthetic task generators (train.tasks): examples per second at a few lengths.

    python -m eval.bench_tasks [--seq_lens 256 1024 4096] [--tasks mqar niah passkey] --out out/bench_tasks

Generators (numpy only; JAX is never imported):

    mqar      make_mqar, vocabulary --vocab_size, seq_len // 16 key-value pairs (16 at length
              256: the MQAR sweep's setting)
    niah      make_niah, synthetic vocabulary of --vocab_size, one needle at a random depth
    passkey   make_passkey, bytes, the needle at a random depth

A cell generates batches of doubling size, from 16 examples, until one batch takes
--min_seconds; that batch size is then generated --repeats times and the fastest kept (the
least disturbed by other load on the machine). A data loader needs examples/s well above the
trainer's steps/s x batch size.

Writes bench_tasks.json and bench_tasks.png (examples/s against length, one line per task).
"""
from __future__ import annotations

import argparse
import time

from eval import common
from train.tasks.mqar import make_mqar
from train.tasks.niah import make_niah, make_passkey

TASKS = ("mqar", "niah", "passkey")
FIRST_BATCH = 16


def generator(task: str, seq_len: int, vocab_size: int):
    """`gen(n, seed)` making n examples of `task` at `seq_len`; ValueError for bad settings,
    raised here rather than inside the timing loop."""
    if task == "mqar":
        gen = lambda n, seed: make_mqar(n, vocab_size, seq_len, max(1, seq_len // 16), seed=seed)
    elif task == "niah":
        gen = lambda n, seed: make_niah(n, vocab_size, seq_len, seed=seed)
    else:
        gen = lambda n, seed: make_passkey(n, seq_len, seed=seed)
    gen(1, 0)
    return gen


def time_generator(gen, min_seconds: float, repeats: int) -> tuple[int, float]:
    """(batch size, best seconds for one batch of it)."""
    n = FIRST_BATCH
    while True:
        t = time.perf_counter()
        gen(n, 0)
        if time.perf_counter() - t >= min_seconds:
            break
        n *= 2
    best = float("inf")
    for r in range(repeats):
        t = time.perf_counter()
        gen(n, r + 1)
        best = min(best, time.perf_counter() - t)
    return n, best


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_tasks",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seq_lens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--vocab_size", type=int, default=8192)
    ap.add_argument("--min_seconds", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="out/bench_tasks")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        common.fail(f"--repeats must be >= 1, got {args.repeats}")
    out = common.out_dir(args.out)

    rows, series = [], {}
    for task in args.tasks:
        speeds = []
        for L in args.seq_lens:
            try:
                gen = generator(task, L, args.vocab_size)
            except ValueError as e:
                common.fail(f"{task} at --seq_lens {L}: {e}")
            n, sec = time_generator(gen, args.min_seconds, args.repeats)
            rows.append(dict(task=task, seq_len=L, batch=n, seconds=sec,
                             examples_per_s=round(n / sec), Mtokens_per_s=n * L / sec / 1e6))
            speeds.append(n / sec)
        series[task] = (args.seq_lens, speeds)
    common.print_table(rows, ["task", "seq_len", "batch", "seconds", "examples_per_s",
                              "Mtokens_per_s"],
                       title=f"synthetic task generators (vocab {args.vocab_size}, best of "
                             f"{args.repeats})")
    common.write_json(out / "bench_tasks.json", dict(args=vars(args), rows=rows))
    common.plot_lines(out / "bench_tasks.png", series, xlabel="sequence length (tokens)",
                      ylabel="examples / s", title="synthetic task generators", logx=True,
                      logy=True)
    print(f"wrote {out}/bench_tasks.json and bench_tasks.png")
    return rows


if __name__ == "__main__":
    main()
