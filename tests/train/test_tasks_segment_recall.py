"""The cross-segment recall generator (train.tasks.segment_recall) and its data source; numpy
only (the data source test builds a config, no model)."""
import numpy as np
import pytest

from train.tasks.segment_recall import (EOS, FACT_LEN, FIRST_SYMBOL, GEN, IGNORE_INDEX, SEP,
                                        check_segment_recall_args, make_segment_recall,
                                        segment_recall_seed)

V, S, N_SEG, P = 20, 12, 6, 1
T = S * N_SEG + 3                  # a remainder of filler at the end


def facts_of(x, seg_len, P):
    """{key (k1, k2): (value, segment)} of every fact in row x, read back from the layout."""
    out = {}
    for j in range(len(x) // seg_len):
        for p in range(P):
            a = j * seg_len + FACT_LEN * p
            assert x[a + 2] == SEP and x[a + 4] == EOS
            out[(x[a], x[a + 1])] = (x[a + 3], j)
    return out


@pytest.mark.parametrize("distance", [1, 3, 5])
def test_every_answer_is_its_fact_value_at_the_distance_asked(distance):
    P = 2
    seg_len = 2 * FACT_LEN * P + 1
    x, y, d = make_segment_recall(40, V, seg_len * N_SEG, seg_len, P, distance=distance, seed=0)
    assert x.shape == y.shape == d.shape == (40, seg_len * N_SEG) and x.dtype == np.int32
    for i in range(len(x)):
        facts = facts_of(x[i], seg_len, P)
        assert len(facts) == N_SEG * P                          # distinct keys
        labelled = np.nonzero(y[i] != IGNORE_INDEX)[0]
        # P questions in each segment from `distance` on, each at its GEN token.
        assert len(labelled) == (N_SEG - distance) * P
        asked = set()
        for t in labelled:
            assert x[i, t] == GEN and x[i, t + 1] == y[i, t]     # the answer follows GEN
            value, seg = facts[(x[i, t - 2], x[i, t - 1])]
            assert y[i, t] == value and t // seg_len - seg == distance == d[i, t]
            asked.add((x[i, t - 2], x[i, t - 1]))
        # every fact of the asked segments is asked once
        assert len(asked) == len(labelled)
        assert (d[i][y[i] == IGNORE_INDEX] == -1).all()
        assert ((x[i] == 0) | (x[i] >= 1)).all() and x[i].max() < V


def test_random_distances_cover_the_range_and_keys_use_the_symbols():
    x, y, d = make_segment_recall(300, V, T, S, 1, distance=None, max_distance=3, seed=1)
    got = d[y != IGNORE_INDEX]
    assert set(got.tolist()) == {1, 2, 3}
    # Segment j asks with a distance <= j: segment 1 always 1; each question's fact is there.
    for i in range(20):
        facts = facts_of(x[i, :S * N_SEG], S, 1)
        for t in np.nonzero(y[i] != IGNORE_INDEX)[0]:
            value, seg = facts[(x[i, t - 2], x[i, t - 1])]
            assert y[i, t] == value and t // S - seg == d[i, t] <= min(3, t // S)
    keys = x[:, 0:2]
    assert keys.min() >= FIRST_SYMBOL and keys.max() < V
    assert (x[:, S * N_SEG:] == 0).all()                        # the remainder is filler


def test_deterministic_and_seeds_disjoint():
    a = make_segment_recall(5, V, T, S, seed=segment_recall_seed(0, "train"))
    b = make_segment_recall(5, V, T, S, seed=segment_recall_seed(0, "train"))
    c = make_segment_recall(5, V, T, S, seed=segment_recall_seed(0, "test"))
    assert all((u == v).all() for u, v in zip(a, b))
    assert not (a[0] == c[0]).all()


@pytest.mark.parametrize("kw, msg", [
    (dict(seq_len=S), "`seq_len`=12 holds 1 segment"),
    (dict(segment_len=9, facts_per_segment=1), "`facts_per_segment`=1 facts and as many"),
    (dict(vocab_size=6), "`vocab_size`=6 gives 2 symbols"),
    (dict(distance=N_SEG), "`distance` must be an integer in [1, 5]"),
    (dict(max_distance=0), "`max_distance` must be an integer in [1, 5]"),
])
def test_errors_name_the_argument(kw, msg):
    args = dict(vocab_size=V, seq_len=T, segment_len=S, facts_per_segment=1)
    with pytest.raises(ValueError) as e:
        check_segment_recall_args(**{**args, **kw})
    assert msg in str(e.value), str(e.value)


def test_data_source(tmp_path):
    """data.source = segment_recall through the pipeline: segment_len 0 takes the model's
    segment length; targets / weights only at the answers; errors name the data field."""
    from configs import base
    from train import data as data_lib
    from train.config import ConfigError, resolve

    c = base.get_config()
    c.model = base.model_config(d_model=16, num_layers=1, num_heads=2, pattern=("attn",),
                                segments={"kind": "armt", "length": S, "memory_tokens": 2})
    c.data.update(source="segment_recall", vocab_size=V, num_kv_pairs=1, distance=2)
    c.train.update(seq_len=T, batch_size=2)
    r = resolve(c, num_devices=1)
    assert r.data.segment_len == S and r.model.vocab_size == V
    ex = data_lib.make_source(r, "train")[3]
    x, y, _ = make_segment_recall(1, V, T, S, 1, distance=2,
                                  seed=(*segment_recall_seed(r.train.seed, "train"), 3))
    np.testing.assert_array_equal(ex["inputs"], x[0])
    np.testing.assert_array_equal(ex["weights"], (y[0] != IGNORE_INDEX).astype(np.float32))
    np.testing.assert_array_equal(ex["targets"][y[0] != IGNORE_INDEX], y[0][y[0] != IGNORE_INDEX])
    assert ex["weights"].sum() == N_SEG - 2
    c.model.segments = None
    with pytest.raises(ConfigError, match="config.data.segment_len: 0 takes"):
        resolve(c, num_devices=1)
    c.data.segment_len = S
    c.data.distance = N_SEG
    with pytest.raises(ConfigError, match=r"config.data.distance: .*\[1, 5\]"):
        resolve(c, num_devices=1)
