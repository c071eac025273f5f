"""Properties of the MQAR generator (train.tasks.mqar.make_mqar); numpy only, no JAX compile."""
import subprocess
import sys

import numpy as np
import pytest

from train.tasks.mqar import IGNORE_INDEX, make_mqar, mqar_seed

V, T, P = 128, 64, 8


def _kv(inputs, p):
    return inputs[:, 0:2 * p:2], inputs[:, 1:2 * p:2]


def test_shapes_dtypes():
    x, y = make_mqar(5, V, T, P, seed=0)
    assert x.shape == y.shape == (5, T)
    assert x.dtype == y.dtype == np.int32


@pytest.mark.parametrize("p", [1, 8, 60])   # 60 of 63 keys: the dense sampling path
def test_keys_values_ranges_and_distinct(p):
    x, _ = make_mqar(200, V, 4 * p + 8, p, seed=1)
    keys, values = _kv(x, p)
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    for row in np.concatenate([keys, values], 1):
        assert len(set(row.tolist())) == 2 * p


def test_each_key_queried_once_and_labels_are_values():
    x, y = make_mqar(300, V, T, P, seed=2, random_non_queries=False)
    keys, values = _kv(x, P)
    assert (y[:, :2 * P] == IGNORE_INDEX).all()
    for i in range(len(x)):
        qpos = np.nonzero(y[i] != IGNORE_INDEX)[0]
        assert len(qpos) == P
        assert ((qpos - 2 * P) % 2 == 0).all()          # even slots of the query region
        assert sorted(x[i, qpos].tolist()) == sorted(keys[i].tolist())  # each key once
        lookup = dict(zip(keys[i].tolist(), values[i].tolist()))
        assert [lookup[k] for k in x[i, qpos].tolist()] == y[i, qpos].tolist()
        rest = np.ones(T, bool)
        rest[:2 * P] = False
        rest[qpos] = False
        assert (x[i, rest] == 0).all()                  # nothing else without random_non_queries


def test_random_non_queries_fills_zeros_only():
    a, ya = make_mqar(50, V, T, P, seed=3, random_non_queries=False)
    b, yb = make_mqar(50, V, T, P, seed=3, random_non_queries=True)
    assert (ya == yb).all()
    assert (a[a != 0] == b[a != 0]).all()
    assert (b[a == 0] != 0).mean() > 0.9               # uniform tokens, rarely 0
    assert b.min() >= 0 and b.max() < V


def test_query_positions_skew_early():
    n, t, p = 2000, 256, 4
    _, y_small = make_mqar(n, 512, t, p, power_a=0.01, seed=4)
    _, y_flat = make_mqar(n, 512, t, p, power_a=1.0, seed=4)
    slots = lambda y: (np.nonzero(y != IGNORE_INDEX)[1] - 2 * p) // 2
    space = (t - 2 * p) // 2
    s_small, s_flat = slots(y_small), slots(y_flat)
    assert s_small.min() >= 0 and s_small.max() < space
    # power_a = 1 is uniform: mean slot about space / 2; power_a = 0.01 is heavily front-loaded.
    assert abs(s_flat.mean() - (space - 1) / 2) < 0.05 * space
    assert np.median(s_small) < 0.15 * space
    assert (s_small < space // 4).mean() > 0.6
    # The first slot has weight 1 and slot i ~ i^-0.99: slot 0 is the most frequent.
    counts = np.bincount(s_small, minlength=space)
    assert counts.argmax() == 0


def test_deterministic_per_seed_and_disjoint_splits():
    a = make_mqar(64, V, T, P, seed=7)
    b = make_mqar(64, V, T, P, seed=7)
    c = make_mqar(64, V, T, P, seed=8)
    assert all((u == v).all() for u, v in zip(a, b))
    assert not (a[0] == c[0]).all()
    tr, _ = make_mqar(500, V, T, P, seed=mqar_seed(0, "train"))
    te, _ = make_mqar(500, V, T, P, seed=mqar_seed(0, "test"))
    assert not {r.tobytes() for r in tr} & {r.tobytes() for r in te}
    assert mqar_seed(0, "train") != mqar_seed(0, "test")
    assert len({mqar_seed(s, sp) for s in range(5) for sp in ("train", "test")}) == 10


def test_sequence_seed_and_zero_examples():
    x, _ = make_mqar(3, V, T, P, seed=(5, 11))
    assert x.shape == (3, T)
    x, y = make_mqar(0, V, T, P)
    assert x.shape == y.shape == (0, T)


@pytest.mark.parametrize("kwargs, word", [
    (dict(vocab_size=10, num_kv_pairs=8), "vocab_size"),
    (dict(seq_len=20, num_kv_pairs=8), "seq_len"),
    (dict(power_a=0.0), "power_a"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
])
def test_bad_arguments(kwargs, word):
    args = dict(num_examples=2, vocab_size=V, seq_len=T, num_kv_pairs=P)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        make_mqar(**args)


def test_numpy_only():
    # Data loader workers and eval scripts generate examples without starting JAX. (Its speed is
    # measured by `python -m eval.bench_tasks`.)
    code = ("import sys; from train.tasks.mqar import make_mqar; "
            "make_mqar(1000, 8192, 256, 16, seed=0); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
