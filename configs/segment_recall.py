"""Cross-segment recall (`train.tasks.segment_recall`): rows of 8 segments of 16 tokens; each
segment opens with a fact `k1 k2 SEP v EOS` (2-symbol key, 1-symbol value, 16 symbols: the
ARMT associative-retrieval recipe's) and, from the second segment on, asks `k1 k2 GEN v` about
the fact of a segment 1 .. 7 segments earlier (drawn per segment); the loss is on the answers
only. The model here is ARMT (Rodkin et al. 2024; mem_lm/segments.py) over a 2-layer,
64-wide attention stack: attention never crosses a segment, so an answer can only come through
the associative memories (4 memory tokens write them after each segment).

    python -m train --config configs/segment_recall.py --workdir runs/segment_recall_armt
    python -m eval.segment_recall --out out/segment_recall      (every model, by distance)

`--config.data.distance=3` asks every question exactly 3 segments after its fact.
"""
from configs import base

SEGMENT = 16


def get_config():
    c = base.get_config()
    c.model = base.model_config(
        d_model=64, num_layers=2, num_heads=2, pattern=("attn",),
        segments={"kind": "armt", "length": SEGMENT, "memory_tokens": 4, "bptt": None,
                  "d_mem": 10, "nu": 3, "correction": True})
    c.data.update(source="segment_recall", vocab_size=4 + 16, num_kv_pairs=1,
                  segment_len=SEGMENT, distance=0, max_distance=0)
    c.train.update(steps=2000, batch_size=32, seq_len=8 * SEGMENT, log_every=50,
                   eval_every=500, eval_batches=4, checkpoint_every=1000)
    c.optim.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.01)
    # Synthetic tasks have no text to sample.
    c.sample.enabled = False
    return c
