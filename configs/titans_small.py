"""Titans MAL, small: the paper's memory-as-a-layer hybrid (Behrouz et al. 2025, "Titans:
Learning to Memorize at Test Time"): `titans` long-term-memory layers (a depth-2 MLP memory per
head, trained while reading with momentum and forgetting) alternating with sliding-window
attention, at configs/demo.py's scale: 4 layers × 128 wide, 4 heads, byte-level on the built-in
corpus, minutes on a CPU.

    python -m train --config configs/titans_small.py --workdir runs/titans_small

Sequences of 256 bytes are 4 attention windows of 64 long, so what lies further back than the
window reaches a token only through the memory layers. The memory's gradient steps share the
chunk-start memory within `memory_chunk` (8) tokens (pallas_kernels/neural_memory); a linear
memory (`--config.model.mixers.titans.depth=1`) is DeltaNet-like with momentum and forgetting.

lr_max 0.1, not the layer's default 1: the 8 gradients of a chunk are all taken at the
chunk-start memory and summed (then amplified by the momentum), so on repeated keys one chunk
steps about 8·θ/(1 − η) along them, and gradient descent on ½‖M(k) − v‖² with |k| = 1 diverges
past a step of 2. At lr_max 1 some rows of the corpus (repetitive source lines) overflow the
memory to inf at initialisation (5 of the 64 validation rows) and training steps are skipped
as non-finite; lucidrains' titans-pytorch, whose max_lr is 1, takes the mean over the value
dimension in its loss, i.e. a step 2/head_dim times this one (1/16 at head_dim 32). With 0.1 the
300 steps ran with no non-finite step to validation perplexity 4.72 (about 6 minutes on 2
shared CPU cores).

Same size, data and training as brt_small.py and rmt_small.py (tokens per step as demo.py).
"""
from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_config(d_model=128, num_layers=4, num_heads=4, pattern=("titans", "swa"),
                                mixers={"titans": {"depth": 2, "lr_max": 0.1},
                                        "swa": {"window": 64}})
    c.train.update(steps=300, batch_size=8, seq_len=256, log_every=10, eval_every=100,
                   eval_batches=8, checkpoint_every=100)
    c.optim.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)
    c.sample.update(enabled=True, prompt="def ", max_new_tokens=160, temperature=0.7, top_k=20)
    return c
