"""Per-token decode latency and cache size against context length, side by side.

    python -m eval.bench_decode [--contexts 1024 2048 ... 65536] [--quick] --out out/bench_decode

Models (same d_model, layers, heads, vocabulary; random weights):

    gdn      Gated DeltaNet + MLP in every layer        cache: O(1) states + conv inputs
    hybrid   Gated DeltaNet and sliding-window attention alternating (window `--window`)
    attn     softmax attention + MLP in every layer     cache: a buffer of every past token

For each context length C the cache is put in the state it has after C tokens (pos = C;
recurrent states, conv inputs and attention keys/values filled with random values, ring-buffer
slots holding positions C−W … C−1), so no C-token prefill is needed to time step C+1: a step's
cost depends on the cache's shape and `pos`, not on the values. `mem_lm.decode_step` (the jitted
step that `generate` also runs, cache donated) is called `--warmup` times and then timed over
`--steps` tokens, in interleaved rounds across the contexts (so a burst of load on a shared
machine hits every context alike); the table shows the median and the best ms/token, and
XLA's cost analysis of the compiled step (MB accessed), which does not depend on the load. Cache bytes are the cache pytree's size.
Full attention's buffer is allocated for C + warmup + steps tokens (generate preallocates
prompt + new tokens).

Writes bench_decode.json, decode_latency.png and cache_bytes.png into --out.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from eval import common

MODELS = {
    "gdn": ("gdn",),
    "hybrid": ("gdn", "swa"),
    "attn": ("attn",),
}


def filled_cache(cfg, batch: int, context: int, max_len: int, seed: int = 0):
    """The cache of `cfg` as after `context` tokens, filled with random values."""
    import jax
    import jax.numpy as jnp
    from mem_lm import init_cache

    cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(cache)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if name.endswith("['pos']"):
            out.append(jnp.asarray(context, jnp.int32))
        elif name.endswith("['slot_pos']"):
            W = leaf.shape[-1]
            p = np.arange(max(context - W, 0), context)
            slots = np.full(leaf.shape, -1, np.int32)
            slots[..., p % W] = p
            out.append(jnp.asarray(slots))
        else:
            x = 0.1 * rng.standard_normal(leaf.shape, dtype=np.float32)
            out.append(jnp.asarray(x).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def tree_bytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def compile_step(model, params, cache, batch: int):
    """`mem_lm.decode_step` compiled for this cache's shapes (the program `generate` runs)."""
    import jax.numpy as jnp
    from mem_lm import decode_step

    return decode_step.lower(model, params, jnp.zeros((batch,), jnp.int32), cache).compile()


def step_cost(compiled) -> dict:
    """XLA's own account of one decode step (deterministic, unlike timings on a busy host)."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return dict(step_MFLOP=ca.get("flops", float("nan")) / 1e6,
                    step_MB_accessed=ca.get("bytes accessed", float("nan")) / 1e6)
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return dict(step_MFLOP=None, step_MB_accessed=None)


def time_decode(steps_fn: dict, params, caches: dict, batch: int, warmup: int, steps: int,
                rounds: int = 5) -> dict:
    """(median, best) seconds per decode step for each context, running steps_fn[c] on
    caches[c]. The contexts are timed in interleaved rounds, so a burst of machine load hits
    them all alike."""
    import jax
    import jax.numpy as jnp

    toks = {c: jnp.zeros((batch,), jnp.int32) for c in caches}
    times = {c: [] for c in caches}

    def run(c, n, record):
        tok, cache, step = toks[c], caches[c], steps_fn[c]
        for _ in range(n):
            t0 = time.perf_counter()
            logits, cache = step(params, tok, cache)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            jax.block_until_ready(tok)
            if record:
                times[c].append(time.perf_counter() - t0)
        toks[c], caches[c] = tok, cache

    for c in caches:
        run(c, warmup, False)
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for c in caches:
            run(c, per_round, True)
    return {c: (float(np.median(t)), float(np.min(t))) for c, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    choices=list(MODELS) + [m for m in common.mixer_names() if m not in MODELS],
                    help="presets, or any registered token mixer (a model of that mixer alone)")
    ap.add_argument("--d_model", type=int, default=512)
    ap.add_argument("--num_layers", type=int, default=4)
    ap.add_argument("--num_heads", type=int, default=4)
    ap.add_argument("--vocab_size", type=int, default=256)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--quick", action="store_true",
                    help="small model, contexts 1k..8k, few steps (a smoke run)")
    ap.add_argument("--out", default="out/bench_decode")
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts = [c for c in args.contexts if c <= 8192] or [1024]
        args.d_model, args.num_layers, args.steps = 128, 2, 10
    if min(args.contexts) < 1:
        common.fail(f"--contexts must be positive, got {args.contexts}")

    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    import jax
    import jax.numpy as jnp
    from mem_lm import LanguageModel, ModelConfig, param_count
    from flax import linen as nn

    out = common.out_dir(args.out)
    rows, series_lat, series_mem = [], {}, {}
    for name in args.models:
        cfg = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model,
                          num_layers=args.num_layers, num_heads=args.num_heads,
                          pattern=MODELS.get(name, (name,)), mixers={"swa": {"window": args.window}},
                          dtype=args.dtype)
        model = LanguageModel(cfg)
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 8), jnp.int32)))
        caches, nbytes, costs, steps_fn, compiled = {}, {}, {}, {}, {}
        for ctx in args.contexts:
            max_len = ctx + args.warmup + args.steps + 1
            caches[ctx] = filled_cache(cfg, args.batch, ctx, max_len)
            nbytes[ctx] = tree_bytes(caches[ctx])
            shapes = str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), caches[ctx]))
            if shapes not in compiled:          # recurrent caches: one program for all contexts
                compiled[shapes] = compile_step(model, params, caches[ctx], args.batch)
            steps_fn[ctx] = compiled[shapes]
            costs[ctx] = step_cost(steps_fn[ctx])
        secs = time_decode(steps_fn, params, caches, args.batch, args.warmup, args.steps)
        del caches
        lat, mem = [], []
        for ctx in args.contexts:
            sec, sec_min = secs[ctx]
            rows.append(dict(model=name, pattern="+".join(cfg.pattern), params=param_count(cfg),
                             context=ctx, ms_per_token=1e3 * sec, ms_min=1e3 * sec_min,
                             cache_MiB=nbytes[ctx] / 2**20, **costs[ctx]))
            lat.append(1e3 * sec)
            mem.append(nbytes[ctx] / 2**20)
            print(f"{name:7s} context {ctx:6d}: {1e3 * sec:8.3f} ms/token "
                  f"(min {1e3 * sec_min:.3f}), "
                  f"cache {nbytes[ctx] / 2**20:9.2f} MiB", flush=True)
        series_lat[name] = (args.contexts, lat)
        series_mem[name] = (args.contexts, mem)

    summary = {}
    for name, (_, lat) in series_lat.items():
        mins = [r["ms_min"] for r in rows if r["model"] == name]
        traffic = [r["step_MB_accessed"] or float("nan") for r in rows if r["model"] == name]
        summary[name] = dict(median_max_over_min=max(lat) / min(lat),
                             median_last_over_first=lat[-1] / lat[0],
                             best_max_over_min=max(mins) / min(mins),
                             bytes_last_over_first=traffic[-1] / traffic[0])
    title = (f"decode on {jax.devices()[0].platform}, batch {args.batch}, d_model "
             f"{args.d_model}, {args.num_layers} layers, {args.dtype}")
    common.print_table(rows, ["model", "pattern", "params", "context", "ms_per_token",
                              "ms_min", "cache_MiB", "step_MB_accessed"], title=title)
    common.print_table([dict(model=k, **v) for k, v in summary.items()],
                       title="flatness across contexts (target for recurrent models: <= 1.10)")
    common.write_json(out / "bench_decode.json",
                      dict(args=vars(args), device=str(jax.devices()[0]), rows=rows,
                           summary=summary))
    series_best = {f"{k} (best)": (args.contexts, [r["ms_min"] for r in rows if r["model"] == k])
                   for k in series_lat}
    common.plot_lines(out / "decode_latency.png", {**series_lat, **series_best}, xlabel="context length (tokens)",
                      ylabel="ms / token (median, best)", title="per-token decode latency",
                      logx=True, logy=True)
    common.plot_lines(out / "cache_bytes.png", series_mem, xlabel="context length (tokens)",
                      ylabel="cache (MiB)", title="decode cache size", logx=True, logy=True)
    print(f"wrote {out}/bench_decode.json, decode_latency.png, cache_bytes.png")


if __name__ == "__main__":
    main()
