"""Denoising networks: the DDPM U-Net for images and a small MLP for 2-D toy data.

`build_model(config, rngs)` picks the network from `config.model.name`; every network is
called as `model(x, t, y=None, *, dropout_key=None)`. `unet_config(config)` and
`unet_config_sections(unet)` are the one mapping between an experiment config and the
U-Net's hyper-parameters (`UNetConfig`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from flax import nnx

from diffusion_jax.diffusion.schedules import LEARNED_VARIANCE
from diffusion_jax.models.mlp import MLPDenoiser
from diffusion_jax.models.unet import SHAPE_FIELDS, UNet, UNetConfig
from diffusion_jax.runtime import errors

MODEL_NAMES = ("unet", "mlp")
# UNetConfig fields that live in config.data; out_channels derives from the variance type.
_DATA_FIELDS = {"image_size": "image_size", "in_channels": "channels"}
# config.model fields that fix the MLP's parameter shapes.
_MLP_SHAPE_FIELDS = ("hidden", "depth", "num_classes")

__all__ = [
    "MODEL_NAMES",
    "MLPDenoiser",
    "UNet",
    "UNetConfig",
    "build_model",
    "model_out_channels",
    "shape_signature",
    "unet_config",
    "unet_config_sections",
]


def model_out_channels(config: ml_collections.ConfigDict) -> int:
    """Output channels: data.channels, doubled for a learned variance (IDDPM section 3.1)."""
    c = int(config.data.channels)
    var_type = config.diffusion.get("model_var_type") if "diffusion" in config else None
    return 2 * c if var_type in LEARNED_VARIANCE else c


def unet_config(config: ml_collections.ConfigDict) -> UNetConfig:
    """The validated `UNetConfig` of an experiment config's data, model and diffusion."""
    m = config.model
    model_fields = {
        f.name: m[f.name]
        for f in dataclasses.fields(UNetConfig)
        if f.name not in _DATA_FIELDS and f.name != "out_channels" and f.name in m
    }
    return UNetConfig(
        **{k: config.data[v] for k, v in _DATA_FIELDS.items()},
        out_channels=model_out_channels(config),
        **model_fields,
    )


def unet_config_sections(unet: UNetConfig) -> ml_collections.ConfigDict:
    """The inverse of `unet_config`: {'model', 'data'[, 'diffusion']} sections describing
    `unet` (a learned-range variance when it has twice the input channels)."""
    if unet.out_channels not in (unet.in_channels, 2 * unet.in_channels):
        raise errors.InputError(
            f"output channels {unet.out_channels} must equal the input channels "
            f"{unet.in_channels} (fixed variance) or twice them (learned variance)"
        )
    values = dataclasses.asdict(unet)
    # The compute dtype is the run's choice (config.model.dtype), not a property of weights.
    skip = {*_DATA_FIELDS, "out_channels", "dtype"}
    cfg = ml_collections.ConfigDict()
    cfg.model = {"name": "unet", **{k: v for k, v in values.items() if k not in skip}}
    cfg.data = {v: values[k] for k, v in _DATA_FIELDS.items()}
    if unet.out_channels == 2 * unet.in_channels:
        cfg.diffusion = {"model_var_type": "learned_range"}
    return cfg


def shape_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The hyper-parameters that fix the parameter shapes of `config`'s network, named as
    config fields; two configs whose signatures differ cannot share a checkpoint."""
    name = config.model.get("name", "unet")
    if name == "unet":
        unet = unet_config(config)
        return {"model.name": name, **{f"unet.{k}": getattr(unet, k) for k in SHAPE_FIELDS}}
    return {
        "model.name": name,
        "data.channels": int(config.data.channels),
        "output channels": model_out_channels(config),
        **{f"model.{k}": config.model.get(k) for k in _MLP_SHAPE_FIELDS},
    }


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """Build the denoiser named by `config.model.name` ("unet" | "mlp").

    Raises ValueError for an unknown name or an inconsistent configuration, before any
    parameter is created.
    """
    name = config.model.name
    m = config.model
    if name == "unet":
        return UNet(unet_config(config), rngs=rngs)
    if name == "mlp":
        return MLPDenoiser(
            data_dim=int(config.data.channels),
            out_dim=model_out_channels(config),
            hidden=int(m.hidden),
            depth=int(m.depth),
            num_classes=int(m.num_classes),
            dropout=float(m.dropout),
            dtype=str(m.dtype),
            rngs=rngs,
        )
    raise errors.ConfigError(
        f"config.model.name={name!r} is not a known model; expected one of {MODEL_NAMES}"
    )
