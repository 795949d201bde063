"""Parameter dicts of the U-Net: flat <-> nested, the imported model config, and the strict
mapping of a source's tensors onto the model's parameters (every tensor consumed, every
parameter filled with its shape)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx, traverse_util

from diffusion_jax import models
from diffusion_jax.models.unet import UNet
from diffusion_jax.runtime import errors

SEP = "/"

Params = dict[str, Any]
Flat = dict[str, np.ndarray]

# ---------------------------------------------------------------------------------------
# Flat <-> nested parameter dicts.


def flatten_params(params: Mapping[Any, Any]) -> dict[str, Any]:
    """Nested pure dict -> {"a/0/b": leaf} (leaves kept as they are)."""
    return {SEP.join(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Params:
    """{"a/0/b": array} -> nested pure dict; all-digit path parts become int keys (nnx's
    list indices)."""
    return traverse_util.unflatten_dict(
        {tuple(int(p) if p.isdigit() else p for p in k.split(SEP)): v for k, v in flat.items()}
    )


# ---------------------------------------------------------------------------------------
# Model configs.


def _imported_config(**unet: Any) -> ml_collections.ConfigDict:
    """The model/data[/diffusion] sections of an imported U-Net (dropout 0 unless given)."""
    unet.setdefault("dropout", 0.0)
    return models.unet_config_sections(models.UNetConfig(**unet))


def merge_imported_config(
    config: ml_collections.ConfigDict, imported: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """Return a copy of the experiment `config` with the fields of `imported` written in.

    Raises ValueError when `config` asks for a learned variance but the imported network
    has fixed-variance outputs (the opposite case sets `diffusion.model_var_type`).
    """
    out = ml_collections.ConfigDict(config.to_dict())
    for section in ("model", "data", "diffusion"):
        if section in imported:
            for k, v in imported[section].items():
                out[section][k] = v
    if "diffusion" not in imported and out.diffusion.model_var_type in ("learned", "learned_range"):
        raise errors.InputError(
            f"config.diffusion.model_var_type={out.diffusion.model_var_type!r} needs "
            f"2x{out.data.channels} output channels, but the imported network outputs "
            f"{out.data.channels} (fixed variance)"
        )
    return out


def expected_param_shapes(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape of every U-Net parameter for an imported config (no allocation)."""
    unet = models.unet_config(cfg)
    model = nnx.eval_shape(lambda: UNet(unet, rngs=nnx.Rngs(0)))
    flat = flatten_params(nnx.state(model, nnx.Param).to_pure_dict())
    return {k: tuple(v.shape) for k, v in flat.items()}


# ---------------------------------------------------------------------------------------
# Strict mapping.


def _map_params(
    source: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    name_fn: Callable[[str], str | list[str]],
    transform_fn: Callable[[str, np.ndarray, tuple[int, ...]], np.ndarray | None],
    layout_fn: Callable[[str, tuple[int, ...]], tuple[int, ...]],
    what: str,
) -> Flat:
    """Fill every expected parameter from `source`, consuming every source tensor.

    name_fn: our flat name -> source name (or candidates, the first present one is used).
    transform_fn: (our name, source array, our shape) -> our-layout array, None if the
      source rank cannot be converted.
    layout_fn: (our name, our shape) -> the shape the source should have (for messages).
    """
    out: Flat = {}
    used: set[str] = set()
    missing, mismatched = [], []
    for name, shape in expected.items():
        cands = name_fn(name)
        cands = [cands] if isinstance(cands, str) else cands
        src = next((c for c in cands if c in source), None)
        if src is None:
            missing.append(f"{cands[0]} (for {name}, shape {layout_fn(name, shape)})")
            continue
        used.add(src)
        arr = np.asarray(source[src])
        conv = transform_fn(name, arr, shape)
        if conv is None or tuple(conv.shape) != tuple(shape):
            mismatched.append(
                f"{src}: checkpoint {tuple(arr.shape)} vs model {layout_fn(name, shape)} "
                f"(for {name}, {tuple(shape)} in our layout)"
            )
            continue
        out[name] = np.ascontiguousarray(conv, dtype=np.float32)
    extra = sorted(set(source) - used)
    if missing or extra or mismatched:
        lines = [f"{what}: the checkpoint does not match the model"]
        for title, items in (
            ("missing keys", missing),
            ("extra keys", extra),
            ("mismatched shapes", mismatched),
        ):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {s}" for s in items)
        raise errors.InputError("\n".join(lines))
    return out


def _split(name: str) -> tuple[list[str], str]:
    parts = name.split(SEP)
    return parts[:-1], parts[-1]


def as_is(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The array transform of a source already in our layout (TensorFlow, our own files)."""
    del name, shape
    return arr


def same_layout(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    del name
    return tuple(shape)
