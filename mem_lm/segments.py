"""Segment recurrence around the whole block stack: the Recurrent Memory Transformer (RMT,
Bulatov et al. 2022; reference: booydar/recurrent-memory-transformer,
modeling_rmt/language_modeling.py, MemoryCell + RecurrentWrapper).

`ModelConfig(segments={"kind": "rmt", "length": S, "memory_tokens": m, "bptt": k})`:

- a learned memory M0 [m, d] (the parameter `segment_memory`, initialised N(0, init_std) as
  the reference's randn · std(embedding));
- the input [B, T] is cut into n = ceil(T / S) segments of S tokens (the last one padded at its
  end; the padding comes after every real token, so under the causal mask no real token sees
  it, and the memory it writes is never read);
- each segment runs the block stack (any `pattern`; every mixer starts fresh per segment, as the
  reference's backbone is called once per segment) on [read memory (m); segment (S);
  write memory (m)] under the usual causal mask, with positions 0 .. 2m+S-1 in every segment
  (the reference passes no position ids, so the backbone numbers each call from 0);
- the next segment's memory is the stack's output after the final norm at the write positions
  (the reference's `hidden_states[-1]`, which Hugging Face models return after their final
  norm); logits come from the segment positions only;
- all segments run in one `nn.scan` with the memory as carry (compile time does not grow with
  n), the parameters broadcast.

`bptt` (the reference's `k2`): None = full backpropagation through every memory transition.
An int k keeps the gradient through the last k transitions of the input only: the memory
entering segment i (1 <= i < n) is `stop_gradient`ed when i < n - k. So the last segment's loss
reaches exactly k segments back (zero beyond), and no loss reaches a segment before n - k - 1
through the memory. M0 entering segment 0 always gets its gradient. (The reference's
`manage_gradients` detaches a local variable, which has no effect; its stated condition keeps
the memory written by segment s when s == 0 or s + k2 > max_n_segments. The earlier
`truncated_backward` of the same file backpropagates the final loss through the last k2 memory
states, which is the rule built here.)

Packed rows (`segment_ids`): the memory resets to M0 at every segment whose first token starts
a document. Inside a segment the read memory carries the id of the segment's first token and
the write memory that of its last token, so attention and the recurrent mixers never mix
documents. A document that starts mid-segment therefore reads no memory until the next segment
(not M0) and its segment boundaries are offset from a separate run's: packed equals separate
exactly only where every document starts at a multiple of S.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import init


class _SegmentStep(nn.Module):
    """One segment: (memory [B, m, d], segment inputs) -> (next memory, hidden [B, S, d])."""
    cfg: object
    n: int          # number of segments (static)

    @nn.compact
    def __call__(self, mem, xs, m0, shared):
        from mem_lm.model import Stack
        cfg = self.cfg
        s = cfg.segment_settings
        m, S, k = s["memory_tokens"], s["length"], s["bptt"]
        seg, i, ids, reset = xs
        if k is not None:
            detach = (i >= 1) & (i < self.n - k)
            mem = jnp.where(detach, jax.lax.stop_gradient(mem), mem)
        if reset is not None:
            mem = jnp.where(reset[:, None, None], m0[None].astype(mem.dtype), mem)
        h = jnp.concatenate([mem, seg, mem], axis=1)
        positions = jnp.arange(2 * m + S, dtype=jnp.int32)[None]
        ext_ids = None
        if ids is not None:
            ext_ids = jnp.concatenate([jnp.repeat(ids[:, :1], m, axis=1), ids,
                                       jnp.repeat(ids[:, -1:], m, axis=1)], axis=1)
        stack = Stack(cfg, name="stack")
        nn.share_scope(self, stack)
        out, _ = stack(h, positions, ext_ids, None, None, shared)
        return out[:, m + S:], out[:, m:m + S]


def segment_forward(parent: nn.Module, cfg, x, segment_ids, shared):
    """The normed hidden states [B, T, d] of embeddings x [B, T, d] under segment recurrence
    (called by LanguageModel inside its compact __call__; parameters in its scope)."""
    from mem_lm.model import AUX_COLLECTIONS
    s = cfg.segment_settings
    S, m = s["length"], s["memory_tokens"]
    B, T, d = x.shape
    n = -(-T // S)
    m0 = parent.param("segment_memory", init(cfg.init_std, (None, "embed")), (m, d),
                      jnp.float32)
    pad = n * S - T
    xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(B, n, S, d).swapaxes(0, 1)
    ids = reset = None
    if segment_ids is not None:
        full = jnp.pad(segment_ids, ((0, 0), (0, pad)), mode="edge")
        ids = full.reshape(B, n, S).swapaxes(0, 1)                       # [n, B, S]
        prev_last = jnp.concatenate([ids[:1, :, 0], ids[:-1, :, -1]], axis=0)  # [n, B]
        reset = (ids[:, :, 0] != prev_last).at[0].set(True)
    Scan = nn.scan(_SegmentStep, variable_broadcast="params",
                   split_rngs={"params": False},
                   variable_axes={c: 0 for c in AUX_COLLECTIONS},
                   in_axes=(0, nn.broadcast, nn.broadcast), length=n)
    step = Scan(cfg, n, name="segment_scan")
    nn.share_scope(parent, step)
    mem0 = jnp.broadcast_to(m0.astype(x.dtype)[None], (B, m, d))
    _, hs = step(mem0, (xs, jnp.arange(n, dtype=jnp.int32), ids, reset), m0, shared)
    return hs.swapaxes(0, 1).reshape(B, n * S, d)[:, :T]
