"""The peers of `eval.bench_ops` in PyTorch: fla's Triton kernels and torch's flash attention.

    python -m eval.bench_fla --shapes 4x4096 1x32768 --heads 16 --head_dim 128 \\
        --dtype bfloat16 --reps 10 --time_budget 150 [--ops gdn la_g la_gk attn] [--unsafe_bwd]

`eval.bench_ops` runs this in a subprocess of its own (JAX and torch never share a process:
both want the GPU's memory and their allocators do not know of each other). It prints one JSON
object per line on stdout — first {"env": ...}, then one per (op, shape) — and everything meant
for people on stderr. Neither torch nor fla is a dependency of this project: without them (or
without CUDA) every cell is reported as skipped, with the reason.

Peers, on the same [B, T, H, D] layout and sizes as our ops (fla-core 0.6.0's API):

    gdn    fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta)
    la_g   fla.ops.simple_gla.chunk_simple_gla(q, k, v, g)            (g [B, T, H])
    la_gk  fla.ops.gla.chunk_gla(q, k, v, g)                          (g [B, T, H, K])
    kda    fla.ops.kda.chunk_kda(q, k, v, g, beta)                    (g [B, T, H, K])
    nsa    fla.ops.nsa.parallel_nsa(q, k, v, block_indices=..., block_counts=S, block_size)
           (the selected branch alone: no gates, no window; k, v with H / 16 heads and the
           block indices of nsa_block_indices, in fla's [B, T, Hkv, S] layout)
    attn   torch SDPA, causal, flash backend only (its [B, H, T, D] layout)

Gates are float32 log decays, as fla's own layers pass them; q, k, v (and β) in --dtype; k is
L2-normalised, as in bench_ops. Each cell: one warm-up call of the forward and one of the
forward+backward (fla autotunes its Triton kernels on these: a minute or more for the first
shape of an op), then the median of --reps calls of each, bracketed by torch.cuda.synchronize.
peak_mb: torch's peak allocation during one forward+backward above what was allocated before
it (the inputs), as bench_ops reports JAX's.

fla 0.6.0 refuses the gated backward (gdn, la_g) on Hopper under Triton < 3.7.1, whose compiler
gets it wrong (fla issue #640). With --unsafe_bwd that guard is lifted so that the backward is
*timed* all the same, and the cell says so in `fwd_bwd_note`: its gradients are not to be
trusted, only its speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

OPS = ("gdn", "attn", "kda", "nsa", "la_g", "la_gk")   # in this order: the headline first
PEER = {"gdn": "fla chunk_gated_delta_rule", "la_g": "fla chunk_simple_gla",
        "la_gk": "fla chunk_gla", "kda": "fla chunk_kda", "nsa": "fla parallel_nsa",
        "attn": "torch sdpa flash"}
GUARD_MESSAGE = "< 3.7.1 on Hopper"   # in fla's RuntimeError from the gated backward guard
NSA_S, NSA_BLOCK, NSA_GROUP = 16, 64, 16    # NSA's selection: blocks per token, block, GQA


def parse_shape(text: str) -> tuple:
    """'4x4096' -> (4, 4096)."""
    try:
        B, T = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BxT, e.g. 4x4096; got {text!r}") from None
    if B < 1 or T < 1:
        raise argparse.ArgumentTypeError(f"B and T must be >= 1, got {text!r}")
    return B, T


def error_text(e: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', for one-line reports."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


def nsa_block_indices(T: int, xp):
    """Integers [T, NSA_S]: the key blocks token t lists, spread evenly over blocks 0 ... t's own
    (all of them, then T as padding, while there are at most NSA_S); `xp` numpy-like (jnp,
    torch)."""
    t = xp.arange(T)[:, None]
    j = xp.arange(NSA_S)[None, :]
    b = t // NSA_BLOCK
    spread = (b * j + (NSA_S - 1) // 2) // (NSA_S - 1)
    early = xp.where(j <= b, j, T + 0 * j)
    return xp.where(b + 1 <= NSA_S, early, spread)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def log(msg: str) -> None:
    print(f"bench_fla: {msg}", file=sys.stderr, flush=True)


def _versions() -> tuple:
    """(env dict, reason every fla cell is skipped or None, reason every cell is skipped or None)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - report why, whatever it is
        return {}, None, f"torch not importable ({error_text(e)})"
    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        return env, None, "torch sees no CUDA device"
    env["device"] = torch.cuda.get_device_name(0)
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"not importable: {e}"
    try:
        import fla
        env["fla"] = fla.__version__
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
        from fla.ops.gla import chunk_gla  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return env, f"fla not importable ({error_text(e)})", None
    return env, None, None


def make_call(op: str, B: int, T: int, H: int, D: int, dtype_name: str):
    """(forward(): o, the input tensors that need gradients, cotangent of o)."""
    import torch
    import torch.nn.functional as F

    dev, dtype = "cuda", getattr(torch, dtype_name)
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, device=dev, generator=gen, dtype=torch.float32).to(dt)

    def log_decay(*shape):   # log of U(0.9, 1), as bench_ops draws them
        u = torch.rand(*shape, device=dev, generator=gen, dtype=torch.float32)
        return torch.log(0.9 + 0.1 * u)

    if op == "attn":
        q, k, v = (rand(B, H, T, D) for _ in range(3))
        leaves = [q, k, v]

        def forward():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif op == "nsa":
        from fla.ops.nsa import parallel_nsa
        Hkv = max(H // NSA_GROUP, 1)
        q, k, v = rand(B, T, H, D), rand(B, T, Hkv, D), rand(B, T, Hkv, D)
        leaves = [q, k, v]
        idx = nsa_block_indices(T, torch).to(dev)
        block_indices = idx[None, :, None, :].expand(B, T, Hkv, NSA_S).contiguous()

        def forward():
            return parallel_nsa(q, k, v, block_indices=block_indices, block_counts=NSA_S,
                                block_size=NSA_BLOCK)
    else:
        q, v = rand(B, T, H, D), rand(B, T, H, D)
        k = F.normalize(rand(B, T, H, D, dt=torch.float32), dim=-1).to(dtype)
        leaves = [q, k, v]
        if op == "kda":
            from fla.ops.kda import chunk_kda
            gk = log_decay(B, T, H, D)
            beta = torch.rand(B, T, H, device=dev, generator=gen).to(dtype)
            leaves += [gk, beta]

            def forward():
                return chunk_kda(q, k, v, gk, beta)[0]
        elif op == "gdn":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            g = log_decay(B, T, H)
            beta = torch.rand(B, T, H, device=dev, generator=gen).to(dtype)
            leaves += [g, beta]

            def forward():
                return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=False)[0]
        elif op == "la_g":
            from fla.ops.simple_gla import chunk_simple_gla
            g = log_decay(B, T, H)
            leaves.append(g)

            def forward():
                return chunk_simple_gla(q, k, v, g=g)[0]
        else:
            from fla.ops.gla import chunk_gla
            gk = log_decay(B, T, H, D)
            leaves.append(gk)

            def forward():
                return chunk_gla(q, k, v, gk)[0]
    for x in leaves:
        x.requires_grad_(True)
    do = rand(*((B, H, T, D) if op == "attn" else (B, T, H, D)))
    return forward, leaves, do


def median_ms(fn, reps: int) -> float:
    import torch
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def lift_gated_bwd_guard() -> None:
    """Let fla run its gated backward under Triton < 3.7.1 on Hopper (timing only)."""
    import fla.ops.common.chunk_o as chunk_o
    chunk_o.TRITON_ABOVE_3_7_1 = True


def run_cell(op, B, T, H, D, dtype, reps, unsafe_bwd) -> dict:
    import torch

    r = {"op": op, "B": B, "T": T, "impl": PEER[op]}
    forward, leaves, do = make_call(op, B, T, H, D, dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        forward()                       # autotunes the forward kernels
    torch.cuda.synchronize()

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        forward().backward(do)

    try:
        fwd_bwd()                       # autotunes the backward kernels
    except RuntimeError as e:
        if GUARD_MESSAGE not in str(e):
            raise
        if not unsafe_bwd:
            r["fwd_bwd_skipped"] = f"fla refuses its backward here: {error_text(e)}"
        else:
            lift_gated_bwd_guard()
            r["fwd_bwd_note"] = ("timed with fla's Triton<3.7.1/Hopper guard lifted: its "
                                 "gradients are known wrong there (fla #640); speed only")
            fwd_bwd()
    torch.cuda.synchronize()
    r["warmup_s"] = time.perf_counter() - t0
    with torch.no_grad():
        r["fwd_ms"] = median_ms(forward, reps)
    if "fwd_bwd_skipped" not in r:
        r["fwd_bwd_ms"] = median_ms(fwd_bwd, reps)
        for x in leaves:        # the base is the inputs alone, as in bench_ops
            x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        r["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return r


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_fla", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[(4, 4096), (1, 32768)],
                    help="BxT")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--time_budget", type=float, default=None,
                    help="seconds; no cell is started past it")
    ap.add_argument("--unsafe_bwd", action="store_true",
                    help="time fla's gated backward even where fla refuses it (see above)")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    env, no_fla, no_torch = _versions()
    emit({"env": env})
    ops = [op for op in OPS if op in args.ops]
    for op in ops:                       # an op's first shape pays its autotuning
        for B, T in args.shapes:
            base = {"op": op, "B": B, "T": T, "impl": PEER[op]}
            skip = no_torch or (no_fla if op != "attn" else None)
            elapsed = time.perf_counter() - start
            if not skip and args.time_budget is not None and elapsed > args.time_budget:
                skip = f"not started: {elapsed:.0f} s spent of --time_budget {args.time_budget:g}"
            if skip:
                log(f"{op} B={B} T={T}: skipped, {skip}")
                emit({**base, "skipped": skip})
                continue
            log(f"{op} B={B} T={T}: {PEER[op]} ...")
            try:
                r = run_cell(op, B, T, args.heads, args.head_dim, args.dtype, args.reps,
                             args.unsafe_bwd)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report, go on
                r = {**base, "error": error_text(e)}
                import torch
                torch.cuda.empty_cache()
            log(json.dumps(r))
            emit(r)


if __name__ == "__main__":
    main(sys.argv[1:])
