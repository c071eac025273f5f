"""Multi-head latent attention (layers/mla.py): against a float64 NumPy oracle written here from
the reference's rules (full forward, packed documents, prefill + absorbed decode steps), against
transformers' own MLA modules of Kimi Linear and DeepSeek-V3 (tests/fixtures/hf/mla_*, made by
tests/fixtures/make_hf_mla_fixtures.py with torch 2.13 + transformers 5.24) in float32, the decode
cache (latents only; a decode step never forms per-head keys over the cache), and the settings'
checks. Decoding == full forward, packing and causality in the model run in
tests/mem_lm/test_model.py and test_causality.py.

Each test compiles one program; parameters are drawn from their shapes, not by running `init`."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.mla import MLA
from mem_lm import ModelConfig
from mem_lm.model import init_cache

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
D_MODEL = 16
# Widths that all differ (kv_lora_rank, qk_nope, qk_rope, v), so a wrong split shows.
DIMS = dict(d_model=D_MODEL, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=6,
            qk_rope_head_dim=4, v_head_dim=5)


def param_shapes(m):
    x = jnp.zeros((1, 1, m.d_model), jnp.float32)
    return jax.eval_shape(lambda: nn.meta.unbox(m.init(
        jax.random.PRNGKey(0), x, positions=jnp.zeros((1, 1), jnp.int32))["params"]))


def random_params(m, rng, dtype):
    """Kernels N(0, 0.3²), norm scales 1 + N(0, 0.3²), biases N(0, 0.5²)."""
    def fill(path, s):
        name = jax.tree_util.keystr(path)
        z = rng.standard_normal(s.shape)
        z = 1 + 0.3 * z if "scale" in name else (0.5 if "bias" in name else 0.3) * z
        return jnp.asarray(z, dtype)
    return jax.tree_util.tree_map_with_path(fill, param_shapes(m))


# --- the oracle ---------------------------------------------------------------------------------

def _rms(a, w, eps):
    return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + eps) * w


def _rope(a, positions, theta):
    """Rotate-half RoPE of a [B, T, H, D] by positions [B, T]."""
    half = a.shape[-1] // 2
    freq = theta ** (-np.arange(half) / half)
    ang = positions[:, :, None, None] * freq
    a1, a2 = a[..., :half], a[..., half:]
    return np.concatenate([a1 * np.cos(ang) - a2 * np.sin(ang),
                           a2 * np.cos(ang) + a1 * np.sin(ang)], -1)


def oracle(m: MLA, p, x, positions, segment_ids=None):
    """MLA in float64 NumPy from the reference's rules (KimiLinearAttention /
    DeepseekV3Attention): y [B, T, d] for tokens x at `positions` [B, T], documents by
    `segment_ids` (a new document where the id changes)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    B, T, d = x.shape
    H, R = m.num_heads, m.kv_lora_rank
    dn, dr, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    bias = lambda n: p[n]["bias"] if m.attention_bias else 0
    if m.q_lora_rank is None:
        q = x @ p["q_proj"]["kernel"].reshape(d, -1)
    else:
        cq = _rms(x @ p["q_down_proj"]["kernel"] + bias("q_down_proj"), p["q_norm"]["scale"],
                  m.norm_eps)
        q = cq @ p["q_up_proj"]["kernel"].reshape(m.q_lora_rank, -1)
    q = q.reshape(B, T, H, dn + dr)
    ckv = x @ p["kv_down_proj"]["kernel"] + bias("kv_down_proj")
    c = _rms(ckv[..., :R], p["kv_norm"]["scale"], m.norm_eps)
    kv = (c @ p["kv_up_proj"]["kernel"].reshape(R, -1)).reshape(B, T, H, dn + dv)
    k = np.concatenate([kv[..., :dn], np.broadcast_to(ckv[:, :, None, R:], (B, T, H, dr))], -1)
    v = kv[..., dn:]
    if m.rope:
        q[..., dn:] = _rope(q[..., dn:], positions, m.rope_theta)
        k[..., dn:] = _rope(k[..., dn:], positions, m.rope_theta)
    s = np.einsum("bthd,bshd->bhts", q, k) * (dn + dr) ** -0.5
    see = np.tril(np.ones((T, T), bool))[None]
    if segment_ids is not None:
        doc = np.cumsum(np.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)),
                               constant_values=True), 1)
        see = see & (doc[:, :, None] == doc[:, None, :])
    s = np.where(see[:, None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", a, v).reshape(B, T, H * dv)
    return o @ p["o_proj"]["kernel"].reshape(H * dv, d) + bias("o_proj")


def run_all(m: MLA, T0: int):
    """jit of (params, x [B, T, d], packed segment ids [B, T], their positions) -> the full
    forward, the packed forward, and prefill of T0 tokens + one decode step per later token
    (the absorbed path) through the cache."""
    def run(p, x, seg, seg_pos):
        B, T = x.shape[:2]
        ap = lambda x, **kw: m.apply({"params": p}, x, **kw)
        full = ap(x, positions=jnp.arange(T)[None])[0]
        packed = ap(x, positions=seg_pos, segment_ids=seg)[0]
        cache = m.init_cache(B, T)
        outs = []
        for s, e in [(0, T0)] + [(t, t + 1) for t in range(T0, T)]:
            pos = jnp.int32(s)
            y, cache = ap(x[:, s:e], positions=(pos + jnp.arange(e - s))[None], cache=cache,
                          cache_pos=pos)
            outs.append(y)
        return full, packed, jnp.concatenate(outs, 1), cache
    return jax.jit(run)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def segment_positions(seg):
    starts = np.pad(seg[:, 1:] != seg[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    t = np.arange(seg.shape[1])[None]
    return t - np.maximum.accumulate(np.where(starts, t, 0), 1)


CASES = {
    # Kimi Linear: a direct query, no position encoding.
    "kimi-nope": dict(),
    # DeepSeek-V3: low-rank query, RoPE on the shared part, biases.
    "deepseek-rope-qlora-bias": dict(q_lora_rank=5, rope=True, rope_theta=100.0,
                                     attention_bias=True),
    # No shared key part at all.
    "no-rope-part": dict(q_lora_rank=5, qk_rope_head_dim=0),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_oracle_float64(case, x64, rng):
    """Full forward, packed documents and prefill + absorbed decode against the oracle. The
    layer's RMSNorm and RoPE compute in float32, hence float32-level tolerances."""
    m = MLA(**{**DIMS, **CASES[case]}, dtype=jnp.float64, impl="xla")
    p = random_params(m, rng, jnp.float64)
    B, T, T0 = 2, 9, 4
    x = rng.standard_normal((B, T, D_MODEL))
    seg = np.array([[1] * 4 + [2] * 3 + [3] * 2, [5] * 9])
    seg_pos = segment_positions(seg)
    full, packed, cached, cache = run_all(m, T0)(p, x, seg, seg_pos)
    want = oracle(m, p, x, np.arange(T)[None].repeat(B, 0))
    assert full.dtype == jnp.float64
    assert rel_err(full, want) < 1e-5, rel_err(full, want)
    assert rel_err(packed, oracle(m, p, x, seg_pos, seg)) < 1e-5
    assert rel_err(cached, want) < 1e-5, rel_err(cached, want)
    # The packed documents restart: the second document differs from the unpacked forward.
    assert rel_err(packed[0, 4:7], want[0, 4:7]) > 1e-2
    assert cache["latent"].shape == (B, T, m.kv_lora_rank + m.qk_rope_head_dim)


# --- transformers' modules ----------------------------------------------------------------------

HF_KINDS = sorted(d for d in os.listdir(FIXTURES) if d.startswith("mla_"))


def from_hf(kind):
    """(module, params, fixture): the transformers config's attention fields as mla's, the
    module's weights as mla's parameters -- the mapping an importer uses. transformers' Linear
    weights are [out, in]; per head, q's outputs are [nope | rope] and kv_b_proj's
    [k_nope | v]; kv_a_proj_with_mqa's are [latent | k_rope]. DeepSeek's interleaved RoPE
    (`rope_interleave`: pairs (2i, 2i+1) rotate together) is mla's rotate-half RoPE once the
    rope rows of the q projection and of kv_a_proj_with_mqa are de-interleaved (evens, then
    odds)."""
    path = os.path.join(FIXTURES, kind)
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    w = dict(np.load(os.path.join(path, "mla.npz")))
    H, R, d = c["num_attention_heads"], c["kv_lora_rank"], c["hidden_size"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    rope = c["model_type"] == "deepseek_v3"
    rows = np.arange(dr)
    if rope and c.get("rope_interleave", True):
        rows = np.concatenate([rows[0::2], rows[1::2]])
    q_rows = np.concatenate([np.arange(dn), dn + rows])            # per head
    kv_rows = np.concatenate([np.arange(R), R + rows])
    heads = lambda W, e: W.T.reshape(W.shape[1], H, e)             # [in, H, e]
    p = {"kv_down_proj": {"kernel": w["kv_a_proj_with_mqa.weight"][kv_rows].T},
         "kv_norm": {"scale": w["kv_a_layernorm.weight"]},
         "kv_up_proj": {"kernel": heads(w["kv_b_proj.weight"], dn + dv)},
         "o_proj": {"kernel": w["o_proj.weight"].T.reshape(H, dv, d)}}
    if c["q_lora_rank"] is None:
        p["q_proj"] = {"kernel": heads(w["q_proj.weight"], dn + dr)[..., q_rows]}
    else:
        p["q_down_proj"] = {"kernel": w["q_a_proj.weight"].T}
        p["q_norm"] = {"scale": w["q_a_layernorm.weight"]}
        p["q_up_proj"] = {"kernel": heads(w["q_b_proj.weight"], dn + dr)[..., q_rows]}
    if c["attention_bias"]:
        p["q_down_proj"]["bias"] = w["q_a_proj.bias"]
        p["kv_down_proj"]["bias"] = w["kv_a_proj_with_mqa.bias"][kv_rows]
        p["o_proj"]["bias"] = w["o_proj.bias"]
    theta = c.get("rope_parameters", {}).get("rope_theta", 10000.0)
    m = MLA(d_model=d, num_heads=H, kv_lora_rank=R, qk_nope_head_dim=dn, qk_rope_head_dim=dr,
            v_head_dim=dv, q_lora_rank=c["q_lora_rank"], rope=rope, rope_theta=theta,
            attention_bias=c["attention_bias"], impl="xla")
    assert jax.tree.map(np.shape, p) == jax.tree.map(np.shape, param_shapes(m))
    return m, jax.tree.map(jnp.asarray, p), w


@pytest.mark.parametrize("kind", HF_KINDS)
def test_matches_transformers_module(kind):
    """transformers' module's output in float32 (causal, positions 0 .. T-1), from the full
    forward and from prefill + absorbed decode steps through the latent cache."""
    m, p, w = from_hf(kind)
    x = w["x"]
    B, T = x.shape[:2]
    seg = np.ones((B, T), np.int32)
    full, _, cached, _ = run_all(m, 3)(p, x, seg, segment_positions(seg))
    assert rel_err(full, w["y"]) < 1e-5, rel_err(full, w["y"])
    assert rel_err(cached, w["y"]) < 1e-5, rel_err(cached, w["y"])


def test_hf_fixtures_present():
    assert {"mla_kimi_linear", "mla_kimi_linear_qlora_bias", "mla_deepseek_v3"} <= set(HF_KINDS)


# --- the cache ----------------------------------------------------------------------------------

def test_cache_holds_only_latents():
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim numbers (the
    normalised latent and the shared rope key), not per-head keys and values; the model's cache
    is built from it."""
    cfg = ModelConfig(vocab_size=11, d_model=32, num_layers=2, num_heads=4, pattern=("mla",),
                      mixers={"mla": dict(kv_lora_rank=12, qk_rope_head_dim=4, rope=True)})
    cache = init_cache(cfg, 3, 10)
    for layer in cache["layers"]:
        assert jax.tree.map(np.shape, layer) == {"latent": (3, 10, 12 + 4)}
    # attn at the same sizes caches 2 · heads · head_dim = 64 numbers per token.
    attn = init_cache(ModelConfig(vocab_size=11, d_model=32, num_layers=1, num_heads=4), 3, 10)
    assert sum(a.size for a in jax.tree.leaves(attn["layers"][0])) == 3 * 10 * 64


def test_decode_step_never_forms_per_head_keys():
    """The absorbed step works on the latents: no value of its program has a per-head key or
    value for every cache slot ([B, L, H, ...])."""
    m = MLA(**DIMS)
    p = param_shapes(m)
    B, L, H = 3, 13, DIMS["num_heads"]
    step = lambda p, x, c: m.apply({"params": p}, x, positions=jnp.full((1, 1), 5), cache=c,
                                   cache_pos=jnp.int32(5))
    args = (p, jax.ShapeDtypeStruct((B, 1, D_MODEL), jnp.float32),
            jax.eval_shape(lambda: m.init_cache(B, L)))

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
            for val in eqn.params.values():     # inner programs (pjit, custom_vjp, scan, ...)
                for sub in val if isinstance(val, (list, tuple)) else (val,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from shapes(inner)
    seen = set(shapes(jax.make_jaxpr(step)(*args).jaxpr))
    assert any(s[:2] == (B, L) for s in seen)        # the cache is read
    assert not [s for s in seen if len(s) == 4 and s[:3] == (B, L, H)], sorted(seen)
    # The multi-token path does up-project the cache (the check above can see them).
    chunk = lambda p, x, c: m.apply({"params": p}, x, positions=jnp.arange(2)[None], cache=c,
                                    cache_pos=jnp.int32(0))
    args2 = (p, jax.ShapeDtypeStruct((B, 2, D_MODEL), jnp.float32), args[2])
    assert any(len(s) == 4 and s[:3] == (B, L, H)
               for s in shapes(jax.make_jaxpr(chunk)(*args2).jaxpr))


# --- settings -----------------------------------------------------------------------------------

def test_defaults_follow_head_dim_and_param_names():
    """None sizes take Kimi Linear's proportions of the model's head_dim (128: qk_nope 128,
    qk_rope 64, v 128, kv_lora_rank 512); the parameters a transformers import fills."""
    from layers import registry
    from layers.mla import dims
    cfg = ModelConfig(vocab_size=11, d_model=48, num_layers=1, num_heads=3, head_dim=8,
                      pattern=("mla",))
    assert dims(cfg.shared(), cfg.settings("mla")) == dict(
        num_heads=3, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8)
    assert registry.get("mla").defaults()["rope"] is False
    assert set(param_shapes(MLA(**DIMS))) == {"q_proj", "kv_down_proj", "kv_norm",
                                              "kv_up_proj", "o_proj"}
    assert set(param_shapes(MLA(**DIMS, q_lora_rank=3))) == {
        "q_down_proj", "q_norm", "q_up_proj", "kv_down_proj", "kv_norm", "kv_up_proj",
        "o_proj"}


@pytest.mark.parametrize("field, value, extra", [
    ("heads", 0, {}), ("q_lora_rank", 0, {}), ("kv_lora_rank", -1, {}),
    ("qk_nope_head_dim", 0, {}), ("v_head_dim", 0, {}), ("qk_rope_head_dim", -1, {}),
    ("qk_rope_head_dim", 3, {"rope": True}), ("qk_rope_head_dim", 0, {"rope": True}),
    ("rope_base", 0.0, {}), ("rope", "yes", {}), ("attention_bias", 1, {}),
    ("kv_lora_rank", 2**31 - 1, {"qk_rope_head_dim": 2}),
    ("qk_nope_head_dim", 2**31 - 1, {}), ("nope", 1, {})])
def test_bad_settings_name_the_field(field, value, extra):
    with pytest.raises(ValueError, match=f"ModelConfig.mixers.mla.{field}: "):
        ModelConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, pattern=("mla",),
                    mixers={"mla": {**extra, field: value}})


def test_odd_default_rope_width_names_the_field():
    with pytest.raises(ValueError, match=r"ModelConfig.mixers.mla.qk_rope_head_dim: .*3 \(its "
                                         r"default from head_dim\)"):
        ModelConfig(vocab_size=11, d_model=12, num_layers=1, num_heads=2, pattern=("mla",),
                    mixers={"mla": {"rope": True}})
