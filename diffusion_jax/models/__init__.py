"""Denoising networks: the DDPM U-Net for images and a small MLP for 2-D toy data.

`build_model(config, rngs)` picks the network from `config.model.name`; every network is
called as `model(x, t, y=None, *, dropout_key=None)`.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from diffusion_jax.models.mlp import MLPDenoiser
from diffusion_jax.models.unet import UNet

MODEL_NAMES = ("unet", "mlp")
LEARNED_VAR_TYPES = ("learned", "learned_range")

__all__ = ["MODEL_NAMES", "MLPDenoiser", "UNet", "build_model", "model_out_channels", "unet_kwargs"]


def model_out_channels(config: ml_collections.ConfigDict) -> int:
    """Output channels: data.channels, doubled for a learned variance (IDDPM section 3.1)."""
    c = int(config.data.channels)
    var_type = config.diffusion.get("model_var_type") if "diffusion" in config else None
    return 2 * c if var_type in LEARNED_VAR_TYPES else c


def unet_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`UNet` keyword arguments (all but rngs) from a config's data, model and diffusion."""
    m = config.model
    return dict(
        image_size=int(config.data.image_size),
        in_channels=int(config.data.channels),
        out_channels=model_out_channels(config),
        ch=int(m.ch),
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=int(m.num_res_blocks),
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=float(m.dropout),
        resamp_with_conv=bool(m.resamp_with_conv),
        num_groups=int(m.num_groups),
        norm_eps=float(m.get("norm_eps", 1e-6)),
        num_classes=int(m.get("num_classes", 0)),
        dtype=str(m.get("dtype", "float32")),
    )


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """Build the denoiser named by `config.model.name` ("unet" | "mlp").

    Raises ValueError for an unknown name or an inconsistent configuration, before any
    parameter is created.
    """
    name = config.model.name
    m = config.model
    if name == "unet":
        return UNet(**unet_kwargs(config), rngs=rngs)
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
    raise ValueError(
        f"config.model.name={name!r} is not a known model; expected one of {MODEL_NAMES}"
    )
