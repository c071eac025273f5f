"""Softmax attention op against a float64 loop over queries: causal, GQA, window, sinks,
segment ids, explicit positions (decode caches), gradients, bf16, bad input; the library
kernels (cuDNN, splash): the auto rule, splash numerics in interpret mode, and lowering for
CUDA / TPU from this CPU-only machine."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention, library


def loop_reference(q, k, v, *, causal=True, window=None, sinks=None, seg=None, q_pos=None,
                   kv_pos=None, prefix=None):
    """Independent float64 numpy reference, one query at a time. `prefix` (pk [P, Hkv, D],
    pv [P, Hkv, Dv]): keys every query sees."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q_pos = np.arange(Tk - Tq, Tk) if q_pos is None else np.asarray(q_pos)
    kv_pos = np.arange(Tk) if kv_pos is None else np.asarray(kv_pos)
    o = np.zeros((B, Tq, H, v.shape[-1]))
    for b in range(B):
        for t in range(Tq):
            for h in range(H):
                hk = h // (H // Hkv)
                ok = kv_pos >= 0
                if causal:
                    ok &= kv_pos <= q_pos[t]
                if window is not None:
                    ok &= q_pos[t] - kv_pos < window
                if seg is not None:
                    ok &= seg[b] == seg[b, t]
                keys, vals = k[b, ok, hk], v[b, ok, hk]
                if prefix is not None:
                    keys = np.concatenate([prefix[0][:, hk], keys])
                    vals = np.concatenate([prefix[1][:, hk], vals])
                s = keys @ q[b, t, h] / np.sqrt(D)
                logits = list(s) + ([float(sinks[h])] if sinks is not None else [])
                if not logits:
                    continue
                m = max(logits)
                w = np.exp(s - m)
                den = w.sum() + (np.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
                o[b, t, h] = (w / den) @ vals
    return o


def _qkv(rng, B, Tq, Tk, H, Hkv, D, dtype=np.float64):
    return (rng.standard_normal((B, Tq, H, D)).astype(dtype),
            rng.standard_normal((B, Tk, Hkv, D)).astype(dtype),
            rng.standard_normal((B, Tk, Hkv, D)).astype(dtype))


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("case", ["causal", "gqa_window_sinks", "segments", "noncausal"])
def test_matches_loop_reference(x64, rng, impl, case):
    B, T, H, Hkv, D = 2, 13, 4, 2, 8
    q, k, v = _qkv(rng, B, T, T, H, Hkv if case != "causal" else H, D)
    kw, ref_kw = {}, {}
    if case == "gqa_window_sinks":
        sinks = rng.standard_normal(H)
        kw = dict(window=3, sinks=jnp.asarray(sinks))
        ref_kw = dict(window=3, sinks=sinks)
    elif case == "segments":
        seg = np.array([[1] * 4 + [2] * 6 + [3] * 3, [0] * 2 + [5] * 11], np.int32)
        kw = dict(segment_ids=jnp.asarray(seg), window=5)
        ref_kw = dict(seg=seg, window=5)
    elif case == "noncausal":
        kw, ref_kw = dict(causal=False), dict(causal=False)
    # block_q=4 exercises the query blocks (and the window-sliced keys) of the xla impl.
    o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl, block_q=4, **kw)
    np.testing.assert_allclose(np.asarray(o), loop_reference(q, k, v, **ref_kw), atol=1e-10)


def test_last_queries_of_longer_keys(x64, rng):
    """Tq < Tk with default positions: the queries are the last Tq tokens (window-sliced)."""
    q, k, v = _qkv(rng, 1, 9, 13, 2, 1, 4)
    for window in (None, 3):
        o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window, block_q=4)
        np.testing.assert_allclose(np.asarray(o), loop_reference(q, k, v, window=window),
                                   atol=1e-10)


def test_positions_and_empty_slots(x64, rng):
    """Decode-cache style: 2 queries at positions 7, 8 against a ring of slots, some empty."""
    q, k, v = _qkv(rng, 1, 2, 6, 2, 1, 4)
    kv_pos = np.array([4, 5, 6, -1, 7, 8])
    q_pos = np.array([7, 8])
    for window in (None, 3):
        o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window,
                      q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos))
        ref = loop_reference(q, k, v, window=window, q_pos=q_pos, kv_pos=kv_pos)
        np.testing.assert_allclose(np.asarray(o), ref, atol=1e-10)
    # A query that sees nothing returns zeros.
    o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                  q_positions=jnp.asarray([0, 1]), kv_positions=jnp.asarray([2, 3, 4, 5, 6, 7]))
    np.testing.assert_array_equal(np.asarray(o), 0.0)


def test_prefix_keys_seen_by_every_query(x64, rng):
    """Prefix keys/values (Titans' persistent memory) join every query's softmax beside its
    window (sliced keys in the xla impl's query blocks), segment ids and sinks; a decode-style
    call with explicit positions and empty slots too; gradients of the prefix agree."""
    B, T, H, Hkv, D, P = 2, 13, 4, 2, 8, 3
    q, k, v = _qkv(rng, B, T, T, H, Hkv, D)
    pk, pv = rng.standard_normal((P, Hkv, D)), rng.standard_normal((P, Hkv, D))
    seg = np.array([[1] * 4 + [2] * 6 + [3] * 3, [0] * 2 + [5] * 11], np.int32)
    sinks = rng.standard_normal(H)
    kw = dict(window=3, segment_ids=jnp.asarray(seg), sinks=jnp.asarray(sinks), block_q=4,
              prefix_k=jnp.asarray(pk), prefix_v=jnp.asarray(pv))
    ref = loop_reference(q, k, v, window=3, seg=seg, sinks=sinks, prefix=(pk, pv))
    for impl in ("reference", "xla"):
        o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl, **kw)
        np.testing.assert_allclose(np.asarray(o), ref, atol=1e-10, err_msg=impl)
    # A query whose window holds no key still sees the prefix (not zeros).
    kv_pos, q_pos = np.array([4, -1, 6]), np.array([1, 6])
    o = attention(jnp.asarray(q[:, :2]), jnp.asarray(k[:, :3]), jnp.asarray(v[:, :3]),
                  q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos),
                  prefix_k=jnp.asarray(pk), prefix_v=jnp.asarray(pv))
    np.testing.assert_allclose(np.asarray(o), loop_reference(
        q[:, :2], k[:, :3], v[:, :3], q_pos=q_pos, kv_pos=kv_pos, prefix=(pk, pv)), atol=1e-10)
    w = jnp.asarray(rng.standard_normal((B, T, H, D)))
    grads = [jax.grad(lambda a, b: jnp.sum(w * attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl,
        **{**kw, "prefix_k": a, "prefix_v": b})), argnums=(0, 1))(jnp.asarray(pk), jnp.asarray(pv))
             for impl in ("reference", "xla")]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-10)
    with pytest.raises(ValueError, match="prefix_v"):
        attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), prefix_k=jnp.asarray(pk))
    with pytest.raises(ValueError, match=r"`prefix_k` must have shape \[P, Hkv, D\]"):
        attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), prefix_k=jnp.asarray(pk[:, :1]),
                  prefix_v=jnp.asarray(pv))


def test_gradients_xla_vs_reference(x64, rng):
    q, k, v = (jnp.asarray(a) for a in _qkv(rng, 1, 11, 11, 4, 2, 8))
    sinks = jnp.asarray(rng.standard_normal(4))
    w = jnp.asarray(rng.standard_normal((1, 11, 4, 8)))

    def loss(impl):
        return lambda q, k, v, s: jnp.sum(w * attention(q, k, v, sinks=s, window=4, impl=impl,
                                                        block_q=4))

    g_ref = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    g_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    for a, b in zip(g_ref, g_xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-10)


def test_bfloat16(rng):
    q, k, v = _qkv(rng, 1, 9, 9, 2, 2, 8, np.float32)
    o = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), block_q=4)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), loop_reference(q, k, v), atol=5e-2)


def test_bad_input_names_argument():
    q = jnp.zeros((1, 4, 3, 8))
    k = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="window"):
        attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="sinks"):
        attention(q, q, q, sinks=jnp.zeros(2))
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, q, q, segment_ids=jnp.zeros((1, 3), jnp.int32))


# ----------------------------------------------------------------------------- library kernels
# cuDNN (GPU) and splash (TPU): which one `impl="auto"` picks, their numerics where this CPU can
# run them (splash in interpret mode), and lowering for their hardware from this machine.

BASE = library.CallSpec(dtypes=(jnp.dtype(jnp.bfloat16),) * 3, q_len=256, kv_len=256,
                        head_dim=64, v_head_dim=64)
F32, F16 = (jnp.dtype(jnp.float32),) * 3, (jnp.dtype(jnp.float16),) * 3


@pytest.mark.parametrize("platform, change, max_head_dim, expected", [
    ("cuda", {}, 128, "cudnn"),
    ("cuda", dict(dtypes=F16), 128, "cudnn"),
    ("cuda", dict(window=32), 128, "cudnn"),
    ("cuda", dict(causal=False), 128, "cudnn"),
    ("cuda", dict(dtypes=F32), 128, "xla"),                  # cuDNN flash: bf16 / fp16 only
    ("cuda", dict(sinks=True), 128, "xla"),
    ("cuda", dict(segment_ids="same"), 128, "xla"),          # no segment ids in jax's API
    ("cuda", dict(positions=True), 128, "xla"),              # decode caches
    ("cuda", dict(prefix=True), 128, "xla"),                 # persistent memory tokens
    ("cuda", dict(q_len=1), 128, "xla"),                     # Tq != Tk
    ("cuda", dict(window=32, causal=False), 128, "xla"),
    ("cuda", dict(head_dim=60, v_head_dim=60), 128, "xla"),
    ("cuda", dict(head_dim=256, v_head_dim=256), 128, "xla"),
    ("cuda", dict(head_dim=256, v_head_dim=256), 256, "cudnn"),   # sm90+
    ("cuda", dict(v_head_dim=128), 128, "xla"),
    ("cuda", dict(dtypes=(jnp.dtype(jnp.bfloat16),) * 2 + (jnp.dtype(jnp.float32),)), 128,
     "xla"),
    ("tpu", {}, 128, "splash"),
    ("tpu", dict(dtypes=F32, sinks=True, segment_ids="same", window=32, causal=False), 128,
     "splash"),
    ("tpu", dict(dtypes=F16), 128, "xla"),
    ("tpu", dict(q_len=200, kv_len=200), 128, "xla"),        # splash blocks: T % 128 == 0
    ("tpu", dict(positions=True), 128, "xla"),
    ("tpu", dict(prefix=True), 128, "xla"),
    ("tpu", dict(segment_ids="separate"), 128, "xla"),
    ("tpu", dict(q_len=128), 128, "xla"),
    ("cpu", {}, 128, "xla"),
    ("rocm", {}, 128, "xla"),
])
def test_choose_impl(platform, change, max_head_dim, expected):
    spec = dataclasses.replace(BASE, **change)
    assert library.choose_impl(platform, spec, cudnn_max_head_dim=max_head_dim) == expected


def test_auto_dispatches_the_platform_kernel(monkeypatch, rng):
    """With the platform reported as TPU, auto runs splash (here in interpret mode) for
    self-attention and xla for the explicit positions a decode cache passes."""
    calls = []
    splash = library.attention_splash
    monkeypatch.setattr(library, "current_platform", lambda: "tpu")
    monkeypatch.setattr(library, "attention_splash",
                        lambda *a, **kw: calls.append(1) or splash(*a, **kw))
    q, k, v = _qkv(rng, 1, 128, 128, 2, 1, 16, np.float32)
    o = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=9)
    assert len(calls) == 1
    np.testing.assert_allclose(np.asarray(o), loop_reference(q, k, v, window=9), atol=2e-5)
    pos = np.arange(128)
    o = attention(jnp.asarray(q[:, -2:]), jnp.asarray(k), jnp.asarray(v), window=9,
                  q_positions=jnp.asarray(pos[-2:]), kv_positions=jnp.asarray(pos))
    assert len(calls) == 1
    np.testing.assert_allclose(np.asarray(o), loop_reference(q, k, v, window=9)[:, -2:],
                               atol=2e-5)


def test_library_impl_that_cannot_serve_raises(rng):
    q, k, v = (jnp.asarray(a) for a in _qkv(rng, 1, 100, 100, 2, 2, 16, np.float32))
    with pytest.raises(ValueError, match="cudnn.*bfloat16 / float16, got float32"):
        attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="splash.*multiple of 128, got 100"):
        attention(q, k, v, impl="splash")
    with pytest.raises(ValueError, match="cudnn.*positions"):
        attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                  impl="cudnn", q_positions=jnp.arange(100), kv_positions=jnp.arange(100))
    with pytest.raises(ValueError, match="cudnn.*sinks"):
        attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                  impl="cudnn", sinks=jnp.ones(2))


SPLASH_CASES = {   # T = 384: three 128-key blocks, so masks and windows cross block edges
    "causal": dict(),
    "gqa_window": dict(window=150),
    "noncausal_window": dict(causal=False, window=70),
    "segments_sinks": dict(segments=True, sinks=True, window=200),
}


def _splash_inputs(rng, case, dtype=np.float32, B=2, T=384, H=4, Hkv=2, D=32):
    q, k, v = _qkv(rng, B, T, T, H, Hkv, D, dtype)
    opts = dict(SPLASH_CASES[case])
    kw = {n: opts[n] for n in ("window", "causal") if n in opts}
    if opts.get("segments"):
        cuts = np.sort(rng.integers(1, T, (B, 3)), axis=1)
        kw["segment_ids"] = (np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1) + 1
    if opts.get("sinks"):
        kw["sinks"] = rng.standard_normal(H)
    return q, k, v, kw


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_splash_interpret_matches_loop_reference(rng, case):
    q, k, v, kw = _splash_inputs(rng, case)
    o = attention(*(jnp.asarray(a) for a in (q, k, v)), impl="splash",
                  **{n: jnp.asarray(a) if n in ("segment_ids", "sinks") else a
                     for n, a in kw.items()})
    ref_kw = {("seg" if n == "segment_ids" else n): a for n, a in kw.items()}
    np.testing.assert_allclose(np.asarray(o), loop_reference(q, k, v, **ref_kw), atol=2e-5)


@pytest.mark.parametrize("case", ["gqa_window", "segments_sinks"])
def test_splash_interpret_gradients(rng, case):
    q, k, v, kw = _splash_inputs(rng, case, T=256)
    kw = {n: jnp.asarray(a, jnp.int32 if n == "segment_ids" else jnp.float32)
          for n, a in kw.items()} | {n: a for n, a in kw.items() if n in ("window", "causal")}
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    sinks = kw.pop("sinks", jnp.asarray(rng.standard_normal(q.shape[2]), jnp.float32))
    with_sinks = case == "segments_sinks"

    def grads(impl):
        def loss(q, k, v, s):
            return jnp.sum(w * attention(q, k, v, impl=impl, sinks=s if with_sinks else None,
                                         **kw))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
            *(jnp.asarray(a) for a in (q, k, v)), sinks)

    got, want = grads("splash"), grads("reference")
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, err_msg=name)
    assert not with_sinks or np.abs(np.asarray(got[3])).max() > 1e-3   # sinks get a gradient


def test_splash_bfloat16(rng):
    q, k, v, kw = _splash_inputs(rng, "gqa_window")
    o = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), impl="splash", **kw)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), loop_reference(q, k, v, **kw),
                               atol=5e-2)


def test_compare_with_xla_device_check(rng):
    """The helper a GPU/TPU check script calls, run here on splash in interpret mode."""
    q, k, v = (jnp.asarray(a) for a in _qkv(rng, 1, 128, 128, 2, 1, 16, np.float32))
    err = library.compare_with_xla("splash", q, k, v, window=40)
    assert set(err) == {"o", "dq", "dk", "dv", "o_scale", "dq_scale", "dk_scale", "dv_scale"}
    assert all(err[n] < 1e-4 for n in ("o", "dq", "dk", "dv"))
    assert all(err[f"{n}_scale"] > 0.1 for n in ("o", "dq", "dk", "dv"))


def _lowered(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.fixture
def cudnn_from_cpu(monkeypatch):
    """Lowering cuDNN attention needs no GPU, but jax asks the CUDA plugin for the cuDNN
    version while tracing (it picks kernel features by version) and raises 'cuDNN is not
    detected.' without it. Stand in a cuDNN 9.8 version for the trace."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError as e:
        pytest.skip(f"jax's cuDNN attention module is not importable here: {e!r}")
    if not hasattr(fa, "check_cudnn_version"):
        pytest.skip("jax no longer asks `check_cudnn_version`; update this fixture")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90800)


@pytest.mark.parametrize("kw", [dict(), dict(window=32), dict(causal=False)],
                         ids=["causal", "gqa_window", "noncausal"])
def test_cudnn_lowers_for_cuda(cudnn_from_cpu, rng, kw):
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(rng, 2, 256, 256, 4, 2, 64))
    fwd = lambda q, k, v: attention(q, k, v, impl="cudnn", **kw)
    text = _lowered(fwd, (q, k, v), "cuda")
    assert "__cudnn$fmhaSoftmax" in text
    # The backend config (JSON, quotes escaped as \22): cuDNN's window (pos − L, pos] counts
    # the query itself, as ours does, so L must be our window (0 = none).
    config = lambda key: re.search(key + r"\\22: (?:\\22)?(\w+)", text).group(1)
    assert config("sliding_window_length") == str(kw.get("window", 0))
    assert config("mask_type") == ("CAUSAL" if kw.get("causal", True) else "NO_MASK")
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    text = _lowered(jax.grad(loss, argnums=(0, 1, 2)), (q, k, v), "cuda")
    assert "__cudnn$fmhaSoftmaxBackward" in text


@pytest.mark.parametrize("case", list(SPLASH_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_splash_lowers_for_tpu(rng, case, dtype):
    q, k, v, kw = _splash_inputs(rng, case, T=256, D=64)
    q, k, v = (jnp.asarray(a, dtype) for a in (q, k, v))
    seg = kw.get("segment_ids")
    seg = None if seg is None else jnp.asarray(seg, jnp.int32)
    sinks = kw.get("sinks")
    sinks = None if sinks is None else jnp.asarray(sinks, jnp.float32)

    def fwd(q, k, v, sinks):
        return library.attention_splash(q, k, v, scale=0.125, causal=kw.get("causal", True),
                                        window=kw.get("window"), sinks=sinks, q_seg=seg,
                                        kv_seg=seg, interpret=False)

    assert _lowered(fwd, (q, k, v, sinks), "tpu").count("tpu_custom_call") == 1
    loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32))
    argnums = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
    # forward, dkv and dq kernels
    text = _lowered(jax.grad(loss, argnums=argnums), (q, k, v, sinks), "tpu")
    assert text.count("tpu_custom_call") == 3
