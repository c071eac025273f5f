"""A tiny model for tests and smoke runs: well under a second a step on a CPU.

    python -m train --config configs/tiny.py --workdir /tmp/tiny
"""
from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_config(d_model=32, num_layers=2, num_heads=2, pattern=("gdn", "swa"))
    c.train.update(steps=40, batch_size=8, seq_len=32, log_every=1, eval_every=20, eval_batches=2,
                   checkpoint_every=10)
    c.optim.update(learning_rate=1e-2, warmup_steps=5)
    c.logging.progress_bar = False
    return c
