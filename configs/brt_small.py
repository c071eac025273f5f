"""Block-Recurrent Transformer, small (Hutchins et al. 2022, "Block-Recurrent Transformers"):
as the paper, one recurrent `brt` layer in a stack of standard layers (here the third of 4
sliding-window-attention layers, 128 wide, 4 heads), at configs/demo.py's scale: byte-level on
the built-in corpus, minutes on a CPU.

    python -m train --config configs/brt_small.py --workdir runs/brt_small

The paper's window and state size (512 and 512, over 4096-token segments) are scaled to the
256-byte sequences here: window W = 64 (the sliding window of the attention layers too) and
S = 64 state vectors, so a sequence is 4 windows and the state is updated after each of the
first three before a later window reads it. The gate is the reference's recommended fixed gate
(`--config.model.mixers.brt.gate=lstm` for the LSTM gate). Same size, data and training as
titans_small.py and rmt_small.py (tokens per step as demo.py).
"""
from configs import base

WINDOW = 64


def get_config():
    c = base.get_config()
    c.model = base.model_config(d_model=128, num_layers=4, num_heads=4,
                                pattern=("swa", "swa", "brt", "swa"),
                                mixers={"brt": {"window": WINDOW, "state_size": WINDOW,
                                                "gate": "fixed"},
                                        "swa": {"window": WINDOW}})
    c.train.update(steps=300, batch_size=8, seq_len=4 * WINDOW, log_every=10, eval_every=100,
                   eval_batches=8, checkpoint_every=100)
    c.optim.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)
    c.sample.update(enabled=True, prompt="def ", max_new_tokens=160, temperature=0.7, top_k=20)
    return c
