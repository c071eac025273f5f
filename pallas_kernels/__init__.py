"""Framework-free memory ops (pure functions of arrays): see DESIGN.md, "The op contract".

One folder per op family: reference.py (the recurrence, plain and slow), xla.py (chunked,
jnp, any backend), pallas.py (the kernels), and the public dispatcher; `common` holds what every
family shares. The chunked-scan machinery of the recurrent families is the `scan` package
(chunk math, chunk-parallel kernels, each backend's sequential pass, phases + custom_vjp).

Context parallelism (`scan/context_parallel.py`): `linear_attention` and `gated_delta_rule` take
`context_axis=` (a mesh axis name). Called inside `jax.shard_map` with T split contiguously
over that axis, initial_state and cu_seqlens (global offsets) replicated, each device returns
its slice of o and every device the state after the whole sequence, equal (with gradients) to
the unsharded op; every impl and gate, packed documents included. The devices exchange only
state maps, N·H·K·(K+V) floats each (an all-gather, plus a psum for the final state), never
tokens; the local op runs at value width V + K. `context_parallel` explains the method.
"""

from .gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from .linear_attention import linear_attention, linear_attention_step
from .neural_memory import neural_memory, neural_memory_read, neural_memory_step

__all__ = ["linear_attention", "linear_attention_step", "gated_delta_rule",
           "gated_delta_rule_step", "neural_memory", "neural_memory_read",
           "neural_memory_step"]
