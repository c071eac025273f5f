"""eval.perplexity scores each document of a window on its own context: the windows carry
segment ids, and its loss equals an independent computation that runs every document piece
of every window alone (tests/eval/test_scripts.py runs the CLI)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eval import perplexity
from mem_lm import LanguageModel, ModelConfig


def test_windows_carry_document_ids():
    tokens = np.arange(20, dtype=np.int32) + 100
    w, docs = perplexity.windows(tokens, np.array([0, 5, 12]), length=6, count=3)
    np.testing.assert_array_equal(w[:, 0], [100, 106, 113])     # starts 0, 6, 13
    np.testing.assert_array_equal(docs, [[1, 1, 1, 1, 1, 2, 2],
                                         [2, 2, 2, 2, 2, 2, 3],
                                         [3, 3, 3, 3, 3, 3, 3]])


def test_loss_is_each_document_alone(rng):
    L, V = 16, 32
    tokens = rng.integers(0, V, 90).astype(np.int32)
    doc_starts = np.array([0, 7, 30, 31, 50])       # a one-token document at 30
    cfg = ModelConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, pattern=("gdn",),
                      chunk_size=8)
    model = LanguageModel(cfg)
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    # 4 windows in batches of 2: the windows start at 0, 24, 48 and 73.
    r = perplexity.perplexity_at(model, variables, tokens, doc_starts, L, num_tokens=64,
                                 batch_tokens=32)

    # Each run of one document inside a window, alone (zero-padded at the end: causal).
    w, docs = perplexity.windows(tokens, doc_starts, L, 4)
    pieces = []
    for row, d in zip(w, docs):
        for doc in np.unique(d):
            piece = row[d == doc]
            if len(piece) > 1:
                pieces.append(piece)
    batch = np.zeros((len(pieces), L), np.int32)
    for i, p in enumerate(pieces):
        batch[i, :len(p) - 1] = p[:-1]
    logp = jax.nn.log_softmax(jax.jit(model.apply)(variables, jnp.asarray(batch)), -1)
    nll = -sum(float(jnp.sum(logp[i, jnp.arange(len(p) - 1), p[1:]]))
               for i, p in enumerate(pieces))
    n = sum(len(p) - 1 for p in pieces)
    assert n < 4 * L                                 # some targets lie in the next document
    assert r["tokens"] == n and r["windows"] == 4
    assert math.isclose(r["loss"], nll / n, rel_tol=1e-6)
