"""Checkpoints of the official TensorFlow code -> the U-Net's parameters and model config."""

from __future__ import annotations

import os
from collections.abc import Mapping

import ml_collections
import numpy as np

from diffusion_jax.runtime import errors
from diffusion_jax.tools.convert import mapping

EMA_SUFFIX = "/ExponentialMovingAverage"
OPTIMIZER_SUFFIXES = ("/Adam", "/Adam_1", "/Momentum", "/RMSProp", "/RMSProp_1")


# ---------------------------------------------------------------------------------------
# Official TensorFlow checkpoints.


def _tf_module(mod: list[str]) -> str:
    """Our module path -> the official variable scope (below the `model` scope)."""
    if mod[0] in ("temb_dense0", "temb_dense1"):
        return f"temb/{mod[0][len('temb_') :]}"
    if len(mod) == 1:
        return mod[0]  # conv_in, norm_out, conv_out
    if mod[0] == "mid":
        return mapping.SEP.join(mod)
    path, i, kind, rest = mod[0], mod[1], mod[2], mod[3:]
    if kind == "resample":
        return f"{path}_{i}/{'downsample' if path == 'down' else 'upsample'}/conv"
    j, sub = rest[0], rest[1:]
    return f"{path}_{i}/{'block' if kind == 'blocks' else 'attn'}_{j}/{mapping.SEP.join(sub)}"


def _tf_name(name: str, scope: str) -> str:
    mod, leaf = mapping._split(name)
    is_norm = mod[-1].startswith("norm")
    src_leaf = {"kernel": "W", "scale": "gamma", "bias": "beta" if is_norm else "b"}[leaf]
    return f"{scope}/{_tf_module(mod)}/{src_leaf}"


def select_tf_variables(
    variables: Mapping[str, np.ndarray], *, scope: str = "model", use_ema: bool = True
) -> dict[str, np.ndarray]:
    """Keep the model's variables of a training checkpoint.

    Drops everything outside `scope/` (global_step, beta1_power, ...) and optimizer slots;
    with `use_ema`, each variable is replaced by its `/ExponentialMovingAverage` shadow
    when the checkpoint has one (all of them or none: a partial set raises ValueError).
    """
    prefix = scope + "/"
    model = {
        k: v
        for k, v in variables.items()
        if k.startswith(prefix) and not k.endswith(OPTIMIZER_SUFFIXES)
    }
    ema = {k[: -len(EMA_SUFFIX)]: v for k, v in model.items() if k.endswith(EMA_SUFFIX)}
    raw = {k: v for k, v in model.items() if not k.endswith(EMA_SUFFIX)}
    if not raw and not ema:
        raise errors.InputError(
            f"no variables under scope {scope!r}; found e.g. {sorted(variables)[:5]}"
        )
    if not use_ema or not ema:
        return raw if raw else ema
    if set(ema) != set(raw):
        raise errors.InputError(
            f"partial EMA: variables without a shadow {sorted(set(raw) - set(ema))[:10]}, "
            f"shadows without a variable {sorted(set(ema) - set(raw))[:10]}"
        )
    return ema


def tf_model_config(
    variables: Mapping[str, np.ndarray],
    *,
    scope: str = "model",
    image_size: int | None = None,
    num_groups: int = 32,
) -> ml_collections.ConfigDict:
    """Infer the U-Net config from the official variable names and shapes.

    ch / in channels from `conv_in/W`, levels from `down_{i}`, ch_mult from
    `down_{i}/block_0/conv1/W`, num_res_blocks from `down_0/block_{j}`, attention levels from
    `down_{i}/attn_0`, out channels from `conv_out/W`. The image size is not stored in the
    checkpoint: pass it, or it is inferred assuming attention at resolution 16 (true of all
    the released models: CIFAR-10 32x32, CelebA-HQ/LSUN 256x256). GroupNorm groups are not
    stored either: `num_groups` (official: 32); eps is the official 1e-6.
    """
    s = scope + "/"

    def shape(name: str) -> tuple[int, ...]:
        if s + name not in variables:
            raise errors.InputError(f"checkpoint lacks {s + name}")
        return tuple(np.shape(variables[s + name]))

    kh, kw, cin, ch = shape("conv_in/W")
    levels = sorted(
        {int(k[len(s) + 5 :].split("/")[0]) for k in variables if k.startswith(s + "down_")}
    )
    if levels != list(range(len(levels))) or not levels:
        raise errors.InputError(f"down levels {levels} are not 0..n-1")
    n_blocks = len(
        {k[len(s) :].split("/")[1] for k in variables if k.startswith(s + "down_0/block_")}
    )
    ch_mult = tuple(shape(f"down_{i}/block_0/conv1/W")[3] // ch for i in levels)
    attn_levels = [i for i in levels if any(k.startswith(f"{s}down_{i}/attn_") for k in variables)]
    if image_size is None:
        if not attn_levels:
            raise errors.InputError(
                "cannot infer the image size without attention; pass image_size"
            )
        image_size = 16 * 2 ** attn_levels[0]
    out_ch = shape("conv_out/W")[3]
    with_conv = len(levels) == 1 or any(
        k.startswith(f"{s}down_0/downsample/conv/") for k in variables
    )
    return mapping._imported_config(
        image_size=image_size,
        in_channels=cin,
        out_channels=out_ch,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=n_blocks,
        attn_resolutions=tuple(image_size // 2**i for i in attn_levels),
        resamp_with_conv=with_conv,
        num_groups=num_groups,
    )


def convert_tf_variables(
    variables: Mapping[str, np.ndarray],
    cfg: ml_collections.ConfigDict | None = None,
    *,
    scope: str = "model",
    use_ema: bool = True,
    image_size: int | None = None,
    num_groups: int = 32,
) -> tuple[ml_collections.ConfigDict, mapping.Params]:
    """Official TF variables {name: array} -> (imported config, params).

    `cfg` defaults to `tf_model_config(variables, image_size=..., num_groups=...)`.
    """
    model_vars = select_tf_variables(variables, scope=scope, use_ema=use_ema)
    if cfg is None:
        cfg = tf_model_config(model_vars, scope=scope, image_size=image_size, num_groups=num_groups)
    expected = mapping.expected_param_shapes(cfg)
    flat = mapping._map_params(
        model_vars, expected, lambda n: _tf_name(n, scope), mapping.as_is, mapping.same_layout, "tf"
    )
    return cfg, mapping.unflatten_params(flat)


def read_tf_checkpoint(ckpt_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every variable of a TF checkpoint (a prefix like `model.ckpt-790000`, or a folder)."""
    import tensorflow as tf  # heavy and optional: imported only here

    path = str(ckpt_path)
    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise errors.InputError(f"{path}: no TF checkpoint in this folder")
        path = latest
    reader = tf.train.load_checkpoint(path)
    return {
        name: np.asarray(reader.get_tensor(name)) for name in reader.get_variable_to_shape_map()
    }


def convert_tf(
    ckpt_path: str | os.PathLike[str],
    *,
    scope: str = "model",
    use_ema: bool = True,
    image_size: int | None = None,
    num_groups: int = 32,
) -> tuple[ml_collections.ConfigDict, mapping.Params]:
    """An official DDPM TF checkpoint -> (imported config, params); EMA weights by default."""
    return convert_tf_variables(
        read_tf_checkpoint(ckpt_path),
        scope=scope,
        use_ema=use_ema,
        image_size=image_size,
        num_groups=num_groups,
    )
