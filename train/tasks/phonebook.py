"""Phonebook recall: a large fixed dictionary of key -> value facts, learned in the weights.

The generator needs only numpy (`eval.phonebook` trains and scores models on it).

`make_phonebook` draws `num_facts` distinct keys, each `key_len` tokens from the name range
[1, 1 + num_names), and one value per key, uniform over the number range
[1 + num_names, 1 + num_names + num_numbers) (token 0 is unused). The book is fixed by its
seed. `phonebook_rows` writes rows of whole facts `k_1 .. k_key_len v` back to back, each fact
at most once per row, so a value can only be recalled from the weights, never copied from the
context; the label at a fact's last key token is its value (the next-token target), -100
elsewhere. `all_facts_rows` covers every fact of the book exactly once (the accuracy is then
the fraction of the book the model recalls).
"""
from __future__ import annotations

import dataclasses

import numpy as np

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Phonebook:
    keys: np.ndarray        # [F, key_len] int32
    values: np.ndarray      # [F] int32
    vocab_size: int

    @property
    def fact_len(self) -> int:
        return self.keys.shape[1] + 1


def make_phonebook(num_facts: int, num_names: int, num_numbers: int, key_len: int = 2,
                   seed: int = 0) -> Phonebook:
    for name, v in (("num_facts", num_facts), ("num_names", num_names),
                    ("num_numbers", num_numbers), ("key_len", key_len)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}")
    if num_facts > num_names ** key_len:
        raise ValueError(f"`num_facts`={num_facts} distinct keys do not fit in num_names ** "
                         f"key_len = {num_names} ** {key_len}")
    rng = np.random.default_rng((seed, 0x50484F4E))   # "PHON"
    codes = rng.choice(num_names ** key_len, size=num_facts, replace=False)
    digits = (codes[:, None] // num_names ** np.arange(key_len)[::-1]) % num_names
    values = 1 + num_names + rng.integers(0, num_numbers, num_facts)
    return Phonebook((1 + digits).astype(np.int32), values.astype(np.int32),
                     1 + num_names + num_numbers)


def _rows(book: Phonebook, facts: np.ndarray) -> tuple:
    """[R, n] fact indices -> (inputs [R, n·fact_len - 1], labels of the same shape)."""
    R, n = facts.shape
    L = book.fact_len
    seq = np.concatenate([book.keys[facts], book.values[facts][..., None]], axis=-1)
    seq = seq.reshape(R, n * L)
    labels = np.full((R, n * L), IGNORE_INDEX, np.int32)
    labels[:, L - 2::L] = seq[:, L - 1::L]
    return seq[:, :-1], labels[:, :-1]


def phonebook_rows(book: Phonebook, num_rows: int, seq_len: int, rng: np.random.Generator):
    """(inputs, labels) [num_rows, seq_len]: random facts, distinct within a row."""
    n = (seq_len + 1) // book.fact_len
    if not 1 <= n <= len(book.values):
        raise ValueError(f"`seq_len`={seq_len} must hold 1 to {len(book.values)} facts of "
                         f"{book.fact_len} tokens (one token less for the last)")
    facts = np.argsort(rng.random((num_rows, len(book.values))), axis=1)[:, :n]
    inputs, labels = _rows(book, facts)
    pad = seq_len - inputs.shape[1]
    return (np.pad(inputs, ((0, 0), (0, pad))),
            np.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX))


def all_facts_rows(book: Phonebook, facts_per_row: int):
    """(inputs, labels) covering every fact once, `facts_per_row` facts a row (the last row
    padded with facts of the first)."""
    F = len(book.values)
    rows = -(-F // facts_per_row)
    order = np.arange(rows * facts_per_row) % F
    inputs, labels = _rows(book, order.reshape(rows, facts_per_row))
    scored = labels != IGNORE_INDEX
    # The padding facts (repeats of the first ones) are not scored twice.
    repeat = scored & (np.cumsum(scored).reshape(labels.shape) > F)
    return inputs, np.where(repeat, IGNORE_INDEX, labels)
