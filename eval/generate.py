"""Generate text from a checkpoint.

    python -m eval.generate --checkpoint WORKDIR --prompt "def " --max_new_tokens 200 \
        [--temperature 0.8] [--top_k 40] [--top_p 0.95] [--seed 0] [--num_samples 1]

Temperature 0 is greedy decoding. The tokenizer is the one the checkpoint was trained with (the
byte-level tokenizer by default). Decoding uses `mem_lm.generate`: one prefill, then O(1) work
per new token. Prints the samples and writes them, with the settings and the decode speed, to
OUT/generate.json (there is no plot for this one).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import numpy as np

from eval import common


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training workdir or checkpoint directory")
    src.add_argument("--config", help="an untrained model from this config (smoke runs)")
    ap.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None)
    ap.add_argument("--top_p", type=float, default=None)
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="override the tokenizer ('byte' or a tokenizer.json)")
    ap.add_argument("--out", default="out/generate")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        common.fail(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        common.fail(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        common.fail(f"--top_k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        common.fail(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        common.fail(f"--num_samples must be >= 1, got {args.num_samples}")
    if not args.prompt:
        common.fail("--prompt must not be empty")

    import jax
    from mem_lm import generate
    from train.data import make_tokenizer

    model, variables, source, tcfg = common.load_model(args.checkpoint, args.config,
                                                       args.override)
    spec = args.tokenizer or tcfg.get("data", {}).get("tokenizer", "byte")
    try:
        tokenizer = make_tokenizer(spec)
    except (ImportError, ValueError) as e:
        common.fail(f"tokenizer {spec!r}: {e}")
    ids = tokenizer.encode(args.prompt)
    vocab = common.model_vocab_size(model)
    if ids.max(initial=0) >= vocab:
        common.fail(f"the prompt has token ids up to {ids.max()}, beyond the model's vocabulary "
                    f"({vocab}); is --tokenizer right?")
    prompt = np.tile(ids[None], (args.num_samples, 1)).astype(np.int32)
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  rng=jax.random.PRNGKey(args.seed))
    # The first call compiles; time a second, identical call for the decode speed.
    t0 = time.perf_counter()
    tokens = np.asarray(generate(model, variables, prompt, args.max_new_tokens, **kwargs))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.asarray(generate(model, variables, prompt, args.max_new_tokens, **kwargs))
    steady = time.perf_counter() - t0
    new = tokens[:, -args.max_new_tokens:] if tokens.shape[1] > prompt.shape[1] else tokens
    samples = [tokenizer.decode(row.tolist()) for row in new]
    for i, s in enumerate(samples):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + s, flush=True)
    tps = args.num_samples * args.max_new_tokens / steady
    print(f"\n{args.num_samples} x {args.max_new_tokens} tokens: {tps:,.1f} tokens/s after "
          f"compilation (first call {first:.2f}s incl. compile)", file=sys.stderr)
    out = common.out_dir(args.out)
    result = {"task": "generate", **source, "prompt": args.prompt, "tokenizer": spec,
              "settings": {k: getattr(args, k) for k in
                           ("max_new_tokens", "temperature", "top_k", "top_p", "seed",
                            "num_samples")},
              "samples": samples, "tokens": new.tolist(),
              "tokens_per_second": tps, "first_call_seconds": first}
    common.write_json(out / "generate.json", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
