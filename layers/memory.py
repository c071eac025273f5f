"""Memory layers for the MLP slot: product-key memory (`pkm`, Lample et al. 2019) and Memory+
(`memory_plus`, Berges et al. 2025).

A query picks k of N = n_keys² value slots through two product-key halves and returns the
softmax-weighted sum of those values. Per memory head h (`heads`):

    q = W_q x [k_dim], split into q1, q2 [k_dim/2]         (RMS-normalised with query_norm)
    s1 = K1_h q1, s2 = K2_h q2 [n_keys];  top-k of each  -> (v1, i1), (v2, i2)
    the k² candidate scores v1[a] + v2[b]; their top-k   -> slot i1[a] · n_keys + i2[b]
    weights = softmax over those k scores
    y = Σ_h Σ_k weights · V[slot]                          (one `embedding_bag` of H·k slots)

pkm returns y; memory_plus returns W_o(y ⊙ SiLU(W_1 x)). The value dim is d_model.

query_norm is a parameter-free RMS normalisation of each query half: the 2019 paper's query
batch-norm needs running statistics (a mutable collection across steps), and the 2025 paper
normalises queries and keys; RMS-normalised queries against keys initialised at unit scale give
scores of unit variance at init, which is what the batch-norm was for.

Shared value pool (`shared_values`, memory_plus's default): the module declares its table in
`shared_params()`; the model creates that one parameter (`memory_values`) outside the blocks and
passes it to every layer of the mechanism, so with or without scan_layers the model holds one
table, not one per layer. Called without `values` (on its own, or with shared_values False) the
module creates its own table `values`.

Sharding: the table's logical axes are (None, "mlp"), so under the default rules its value
dimension is split over the tensor axis (the 2025 paper's "parallel memory"). Indices and
weights are constrained to be replicated over that axis (gathered within it), each device
gathers its columns of the table for every token, and the output is constrained to
("batch", "length", "mlp"), so it is reassembled per token where W_o (or the residual) needs it.
XLA's SPMD partitioner splits the gather and the backward scatter-add along the table's
columns (`embedding_bag` impl "auto" is XLA's gather; a Pallas kernel would need shard_map).

Auxiliary metrics (registry.AUX_METRICS): `memory_key_usage`, the fraction of the N slots that
at least one token of this step's batch read (a per-step value: the trainer logs its mean over
the logging interval, not a union of slots over steps), and `memory_weight_entropy`, the mean
entropy (nats) of each head's k softmax weights (at most log k).
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import constrain, dense, init
from layers.registry import (AUX_METRICS, MAX_INT, Mechanism, Setting, SettingError, Shared,
                             positive_int, register)
from pallas_kernels.common import IMPLS, acc_dtype, l2_normalize
from pallas_kernels.embedding_bag import embedding_bag

# The model-level parameter that holds a shared value pool (mem_lm.model creates it).
SHARED_VALUES = "memory_values"
VALUE_AXES = (None, "mlp")


def values_init(d_model: int):
    """Values ~ N(0, 1/d_model), as in the 2019 paper: a slot's row has unit norm on average."""
    return init(d_model ** -0.5, VALUE_AXES)


class MemoryLayer(nn.Module):
    d_model: int
    n_keys: int
    heads: int
    topk: int
    k_dim: int
    plus: bool                  # Memory+: W_o(y ⊙ SiLU(W_1 x))
    shared_values: bool
    query_norm: bool = True
    impl: str = "auto"
    init_std: float = 0.02
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @property
    def num_slots(self) -> int:
        return self.n_keys ** 2

    def shared_params(self) -> dict:
        """{name: (initialiser, shape)} of the parameters the model creates once and passes to
        every layer of this mechanism as keyword arguments."""
        if not self.shared_values:
            return {}
        return {SHARED_VALUES: (values_init(self.d_model), (self.num_slots, self.d_model))}

    @nn.compact
    def __call__(self, x, memory_values: Optional[jax.Array] = None):
        values = memory_values
        if values is None:
            values = self.param("values", values_init(self.d_model),
                                (self.num_slots, self.d_model), jnp.float32)
        H, half, k = self.heads, self.k_dim // 2, self.topk
        q = dense((H, 2, half), ("embed", "heads", None, "kv"), std=self.init_std,
                  dtype=self.dtype, name="w_query")(x)
        keys = self.param("keys", init(half ** -0.5, ("heads", None, None, "kv")),
                          (H, 2, self.n_keys, half), jnp.float32)
        q = q.astype(acc_dtype(q))
        if self.query_norm:   # RMS normalisation: L2 to the norm sqrt(half)
            q = l2_normalize(q, half * self.norm_eps) * math.sqrt(half)
        scores = jnp.einsum("bthcd,hcnd->bthcn", q, keys)      # c: which half
        best, which = jax.lax.top_k(scores, k)                   # [B, T, H, 2, k]
        cand = best[..., 0, :, None] + best[..., 1, None, :]     # [B, T, H, k, k]
        top, flat = jax.lax.top_k(cand.reshape(cand.shape[:-2] + (k * k,)), k)
        slot = (jnp.take_along_axis(which[..., 0, :], flat // k, axis=-1) * self.n_keys
                + jnp.take_along_axis(which[..., 1, :], flat % k, axis=-1))
        weights = jax.nn.softmax(top, axis=-1)                   # [B, T, H, k], float32
        self._sow_metrics(slot, weights)
        B, T = x.shape[:2]
        # All heads' slots in one bag, replicated over the table's column shards.
        slot = constrain(slot.reshape(B, T, H * k), ("batch", "length", None))
        weights = constrain(weights.reshape(B, T, H * k), ("batch", "length", None))
        y = constrain(embedding_bag(slot, weights, values, impl=self.impl),
                      ("batch", "length", "mlp")).astype(self.dtype)
        if not self.plus:
            return y
        gate = dense(self.d_model, ("embed", "mlp"), std=self.init_std, dtype=self.dtype,
                     name="w_gate")(x)
        h = constrain(y * jax.nn.silu(gate), ("batch", "length", "mlp"))
        return dense(self.d_model, ("mlp", "embed"), std=self.init_std, dtype=self.dtype,
                     name="w_out")(h)

    def _sow_metrics(self, slot, weights):
        if self.is_initializing() or not self.is_mutable_collection(AUX_METRICS):
            return
        used = jnp.zeros((self.num_slots,), jnp.bool_).at[slot.reshape(-1)].set(True)
        self.sow(AUX_METRICS, "memory_key_usage", jnp.mean(used.astype(jnp.float32)))
        entropy = -jnp.sum(weights * jnp.log(jnp.maximum(weights, 1e-30)), axis=-1)
        self.sow(AUX_METRICS, "memory_weight_entropy", jnp.mean(entropy))


def _k_dim(shared: Shared, s) -> int:
    return s["k_dim"] if s["k_dim"] is not None else shared.d_model // 2


def _check(shared: Shared, s) -> None:
    positive_int(s, "n_keys", "heads", "topk", "k_dim")
    # Slot indices are int32 inside JAX.
    if s["n_keys"] ** 2 > MAX_INT:
        raise SettingError("n_keys", f"n_keys² slots must be <= 2**31 - 1, got n_keys = "
                                     f"{s['n_keys']}")
    if s["topk"] > s["n_keys"]:
        raise SettingError("topk", f"must be <= n_keys ({s['n_keys']}), got {s['topk']}")
    # Each token reads heads · topk slots through one int32-indexed bag.
    if s["heads"] * s["topk"] > MAX_INT:
        raise SettingError("heads", f"heads · topk slots per token must be <= 2**31 - 1, got "
                                    f"{s['heads']} · {s['topk']}")
    k_dim = _k_dim(shared, s)
    if k_dim < 2 or k_dim % 2:
        raise SettingError("k_dim", f"must be even and >= 2 (two halves; None: d_model // 2 = "
                                    f"{shared.d_model // 2}), got {s['k_dim']}")
    if s["bag_impl"] not in IMPLS:
        raise SettingError("bag_impl", f"must be one of {IMPLS}, got {s['bag_impl']!r}")


def _settings(k_dim, k_dim_doc, shared_values):
    return {
        "n_keys": Setting(1024, int, "sub-keys per half: N = n_keys² value slots"),
        "heads": Setting(4, int, "memory heads (each its own query and sub-keys)"),
        "topk": Setting(32, int, "slots read per head and token"),
        "k_dim": Setting(k_dim, int, k_dim_doc, optional=True),
        "query_norm": Setting(True, bool, "RMS-normalise each query half (parameter-free)"),
        "shared_values": Setting(shared_values, bool, "one value table for every layer of "
                                 "this mechanism (model parameter `memory_values`)"),
        "bag_impl": Setting("auto", str, "embedding_bag impl, one of ('auto', 'reference', "
                                     "'xla', 'pallas')"),
    }


def _builder(plus: bool):
    def build(shared: Shared, s, name):
        return MemoryLayer(
            d_model=shared.d_model, n_keys=s["n_keys"], heads=s["heads"], topk=s["topk"],
            k_dim=_k_dim(shared, s), plus=plus, shared_values=s["shared_values"],
            query_norm=s["query_norm"], impl=s["bag_impl"], init_std=shared.init_std,
            norm_eps=shared.norm_eps, dtype=shared.dtype, name=name)
    return build


register(Mechanism(
    "pkm", "channel", _builder(False),
    _settings(512, "query width (two halves of k_dim / 2)", False), _check,
    "product-key memory: top-k of n_keys² value slots, softmax-weighted sum (Lample 2019)"))
register(Mechanism(
    "memory_plus", "channel", _builder(True),
    _settings(None, "query width (two halves of k_dim / 2); None: d_model // 2", True), _check,
    "Memory+: W_o(pkm(x) ⊙ SiLU(W_1 x)), one value pool shared by its layers (Berges 2025)"))
