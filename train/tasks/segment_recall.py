"""Cross-segment associative recall: facts in one segment, their questions a set number of
segments later. Numpy only: the training data pipeline (`train.data`, `data.source =
"segment_recall"`) and the evaluation (`eval.segment_recall`) both import it from here.

Facts are the ARMT associative-retrieval recipe's (Rodkin et al. 2024;
RodkinIvan/associative-recurrent-memory-transformer, run_finetuning_associative_retrieval.py):
a key of 2 symbols, a separator, a value of 1 symbol, an end token: `k1 k2 SEP v EOS`; a
question is the key with the generation marker, then the answer: `k1 k2 GEN v EOS`. Keys and
values are drawn from the same symbols; the keys of a row are distinct (the recipe's randperm of
the symbol pairs), the values are not.

A row of `seq_len` tokens is cut into n = seq_len // segment_len segments (any remainder at
the end is filler). Every segment starts with `facts_per_segment` facts (P); from segment
`distance` on, P questions follow them, about the P facts of the segment `distance` earlier,
in a random order; the rest of the segment is filler (0). With `distance=None` (training) each
segment j >= 1 draws its own distance uniformly from 1 .. min(max_distance, j). Facts of the
last segments are never asked (distractors). The label is on the answer only: at the GEN
position (whose next token is the value) the value, -100 elsewhere.

    tokens: 0 filler, 1 SEP, 2 GEN, 3 EOS, symbols [4, vocab_size)

Returns `(inputs, labels, distances)`, int32 `[N, seq_len]`; `distances` is the question's
distance in segments at each labelled position and -1 elsewhere. Train and test sets take
disjoint seeds: `segment_recall_seed(seed, split)`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

IGNORE_INDEX = -100
FILLER, SEP, GEN, EOS = 0, 1, 2, 3
FIRST_SYMBOL = 4
FACT_LEN = 5                      # k1 k2 SEP v EOS (and k1 k2 GEN v EOS)
SPLITS = ("train", "test")

Seed = Union[int, Sequence[int]]


def segment_recall_seed(seed: int, split: str) -> tuple:
    """The seed of split `split` ("train" or "test"): disjoint streams for any integer seed."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return (int(seed), SPLITS.index(split), 0x53524543)  # "SREC"


def check_segment_recall_args(vocab_size: int, seq_len: int, segment_len: int,
                              facts_per_segment: int = 1, distance: Optional[int] = None,
                              max_distance: Optional[int] = None) -> int:
    """ValueError naming the argument (in backquotes) when the settings cannot make a row;
    otherwise the number of segments per row."""
    for name, v in (("vocab_size", vocab_size), ("seq_len", seq_len),
                    ("segment_len", segment_len), ("facts_per_segment", facts_per_segment)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}")
    n = seq_len // segment_len
    if n < 2:
        raise ValueError(f"`seq_len`={seq_len} holds {n} segment(s) of `segment_len`="
                         f"{segment_len}; the task needs at least 2")
    P = facts_per_segment
    if 2 * FACT_LEN * P > segment_len:
        raise ValueError(f"`facts_per_segment`={P} facts and as many questions take "
                         f"{2 * FACT_LEN * P} tokens, more than `segment_len`={segment_len}")
    symbols = vocab_size - FIRST_SYMBOL
    if symbols < 2 or symbols * symbols < n * P:
        raise ValueError(f"`vocab_size`={vocab_size} gives {max(symbols, 0)} symbols, too few "
                         f"for {n * P} distinct 2-symbol keys; need vocab_size >= "
                         f"{FIRST_SYMBOL + max(2, int(np.ceil(np.sqrt(n * P))))}")
    for name, v in (("distance", distance), ("max_distance", max_distance)):
        if v is None:
            continue
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= n - 1:
            raise ValueError(f"`{name}` must be an integer in [1, {n - 1}] (segments per row "
                             f"- 1) or None, got {v!r}")
    return n


def make_segment_recall(num_examples: int, vocab_size: int, seq_len: int, segment_len: int,
                        facts_per_segment: int = 1, distance: Optional[int] = None,
                        max_distance: Optional[int] = None, seed: Seed = 0):
    """`(inputs, labels, distances)` int32 [num_examples, seq_len] (see the module doc).
    `distance`: every question that many segments after its fact; None: drawn per segment,
    uniform in 1 .. min(max_distance, segment index) (max_distance None: n - 1). A pure
    function of the arguments."""
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
        raise ValueError(f"`num_examples` must be a non-negative integer, got {num_examples!r}")
    n = check_segment_recall_args(vocab_size, seq_len, segment_len, facts_per_segment,
                                  distance, max_distance)
    rng = np.random.default_rng(seed)
    N, P, S = int(num_examples), int(facts_per_segment), int(segment_len)
    symbols = vocab_size - FIRST_SYMBOL
    top = n - 1 if max_distance is None else int(max_distance)

    # Distinct keys per row: a random choice of n * P of the symbols² pairs.
    pairs = np.stack([rng.choice(symbols * symbols, n * P, replace=False) for _ in range(N)]) \
        if N else np.zeros((0, n * P), np.int64)
    keys = np.stack([pairs // symbols, pairs % symbols], axis=-1).reshape(N, n, P, 2)
    keys = keys + FIRST_SYMBOL
    values = rng.integers(FIRST_SYMBOL, vocab_size, size=(N, n, P))

    if distance is None:
        # Segment j draws d_j uniform in 1 .. min(top, j); segment 0 asks nothing.
        j = np.arange(n)
        hi = np.minimum(top, j)
        d = 1 + np.floor(rng.random((N, n)) * np.maximum(hi, 1)).astype(np.int64)
        d = np.where(hi >= 1, d, 0)
    else:
        d = np.where(np.arange(n) >= distance, int(distance), 0)[None].repeat(N, axis=0)
    order = np.argsort(rng.random((N, n, P)), axis=-1)   # which fact each question asks

    inputs = np.zeros((N, seq_len), np.int32)
    labels = np.full((N, seq_len), IGNORE_INDEX, np.int32)
    dist = np.full((N, seq_len), -1, np.int32)
    rows = np.arange(N)
    for j in range(n):
        base = j * S
        for p in range(P):
            at = base + FACT_LEN * p
            inputs[:, at:at + 2] = keys[:, j, p]
            inputs[:, at + 2] = SEP
            inputs[:, at + 3] = values[:, j, p]
            inputs[:, at + 4] = EOS
        asked = d[:, j] >= 1
        if not asked.any():
            continue
        src = np.maximum(j - d[:, j], 0)                  # the asked segment (rows that ask)
        for p in range(P):
            at = base + FACT_LEN * (P + p)
            f = order[:, j, p]
            k, v = keys[rows, src, f], values[rows, src, f]
            r = rows[asked]
            inputs[r, at:at + 2] = k[asked]
            inputs[r, at + 2] = GEN
            inputs[r, at + 3] = v[asked]
            inputs[r, at + 4] = EOS
            labels[r, at + 2] = v[asked]
            dist[r, at + 2] = d[asked, j]
    return inputs, labels, dist
