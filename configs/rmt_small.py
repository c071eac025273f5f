"""Recurrent Memory Transformer, small (Bulatov et al. 2022, "Recurrent Memory Transformer";
mem_lm/segments.py), and its associative variant ARMT (Rodkin et al. 2024): a 4-layer, 128-wide softmax-attention transformer (4 heads) that reads each
256-byte sequence as 4 segments of 64 bytes, carrying 8 memory vectors from one segment to the
next (each segment runs the stack on [8 read-memory; 64 bytes; 8 write-memory]), at
configs/demo.py's scale: byte-level on the built-in corpus, minutes on a CPU.

    python -m train --config configs/rmt_small.py --workdir runs/rmt_small         # RMT
    python -m train --config configs/rmt_small.py:armt --workdir runs/armt_small   # ARMT

ARMT keeps the same segments and memory tokens and adds, in every layer, an associative matrix
written from the memory positions with a delta rule and read by every token (its settings
d_mem, nu, correction at mem_lm/config.py's defaults); its memory tokens are write-only.

Attention never crosses a segment boundary, so everything a token knows of earlier segments
came through the memory. Gradients flow through every memory transition (bptt None: 4 segments
are cheap to backpropagate through); `--config.model.segments.bptt=1` keeps only the last one,
as the reference's k2. Same size, data and training as titans_small.py and brt_small.py (tokens
per step as demo.py).
"""
from configs import base

SEGMENT = 64


KINDS = ("rmt", "armt")


def get_config(kind: str = "rmt"):
    kind = kind or "rmt"
    if kind not in KINDS:
        raise ValueError(f"configs/rmt_small.py: kind must be one of {KINDS}, got "
                         f"{kind!r}")
    c = base.get_config()
    c.model = base.model_config(d_model=128, num_layers=4, num_heads=4, pattern=("attn",),
                                segments={"kind": kind, "length": SEGMENT, "memory_tokens": 8,
                                          "bptt": None})
    c.train.update(steps=300, batch_size=8, seq_len=4 * SEGMENT, log_every=10, eval_every=100,
                   eval_batches=8, checkpoint_every=100)
    c.optim.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)
    c.sample.update(enabled=True, prompt="def ", max_new_tokens=160, temperature=0.7, top_k=20)
    return c
