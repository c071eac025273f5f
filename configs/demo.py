"""What `make demo` trains: a small Gated DeltaNet + sliding-window-attention hybrid on the
built-in corpus (the source of Python's standard library, byte-level), a few minutes on 2 CPU
cores. Prints a progress bar, the validation perplexity, a generated sample, and where the
TensorBoard logs and checkpoints are.

    python -m train --config configs/demo.py --workdir runs/demo
"""
from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_config(d_model=128, num_layers=4, num_heads=4, pattern=("gdn", "swa"),
                                mixers={"swa": {"window": 64}}, chunk_size=32)
    c.train.update(steps=300, batch_size=16, seq_len=128, log_every=10, eval_every=100,
                   eval_batches=8, checkpoint_every=100)
    c.optim.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)
    c.sample.update(enabled=True, prompt="def ", max_new_tokens=160, temperature=0.7, top_k=20)
    return c
