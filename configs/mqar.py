"""Multi-query associative recall (Zoology's MQAR, `eval.mqar.make_mqar`): 2 mixer-only layers,
sequence length 256 with 16 key-value pairs, vocabulary 8192. Change the mixer with
`--config.model.pattern="('attn',)"` (or la, retnet, gla, deltanet, swa, ...).

    python -m train --config configs/mqar.py --workdir runs/mqar_gdn
"""
from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_config(d_model=64, num_layers=2, num_heads=2, pattern=("gdn",),
                                use_mlp=False, window=32)
    c.data.update(source="mqar", vocab_size=8192, num_kv_pairs=16, power_a=0.01,
                  random_non_queries=True)
    c.train.update(steps=1500, batch_size=64, seq_len=256, log_every=25, eval_every=250,
                   eval_batches=4, checkpoint_every=500)
    c.optim.update(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1)
    return c
