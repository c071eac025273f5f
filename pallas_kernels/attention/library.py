"""Dense attention through library kernels, and the rule that decides when they serve a call.

* `"cudnn"` (CUDA GPUs): cuDNN flash attention through
  `jax.nn.dot_product_attention(..., implementation="cudnn")`, [B, T, H, D] (cuDNN's BTNH)
  in and out. It serves causal and full attention, a causal sliding window, and GQA natively.
  jax's public API has no segment ids (packed documents) and no sinks, its causal mask is
  top-left aligned (so only Tq == Tk matches our "queries are the last Tq keys"), and cuDNN
  computes in bf16 / fp16 only, with head dims a multiple of 8 up to 128 (256 on sm90+).
* `"splash"` (TPUs): `jax.experimental.pallas.ops.tpu.splash_attention`, one kernel per batch
  row on [H, T, D] (vmapped over the batch), GQA native (k/v [Hkv, T, D]), causal / full /
  sliding-window masks, segment ids, sinks. Its masks are static block maps built on the host
  for one sequence length, so T must be a multiple of 128 (its smallest key block). Building
  the block map of a sliding-window mask is host numpy work that grows quickly with T (about
  10 s at T = 32k, minutes at 128k, measured on a 2-core CPU); splash caches it per process.
  Off TPU it runs in Pallas interpret mode (how the tests check its numerics on CPU).

`choose_impl(platform, spec)` is the whole `impl="auto"` rule; `why_unsupported(impl, spec)`
says why a library kernel cannot serve a call (the dispatcher raises it as a ValueError when
that kernel is asked for by name). A GPU check script compares cuDNN with the XLA path with
`compare_with_xla("cudnn", q, k, v, causal=..., window=...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SPLASH_BLOCKS = (512, 256, 128)   # splash block sizes tried, largest first; 128 = lane width


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """The static facts about one attention call that decide which kernel can serve it.

    dtypes: (q, k, v) dtypes. positions: explicit q/kv positions were given (decode caches,
    ring buffers). segment_ids: "none", "same" (one set of ids for queries and keys) or
    "separate" (kv_segment_ids given too: a query may then see no key at all, which the
    library kernels do not define).
    """
    dtypes: tuple
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    causal: bool = True
    window: Optional[int] = None
    sinks: bool = False
    segment_ids: str = "none"
    positions: bool = False
    prefix: bool = False

    @classmethod
    def of(cls, q, k, v, *, causal, window, sinks, segment_ids, kv_segment_ids, positions,
           prefix=False):
        # The dispatcher passes kv_segment_ids = segment_ids when only one set was given.
        segments = ("none" if segment_ids is None else
                    "same" if kv_segment_ids is segment_ids else "separate")
        return cls(dtypes=(jnp.dtype(q.dtype), jnp.dtype(k.dtype), jnp.dtype(v.dtype)),
                   q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[-1],
                   v_head_dim=v.shape[-1], causal=causal, window=window,
                   sinks=sinks is not None, segment_ids=segments, positions=positions,
                   prefix=prefix)


def _common_reason(spec: CallSpec) -> Optional[str]:
    """What neither library kernel serves: our position semantics beyond self-attention."""
    if spec.positions:
        return "explicit q_positions / kv_positions (decode caches) are served by xla"
    if spec.prefix:
        return "prefix keys/values (persistent memory tokens) are served by xla"
    if spec.q_len != spec.kv_len:
        return (f"Tq ({spec.q_len}) != Tk ({spec.kv_len}): the library masks align queries "
                "with the first keys, ours with the last")
    if spec.segment_ids == "separate":
        return "separate kv_segment_ids can leave a query no key, which xla defines and they do not"
    if len(set(spec.dtypes)) != 1:
        return f"q, k, v dtypes differ {tuple(str(d) for d in spec.dtypes)}"
    return None


def why_unsupported(impl: str, spec: CallSpec, *, cudnn_max_head_dim: int = 128) -> Optional[str]:
    """None if library kernel `impl` ("cudnn" | "splash") can compute this call, else why not."""
    reason = _common_reason(spec)
    if reason:
        return reason
    dtype = spec.dtypes[0]
    if impl == "cudnn":
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN flash attention takes bfloat16 / float16, got {dtype}"
        if spec.head_dim % 8 or spec.head_dim > cudnn_max_head_dim:
            return (f"cuDNN needs a head dim that is a multiple of 8 and <= "
                    f"{cudnn_max_head_dim} on this GPU, got {spec.head_dim}")
        if spec.v_head_dim != spec.head_dim:
            return (f"jax's cuDNN API needs v's head dim ({spec.v_head_dim}) equal to q's "
                    f"({spec.head_dim})")
        if spec.sinks:
            return "cuDNN through jax has no attention sinks"
        if spec.segment_ids != "none":
            return "jax.nn.dot_product_attention has no segment ids (packed documents)"
        if spec.window is not None and not spec.causal:
            return "cuDNN's sliding window is causal only"
        return None
    if impl == "splash":
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            return f"splash attention takes float32 / bfloat16, got {dtype}"
        if spec.q_len % SPLASH_BLOCKS[-1]:
            return f"splash needs T to be a multiple of {SPLASH_BLOCKS[-1]}, got {spec.q_len}"
        return None
    raise ValueError(f"no library kernel {impl!r}")


# The library kernel each platform has; other platforms (cpu, rocm) use xla.
PLATFORM_KERNEL = {"cuda": "cudnn", "tpu": "splash"}


def choose_impl(platform: str, spec: CallSpec, *, cudnn_max_head_dim: int = 128) -> str:
    """The `impl="auto"` rule: the platform's library kernel when it can serve the call,
    otherwise "xla" (CPU, ROCm, sinks on GPU, explicit positions, float32 on GPU, ...).

    platform: "cuda" | "rocm" | "tpu" | "cpu" (see `current_platform`).
    """
    kernel = PLATFORM_KERNEL.get(platform)
    if kernel is None or why_unsupported(kernel, spec, cudnn_max_head_dim=cudnn_max_head_dim):
        return "xla"
    return kernel


def resolve_impl(impl: str, spec: CallSpec) -> str:
    """The impl that computes this call on the current platform: "auto" by `choose_impl`;
    "cudnn" / "splash" unchanged if they can serve the call, else a ValueError saying why;
    "reference" / "xla" unchanged."""
    max_head_dim = cudnn_max_head_dim()
    if impl == "auto":
        return choose_impl(current_platform(), spec, cudnn_max_head_dim=max_head_dim)
    if impl in ("cudnn", "splash"):
        reason = why_unsupported(impl, spec, cudnn_max_head_dim=max_head_dim)
        if reason:
            raise ValueError(f"impl={impl!r} cannot serve this call: {reason} (q length "
                             f"{spec.q_len}, k length {spec.kv_len}, head dim {spec.head_dim}, "
                             f"dtypes {tuple(str(d) for d in spec.dtypes)})")
    return impl


def current_platform() -> str:
    """The default backend, with GPUs told apart by vendor (cuDNN exists only on CUDA)."""
    backend = jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm"):
        return backend
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"


def cudnn_max_head_dim() -> int:
    """cuDNN flash attention takes head dims up to 256 on Hopper (sm90) and later, else 128
    (also when the default device is no GPU: lowering for CUDA from here assumes the least)."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability and tuple(int(x) for x in capability.split(".")[:2]) >= (9, 0):
        return 256
    return 128


# ----------------------------------------------------------------------------- kernels
def attention_cudnn(q, k, v, *, scale, causal, window):
    """cuDNN flash attention on q [B, T, H, D], k/v [B, T, Hkv, D] (checked by the caller)."""
    # jax's window is (left, right) keys around the query; ours counts the query itself.
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=local, implementation="cudnn")


def _splash_block(T: int) -> int:
    return next(b for b in SPLASH_BLOCKS if T % b == 0)


def _splash_kernel(T: int, H: int, causal: bool, window: Optional[int], interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is not None:   # keys i − (window − 1) .. i, plus the future when not causal
        mask = sa.LocalMask((T, T), window_size=(window - 1, 0 if causal else None), offset=0)
    else:
        mask = sa.CausalMask((T, T)) if causal else sa.FullMask((T, T))
    b = _splash_block(T)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * H), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def attention_splash(q, k, v, *, scale, causal, window, sinks, q_seg, kv_seg,
                     interpret: Optional[bool] = None):
    """Splash attention on q [B, T, H, D], k/v [B, T, Hkv, D]; segment ids [B, T] or None.

    interpret: default True off TPU (Pallas interpret mode); False to lower for TPU from a
    machine without one.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    H, T = q.shape[2], q.shape[1]
    kernel = _splash_kernel(T, H, causal, window, interpret)
    # Splash does not scale the logits: fold the scale into q (in float32, then q's dtype).
    qh = jnp.swapaxes((q.astype(jnp.float32) * scale).astype(q.dtype), 1, 2)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    sinks = None if sinks is None else sinks.astype(jnp.float32)
    if q_seg is None:
        o = jax.vmap(lambda q, k, v: kernel(q, k, v, None, sinks))(qh, kh, vh)
    else:
        o = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, sa.SegmentIds(qs, ks), sinks))(
            qh, kh, vh, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
    return jnp.swapaxes(o, 1, 2).astype(q.dtype)


# ----------------------------------------------------------------------------- device checks
def compare_with_xla(impl: str, q, k, v, *, seed: int = 0, **kwargs) -> dict:
    """Max abs differences between library kernel `impl` and the XLA path, for device checks.

    Runs `pallas_kernels.attention.attention(q, k, v, impl=impl, **kwargs)` on the inputs as
    given and the XLA path on them cast to float32 (the truth a bf16 kernel is judged by), and
    differentiates both against the same random output weights (drawn from `seed`). kwargs are
    the op's: causal, window, sinks, segment_ids, scale. Returns {"o", "dq", "dk", "dv": max abs
    error, "o_scale", "dq_scale", ...: max abs of the float32 value} as Python floats.
    """
    from pallas_kernels.attention import attention

    w = jax.random.normal(jax.random.PRNGKey(seed), q.shape[:3] + v.shape[-1:], jnp.float32)

    def loss(impl_):
        return lambda q, k, v: jnp.sum(w * attention(q, k, v, impl=impl_, **kwargs)
                                       .astype(jnp.float32))

    def run(impl_, args):
        o = jax.jit(lambda *a: attention(*a, impl=impl_, **kwargs))(*args)
        return (o,) + jax.jit(jax.grad(loss(impl_), argnums=(0, 1, 2)))(*args)

    got = run(impl, (q, k, v))
    want = run("xla", tuple(x.astype(jnp.float32) for x in (q, k, v)))
    out = {}
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        b = np.asarray(b, np.float32)
        out[name] = float(np.max(np.abs(np.asarray(a, np.float32) - b)))
        out[f"{name}_scale"] = float(np.max(np.abs(b)))
    return out
