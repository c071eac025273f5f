"""LanguageModel: embed → pre-norm blocks (token mixer + channel mixer) → final RMSNorm → head.

Layer i's token mixer is pattern[i % len(pattern)], its channel mixer (the MLP slot)
channel_pattern[i % len(channel_pattern)]; both are built through the registry
(layers/registry.py) from the config's settings. Parameter names: layer_{i}/{mixer_norm,
mixer, mlp_norm, mlp}, or with scan_layers groups/block_{j}/... stacked over groups;
parameters a channel mixer shares across its layers (`memory_values`, see `shared_params`)
sit at the top level, once.

    logits = model.apply(variables, tokens, segment_ids=None)            # training / eval
    logits, cache = model.apply(variables, tokens, cache=cache)         # prefill / decode

segment_ids [B, T] int32: tokens with the same id in a row form one (contiguous) document;
a document starts wherever the id changes. Attention masks across documents; recurrent
mixers restart exactly: each row's documents become the ops' cu_seqlens (traced, vmapped over
rows), or, for a batch with a row of more documents than `layers.common.docs_per_row` allows,
a token-by-token scan that resets the state at each start; the short convs see zeros before
a start; RoPE positions restart at 0. Padding is just another id (0 by convention):
it is isolated like a document, and its logits are meaningless (mask them out of the loss).

The cache (see `init_cache`) is {"pos": int32 scalar (tokens seen), "layers": [...]}:
one dict per layer, or with scan_layers one dict per group position stacked over groups.
Under segment recurrence it also holds the memory, and "layers" covers the current segment only
(mem_lm/segments.py, "Decoding").
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import registry
from layers.common import constrain, init, segment_positions
from layers.norm import RMSNorm
from mem_lm.config import ModelConfig

# Collections the mechanisms `sow` auxiliary outputs into (layers/registry.py).
AUX_COLLECTIONS = (registry.AUX_LOSS, registry.AUX_POOLED, registry.AUX_METRICS)

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def compute_dtype(cfg: ModelConfig):
    return cfg.shared().dtype


def make_mixer(cfg: ModelConfig, name: str, module_name: Optional[str] = None):
    """The module of mechanism `name` (token or channel mixer) as this config sets it up;
    None for an empty channel slot."""
    return registry.get(name).build(cfg.shared(), cfg.settings(name), module_name)


def shared_params(cfg: ModelConfig) -> dict:
    """{name: (initialiser, shape)} of the parameters a channel mixer shares across its layers
    (memory_plus's value pool): its module's `shared_params()`. The model creates each once,
    outside the blocks (so scan_layers does not stack it), and passes it to every layer whose
    module declares it."""
    out: dict = {}
    for name in dict.fromkeys(cfg.channel_pattern):
        declared = getattr(make_mixer(cfg, name), "shared_params", dict)()
        for n, (fn, shape) in declared.items():
            if n in out and out[n][1] != shape:
                raise ValueError(f"channel mixers share parameter {n!r} with different shapes "
                                 f"{out[n][1]} and {shape}")
            out[n] = (fn, shape)
    return out


def block_norm(cfg: ModelConfig, name: str) -> RMSNorm:
    """A norm of the residual stream (before each mixer, the final one)."""
    return RMSNorm(cfg.norm_eps, compute_dtype(cfg), name=name,
                   zero_centred=cfg.zero_centred_norms)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """An empty decode cache for `batch` rows and at most `max_len` tokens in total. Under
    segment recurrence (`cfg.segments`) the cache of mem_lm.segments.init_segment_cache: the
    memory and one segment's block-stack cache, whatever `max_len`."""
    if cfg.segments is not None:
        from mem_lm.segments import init_segment_cache
        return init_segment_cache(cfg, batch, max_len)
    return {"pos": jnp.zeros((), jnp.int32), "layers": stack_cache(cfg, batch, max_len)}


def stack_cache(cfg: ModelConfig, batch: int, max_len: int) -> list:
    """The block stack's empty decode cache ("layers" of `init_cache`)."""
    per_pos = [make_mixer(cfg, cfg.layer_kinds(j)[0]).init_cache(batch, max_len)
               for j in range(cfg.group_size)]
    if cfg.scan_layers:
        layers = [jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_groups,) + a.shape), c)
                  for c in per_pos]
    else:
        layers = [per_pos[i % cfg.group_size] for i in range(cfg.num_layers)]
    return layers


class Block(nn.Module):
    """One pre-norm block. With `assoc` (ARMT's per-layer associative memory, segment
    recurrence only: mem_lm/segments.py) the block reads the memory into its input first and
    writes its output at the memory-token positions into it after (unless `assoc_ctx["write"]`
    is False: a decode step of segment tokens), and returns the updated memory in place of the
    cache, or (new cache, memory) with a cache; `assoc_ctx` holds what all layers share."""
    cfg: ModelConfig
    layer: int          # position in the group: chooses the token and channel mixer

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache_pos, cache, layer_idx, shared,
                 assoc=None, assoc_ctx=None):
        cfg = self.cfg
        token, channel = cfg.layer_kinds(self.layer)
        if assoc is not None:
            from mem_lm.segments import AssociativeMemory
            memory = AssociativeMemory(cfg, name="assoc")
            x = memory.read(x, assoc, assoc_ctx)
        h = block_norm(cfg, "mixer_norm")(x)
        y, new_cache = make_mixer(cfg, token, "mixer")(
            h, positions=positions, segment_ids=segment_ids, cache=cache, cache_pos=cache_pos,
            layer_idx=layer_idx)
        x = x + y.astype(x.dtype)
        mlp = make_mixer(cfg, channel, "mlp")
        if mlp is not None:
            kw = {n: shared[n] for n in getattr(mlp, "shared_params", dict)()}
            x = x + mlp(block_norm(cfg, "mlp_norm")(x), **kw).astype(x.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        if assoc is not None:
            if assoc_ctx.get("write", True):
                assoc = memory.write(x, assoc, assoc_ctx)
            return x, (assoc if cache is None else (new_cache, assoc))
        return x, new_cache


class Group(nn.Module):
    """One repetition of the patterns (the unit that scan_layers scans over)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache_pos, cache, group_idx, shared,
                 assoc=None, assoc_ctx=None):
        P = self.cfg.group_size
        block = _maybe_remat(Block, self.cfg)
        new = []
        for j in range(P):
            x, c = block(self.cfg, j, name=f"block_{j}")(
                x, positions, segment_ids, cache_pos, None if cache is None else cache[j],
                group_idx * P + j, shared, None if assoc is None else assoc[j], assoc_ctx)
            new.append(c)
        return x, (None if cache is None and assoc is None else new)


def _maybe_remat(cls, cfg: ModelConfig):
    if cfg.remat == "none":
        return cls
    return nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Stack(nn.Module):
    """The block stack and the final norm: embeddings [B, T, d] -> normed hidden states. Its
    parameters live in its parent's scope (`nn.share_scope`), so the paths are layer_{i} /
    groups and final_norm at the model's top level whether or not segments wrap it.

    `assoc` (ARMT, segment recurrence only): each layer's associative memory, laid out as the
    cache (a list over layers, or over group positions stacked over groups under scan_layers);
    the second output is then the updated memories instead of the new cache, or with a cache
    (decoding) per layer the pair (new cache, memory)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache_pos, layers_cache, shared,
                 assoc=None, assoc_ctx=None):
        cfg = self.cfg
        if cfg.scan_layers:
            Scanned = nn.scan(_maybe_remat(Group, cfg),
                              variable_axes={"params": 0, **{c: 0 for c in AUX_COLLECTIONS}},
                              split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0,
                                       nn.broadcast, 0, nn.broadcast),
                              length=cfg.num_groups,
                              metadata_params={nn.PARTITION_NAME: None})
            x, new_layers = Scanned(cfg, name="groups")(
                x, positions, segment_ids, cache_pos, layers_cache,
                jnp.arange(cfg.num_groups, dtype=jnp.int32), shared, assoc, assoc_ctx)
        else:
            block = _maybe_remat(Block, cfg)
            new_layers = []
            for i in range(cfg.num_layers):
                x, c = block(cfg, i, name=f"layer_{i}")(
                    x, positions, segment_ids, cache_pos,
                    None if layers_cache is None else layers_cache[i], jnp.int32(i), shared,
                    None if assoc is None else assoc[i], assoc_ctx)
                new_layers.append(c)
        x = block_norm(cfg, "final_norm")(x)
        return x, new_layers


class LanguageModel(nn.Module):
    config: ModelConfig

    def init_cache(self, batch: int, max_len: int) -> dict:
        return init_cache(self.config, batch, max_len)

    @nn.compact
    def __call__(self, tokens, segment_ids=None, cache=None):
        cfg = self.config
        dt = compute_dtype(cfg)
        B, T = tokens.shape
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for training on packed rows, not with a cache")
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=jnp.float32,
                         embedding_init=init(cfg.init_std, ("vocab", "embed")), name="embed")
        x = constrain(embed(tokens), ("batch", "length", "embed"))
        cache_pos = None
        if cache is not None:
            cache_pos = cache["pos"]
            positions = (cache_pos + jnp.arange(T, dtype=jnp.int32))[None]
        elif segment_ids is not None:
            segment_ids = segment_ids.astype(jnp.int32)
            positions = segment_positions(segment_ids)
        else:
            positions = jnp.arange(T, dtype=jnp.int32)[None]

        shared = {n: self.param(n, fn, shape, jnp.float32)
                  for n, (fn, shape) in shared_params(cfg).items()}
        layers_cache = None if cache is None else cache["layers"]
        new_cache = None
        if cfg.segments is not None:
            from mem_lm.segments import segment_decode, segment_forward
            if cache is None or self.is_initializing():
                x = segment_forward(self, cfg, x, segment_ids, shared)
            if cache is not None:       # the segment's cache, the memory (mem_lm/segments.py)
                x, new_cache = segment_decode(cfg, self.variables["params"], x, cache, shared)
        else:
            stack = Stack(cfg, name="stack")
            nn.share_scope(self, stack)
            x, new_layers = stack(x, positions, segment_ids, cache_pos, layers_cache, shared)
            if cache is not None:
                new_cache = {"pos": cache_pos + T, "layers": new_layers}

        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt,
                              param_dtype=jnp.float32,
                              kernel_init=init(cfg.init_std, ("embed", "vocab")),
                              name="lm_head")(x)
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, new_cache


@functools.lru_cache(maxsize=256)
def param_count(cfg: ModelConfig) -> int:
    """The exact number of parameters, from the shapes `init` creates (no arrays allocated)."""
    model = LanguageModel(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def apply_with_aux(model: "LanguageModel", variables, tokens, segment_ids=None):
    """Logits and the auxiliary outputs the mechanisms sowed in this forward:
    {"losses": {name: scalar}, "metrics": {name: scalar}}. An AUX_LOSS loss is summed over the
    layers that sowed it (each layer's term counts, as each router's does in Switch
    Transformers); an AUX_POOLED loss is its mechanism's function of all layers' statistics
    together (`registry.Mechanism.pooled_losses`); a metric is averaged over the layers. All are
    empty for a model whose mechanisms sow nothing."""
    logits, state = model.apply(variables, tokens, segment_ids=segment_ids,
                                mutable=list(AUX_COLLECTIONS))
    cfg = model.config
    if cfg.segments is not None:
        # Segment recurrence stacks every sowed value over the segments (the outermost axis):
        # average it out, so each loss and metric is per layer as without segments.
        state = jax.tree.map(lambda a: jnp.mean(jnp.asarray(a, jnp.float32), axis=0), state)
    by_name = lambda c: _by_name(state.get(c, {}), cfg.scan_layers)
    losses = {n: jnp.sum(v) for n, v in by_name(registry.AUX_LOSS).items()}
    losses.update(_pooled_losses(cfg, by_name(registry.AUX_POOLED)))
    metrics = {n: jnp.mean(v) for n, v in by_name(registry.AUX_METRICS).items()}
    return logits, {"losses": dict(sorted(losses.items())), "metrics": metrics}


def _by_name(tree, scanned: bool) -> dict:
    """Every value sowed under the same name, one row per layer: float32 [layers, n] (n = 1 for
    scalars). Under scan_layers (`scanned`) each leaf is stacked over the groups: a row each."""
    groups: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        # sow stores name -> (value, ...): the name is the last dict key on the path.
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        leaf = jnp.asarray(leaf, jnp.float32)
        rows = leaf.shape[0] if scanned else 1
        groups.setdefault(name, []).append(leaf.reshape(rows, -1))
    return {n: jnp.concatenate(v) for n, v in sorted(groups.items())}


def _pooled_losses(cfg: ModelConfig, stats: dict) -> dict:
    """The AUX_POOLED losses: each name's per-layer vectors [layers, n] passed to the function
    the config's mechanism declares for it, with that mechanism's settings."""
    stats = dict(stats)
    out = {}
    for mech in dict.fromkeys(tuple(cfg.pattern) + tuple(cfg.channel_pattern)):
        for name, fn in registry.get(mech).pooled_losses.items():
            if name in stats:
                out[name] = jnp.asarray(fn(cfg.settings(mech), stats.pop(name)), jnp.float32)
    if stats:
        raise ValueError(f"pooled statistics {sorted(stats)} were sowed, but no mechanism of "
                         f"the config declares a loss for them (Mechanism.pooled_losses)")
    return out
