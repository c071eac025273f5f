"""Titans MAG, memory as a gate (`titans_mag`; Behrouz et al. 2025, "Titans: Learning to
Memorize at Test Time", Sec. 4.2, Eq. 26–28): sliding-window attention with persistent memory
tokens and the long-term memory run side by side on the layer's input, and the memory gates the
attention:

  y = SW-Attn*(x)      the `swa` layer (RoPE, window `window`) whose every query also sees
                       `persistent_tokens` learned keys/values per head (no RoPE): the op's
                       prefix keys, the paper's "sliding window attention with prefix";
  m = LMM(x)           the `titans` layer (projections, short convs, the neural memory, output
                       norm and projection), reading with `memory_chunk` semantics;
  o = RMSNorm(y) ⊙ sigmoid(RMSNorm(m))   (`titans.gate_outputs`; each norm with its own scale).

The paper's Eq. 26 prepends the persistent tokens to the sequence, so the memory also reads and
writes them before x; here they are keys/values of the attention only, and the memory starts
from its learned initial state (a learned function of the parameters either way). Its ⊗ is
"any non-linear gating", with the outputs normalised by learnable vector-valued weights and a
non-linearity σ: the sigmoid of the normalised memory output gates the normalised attention
output here; lucidrains' MAC transformer with `neural_mem_gate_attn_output` multiplies the
attention output by sigmoid(memory output), unnormalised.

Packed documents (segment_ids): both branches restart at each document as `swa` and `titans` do
(the persistent tokens are no document's: every document sees them). Decode cache: the window
ring of `swa` and the memory state of `titans`, {"attn": ..., "memory": ...}.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from layers.attention import Attention
from layers.registry import Mechanism, Setting, SettingError, Shared, positive_int, register
from layers.rope import check_rope_head_dim
from layers.titans import _SETTINGS as _MEMORY_SETTINGS
from layers.titans import _check as _check_memory
from layers.titans import Titans, gate_outputs

MAX_PERSISTENT = 2**16


class TitansMAG(nn.Module):
    d_model: int
    num_heads: int
    head_dim: int
    window: int = 512
    persistent_tokens: int = 4
    rope_theta: float = 10000.0
    depth: int = 2
    expansion: float = 4.0
    chunk_size: int = 8
    lr_max: float = 1.0
    use_gate: bool = False
    conv_size: int = 4
    use_short_conv: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    attn_impl: str = "auto"

    def _branches(self, named: bool):
        # Unnamed: detached modules, for their init_cache outside any call.
        n = (lambda s: {"name": s}) if named else (lambda s: {"parent": None})
        attn = Attention(d_model=self.d_model, num_heads=self.num_heads,
                         num_kv_heads=self.num_heads, head_dim=self.head_dim, window=self.window,
                         rope_theta=self.rope_theta, persistent_tokens=self.persistent_tokens,
                         init_std=self.init_std, dtype=self.dtype, impl=self.attn_impl,
                         **n("attn"))
        memory = Titans(d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim,
                        depth=self.depth, expansion=self.expansion, chunk_size=self.chunk_size,
                        lr_max=self.lr_max, use_gate=self.use_gate, conv_size=self.conv_size,
                        use_short_conv=self.use_short_conv, norm_eps=self.norm_eps,
                        init_std=self.init_std, dtype=self.dtype, impl=self.impl, **n("memory"))
        return attn, memory

    def init_cache(self, batch: int, max_len: int) -> dict:
        attn, memory = self._branches(named=False)
        return {"attn": attn.init_cache(batch, max_len),
                "memory": memory.init_cache(batch, max_len)}

    @nn.compact
    def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_pos=None,
                 layer_idx=None):
        attn, memory = self._branches(named=True)
        kw = dict(positions=positions, segment_ids=segment_ids, cache_pos=cache_pos)
        y, attn_cache = attn(x, cache=None if cache is None else cache["attn"], **kw)
        m, memory_cache = memory(x, cache=None if cache is None else cache["memory"], **kw)
        o = gate_outputs(y, m, self.norm_eps, self.dtype)
        return o, None if cache is None else {"attn": attn_cache, "memory": memory_cache}


def persistent_setting(default: int) -> Setting:
    return Setting(default, int, f"learned key/value tokens per head that every query sees "
                                 f"(Titans' persistent memory; 0: none; at most "
                                 f"{MAX_PERSISTENT})")


def check_persistent(s) -> None:
    if not 0 <= s["persistent_tokens"] <= MAX_PERSISTENT:
        raise SettingError("persistent_tokens", f"must be in [0, {MAX_PERSISTENT}], got "
                                                f"{s['persistent_tokens']!r}")


_SETTINGS = {
    "window": Setting(512, int, "keys of the attention branch each query sees, itself "
                                "included (the persistent tokens besides)"),
    "persistent_tokens": persistent_setting(4),
    **_MEMORY_SETTINGS,
    "use_gate": Setting(False, bool, "the memory branch's own output gate o_proj(RMSNorm(o) ⊙ "
                                     "SiLU(W_g x)) before MAG's sigmoid gate (False: "
                                     "o_proj(RMSNorm(o)))"),
}


def _check(shared: Shared, s) -> None:
    check_rope_head_dim(shared)
    positive_int(s, "window")
    check_persistent(s)
    _check_memory(shared, s)


def _build(shared: Shared, s, name):
    return TitansMAG(d_model=shared.d_model, num_heads=shared.num_heads,
                     head_dim=shared.head_dim, window=s["window"],
                     persistent_tokens=s["persistent_tokens"], rope_theta=shared.rope_theta,
                     depth=s["depth"], expansion=s["expansion"], chunk_size=s["memory_chunk"],
                     lr_max=s["lr_max"], use_gate=s["use_gate"], conv_size=s["conv_size"],
                     use_short_conv=s["short_conv"], norm_eps=shared.norm_eps,
                     init_std=shared.init_std, dtype=shared.dtype, impl=shared.impl,
                     attn_impl=shared.attn_impl, name=name)


register(Mechanism("titans_mag", "token", _build, _SETTINGS, _check,
                   "Titans MAG: sliding-window attention with persistent memory tokens, gated "
                   "by the neural long-term memory run beside it",
                   attention_span=lambda s, T: min(s["window"], T) + s["persistent_tokens"]))
