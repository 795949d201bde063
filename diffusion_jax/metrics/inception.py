"""The FID Inception v3 network (TF "2015-12-05" graph) in Flax NNX, NHWC.

This is the network of Heusel et al. (2017)'s FID and of Salimans et al. (2016)'s Inception
Score, in the form of pytorch-fid's port (``fid_inception_v3``): torchvision's Inception v3
layout with 1008 classes, no auxiliary head, and the TF graph's quirks reproduced:

* the 3x3 average pools in the Mixed_5b-5d (A), Mixed_6b-6e (C) and Mixed_7b (E) blocks
  exclude the zero padding from the mean (TF ``avg_pool`` SAME; torch
  ``count_include_pad=False``);
* the pool branch of the last block, Mixed_7c, uses a 3x3 *max* pool instead;
* every convolution is followed by BatchNorm (eps 1e-3, inference mode) and ReLU.

Weights come from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` through
:func:`load_inception_params`, which maps its exact key names onto this module's state
(torch conv ``[out, in, kh, kw]`` -> NHWC kernel ``[kh, kw, in, out]``). Input conventions
are those of :func:`preprocess`: NHWC images, ``uint8`` in [0, 255] or floating in [-1, 1],
bilinearly resized to 299x299 like ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``.

One cohesive thing, hence its length: the network, the mapping of its released weights onto it
and its sharded feature function (`inception_weights` finds the weights file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.runtime import distributed, errors
from diffusion_jax.runtime.torch_pickle import load_torch_state_dict

__all__ = [
    "INCEPTION_SIZE",
    "InceptionV3",
    "load_inception_params",
    "make_feature_fn",
    "params_from_state_dict",
    "preprocess",
    "resize_bilinear",
]

INCEPTION_SIZE = 299
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Preprocessing


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation weights of torch's bilinear resize with align_corners=False.

    Source coordinate ``(dst + 0.5) * in / out - 0.5``, clamped below at 0; the two nearest
    source pixels (the upper one clamped to the last pixel) get linear weights. No
    antialiasing when downsampling, as torch's default.
    """
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights.astype(np.float32)


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize [B, H, W, C] float images to [B, size[0], size[1], C].

    Exactly torch's ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (as
    pytorch-fid resizes), done as two small matrix products in full float32 precision.
    """
    _, h, w, _ = images.shape
    out = images
    if (h, w) == tuple(size):
        return out
    wh = jnp.asarray(_bilinear_matrix(h, size[0]))
    ww = jnp.asarray(_bilinear_matrix(w, size[1]))
    out = jnp.einsum("oh,bhwc->bowc", wh, out, precision=_HIGHEST)
    return jnp.einsum("pw,bowc->bopc", ww, out, precision=_HIGHEST)


def preprocess(images: jax.Array | np.ndarray, size: int = INCEPTION_SIZE) -> jax.Array:
    """Images -> the Inception input: [B, size, size, 3] float32 in [-1, 1] (size 299).

    Args:
      images: [B, H, W, 3] NHWC. Integer dtypes (``uint8``) are read as [0, 255] and mapped
        by ``x / 127.5 - 1``; floating dtypes are taken to be in [-1, 1] already (the
        diffusion model's data range). To score samples as the papers do, quantize them to
        ``uint8`` first.
      size: output side; FID needs the default 299 (smaller, >= 75, only for fast tests).

    Returns:
      The images bilinearly resized to 299x299 (torch ``align_corners=False``; pytorch-fid
      resizes [0, 1] images and then maps to [-1, 1], which is the same affine map).
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected [B, H, W, 3] images, got shape {x.shape}")
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.float32) / 127.5 - 1.0
    else:
        x = x.astype(jnp.float32)
    return resize_bilinear(x, (size, size))


# --------------------------------------------------------------------------------------------
# Network


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _max_pool(x: jax.Array, size: int, stride: int, pad: int = 0) -> jax.Array:
    """Max pool over H, W of [B, H, W, C]; padding (if any) never wins."""
    return jax.lax.reduce_window(
        x,
        jnp.array(-jnp.inf, x.dtype),
        jax.lax.max,
        (1, size, size, 1),
        (1, stride, stride, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool with padding 1 whose mean counts only real pixels.

    TF's SAME average pool; torch ``avg_pool2d(..., count_include_pad=False)``.
    """
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    zero = jnp.array(0, x.dtype)
    sums = jax.lax.reduce_window(x, zero, jax.lax.add, window, strides, padding)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    counts = jax.lax.reduce_window(ones, zero, jax.lax.add, window, strides, padding)
    return sums / counts


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU, NHWC.

    State names mirror torchvision's ``BasicConv2d``: ``conv.kernel`` [kh, kw, in, out] and
    ``bn.{scale, bias, mean, var}`` for torch's ``conv.weight`` and
    ``bn.{weight, bias, running_mean, running_var}``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, int],
        *,
        strides: int = 1,
        padding: int | tuple[int, int] = 0,
        precision: jax.lax.Precision | None = _HIGHEST,
        kernel_init: nnx.Initializer | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            in_features,
            out_features,
            kernel_size=_pair(kernel_size),
            strides=_pair(strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=precision,
            kernel_init=kernel_init or nnx.initializers.lecun_normal(),
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            out_features, epsilon=1e-3, momentum=0.9, use_running_average=True, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """Mixed_5b/5c/5d (pytorch-fid ``FIDInceptionA``): 64 + 64 + 96 + pool_features channels."""

    def __init__(self, in_features: int, pool_features: int, **kw: Any) -> None:
        self.branch1x1 = BasicConv2d(in_features, 64, 1, **kw)
        self.branch5x5_1 = BasicConv2d(in_features, 48, 1, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_features, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(in_features, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction 35 -> 17): 384 + 96 + in_features channels."""

    def __init__(self, in_features: int, **kw: Any) -> None:
        self.branch3x3 = BasicConv2d(in_features, 384, 3, strides=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_features, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, strides=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = _max_pool(x, 3, 2)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-6e (pytorch-fid ``FIDInceptionC``), factorized 7x7: 4 x 192 = 768 channels."""

    def __init__(self, in_features: int, channels_7x7: int, **kw: Any) -> None:
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_features, 192, 1, **kw)
        self.branch7x7_1 = BasicConv2d(in_features, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(in_features, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(in_features, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction 17 -> 8): 320 + 192 + in_features channels."""

    def __init__(self, in_features: int, **kw: Any) -> None:
        self.branch3x3_1 = BasicConv2d(in_features, 192, 1, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, strides=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(in_features, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, strides=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = _max_pool(x, 3, 2)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/7c (pytorch-fid ``FIDInceptionE_1`` / ``_2``): 320 + 768 + 768 + 192 = 2048.

    ``pool="avg"`` (Mixed_7b): padding-excluding 3x3 average pool in the pool branch;
    ``pool="max"`` (Mixed_7c): 3x3 max pool there, the TF graph's quirk.
    """

    def __init__(self, in_features: int, *, pool: str, **kw: Any) -> None:
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_features, 320, 1, **kw)
        self.branch3x3_1 = BasicConv2d(in_features, 384, 1, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_features, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(in_features, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool(x, 3, 1, 1)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nnx.Module):
    """FID Inception v3: [B, H, W, 3] in [-1, 1] -> (pool3 [B, 2048], logits [B, 1008]).

    Attribute names equal pytorch-fid's module names (``Conv2d_1a_3x3``, ``Mixed_5b``, ...,
    ``fc``) so that weight keys map one to one. Spatial sizes for a 299x299 input:
    149 -> 147 -> 147 -> pool 73 -> 73 -> 71 -> pool 35 -> Mixed_5* 35 -> Mixed_6a 17 ->
    Mixed_7a 8 -> global mean. Any input of at least 75x75 runs (pool3 is a global mean).

    Args:
      rngs: initializers for the (random) default weights; load real ones with
        :func:`load_inception_params` and ``nnx.update``.
      precision: matmul/conv precision; HIGHEST by default so GPUs/TPUs do not drop to
        TF32/bf16 passes, which would perturb the features FID is sensitive to.
      kernel_init: conv and fc kernel initializer (default lecun normal). Random init of
        the 24M parameters runs op by op and is slow on CPU; the weight loader builds the
        structure with cheap host zeros instead.
    """

    def __init__(
        self,
        rngs: nnx.Rngs,
        *,
        precision: jax.lax.Precision | None = _HIGHEST,
        kernel_init: nnx.Initializer | None = None,
    ) -> None:
        kw = dict(precision=precision, kernel_init=kernel_init, rngs=rngs)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, strides=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, pool="avg", **kw)
        self.Mixed_7c = InceptionE(2048, pool="max", **kw)
        self.fc = nnx.Linear(
            2048,
            1008,
            precision=precision,
            kernel_init=kernel_init or nnx.initializers.lecun_normal(),
            rngs=rngs,
        )
        self.precision = precision

    def features(self, x: jax.Array) -> jax.Array:
        """Pool3 features [B, 2048] of preprocessed images [B, H, W, 3] in [-1, 1]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool(x, 3, 2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def logits(self, pool3: jax.Array, *, bias: bool = False) -> jax.Array:
        """1008-way logits [B, 1008] from pool3 [B, 2048].

        ``bias=False`` (default) gives ``pool3 @ W`` without the fc bias, as the original
        Inception Score code (Salimans et al., improved-gan) multiplies pool3 by the
        ``softmax/logits/MatMul`` weight only; torch-fidelity's and torchmetrics' IS use the
        same "logits_unbiased". ``bias=True`` gives the full fc layer.
        """
        if bias:
            return self.fc(pool3)
        return jnp.dot(pool3, self.fc.kernel[...], precision=self.precision)

    def __call__(self, x: jax.Array, *, logits_bias: bool = False) -> tuple[jax.Array, jax.Array]:
        """(pool3 [B, 2048], logits [B, 1008]) of preprocessed images [B, H, W, 3]."""
        pool3 = self.features(x)
        return pool3, self.logits(pool3, bias=logits_bias)


# --------------------------------------------------------------------------------------------
# Weights


def _torch_key(path: tuple[Any, ...]) -> tuple[str, tuple[int, ...] | None]:
    """NNX state path -> (pytorch-fid key, axes with ``nnx = np.transpose(torch, axes)``)."""
    *prefix, leaf = (str(p) for p in path)
    parent = prefix[-1] if prefix else ""
    if parent == "conv" and leaf == "kernel":  # [out, in, kh, kw] -> [kh, kw, in, out]
        return ".".join([*prefix, "weight"]), (2, 3, 1, 0)
    if parent == "fc" and leaf == "kernel":  # [out, in] -> [in, out]
        return ".".join([*prefix, "weight"]), (1, 0)
    names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    if parent in ("bn", "fc") and leaf in names:
        return ".".join([*prefix, names[leaf]]), None
    raise KeyError(f"no pytorch-fid key for state path {'.'.join(prefix + [leaf])}")


def _host_zeros(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> np.ndarray:
    del key
    return np.zeros(shape, dtype)


def _skeleton(precision: jax.lax.Precision | None = _HIGHEST) -> InceptionV3:
    """An InceptionV3 with zero kernels, built in about a second (no random init, no tracing).

    ``nnx.eval_shape`` would avoid the allocation but traces ~300 initializers, which takes
    several seconds; host zeros are 95 MB and cheap.
    """
    return InceptionV3(nnx.Rngs(0), precision=precision, kernel_init=_host_zeros)


def params_from_state_dict(state_dict: dict[str, np.ndarray]) -> nnx.State:
    """Map pytorch-fid's ``fid_inception_v3`` state dict onto :class:`InceptionV3`'s state.

    Every NNX variable must be filled and every key consumed (``*.num_batches_tracked``
    buffers are accepted and ignored); otherwise one ``ValueError`` lists all missing keys,
    unexpected keys and shape mismatches with their shapes.

    Returns:
      An ``nnx.State`` (Params and BatchStats, float32) for
      ``nnx.update(InceptionV3(...), state)`` or :func:`make_feature_fn`.
    """
    abstract_state = nnx.state(_skeleton())
    remaining = dict(state_dict)
    missing, mismatched, filled = [], [], []
    for path, variable in nnx.to_flat_state(abstract_state):
        key, axes = _torch_key(path)
        expected = tuple(variable.get_value().shape)
        torch_expected = expected
        if axes is not None:  # the shape the file must have, in torch's layout
            torch_expected = tuple(expected[axes.index(i)] for i in range(len(axes)))
        if key not in remaining:
            missing.append(f"{key} (needs {torch_expected})")
            continue
        array = np.asarray(remaining.pop(key))
        if tuple(array.shape) != torch_expected:
            mismatched.append(f"{key}: file {tuple(array.shape)}, needs {torch_expected}")
            continue
        if axes is not None:
            array = np.transpose(array, axes)
        value = jnp.asarray(array, dtype=variable.get_value().dtype)
        filled.append((path, variable.replace(value=value)))
    unexpected = sorted(k for k in remaining if not k.endswith(".num_batches_tracked"))
    if missing or mismatched or unexpected:
        shapes = {k: tuple(np.asarray(remaining[k]).shape) for k in unexpected}
        raise errors.InputError(
            "Inception weights do not match pytorch-fid's FID Inception v3:\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}\n"
            f"  unexpected keys ({len(unexpected)}): {shapes}"
        )
    return nnx.from_flat_state(filled)


def load_inception_params(path: str | os.PathLike[str]) -> nnx.State:
    """Read pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` into an ``nnx.State``.

    The file is parsed by `runtime.torch_pickle.load_torch_state_dict` (no torch, no pickle
    code run); keys are mapped by :func:`params_from_state_dict`.
    """
    return params_from_state_dict(load_torch_state_dict(path))


# --------------------------------------------------------------------------------------------
# Sharded feature function


def make_forward(
    mesh: Mesh,
    *,
    logits_bias: bool = False,
    precision: jax.lax.Precision | None = _HIGHEST,
    size: int = INCEPTION_SIZE,
) -> Callable[[nnx.State, jax.Array], tuple[jax.Array, jax.Array]]:
    """The jitted `(state, images [B, H, W, 3]) -> (pool3 [B, 2048], logits [B, 1008])` of
    :func:`make_feature_fn`, state replicated and the batch sharded over `mesh`'s "data" axis
    (B divisible by it). `mesh` may hold devices of a TPU topology description, to compile
    ahead of time (`diffusion_jax.tools.aot`)."""
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh needs a 'data' axis, has {mesh.axis_names}")
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
    graphdef = nnx.graphdef(_skeleton(precision))

    def forward(state: nnx.State, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, state)
        return model(preprocess(images, size), logits_bias=logits_bias)

    return jax.jit(
        forward,
        in_shardings=(replicated, batch_sharded),
        out_shardings=(batch_sharded, batch_sharded),
        compiler_options=distributed.compiler_options(mesh),
    )


def abstract_state() -> nnx.State:
    """The network's state as ShapeDtypeStructs (float32), without weights."""
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.state(_skeleton()))


def make_feature_fn(
    params: nnx.State,
    mesh: Mesh | None = None,
    *,
    logits_bias: bool = False,
    precision: jax.lax.Precision | None = _HIGHEST,
    size: int = INCEPTION_SIZE,
) -> Callable[[jax.Array | np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Jitted images -> (pool3 [B, 2048] float32, logits [B, 1008] float32), data-parallel.

    Args:
      params: the network state (from :func:`load_inception_params`, or
        ``nnx.state(InceptionV3(...))``); replicated over the mesh.
      mesh: a mesh with a ``"data"`` axis; the batch is sharded over it (and replicated over
        any other axis). Default: a 1-D ``"data"`` mesh over all devices.
      logits_bias: see :meth:`InceptionV3.logits` (False: the IS reference's logits).
      precision: conv/matmul precision of the network.
      size: the side images are resized to (299 for FID/IS; smaller only for tests).

    Returns:
      ``fn(images) -> (pool3, logits)`` as host ``np.float32`` arrays, for [B, H, W, 3] NHWC
      images as :func:`preprocess` documents (uint8 in [0, 255] or float in [-1, 1]). B need
      not divide the data axis: the batch is zero-padded and the padding dropped. Each new
      (B, H, W, dtype) compiles once, so feed a fixed batch size. ``fn.forward(params,
      images)`` is the underlying jitted function (B divisible by the data axis, outputs left
      sharded on the devices) and ``fn.params`` the replicated parameters.
    """
    if mesh is None:
        mesh = jax.make_mesh(
            (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
        )
    forward = make_forward(mesh, logits_bias=logits_bias, precision=precision, size=size)
    n_data = mesh.shape["data"]
    batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

    def feature_fn(images: jax.Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = images.shape[0]
        padded = -batch % n_data
        if padded:
            pad = [(0, padded)] + [(0, 0)] * (images.ndim - 1)
            images = np.pad(images, pad) if isinstance(images, np.ndarray) else jnp.pad(images, pad)
        pool3, logits = forward(params, jax.device_put(images, batch_sharded))
        return np.asarray(pool3)[:batch], np.asarray(logits)[:batch]

    feature_fn.forward = forward  # the jitted, sharded function itself (B % data == 0)
    feature_fn.params = params
    return feature_fn
