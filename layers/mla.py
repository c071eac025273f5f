"""Multi-head latent attention (`mla`): DeepSeek-V2's MLA, as Kimi Linear's full-attention
layers use it (transformers' `KimiLinearAttention`; `DeepseekV3Attention` is the same with RoPE).

Per token x [d]:
  queries   q = x W_q, or with `q_lora_rank` r_q: q = RMSNorm(x W_dq) W_uq (a low-rank query);
            per head [q_nope (qk_nope_head_dim) ; q_rope (qk_rope_head_dim)]
  latent    [c_kv ; k_rope] = x W_dkv: c_kv (kv_lora_rank) through RMSNorm, k_rope one key part
            (qk_rope_head_dim) that every head shares
  keys      per head [c_kv W_uk,h ; k_rope], values c_kv W_uv,h (v_head_dim): one up-projection
            W_ukv = [W_uk | W_uv] of the latent
  scores    softmax(q · k · (qk_nope_head_dim + qk_rope_head_dim)^-1/2) over the causal keys,
            output projection of the heads' values.
`rope` rotates q_rope and k_rope by position (DeepSeek, rotate-half convention: an importer of
DeepSeek's interleaved layout permutes those weight rows); off, as in Kimi Linear, no position
enters at all (NoPE) and the rope part is one more shared key part. The latent RMSNorms use
eps 1e-6, the reference's default for them; `attention_bias` puts biases on the two
down-projections (the direct q projection has none) and o_proj, as the reference.

Training and the full forward up-project the latents to per-head keys and values and run the
attention op (`pallas_kernels.attention`: packed documents through segment ids, the model's
`attn_impl`). The decode cache holds only the normalised latent and the (rotated) k_rope of
each token, `latent` [B, max_len, kv_lora_rank + qk_rope_head_dim] — not per-head keys and
values. A decode step (one new token) absorbs the up-projection instead of applying it to the
cache: the query becomes q_nope W_uk,hᵀ over the latent ([B, 1, H, kv_lora_rank], with q_rope
beside it) and attends to the cached [c_kv ; k_rope] as one shared key/value head (multi-query
attention with value c_kv), and the heads' outputs go through W_uv,h after the softmax:
q·k = (q_nope W_uk,hᵀ)·c_kv + q_rope·k_rope and Σ p c_kv W_uv,h = (Σ p c_kv) W_uv,h, the same
numbers up to rounding. Each step then reads L (kv_lora_rank + qk_rope_head_dim) cached values
and does O(L · H · (kv_lora_rank + qk_rope_head_dim)) work, where up-projecting the cache would
redo O(L · kv_lora_rank · H · (qk_nope_head_dim + v_head_dim)) every step. A multi-token call
with a cache (prefill, chunks) up-projects the cached latents and runs the ordinary attention:
with many queries the up-projection is the cheaper side (DeepSeek-V2 §2.1.2; what vLLM and
SGLang do for prefill).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import (constrain, context_attention, context_size, dense, document_ids,
                           init)
from layers.norm import RMSNorm
from layers.registry import (MAX_INT, Mechanism, Setting, SettingError, Shared, positive_int,
                             register)
from layers.rope import apply_rope
from pallas_kernels.attention import attention


class _Kernel(nn.Module):
    """A bare kernel parameter under `<name>/kernel` (as a Dense layer's), for a projection the
    layer applies in more than one way (kv_up_proj: to the latents, or absorbed)."""
    shape: tuple
    axes: tuple
    std: float

    @nn.compact
    def __call__(self):
        return self.param("kernel", init(self.std, self.axes), self.shape, jnp.float32)


class MLA(nn.Module):
    d_model: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None
    rope: bool = False
    rope_theta: float = 10000.0
    attention_bias: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @property
    def scale(self) -> float:
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5

    @property
    def latent_dim(self) -> int:
        """Cached numbers per token (and layer)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def init_cache(self, batch: int, max_len: int) -> dict:
        return {"latent": jnp.zeros((batch, max_len, self.latent_dim), self.dtype)}

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        B, T = x.shape[:2]
        H, R = self.num_heads, self.kv_lora_rank
        dn, dr, dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        norm = lambda name: RMSNorm(self.norm_eps, self.dtype, axis_name="kv", name=name)
        if self.q_lora_rank is None:
            q = dense((H, dn + dr), ("embed", "heads", "kv"), name="q_proj", **kw)(x)
        else:
            cq = dense(self.q_lora_rank, ("embed", "kv"), name="q_down_proj",
                       use_bias=self.attention_bias, **kw)(x)
            q = dense((H, dn + dr), ("kv", "heads", "kv"), name="q_up_proj",
                      **kw)(norm("q_norm")(cq))
        ckv = dense(R + dr, ("embed", "kv"), name="kv_down_proj", use_bias=self.attention_bias,
                    **kw)(x)
        c, k_rope = norm("kv_norm")(ckv[..., :R]), ckv[..., R:]
        q_nope, q_rope = q[..., :dn], q[..., dn:]
        if self.rope:
            q_rope = apply_rope(q_rope, positions, self.rope_theta)
            k_rope = apply_rope(k_rope[:, :, None], positions, self.rope_theta)[:, :, 0]
        latent = constrain(jnp.concatenate([c, k_rope.astype(c.dtype)], -1),
                           ("batch", "length", "kv"))
        w_up = _Kernel((R, H, dn + dv), ("kv", "heads", "kv"), self.init_std,
                       name="kv_up_proj")().astype(self.dtype)
        q = constrain(jnp.concatenate([q_nope, q_rope], -1), ("batch", "length", "heads", "kv"))
        # A named library kernel (cudnn, splash) takes no explicit positions, which the decode
        # cache passes, and jax's cuDNN API no v head width of its own: "auto" there.
        impl = self.impl
        if impl in ("cudnn", "splash") and (cache is not None
                                            or (impl == "cudnn" and dn + dr != dv)):
            impl = "auto"
        attn = lambda q, k, v, **a: attention(q, k, v, scale=self.scale, impl=impl, **a)

        new_cache = None
        if cache is None:
            seg = None if segment_ids is None else document_ids(segment_ids)
            if context_size(T) > 1:   # T split over the mesh's context axis
                o = self._over_context(q, latent, w_up, seg)
            else:
                k, v = self._expand(latent, w_up)
                o = attn(q, k, v, segment_ids=seg)
        else:
            L = cache["latent"].shape[1]
            cl = jax.lax.dynamic_update_slice_in_dim(
                cache["latent"], latent.astype(cache["latent"].dtype), cache_pos, axis=1)
            new_cache = {"latent": cl}
            cl = cl.astype(self.dtype)
            slots = jnp.arange(L, dtype=jnp.int32)
            pos = dict(q_positions=cache_pos + jnp.arange(T, dtype=jnp.int32),
                       kv_positions=jnp.where(slots < cache_pos + T, slots, -1))
            if T == 1:
                # Absorbed: the query in latent space, one shared key/value head [c_kv ; k_rope]
                # (value c_kv), the value up-projection after the softmax.
                q_lat = jnp.einsum("bthd,rhd->bthr", q_nope, w_up[..., :dn])
                qa = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], -1)
                o_lat = attn(qa, cl[:, :, None], cl[:, :, None, :R], **pos)
                o = jnp.einsum("bthr,rhv->bthv", o_lat, w_up[..., dn:])
            else:
                k, v = self._expand(cl, w_up)
                o = attn(q, k, v, **pos)
        o = constrain(o, ("batch", "length", "heads", "kv"))
        y = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj",
                  use_bias=self.attention_bias, **kw)(o)
        return y, new_cache

    def _expand(self, latent, w_up, constrained=True):
        """Per-head keys [k_nope ; k_rope] and values of latents [B, L, R + dr] (with their
        logical constraints unless not `constrained`: inside a shard_map over the context
        axis)."""
        R, dn = self.kv_lora_rank, self.qk_nope_head_dim
        kv = jnp.einsum("blr,rhe->blhe", latent[..., :R], w_up)
        k_rope = latent[:, :, None, R:]
        k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(
            k_rope, k_rope.shape[:2] + (self.num_heads, k_rope.shape[-1]))], -1)
        if not constrained:
            return k, kv[..., dn:]
        return (constrain(k, ("batch", "length", "heads", "kv")),
                constrain(kv[..., dn:], ("batch", "length", "heads", "kv")))

    def _over_context(self, q, latent, w_up, doc_ids):
        """The full forward with T split over the context axis (`common.context_attention`):
        the devices all-gather the latents [B, T, kv_lora_rank + qk_rope_head_dim], not the
        per-head keys and values (H · (dn + dr + dv) per token), and each up-projects them.
        The queries' positions are explicit there, which the library kernels (cudnn, splash)
        do not take: "auto" instead."""
        impl = "auto" if self.impl in ("cudnn", "splash") else self.impl

        def attend(q, latent, w_up, **mask):
            k, v = self._expand(latent, w_up, constrained=False)
            return attention(q, k, v, scale=self.scale, impl=impl, **mask)

        return context_attention(attend, q, (latent,), doc_ids, replicated=(w_up,))


# ----------------------------------------------------------------------------- registration

SETTINGS = {
    "heads": Setting(None, int, "query heads (None: the model's num_heads)", optional=True),
    "q_lora_rank": Setting(None, int, "rank of the low-rank query (down-projection, RMSNorm, "
                                      "up-projection); None: a direct q projection (Kimi "
                                      "Linear's default)", optional=True),
    "kv_lora_rank": Setting(None, int, "width of the cached latent c_kv (None: 4 · head_dim, "
                                       "Kimi Linear's 512 for 128)", optional=True),
    "qk_nope_head_dim": Setting(None, int, "per-head key/query part from the latent (None: "
                                           "head_dim)", optional=True),
    "qk_rope_head_dim": Setting(None, int, "key/query part shared by the heads' keys, rotated "
                                           "when `rope` (None: head_dim // 2; 0: none)",
                                optional=True),
    "v_head_dim": Setting(None, int, "value width per head (None: head_dim)", optional=True),
    "rope": Setting(False, bool, "RoPE on the shared part (DeepSeek-V2/V3); off: NoPE, as Kimi "
                                 "Linear's MLA layers"),
    "rope_base": Setting(None, float, "RoPE base (None: the model's rope_theta)", optional=True),
    "attention_bias": Setting(False, bool, "biases on the down-projections and o_proj (the "
                                           "reference's attention_bias)"),
}


def dims(shared: Shared, s) -> dict:
    """The resolved sizes: the settings with their None defaults filled from the model."""
    D = shared.head_dim
    pick = lambda f, default: s[f] if s[f] is not None else default
    return dict(num_heads=pick("heads", shared.num_heads),
                q_lora_rank=s["q_lora_rank"],
                kv_lora_rank=pick("kv_lora_rank", 4 * D),
                qk_nope_head_dim=pick("qk_nope_head_dim", D),
                qk_rope_head_dim=pick("qk_rope_head_dim", D // 2),
                v_head_dim=pick("v_head_dim", D))


def _check(shared: Shared, s) -> None:
    positive_int(s, "heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
    if s["qk_rope_head_dim"] is not None and not 0 <= s["qk_rope_head_dim"] <= MAX_INT:
        raise SettingError("qk_rope_head_dim", f"must be in [0, 2**31 - 1], got "
                                               f"{s['qk_rope_head_dim']!r}")
    if s["rope_base"] is not None and not s["rope_base"] > 0:
        raise SettingError("rope_base", f"must be > 0, got {s['rope_base']}")
    d = dims(shared, s)
    how = lambda f: "" if s[f] is not None else " (its default from head_dim)"
    if d["kv_lora_rank"] > MAX_INT:
        raise SettingError("kv_lora_rank", f"4 · head_dim = {d['kv_lora_rank']} is over "
                                           f"2**31 - 1; set it")
    if d["kv_lora_rank"] + d["qk_rope_head_dim"] > MAX_INT:
        raise SettingError("kv_lora_rank", "kv_lora_rank + qk_rope_head_dim (the cached width) "
                                           "must be <= 2**31 - 1")
    for f in ("qk_rope_head_dim", "v_head_dim"):
        if d["qk_nope_head_dim"] + d[f] > MAX_INT:
            raise SettingError("qk_nope_head_dim", f"qk_nope_head_dim + {f} must be <= "
                                                   f"2**31 - 1")
    if s["rope"] and (d["qk_rope_head_dim"] < 2 or d["qk_rope_head_dim"] % 2):
        raise SettingError("qk_rope_head_dim", f"must be even and >= 2 with rope=True, got "
                                               f"{d['qk_rope_head_dim']}{how('qk_rope_head_dim')}")


def _build(shared: Shared, s, name):
    return MLA(d_model=shared.d_model, **dims(shared, s), rope=s["rope"],
               rope_theta=s["rope_base"] or shared.rope_theta,
               attention_bias=s["attention_bias"], init_std=shared.init_std, dtype=shared.dtype,
               impl=shared.attn_impl, name=name)


register(Mechanism("mla", "token", _build, SETTINGS, _check,
                   "multi-head latent attention (DeepSeek-V2; Kimi Linear's NoPE form): a "
                   "compressed latent KV cache, absorbed decode",
                   attention_span=lambda s, T: T, context_parallel=True))
