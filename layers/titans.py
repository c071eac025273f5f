"""Titans' long-term memory as a token mixer (`titans`: the paper's LMM; beside `swa` in
`pattern` it is MAL), on `pallas_kernels.neural_memory` (Behrouz et al. 2025, "Titans:
Learning to Memorize at Test Time"):

  q, k, v = SiLU(conv4(W_q x)), SiLU(conv4(W_k x)), SiLU(conv4(W_v x))   (SiLU(W x) without
  short convs); q, k L2-normalised per head;
  θ = lr_max · sigmoid(W_θ x + b_θ), η = sigmoid(W_η x + b_η), α = sigmoid(W_α x + b_α) per
  token and head (b_θ = b_η = 0, b_α = −4 at init: slow forgetting);
  the memory (depth 1: a matrix; depth 2: an MLP of hidden width expansion · head_dim, exact
  GELU, no biases) trained on ½‖M(k_t) − v_t‖² with momentum and forgetting, read with q
  (scale 1), chunk semantics of the op (`memory_chunk` tokens share the chunk-start memory for
  their gradients and reads: see pallas_kernels/neural_memory);
  y = o_proj(RMSNorm(o) ⊙ SiLU(W_g x)) per head (o_proj(RMSNorm(o)) without use_gate).

The initial memory of a depth-2 layer is learned, per head (xavier-uniform W1, W2); depth 1
starts from zero, as DeltaNet. Momentum starts at zero.

Packed documents (segment_ids) restart at each document from the learned initial memory, with
chunks counted from the document's start: the op's cu_seqlens per row, or a token scan that
reloads the initial state at each start when a row holds more documents than
`docs_per_row` allows. Decode cache: the memory, the momentum and the memory of the last chunk
boundary (the reads use it until the chunk ends), and the conv inputs; the position inside the
chunk is the model's cache position. A prefill that starts on a chunk boundary runs the
chunked op; one that starts inside a chunk, and single decode tokens, run the op's step.

`MemoryInputs` (the projections, convs and gates above), `initial_memory`, `memory_step` (one
token under the chunk rule) and `gate_outputs` (RMSNorm(y) ⊙ sigmoid(RMSNorm(m))) also build
Titans MAG (layers/titans_mag.py) and MAC (layers/titans_mac.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import (blocked_token_scan, constrain, dense, docs_per_row, pack_rows,
                           packed_or_scanned)
from layers.conv import conv_settings, qkv_conv_cache, short_conv_qkv
from layers.norm import GatedRMSNorm, RMSNorm
from layers.registry import (Mechanism, Setting, SettingError, Shared, positive_int, register,
                             width_multiplier)
from pallas_kernels.common import l2_normalize
from pallas_kernels.neural_memory import neural_memory, neural_memory_step


def _rows(mask, x):
    """A per-row mask [B] broadcast against x [B, ...]."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _select(mask, new, old):
    return jax.tree.map(lambda n, o: jnp.where(_rows(mask, o), n, o), new, old)


def memory_shapes(lead: tuple, head_dim: int, hidden: int, depth: int) -> tuple:
    """Shapes of the memory's arrays with leading dims `lead`: ([..., D, D],) or
    ([..., D, E], [..., E, D])."""
    D = head_dim
    return (lead + (D, D),) if depth == 1 else (lead + (D, hidden), lead + (hidden, D))


def memory_structure(leaves, depth: int):
    """Tuple of memory arrays -> the op's structure (an array for depth 1)."""
    return leaves[0] if depth == 1 else tuple(leaves)


def zero_memory(lead: tuple, head_dim: int, hidden: int, depth: int):
    return memory_structure([jnp.zeros(s, jnp.float32)
                             for s in memory_shapes(lead, head_dim, hidden, depth)], depth)


def initial_memory(module: nn.Module, num_heads: int, head_dim: int, hidden: int, depth: int):
    """The learned initial memory per head (depth 2: params `memory_w1`, `memory_w2` of
    `module`, xavier-uniform as lucidrains' MemoryMLP), or zeros (depth 1): leaves [H, ...]."""
    if depth == 1:
        return zero_memory((num_heads,), head_dim, hidden, depth)
    init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    s1, s2 = memory_shapes((num_heads,), head_dim, hidden, depth)
    W1 = module.param("memory_w1", nn.with_logical_partitioning(init, ("heads", "kv", None)),
                      s1, jnp.float32)
    W2 = module.param("memory_w2", nn.with_logical_partitioning(init, ("heads", None, "kv")),
                      s2, jnp.float32)
    return W1, W2


def broadcast_rows(tree, rows: int):
    """Per-head arrays [H, ...] -> [rows, H, ...]."""
    return jax.tree.map(lambda w: jnp.broadcast_to(w, (rows,) + w.shape), tree)


class MemoryInputs(nn.Module):
    """The memory's inputs from x [B, T, d]: q, k, v = SiLU(conv(W x)) (SiLU(W x) without
    short convs), q and k L2-normalised per head; θ = lr_max · sigmoid(W_θ x + b_θ),
    η = sigmoid(W_η x + b_η), α = sigmoid(W_α x + b_α) (biases 0, 0, −4 at init). Returns
    ((q, k, v, θ, η, α), the conv cache entries). `titans` shares its scope (its parameter
    names are these modules'); `titans_mac` uses it on the attention output."""
    num_heads: int
    head_dim: int
    lr_max: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, segment_ids=None, cache=None):
        H, D = self.num_heads, self.head_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        qkv = {n: dense((H, D), ("embed", "heads", "kv"), name=f"{n}_proj", **kw)(x)
               for n in "qkv"}
        if self.use_short_conv:
            qkv, new_cache = short_conv_qkv(qkv, self.conv_size, segment_ids, cache, self.dtype,
                                            std=self.init_std)
        else:
            qkv, new_cache = {n: jax.nn.silu(t) for n, t in qkv.items()}, {}
        q, k, v = (constrain(qkv[n], ("batch", "length", "heads", "kv")) for n in "qkv")
        q, k = l2_normalize(q), l2_normalize(k)

        def gate(name, bias):
            w = dense((H,), ("embed", "heads"), name=f"{name}_proj", **kw)(x).astype(jnp.float32)
            b = self.param(f"{name}_bias", nn.with_logical_partitioning(
                nn.initializers.constant(bias), ("heads",)), (H,), jnp.float32)
            return jax.nn.sigmoid(w + b)

        lr = self.lr_max * gate("lr", 0.0)
        return (q, k, v, lr, gate("momentum", 0.0), gate("decay", -4.0)), new_cache


def memory_step(xs, carry, chunk_size: int, depth: int):
    """One token of the op under its chunk rule (`neural_memory_step`): xs = (q, k, v, θ, η,
    α) of the token ([B, H, ...]), carry = (memory, momentum, the memory of the last chunk
    boundary, position [B] counted from where chunks start). Returns (o, the next carry)."""
    memory, momentum, chunk_memory, pos = carry
    chunk_memory = _select(pos % chunk_size == 0, memory, chunk_memory)
    o, (memory, momentum) = neural_memory_step(*xs, depth=depth, scale=1.0,
                                               state=(memory, momentum),
                                               chunk_memory=chunk_memory)
    return o, (memory, momentum, chunk_memory, pos + 1)


def gate_outputs(y, m, eps: float, dtype):
    """MAG's and MAC's combination of the attention output y and the memory output m (both
    [B, T, d]): RMSNorm(y) ⊙ sigmoid(RMSNorm(m)), each norm with its own learned scale (the
    paper's "normalize the outputs y and M(x̃) using learnable vector-valued weights, followed
    by a non-linearity σ"), through norms `attn_out_norm`, `memory_out_norm` of the calling
    (compact) module."""
    y = RMSNorm(eps, dtype, name="attn_out_norm")(y).astype(jnp.float32)
    m = RMSNorm(eps, dtype, name="memory_out_norm")(m).astype(jnp.float32)
    return (y * jax.nn.sigmoid(m)).astype(dtype)


class Titans(nn.Module):
    d_model: int
    num_heads: int
    head_dim: int
    depth: int = 2
    expansion: float = 4.0
    chunk_size: int = 8
    lr_max: float = 1.0
    use_gate: bool = True
    conv_size: int = 4
    use_short_conv: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @property
    def hidden(self) -> int:
        return int(round(self.head_dim * self.expansion))

    def init_cache(self, batch: int, max_len: int) -> dict:
        H, D = self.num_heads, self.head_dim
        zeros = lambda: zero_memory((batch, H), D, self.hidden, self.depth)
        cache = {"state": {"memory": zeros(), "momentum": zeros(), "chunk_memory": zeros()}}
        if self.use_short_conv:
            cache.update(qkv_conv_cache(batch, {n: (H, D) for n in "qkv"}, self.conv_size,
                                        self.dtype))
        return cache

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        B, T = x.shape[:2]
        H, D = self.num_heads, self.head_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        inputs = MemoryInputs(H, D, self.lr_max, self.use_short_conv, self.conv_size,
                              self.init_std, self.dtype, name="inputs")
        nn.share_scope(self, inputs)    # its parameters are this layer's (q_proj, lr_bias, ...)
        args, new_cache = inputs(x, segment_ids, cache)
        init = initial_memory(self, H, D, self.hidden, self.depth)

        state = None
        if segment_ids is not None:
            o = self._documents(args, init, segment_ids)
        elif cache is None:
            o = self._op(args, broadcast_rows(init, B))
        else:
            o, state = self._cached(args, init, cache["state"], cache_pos)
        g = (dense((H, D), ("embed", "heads", "kv"), name="g_proj", **kw)(x)
             if self.use_gate else None)
        o = GatedRMSNorm(self.norm_eps, self.dtype, name="o_norm")(o, g)
        o = constrain(o, ("batch", "length", "heads", "kv"))
        y = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj", **kw)(o)
        return y, None if cache is None else {**new_cache, "state": state}

    # ------------------------------------------------------------------ the three modes
    def _op(self, args, memory, momentum=None, cu_seqlens=None, final=False):
        o, state = neural_memory(*args, depth=self.depth, chunk_size=self.chunk_size,
                                 scale=1.0, initial_state=(memory, momentum),
                                 output_final_state=final, impl=self.impl,
                                 cu_seqlens=cu_seqlens)
        return (o, state) if final else o

    def _documents(self, args, init, segment_ids):
        """Every document from the initial memory (`packed_or_scanned`): per row the op with
        cu_seqlens, or the token scan when a row has more documents than `docs_per_row`."""
        T = segment_ids.shape[1]
        rows = pack_rows(segment_ids, docs_per_row(T, self.chunk_size))
        N = rows.cu_seqlens.shape[1] - 1

        def row(cu, *xs):
            memory = broadcast_rows(init, N)
            return self._op(tuple(x[None] for x in xs), memory, cu_seqlens=cu)[0]

        def scan(a):
            B = a[0].shape[0]
            memory = broadcast_rows(init, B)
            zeros = jax.tree.map(jnp.zeros_like, memory)
            o, _ = self._token_scan(a, (memory, zeros, memory, jnp.zeros((B,), jnp.int32)),
                                    starts=rows.starts, init=(memory, zeros))
            return o

        return packed_or_scanned(rows, row, scan, args)

    def _cached(self, args, init, state, cache_pos):
        """From the cache at position cache_pos (the model's tokens seen): the learned initial
        memory at position 0. Returns (o, the new cache state)."""
        B, T = args[0].shape[:2]
        C = self.chunk_size
        fresh = jnp.asarray(cache_pos) == 0
        init_b = broadcast_rows(init, B)
        memory = jax.tree.map(lambda i, m: jnp.where(fresh, i, m), init_b, state["memory"])
        momentum = jax.tree.map(lambda m: jnp.where(fresh, 0, m), state["momentum"])
        chunk_memory = jax.tree.map(lambda i, m: jnp.where(fresh, i, m), init_b,
                                    state["chunk_memory"])
        pos = jnp.broadcast_to(jnp.asarray(cache_pos, jnp.int32) % C, (B,))

        def by_tokens(_):
            o, (m, z, c, _) = self._token_scan(args, (memory, momentum, chunk_memory, pos))
            return o, {"memory": m, "momentum": z, "chunk_memory": c}

        if T == 1:
            return by_tokens(None)

        def by_chunks(_):   # the prefill starts on a chunk boundary: the chunked op
            L0 = T // C * C
            m, z, c = memory, momentum, memory
            outs = []
            for s, e in ((0, L0), (L0, T)):
                if e > s:
                    c = m
                    o, (m, z) = self._op(tuple(a[:, s:e] for a in args), m, z, final=True)
                    outs.append(o)
            if T == L0:
                c = m
            return jnp.concatenate(outs, axis=1), {"memory": m, "momentum": z, "chunk_memory": c}

        return jax.lax.cond(pos[0] == 0, by_chunks, by_tokens, None)

    def _token_scan(self, args, carry, starts=None, init=None):
        """The op's step over the tokens of args [B, T, ...] from carry = (memory, momentum,
        chunk memory, position in the chunk [B]); with `starts` [B, T] the state reloads `init`
        (memory, momentum) and the position restarts at every start (`blocked_token_scan`).
        Returns (o, final carry)."""
        B, T = args[0].shape[:2]
        C = self.chunk_size
        if starts is None:
            starts = jnp.zeros((B, T), bool)

        def token(carry, inp):
            xs, start, real = inp
            memory, momentum, chunk_memory, pos = carry
            if init is not None:
                memory, momentum = _select(start, init, (memory, momentum))
                pos = jnp.where(start, 0, pos)
            o, new = memory_step(xs, (memory, momentum, chunk_memory, pos), C, self.depth)
            # The padding after the last token leaves the carry as it is.
            return _select(real, new, carry), o

        carry, o = blocked_token_scan(token, carry, (tuple(args), starts, jnp.ones((B, T), bool)),
                                     T)
        return o, carry


_SETTINGS = {
    "depth": Setting(2, int, "memory network: 1 = a matrix [K, V] per head (DeltaNet-like), "
                             "2 = an MLP K → E → V with exact GELU and a learned initial memory"),
    "expansion": Setting(4.0, float, "hidden width E of the depth-2 memory = expansion · "
                                     "head_dim (lucidrains' NeuralMemory default 4)"),
    "memory_chunk": Setting(8, int, "tokens whose gradients and reads share the chunk-start "
                                  "memory (1: the exact online rule); part of the function, "
                                  "not only of its speed"),
    "lr_max": Setting(1.0, float, "θ = lr_max · sigmoid(W_θ x + b_θ), the memory's learning "
                                  "rate per token"),
    "use_gate": Setting(True, bool, "output gate: o_proj(RMSNorm(o) ⊙ SiLU(W_g x)); "
                                    "False: o_proj(RMSNorm(o))"),
    **conv_settings(True),
}


def _check(shared: Shared, s) -> None:
    positive_int(s, "conv_size", "memory_chunk")
    if s["depth"] not in (1, 2):
        raise SettingError("depth", f"must be 1 or 2, got {s['depth']!r}")
    width_multiplier(s, "expansion", shared.head_dim)
    if not s["lr_max"] > 0:
        raise SettingError("lr_max", f"must be > 0, got {s['lr_max']!r}")


def _build(shared: Shared, s, name):
    return Titans(d_model=shared.d_model, num_heads=shared.num_heads, head_dim=shared.head_dim,
                  depth=s["depth"], expansion=s["expansion"], chunk_size=s["memory_chunk"],
                  lr_max=s["lr_max"], use_gate=s["use_gate"], conv_size=s["conv_size"],
                  use_short_conv=s["short_conv"], norm_eps=shared.norm_eps,
                  init_std=shared.init_std, dtype=shared.dtype, impl=shared.impl, name=name)


register(Mechanism("titans", "token", _build, _SETTINGS, _check,
                   "Titans LMM: a neural memory (matrix or MLP) trained while reading, by "
                   "gradient steps with momentum and forgetting", recurrent=True))
