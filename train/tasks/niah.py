"""Needle-in-a-haystack data, numpy only: the training data pipeline (`train.data`) and the
evaluation (`eval.niah`) both import it from here.

Two flavours:

* synthetic vocabulary (`make_niah`), small enough for small models to learn: filler tokens
  drawn uniformly from their own range, needles `NEEDLE key value` hidden in the filler, and at
  the end `QUERY key` whose next-token target (the label at the key position) is the value;
* text passkey (`make_passkey`) for byte-level language models: the classic "The pass key is
  NNNNN. Remember it." in repeated filler sentences, then "What is the pass key? The pass key is"
  followed by the digits as labelled targets.

Both return `(inputs, labels)` int32 `[N, seq_len]` with -100 where there is nothing to predict,
and `needle_pos` int `[N]`: where the (queried) needle starts, for checking placement. `depth`
in [0, 1] puts the needle at that fraction of the haystack (0 = the very start, 1 = just before
the question); `depth=None` draws it uniformly (training).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from train.tasks.mqar import _distinct_uniform

IGNORE_INDEX = -100
NEEDLE, QUERY = 1, 2          # marker tokens of the synthetic task
_FIRST = 4                    # 0 pad, 1 needle, 2 query, 3 reserved

Seed = Union[int, Sequence[int]]


def niah_vocab(vocab_size: int) -> dict:
    """Token ranges of the synthetic task: keys, values and filler, each [lo, hi)."""
    n = (vocab_size - _FIRST) // 4
    if n < 2:
        raise ValueError(f"`vocab_size` must be at least {_FIRST + 8} for the NIAH task, "
                         f"got {vocab_size}")
    return {"keys": (_FIRST, _FIRST + n), "values": (_FIRST + n, _FIRST + 2 * n),
            "filler": (_FIRST + 2 * n, vocab_size)}


def _positions(rng, n: int, span: int, depth: Optional[float]) -> np.ndarray:
    if depth is None:
        return rng.integers(0, span + 1, size=n)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depth` must be in [0, 1] or None, got {depth!r}")
    return np.full(n, int(round(depth * span)), dtype=np.int64)


def make_niah(num_examples: int, vocab_size: int, seq_len: int, depth: Optional[float] = None,
              num_needles: int = 1, seed: Seed = 0):
    """Synthetic-vocabulary needles: `(inputs, labels, needle_pos)`.

    Layout: filler, with `num_needles` needles `NEEDLE k v` (distinct keys, non-overlapping),
    then `QUERY k` for the first needle as the last two tokens; the label at the last position is
    its value. The queried needle sits at `depth` of the haystack; the others (distractors) at
    random places.
    """
    if num_examples < 0:
        raise ValueError(f"`num_examples` must be >= 0, got {num_examples}")
    if num_needles < 1:
        raise ValueError(f"`num_needles` must be >= 1, got {num_needles}")
    voc = niah_vocab(vocab_size)
    hay = seq_len - 2                                   # tokens before the query
    if hay < 3 * num_needles:
        raise ValueError(f"`seq_len`={seq_len} is too short for {num_needles} needle(s): "
                         f"need at least {3 * num_needles + 2}")
    nkeys = voc["keys"][1] - voc["keys"][0]
    if num_needles > nkeys:
        raise ValueError(f"`num_needles`={num_needles} exceeds the {nkeys} distinct keys of "
                         f"`vocab_size`={vocab_size}")
    rng = np.random.default_rng(seed)
    n = int(num_examples)
    inputs = rng.integers(*voc["filler"], size=(n, seq_len)).astype(np.int32)
    keys = _distinct_uniform(rng, n, *voc["keys"], num_needles)
    values = rng.integers(*voc["values"], size=(n, num_needles))

    # Needles never overlap: the haystack is `free` filler tokens plus num_needles 3-token
    # needles. Needle j goes after offs[j] filler tokens; the queried needle's offset is `depth`
    # of the filler, the distractors' are uniform. Its start is its offset plus 3 per needle
    # placed before it (ties: the queried one first).
    free = hay - 3 * num_needles
    offs = np.concatenate([_positions(rng, n, free, depth)[:, None],
                           rng.integers(0, free + 1, size=(n, num_needles - 1))], axis=1)
    rank = np.argsort(np.argsort(offs, axis=1, kind="stable"), axis=1)
    starts = offs + 3 * rank
    rows = np.arange(n)[:, None]
    inputs[rows, starts] = NEEDLE
    inputs[rows, starts + 1] = keys
    inputs[rows, starts + 2] = values
    inputs[:, -2] = QUERY
    inputs[:, -1] = keys[:, 0]
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    labels[:, -1] = values[:, 0]
    return inputs, labels, starts[:, 0]


# ----------------------------------------------------------------------------- text passkey
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
QUESTION = "What is the pass key? The pass key is "


def _encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def make_passkey(num_examples: int, seq_len: int, depth: Optional[float] = None,
                 digits: int = 5, seed: Seed = 0):
    """Byte-level passkey retrieval: `(inputs, labels, needle_pos)` (bytes 0..255).

    The haystack is the filler text repeated; the needle sentence is inserted at a sentence
    boundary nearest to `depth`; the question and the answer digits end the sequence, the
    digits being the labelled targets (the label of position t is the token at t + 1).
    """
    rng = np.random.default_rng(seed)
    filler = _encode(FILLER)
    sentence_ends = np.nonzero(filler == ord(" "))[0]
    sentence_ends = sentence_ends[np.isin(sentence_ends - 1, np.nonzero(filler == ord("."))[0])] + 1
    inputs = np.zeros((num_examples, seq_len), dtype=np.int32)
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int32)
    pos = np.zeros(num_examples, dtype=np.int64)
    for i in range(num_examples):
        key = "".join(str(d) for d in rng.integers(0, 10, size=digits))
        key = str(rng.integers(1, 10)) + key[1:]
        needle = _encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
        tail = np.concatenate([_encode(QUESTION), _encode(key)])
        # the sequence is haystack + tail, shifted: inputs = seq[:-1] so the last digit is a label
        hay_len = seq_len + 1 - len(tail) - len(needle)
        if hay_len < 0:
            raise ValueError(f"`seq_len`={seq_len} is too short for the passkey task: need at "
                             f"least {len(tail) + len(needle)}")
        reps = hay_len // len(filler) + 2
        hay = np.tile(filler, reps)[:hay_len]
        # cut at a sentence boundary near the requested depth
        want = hay_len * (rng.random() if depth is None else depth)
        bounds = np.concatenate([[0], (np.arange(reps)[:, None] * len(filler)
                                       + sentence_ends[None]).ravel(), [hay_len]])
        bounds = bounds[bounds <= hay_len]
        cut = int(bounds[np.abs(bounds - want).argmin()])
        seq = np.concatenate([hay[:cut], needle, hay[cut:], tail])
        inputs[i] = seq[:-1]
        ans = np.arange(seq_len - digits, seq_len)
        labels[i, ans] = seq[ans + 1]
        pos[i] = cut
    return inputs, labels, pos
