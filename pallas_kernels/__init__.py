"""Framework-free memory ops (pure functions of arrays): see DESIGN.md, "The op contract".

One folder per op family: reference.py (the recurrence, plain and slow), xla.py (chunked,
jnp, any backend), pallas.py (the kernels, TPU and GPU layouts of the shared math in
pallas_common.py), and the public dispatcher.
"""

from .gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from .linear_attention import linear_attention, linear_attention_step

__all__ = ["linear_attention", "linear_attention_step", "gated_delta_rule",
           "gated_delta_rule_step"]
