"""Softmax attention mixers: full causal (`attn`) and sliding window (`swa`), GQA, RoPE,
optional attention sinks, optional SiLU short convs on q, k, v (before RoPE; the token shift
that lets a single layer bind a key to the token after it), packed documents through segment ids.
Heads, head width and RoPE base default to the model's; a hybrid's attention layers may set their
own (as fla's `attn` layers of a linear-attention model do), and q/k/v biases (`qkv_bias`).

Qwen3-Next's gated attention (transformers' Qwen3NextAttention) is three options:
  * `output_gate`: q_proj also yields a gate per head, laid out [q_h | gate_h] per head (the
    kernel is [d, heads, 2 · head_width], as transformers' q_proj rows viewed [heads, 2 · D]);
    the attention output is o ⊙ σ(gate) before o_proj;
  * `qk_norm`: RMSNorm over each head's width on q and k (one scale [head_width] each, eps the
    model's norm_eps) before RoPE; with the model's `zero_centred_norms` it scales by (1 + w);
  * `rope_fraction`: partial RoPE, rotating the first int(head_width · fraction) dims of each
    head (rotate-half within them) and passing the rest through, as transformers'
    partial_rotary_factor.

Decode cache (`init_cache`), by the `cache` setting:
  * "window" (default), full attention: a preallocated buffer of `max_len` keys/values,
    filled at `pos`;
  * "window", sliding window (window < max_len): a ring buffer of `window` entries plus the
    position stored in each slot (−1 = empty), so memory and step cost stay O(window);
  * "cascade": a fixed `cache_size` of slots whatever the length, for streaming: attention
    sinks and cascading FIFOs that keep the more attended-to of the older tokens
    (`layers/kv_cache.py`; `cascades=1` is sliding window + sinks). Every token with this
    cache, prompt tokens included, attends to what the cache holds at its turn; the cache
    takes q and k before RoPE and places them itself (`cache_positions`).

`persistent_tokens` P > 0 (a module field, set by `titans_mag`): P learned keys and values per
kv head that every query sees beside its window (Titans' persistent memory; no RoPE), through
the op's prefix keys, in the forward and with the window cache (not with the cascading cache or
top-k blocks).

`topk_blocks` n > 0 (attn only) switches a trained layer to training-free top-k block
attention (`layers/topk_attention.py`): each query token sees its own block, the last
`topk_window` tokens and the n earlier key blocks of `topk_block_size` tokens that score best
for it (by `topk_score`), through `block_sparse_attention` in the forward and prefill; a decode
step selects by the same rule, keeps the full cache and masks the slots outside its selection.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers.common import (constrain, context_attention, context_size, dense, document_ids,
                           init)
from layers.conv import conv_settings, qkv_conv_cache, short_conv_qkv
from layers.kv_cache import (CASCADE_KEYS, FILLS, POSITIONS, cascade_attention, cascade_layout,
                             init_cascade_cache)
from layers.registry import (MAX_INT, Mechanism, Setting, SettingError, Shared, positive_int,
                             register)
from layers.norm import RMSNorm
from layers.rope import apply_rope, check_rope_head_dim, rotary_dims
from layers.topk_attention import SCORES, decode_kv_positions, topk_block_attention
from pallas_kernels.attention import attention


def init_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
               window: Optional[int], dtype) -> dict:
    if window is not None and window < max_len:
        shape = (batch, window, num_kv_heads, head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "slot_pos": jnp.full((window,), -1, jnp.int32)}
    shape = (batch, max_len, num_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class Attention(nn.Module):
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: Optional[int] = None
    rope_theta: float = 10000.0
    use_sinks: bool = False
    use_short_conv: bool = False
    conv_size: int = 4
    qkv_bias: bool = False
    cache_policy: str = "window"
    cache_size: Optional[int] = None
    cache_sinks: int = 4
    cascades: int = 4
    score_decay: float = 0.9999
    cache_positions: str = "cache"
    cache_fill: str = "eager"
    topk_blocks: int = 0
    topk_block_size: int = 64
    topk_window: Optional[int] = 64
    topk_score: str = "bound"
    persistent_tokens: int = 0
    output_gate: bool = False
    qk_norm: bool = False
    zero_centred_norms: bool = False
    norm_eps: float = 1e-6
    rotary_dim: Optional[int] = None     # None: all of head_dim
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    def init_cache(self, batch: int, max_len: int) -> dict:
        if self.cache_policy == "cascade":
            cache = init_cascade_cache(batch, self.cache_size, self.num_kv_heads,
                                       self.head_dim, sinks=self.cache_sinks,
                                       cascades=self.cascades, dtype=self.dtype)
        else:
            cache = init_cache(batch, max_len, self.num_kv_heads, self.head_dim, self.window,
                               self.dtype)
        if self.use_short_conv:
            H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
            cache.update(qkv_conv_cache(batch, {"q": (H, D), "k": (Hkv, D), "v": (Hkv, D)},
                                        self.conv_size, self.dtype))
        return cache

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(std=self.init_std, dtype=self.dtype)
        q, k, v = (dense((h, D * (2 if n == "q" and self.output_gate else 1)),
                         ("embed", "heads", "kv"), name=f"{n}_proj", use_bias=self.qkv_bias,
                         **kw)(x)
                   for n, h in (("q", H), ("k", Hkv), ("v", Hkv)))
        gate = None
        if self.output_gate:
            q, gate = q[..., :D], q[..., D:]
        if self.qk_norm:
            norm = lambda name: RMSNorm(self.norm_eps, self.dtype, axis_name="kv",
                                        zero_centred=self.zero_centred_norms, name=name)
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        conv_cache = {}
        if self.use_short_conv:
            qkv, conv_cache = short_conv_qkv({"q": q, "k": k, "v": v}, self.conv_size,
                                             segment_ids, cache, self.dtype, std=self.init_std)
            q, k, v = qkv["q"], qkv["k"], qkv["v"]
        q_raw, k_raw = q, k           # for the cascading cache, which rotates them itself
        q = apply_rope(q, positions, self.rope_theta, self.rotary_dim)
        k = apply_rope(k, positions, self.rope_theta, self.rotary_dim)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        sinks = None
        if self.use_sinks:
            # N(0, init_std²) as gpt-oss (transformers' GptOssPreTrainedModel._init_weights).
            sinks = self.param("sinks", init(self.init_std, ("heads",)), (H,), jnp.float32)
        prefix = {}
        if self.persistent_tokens:
            if self.cache_policy == "cascade" or self.topk_blocks:
                raise ValueError("persistent_tokens need the window cache and dense attention")
            shape = (self.persistent_tokens, Hkv, D)
            prefix = {f"prefix_{n}": self.param(f"persistent_{n}",
                                                init(self.init_std, (None, "heads", "kv")),
                                                shape, jnp.float32) for n in "kv"}
        # A named library kernel (cudnn, splash) takes no explicit positions, which decode
        # caches pass, nor prefix keys: there "auto" uses it where it can and XLA elsewhere.
        impl = ("auto" if (cache is not None or prefix) and self.impl in ("cudnn", "splash")
                else self.impl)
        attn = lambda q, k, v, **a: attention(q, k, v, window=self.window, sinks=sinks,
                                              impl=impl, **prefix, **a)
        new_cache = None
        if cache is None:
            segment_ids = None if segment_ids is None else document_ids(segment_ids)
            if self.topk_blocks:
                o = self._topk(q, k, v, segment_ids)
            elif context_size(q.shape[1]) > 1:   # T split over the mesh's context axis
                o = self._over_context(q, k, v, segment_ids, sinks, prefix)
            else:
                o = attn(q, k, v, segment_ids=segment_ids)
        elif self.cache_policy == "cascade":
            kv = {n: cache[n] for n in CASCADE_KEYS}     # without the conv entries
            o, new_cache = cascade_attention(q_raw, k_raw, v, kv, cache_pos,
                                             sinks=self.cache_sinks,
                                             score_decay=self.score_decay,
                                             positions=self.cache_positions,
                                             fill=self.cache_fill, rope_theta=self.rope_theta,
                                             sink_logits=sinks)
        elif "slot_pos" in cache:
            o, new_cache = self._ring(attn, q, k, v, cache, cache_pos)
        else:
            T, L = x.shape[1], cache["k"].shape[1]
            ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                     cache_pos, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                     cache_pos, axis=1)
            ck_, cv_ = ck.astype(q.dtype), cv.astype(q.dtype)
            if self.topk_blocks:
                o = self._topk_cached(attn, q, ck_, cv_, cache_pos)
            else:
                slots = jnp.arange(L, dtype=jnp.int32)
                o = attn(q, ck_, cv_, q_positions=cache_pos + jnp.arange(T, dtype=jnp.int32),
                         kv_positions=jnp.where(slots < cache_pos + T, slots, -1))
            new_cache = {"k": ck, "v": cv}
        if gate is not None:
            o = o * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(o.dtype)
        o = constrain(o, ("batch", "length", "heads", "kv"))
        y = dense(self.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o_proj", **kw)(o)
        if new_cache is not None:
            new_cache.update(conv_cache)
        return y, new_cache

    def _over_context(self, q, k, v, doc_ids, sinks, prefix):
        """The full forward with T split over the context axis (`common.context_attention`):
        sliding windows up to a slice long take the previous device's last window − 1 keys,
        everything else all-gathers K/V. The queries' positions are explicit there, which the
        library kernels (cudnn, splash) do not take: "auto" instead."""
        impl = "auto" if self.impl in ("cudnn", "splash") else self.impl

        def attend(q, k, v, sinks, prefix, **mask):
            return attention(q, k, v, window=self.window, sinks=sinks, impl=impl, **prefix,
                             **mask)

        return context_attention(attend, q, (k, v), doc_ids, window=self.window,
                                 replicated=(sinks, prefix))

    def _topk(self, q, k, v, segment_ids):
        return topk_block_attention(q, k, v, self.topk_blocks, block_size=self.topk_block_size,
                                    window=self.topk_window or None, score=self.topk_score,
                                    segment_ids=segment_ids,
                                    impl="reference" if self.impl == "reference" else "auto")

    def _topk_cached(self, attn, q, ck, cv, cache_pos):
        B, T, H, D = q.shape
        L, Hkv = ck.shape[1], ck.shape[2]
        if T > 1:
            # Prefill / chunk: the queries in their slots of a cache-long sequence (the op
            # takes as many queries as keys); each selects for itself, so the other slots'
            # zero queries change nothing, and the blocks are those of the full forward.
            qf = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((B, L, H, D), q.dtype), q,
                                                     cache_pos, axis=1)
            return jax.lax.dynamic_slice_in_dim(self._topk(qf, ck, cv, None), cache_pos, T,
                                                axis=1)
        # Decode: the selection differs per kv head, the dense op's slot positions per batch
        # row, so each kv head becomes a batch row with its G query heads.
        kv_pos = decode_kv_positions(q, ck, cache_pos, self.topk_blocks,
                                     self.topk_block_size, self.topk_window or None,
                                     self.topk_score)
        G = H // Hkv
        rows = lambda x: x.transpose(0, 2, 1, 3).reshape(B * Hkv, L, 1, x.shape[-1])
        o = attn(q.reshape(B * Hkv, 1, G, D), rows(ck), rows(cv),
                 q_positions=cache_pos + jnp.arange(1, dtype=jnp.int32),
                 kv_positions=kv_pos.reshape(B * Hkv, L))
        return o.reshape(B, 1, H, -1)

    def _ring(self, attn, q, k, v, cache, cache_pos):
        T = q.shape[1]
        W = cache["slot_pos"].shape[0]
        new_pos = cache_pos + jnp.arange(T, dtype=jnp.int32)
        if T == 1:
            # Decode: the token overwrites the slot of position pos − W, which has just left
            # the window; then the ring holds exactly the keys the query sees.
            slot = cache_pos % W
            new_cache = {
                "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                         slot, axis=1),
                "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                         slot, axis=1),
                "slot_pos": jax.lax.dynamic_update_slice_in_dim(cache["slot_pos"], new_pos,
                                                                slot, axis=0),
            }
            o = attn(q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype),
                     q_positions=new_pos, kv_positions=new_cache["slot_pos"])
            return o, new_cache
        # Prefill / chunk. Only the first W − 1 new tokens can see the ring (what came before):
        # they attend to the ring and the new tokens together; the rest see new tokens only,
        # with contiguous positions, which the op serves in O(T · W) (window-sliced keys).
        n0 = min(T, W - 1)
        outs = []
        if n0:
            outs.append(attn(q[:, :n0],
                             jnp.concatenate([cache["k"].astype(q.dtype), k[:, :n0]], axis=1),
                             jnp.concatenate([cache["v"].astype(q.dtype), v[:, :n0]], axis=1),
                             q_positions=new_pos[:n0],
                             kv_positions=jnp.concatenate([cache["slot_pos"], new_pos[:n0]])))
        if T > n0:
            outs.append(attn(q[:, n0:], k, v))   # queries = the last T − n0 of the T keys
        o = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
        # Keep the last W new tokens (distinct slots), each in slot position % W.
        n = min(T, W)
        slots = new_pos[-n:] % W
        new_cache = {
            "k": cache["k"].at[:, slots].set(k[:, -n:].astype(cache["k"].dtype)),
            "v": cache["v"].at[:, slots].set(v[:, -n:].astype(cache["v"].dtype)),
            "slot_pos": cache["slot_pos"].at[slots].set(new_pos[-n:]),
        }
        return o, new_cache


def _attention_settings(windowed: bool) -> dict:
    # Named apart from the model-wide num_heads / head_dim / rope_theta, which config errors
    # name as ModelConfig fields.
    s = {"heads": Setting(None, int, "query heads (None: the model's num_heads)", optional=True),
         "head_size": Setting(None, int, "head width (None: the model's head_dim)",
                              optional=True),
         "num_kv_heads": Setting(None, int, "GQA key/value heads (None: heads)", optional=True),
         "rope_base": Setting(None, float, "RoPE base (None: the model's rope_theta)",
                              optional=True),
         "qkv_bias": Setting(False, bool, "biases on the q, k, v projections"),
         "output_gate": Setting(False, bool, "a per-head output gate o ⊙ σ(gate), the gate "
                                "from q_proj ([q | gate] per head; Qwen3-Next)"),
         "qk_norm": Setting(False, bool, "RMSNorm of q and k over each head before RoPE "
                            "(scale (1 + w) with the model's zero_centred_norms)"),
         "rope_fraction": Setting(1.0, float, "partial RoPE: the fraction of each head's dims "
                                  "rotated, the first int(head width · fraction) (Qwen3-Next: "
                                  "0.25)"),
         "sinks": Setting(False, bool, "a learned sink logit per head"),
         "cache": Setting("window", str, "decode cache, one of ('window', 'cascade'): every "
                          "key (a ring of `window` for swa), or a fixed-size cascading cache"),
         "cache_size": Setting(None, int, "cascade: slots in all (None: swa's window)",
                               optional=True),
         "cache_sinks": Setting(4, int, "cascade: first tokens, never evicted"),
         "cascades": Setting(4, int, "cascade: FIFO sub-buffers (1: sliding window + sinks)"),
         "score_decay": Setting(0.9999, float, "cascade: EMA decay of a slot's received "
                                               "attention, its importance (the reference's)"),
         "cache_positions": Setting("cache", str, f"cascade: RoPE positions, one of "
                                    f"{POSITIONS}: by place in the cache (the reference, "
                                    f"StreamingLLM) or the original stream positions"),
         "cache_fill": Setting("eager", str, f"cascade, one of {FILLS}: every cascade "
                               f"fills before selection starts (the reference), or selection "
                               f"from the first token")}
    if windowed:
        s["window"] = Setting(512, int, "keys each query sees, itself included")
    else:
        # Not on swa: its ring cache drops the blocks beyond the window a decode step would pick.
        s.update(
            topk_blocks=Setting(None, int, "training-free top-k block attention: earlier key "
                                "blocks each query token attends to, besides its own block and "
                                "the local window (None or 0: dense attention)", optional=True),
            topk_block_size=Setting(64, int, "top-k: tokens per block (a power of two)"),
            topk_window=Setting(64, int, "top-k: latest tokens always seen, the query "
                                         "included (0: only the own block)"),
            topk_score=Setting("bound", str, f"top-k: how a key block is scored for a "
                                             f"query, one of {SCORES}: Quest's bound at the "
                                             f"GQA group's best head, or the means' dot "
                                             f"product"))
    return {**s, **conv_settings(False)}


def _cache_size(s) -> Optional[int]:
    return s["cache_size"] if s["cache_size"] is not None else s.get("window")


def _own(shared: Shared, s) -> Shared:
    """The model-wide values with this mechanism's own heads, head width and RoPE base."""
    return dataclasses.replace(shared, num_heads=s["heads"] or shared.num_heads,
                               head_dim=s["head_size"] or shared.head_dim,
                               rope_theta=s["rope_base"] or shared.rope_theta)


def check_own_heads(shared: Shared, s) -> None:
    """The checks of an attention mechanism's own `heads`, `head_size`, `num_kv_heads` and
    `rope_base` (shared with nsa, which has the same four)."""
    positive_int(s, "heads", "head_size", "num_kv_heads")
    if s["rope_base"] is not None and not s["rope_base"] > 0:
        raise SettingError("rope_base", f"must be > 0, got {s['rope_base']}")
    if s["head_size"] is not None and s["head_size"] % 2:
        raise SettingError("head_size", f"must be even for RoPE, got {s['head_size']}")
    shared = _own(shared, s)
    if s["num_kv_heads"] is not None and shared.num_heads % s["num_kv_heads"]:
        raise SettingError("num_kv_heads", f"must divide {'heads' if s['heads'] else 'num_heads'}"
                                           f" = {shared.num_heads}, got {s['num_kv_heads']}")
    check_rope_head_dim(shared)


def _check_attention(shared: Shared, s) -> None:
    positive_int(s, "conv_size", *(("window",) if "window" in s else ()))
    check_own_heads(shared, s)
    if not 0 < s["rope_fraction"] <= 1:
        raise SettingError("rope_fraction", f"must be in (0, 1], got {s['rope_fraction']}")
    rot = rotary_dims(_own(shared, s).head_dim, s["rope_fraction"])
    if rot < 2 or rot % 2:
        raise SettingError("rope_fraction", f"rotates int({_own(shared, s).head_dim} · "
                                            f"{s['rope_fraction']}) = {rot} dims: must be an "
                                            f"even number >= 2")
    if s["rope_fraction"] < 1 and s["cache"] == "cascade":
        raise SettingError("rope_fraction", "partial RoPE with cache='cascade' is not built "
                                            "(the cascading cache rotates whole heads itself)")
    if s["cache"] not in ("window", "cascade"):
        raise SettingError("cache", f"must be one of ('window', 'cascade'), got {s['cache']!r}")
    positive_int(s, "cascades", "cache_size")
    if not 0 <= s["cache_sinks"] <= MAX_INT:
        raise SettingError("cache_sinks", f"must be in [0, 2**31 - 1], got {s['cache_sinks']!r}")
    if not 0 <= s["score_decay"] < 1:
        raise SettingError("score_decay", f"must be in [0, 1) (1 leaves every importance 0), "
                                          f"got {s['score_decay']}")
    if s["cache_positions"] not in POSITIONS:
        raise SettingError("cache_positions", f"must be one of {POSITIONS}, got "
                                              f"{s['cache_positions']!r}")
    if s["cache_fill"] not in FILLS:
        raise SettingError("cache_fill", f"must be one of {FILLS}, got {s['cache_fill']!r}")
    if s["cache"] == "cascade":
        if _cache_size(s) is None:
            raise SettingError("cache_size", "attn with cache='cascade' needs a cache_size")
        try:
            cascade_layout(_cache_size(s), s["cache_sinks"], s["cascades"])
        except ValueError as e:
            raise SettingError("cache_size", str(e)) from None
    if "topk_blocks" in s:
        _check_topk(s)


def _check_topk(s) -> None:
    positive_int(s, "topk_block_size")
    if s["topk_block_size"] & (s["topk_block_size"] - 1):
        raise SettingError("topk_block_size", f"must be a power of two, got "
                                              f"{s['topk_block_size']}")
    if not 0 <= s["topk_window"] <= MAX_INT:
        raise SettingError("topk_window", f"must be in [0, 2**31 - 1], got {s['topk_window']}")
    if s["topk_score"] not in SCORES:
        raise SettingError("topk_score", f"must be one of {SCORES}, got {s['topk_score']!r}")
    if not s["topk_blocks"]:    # None or 0: dense attention
        return
    positive_int(s, "topk_blocks")
    if s["sinks"]:
        raise SettingError("topk_blocks", "top-k block attention has no attention sinks "
                                          "(block_sparse_attention takes none)")
    if s["cache"] != "window":
        raise SettingError("topk_blocks", f"top-k block attention needs cache='window' (the "
                                          f"full cache), got {s['cache']!r}")


def _build_attention(shared: Shared, s, name):
    shared = _own(shared, s)
    return Attention(d_model=shared.d_model, num_heads=shared.num_heads,
                     num_kv_heads=s["num_kv_heads"] or shared.num_heads,
                     head_dim=shared.head_dim, window=s.get("window"),
                     rope_theta=shared.rope_theta, use_sinks=s["sinks"],
                     use_short_conv=s["short_conv"], conv_size=s["conv_size"],
                     qkv_bias=s["qkv_bias"], cache_policy=s["cache"],
                     cache_size=_cache_size(s), cache_sinks=s["cache_sinks"],
                     cascades=s["cascades"], score_decay=s["score_decay"],
                     cache_positions=s["cache_positions"], cache_fill=s["cache_fill"],
                     topk_blocks=s.get("topk_blocks") or 0, output_gate=s["output_gate"],
                     qk_norm=s["qk_norm"], zero_centred_norms=shared.zero_centred_norms,
                     norm_eps=shared.norm_eps,
                     rotary_dim=rotary_dims(shared.head_dim, s["rope_fraction"]),
                     **{f: s[f] for f in ("topk_block_size", "topk_window", "topk_score")
                        if f in s},
                     init_std=shared.init_std, dtype=shared.dtype, impl=shared.attn_impl,
                     name=name)


def _context_parallel(s) -> Optional[str]:
    """Whether the full forward can split T over the context axis: dense attention can
    (`Attention._over_context`), top-k block attention cannot."""
    if s.get("topk_blocks"):
        return "top-k block attention (topk_blocks) has no context-parallel path"
    return None


register(Mechanism("attn", "token", _build_attention, _attention_settings(False),
                   _check_attention, "causal softmax attention (RoPE, GQA)",
                   attention_span=lambda s, T: T, context_parallel=_context_parallel))
register(Mechanism("swa", "token", _build_attention, _attention_settings(True),
                   _check_attention, "sliding-window softmax attention",
                   attention_span=lambda s, T: min(s["window"], T),
                   context_parallel=_context_parallel))
