"""Data pipelines: packing with segment ids, the deterministic split, iterator state, per-process
shards, synthetic tasks from (seed, index)."""
import json

import numpy as np
import pytest

from configs.tiny import get_config
from train import data as D


def _cfg(**data):
    c = get_config()
    c.data.update(**data)
    c.train.update(seq_len=16, batch_size=4, eval_batches=2)
    return c


def test_packing_marks_documents_and_masks_cross_document_targets():
    tok = D.ByteTokenizer()
    corpus = D.Corpus.build(iter(["abc", "defgh", "ij"]), tok)
    rows = D.PackedRows(corpus, seq_len=4)
    assert len(rows) == 2  # 10 tokens -> (10 - 1) // 4 rows of 5
    r0, r1 = rows[0], rows[1]
    assert bytes(r0["inputs"].astype(np.uint8)) == b"abcd" and bytes(r0["targets"].astype(np.uint8)) == b"bcde"
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 2])
    np.testing.assert_array_equal(r0["weights"], [1, 1, 0, 1])   # "c" -> "d" crosses a boundary
    np.testing.assert_array_equal(r1["segment_ids"], [1, 1, 1, 1])  # "efgh", renumbered from 1
    np.testing.assert_array_equal(r1["weights"], [1, 1, 1, 0])      # "h" -> "i" crosses


def test_stdlib_split_is_deterministic_and_disjoint():
    d = _cfg().data
    train, val = D.text_files(d, "train"), D.text_files(d, "val")
    assert train and val and not set(train) & set(val)
    assert D.text_files(d, "val") == val
    assert 0.005 < len(val) / (len(train) + len(val)) < 0.05


def test_text_sources_files_dirs_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# title\n" * 20)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 10}) for i in range(5)))
    files = D.expand_paths(f"{tmp_path}/sub,{tmp_path}/*.txt,{tmp_path / 'c.jsonl'}", ".md,.txt")
    assert [f.split("/")[-1] for f in files] == ["a.txt", "c.jsonl", "b.md"]  # sorted paths
    docs = list(D.read_documents(files, "text"))
    assert len(docs) == 7 and docs[1] == "doc 0 " * 10
    c = _cfg(source="text", paths=str(tmp_path), val_paths=str(tmp_path / "a.txt"))
    batch = next(D.make_train_iterator(c))
    assert batch["inputs"].shape == (4, 16) and batch["segment_ids"].max() >= 1
    with pytest.raises(ValueError, match="is not a file"):
        D.expand_paths(str(tmp_path / "missing*.txt"), ".txt")


def test_iterator_state_resumes_exactly():
    c = _cfg()
    it = D.make_train_iterator(c)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expect = [next(it) for _ in range(2)]
    it2 = D.make_train_iterator(c, state=json.loads(json.dumps(state)))
    for e in expect:
        got = next(it2)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])


@pytest.mark.parametrize("source", ["stdlib", "mqar"])
def test_process_shards_partition_the_global_batch(source):
    c = _cfg(source=source, vocab_size=64, num_kv_pairs=4)
    src = D.make_source(c, "train")
    whole = next(D.make_train_iterator(c, source=src))["inputs"]
    parts = [next(D.make_train_iterator(c, p, 2, source=src))["inputs"] for p in range(2)]
    assert parts[0].shape == (2, 16)
    key = lambda a: sorted(map(bytes, a.astype(np.int32)))
    assert key(np.concatenate(parts)) == key(whole)


def test_synthetic_tasks_are_functions_of_seed_and_index():
    for source in ("mqar", "copy", "assoc_recall"):
        c = _cfg(source=source, vocab_size=64, num_kv_pairs=4, copy_length=5)
        a, b = D.SyntheticTask(c.data, 16, 0, "train"), D.SyntheticTask(c.data, 16, 0, "train")
        np.testing.assert_array_equal(a[7]["inputs"], b[7]["inputs"])
        assert not np.array_equal(a[7]["inputs"], a[8]["inputs"])
        v = D.SyntheticTask(c.data, 16, 0, "val")
        assert not np.array_equal(a[7]["inputs"], v[7]["inputs"])
        ex = a[3]
        assert ex["weights"].sum() > 0
        if source == "mqar":
            continue  # (MQAR's values are not repeated after the query)
        # where a target is weighted it is the next input token (teacher forcing)
        w = ex["weights"][:-1] > 0
        np.testing.assert_array_equal(ex["targets"][:-1][w], ex["inputs"][1:][w])


def test_mqar_source_matches_the_task_generator():
    from train.tasks.mqar import make_mqar, mqar_seed
    c = _cfg(source="mqar", vocab_size=64, num_kv_pairs=4)
    ex = D.SyntheticTask(c.data, 16, 3, "train")[5]
    inputs, labels = make_mqar(1, 64, 16, 4, seed=(*mqar_seed(3, "train"), 5))
    np.testing.assert_array_equal(ex["inputs"], inputs[0])
    np.testing.assert_array_equal(ex["weights"] > 0, labels[0] >= 0)
