"""Generation through an explicit cache: one prefill over the prompt, then one O(1) step per
token for recurrent mixers (a ring buffer of `window` entries for swa, a preallocated buffer
for full attention). Segment-recurrent models (RMT, ARMT) hold the memory and one segment's
cache, and run the write pass at each segment boundary (mem_lm/segments.py, "Decoding").

    out = generate(model, variables, prompt, max_new_tokens, temperature=0.0,
                   top_k=None, top_p=None, rng=None)       # [B, T0 + max_new_tokens]

Lower level (what eval.bench_decode times):
    last_logits, cache = prefill(model, variables, prompt, max_len)     # jitted
    logits, cache = decode_step(model, variables, tokens [B], cache)     # jitted, cache donated
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mem_lm.model import init_cache


def sample_logits(logits, rng, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else softmax sampling
    with optional top-k and nucleus (top-p) truncation."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3))
def prefill(model, variables, prompt, max_len: int):
    """Run the prompt [B, T0] through an empty cache sized for `max_len` tokens in total.
    Returns (logits of the last prompt token [B, V], cache)."""
    cache = init_cache(model.config, prompt.shape[0], max_len)
    logits, cache = model.apply(variables, prompt, cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def decode_step(model, variables, tokens, cache):
    """One token per row: tokens [B] -> (logits [B, V], cache)."""
    logits, cache = model.apply(variables, tokens[:, None], cache=cache)
    return logits[:, 0], cache


def generate(model, variables, prompt, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, rng=None):
    """The prompt int32 [B, T0] followed by `max_new_tokens` sampled tokens.
    `rng` defaults to PRNGKey(0) when sampling (temperature > 0)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"`prompt` must have shape [B, T0] with T0 >= 1, got {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"`top_k` must be in [1, vocab_size], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    if max_new_tokens == 0:
        return prompt
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model, variables, prompt, rng, max_new_tokens, float(temperature),
                     top_k, top_p)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(model, variables, prompt, rng, max_new_tokens, temperature, top_k, top_p):
    B, T0 = prompt.shape
    cache = init_cache(model.config, B, T0 + max_new_tokens)
    logits, cache = model.apply(variables, prompt, cache=cache)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    rng, sub = jax.random.split(rng)
    first = sample(logits[:, -1], sub)

    def body(carry, _):
        tok, cache, rng = carry
        logits, cache = model.apply(variables, tok[:, None], cache=cache)
        rng, sub = jax.random.split(rng)
        return (sample(logits[:, 0], sub), cache, rng), tok

    (last, _, _), toks = jax.lax.scan(body, (first, cache, rng), None,
                                      length=max_new_tokens - 1)
    return jnp.concatenate([prompt, toks.T, last[:, None]], axis=1)
