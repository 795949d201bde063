"""diffusion_jax.distributed: the XLA compiler options every jitted program gets."""

import types

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax import distributed


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
