"""NSA's selection granularity: the `nsa` layer with per-token selection (the paper's, the
default) against block-granular selection (`selection="block"`: one selection per query block
of sel_block tokens, ranked by the previous block's queries), forward and forward + backward
time, side by side in one run, as ratios.

    python -m eval.bench_nsa [--seq_lens 1024 4096] [--d_model 256] [--heads 16]
                             [--kv_heads 1] [--head_dim 32] [--impl auto] [--reps 3]
                             [--out out/bench_nsa]

The layer runs at the paper's block settings (compressed blocks of 32 at stride 16, 16
selected blocks of 64, window 512), B = 1, float32, `impl` for the selected branch's op
(auto: pallas on GPU / TPU, xla on CPU). Per (selection, T): the best of --reps calls of the
jitted forward and of the jitted gradient of <y, random cotangent> w.r.t. the parameters
and x, after a warm-up call (compile time excluded). Ratio: token time / block time (> 1:
block selection is faster). Writes bench_nsa.json.
"""
from __future__ import annotations

import argparse

import numpy as np

from eval import common
from eval.bench_attention import machine, timed

SELECTIONS = ("token", "block")


def programs(selection, args, T):
    """(jitted forward, jitted gradient, their inputs) of the layer with `selection`."""
    import jax
    import jax.numpy as jnp

    from layers.nsa import NSA
    layer = NSA(d_model=args.d_model, num_heads=args.heads, num_kv_heads=args.kv_heads,
                head_dim=args.head_dim, selection=selection, impl=args.impl)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, T, args.d_model)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((1, T, args.d_model)), jnp.float32)
    pos = jnp.arange(T)[None]
    params = layer.init(jax.random.PRNGKey(0), x[:, :8], positions=pos[:, :8])
    fwd = jax.jit(lambda p, x: layer.apply(p, x, positions=pos)[0])
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(fwd(p, x) * ct), argnums=(0, 1)))
    return fwd, grad, (params, x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv_heads", type=int, default=1)
    ap.add_argument("--head_dim", type=int, default=32)
    ap.add_argument("--impl", default="auto", choices=["auto", "reference", "xla", "pallas"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="out/bench_nsa")
    args = ap.parse_args(argv)
    rows = []
    for T in args.seq_lens:
        ms = {}
        for selection in SELECTIONS:
            fwd, grad, inputs = programs(selection, args, T)
            ms[selection] = (1e3 * timed(fwd, inputs, args.reps),
                             1e3 * timed(grad, inputs, args.reps))
        for selection in SELECTIONS:
            f, b = ms[selection]
            rows.append(dict(selection=selection, T=T, fwd_ms=f, fwd_bwd_ms=b,
                             token_over_block_fwd=ms["token"][0] / ms["block"][0],
                             token_over_block_fwd_bwd=ms["token"][1] / ms["block"][1]))
    out = common.out_dir(args.out)
    common.print_table(rows, floatfmt=".3g", title=f"nsa selection: token vs block ({machine()})")
    common.write_json(out / "bench_nsa.json", dict(machine=machine(), args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
