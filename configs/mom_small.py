"""Mixture-of-Memories, small: gdn_small.py's size and training with `mom` token mixers (4
memories, top-2, a shared memory: the registry's defaults).

The paper's 340M reference configuration (Du et al., "Linear Sequence Modeling with
Mixture-of-Memories") is d_model 1024, 24 layers, 4 heads × 256, 4 memories, top-2, shared
memory on:

    python -m train --config configs/mom_small.py --config.model.d_model=1024 \\
        --config.model.num_layers=24 --config.model.num_heads=4

Here that counts 531M parameters (byte vocabulary; `mem_lm.param_count`), 22M per layer: the
four memories' and the shared memory's own k, v, β and decay projections (2.1M each) and the
SwiGLU MLP (8.4M); a token uses the projections of 3 of the 5 memories. The paper calls this
configuration 340M; how it counts is not reproduced here.
"""
from configs.gdn_small import small


def get_config():
    return small(("mom",))
