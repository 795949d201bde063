"""The MLP denoiser for 2-D toy data (diffusion_jax.models.mlp)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import get_base_config
from diffusion_jax.models import MLPDenoiser, build_model


def mlp_config(var_type="fixed_large", **model):
    c = get_base_config()
    c.data.name = "swissroll"
    c.data.channels = 2
    c.diffusion.model_var_type = var_type
    c.model.update(dict(name="mlp", hidden=32, depth=2, dropout=0.2, dtype="float32"))
    c.model.update(model)
    return c


def test_mlp_shapes_and_functional_use():
    assert build_model(mlp_config(), nnx.Rngs(0)).dense_out.kernel.shape == (32, 2)
    model = build_model(mlp_config("learned_range"), nnx.Rngs(0))
    assert isinstance(model, MLPDenoiser)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x, t, k: nnx.merge(graphdef, s)(x, t, dropout_key=k))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 2)), jnp.float32)
    t = jnp.arange(5, dtype=jnp.int32) * 100
    out = fwd(state, x, t, None)
    assert out.shape == (5, 4) and out.dtype == jnp.float32
    k = jax.random.key(0)
    np.testing.assert_array_equal(fwd(state, x, t, k), fwd(state, x, t, k))
    assert float(jnp.abs(fwd(state, x, t, k) - out).max()) > 0
    assert float(jnp.abs(fwd(state, x, t + 1, None) - out).max()) > 0  # t matters


def test_mlp_bad_inputs():
    model = build_model(mlp_config(), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\]"):
        model(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="t must have shape"):
        model(jnp.zeros((4, 2)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="model.dtype='float64'"):
        build_model(mlp_config(dtype="float64"), nnx.Rngs(0))
