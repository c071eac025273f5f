"""Titans, small (Behrouz et al. 2025, "Titans: Learning to Memorize at Test Time"), at
configs/demo.py's scale: 4 layers × 128 wide, 4 heads, byte-level on the built-in corpus,
minutes on a CPU. Three variants, chosen after the file name (ml_collections' config argument):

    python -m train --config configs/titans_small.py --workdir runs/titans_mal       # MAL
    python -m train --config configs/titans_small.py:mag --workdir runs/titans_mag   # MAG
    python -m train --config configs/titans_small.py:mac --workdir runs/titans_mac   # MAC

  mal (default)  memory as a layer: `titans` long-term-memory layers (a depth-2 MLP memory per
                 head, trained while reading with momentum and forgetting) alternating with
                 sliding-window attention (window 64): pattern ("titans", "swa");
  mag            memory as a gate: every layer `titans_mag`, sliding-window attention (window
                 64) with 4 persistent memory tokens per head beside the memory, which gates it;
  mac            memory as context: every layer `titans_mac`, segments of 64 tokens, each
                 attending (causally, inside the segment) over 4 persistent tokens, the
                 memory's read-outs and itself; the memory learns from the attention output and
                 gates it.

Sequences of 256 bytes are 4 attention windows (MAC: segments) of 64 long, so what lies
further back than the window reaches a token only through the memory. MAG and MAC put the
memory in every layer where MAL has it in every other one: they are not parameter-matched with
MAL (each of their layers holds an attention and a memory). The memory's gradient steps share
the chunk-start memory within `memory_chunk` (8) tokens (pallas_kernels/neural_memory; MAC
counts chunks from each segment's start); a linear memory (`depth` 1, e.g.
`--config.model.mixers.titans.depth=1`) is DeltaNet-like with momentum and forgetting.

lr_max 0.1, not the layers' default 1: the 8 gradients of a chunk are all taken at the
chunk-start memory and summed (then amplified by the momentum), so on repeated keys one chunk
steps about 8·θ/(1 − η) along them, and gradient descent on ½‖M(k) − v‖² with |k| = 1 diverges
past a step of 2. At lr_max 1 some rows of the corpus (repetitive source lines) overflow the
memory to inf at initialisation (5 of the 64 validation rows) and training steps are skipped
as non-finite; lucidrains' titans-pytorch, whose max_lr is 1, takes the mean over the value
dimension in its loss, i.e. a step 2/head_dim times this one (1/16 at head_dim 32). With 0.1 the
MAL run's 300 steps ran with no non-finite step to validation perplexity 4.72 (about 6 minutes
on 2 shared CPU cores). MAC takes lr_max 0.02: its memory learns from the attention outputs,
whose keys within a segment point much the same way, so a chunk's 8 gradients (and the
momentum's echo of them, about 23·θ at η = 0.8) add up along one direction: at 0.1 a layer's
memory grew from 0.3 to 1e6 within one segment at step 27 of a smoke run and the loss went
non-finite. MAG and MAC have been run for a few dozen steps as smoke tests only (loss falling,
nothing non-finite).

Same size, data and training as brt_small.py and rmt_small.py (tokens per step as demo.py).
"""
from configs import base

VARIANTS = ("mal", "mag", "mac")
MEMORY = {"depth": 2, "lr_max": 0.1}


def get_config(variant: str = "mal"):
    variant = variant or "mal"
    if variant not in VARIANTS:
        raise ValueError(f"configs/titans_small.py: variant must be one of {VARIANTS}, got "
                         f"{variant!r}")
    c = base.get_config()
    pattern, mixers = {
        "mal": (("titans", "swa"), {"titans": MEMORY, "swa": {"window": 64}}),
        "mag": (("titans_mag",), {"titans_mag": {**MEMORY, "window": 64,
                                                  "persistent_tokens": 4}}),
        "mac": (("titans_mac",), {"titans_mac": {**MEMORY, "lr_max": 0.02,
                                                  "segment_length": 64,
                                                  "persistent_tokens": 4}}),
    }[variant]
    c.model = base.model_config(d_model=128, num_layers=4, num_heads=4, pattern=pattern,
                                mixers=mixers)
    c.train.update(steps=300, batch_size=8, seq_len=256, log_every=10, eval_every=100,
                   eval_batches=8, checkpoint_every=100)
    c.optim.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)
    c.sample.update(enabled=True, prompt="def ", max_new_tokens=160, temperature=0.7, top_k=20)
    return c
