"""The chunked forms' backward keeps no state per token: XLA's own memory account of the compiled
forward+backward grows linearly in T and stays far below T·H·K·V floats (deterministic, no
timing; the programs are compiled, never run)."""
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.linear_attention import linear_attention

B, H, K, V, CHUNK = 1, 1, 128, 128, 64
SHORT, LONG = 4096, 16384


def _spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _fwd_bwd_bytes(op: str, T: int) -> int:
    """Temporaries + outputs of the compiled gradient of <o, 1> + <final state, 1>."""
    args = dict(q=_spec(B, T, H, K), k=_spec(B, T, H, K), v=_spec(B, T, H, V),
                h0=_spec(B, H, K, V))
    if op == "gdn":
        args.update(beta=_spec(B, T, H), g=_spec(B, T, H))
    elif op == "la_gk":
        args.update(gk=_spec(B, T, H, K))
    else:
        args.update(g=_spec(B, T, H))

    def loss(x):
        kw = dict(initial_state=x["h0"], output_final_state=True, impl="xla", chunk_size=CHUNK)
        if op == "gdn":
            o, s = gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], **kw)
        else:
            o, s = linear_attention(x["q"], x["k"], x["v"], x.get("g"), x.get("gk"), **kw)
        return jnp.sum(o) + jnp.sum(s)

    mem = jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis()
    return mem.temp_size_in_bytes + mem.output_size_in_bytes


@pytest.mark.parametrize("op", ["la_g", "la_gk", "gdn"])
def test_fwd_bwd_memory_is_linear_and_far_below_a_state_per_token(op):
    short, long = _fwd_bwd_bytes(op, SHORT), _fwd_bwd_bytes(op, LONG)
    per_token_states = LONG * H * K * V * 4
    # No state per token: a fraction of what storing one would take (inputs, gradients and the
    # chunk-boundary states, T/C of them, are all there is) ...
    assert long < per_token_states / 4, (op, long, per_token_states)
    # ... and linear growth (a fixed-size working set per group of chunks may make it less).
    assert long <= 4.5 * short, (op, short, long)
    # The growth per token is a few token-sized arrays (K+V) and a few chunk-boundary ones
    # (K·V/C each: states, transitions and their cotangents), far less than a K·V state.
    per_token_growth = (long - short) / (LONG - SHORT)
    assert per_token_growth < H * K * V * 4 / 4, (op, per_token_growth)
