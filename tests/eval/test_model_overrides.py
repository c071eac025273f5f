"""`model.*` overrides on a loaded model (eval's --override with --checkpoint): a field that
keeps the parameter shapes rebuilds the model on the same variables; anything else is a clear
error."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import common
from mem_lm import LanguageModel, ModelConfig


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(0)    # random values without compiling `init`
    return model, jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                               nn.meta.unbox(shapes))


def test_topk_switch_on_the_same_variables(tiny):
    model, variables = tiny
    sparse = common.with_model_overrides(model, variables, [
        "model.mixers.attn.topk_blocks=1", "model.mixers.attn.topk_block_size=4",
        "model.mixers.attn.topk_window=0"])
    assert common.model_config_of(sparse).settings("attn")["topk_blocks"] == 1
    assert common.model_config_of(model).settings("attn")["topk_blocks"] is None
    x = jnp.asarray(np.random.default_rng(0).integers(0, 16, (1, 24)))
    logits = [np.asarray(jax.jit(m.apply)(variables, x)) for m in (sparse, model)]
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


@pytest.mark.parametrize("override, message", [
    ("model.d_model=32", "changes the model's parameters"),
    ("train.steps=3", "only model.FIELD=VALUE"),
    ("model.mixers.attn.topk_block_size=3", "topk_block_size"),
    ("model.no_such.field=1", "no field"),
])
def test_bad_overrides_are_clear_errors(tiny, override, message, capsys):
    with pytest.raises(common.EvalError):
        common.with_model_overrides(*tiny, [override])
    assert message in capsys.readouterr().err
