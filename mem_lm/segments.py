"""Segment recurrence around the whole block stack: the Recurrent Memory Transformer (RMT,
Bulatov et al. 2022; reference: booydar/recurrent-memory-transformer,
modeling_rmt/language_modeling.py, MemoryCell + RecurrentWrapper) and the Associative Recurrent
Memory Transformer (ARMT, Rodkin et al. 2024; reference:
RodkinIvan/associative-recurrent-memory-transformer, modeling_amt/language_modeling.py,
AssociativeLayerWrapper + AssociativeMemoryCell + AssociativeRecurrentWrapper).

RMT
---

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

ARMT
----
`ModelConfig(segments={"kind": "armt", "length": S, "memory_tokens": m, "bptt": k,
"d_mem": r, "nu": nu, "correction": True})`:

- each segment runs the block stack on [segment (S); memory tokens (m)] with positions
  0 .. S+m-1 (the reference's AssociativeMemoryCell.process_input appends the learned `memory`
  after the segment; the associative-retrieval scripts keep wrap_pos False, so the backbone
  numbers them on from the segment). The memory tokens are the same learned M [m, d]
  (`segment_memory`) in every segment: nothing is carried in them; they are write-only (no
  read-memory tokens at the start), and logits come from the segment positions;
- every layer l keeps an associative matrix A_l [2·nu·r, d] and normaliser z_l [2·nu·r],
  zero at the start (AssociativeLayerWrapper.zero_mem); with phi = DPFP of order nu
  (`dpfp`: [relu(x), relu(-x)] times its rolls by 1 .. nu):
    read (before the layer, every token of the segment and the memory tokens, from the second
    segment on; AssociativeLayerWrapper.associate):
        x_t <- x_t + (phi(W_mq x_t) A_l) / (z_l · phi(W_mq x_t) + 1e-5)
    write (after the layer, from its outputs y_j at the m memory positions; update_mem):
        k_j = phi(W_mk y_j), v_j = W_mv y_j (W_mv initialised to zero), b_j = sigmoid(W_mb y_j)
        prev_j = (k_j A_l) / (z_l · k_j + 1e-5)            (0 in the first segment)
        gamma_j = clip(1 - (z_l · k_j + 1e-5) / (|k_j|² + 1e-5), 0, 1), no gradient
                                                             (1 in the first segment, and
                                                              without `correction`)
        A_l <- A_l + sum_j b_j k_j (v_j - prev_j)ᵀ,   z_l <- z_l + sum_j gamma_j k_j
  All m memory tokens write against the same A_l (one parallel delta step, not a token-by-token
  delta rule), so the write is a few [m, 2·nu·r] x [2·nu·r, d] matmuls (`associative_write`):
  pallas_kernels.gated_delta_rule would update A after each token and compute another
  function, and neither it nor linear_attention has the z normaliser of the read; at m ~ 10
  the matmuls cost nothing next to the layer.
- the per-layer (A, z) are the carry of the segment scan (laid out as the decode cache: a list
  over layers, or stacked over groups under scan_layers); `bptt` cuts the gradient of the
  carry exactly as for RMT (the reference's wrapper never detaches).
- packed rows: A, z reset to zero at a segment whose first token starts a document; inside a
  segment only the tokens of the segment's first document read the memory, and when another
  document starts inside the segment, the write starts from an empty memory (as a first
  segment), so no document reads another's memory.

Decoding
--------
`mem_lm.prefill` / `decode_step` / `generate` (and `model.apply(..., cache=cache)`) decode both
kinds. The cache (`init_segment_cache`, what `mem_lm.init_cache` returns for these configs):

    {"pos":    int32 scalar, tokens seen (the offset in the current segment is pos % S),
     "memory": rmt: the read memory of the current segment [B, m, d] (compute dtype; at pos 0
               the cache holds zeros and M0 is used); armt: every layer's {A, z}, laid out as
               the segment scan's carry (a list over layers, stacked over groups under
               scan_layers),
     "layers": the block stack's ordinary decode cache for the current segment only, sized for
               2m + S (rmt) or S + m (armt) tokens, whatever max_len}

so generation holds O(S + m) tokens of cache (plus the memory) at any length. A segment's
prefix in "layers" is [read memory; the segment's tokens so far] (rmt; the read memory is fed
with the segment's first token) or [the segment's tokens so far] (armt, every layer reading its
A, z before the block), at the positions the forward gives them (rmt: m + i; armt: i). When a
token completes its segment's S tokens, the write pass runs once: rmt feeds the write memory
tokens (the same read memory) at positions m + S .. 2m + S - 1 and the final-norm outputs there
are the next memory; armt feeds the memory tokens M at S .. S + m - 1 and every layer writes
its A, z from its outputs there (a first write in segment 0). Then "layers" is reset to an empty
cache. A call with a traced position runs one token at a time (the write pass under lax.cond;
several tokens: a lax.scan of such steps); a call whose position is concrete when traced (a
prefill from `init_cache`, which keeps "pos" a NumPy scalar) runs the rest of the current
segment through the cache, whole segments by the training forward's segment scan (which
returns the memory), and a last partial segment through the fresh cache. Decoding equals the
full forward (tested to float32 rounding, prompts ending inside a segment and on a boundary,
generation across boundaries). A decode row holds one document: packed rows (`segment_ids`)
are for the full forward only.

Replay (`"replay": True`, both kinds): each segment step runs under jax.checkpoint, so the
backward pass stores only the carry entering each segment (the memory; ARMT's A, z) and the
segment inputs, and recomputes one segment's activations at a time: activation memory
O(one segment) + O(n · memory) instead of O(n segments). Gradients are those of full
backpropagation (the same function; tested).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from layers.common import Dense, init

EPS = 1e-5      # the reference's 1e-5 in every denominator


# ----------------------------------------------------------------------------- ARMT's rules
def dpfp(x, nu: int):
    """Deterministic parameter-free projection (Schlag et al. 2021) as the reference's DPFP:
    x [..., r] -> [..., 2 · nu · r], x2 = [relu(x), relu(-x)], out = [x2]*nu ⊙ [roll(x2, 1),
    ..., roll(x2, nu)] (torch.roll's direction: out[i] = x2[i - j]). Non-negative."""
    x2 = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
    rolled = jnp.concatenate([jnp.roll(x2, j, axis=-1) for j in range(1, nu + 1)], axis=-1)
    return jnp.concatenate([x2] * nu, axis=-1) * rolled


def associative_read(q, A, z):
    """(q A) / (z · q + 1e-5): q [B, T, K] key features, A [B, K, d], z [B, K] -> [B, T, d]
    (the reference's AssociativeLayerWrapper.associate)."""
    num = jnp.einsum("btk,bkd->btd", q, A)
    den = jnp.einsum("bk,btk->bt", z, q)[..., None] + EPS
    return num / den


def associative_write(k, v, beta, A, z, first, correction: bool = True):
    """One segment's write of m memory tokens (the reference's update_mem): k [B, m, K] key
    features, v [B, m, d], beta [B, m] in (0, 1), A [B, K, d], z [B, K], first [B] bool (an
    empty memory: no previous value, gamma 1) -> (A, z)."""
    num = jnp.einsum("bmk,bkd->bmd", k, A)
    den = jnp.einsum("bk,bmk->bm", z, k)[..., None] + EPS
    f = first[:, None, None]
    prev = jnp.where(f, 0.0, num / den)
    if correction:
        gamma = jnp.clip(1.0 - den / (jnp.sum(k * k, axis=-1, keepdims=True) + EPS), 0.0, 1.0)
        gamma = jnp.where(f, 1.0, jax.lax.stop_gradient(gamma))
    else:
        gamma = jnp.ones_like(den)
    A = A + jnp.einsum("bmk,bmd,bm->bkd", k, v - prev, beta)
    z = z + jnp.sum(gamma * k, axis=1)
    return A, z


def _torch_linear_init(key, shape, dtype=jnp.float32):
    """torch.nn.Linear's default (kaiming_uniform with a = sqrt(5)): U(±1/sqrt(fan_in)), the
    fan-in being the first dim (for a bias, pass the layer's fan-in as its shape's first)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def armt_key_dim(cfg) -> int:
    s = cfg.segment_settings
    return 2 * s["nu"] * s["d_mem"]


class AssociativeMemory(nn.Module):
    """One layer's associative memory (the reference's AssociativeLayerWrapper): `read` before
    the layer, `write` after it. The state {A [B, K, d], z [B, K]} is float32; `ctx` holds
    `first` [B] (the write is onto an empty memory), `fresh` [B] (a document starts inside this
    segment: the write starts from an empty memory) and `read_mask` [B, T] or None (which tokens
    read: those of the segment's first document)."""
    cfg: object

    def setup(self):
        cfg = self.cfg
        s = cfg.segment_settings
        d, r = cfg.d_model, s["d_mem"]
        self.nu, self.m, self.correction = s["nu"], s["memory_tokens"], s["correction"]
        lin = lambda n, axes: Dense((n,), axes, cfg.init_std, jnp.float32,
                                    kernel_init=_torch_linear_init)
        self.W_mq = lin(r, ("embed", None))
        self.W_mk = lin(r, ("embed", None))
        self.W_mv = Dense((d,), ("embed", None), cfg.init_std, jnp.float32,
                          kernel_init=nn.initializers.zeros)      # the reference zero-inits it
        self.W_mb = lin(1, ("embed", None))
        self.W_mb_bias = self.param(
            "W_mb_bias", nn.with_logical_partitioning(
                lambda key, shape, dtype=jnp.float32: _torch_linear_init(key, (d,), dtype)[:1],
                (None,)), (1,),
            jnp.float32)

    def read(self, x, state, ctx):
        q = dpfp(self.W_mq(x.astype(jnp.float32)), self.nu)
        y = associative_read(q, state["A"], state["z"])
        if ctx["read_mask"] is not None:
            y = jnp.where(ctx["read_mask"][..., None], y, 0.0)
        return x + y.astype(x.dtype)

    def write(self, x, state, ctx):
        mem = x[:, x.shape[1] - self.m:].astype(jnp.float32)
        k = dpfp(self.W_mk(mem), self.nu)
        v = self.W_mv(mem)
        beta = jax.nn.sigmoid(self.W_mb(mem)[..., 0] + self.W_mb_bias[0])
        fresh = ctx["fresh"][:, None]
        A = jnp.where(fresh[..., None], 0.0, state["A"])
        z = jnp.where(fresh, 0.0, state["z"])
        A, z = associative_write(k, v, beta, A, z, ctx["first"], self.correction)
        return {"A": A, "z": z}


def armt_initial_state(cfg, batch: int):
    """Every layer's empty associative memory, laid out as Stack's `assoc` argument."""
    K, d = armt_key_dim(cfg), cfg.d_model
    if cfg.scan_layers:
        one = {"A": jnp.zeros((cfg.num_groups, batch, K, d), jnp.float32),
               "z": jnp.zeros((cfg.num_groups, batch, K), jnp.float32)}
        return [one] * cfg.group_size
    one = {"A": jnp.zeros((batch, K, d), jnp.float32), "z": jnp.zeros((batch, K), jnp.float32)}
    return [one] * cfg.num_layers


# ----------------------------------------------------------------------------- the scan
class _SegmentStep(nn.Module):
    """One segment: (carry, segment inputs) -> (next carry, hidden [B, S, d]). The carry is the
    memory [B, m, d] (rmt) or every layer's {A, z} (armt)."""
    cfg: object
    n: int          # number of segments (static)

    @nn.compact
    def __call__(self, carry, xs, m0, shared):
        from mem_lm.model import Stack
        cfg = self.cfg
        s = cfg.segment_settings
        m, S, k = s["memory_tokens"], s["length"], s["bptt"]
        seg, i, ids, reset = xs
        B = seg.shape[0]
        if k is not None:
            detach = (i >= 1) & (i < self.n - k)
            carry = jax.tree.map(lambda a: jnp.where(detach, jax.lax.stop_gradient(a), a),
                                 carry)
        stack = Stack(cfg, name="stack")
        nn.share_scope(self, stack)
        if s["kind"] == "armt":
            if reset is not None:
                carry = jax.tree.map(
                    lambda a: jnp.where(reset.reshape(_batch_shape(cfg, a)), 0.0, a), carry)
                first = reset | (i == 0)
            else:
                first = jnp.broadcast_to(i == 0, (B,))
            mem = jnp.broadcast_to(m0.astype(seg.dtype)[None], (B, m, seg.shape[-1]))
            h = jnp.concatenate([seg, mem], axis=1)
            positions = jnp.arange(S + m, dtype=jnp.int32)[None]
            ext_ids = read_mask = None
            fresh = jnp.zeros((B,), bool)
            if ids is not None:
                ext_ids = jnp.concatenate([ids, jnp.repeat(ids[:, -1:], m, axis=1)], axis=1)
                read_mask = ext_ids == ids[:, :1]
                fresh = ids[:, 0] != ids[:, -1]
            ctx = {"first": first | fresh, "fresh": fresh, "read_mask": read_mask}
            out, carry = stack(h, positions, ext_ids, None, None, shared, carry, ctx)
            return carry, out[:, :S]
        mem = carry
        if reset is not None:
            mem = jnp.where(reset[:, None, None], m0[None].astype(mem.dtype), mem)
        h = jnp.concatenate([mem, seg, mem], axis=1)
        positions = jnp.arange(2 * m + S, dtype=jnp.int32)[None]
        ext_ids = None
        if ids is not None:
            ext_ids = jnp.concatenate([jnp.repeat(ids[:, :1], m, axis=1), ids,
                                       jnp.repeat(ids[:, -1:], m, axis=1)], axis=1)
        out, _ = stack(h, positions, ext_ids, None, None, shared)
        return out[:, m + S:], out[:, m:m + S]


def _batch_shape(cfg, a):
    """The shape that broadcasts a per-row [B] flag over a carry leaf `a` (its batch axis is
    the first, or the second under scan_layers, where the groups come first)."""
    lead = 1 if cfg.scan_layers else 0
    return (1,) * lead + (a.shape[lead],) + (1,) * (a.ndim - lead - 1)


def segment_forward(parent: nn.Module, cfg, x, segment_ids, shared):
    """The normed hidden states [B, T, d] of embeddings x [B, T, d] under segment recurrence
    (called by LanguageModel inside its compact __call__; parameters in its scope)."""
    return segment_scan(parent, cfg, x, segment_ids, shared)[0]


def segment_scan(parent: nn.Module, cfg, x, segment_ids, shared, carry0=None, i0: int = 0):
    """(hidden states [B, T, d], the carry after the last segment) of embeddings x from the carry
    `carry0` (None: M0, or ARMT's empty memories); `i0` is the index of x's first segment in
    the row (ARMT's first write is onto an empty memory; bptt counts from it)."""
    from mem_lm.model import AUX_COLLECTIONS
    s = cfg.segment_settings
    S, m = s["length"], s["memory_tokens"]
    B, T, d = x.shape
    n = -(-T // S)
    if m > 0:
        m0 = parent.param("segment_memory", init(cfg.init_std, (None, "embed")), (m, d),
                          jnp.float32)
    else:       # rmt without memory: the segment-local baseline
        m0 = jnp.zeros((0, d), jnp.float32)
    pad = n * S - T
    xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(B, n, S, d).swapaxes(0, 1)
    ids = reset = None
    if segment_ids is not None:
        full = jnp.pad(segment_ids, ((0, 0), (0, pad)), mode="edge")
        ids = full.reshape(B, n, S).swapaxes(0, 1)                       # [n, B, S]
        prev_last = jnp.concatenate([ids[:1, :, 0], ids[:-1, :, -1]], axis=0)  # [n, B]
        reset = (ids[:, :, 0] != prev_last).at[0].set(True)
    step_cls = _SegmentStep
    if s["replay"]:
        # Memory-replay backprop: the backward recomputes each segment from its carry.
        step_cls = nn.remat(_SegmentStep, prevent_cse=False)
    Scan = nn.scan(step_cls, variable_broadcast="params",
                   split_rngs={"params": False},
                   variable_axes={c: 0 for c in AUX_COLLECTIONS},
                   in_axes=(0, nn.broadcast, nn.broadcast), length=n)
    step = Scan(cfg, i0 + n, name="segment_scan")
    nn.share_scope(parent, step)
    if carry0 is None and s["kind"] == "armt":
        carry0 = armt_initial_state(cfg, B)
    elif carry0 is None:
        carry0 = jnp.broadcast_to(m0.astype(x.dtype)[None], (B, m, d))
    carry, hs = step(carry0, (xs, i0 + jnp.arange(n, dtype=jnp.int32), ids, reset), m0, shared)
    return hs.swapaxes(0, 1).reshape(B, n * S, d)[:, :T], carry


# ----------------------------------------------------------------------------- decoding
def segment_len(cfg) -> int:
    """Tokens the block stack sees per segment: 2m + S (rmt: read memory, segment, write
    memory) or S + m (armt: segment, memory tokens); the size of the decode cache's "layers"."""
    s = cfg.segment_settings
    return s["length"] + s["memory_tokens"] * (2 if s["kind"] == "rmt" else 1)


def init_segment_cache(cfg, batch: int, max_len: int) -> dict:
    """The empty decode cache of a segment-recurrent model (see "Decoding" above). `max_len` does
    not size it: generation holds one segment and the memory, O(S + m), at any length. "pos" is
    a NumPy scalar, so a call that starts from this cache inside `jit` sees a concrete position
    and takes the static path (full segments by the segment scan)."""
    from mem_lm.model import compute_dtype, stack_cache
    s = cfg.segment_settings
    if s["kind"] == "armt":
        memory = armt_initial_state(cfg, batch)
    else:
        memory = jnp.zeros((batch, s["memory_tokens"], cfg.d_model), compute_dtype(cfg))
    return {"pos": np.zeros((), np.int32), "memory": memory,
            "layers": stack_cache(cfg, batch, segment_len(cfg))}


class _Segments(nn.Module):
    """Whole segments by the training forward's segment scan, from a given carry: the prefill's
    full segments. Its parameters are LanguageModel's (same paths)."""
    cfg: object

    @nn.compact
    def __call__(self, x, carry0, i0: int, shared):
        return segment_scan(self, self.cfg, x, None, shared, carry0, i0)


class _Decoder:
    """Pure functions of the model's params for decoding a segment-recurrent model: the block
    stack through the segment's cache, the write pass at a boundary, whole segments."""

    def __init__(self, cfg, params, shared):
        from mem_lm.model import Stack, compute_dtype
        self.cfg, self.params, self.shared = cfg, nn.meta.unbox(params), shared
        s = cfg.segment_settings
        self.kind, self.S, self.m = s["kind"], s["length"], s["memory_tokens"]
        self.dt = compute_dtype(cfg)
        self.stack = Stack(cfg)

    def run(self, x, cache_pos, layers, assoc=None, write=False, first=None):
        """The stack on x [B, L, d] at segment positions cache_pos .. cache_pos + L - 1 through
        the segment cache -> (normed hidden [B, L, d], new layers, new memories (armt))."""
        positions = (cache_pos + jnp.arange(x.shape[1], dtype=jnp.int32))[None]
        ctx = None
        if assoc is not None:
            B = x.shape[0]
            ctx = {"first": jnp.broadcast_to(first, (B,)) if write else jnp.zeros((B,), bool),
                   "fresh": jnp.zeros((B,), bool), "read_mask": None, "write": write}
        h, new = self.stack.apply({"params": self.params}, x, positions, None, cache_pos,
                                  layers, self.shared, assoc, ctx)
        if assoc is None:
            return h, new, None
        return h, [c for c, _ in new], [a for _, a in new]

    def m0(self, B):
        M = self.params["segment_memory"].astype(self.dt)
        return jnp.broadcast_to(M[None], (B,) + M.shape)

    def fresh(self, B):
        from mem_lm.model import stack_cache
        return stack_cache(self.cfg, B, segment_len(self.cfg))

    def feed(self, x, r, memory, layers, read: bool):
        """Segment tokens x [B, L, d] at in-segment offset r (rmt: after the read memory, which
        `read` feeds first: a segment's first tokens) -> (hidden [B, L, d], layers)."""
        if self.kind == "armt":
            h, layers, _ = self.run(x, r, layers, memory)
            return h, layers
        if read and self.m:
            h, layers, _ = self.run(jnp.concatenate([memory.astype(x.dtype), x], axis=1), 0,
                                    layers)
            return h[:, self.m:], layers
        h, layers, _ = self.run(x, self.m + r, layers)
        return h, layers

    def boundary(self, memory, layers, k, B: int):
        """The write pass at the end of segment k (its S tokens in the cache) -> (the next
        segment's memory, a fresh segment cache)."""
        if self.kind == "armt":
            _, _, memory = self.run(self.m0(B), self.S, layers, memory, write=True,
                                    first=k == 0)
        elif self.m:
            memory, _, _ = self.run(memory, self.m + self.S, layers)
        return memory, self.fresh(B)

    def segments(self, x, memory, i0: int):
        """Whole segments x [B, n·S, d] from `memory` -> (hidden, memory after them)."""
        return _Segments(self.cfg).apply({"params": self.params}, x, memory, i0, self.shared)


def segment_decode(cfg, params, x, cache, shared):
    """Embeddings x [B, T, d] through the decode cache of a segment-recurrent model ->
    (normed hidden states [B, T, d], the new cache). Called by LanguageModel with its params."""
    dec = _Decoder(cfg, params, shared)
    pos = cache["pos"]
    if not isinstance(pos, jax.core.Tracer):
        return _static_decode(dec, x, int(pos), cache)
    if x.shape[1] == 1:
        return _step(dec, x, cache)
    # A traced position and several tokens: one token at a time (the split into segments
    # depends on the position's value).
    def body(c, xt):
        h, c = _step(dec, xt[:, None], c)
        return c, h[:, 0]
    cache = dict(cache, pos=jnp.asarray(pos, jnp.int32))
    cache, hs = jax.lax.scan(body, cache, x.swapaxes(0, 1))
    return hs.swapaxes(0, 1), cache


def _static_decode(dec, x, pos: int, cache):
    """A call whose starting position is known when tracing: the rest of the current segment
    through its cache (and the write pass if it completes), whole segments by the segment scan
    (from the memory; their write passes included), the tokens of a last, partial segment
    through a fresh segment cache."""
    S = dec.S
    B, T, _ = x.shape
    r, k = pos % S, pos // S
    memory, layers = cache["memory"], cache["layers"]
    if pos == 0 and dec.kind == "rmt" and dec.m:
        memory = dec.m0(B)
    outs, t = [], 0
    if r:
        t = min(T, S - r)
        h, layers = dec.feed(x[:, :t], r, memory, layers, read=False)
        outs.append(h)
        if r + t == S:
            memory, layers = dec.boundary(memory, layers, k, B)
            k += 1
    n = (T - t) // S
    if n:
        h, memory = dec.segments(x[:, t:t + n * S], memory, k)
        outs.append(h)
        t += n * S
    if t < T:
        h, layers = dec.feed(x[:, t:], 0, memory, layers, read=True)
        outs.append(h)
    hidden = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return hidden, {"pos": np.asarray(pos + T, np.int32), "memory": memory, "layers": layers}


def _step(dec, x, cache):
    """One token x [B, 1, d] at a traced position: rmt feeds the read memory first at a
    segment's start; the write pass runs (lax.cond) when the token completes its segment."""
    S, m = dec.S, dec.m
    B = x.shape[0]
    pos = cache["pos"]
    r, k = pos % S, pos // S
    memory, layers = cache["memory"], cache["layers"]
    if dec.kind == "rmt" and m:
        memory = jnp.where(pos == 0, dec.m0(B), memory)
        layers = jax.lax.cond(r == 0, lambda l: dec.run(memory, 0, l)[1], lambda l: l, layers)
    h, layers = dec.feed(x, r, memory, layers, read=False)
    memory, layers = jax.lax.cond(r == S - 1, lambda a, l: dec.boundary(a, l, k, B),
                                  lambda a, l: (a, l), memory, layers)
    return h, {"pos": pos + 1, "memory": memory, "layers": layers}
