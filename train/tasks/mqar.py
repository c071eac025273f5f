"""Multi-query associative recall (MQAR), the recall benchmark of Zoology (Arora et al., 2023).

The generator, `make_mqar`, needs only numpy: the training data pipeline (`train.data`) and the
evaluation (`eval.mqar`, `eval.mqar_sweep`) both import it from here.

For each example (one row):

1. `num_kv_pairs` distinct keys drawn uniformly from `[1, vocab_size // 2)` and as many distinct
   values from `[vocab_size // 2, vocab_size)`, written interleaved `k1 v1 k2 v2 ...` at the start.
2. The rest of the sequence has `(seq_len - 2 * num_kv_pairs) // 2` even slots. One distinct slot
   per key is chosen with probability proportional to `i ** (power_a - 1)` for slot i = 1, 2, ...
   (successive sampling without replacement, as `np.random.choice(..., replace=False, p=...)`),
   so most queries come soon after the key-value block; each key is put once at its slot.
3. The full sequence (key-value block + query region) has `seq_len + 1` tokens; the inputs are
   its first `seq_len`, the label at a position holding a queried key is that key's value (the
   next-token target) and -100 everywhere else.
4. With `random_non_queries`, every remaining 0 in the inputs becomes a uniform random token.

Train and test sets must use disjoint seeds: `mqar_seed(seed, "train")` / `mqar_seed(seed,
"test")` give two streams that never coincide for any integer `seed`.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

IGNORE_INDEX = -100
SPLITS = ("train", "test")

Seed = Union[int, Sequence[int]]

# Rows are generated in blocks so that memory stays bounded for any num_examples.
_BLOCK_ELEMENTS = 1 << 22


def mqar_seed(seed: int, split: str) -> tuple:
    """The seed of split `split` ("train" or "test") for a user seed: disjoint by construction."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return (int(seed), SPLITS.index(split), 0x4D514152)  # "MQAR"


def check_mqar_args(vocab_size: int, seq_len: int, num_kv_pairs: int,
                    power_a: float = 0.01) -> None:
    """ValueError naming the argument when the MQAR settings cannot produce a valid example."""
    for name, v in (("vocab_size", vocab_size), ("seq_len", seq_len),
                    ("num_kv_pairs", num_kv_pairs)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}")
    half = vocab_size // 2
    if num_kv_pairs > half - 1:
        raise ValueError(
            f"`num_kv_pairs`={num_kv_pairs} distinct keys do not fit in the key range "
            f"[1, {half}) of `vocab_size`={vocab_size}; need vocab_size >= {2 * (num_kv_pairs + 1)}")
    if num_kv_pairs > vocab_size - half:
        raise ValueError(f"`num_kv_pairs`={num_kv_pairs} distinct values do not fit in "
                         f"[{half}, {vocab_size})")
    space = (seq_len - 2 * num_kv_pairs) // 2
    if space < num_kv_pairs:
        raise ValueError(
            f"`seq_len`={seq_len} is too short for `num_kv_pairs`={num_kv_pairs}: the key-value "
            f"block takes {2 * num_kv_pairs} tokens and the query region needs {num_kv_pairs} even "
            f"slots; need seq_len >= {4 * num_kv_pairs}")
    if not np.isfinite(power_a) or power_a <= 0:
        raise ValueError(f"`power_a` must be a positive number, got {power_a!r}")


def _distinct_uniform(rng: np.random.Generator, n: int, low: int, high: int,
                      k: int) -> np.ndarray:
    """[n, k] int64: per row, k distinct integers drawn uniformly (ordered) from [low, high)."""
    r = high - low
    out = np.empty((n, k), dtype=np.int64)
    if k * (k - 1) / (2 * r) < 0.5:
        # Rejection: iid draws, redraw the rows with a repeat. Uniform over ordered distinct tuples.
        out[:] = rng.integers(low, high, size=(n, k))
        todo = np.arange(n)
        while todo.size:
            s = np.sort(out[todo], axis=1)
            bad = todo[(s[:, 1:] == s[:, :-1]).any(axis=1)] if k > 1 else todo[:0]
            if bad.size:
                out[bad] = rng.integers(low, high, size=(bad.size, k))
            todo = bad
        return out
    # Dense case: the k smallest of r iid uniforms, in increasing order, is a uniform ordered
    # sample without replacement.
    rows = max(1, _BLOCK_ELEMENTS // r)
    for s in range(0, n, rows):
        u = rng.random((min(rows, n - s), r), dtype=np.float32)
        idx = np.argpartition(u, k - 1, axis=1)[:, :k] if k < r else np.tile(np.arange(r), (len(u), 1))
        order = np.argsort(np.take_along_axis(u, idx, axis=1), axis=1)
        out[s:s + len(u)] = low + np.take_along_axis(idx, order, axis=1)
    return out


def _weighted_slots(rng: np.random.Generator, n: int, space: int, k: int,
                    power_a: float) -> np.ndarray:
    """[n, k] int64 distinct slot indices in [0, space), slot i (0-based) with weight
    (i + 1) ** (power_a - 1), drawn by successive sampling without replacement.

    Vectorised with the Gumbel-top-k trick: the top k of log(w) + Gumbel noise, in decreasing
    order, has the law of sequential weighted sampling without replacement.
    """
    logw = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    out = np.empty((n, k), dtype=np.int64)
    rows = max(1, _BLOCK_ELEMENTS // space)
    for s in range(0, n, rows):
        m = min(rows, n - s)
        score = logw - np.log(-np.log(rng.random((m, space))))
        idx = np.argpartition(-score, k - 1, axis=1)[:, :k] if k < space else \
            np.tile(np.arange(space), (m, 1))
        order = np.argsort(-np.take_along_axis(score, idx, axis=1), axis=1)
        out[s:s + m] = np.take_along_axis(idx, order, axis=1)
    return out


def make_mqar(num_examples: int, vocab_size: int, seq_len: int, num_kv_pairs: int,
              power_a: float = 0.01, random_non_queries: bool = True,
              seed: Seed = 0) -> tuple[np.ndarray, np.ndarray]:
    """MQAR examples: `(inputs, labels)`, both int32 `[num_examples, seq_len]`.

    `labels` is -100 except at the positions holding a queried key, where it is that key's value.
    `seed` is an int or a sequence of ints (e.g. `mqar_seed(seed, "test")` or `(seed, index)`);
    the output is a pure function of the arguments.
    """
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
        raise ValueError(f"`num_examples` must be a non-negative integer, got {num_examples!r}")
    check_mqar_args(vocab_size, seq_len, num_kv_pairs, power_a)
    rng = np.random.default_rng(seed)
    n, p = int(num_examples), int(num_kv_pairs)
    half = vocab_size // 2
    context = 2 * p
    space = (seq_len - context) // 2

    keys = _distinct_uniform(rng, n, 1, half, p)
    values = _distinct_uniform(rng, n, half, vocab_size, p)
    slots = _weighted_slots(rng, n, space, p, power_a)

    inputs = np.zeros((n, seq_len), dtype=np.int32)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    qpos = context + 2 * slots                      # < seq_len, since slots < space
    np.put_along_axis(inputs, qpos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    np.put_along_axis(labels, qpos, values, axis=1)

    if random_non_queries:
        noise = rng.integers(0, vocab_size, size=inputs.shape, dtype=np.int32)
        inputs = np.where(inputs == 0, noise, inputs)
    return inputs, labels
