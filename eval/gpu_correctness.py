"""Every op and impl against the float64 reference, on the machine at hand (meant for a GPU or
TPU, where the Pallas kernels run compiled rather than in interpret mode).

    python -m eval.gpu_correctness [--small] [--ops gdn kda nm1 attn bsa ebag ...]
                                   [--impls xla pallas] [--dtypes bfloat16 float32 tf32]
                                   [--time_budget SECONDS] [--out DIR]

Ops and their cases (sizes without --small; --small shrinks every one, K=V=D=16, T≈45, so
that the script runs on a CPU in interpret mode, for testing it):

    recurrent   gdn = gated_delta_rule with β and g, deltanet = without g, kda = with per-key
                gk (Kimi Delta Attention), la = linear_attention without gates, la_g with g,
                la_gk with gk (GLA). dense: B=2, T=300 (not a multiple of the chunk), H=2,
                K=V=128, initial state; packed: B=1, T=301, cu_seqlens [0, 37, 37, 200, 290]
                (an empty sequence, boundaries inside chunks, 11 tokens outside every
                sequence), initial states.
    nm1, nm2    neural_memory at depth 1 (matrix memory) and 2 (MLP memory, E = 4K), chunk 8,
                a given initial memory; the same dense and packed cases, K=V=64.
    attn        softmax attention: causal (B=2, T=300, H=4, D=128) and window_gqa (B=1,
                T=256 (splash takes multiples of 128), H=4 over 2 k/v heads, window 96).
    bsa         block_sparse_attention: token (NSA's per-token selection: query blocks of 1,
                B=2, T=300, H=4 over 2 k/v heads, D=128, key blocks of 32, 4 listed per query
                (random, −1 and out-of-range entries included), window 48) and blocks_packed
                (query blocks of 16, 3 listed, no window, the packed cu_seqlens above).
    ebag        embedding_bag: indices [2, 300, 8] into a [512, 128] table (repeats and
                out-of-range indices included), weights and table differentiated.
    context_parallel   the ops' context_axis= path needs several devices: reported SKIP with
                that reason on one device (tests/pallas_kernels check it on simulated CPU
                devices); not checked by this script on several either.

Impls: recurrent ops, nm, bsa and ebag each of --impls (default xla and pallas; an impl an op
does not have is SKIP with the reason); attention every impl of `pallas_kernels.attention.
IMPLS` but the reference and those of eval.bench_ops.ELSEWHERE for this platform ("auto"
included: what users get; an impl that declines a case, e.g. cuDNN and float32, is SKIP).

Dtypes (--dtypes; the main cases take each, the second cases float32 and, for the attention
ops, bfloat16):
    bfloat16   inputs in bfloat16 (what training runs); tolerance 5e-2
    float32    inputs in float32 at full precision (jax.default_matmul_precision("highest"),
               and the Pallas scans' tf32=False): tolerance 1e-4
    tf32       float32 inputs at the backend's default precision, as users run them (TF32
               dots on a GPU, in XLA and in the Pallas scans, as fla): tolerance 5e-3 (TF32
               rounds each operand to 2^-11 relative; a K=128 dot then errs ~1e-3 of its
               largest term). Recurrent ops and nm only; default on GPU only.

Compared: the output, the final state, and the gradient of every floating input (random
cotangents on o and the state) with the `reference` impl run in float64 (jax.enable_x64) on
the same values (rounded to the dtype first); error = max |got − want| / max |want| per tensor.
Each check's program is lowered and compiled once (compile seconds reported apart from run
seconds); the float64 reference is computed once per (op, case, input dtype) and shared by all
impls. Checks run breadth first (every op's main case in bfloat16, then float32, ...), so that a
time budget cut leaves every op checked at least once; each check prints a START line first, so
that a check killed from outside is named in the log, and gpu_correctness.json is rewritten
after each. Prints one PASS / FAIL / SKIP / ERROR / NOT RUN line per check; exits 1 if any
check failed or erred.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import sys
import time
from typing import Optional, Sequence

import numpy as np

from eval import common
from eval.bench_fla import error_text
from eval.bench_ops import ELSEWHERE

TOL = {"float32": 1e-4, "tf32": 5e-3, "bfloat16": 5e-2}
DTYPES = ("bfloat16", "float32", "tf32")
RECURRENT = ("gdn", "deltanet", "kda", "la", "la_g", "la_gk")
# op -> (family, the gate inputs it takes, in the family's positional order)
OPS = {"gdn": ("gated_delta_rule", ("beta", "g")), "deltanet": ("gated_delta_rule", ("beta",)),
       "kda": ("gated_delta_rule", ("beta", "gk")),
       "la": ("linear_attention", ()), "la_g": ("linear_attention", ("g",)),
       "la_gk": ("linear_attention", ("gk",))}
NM_DEPTH = {"nm1": 1, "nm2": 2}
NM_CHUNK, NM_EXPANSION = 8, 4          # the titans layer's defaults
ALL_OPS = (*RECURRENT, "nm1", "nm2", "attn", "bsa", "ebag", "context_parallel")
# op -> (its main case, its second case, the dtypes of the second case)
CASES = {**{op: ("dense", "packed", ("float32",)) for op in (*RECURRENT, *NM_DEPTH)},
         "attn": ("causal", "window_gqa", ("float32", "bfloat16")),
         "bsa": ("token", "blocks_packed", ("float32", "bfloat16")),
         "ebag": ("bag", None, ())}
PACKED = [0, 37, 37, 200, 290]


def cases(small: bool) -> dict:
    """case name -> sizes and static settings (cu: packed offsets or None)."""
    if small:
        return {"dense": dict(B=2, T=45, H=2, K=16, cu=None),
                "packed": dict(B=1, T=50, H=2, K=16, cu=[0, 5, 5, 30, 47]),
                "causal": dict(B=2, T=40, H=4, Hkv=4, K=16, window=None),
                "window_gqa": dict(B=1, T=128, H=4, Hkv=2, K=16, window=8),
                "token": dict(B=2, T=45, H=4, Hkv=2, K=16, block=8, qblock=1, S=3, window=6,
                              cu=None),
                "blocks_packed": dict(B=1, T=50, H=4, Hkv=2, K=16, block=8, qblock=4, S=2,
                                      window=None, cu=[0, 5, 5, 30, 47]),
                "bag": dict(B=2, T=20, slots=4, N=40, K=16)}
    return {"dense": dict(B=2, T=300, H=2, K=128, cu=None),
            "packed": dict(B=1, T=301, H=2, K=128, cu=PACKED),
            "causal": dict(B=2, T=300, H=4, Hkv=4, K=128, window=None),
            "window_gqa": dict(B=1, T=256, H=4, Hkv=2, K=128, window=96),
            "token": dict(B=2, T=300, H=4, Hkv=2, K=128, block=32, qblock=1, S=4, window=48,
                          cu=None),
            "blocks_packed": dict(B=1, T=301, H=4, Hkv=2, K=128, block=32, qblock=16, S=3,
                                  window=None, cu=PACKED),
            "bag": dict(B=2, T=300, slots=8, N=512, K=128)}


def nm_width(op: str, c: dict) -> int:
    """The neural memory's K = V: half the recurrent ops' (its depth-2 state is E = 4K wide)."""
    return max(c["K"] // 2, 16) if op in NM_DEPTH else c["K"]


def statics(op: str, c: dict) -> tuple:
    """The hashable non-array settings of a case that its program depends on."""
    keys = {"attn": ("window",), "bsa": ("block", "qblock", "window")}.get(op, ())
    return tuple((k, c[k]) for k in keys)


def _pallas_full_precision(family: str):
    """The family's pallas impl with tf32=False, or None when it has no such option."""
    from pallas_kernels import common as kcommon
    fn = kcommon.select_impl(f"pallas_kernels.{family}", family, "pallas", 64)
    if "tf32" not in inspect.signature(fn.func).parameters:
        return None
    return functools.partial(fn, tf32=False)


def op_fn(op: str):
    """f(args, aux, *, impl, static, full) -> output pytree; args: the differentiable arrays,
    aux: the integer ones (cu_seqlens, block indices, bag indices), static: `statics`, full:
    float32 at full precision (the Pallas scans' tf32=False where they have it)."""
    import pallas_kernels
    from pallas_kernels.attention import attention
    from pallas_kernels.embedding_bag import embedding_bag
    from pallas_kernels.sparse_attention import block_sparse_attention

    if op == "attn":
        def f(a, aux, *, impl, static, full):
            return attention(a["q"], a["k"], a["v"], causal=True, impl=impl, **dict(static))
    elif op == "bsa":
        def f(a, aux, *, impl, static, full):
            s = dict(static)
            return block_sparse_attention(
                a["q"], a["k"], a["v"], aux["block_indices"], block_size=s["block"],
                query_block_size=s["qblock"], window=s["window"], cu_seqlens=aux.get("cu"),
                impl=impl)
    elif op == "ebag":
        def f(a, aux, *, impl, static, full):
            return embedding_bag(aux["indices"], a["weights"], a["table"], impl=impl)
    elif op in NM_DEPTH:
        def f(a, aux, *, impl, static, full):
            return pallas_kernels.neural_memory(
                a["q"], a["k"], a["v"], a["lr"], a["momentum"], a["decay"],
                depth=NM_DEPTH[op], chunk_size=NM_CHUNK, initial_state=(a["memory"], None),
                output_final_state=True, cu_seqlens=aux.get("cu"), impl=impl)
    else:
        family, gates = OPS[op]

        def f(a, aux, *, impl, static, full):
            exact = _pallas_full_precision(family) if full and impl == "pallas" else None
            if exact is None:
                return getattr(pallas_kernels, family)(
                    **a, cu_seqlens=aux.get("cu"), output_final_state=True, impl=impl)
            # The impl itself, as the public op calls it (its inputs are valid here).
            named = {"g": None, "gk": None, **a}
            arrays = [named[n] for n in ("q", "k", "v", *(("beta",) if "beta" in gates else ()),
                                         "g", "gk")]
            return exact(*arrays, scale=a["q"].shape[-1] ** -0.5,
                         initial_state=a["initial_state"], cu_seqlens=aux.get("cu"))
    return f


def make_values(rng, op: str, c: dict) -> tuple:
    """(float64 numpy inputs that get gradients, integer numpy inputs) for one case."""
    if op == "ebag":
        B, T, S, N, D = c["B"], c["T"], c["slots"], c["N"], c["K"]
        idx = rng.integers(-2, N + 2, (B, T, S))        # out-of-range entries add nothing
        idx[..., 1] = idx[..., 0]                       # repeats add twice
        return ({"weights": rng.standard_normal((B, T, S)),
                 "table": rng.standard_normal((N, D))}, {"indices": idx.astype(np.int32)})
    B, T, H = c["B"], c["T"], c["H"]
    K = nm_width(op, c)
    Hkv = c.get("Hkv", H)
    k = rng.standard_normal((B, T, Hkv, K))
    attention_like = op in ("attn", "bsa")
    a = {"q": rng.standard_normal((B, T, H, K)), "v": rng.standard_normal((B, T, Hkv, K)),
         # unit keys: the delta rule's stability condition, harmless for the others
         "k": k if attention_like else k / np.linalg.norm(k, axis=-1, keepdims=True)}
    aux = {} if c.get("cu") is None else {"cu": np.asarray(c["cu"], np.int32)}
    if op == "attn":
        return a, aux
    if op == "bsa":
        NQ, NK = -(-T // c["qblock"]), -(-T // c["block"])
        # −1 pads and entries past NK are ignored by the op; the rest may repeat.
        aux["block_indices"] = rng.integers(-1, NK + 1, (B, Hkv, NQ, c["S"])).astype(np.int32)
        return a, aux
    N = B if c.get("cu") is None else len(c["cu"]) - 1
    if op in NM_DEPTH:
        a.update(lr=rng.uniform(0.0, 0.1, (B, T, H)), momentum=rng.uniform(0.5, 0.9, (B, T, H)),
                 decay=rng.uniform(0.0, 0.05, (B, T, H)))
        E = NM_EXPANSION * K
        a["memory"] = (rng.standard_normal((N, H, K, K)) * K ** -0.5 if op == "nm1" else
                       (rng.standard_normal((N, H, K, E)) * K ** -0.5,
                        rng.standard_normal((N, H, E, K)) * E ** -0.5))
        return a, aux
    gates = OPS[op][1]
    if "beta" in gates:
        a["beta"] = rng.uniform(0.0, 1.0, (B, T, H))
    if "g" in gates:
        a["g"] = rng.uniform(-0.4, 0.0, (B, T, H))
    if "gk" in gates:
        a["gk"] = rng.uniform(-0.4, 0.0, (B, T, H, K))
    a["initial_state"] = rng.standard_normal((N, H, K, K))
    return a, aux


def make_cotangents(rng, op: str, values: dict, aux: dict, static: tuple):
    """Random float64 cotangents shaped like the op's output pytree (o, and the state)."""
    import jax
    f = op_fn(op)
    with jax.enable_x64(True):
        shapes = jax.eval_shape(lambda a, x: f(a, x, impl="reference", static=static,
                                               full=True), values, aux)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape), shapes)


# The state (and its cotangent) stays float32, as the ops keep it.
STATE_INPUTS = ("initial_state", "memory")


@functools.cache
def vjp_runner(op: str, impl: str, static: tuple, full: bool):
    """jit of (args, aux, cts) -> (outputs, grads of every array in args)."""
    import jax
    f = op_fn(op)

    def run(args, aux, cts):
        out, pull = jax.vjp(lambda a: f(a, aux, impl=impl, static=static, full=full), args)
        return out, pull(cts)[0]
    return jax.jit(run)


def _cast_inputs(values: dict, cts, dtype) -> tuple:
    """(args, cotangents) as JAX arrays: floating inputs in `dtype`, states in float32."""
    import jax
    import jax.numpy as jnp
    args = {n: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32 if n in STATE_INPUTS
                                                  else dtype), x)
            for n, x in values.items()}
    o_ct, *state_ct = cts if isinstance(cts, tuple) else (cts,)
    ct = (jnp.asarray(o_ct, dtype), *jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                                   tuple(state_ct)))
    return args, (ct if isinstance(cts, tuple) else ct[0])


def run_impl(op, impl, values, aux, cts, mode, static) -> tuple:
    """(got: name -> float64 array, compile s, run s, the inputs as the impl saw them)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype("float32" if mode == "tf32" else mode)
    args, ct = _cast_inputs(values, cts, dtype)
    aux_j = {n: jnp.asarray(x) for n, x in aux.items()}
    full = mode == "float32"
    precision = (jax.default_matmul_precision("highest") if full else contextlib.nullcontext())
    with precision:
        t0 = time.perf_counter()
        compiled = vjp_runner(op, impl, static, full).lower(args, aux_j, ct).compile()
        t1 = time.perf_counter()
        out, grads = jax.block_until_ready(compiled(args, aux_j, ct))
        t2 = time.perf_counter()
    return _flat(out, grads), t1 - t0, t2 - t1, (args, ct)


def reference(op, seen, aux, static) -> dict:
    """The float64 reference's outputs and gradients on exactly the values the impl saw."""
    import jax
    import jax.numpy as jnp

    args, ct = seen
    with jax.enable_x64(True):
        to64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
        out, grads = vjp_runner(op, "reference", static, True)(
            jax.tree.map(to64, args), {n: jnp.asarray(x) for n, x in aux.items()},
            jax.tree.map(to64, ct))
        return _flat(out, grads)


def _flat(out, grads) -> dict:
    """name -> float64 numpy array: o, the state (state.0, state.0.1, ... for a nested one),
    d<input> for the gradient of every input (dmemory.0, ... for a nested one)."""
    import jax

    def named(prefix, tree):
        d = {}
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = prefix + "".join(f".{getattr(p, 'idx', getattr(p, 'key', p))}" for p in path)
            d[name] = np.asarray(np.asarray(x, np.float32) if x.dtype.itemsize == 2 else x,
                                 np.float64)
        return d

    outs = out if isinstance(out, tuple) else (out,)
    d = named("o", outs[0])
    if len(outs) > 1:
        d.update(named("state", outs[1]))
    for n, g in grads.items():
        d.update(named(f"d{n}", g))
    return d


def rel_errors(got: dict, want: dict) -> dict:
    """name -> max |got − want| / max |want| (inf where got is not finite or shapes differ)."""
    errs = {}
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape or not np.all(np.isfinite(g)):
            errs[name] = float("inf")
            continue
        errs[name] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)) if w.size else 0.0
    return errs


def plan_checks(ops, impls, attn_impls, dtypes) -> list:
    """(op, impl, mode, case) in run order: breadth first over tiers (each op's main case in
    each dtype, then the second cases), xla before pallas within a tier."""
    order = {d: i for i, d in enumerate(DTYPES)}
    plan = []
    for op in ops:
        if op == "context_parallel":
            plan.append((op, "-", "-", "-", 0))
            continue
        main, second, second_dtypes = CASES[op]
        op_impls = attn_impls if op == "attn" else impls
        modes = [d for d in dtypes if d != "tf32" or op in (*RECURRENT, *NM_DEPTH)]
        plan += [(op, impl, d, main, order[d]) for d in modes for impl in op_impls]
        if second:
            plan += [(op, impl, d, second, len(DTYPES) + order[d])
                     for d in second_dtypes if d in dtypes for impl in op_impls]
    plan.sort(key=lambda p: (p[4], p[1] != "xla"))
    return [p[:4] for p in plan]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.gpu_correctness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=list(ALL_OPS), choices=ALL_OPS)
    ap.add_argument("--impls", nargs="+", default=["xla", "pallas"],
                    help="impls of every op but attention (attention: all of its IMPLS but "
                         "the reference)")
    ap.add_argument("--attn_impls", nargs="+", default=None,
                    help="default: see above")
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                    help="default: bfloat16 float32, and tf32 on a GPU")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for a CPU")
    ap.add_argument("--time_budget", type=float, default=None,
                    help="seconds; no check starts past it (reported NOT RUN)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/gpu_correctness")
    args = ap.parse_args(argv)

    import jax
    from pallas_kernels.attention import IMPLS as ATTN_IMPLS
    from pallas_kernels.common import IMPLS as OP_IMPLS

    bad = set(args.impls) - set(OP_IMPLS)
    if bad:
        common.fail(f"--impls: unknown {sorted(bad)}; known: {list(OP_IMPLS)}")
    device = jax.devices()[0]
    attn_impls = args.attn_impls or [i for i in ATTN_IMPLS if i != "reference"
                                     and i not in ELSEWHERE.get(device.platform, ())]
    bad = set(attn_impls) - set(ATTN_IMPLS)
    if bad:
        common.fail(f"--attn_impls: unknown {sorted(bad)}; known: {list(ATTN_IMPLS)}")
    dtypes = args.dtypes or ["bfloat16", "float32",
                             *(["tf32"] if device.platform == "gpu" else [])]
    out = common.out_dir(args.out)
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; "
          f"jax {jax.__version__}", flush=True)

    cs = cases(args.small)
    plan = plan_checks(args.ops, args.impls, attn_impls, dtypes)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    values = {}     # (op, case) -> (inputs, aux, cotangents): every impl and dtype sees them
    wanted = {}     # (op, case, input dtype) -> the float64 reference's results
    checks = []

    def write(running=None):
        common.write_json(out / "gpu_correctness.json", {
            "device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
            "device_count": jax.device_count(), "small": args.small, "checks": checks,
            **({"running": running} if running else {})})

    for op, impl, mode, name in plan:
        r = {"op": op, "impl": impl, "dtype": mode, "case": name}
        elapsed = time.perf_counter() - start
        if op == "context_parallel":
            r.update(status="SKIP", reason=(
                f"the context_axis= path shards T over several devices; this machine has "
                f"{jax.device_count()}" if jax.device_count() < 2 else
                "not checked by this script (tests/pallas_kernels check it on simulated "
                "CPU devices)"))
        elif args.time_budget is not None and elapsed > args.time_budget:
            r.update(status="NOT RUN", reason=f"{elapsed:.0f} s spent of --time_budget "
                                              f"{args.time_budget:g}")
        else:
            c = cs[name]
            r.update(tol=TOL[mode], sizes={k: v for k, v in c.items() if v is not None})
            print(f"START   {op}/{impl} {mode} {name}", flush=True)
            write(running=f"{op}/{impl} {mode} {name}")
            static = statics(op, c)
            if (op, name) not in values:
                v, aux = make_values(rng, op, c)
                values[op, name] = (v, aux, make_cotangents(rng, op, v, aux, static))
            v, aux, cts = values[op, name]
            try:
                got, r["compile_s"], r["run_s"], seen = run_impl(op, impl, v, aux, cts, mode,
                                                                 static)
                key = (op, name, "bfloat16" if mode == "bfloat16" else "float32")
                if key not in wanted:
                    t0 = time.perf_counter()
                    wanted[key] = reference(op, seen, aux, static)
                    r["reference_s"] = time.perf_counter() - t0
                errs = rel_errors(got, wanted[key])
                worst = max(errs.values())
                r.update(status="PASS" if worst <= TOL[mode] else "FAIL", max_error=worst,
                         errors=errs)
            except NotImplementedError as e:        # an impl the op does not have
                r.update(status="SKIP", reason=error_text(e))
            except ValueError as e:                 # attention impls decline cases
                r.update(status="SKIP" if op == "attn" else "ERROR", reason=error_text(e))
            except Exception as e:  # noqa: BLE001 - a kernel that does not compile, ...
                r.update(status="ERROR", reason=error_text(e))
            r["seconds"] = time.perf_counter() - start - elapsed
        checks.append(r)
        print(_line(r), flush=True)
        write()

    counts = {s: sum(r["status"] == s for r in checks)
              for s in ("PASS", "FAIL", "ERROR", "SKIP", "NOT RUN")}
    print("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), flush=True)
    print(f"wrote {out / 'gpu_correctness.json'}")
    return 1 if counts["FAIL"] or counts["ERROR"] else 0


def _line(r: dict) -> str:
    head = f"{r['status']:<7} {r['op']}/{r['impl']} {r['dtype']} {r['case']}"
    if "max_error" in r:
        worst = sorted(r["errors"].items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{k} {v:.2g}" for k, v in worst)
        return (f"{head}: max rel error {r['max_error']:.2g} (tol {r['tol']:g}; {detail}) "
                f"compile {r['compile_s']:.1f} s, run {r['run_s']:.2f} s, "
                f"{r['seconds']:.1f} s in all")
    return f"{head}: {r.get('reason', '')}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
