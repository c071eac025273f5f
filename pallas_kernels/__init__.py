"""Framework-free memory ops (pure functions of arrays): see DESIGN.md, "The op contract".

One folder per op family: reference.py (the recurrence, plain and slow), xla.py (chunked,
jnp, any backend), pallas_tpu.py / pallas_gpu.py (kernels), and the public dispatcher.
"""
