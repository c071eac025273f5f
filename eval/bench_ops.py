"""Speed, memory and compile time of the ops, every implementation side by side, with the
peers a user would otherwise pick (fla's Triton kernels, torch's flash attention) on GPU.

    python -m eval.bench_ops [--backend cpu|gpu|tpu] [--quick] [--ops gdn kda la_g la_gk nsa attn]
                             [--impls xla pallas ...] [--shapes 4x4096 1x32768]
                             [--time_budget SECONDS] [--out out/bench_ops]

Ops: the gated delta rule with g and β (`gdn`) and with per-key decays gk and β (`kda`, Kimi
Delta Attention), linear attention with a per-head decay g (`la_g`) and with per-key decays gk
(`la_gk`, GLA), NSA's selected-block branch (`nsa`: `block_sparse_attention` with per-token
selection, query_block_size 1, NSA_S = 16 key blocks of NSA_BLOCK = 64 per token, GQA groups of
NSA_GROUP = 16 query heads per k/v head, as the paper; the blocks listed are spread evenly
over those at or before the token's own, the same rule in the fla peer), causal softmax
attention (`attn`, `pallas_kernels.attention.attention`), and Titans' neural memory
(`pallas_kernels.neural_memory`) with a matrix memory (`nm1`, depth 1) and an MLP memory (`nm2`, depth 2,
hidden width E = 4K as the `titans` layer's default expansion), both at the layer's default
memory chunk of 8 tokens (the chunk is part of that op's function) from a given initial memory.
Impls: those each op's package lists at run time (`pallas_kernels.common.IMPLS`,
`pallas_kernels.attention.IMPLS`) less "auto"; "reference" only on CPU (it keeps a state per token,
or all T² scores); no kernel where it would run in interpret mode (pallas on CPU, splash off
TPU) and no cuDNN off GPU (ELSEWHERE). --impls names others explicitly. An impl that fails
(cannot serve the call, out of memory) is reported with its error, and the run goes on.

Defaults per backend (each flag overrides):

    cpu       ops la_g la_gk gdn nm1 nm2; B=1, T = 1024 4096 16384 (--quick: 256 1024), H=4,
              K=V=64, float32, 3 reps
    gpu, tpu  ops gdn kda la_g la_gk nsa attn nm1 nm2; (B, T) = (4, 4096) and (1, 32768), H=16,
              K=V=128, bfloat16, 10 reps; on GPU also the peers of the ops that have one
              (python -m eval.bench_fla, run first in its own process, given --peer_budget
              seconds; the neural memory has none: fla's titans op is marked broken in its
              own tests)

Measured per cell (op, shape, impl):

- fwd ms, fwd+bwd ms: median wall time of --reps calls of the jitted forward (o only) and of
  the jitted gradient of <o, random cotangent> w.r.t. every input, after a warm-up call.
- compile s: lower + compile time of each of the two programs.
- XLA MB: `compiled.memory_analysis()` of the fwd+bwd program, temporaries + outputs (what the
  call needs beyond its inputs). Deterministic, on any backend.
- peak MB (GPU/TPU, where `device.memory_stats()` exists): the allocator's high-water mark
  during the first fwd+bwd call above what was in use before it. The allocator keeps only one
  process-wide peak, so when a cell stays below an earlier cell's peak only a bound is known:
  shown as "<=N".
- RSS MB (CPU, not with --quick): resident-memory growth during one fwd+bwd, sampled every
  millisecond in a fresh subprocess that already holds its inputs and compiled program.
- %mm: achieved FLOP/s as a share of this machine's matmul rate in the same dtype, measured
  in the same run before every cell (N×N @ N×N; N=2048 on CPU, 1024 with --quick, 8192
  elsewhere); the best of those is the rate, so on a shared, loaded machine %mm errs low.
- "× ref": the reference's fwd+bwd time over this impl's (when the reference ran);
  "fwd / peer", "f+b / peer": this impl's time over the peer's for the same op and shape
  (< 1: faster than the peer).

FLOP count (the same nominal count for every impl, so %mm ratios are speed ratios): the matrix
products of the chunked algorithm at chunk size C=64, per chunk of C tokens and head, 2 FLOPs
per multiply-add:

    la_g, la_gk:  2·(C²K [QKᵀ] + C²V [PV] + 2·CKV [read-out of and update to the state])
    gdn, kda:     2·(2·C²K [KKᵀ, QKᵀ] + C²(K+V) [UT transform applied to βV, βK]
                     + C²K + C²V [P·W, P·U] + CK² + CKV [Kdᵀ·W, Kdᵀ·U] + K²V [state pass]
                     + CKV [read-out])
    attn:         2·T²·K per head and sequence (QKᵀ and PV, causal: half of each)
    nsa:          2·2·S·B_s·K per query token and head (QKᵀ and PV over the S listed blocks of
                  B_s keys; the first tokens have fewer, not discounted)
    nm1, nm2:     per token and head (the chunk does not change the count): nm1
                  2·4·KV [errors K·M, the two weighted gradient sums (memory and momentum),
                  the read]; nm2 2·(4·KE + 5·EV) [K·W1, a·W2, e·W2ᵀ, the two weighted sums
                  for W1 and for W2, the read q·W1 and GELU(·)·W2]

(elementwise work — decays, masks, the C×C unit-triangular inverse, the softmax — is not
counted), and fwd+bwd = 3 × fwd. The token scan (`reference`) does fewer FLOPs (O(K·V) per
token), so its %mm under this count is its speed measured in chunked-algorithm units.

Time limits: a call whose time, extrapolated from the op/impl's previous shape (linearly in
B·T, quadratically in T for attn), exceeds --max_seconds is skipped; with --time_budget no
cell starts that would, by the same extrapolation (or the median cell so far), end past it.
Every skip and error is printed with its reason. Results are appended to bench_ops.jsonl as
each cell finishes (so a run killed from outside keeps them); the table, bench_ops.json and
bench_ops.png are written at the end.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from eval import common
from eval.bench_fla import (NSA_BLOCK, NSA_GROUP, NSA_S, PEER, error_text, nsa_block_indices,
                            parse_shape)

OPS = ("gdn", "kda", "la_g", "la_gk", "nsa", "attn", "nm1", "nm2")
C_NOMINAL = 64
NM_CHUNK, NM_EXPANSION = 8, 4       # the titans layer's default memory_chunk and expansion
NM_DEPTH = {"nm1": 1, "nm2": 2}
PRESETS = {
    "cpu": dict(ops=("la_g", "la_gk", "gdn", "nm1", "nm2"),
                shapes=[(1, 1024), (1, 4096), (1, 16384)],
                quick_shapes=[(1, 256), (1, 1024)], heads=4, head_dim=64, dtype="float32",
                reps=3, matmul_n=2048),
    "gpu": dict(ops=("gdn", "kda", "la_g", "la_gk", "nsa", "attn", "nm1", "nm2"),
                shapes=[(4, 4096), (1, 32768)],
                quick_shapes=[(1, 2048)], heads=16, head_dim=128, dtype="bfloat16", reps=10,
                matmul_n=8192),
}
PRESETS["tpu"] = PRESETS["gpu"]
# Impls not run unless asked for, per platform: kernels that would only run in interpret mode
# there (slow; the test suite covers that mode) or that need another platform's library.
ELSEWHERE = {"cpu": {"pallas", "splash", "cudnn"}, "gpu": {"splash"}, "tpu": {"cudnn"}}
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- workload
def nominal_flops(op: str, B: int, T: int, H: int, K: int, V: int,
                  fwd_only: bool = True) -> float:
    """The FLOP count defined in the module docstring."""
    C = C_NOMINAL
    if op == "attn":
        fwd = 2.0 * T * T * K * B * H
    elif op == "nsa":
        fwd = 4.0 * NSA_S * NSA_BLOCK * K * T * B * H
    elif op in NM_DEPTH:
        E = NM_EXPANSION * K
        per_token = 4 * K * V if op == "nm1" else 4 * K * E + 5 * E * V
        fwd = 2.0 * per_token * T * B * H
    else:
        if op in ("la_g", "la_gk"):
            per_chunk = C * C * K + C * C * V + 2 * C * K * V
        else:
            per_chunk = (2 * C * C * K + C * C * (K + V) + C * C * K + C * C * V + C * K * K
                         + C * K * V + K * K * V + C * K * V)
        fwd = 2.0 * per_chunk * (-(-T // C)) * B * H
    return fwd if fwd_only else 3.0 * fwd


def make_inputs(op: str, B: int, T: int, H: int, K: int, dtype, seed: int = 0,
                V: Optional[int] = None) -> dict:
    """Random inputs drawn on the device (numpy would spend seconds per cell at GPU sizes);
    v's head dim is V (default K); integer inputs (nsa's block indices) under "int"."""
    import jax
    import jax.numpy as jnp
    kq, kk, kv, kg, kb = jax.random.split(jax.random.PRNGKey(seed), 5)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
    log_decay = lambda shape: jnp.log(jax.random.uniform(kg, shape, jnp.float32, 0.9, 1.0))
    Hkv = max(H // NSA_GROUP, 1) if op == "nsa" else H
    k = normal(kk, (B, T, Hkv, K))
    if op not in ("attn", "nsa"):   # the delta rule expects unit keys; gated sums stay bounded
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    x = {"q": normal(kq, (B, T, H, K)), "k": k, "v": normal(kv, (B, T, Hkv, V or K))}
    if op == "nsa":
        x = {name: a.astype(dtype) for name, a in x.items()}
        x["int"] = {"block_indices": jnp.broadcast_to(
            nsa_block_indices(T, jnp).astype(jnp.int32), (B, Hkv, T, NSA_S))}
        return x
    if op in ("la_gk", "kda"):
        x["gk"] = log_decay((B, T, H, K))
    elif op != "attn":
        x["g"] = log_decay((B, T, H))
    if op in ("gdn", "kda"):
        x["beta"] = jax.random.uniform(kb, (B, T, H), jnp.float32)
    if op in NM_DEPTH:      # θ, η, α of a memory that neither explodes nor forgets at once
        del x["g"]
        u = lambda key, lo, hi: jax.random.uniform(key, (B, T, H), jnp.float32, lo, hi)
        kl, km, kd, k1, k2 = jax.random.split(kb, 5)
        x.update(lr=u(kl, 0.0, 0.1), momentum=u(km, 0.5, 0.9), decay=u(kd, 0.0, 0.05))
        V_ = V or K
        if op == "nm1":
            x["memory"] = normal(k1, (B, H, K, V_)) * K ** -0.5
        else:
            E = NM_EXPANSION * K
            x["memory"] = (normal(k1, (B, H, K, E)) * K ** -0.5,
                           normal(k2, (B, H, E, V_)) * E ** -0.5)
        # The state is float32 in the op whatever the inputs' dtype.
        return {name: (a if name == "memory" else a.astype(dtype)) for name, a in x.items()}
    return {name: a.astype(dtype) for name, a in x.items()}


def make_fns(op: str, impl: str, inputs: dict) -> tuple:
    """((jitted forward, its args), (jitted fwd+bwd, its args)) for one op/impl. The cotangent
    is an argument, not a constant: XLA would fold a constant of the size of o into the
    program, and take seconds to compile it."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention import attention
    from pallas_kernels.gated_delta_rule import gated_delta_rule
    from pallas_kernels.linear_attention import linear_attention
    from pallas_kernels.neural_memory import neural_memory
    from pallas_kernels.sparse_attention import block_sparse_attention

    def forward(x, ints):
        if op == "attn":
            return attention(x["q"], x["k"], x["v"], causal=True, impl=impl)
        if op == "nsa":
            return block_sparse_attention(x["q"], x["k"], x["v"], ints["block_indices"],
                                          block_size=NSA_BLOCK, query_block_size=1, impl=impl)
        if op in NM_DEPTH:
            return neural_memory(x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["decay"],
                                 depth=NM_DEPTH[op], chunk_size=NM_CHUNK,
                                 initial_state=(x["memory"], None), impl=impl)[0]
        if op in ("gdn", "kda"):
            return gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x.get("g"), x.get("gk"),
                                    impl=impl)[0]
        return linear_attention(x["q"], x["k"], x["v"], x.get("g"), x.get("gk"), impl=impl)[0]

    ints = inputs.get("int", {})
    floats = {n: a for n, a in inputs.items() if n != "int"}
    ct = jax.random.normal(jax.random.PRNGKey(1), floats["q"].shape[:3] + floats["v"].shape[-1:],
                           floats["v"].dtype)

    def loss(x, ints, ct):
        return jnp.sum(forward(x, ints).astype(jnp.float32) * ct.astype(jnp.float32))

    return ((jax.jit(forward), (floats, ints)),
            (jax.jit(jax.grad(loss)), (floats, ints, ct)))


def time_call(fn, args: tuple, reps: int) -> float:
    """Median wall seconds of `fn(*args)` over `reps` calls, after one warm-up call."""
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def xla_memory_mb(compiled) -> Optional[float]:
    try:
        m = compiled.memory_analysis()
        return (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
    except Exception:  # noqa: BLE001 - some backends have no memory analysis
        return None


def matmul_gflops(n: int, dtype, reps: int = 5) -> float:
    return 2.0 * n ** 3 / time_call(*_matmul(n, dtype), reps) / 1e9


@functools.cache
def _matmul(n: int, dtype) -> tuple:
    """(jitted a @ a, (a,)): made and compiled once, measured before every cell."""
    import jax
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    return jax.jit(lambda a: a @ a), (x,)


def _memory_stats(device) -> Optional[dict]:
    try:
        return device.memory_stats() or None
    except Exception:  # noqa: BLE001 - CPU devices have none
        return None


def timed_with_peak(device, compiled, args: tuple, reps: int) -> tuple:
    """(median seconds, peak MB or None, whether that peak is only an upper bound)."""
    before = _memory_stats(device)
    sec = time_call(compiled, args, reps)
    after = _memory_stats(device)
    if not before or not after or "peak_bytes_in_use" not in after:
        return sec, None, False
    in_use, peak0, peak1 = (before["bytes_in_use"], before["peak_bytes_in_use"],
                            after["peak_bytes_in_use"])
    if peak1 > peak0:
        return sec, (peak1 - in_use) / 2**20, False
    return sec, (peak0 - in_use) / 2**20, True


# ----------------------------------------------------------------------------- RSS subprocess
def _rss_child(spec: str) -> None:
    """Run in a subprocess: print the RSS growth (MB) of one fwd+bwd call, as JSON."""
    import threading

    import jax
    import jax.numpy as jnp
    import psutil

    s = json.loads(spec)
    inputs = make_inputs(s["op"], s["B"], s["T"], s["H"], s["K"], jnp.dtype(s["dtype"]))
    _, (fwd_bwd, args) = make_fns(s["op"], s["impl"], inputs)
    fwd_bwd = fwd_bwd.lower(*args).compile()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    out = fwd_bwd(*args)
    jax.block_until_ready(out)
    done.set()
    thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(json.dumps({"rss_growth_mb": (peak[0] - base) / 2**20}))


def rss_growth_mb(spec: dict, backend: str) -> Optional[float]:
    env = dict(os.environ, JAX_PLATFORMS=common.jax_platforms(backend))
    cmd = [sys.executable, "-m", "eval.bench_ops", "--_rss_child", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                             cwd=REPO)
        return json.loads(res.stdout.strip().splitlines()[-1])["rss_growth_mb"]
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"RSS measurement of {spec} failed: {e}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- peers
def run_peers(args, budget: float, log) -> list:
    """The peer cells from `python -m eval.bench_fla` in its own process, killed at `budget`
    seconds; a cell it did not report is recorded as skipped. Ops without a peer have none."""
    ops = [op for op in args.ops if op in PEER]
    if not ops:
        return []
    cmd = [sys.executable, "-m", "eval.bench_fla", "--ops", *ops,
           "--shapes", *[f"{B}x{T}" for B, T in args.shapes], "--heads", str(args.heads),
           "--head_dim", str(args.head_dim), "--dtype", args.dtype, "--reps", str(args.reps),
           "--time_budget", str(max(budget - 30.0, 0.0))]   # leaves its last cell 30 s
    if args.fla_unsafe_bwd:
        cmd.append("--unsafe_bwd")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.fla_path:   # fla (or a newer triton) on the torch process's path alone, not JAX's
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (args.fla_path, str(REPO), env.get("PYTHONPATH")) if p)
    print(f"peers: {' '.join(cmd[1:])} (budget {budget:.0f} s)", flush=True)
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
                             timeout=max(budget, 1.0)).stdout
        why_missing = "the peer process ended without reporting it"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        why_missing = f"the peer process was stopped at its budget ({budget:.0f} s)"
    got, env_info = {}, {}
    for line in out.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if "env" in obj:
            env_info = obj["env"]
        elif "op" in obj:
            got[(obj["op"], obj["B"], obj["T"])] = obj
    rows = []
    for op in ops:
        for B, T in args.shapes:
            r = got.get((op, B, T)) or {"op": op, "B": B, "T": T, "impl": PEER[op],
                                        "skipped": why_missing}
            r["peer"] = True
            rows.append(r)
            log(r)
    print(f"peer environment: {env_info}", flush=True)
    return rows


# ----------------------------------------------------------------------------- main
def op_impls(op: str, backend: str, requested: Optional[Sequence[str]]) -> list:
    """The impls to run for `op`: its package's IMPLS (read at run time) less "auto";
    by default none of ELSEWHERE[backend], and the reference only on CPU."""
    if op == "attn":
        from pallas_kernels.attention import IMPLS
    else:
        from pallas_kernels.common import IMPLS
    known = [i for i in IMPLS if i != "auto"]
    if requested:
        return [i for i in requested if i in known]
    drop = ELSEWHERE[backend] | (set() if backend == "cpu" else {"reference"})
    return [i for i in known if i not in drop]


def known_impls() -> set:
    from pallas_kernels.attention import IMPLS as attn_impls
    from pallas_kernels.common import IMPLS as op_impls_
    return set(attn_impls) | set(op_impls_)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.bench_ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=tuple(PRESETS), default="cpu")
    ap.add_argument("--ops", nargs="+", choices=OPS, help="default: per backend, see above")
    ap.add_argument("--impls", nargs="+", help="default: per op and backend, see above")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, help="BxT, e.g. 4x4096")
    ap.add_argument("--lengths", type=int, nargs="+", help="shorthand for --shapes 1xT ...")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--head_dim", type=int, help="K = V")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int)
    ap.add_argument("--max_seconds", type=float, default=60.0,
                    help="skip a call whose extrapolated time exceeds this")
    ap.add_argument("--time_budget", type=float, default=None,
                    help="seconds for the whole run (peers included); no cell starts that "
                         "would end past it")
    ap.add_argument("--peers", choices=("auto", "on", "off"), default="auto",
                    help="run fla / torch SDPA (python -m eval.bench_fla); auto: on GPU")
    ap.add_argument("--peer_budget", type=float, default=150.0,
                    help="seconds the peer process may take (within --time_budget)")
    ap.add_argument("--fla_path", default=None,
                    help="a folder put first on the peer process's PYTHONPATH only (e.g. "
                         "fla-core and a newer triton unpacked there)")
    ap.add_argument("--fla_unsafe_bwd", action="store_true",
                    help="time fla's gated backward where fla refuses it (eval.bench_fla)")
    ap.add_argument("--no_rss", action="store_true", help="skip the RSS subprocesses")
    ap.add_argument("--quick", action="store_true",
                    help="small shapes, no RSS subprocesses: a smoke run")
    ap.add_argument("--out", default="out/bench_ops")
    ap.add_argument("--_rss_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._rss_child:
        return args
    # Before anything imports jax (pallas_kernels does): jax reads it once, at import.
    os.environ["JAX_PLATFORMS"] = common.jax_platforms(args.backend)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    preset = PRESETS[args.backend]
    if args.shapes and args.lengths:
        common.fail("give --shapes or --lengths, not both")
    if args.lengths:
        args.shapes = [(1, T) for T in args.lengths]
    args.shapes = sorted(args.shapes or preset["quick_shapes" if args.quick else "shapes"],
                         key=lambda s: (s[0] * s[1], s[1]))
    args.ops = args.ops or list(preset["ops"])
    for name in ("heads", "head_dim", "dtype", "reps"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if min(min(s) for s in args.shapes) < 1 or args.reps < 1 or args.heads < 1:
        common.fail("--shapes/--lengths, --heads and --reps must be >= 1")
    unknown = set(args.impls or ()) - known_impls()
    if unknown:
        common.fail(f"--impls: unknown {sorted(unknown)}; known: {sorted(known_impls())}")
    args.matmul_n = 1024 if args.quick and args.backend == "cpu" else preset["matmul_n"]
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args._rss_child:
        _rss_child(args._rss_child)
        return {}
    start = time.perf_counter()
    deadline = None if args.time_budget is None else start + args.time_budget
    out = common.out_dir(args.out)
    jsonl = out / "bench_ops.jsonl"
    jsonl.write_text("")

    def log(record: dict) -> None:
        with jsonl.open("a") as f:
            f.write(json.dumps(common._jsonable(record)) + "\n")

    log({"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}})
    # Peers first, before JAX takes the GPU: the torch process then has the device alone.
    peers = []
    if args.peers == "on" or (args.peers == "auto" and args.backend == "gpu"):
        budget = args.peer_budget
        if deadline is not None:
            budget = min(budget, deadline - time.perf_counter())
        peers = run_peers(args, budget, log)

    import jax
    import jax.numpy as jnp
    try:
        device = jax.devices()[0]
    except RuntimeError as e:
        common.fail(f"--backend {args.backend}: no such device ({e})")
    dtype = jnp.dtype(args.dtype)
    H, K = args.heads, args.head_dim
    measure_rss = args.backend == "cpu" and not (args.quick or args.no_rss)
    log({"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__})

    impls = {op: op_impls(op, args.backend, args.impls) for op in args.ops}
    cells = [(op, B, T, impl) for B, T in args.shapes for op in args.ops for impl in impls[op]]
    results, notes, mm_rates = [], [], []
    last, costs = {}, []          # (op, impl, name) -> (size, seconds); seconds per cell

    def size(op, B, T):           # what a call's time grows with
        return B * T * (T if op == "attn" else 1)

    for op, B, T, impl in common.progress_bar(cells, desc="bench_ops"):
        r = {"op": op, "B": B, "T": T, "impl": impl}
        prev = last.get((op, impl, "cell"))
        est = (prev[1] * size(op, B, T) / prev[0]) if prev else (
            float(np.median(costs)) if costs else 0.0)
        if deadline is not None and time.perf_counter() + est > deadline:
            r["skipped"] = (f"--time_budget: ~{est:.0f} s needed, "
                            f"{max(deadline - time.perf_counter(), 0):.0f} s left")
        else:
            t_cell = time.perf_counter()
            mm_rates.append(matmul_gflops(args.matmul_n, dtype))
            try:
                _run_cell(r, op, B, T, impl, args, H, K, dtype, device, last, size)
            except Exception as e:  # noqa: BLE001 - unsupported here, out of memory, ...
                r["error"] = error_text(e)
            cost = time.perf_counter() - t_cell
            costs.append(cost)
            last[(op, impl, "cell")] = (size(op, B, T), cost)
            if "fwd_bwd_ms" in r and measure_rss and impl != "reference":
                r["rss_mb"] = rss_growth_mb(dict(op=op, impl=impl, B=B, T=T, H=H, K=K,
                                                 dtype=args.dtype), args.backend)
        for key in ("skipped", "error", "fwd_skipped", "fwd_bwd_skipped"):
            if key in r:
                notes.append(f"{op}/{impl} B={B} T={T}: {key}: {r[key]}")
                print(notes[-1], file=sys.stderr, flush=True)
        results.append(r)
        log(r)

    mm = max(mm_rates) if mm_rates else float("nan")
    print(f"{device.platform} ({device.device_kind}): {args.dtype} matmul {mm:.1f} GFLOP/s "
          f"(best of {len(mm_rates)}; median {np.median(mm_rates or [mm]):.1f})", flush=True)
    for r in results:
        for name in ("fwd", "fwd_bwd"):
            if f"{name}_gflops" in r:
                r[f"{name}_mm"] = r[f"{name}_gflops"] / mm
    for p in peers:
        for key in ("skipped", "error", "fwd_bwd_skipped", "fwd_bwd_note"):
            if key in p:
                notes.append(f"{p['op']}/{p['impl']} B={p['B']} T={p['T']}: {key}: {p[key]}")
    rows = _table_rows(results, peers)
    title = (f"{args.dtype}, H={H} K=V={K}; %mm = share of {mm:.0f} GFLOP/s {args.dtype} "
             f"matmul; XLA MB = temp+output of the compiled fwd+bwd; peer = fla "
             f"(gdn: chunk_gated_delta_rule, kda: chunk_kda, la_g: chunk_simple_gla, la_gk: "
             f"chunk_gla, nsa: parallel_nsa) or "
             f"torch SDPA flash (attn); / peer = our time over the peer's; nm1 / nm2 = "
             f"neural_memory depth 1 / 2 (E = {NM_EXPANSION}K), chunk {NM_CHUNK}")
    table = common.print_table(rows, floatfmt=",.3g", title=title)
    for n in notes:
        print(n)

    result = {"task": "bench_ops", "device": f"{device.platform} {device.device_kind}",
              "jax": jax.__version__, "matmul_gflops": mm, "matmul_gflops_all": mm_rates,
              "dtype": args.dtype, "heads": H, "head_dim": K,
              "shapes": [list(s) for s in args.shapes], "results": results, "peers": peers,
              "table": rows, "notes": notes, "markdown": table,
              "seconds": time.perf_counter() - start}
    common.write_json(out / "bench_ops.json", result)
    _plot(out / "bench_ops.png", results + peers, args, device)
    print(f"wrote {jsonl}, {out / 'bench_ops.json'} and {out / 'bench_ops.png'}")
    return result


def _run_cell(r, op, B, T, impl, args, H, K, dtype, device, last, size) -> None:
    """Fill `r` with one cell's measurements (see the module docstring)."""
    inputs = make_inputs(op, B, T, H, K, dtype)
    for name, (fn, fn_args) in zip(("fwd", "fwd_bwd"), make_fns(op, impl, inputs)):
        prev = last.get((op, impl, name))
        est = prev[1] * size(op, B, T) / prev[0] if prev else 0.0
        if est > args.max_seconds:
            r[f"{name}_skipped"] = (f"~{est:.0f} s per call extrapolated from the previous "
                                    f"shape (> --max_seconds {args.max_seconds:g})")
            continue
        t0 = time.perf_counter()
        compiled = fn.lower(*fn_args).compile()
        r[f"{name}_compile_s"] = time.perf_counter() - t0
        sec, peak, bound = timed_with_peak(device, compiled, fn_args, args.reps)
        last[(op, impl, name)] = (size(op, B, T), sec)
        r[f"{name}_ms"] = sec * 1e3
        r[f"{name}_gflops"] = nominal_flops(op, B, T, H, K, K, name == "fwd") / sec / 1e9
        if name == "fwd_bwd":
            r["xla_mb"] = xla_memory_mb(compiled)
            if peak is not None:
                r["peak_mb"], r["peak_mb_is_bound"] = peak, bound


def _table_rows(results, peers) -> list:
    peer_of = {(p["op"], p["B"], p["T"]): p for p in peers}
    ref_of = {(r["op"], r["B"], r["T"]): r for r in results if r["impl"] == "reference"}

    def ratio(a, b):
        return a / b if a and b else None

    rows = []
    for r in sorted(results + peers, key=lambda r: (OPS.index(r["op"]), r["B"] * r["T"],
                                                    r.get("peer", False))):
        key = (r["op"], r["B"], r["T"])
        peak = r.get("peak_mb")
        if peak is not None and r.get("peak_mb_is_bound"):
            peak = f"<={peak:,.3g}"
        row = {"op": r["op"], "B": r["B"], "T": r["T"], "impl": r["impl"],
               "fwd ms": r.get("fwd_ms"), "f+b ms": r.get("fwd_bwd_ms"),
               "f+b %mm": 100 * r["fwd_bwd_mm"] if "fwd_bwd_mm" in r else None,
               "XLA MB": r.get("xla_mb"), "peak MB": peak, "RSS MB": r.get("rss_mb"),
               "compile fwd s": r.get("fwd_compile_s"), "compile f+b s": r.get("fwd_bwd_compile_s")}
        if not r.get("peer"):
            ref, peer = ref_of.get(key, {}), peer_of.get(key, {})
            if r["impl"] != "reference":
                row["× ref"] = ratio(ref.get("fwd_bwd_ms"), r.get("fwd_bwd_ms"))
            row["fwd / peer"] = ratio(r.get("fwd_ms"), peer.get("fwd_ms"))
            row["f+b / peer"] = ratio(r.get("fwd_bwd_ms"), peer.get("fwd_bwd_ms"))
        rows.append(row)
    # Columns that nothing filled (no GPU peak on CPU, no peers, ...) are left out.
    filled = {k for row in rows for k, v in row.items() if v is not None}
    return [{k: v for k, v in row.items() if k in filled} for row in rows]


def _plot(path, records, args, device) -> None:
    """Grouped bars per (op, shape), one bar per impl/peer: fwd, fwd+bwd, XLA/peak memory."""
    plt = common._pyplot()
    groups = [(op, B, T) for op in args.ops for B, T in args.shapes]
    # Only impls with a number somewhere (failed ones have none), each its own colour.
    names = list(dict.fromkeys(r["impl"] for r in records
                               if r.get("fwd_ms") or r.get("fwd_bwd_ms")))
    metrics = (("fwd_ms", "forward ms"), ("fwd_bwd_ms", "forward+backward ms"),
               ("mem", "fwd+bwd memory MB (XLA; peers: torch peak)"))
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 1.6 * len(groups) * 3), 4.6), dpi=120)
    width = 0.8 / max(len(names), 1)
    get = {(r["op"], r["B"], r["T"], r["impl"]): r for r in records}
    for ax, (key, ylabel) in zip(axes, metrics):
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, g in enumerate(groups):
                r = get.get((*g, name), {})
                v = r.get(key) if key != "mem" else (r.get("xla_mb") if not r.get("peer")
                                                     else r.get("peak_mb"))
                if v:
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=name, color=f"C{j % 10}")
        ax.set_xticks(range(len(groups)), [f"{op}\n{B}x{T}" for op, B, T in groups], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    if names:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"ops on {device.platform} ({device.device_kind}), {args.dtype}, "
                 f"H={args.heads} K=V={args.head_dim}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
