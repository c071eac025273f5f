"""Validation perplexity at several context lengths (length extrapolation).

    python -m eval.perplexity --checkpoint WORKDIR [WORKDIR ...] [--names A B ...]
                              [--data PATHS] [--lengths 256 512 ...]

The validation text is, by default, the validation split of the data the checkpoint was trained
on (the built-in corpus: Python's standard library), tokenized with its tokenizer; `--data`
takes files, directories or globs instead (comma-separated). At each context length L about
the same number of tokens (`--tokens`) is scored: windows of L + 1 consecutive tokens spread
evenly over the text, every position predicted with the window before it as context. A window
that runs across documents holds them packed, as training does: segment ids restart the model
at each document, and a target in the next document is not scored (its context would be
another document), so `tokens` counts the targets scored. Lengths default to 1/2, 1, 2, 4 and
8 times the training length (of the first checkpoint). Several checkpoints are scored on the
same windows and drawn as one curve each.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

from eval import common

TEXT_SOURCES = ("stdlib", "text")


def validation_tokens(tcfg: dict, data: Optional[str], tokenizer_spec: Optional[str]):
    """(tokens int32 [N], document starts int64 [D], tokenizer, description) of the validation
    text."""
    from train import data as tdata

    dcfg = dict(tcfg.get("data", {}))
    spec = tokenizer_spec or dcfg.get("tokenizer", "byte")
    try:
        tokenizer = tdata.make_tokenizer(spec)
    except (ImportError, ValueError) as e:
        common.fail(f"tokenizer {spec!r}: {e}")
    if data:
        files = tdata.expand_paths(data, dcfg.get("extensions", ".py,.txt,.md,.rst,.json,.jsonl"))
        what = f"--data {data}"
    else:
        if dcfg.get("source", "stdlib") not in TEXT_SOURCES:
            common.fail(f"the checkpoint was trained on data.source={dcfg.get('source')!r}, not "
                        f"text: give the validation text with --data PATHS")
        defaults = dict(source="stdlib", paths="", val_paths="", val_fraction=0.02,
                        extensions=".py,.txt,.md,.rst,.json,.jsonl", text_field="text")
        files = tdata.text_files(SimpleNamespace(**{**defaults, **dcfg}), "val")
        what = f"the validation split of data.source={dcfg.get('source', 'stdlib')!r}"
    if not files:
        common.fail(f"{what}: no files found")
    corpus = tdata.Corpus.build(tdata.read_documents(files, dcfg.get("text_field", "text")),
                                tokenizer)
    return (corpus.tokens.astype(np.int32), corpus.starts, tokenizer,
            f"{what} ({len(files)} files)")


def windows(tokens: np.ndarray, doc_starts: np.ndarray, length: int,
            count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` windows of `length + 1` tokens, evenly spread over `tokens`, and the document
    of each token (segment ids: the index of its document, from the offsets `doc_starts`)."""
    last = len(tokens) - (length + 1)
    if last < 0:
        raise ValueError(f"the validation text has {len(tokens)} tokens, fewer than one window of "
                         f"{length + 1}")
    starts = np.linspace(0, last, num=count).astype(np.int64)
    pos = starts[:, None] + np.arange(length + 1)
    docs = np.searchsorted(doc_starts, pos, side="right").astype(np.int32)
    return tokens[pos], docs


def perplexity_at(model, variables, tokens: np.ndarray, doc_starts: np.ndarray, length: int,
                  num_tokens: int, batch_tokens: int) -> dict:
    count = max(1, num_tokens // length)
    w, docs = windows(tokens, doc_starts, length, count)
    x, y = w[:, :-1], w[:, 1:]
    scored = docs[:, 1:] == docs[:, :-1]
    n = int(scored.sum())
    if n == 0:
        raise ValueError(f"no window of {length + 1} tokens has a target in the document of "
                         f"its context: the documents are too short for this length")
    batch = max(1, batch_tokens // length)
    nll = 0.0
    for s, logits in common.batched_apply(model, variables, x, batch, progress=True,
                                          desc=f"ppl L={length}", segment_ids=docs[:, :-1]):
        logp = logits - _logsumexp(logits)
        tgt = y[s:s + len(logits)]
        picked = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
        nll -= float(picked[scored[s:s + len(logits)]].sum())
    loss = nll / n
    return {"context_length": length, "windows": count, "tokens": int(n), "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2)}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", help="training workdir(s) or checkpoint dir(s)")
    src.add_argument("--config", help="an untrained model from this config (smoke runs)")
    ap.add_argument("--names", nargs="+", help="labels for the checkpoints (default: dir names)")
    ap.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="config overrides; on a checkpoint, model fields that keep parameter "
                         "shapes, e.g. model.mixers.attn.topk_blocks=8")
    ap.add_argument("--data", help="validation text: files, directories or globs, comma-separated")
    ap.add_argument("--tokenizer", help="override the tokenizer ('byte' or a tokenizer.json)")
    ap.add_argument("--lengths", type=int, nargs="+",
                    help="context lengths (default: 0.5, 1, 2, 4, 8 x the training length)")
    ap.add_argument("--tokens", type=int, default=16384,
                    help="tokens per length (targets in another document than their context "
                         "are left out of the score)")
    ap.add_argument("--batch_tokens", type=int, default=8192, help="tokens per forward pass")
    ap.add_argument("--out", default="out/perplexity")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.batch_tokens < 1:
        common.fail("--tokens and --batch_tokens must be positive")
    sources = args.checkpoint or [None]
    names = args.names or ([Path(p).resolve().name for p in args.checkpoint] if args.checkpoint
                           else ["untrained"])
    if len(names) != len(sources):
        common.fail(f"--names has {len(names)} entries for {len(sources)} checkpoints")

    models, rows, lengths, tokens = {}, [], args.lengths, None
    for name, ckpt in zip(names, sources):
        model, variables, source, tcfg = common.load_model(ckpt, args.config, args.override)
        if tokens is None:   # the first model's validation text serves them all
            tokens, doc_starts, tokenizer, what = validation_tokens(tcfg, args.data,
                                                                   args.tokenizer)
            print(f"validation text: {what}, {len(tokens):,} tokens", flush=True)
        vocab = common.model_vocab_size(model)
        if tokenizer.vocab_size > vocab:
            common.fail(f"{name}: the tokenizer has {tokenizer.vocab_size} symbols, more than "
                        f"the model's vocabulary ({vocab})")
        train_len = int(tcfg.get("train", {}).get("seq_len", 0)) or None
        if lengths is None:
            lengths = ([max(16, train_len // 2), train_len, 2 * train_len, 4 * train_len,
                        8 * train_len] if train_len else [256, 512, 1024])
        if min(lengths) < 1:
            common.fail(f"--lengths must be positive, got {lengths}")
        results = []
        for L in lengths:
            try:
                r = perplexity_at(model, variables, tokens, doc_starts, L, args.tokens,
                                  args.batch_tokens)
            except ValueError as e:
                common.fail(str(e))
            if train_len:
                r["x_train_length"] = L / train_len
            results.append(r)
            rows.append({"model": name, **r})
        models[name] = {**source, "train_seq_len": train_len, "results": results}
    common.print_table(rows, ["model", "context_length", "x_train_length", "tokens", "loss",
                              "perplexity", "bits_per_token"],
                       title="validation perplexity by context length")
    out = common.out_dir(args.out)
    result = {"task": "perplexity", "data": what, "models": models}
    common.write_json(out / "perplexity.json", result)
    train_lens = {m["train_seq_len"] for m in models.values()} - {None}
    common.plot_lines(out / "perplexity.png",
                      {n: ([r["context_length"] for r in m["results"]],
                           [r["perplexity"] for r in m["results"]]) for n, m in models.items()},
                      xlabel="context length (tokens)", ylabel="perplexity", logx=True,
                      title="perplexity vs context length"
                            + (f" (trained at {train_lens.pop()})" if len(train_lens) == 1
                               else ""))
    print(f"wrote {out / 'perplexity.json'} and {out / 'perplexity.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
