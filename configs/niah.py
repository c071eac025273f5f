"""Needle in a haystack on a synthetic vocabulary (`train.tasks.niah.make_niah`), small enough for
small models on a CPU: filler tokens, needles `NEEDLE key value` (one queried, the rest
distractors: `data.num_kv_pairs` needles in all), and `QUERY key` at the end, whose next token
is the value. Train at 128 tokens, then test at up to 8x that with `eval.niah`:

    python -m train --config configs/niah.py --workdir runs/niah_gdn
    python -m eval.niah --checkpoint runs/niah_gdn --out out/niah
    python -m eval.niah --config configs/niah.py --patterns gdn hybrid attn --out out/niah

Change the mixers with `--config.model.pattern="('attn',)"`.
"""
from configs import base


def get_config():
    c = base.get_config()
    mixers = base.every_token_mixer(short_conv=True)
    mixers["swa"]["window"] = 32
    c.model = base.model_config(d_model=64, num_layers=2, num_heads=2, pattern=("gdn",),
                                mixers=mixers)
    c.data.update(source="niah", vocab_size=128, num_kv_pairs=2)
    c.train.update(steps=1500, batch_size=32, seq_len=128, log_every=25, eval_every=250,
                   eval_batches=8, checkpoint_every=500)
    # The language-model optimiser defaults suit the recurrent models here (gdn: 0.95 retrieval
    # at step 1000; at lr 1e-3 without decay or clipping it stays at chance). The README's
    # attention run used lr 1e-3 without decay or clipping, b2 0.999 (--override).
    c.optim.update(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1)
    return c
