"""Gated DeltaNet, small: 6 layers x 256 wide on the built-in corpus (the recurrent model of the
three `*_small` configs, which share every size and training setting)."""
from configs import base


def small(pattern) -> "base.ConfigDict":
    c = base.get_config()
    c.model = base.model_config(d_model=256, num_layers=6, num_heads=4, pattern=pattern,
                                mixers={"swa": {"window": 128}})
    c.train.update(steps=2000, batch_size=16, seq_len=512, log_every=20, eval_every=250,
                   eval_batches=8, checkpoint_every=250)
    c.optim.update(learning_rate=2e-3, warmup_steps=100)
    c.sample.enabled = True
    return c


def get_config():
    return small(("gdn",))
