"""The phonebook generator: distinct keys, values in their range, facts distinct within a row
and labelled at their last key token, and the whole-book rows score every fact once."""
import numpy as np
import pytest

from train.tasks.phonebook import IGNORE_INDEX, all_facts_rows, make_phonebook, phonebook_rows


def facts_of(book):
    return {tuple(k): int(v) for k, v in zip(book.keys.tolist(), book.values)}


def test_rows_hold_distinct_facts_of_the_book(rng):
    book = make_phonebook(50, 8, 20, key_len=2, seed=3)
    assert len(facts_of(book)) == 50 and book.vocab_size == 29
    assert ((book.keys >= 1) & (book.keys <= 8)).all()
    assert ((book.values >= 9) & (book.values < 29)).all()
    np.testing.assert_array_equal(make_phonebook(50, 8, 20, 2, seed=3).values, book.values)
    inputs, labels = phonebook_rows(book, 6, 14, rng)       # 5 facts of 3 tokens (- 1)
    assert inputs.shape == labels.shape == (6, 14)
    table = facts_of(book)
    for row, lab in zip(inputs, labels):
        keys = [tuple(row[i:i + 2]) for i in range(0, 13, 3)]
        assert len(set(keys)) == 5                          # no fact twice in a row
        assert [int(v) for v in lab[lab != IGNORE_INDEX]] == [table[k] for k in keys]
        assert np.flatnonzero(lab != IGNORE_INDEX).tolist() == [1, 4, 7, 10, 13]
        assert [int(row[i]) for i in (2, 5, 8, 11)] == [table[k] for k in keys[:4]]


def test_whole_book_scores_every_fact_once():
    book = make_phonebook(10, 4, 5, seed=0)
    inputs, labels = all_facts_rows(book, 4)
    scored = [(tuple(inputs[r, c - 1:c + 1]), int(labels[r, c]))
              for r, c in zip(*np.nonzero(labels != IGNORE_INDEX))]
    assert sorted(scored) == sorted(facts_of(book).items())


@pytest.mark.parametrize("kw, name", [(dict(num_facts=17, num_names=4), "num_facts"),
                                      (dict(num_numbers=0), "num_numbers")])
def test_bad_arguments_name_them(kw, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make_phonebook(**{**dict(num_facts=4, num_names=4, num_numbers=4), **kw})
