"""Mixed precision with float32 gradient sums: layers that compute in bfloat16 and hand back
float32 parameter gradients summed in float32.

Flax's own layers with `dtype=bfloat16` cast the float32 kernel to bfloat16 before the
convolution, so the kernel's gradient comes out of a bfloat16 convolution over the batch:
under data parallelism each device's partial sum is bfloat16 and so is the all-reduce over
devices; the bias gradient is a bfloat16 reduction over B*H*W elements. `affine` keeps the
forward pass (and the input gradient) in bfloat16, the activations stored for the backward
pass bfloat16, and computes the kernel and bias gradients with float32 operands and outputs,
so the sum over the batch, and the all-reduce GSPMD places after it, are float32 (as the
paper's float32 training summed them). The parameters stay float32 (`param_dtype`).

On a TPU a float32 convolution at the default precision runs single bfloat16 passes on the
MXU (https://docs.jax.dev/en/latest/_autosummary/jax.lax.Precision.html), so the float32
weight gradient costs no more MXU work than the bfloat16 one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LinearOp = Callable[[jax.Array, jax.Array], jax.Array]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def affine(op: LinearOp, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """op(x, kernel) + bias in x's (compute) dtype; `op` is linear in each argument (a
    convolution or a contraction over x's last axis), `bias` [C_out] is added over the last
    axis. Gradients: x's in x's dtype, kernel's and bias's float32 sums over the batch."""
    return op(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)


@affine.defjvp
def _affine_jvp(op, primals, tangents):
    """The kernel's and bias's tangent terms are float32 (a float32 product, a float32
    broadcast) cast to x's dtype, so their transposes, the gradients, cast the cotangent to
    float32 first and sum the batch in float32; forward mode (`jax.jvp`) works as well."""
    x, kernel, bias = primals
    dx, dkernel, dbias = tangents
    y = affine(op, x, kernel, bias)
    dy = op(dx, kernel.astype(x.dtype)) + op(x.astype(jnp.float32), dkernel).astype(x.dtype)
    return y, dy + jnp.broadcast_to(dbias, y.shape).astype(x.dtype)


def keep_parameters_float32(args: tuple, dtype: Any = None, inexact: bool = True) -> tuple:
    """A flax `promote_dtype` (its signature; `inexact` unused) that casts the input (first of
    `args`) to `dtype` and leaves the parameters float32, so their gradients are float32 sums."""
    x, *params = args
    return (x if dtype is None else jnp.asarray(x, dtype), *params)


def _is_mixed(dtype) -> bool:
    return dtype is not None and jnp.dtype(dtype) != jnp.float32


class Conv(nnx.Conv):
    """`nnx.Conv` (NHWC, same parameters) whose reduced-precision path is `affine`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H', W', C_out] in `dtype`."""
        if not _is_mixed(self.dtype):
            return super().__call__(x)
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        op = functools.partial(
            jax.lax.conv_general_dilated,
            window_strides=strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return affine(op, x.astype(self.dtype), self.kernel[...], self.bias[...])


def _dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, kernel)


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters) whose reduced-precision path is `affine`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., C_in] -> [..., C_out] in `dtype`."""
        if not _is_mixed(self.dtype):
            return super().__call__(x)
        return affine(_dense, x.astype(self.dtype), self.kernel[...], self.bias[...])
