"""Mixed precision (`models.precision`): bfloat16 compute with float32 gradient sums, against
a float64 re-derivation on the same bfloat16-rounded operands."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models import precision

CONV = functools.partial(
    jax.lax.conv_general_dilated,
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
)


def _operands(seed=0, b=64, hw=8, cin=16, cout=8):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (b, hw, hw, cin)).astype(jnp.bfloat16)
    w = 0.1 * jax.random.normal(k[1], (3, 3, cin, cout))
    bias = 0.1 * jax.random.normal(k[2], (cout,))
    g = jax.random.normal(k[3], (b, hw, hw, cout))
    return x, w, bias, g


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _conv64(x, w):
    """The convolution in float64 on the CPU (the oracle)."""
    with jax.enable_x64():
        return np.asarray(CONV(jnp.asarray(x), jnp.asarray(w)))


def _kernel_grad64(x, g, w_shape):
    """d(sum(conv(x, w) * g))/dw in float64."""
    with jax.enable_x64():
        _, vjp = jax.vjp(lambda w: CONV(jnp.asarray(x), w), jnp.zeros(w_shape, jnp.float64))
        return np.asarray(vjp(jnp.asarray(g))[0])


def _rel(a, b):
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


def test_affine_sums_the_parameter_gradients_in_float32():
    """The kernel and bias gradients of a bfloat16 convolution over a batch of 64 equal the
    float64 sums over the same bfloat16 operands to float32 rounding (flax's own bfloat16
    convolution rounds them to bfloat16: ~100x further off); the forward pass and the input
    gradient stay bfloat16."""
    x, w, bias, g = _operands()
    g16 = g.astype(jnp.bfloat16)

    def loss(fn, x, w, bias):
        return jnp.sum(fn(x, w, bias).astype(jnp.float32) * g16.astype(jnp.float32))

    ours = lambda x, w, b: precision.affine(CONV, x, w, b)
    flax_like = lambda x, w, b: CONV(x, w.astype(x.dtype)) + b.astype(x.dtype)
    y = ours(x, w, bias)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, flax_like(x, w, bias))

    dx, dw, db = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2))(x, w, bias)
    _, dw_flax, db_flax = jax.grad(functools.partial(loss, flax_like), argnums=(0, 1, 2))(
        x, w, bias
    )
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    dw64 = _kernel_grad64(_f64(x), _f64(g16), w.shape)
    db64 = _f64(g16).sum(axis=(0, 1, 2))
    assert _rel(dw, dw64) < 1e-5 and _rel(db, db64) < 1e-5, (_rel(dw, dw64), _rel(db, db64))
    assert _rel(dw_flax, dw64) > 100 * _rel(dw, dw64)
    assert _rel(db_flax, db64) > 100 * max(_rel(db, db64), 1e-7)
    # the input gradient: bfloat16 of the float64 transpose
    with jax.enable_x64():
        _, vjp = jax.vjp(lambda a: CONV(a, jnp.asarray(_f64(w.astype(jnp.bfloat16)))), _f64(x))
        dx64 = np.asarray(vjp(jnp.asarray(_f64(g16)))[0])
    assert _rel(dx, dx64) < 1e-2


def test_dense_affine_matches_float64():
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (256, 32)).astype(jnp.bfloat16)
    w, g = 0.1 * jax.random.normal(k[1], (32, 16)), jax.random.normal(k[2], (256, 16))
    g16 = g.astype(jnp.bfloat16)
    fn = lambda w, b: jnp.sum(precision.affine(precision._dense, x, w, b) * g16)
    dw, db = jax.grad(fn, argnums=(0, 1))(w, jnp.zeros(16))
    assert _rel(dw, _f64(x).T @ _f64(g16)) < 1e-5
    assert _rel(db, _f64(g16).sum(0)) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layers_keep_flax_parameters_and_outputs(dtype):
    """`precision.Conv` / `Linear` have nnx.Conv / nnx.Linear's parameters and, at either
    dtype, their outputs (bitwise: the same operations in the same order)."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    for ours, theirs, kwargs in (
        (precision.Conv, nnx.Conv, dict(kernel_size=(3, 3), strides=2, padding=((0, 1), (0, 1)))),
        (precision.Linear, nnx.Linear, {}),
    ):
        a = ours(4, 6, dtype=dtype, rngs=nnx.Rngs(0), **kwargs)
        b = theirs(4, 6, dtype=dtype, rngs=nnx.Rngs(0), **kwargs)
        a.bias.value = b.bias.value = jnp.arange(6.0) / 7  # not the zero init
        assert jax.tree.map(jnp.shape, nnx.state(a)) == jax.tree.map(jnp.shape, nnx.state(b))
        np.testing.assert_array_equal(a(x), b(x))
        assert a(x).dtype == dtype


def test_affine_has_forward_mode_for_the_ode_likelihood():
    """`jax.jvp` (the ODE likelihood's divergence) through `affine`: the tangent in x equals
    the convolution of the tangent (the map is linear in x)."""
    x, w, bias, g = _operands(b=4)
    dx = g[..., :1].repeat(16, -1).astype(jnp.bfloat16)
    y, dy = jax.jvp(lambda a: precision.affine(CONV, a, w, bias), (x,), (dx,))
    np.testing.assert_array_equal(y, precision.affine(CONV, x, w, bias))
    assert _rel(dy, _conv64(_f64(dx), _f64(w.astype(jnp.bfloat16)))) < 1e-2
