"""diffusion_jax.distributed: the XLA compiler options every jitted model program gets."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from configs.cifar10 import get_config
from diffusion_jax import distributed, evaluate, generation, schedules, train
from diffusion_jax.metrics import inception


def _tap(a: np.ndarray, i: int, j: int) -> np.ndarray:
    """a[:, h + i - 1, w + j - 1] (zero outside), [B, H, W, C]: tap (i, j) of a SAME 3x3 window."""
    h, w = a.shape[1:3]
    return np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, i : i + h, j : j + w]


def test_cpu_programs_keep_ynnpack_for_matmuls_only(devices):
    mesh = distributed.make_mesh(devices)
    options = distributed.compiler_options(mesh)
    assert options == distributed.CPU_COMPILER_OPTIONS
    assert distributed.compiler_options() == options  # the default backend is CPU here

    # The convolutions these options hand to other kernels, forward and both gradients,
    # against float64 NumPy (the gradients of sum(y * g) are closed forms of the taps).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 32, 32)) / 17).astype(np.float32)
    g = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)

    def conv(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)

    def loss(x, w):
        return jnp.sum(conv(x, w) * g)

    fn = jax.jit(lambda x, w: (conv(x, w), jax.grad(loss, (0, 1))(x, w)), compiler_options=options)
    y, (dx, dw) = fn(x, w)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    taps = [(i, j) for i in range(3) for j in range(3)]
    y_ref = sum(_tap(x64, i, j) @ w64[i, j] for i, j in taps)
    dx_ref = sum(_tap(g64, 2 - i, 2 - j) @ w64[i, j].T for i, j in taps)
    dw_ref = np.stack([np.einsum("bhwi,bhwo->io", _tap(x64, i, j), g64) for i, j in taps])
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, dw_ref.reshape(w.shape), rtol=1e-4, atol=1e-3)


def test_options_this_jax_rejects_are_left_out(monkeypatch):
    monkeypatch.setattr(distributed, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    assert distributed.compiler_options() == {}


def test_accelerators_get_no_cpu_options():
    gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
    assert distributed.compiler_options(gpu_mesh) == {}


def _tiny_unet_config():
    config = get_config()
    config.data.image_size = 8
    config.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
    return config


def _compile_train(mesh):
    config = _tiny_unet_config()
    graphdef, _, rest = nnx.split(train.abstract_model(config), nnx.Param, ...)
    state = jax.eval_shape(lambda: train.init_train_state(config)[2])
    fn = train.compile_train_fn(
        config,
        generation.model_apply(graphdef, rest),
        schedules.diffusion_from_config(config.diffusion),
        train.make_optimizer(config.training),
        mesh,
    )
    batch = {
        "image": jax.ShapeDtypeStruct((1, 8, 8, 8, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((1, 8), jnp.int32),
    }
    fn.lower(state, batch).compile()


def _compile_sampler_and_bpd(mesh):
    config = _tiny_unet_config()
    graphdef, _, rest = nnx.split(train.abstract_model(config), nnx.Param, ...)
    apply = generation.model_apply(graphdef, rest)
    params = jax.eval_shape(lambda: train.init_train_state(config)[2]).params
    labels = jax.ShapeDtypeStruct((8,), jnp.int32)
    key = jax.random.PRNGKey(0)
    generation.make_sampler(config, apply, mesh, 8, "2").lower(params, key, labels).compile()
    images = jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.uint8)
    mask = jax.ShapeDtypeStruct((8,), jnp.float32)
    bpd_fn = evaluate.make_bpd_fn(config, apply, mesh)
    bpd_fn.lower(params, images, labels, mask, key).compile()


def _compile_inception(mesh):
    zeros = lambda key, shape, dtype=np.float32: np.zeros(shape, dtype)
    params = nnx.state(inception.InceptionV3(nnx.Rngs(0), kernel_init=zeros))
    fn = inception.make_feature_fn(params, mesh, size=75)
    fn.forward.lower(fn.params, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.uint8)).compile()


@pytest.mark.parametrize(
    "compile_programs,modules",
    [
        (_compile_train, ["jit_multi_step"]),
        (_compile_sampler_and_bpd, ["jit_run"] * 2),
        (_compile_inception, ["jit_forward"]),
    ],
)
def test_model_programs_compile_with_the_options(compile_programs, modules, tmp_path, monkeypatch):
    """Every jitted program that runs a model takes `compiler_options(mesh)`: options that
    make XLA dump each module it compiles show one dump per program."""
    dump = {"xla_dump_to": str(tmp_path)}
    monkeypatch.setattr(distributed, "compiler_options", lambda mesh=None: dump)
    compile_programs(distributed.make_mesh(jax.devices()[:1]))
    dumped = [p.name.split(".")[1] for p in tmp_path.glob("*after_optimizations.txt")]
    assert sorted(dumped) == modules
