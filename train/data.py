"""Training and evaluation data: grain pipelines over random-access sources.

Every example is a pure function of (config, split, index), so any batch can be regenerated and
the iterator's position (a grain iterator state, a small JSON dict) is all a checkpoint needs.

An example is a dict of `[seq_len]` arrays:
    inputs       int32  tokens fed to the model
    targets      int32  next-token targets
    weights      float32 1 where the target counts in the loss, else 0
    segment_ids  int32  1, 2, ... one id per packed document (text); all 1 for synthetic tasks

Sources:
    stdlib        the built-in corpus: the .py files of Python's standard library (found through
                  `sysconfig`, no download), split into train/validation by a hash of the file name
    text          files / directories / globs of text or JSONL (`data.paths`)
    mqar          multi-query associative recall (`train.tasks.mqar.make_mqar`, Zoology's procedure)
    copy          copy a random string after a separator
    assoc_recall  key-value pairs, then queried keys followed by their values
    niah          needle in a haystack on a synthetic vocabulary (`train.tasks.niah.make_niah`)
    segment_recall  key-value facts, asked a set number of segments later
                  (`train.tasks.segment_recall.make_segment_recall`; data.segment_len,
                  data.distance, data.max_distance, data.num_kv_pairs facts per segment)
Text is tokenized (bytes by default, a HF `tokenizers` tokenizer.json as an option),
concatenated and cut into rows of seq_len + 1 tokens; segment ids mark the documents inside a
row, and targets that cross a document boundary get weight 0.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import grain
import numpy as np

from train.tasks.mqar import make_mqar, mqar_seed
from train.tasks.niah import make_niah
from train.tasks.segment_recall import make_segment_recall, segment_recall_seed

SYNTHETIC = ("mqar", "copy", "assoc_recall", "niah", "segment_recall")
_SPLIT_ID = {"train": 0, "val": 1}
_INFINITE = 1 << 40


# ----------------------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """UTF-8 bytes: 256 symbols, no special tokens (documents are separated by segment ids)."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a tokenizer.json (optional dependency)."""

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"data.tokenizer={path!r} needs the `tokenizers` package "
                              f"(pip install tokenizers), or use data.tokenizer='byte'") from e
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist")
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str):
    if spec in ("byte", "bytes", ""):
        return ByteTokenizer()
    return HFTokenizer(spec)


# ----------------------------------------------------------------------------- text sources

def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """The .py files of Python's standard library (no site-packages), sorted."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out)


def expand_paths(paths: str, extensions: str) -> list[str]:
    """Comma-separated files, directories (recursive, filtered by extension) or globs -> files."""
    exts = tuple(e.strip() for e in extensions.split(",") if e.strip())
    files: list[str] = []
    for p in (p.strip() for p in paths.split(",")):
        if not p:
            continue
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(exts))
        elif os.path.isfile(p):
            files.append(p)
        else:
            matched = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not matched:
                raise ValueError(f"{p!r} is not a file, a directory or a glob that matches files")
            files.extend(matched)
    return sorted(dict.fromkeys(files))


def is_val_file(name: str, val_fraction: float) -> bool:
    """Deterministic train/validation split by file name (a CRC32 of the name)."""
    return (zlib.crc32(name.encode()) % 10_000) < val_fraction * 10_000


def read_documents(files: Sequence[str], text_field: str) -> Iterator[str]:
    for f in files:
        if f.endswith(".jsonl"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        yield str(json.loads(line)[text_field])
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield fh.read()


@dataclass
class Corpus:
    """All documents of a split tokenized and concatenated; `starts` are document offsets."""
    tokens: np.ndarray   # [N]: uint8 for the byte tokenizer, int32 otherwise
    starts: np.ndarray   # int64 [num_docs], starts[0] == 0

    @classmethod
    def build(cls, docs: Iterator[str], tokenizer) -> "Corpus":
        pieces = [tokenizer.encode(d) for d in docs]
        pieces = [p for p in pieces if len(p)]
        if not pieces:
            raise ValueError("data: no non-empty documents found")
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.int32
        tokens = np.concatenate(pieces).astype(dtype)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return cls(tokens, starts)


def text_files(data_cfg, split: str) -> list[str]:
    """The files of a split: `val_paths` when given, else `paths` (or the standard library) split
    by a hash of each file's name (relative to the stdlib root, or its base name)."""
    if data_cfg.source == "stdlib":
        root = stdlib_root()
        files = stdlib_files()
        names = [os.path.relpath(f, root) for f in files]
    else:
        if data_cfg.val_paths:
            return expand_paths(data_cfg.val_paths if split == "val" else data_cfg.paths, data_cfg.extensions)
        files = expand_paths(data_cfg.paths, data_cfg.extensions)
        names = [os.path.basename(f) for f in files]
    want_val = split == "val"
    picked = [f for f, n in zip(files, names) if is_val_file(n, data_cfg.val_fraction) == want_val]
    if not picked:
        # Tiny corpora: the first file validates, the rest train (all of it when there is one).
        picked = files[:1] if want_val else (files[1:] or files)
    return picked


class PackedRows:
    """Random access to rows of seq_len+1 consecutive tokens of a corpus (concat-then-split)."""

    def __init__(self, corpus: Corpus, seq_len: int):
        self.corpus, self.seq_len = corpus, seq_len
        self._len = (len(corpus.tokens) - 1) // seq_len
        if self._len < 1:
            raise ValueError(f"data: the corpus has {len(corpus.tokens)} tokens, fewer than one row of "
                             f"train.seq_len + 1 = {seq_len + 1}")

    def __len__(self):
        return self._len

    def __getitem__(self, i: int) -> dict:
        T = self.seq_len
        s = int(i) * T
        tok = self.corpus.tokens[s:s + T + 1].astype(np.int32)
        doc = np.searchsorted(self.corpus.starts, np.arange(s, s + T + 1), side="right")
        seg = (doc - doc[0] + 1).astype(np.int32)
        return dict(inputs=tok[:-1], targets=tok[1:],
                    weights=(seg[1:] == seg[:-1]).astype(np.float32), segment_ids=seg[:-1])


# ----------------------------------------------------------------------------- synthetic tasks

def _example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_ID[split], int(index), 0x5EED])


def _from_labels(inputs: np.ndarray, labels: np.ndarray) -> dict:
    return dict(inputs=inputs.astype(np.int32), targets=np.maximum(labels, 0).astype(np.int32),
                weights=(labels >= 0).astype(np.float32),
                segment_ids=np.ones(inputs.shape, np.int32))


class SyntheticTask:
    """Example `index` of a synthetic memory task, generated from (seed, split, index)."""

    def __init__(self, data_cfg, seq_len: int, seed: int, split: str):
        self.cfg, self.seq_len, self.seed, self.split = data_cfg, seq_len, seed, split

    def __len__(self):
        return _INFINITE

    def __getitem__(self, index: int) -> dict:
        c, T = self.cfg, self.seq_len
        if c.source == "mqar":
            split = "train" if self.split == "train" else "test"
            inputs, labels = make_mqar(1, c.vocab_size, T, c.num_kv_pairs, power_a=c.power_a,
                                       random_non_queries=c.random_non_queries,
                                       seed=(*mqar_seed(self.seed, split), int(index)))
            return _from_labels(inputs[0], labels[0])
        rng = _example_rng(self.seed, self.split, index)
        V = c.vocab_size
        if c.source == "copy":
            # x_1..x_L SEP x_1..x_L pad...; the second copy is predicted.
            L, sep = c.copy_length, 1
            x = rng.integers(2, V, size=L)
            seq = np.zeros(T + 1, np.int64)
            seq[:L], seq[L], seq[L + 1:2 * L + 1] = x, sep, x
            labels = np.full(T, -100, np.int64)
            labels[L:2 * L] = seq[L + 1:2 * L + 1]
            return _from_labels(seq[:-1], labels)
        if c.source == "assoc_recall":
            # k1 v1 ... kn vn, then q1 v(q1) q2 v(q2) ...: the value after each queried key.
            n, half = c.num_kv_pairs, V // 2
            keys = rng.choice(np.arange(1, half), size=n, replace=False)
            vals = rng.choice(np.arange(half, V), size=n, replace=False)
            seq = np.zeros(T + 1, np.int64)
            seq[0:2 * n:2], seq[1:2 * n:2] = keys, vals
            nq = min(n, (T + 1 - 2 * n) // 2)
            q = rng.choice(n, size=nq, replace=False)
            qpos = 2 * n + 2 * np.arange(nq)
            seq[qpos], seq[qpos + 1] = keys[q], vals[q]
            labels = np.full(T, -100, np.int64)
            labels[qpos] = vals[q]
            return _from_labels(seq[:-1], labels)
        if c.source == "niah":
            inputs, labels, _ = make_niah(1, V, T, num_needles=c.num_kv_pairs,
                                          seed=(int(self.seed), _SPLIT_ID[self.split], int(index),
                                                0x4E494148))
            return _from_labels(inputs[0], labels[0])
        if c.source == "segment_recall":
            split = "train" if self.split == "train" else "test"
            inputs, labels, _ = make_segment_recall(
                1, V, T, c.segment_len, c.num_kv_pairs, distance=c.distance or None,
                max_distance=c.max_distance or None,
                seed=(*segment_recall_seed(self.seed, split), int(index)))
            return _from_labels(inputs[0], labels[0])
        raise ValueError(f"data.source: unknown synthetic task {c.source!r}")


# ----------------------------------------------------------------------------- pipelines

def make_source(config, split: str):
    d, T = config.data, config.train.seq_len
    if d.source in SYNTHETIC:
        return SyntheticTask(d, T, config.train.seed, split)
    files = text_files(d, split)
    corpus = Corpus.build(read_documents(files, d.text_field), make_tokenizer(d.tokenizer))
    return PackedRows(corpus, T)


def train_dataset(config, source=None, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Infinite MapDataset of this process's local batches: global batch b holds the examples
    b*B .. b*B+B-1 of the (shuffled, repeated) stream; process p reads every P-th of them."""
    source = source if source is not None else make_source(config, "train")
    ds = grain.MapDataset.source(source)
    if config.data.source not in SYNTHETIC:
        if config.data.shuffle:
            ds = ds.shuffle(seed=config.train.seed)
        ds = ds.repeat(None)
    ds = ds.slice(slice(process_index, None, process_count))
    return ds.batch(config.train.batch_size // process_count, drop_remainder=True)


def make_train_iterator(config, process_index: int = 0, process_count: int = 1, state: dict | None = None,
                        source=None):
    ds = train_dataset(config, source, process_index, process_count)
    n = int(config.data.num_workers)
    opts = grain.ReadOptions(num_threads=n, prefetch_buffer_size=2 * n if n else 0)
    it = iter(ds.to_iter_dataset(read_options=opts))
    if state:
        it.set_state(state)
    return it


def eval_batches(config, process_index: int = 0, process_count: int = 1, source=None) -> list[dict]:
    """A fixed list of `train.eval_batches` local validation batches (spread over the split)."""
    source = source if source is not None else make_source(config, "val")
    B, P = config.train.batch_size, process_count
    n = config.train.eval_batches * B
    if isinstance(source, SyntheticTask):
        idx = np.arange(n)
    else:
        idx = (np.arange(n) * max(1, len(source) // n)) % len(source)
    out = []
    for b in range(config.train.eval_batches):
        rows = idx[b * B:(b + 1) * B][process_index::P]
        ex = [source[int(i)] for i in rows]
        out.append({k: np.stack([e[k] for e in ex]) for k in ex[0]})
    return out
