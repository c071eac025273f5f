"""Needle placement of the NIAH generators (train.tasks.niah); numpy only."""
import numpy as np
import pytest

from train.tasks.niah import (IGNORE_INDEX, NEEDLE, QUERY, make_niah, make_passkey, niah_vocab)

V, T = 64, 100


def test_synthetic_layout_and_label():
    x, y, pos = make_niah(50, V, T, depth=None, seed=0)
    voc = niah_vocab(V)
    assert x.shape == y.shape == (50, T) and x.dtype == y.dtype == np.int32
    rows = np.arange(50)
    assert (x[rows, pos] == NEEDLE).all()
    key, val = x[rows, pos + 1], x[rows, pos + 2]
    assert ((key >= voc["keys"][0]) & (key < voc["keys"][1])).all()
    assert ((val >= voc["values"][0]) & (val < voc["values"][1])).all()
    assert (x[:, -2] == QUERY).all() and (x[:, -1] == key).all()
    assert (y[:, -1] == val).all() and (y[:, :-1] == IGNORE_INDEX).all()
    # everything else is filler
    filler = np.ones_like(x, bool)
    filler[rows, pos] = filler[rows, pos + 1] = filler[rows, pos + 2] = False
    filler[:, -2:] = False
    lo, hi = voc["filler"]
    assert ((x[filler] >= lo) & (x[filler] < hi)).all()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_synthetic_depth(depth):
    _, _, pos = make_niah(8, V, T, depth=depth, seed=1)
    free = T - 2 - 3
    assert (pos == round(depth * free)).all()
    assert pos.max() + 3 <= T - 2          # never overlaps the query


def test_synthetic_distractors_do_not_overlap_and_keys_distinct():
    x, y, pos = make_niah(200, V, T, depth=0.5, num_needles=4, seed=2)
    for i in range(len(x)):
        starts = np.nonzero(x[i, :-2] == NEEDLE)[0]
        assert len(starts) == 4 and (np.diff(starts) >= 3).all()
        keys = x[i, starts + 1]
        assert len(set(keys.tolist())) == 4
        # the queried needle is the one at `pos` and the query asks for its key
        assert x[i, -1] == x[i, pos[i] + 1] and y[i, -1] == x[i, pos[i] + 2]


def test_synthetic_determinism_and_errors():
    a = make_niah(4, V, T, seed=3)
    b = make_niah(4, V, T, seed=3)
    assert all((u == v).all() for u, v in zip(a, b))
    with pytest.raises(ValueError, match="depth"):
        make_niah(1, V, T, depth=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        make_niah(1, V, 4)
    with pytest.raises(ValueError, match="vocab_size"):
        make_niah(1, 8, T)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey(depth):
    L = 300
    x, y, pos = make_passkey(3, L, depth=depth, seed=4)
    assert x.shape == y.shape == (3, L)
    for i in range(3):
        text = bytes(x[i].astype(np.uint8)).decode()
        digits = bytes(y[i][y[i] != IGNORE_INDEX].astype(np.uint8)).decode()
        assert len(digits) == 5 and digits.isdigit()
        assert f"The pass key is {digits}. Remember it." in text
        assert text.index("The pass key is") == pos[i]
        assert text.endswith("What is the pass key? The pass key is " + digits[:-1])
        # labels are the next tokens of the digits
        lab = np.nonzero(y[i] != IGNORE_INDEX)[0]
        assert (lab == np.arange(L - 5, L)).all()
        assert (y[i, lab[:-1]] == x[i, lab[1:]]).all()
    # the needle sits near the requested depth (at a sentence boundary)
    assert abs(pos[0] / (L - 90) - depth) < 0.35
    with pytest.raises(ValueError, match="seq_len"):
        make_passkey(1, 50)


def test_niah_config_feeds_the_trainer_data():
    # configs/niah.py resolves and the trainer's data source yields needles (no compile).
    from configs import niah
    from train import data as tdata
    from train.config import ConfigError, resolve

    c = resolve(niah.get_config())
    assert c.model.vocab_size == c.data.vocab_size
    src = tdata.make_source(c, "train")
    ex = src[5]
    assert ex["inputs"].shape == (c.train.seq_len,)
    assert ex["weights"].sum() == 1 and ex["weights"][-1] == 1
    assert ex["inputs"][-2] == QUERY and (ex["inputs"] == NEEDLE).sum() >= c.data.num_kv_pairs
    assert (src[5]["inputs"] == ex["inputs"]).all()                  # (seed, index) -> example
    assert not (tdata.make_source(c, "val")[5]["inputs"] == ex["inputs"]).all()
    bad = niah.get_config()
    bad.data.num_kv_pairs = 100
    with pytest.raises(ConfigError, match="data.num_kv_pairs"):
        resolve(bad)
