"""Memory+, small: gdn_small.py's size and training, with the middle layer's MLP (layer 3 of 6)
replaced by a `memory_plus` layer: 256² = 65,536 value slots of width 256 (16.8M values), 4
memory heads, top-32, key dim 128 (d_model / 2). The values train in their own optimizer group
as the Memory+ reference code trains them: peak rate 1e-3 under the main warmup + cosine, the
main weight decay, their gradients clipped apart (optim.memory_values, configs/base.py).

The 2025 paper's reference memory (Berges et al., "Memory Layers at Scale") is n_keys 1024
(1,048,576 slots), shared by 3 memory layers of 24 (4, 12 and 20):

    python -m train --config configs/memory_small.py --config.model.num_layers=24 \\
        --config.model.channel_pattern="('swiglu',)*4 + ('memory_plus',) + ('swiglu',)*3" \\
        --config.model.mixers.memory_plus.n_keys=1024
"""
from configs.gdn_small import small


def get_config():
    c = small(("gdn",))
    c.model.channel_pattern = ("swiglu",) * 3 + ("memory_plus",) + ("swiglu",) * 2
    c.model.mixers.memory_plus.n_keys = 256
    return c
