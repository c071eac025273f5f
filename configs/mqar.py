"""Multi-query associative recall (Zoology's MQAR, `train.tasks.mqar.make_mqar`): 2 mixer-only layers,
sequence length 256 with 16 key-value pairs, vocabulary 8192, q/k/v short convs on every mixer
(as `eval.mqar_sweep` runs it). Change the mixer with `--config.model.pattern="('attn',)"` (or
la, retnet, gla, deltanet, swa, ...).

    python -m train --config configs/mqar.py --workdir runs/mqar_gdn
"""
from configs import base


def get_config():
    c = base.get_config()
    mixers = base.every_token_mixer(short_conv=True)
    mixers["swa"]["window"] = 32
    c.model = base.model_config(d_model=64, num_layers=2, num_heads=2, pattern=("gdn",),
                                channel_pattern=("none",), mixers=mixers)
    c.data.update(source="mqar", vocab_size=8192, num_kv_pairs=16, power_a=0.01,
                  random_non_queries=True)
    c.train.update(steps=1000, batch_size=64, seq_len=256, log_every=25, eval_every=250,
                   eval_batches=4, checkpoint_every=500)
    # The language-model optimiser (weight decay 0.1, clipping 1.0, b2 0.95) at lr 1e-2: with
    # short convs on every mixer, all of them learn MQAR under it in 1000 steps at 64/8 (attn
    # 1.00, gdn 0.92; README, MQAR). At lr 2e-3 attention stays on the plateau (0.11).
    c.optim.update(learning_rate=1e-2, warmup_steps=100)
    return c
