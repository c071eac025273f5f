"""Phonebook recall: a memory layer against a dense MLP at equal compute per token.

    python -m eval.phonebook [--num_facts 8192] [--steps 2000] [--quick] --out out/phonebook

A fixed dictionary of `--num_facts` facts (two name tokens -> one number token;
`train.tasks.phonebook`) is learned during training: every row holds random facts of the book,
each at most once, so a value can only come from the weights. Two models of the same shape
(`--num_layers` attention blocks of width `--d_model`) train on the same batches with the
trainer's optimizer (`train.optim.make_optimizer`: AdamW, warmup + cosine; memory values at
their own fixed learning rate):

    dense    SwiGLU MLPs in every block
    memory   the last block's MLP replaced by memory_plus (n_keys² slots, `--heads` heads,
             top-`--topk`), its hidden compute per token about the SwiGLU's (the table shows
             both: multiply-adds per token of that block's MLP)

Reported: the accuracy over every fact of the book (greedy next token at each fact's last key
token), the loss, and for the memory model its key usage (`memory_key_usage`, the fraction of
slots a batch reads: the mean over the last 10% of steps, and for one batch holding the whole
book) and weight entropy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from eval import common
from train.tasks.phonebook import IGNORE_INDEX, all_facts_rows, make_phonebook, phonebook_rows


def mlp_macs(cfg, name: str) -> int:
    """Multiply-adds per token of one channel mixer `name` of `cfg` (matmuls and the bag)."""
    from layers import memory as mem
    from mem_lm.model import make_mixer

    m = make_mixer(cfg, name)
    d = cfg.d_model
    if isinstance(m, mem.MemoryLayer):
        return (d * m.heads * m.k_dim + m.heads * m.n_keys * m.k_dim     # query, both halves
                + m.heads * m.topk * d + 2 * d * d)                      # bag, W_1 and W_o
    return 3 * d * m.d_ff


def train_and_score(cfg, book, args, log) -> dict:
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import optax
    from configs.base import get_config
    from mem_lm import LanguageModel, apply_with_aux, param_count
    from train.optim import make_optimizer

    model = LanguageModel(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(
        jax.random.PRNGKey(args.seed), jnp.zeros((1, 8), jnp.int32))["params"])
    o = get_config().optim
    o.update(learning_rate=args.lr, warmup_steps=args.steps // 20, decay_steps=args.steps,
             weight_decay=0.0)
    o.memory_values.learning_rate = args.values_lr
    tx = make_optimizer(o)

    def loss_fn(p, inputs, labels):
        logits, aux = apply_with_aux(model, {"params": p}, inputs)
        mask = labels != IGNORE_INDEX
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
        return jnp.sum(ce * mask) / jnp.sum(mask), aux["metrics"]

    @jax.jit
    def step(p, s, inputs, labels):
        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, inputs, labels)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss, metrics

    book_in, book_labels = all_facts_rows(book, (args.seq_len + 1) // book.fact_len)

    @jax.jit
    def score(p):
        logits, aux = apply_with_aux(model, {"params": p}, book_in)
        mask = book_labels != IGNORE_INDEX
        hits = (jnp.argmax(logits, -1) == book_labels) & mask
        return jnp.sum(hits) / jnp.sum(mask), aux["metrics"]

    state = tx.init(params)
    rng = np.random.default_rng(args.seed)
    curve, usage, t0 = [], [], time.perf_counter()
    for i in range(1, args.steps + 1):
        inputs, labels = phonebook_rows(book, args.batch, args.seq_len, rng)
        params, state, loss, metrics = step(params, state, inputs, labels)
        if i > args.steps - max(args.steps // 10, 1) and "memory_key_usage" in metrics:
            usage.append(float(metrics["memory_key_usage"]))
        if i % args.eval_every == 0 or i == args.steps:
            acc, _ = score(params)
            curve.append((i, float(acc)))
            log(f"step {i:>5}: loss {float(loss):.3f}, book accuracy {float(acc):.3f}")
    acc, book_metrics = score(params)
    return {"params": param_count(cfg), "accuracy": float(acc), "loss": float(loss),
            "seconds": time.perf_counter() - t0, "curve": curve,
            "key_usage_per_step": float(np.mean(usage)) if usage else None,
            "key_usage_whole_book": (float(book_metrics["memory_key_usage"])
                                     if "memory_key_usage" in book_metrics else None),
            "weight_entropy": (float(book_metrics["memory_weight_entropy"])
                               if "memory_weight_entropy" in book_metrics else None)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.phonebook", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_facts", type=int, default=8192)
    ap.add_argument("--num_names", type=int, default=128, help="name tokens (keys: two each)")
    ap.add_argument("--num_numbers", type=int, default=128, help="value tokens")
    ap.add_argument("--d_model", type=int, default=32)
    ap.add_argument("--num_layers", type=int, default=2)
    ap.add_argument("--num_heads", type=int, default=2)
    ap.add_argument("--n_keys", type=int, default=128, help="memory: n_keys² slots")
    ap.add_argument("--heads", type=int, default=2, help="memory heads")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=95, help="tokens a row (32 facts: 96 - 1)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--values_lr", type=float, default=1e-3,
                    help="the memory values' fixed learning rate (optim.memory_values)")
    ap.add_argument("--eval_every", type=int, default=500)
    ap.add_argument("--models", nargs="+", choices=("dense", "memory"),
                    default=["dense", "memory"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny book and 20 steps (smoke)")
    ap.add_argument("--out", default="out/phonebook")
    args = ap.parse_args(argv)
    if args.quick:
        args.__dict__.update(num_facts=64, num_names=16, num_numbers=32, d_model=16,
                             n_keys=8, topk=4, steps=20, batch=4, seq_len=23, eval_every=10)
    try:
        book = make_phonebook(args.num_facts, args.num_names, args.num_numbers, 2, args.seed)
        phonebook_rows(book, 1, args.seq_len, np.random.default_rng(0))
    except ValueError as e:
        common.fail(str(e))

    import jax
    from mem_lm import ModelConfig

    base = dict(vocab_size=book.vocab_size, d_model=args.d_model, num_layers=args.num_layers,
                num_heads=args.num_heads, pattern=("attn",))
    channels = ("swiglu",) * (args.num_layers - 1)
    try:
        cfgs = {"dense": ModelConfig(**base, channel_pattern=channels + ("swiglu",)),
                "memory": ModelConfig(**base, channel_pattern=channels + ("memory_plus",),
                                      mixers={"memory_plus": dict(
                                          n_keys=args.n_keys, heads=args.heads,
                                          topk=args.topk)})}
    except ValueError as e:
        common.fail(str(e))
    device = jax.devices()[0]
    machine = f"{device.platform} {device.device_kind}, {os.cpu_count()} cores"
    print(f"device: {machine}; {args.num_facts} facts, {args.steps} steps x {args.batch} rows "
          f"x {(args.seq_len + 1) // book.fact_len} facts", flush=True)
    out = common.out_dir(args.out)
    results, rows = {}, []
    for name in args.models:
        cfg = cfgs[name]
        results[name] = train_and_score(cfg, book, args, lambda m: print(f"{name:>6} {m}",
                                                                         flush=True))
        r = results[name]
        rows.append({"model": name, "params": r["params"],
                     "last MLP MACs/token": mlp_macs(cfg, cfg.channel_pattern[-1]),
                     "book accuracy": r["accuracy"], "loss": r["loss"],
                     "key usage/step": r["key_usage_per_step"],
                     "key usage (whole book)": r["key_usage_whole_book"],
                     "weight entropy": r["weight_entropy"], "train s": r["seconds"]})
    if len(results) == 2:
        rows.append({"model": "memory / dense",
                     "book accuracy": (results["memory"]["accuracy"]
                                       / max(results["dense"]["accuracy"], 1e-9))})
    common.print_table(rows, floatfmt=",.4g",
                       title=f"phonebook recall, {args.num_facts} facts ({machine})")
    result = {"task": "phonebook", "machine": machine, "args": vars(args), "table": rows,
              "results": results}
    common.write_json(out / "phonebook.json", result)
    common.plot_lines(out / "phonebook.png",
                      {n: tuple(zip(*r["curve"])) for n, r in results.items()},
                      xlabel="training step", ylabel="book accuracy",
                      title=f"phonebook: {args.num_facts} facts ({machine})", ylim=(0, 1))
    print(f"wrote {out / 'phonebook.json'} and {out / 'phonebook.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
