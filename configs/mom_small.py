"""Mixture-of-Memories, small: gdn_small.py's size and training with `mom` token mixers (4
memories, top-2, a shared memory: the registry's defaults).

The paper's 340M reference configuration (Du et al., "Linear Sequence Modeling with
Mixture-of-Memories") is d_model 1024, 24 layers, 4 heads × 256, 4 memories, top-2, shared
memory on:

    python -m train --config configs/mom_small.py --config.model.d_model=1024 \\
        --config.model.num_layers=24 --config.model.num_heads=4

The reference code's model config (OpenSparseLLMs/MoM, training/configs/mom.json) adds
hidden_ratio 3 (a SwiGLU MLP 2048 wide), vocabulary 32,000 and tied embeddings
(`--config.model.mixers.swiglu.d_ff=2048 --config.model.vocab_size=32000`); with those,
`mem_lm.param_count` gives 512M parameters for mom and 310M for the same model with gdn mixers.
The "340M" is the size class of the dense Gated DeltaNet it is compared with: MoM adds its four
routed memories' own k, v, β and decay projections (2.1M each, 8.4M per layer, 202M in all;
the shared memory's take the place of gdn's), of which a token uses two.

The layer is fla's MomAttention / MomForCausalLM by default in its load balance (one loss over
all layers' routers, weight 0.01 = fla's aux_loss_scale) and its initialisation; q's short conv
runs over the row, the paper's one q per token (`--config.model.mixers.mom.q_conv_per_memory=True`
for fla's per-memory q conv, which its checkpoints need).
"""
from configs.gdn_small import small


def get_config():
    return small(("mom",))
