"""Streaming perplexity with a fixed-size KV cache: the cascading cache against sliding window +
attention sinks at the same number of slots, on one checkpoint.

    python -m eval.streaming --checkpoint WORKDIR [--cache_size 64] [--cache_sinks 4]
                             [--cascades 1 4] [--length 1024] [--tokens 8192] --out DIR
                             [--score_decay B] [--cache_positions cache|stream]
                             [--cache_fill eager|lazy]

Every attention layer (`attn`, `swa`) of the checkpoint's model is given the decode cache
`cache='cascade'` with `--cache_size` slots (`layers/kv_cache.py`); `--cascades 1` is the
sliding window with sinks (StreamingLLM), more cascades keep one of every 2^c older tokens,
chosen by the attention they received. The cache's other settings are the registry's
defaults, the reference code's (keys at their place in the cache, importance EMA 0.9999,
every cascade filled before selection starts), unless given. Each window of `--length` tokens is streamed through
the model: every token attends to what the cache holds at its turn (recurrent layers carry
their state as in decoding). The validation text is the checkpoint's, as in eval.perplexity;
documents are concatenated into one stream (a window may cross them, for every variant
alike). "full" is the same model without a cache, every earlier key in view, for reference.
Writes a table (loss, perplexity, ratio to the window) and a PNG of the loss by position.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import numpy as np

from eval import common

ATTENTION = ("attn", "swa")
# Cache settings taken from the command line when given, else the registry's defaults.
CACHE_OPTIONS = ("score_decay", "cache_positions", "cache_fill")


def with_cache(cfg, cascades: int, args):
    """`cfg` with every attention mechanism it uses on the cascading cache."""
    from mem_lm import ModelConfig

    d = cfg.to_dict()
    mixers = dict(d.get("mixers") or {})
    given = {f: getattr(args, f) for f in CACHE_OPTIONS if getattr(args, f) is not None}
    for name in ATTENTION:
        mixers[name] = {**mixers.get(name, {}), "cache": "cascade",
                        "cache_size": args.cache_size, "cache_sinks": args.cache_sinks,
                        "cascades": cascades, **given}
    return ModelConfig.from_dict({**d, "mixers": mixers})


def position_losses(cfg, variables, x, y, batch: int, cached: bool) -> np.ndarray:
    """Next-token loss [windows, length] of windows x with targets y."""
    import jax
    import jax.numpy as jnp
    from mem_lm import LanguageModel, init_cache

    model = LanguageModel(cfg)
    if cached:
        run = jax.jit(lambda v, t: model.apply(v, t, cache=init_cache(cfg, t.shape[0],
                                                                      t.shape[1]))[0])
    else:
        run = jax.jit(lambda v, t: model.apply(v, t))
    out = []
    for s in common.progress_bar(range(0, len(x), batch), desc="streaming"):
        logits = run(variables, jnp.asarray(x[s:s + batch])).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        out.append(-np.asarray(jnp.take_along_axis(logp, jnp.asarray(y[s:s + batch])[..., None],
                                                   -1)[..., 0]))
    return np.concatenate(out)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.streaming", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a training workdir or checkpoint dir")
    src.add_argument("--config", help="an untrained model from this config (smoke runs)")
    ap.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="config overrides (with --checkpoint: model.* fields, same weights)")
    ap.add_argument("--cache_size", type=int, default=64, help="KV slots per attention layer")
    ap.add_argument("--cache_sinks", type=int, default=4, help="first tokens never evicted")
    ap.add_argument("--cascades", type=int, nargs="+", default=[1, 4],
                    help="cascade counts to compare (1: sliding window + sinks)")
    ap.add_argument("--score_decay", type=float,
                    help="importance EMA decay (default: the registry's, 0.9999)")
    ap.add_argument("--cache_positions", choices=("cache", "stream"),
                    help="RoPE positions of cached keys: by place in the cache (default) or "
                         "the original stream positions")
    ap.add_argument("--cache_fill", choices=("eager", "lazy"),
                    help="eager (default): every cascade fills before selection starts")
    ap.add_argument("--length", type=int, help="tokens per streamed window (default: 8× the "
                                               "training length, or 1024)")
    ap.add_argument("--tokens", type=int, default=8192, help="scored tokens per variant")
    ap.add_argument("--batch", type=int, default=8, help="windows per call")
    ap.add_argument("--no_full", action="store_true", help="skip the no-cache reference")
    ap.add_argument("--data", help="validation text (as eval.perplexity)")
    ap.add_argument("--out", default="out/streaming")
    args = ap.parse_args(argv)
    if min(args.cascades) < 1 or args.tokens < 1 or args.batch < 1:
        common.fail("--cascades, --tokens and --batch must be >= 1")

    from eval.perplexity import validation_tokens, windows
    model, variables, source, tcfg = common.load_model(args.checkpoint, args.config,
                                                       args.override)
    cfg = common.model_config_of(model)
    if not set(cfg.pattern) & set(ATTENTION):
        common.fail(f"the model has no attention layer (pattern {cfg.pattern}): nothing to cache")
    train_len = int(tcfg.get("train", {}).get("seq_len", 0)) or None
    length = args.length or (8 * train_len if train_len else 1024)
    tokens, doc_starts, _, what = validation_tokens(tcfg, args.data, None)
    try:
        w, _ = windows(tokens, doc_starts, length, max(1, args.tokens // length))
        variants = {("window + sinks" if c == 1 else f"cascade x{c}"): with_cache(cfg, c, args)
                    for c in args.cascades}
    except ValueError as e:
        common.fail(str(e))
    x, y = w[:, :-1], w[:, 1:]
    # The cache settings in force (every variant has the same), as the registry resolved them.
    cache = next(iter(variants.values())).settings(next(n for n in ATTENTION
                                                        if n in cfg.pattern))
    print(f"validation text: {what}; {len(x)} windows of {length} tokens; cache "
          f"{args.cache_size} slots ({args.cache_sinks} sinks) per attention layer, "
          + ", ".join(f"{f}={cache[f]}" for f in CACHE_OPTIONS), flush=True)

    losses = {}
    if not args.no_full:
        losses["full (no cache)"] = position_losses(cfg, variables, x, y, args.batch, False)
    for name, c in variants.items():
        losses[name] = position_losses(c, variables, x, y, args.batch, True)
    base = losses.get("window + sinks")
    rows = []
    for name, loss in losses.items():
        mean = float(loss.mean())
        rows.append({"variant": name, "loss": mean, "perplexity": math.exp(min(mean, 700)),
                     "vs window + sinks": None if base is None
                     else math.exp(min(mean, 700)) / math.exp(float(base.mean()))})
    common.print_table(rows, ["variant", "loss", "perplexity", "vs window + sinks"],
                       title=f"streaming perplexity, {length}-token windows, "
                             f"{args.cache_size}-slot cache")
    out = common.out_dir(args.out)
    result = {"task": "streaming", "data": what, **source, "length": length,
              "windows": len(x), "cache_size": args.cache_size,
              "cache_sinks": args.cache_sinks,
              **{f: cache[f] for f in CACHE_OPTIONS},
              "train_seq_len": train_len, "results": rows}
    common.write_json(out / "streaming.json", result)
    bucket = max(1, length // 32)
    edges = np.arange(0, length, bucket)
    common.plot_lines(out / "streaming.png",
                      {n: ((edges + bucket / 2).tolist(),
                           [float(l[:, e:e + bucket].mean()) for e in edges])
                       for n, l in losses.items()},
                      xlabel="position in the stream", ylabel=f"loss (mean over {bucket} "
                                                          "positions)",
                      title=f"streaming with a {args.cache_size}-slot KV cache")
    print(f"wrote {out / 'streaming.json'} and {out / 'streaming.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
