"""Import released DDPM weights (Ho et al. 2020) into the `diffusion_jax` U-Net.

Two sources:

* diffusers folders (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256,
  ddpm-bedroom-256, ddpm-cat-256): `config.json` + `diffusion_pytorch_model.safetensors`
  (read with `safetensors.numpy`) or `diffusion_pytorch_model.bin` (read with the restricted
  unpickler `diffusion_jax.torch_pickle`; no pickle code is executed, torch is not needed).
  Both the current attention names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the legacy ones
  of the original upload (`query`, `key`, `value`, `proj_attn`) are accepted.
* TensorFlow checkpoints of the official code (variables `model/down_0/block_0/conv1/W`,
  `model/temb/dense0/W`, ...; group norms as `gamma`/`beta`), read with
  `tf.train.load_checkpoint`. The EMA weights (`<var>/ExponentialMovingAverage`) are used
  when present and `use_ema` is set, as the paper's samples are drawn from the EMA model;
  optimizer slots (`/Adam`, `/Adam_1`) and variables outside the model scope are ignored.

Layouts: torch convolutions are OIHW -> our HWIO; torch Linear weights are [out, in] ->
our [in, out] (a 1x1 conv shortcut [out, in, 1, 1] is our Dense [in, out]); TensorFlow
kernels are already HWIO / [in, out].

Every conversion is strict: every source tensor must be consumed and every model parameter
filled with the right shape, otherwise a ValueError lists the missing keys, extra keys and
mismatched shapes (name and both shapes).

The imported model config is a ConfigDict with the sections the weights determine:
`model` (name, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
num_groups, norm_eps, num_classes), `data` (image_size, channels) and, only for a model
with a learned variance (twice the input channels out), `diffusion.model_var_type`.
`merge_imported_config(config, imported)` writes them into a full experiment config.

On-disk format of `save_imported(out_dir, ...)` (read by `load_imported`):

* `out_dir/model_config.json`: the imported config as JSON (`ConfigDict.to_dict()`);
* `out_dir/params.safetensors`: float32 parameters in our layout, one tensor per
  parameter, named by its path in `nnx.state(model, nnx.Param).to_pure_dict()` joined with
  "/" (e.g. `down/0/blocks/1/conv1/kernel`), with metadata `format=diffusion_jax.imported`.

`params` everywhere is the nested pure dict of numpy arrays of that state (list indices as
int keys), usable with `load_params_into(model, params)` or `nnx.replace_by_pure_dict`.

Workdir output (`--workdir W --config configs/cifar10.py`, `write_workdir`): `W/config.json`
holds the experiment config merged with the imported model config (`merge_imported_config`),
and `W/checkpoints/0` an orbax checkpoint of a full `state.TrainState` whose `params` and
`ema_params` are the imported weights (optimiser state freshly initialised, step 0), so that
`python -m diffusion_jax.main --config configs/cifar10.py --workdir W --mode eval
--config.eval.once=True` (or `--mode sample`) evaluates the released model as it would a
trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from diffusion_jax import errors, models
from diffusion_jax.models.unet import UNet

SEP = "/"
FORMAT_NAME = "diffusion_jax.imported"
FORMAT_VERSION = "1"
CONFIG_FILE = "model_config.json"
PARAMS_FILE = "params.safetensors"
EMA_SUFFIX = "/ExponentialMovingAverage"
OPTIMIZER_SUFFIXES = ("/Adam", "/Adam_1", "/Momentum", "/RMSProp", "/RMSProp_1")

Params = dict[str, Any]
Flat = dict[str, np.ndarray]

# ---------------------------------------------------------------------------------------
# Flat <-> nested parameter dicts.


def flatten_params(params: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """Nested pure dict -> {"a/0/b": leaf} (leaves kept as they are)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        name = f"{prefix}{SEP}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, name))
        else:
            out[name] = v
    return out


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Params:
    """{"a/0/b": array} -> nested pure dict; all-digit path parts become int keys."""
    out: Params = {}
    for name, v in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in name.split(SEP)]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


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


# ---------------------------------------------------------------------------------------
# diffusers.

_DIFFUSERS_RES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_DIFFUSERS_ATTN = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_DIFFUSERS_ATTN_LEGACY = {"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
_DIFFUSERS_TOP = {
    "temb_dense0": "time_embedding.linear_1",
    "temb_dense1": "time_embedding.linear_2",
    "conv_in": "conv_in",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}
_DIFFUSERS_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}


def _diffusers_module(mod: list[str], n_levels: int, legacy: bool) -> str:
    """Our module path (list of parts) -> the diffusers UNet2DModel module name."""
    if len(mod) == 1 and mod[0] in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[mod[0]]
    if mod[0] == "mid":
        sub = mod[2:]
        base = f"mid_block.{_DIFFUSERS_MID[mod[1]]}"
        kind = "attns" if mod[1].startswith("attn") else "blocks"
    else:
        path, i = mod[0], int(mod[1])
        idx = i if path == "down" else n_levels - 1 - i
        base = f"{path}_blocks.{idx}"
        kind, sub = mod[2], mod[3:]
        if kind == "resample":  # [resample, conv]
            return f"{base}.{'downsamplers' if path == 'down' else 'upsamplers'}.0.conv"
        base += f".{'resnets' if kind == 'blocks' else 'attentions'}.{sub[0]}"
        sub = sub[1:]
    if kind == "blocks":
        return f"{base}.{_DIFFUSERS_RES[sub[0]]}"
    table = (
        _DIFFUSERS_ATTN_LEGACY if legacy and sub[0] in _DIFFUSERS_ATTN_LEGACY else _DIFFUSERS_ATTN
    )
    return f"{base}.{table[sub[0]]}"


def _torch_transform(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    leaf = name.rsplit(SEP, 1)[-1]
    if leaf == "kernel" and len(shape) == 4:  # conv OIHW -> HWIO
        return arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else None
    if leaf == "kernel" and len(shape) == 2:  # Linear [out, in] (or 1x1 conv) -> [in, out]
        if arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr[:, :, 0, 0]
        return arr.T if arr.ndim == 2 else None
    return arr


def _torch_layout(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    leaf = name.rsplit(SEP, 1)[-1]
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


_DIFFUSERS_DEFAULTS = {
    # UNet2DModel defaults, used when config.json omits a field.
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "dropout": 0.0,
}
# Fields whose value must be the DDPM one for the architectures to coincide.
_DIFFUSERS_REQUIRED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "freq_shift": (1,),
    "flip_sin_to_cos": (False,),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "downsample_padding": (0,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "attn_norm_num_groups": (None,),
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}


def diffusers_model_config(cfg_json: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A diffusers UNet2DModel config.json (dict) -> our imported model config.

    block_out_channels -> ch = block_out_channels[0], ch_mult = block_out_channels / ch;
    layers_per_block -> num_res_blocks; sample_size -> image_size; "Attn*" block types ->
    attn_resolutions (level i has resolution sample_size / 2**i); norm_num_groups/norm_eps.
    Raises ValueError for any setting the DDPM U-Net does not have.
    """
    c = {**_DIFFUSERS_DEFAULTS, **dict(cfg_json)}
    name = c.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise errors.InputError(f"config.json: _class_name={name!r}, expected 'UNet2DModel'")
    bad = {k: c[k] for k, ok in _DIFFUSERS_REQUIRED.items() if c[k] not in ok}
    if bad:
        want = {k: _DIFFUSERS_REQUIRED[k] for k in bad}
        raise errors.InputError(
            f"config.json: unsupported settings {bad}; the DDPM U-Net needs {want}"
        )
    boc = [int(b) for b in c["block_out_channels"]]
    ch = boc[0]
    if any(b % ch for b in boc):
        raise errors.InputError(f"config.json: block_out_channels={boc} are not multiples of {ch}")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise errors.InputError(
            f"config.json: time_embedding_dim={c['time_embedding_dim']}, need {4 * ch}"
        )
    size = c.get("sample_size")
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise errors.InputError(f"config.json: sample_size={size} is not square")
        size = size[0]
    if size is None:
        raise errors.InputError("config.json: sample_size is required")
    size = int(size)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    n = len(boc)
    if len(down) != n or len(up) != n:
        raise errors.InputError(
            f"config.json: {len(down)} down_block_types / {len(up)} up_block_types for {n} "
            f"block_out_channels"
        )
    allowed_down = ("DownBlock2D", "AttnDownBlock2D")
    if any(d not in allowed_down for d in down):
        raise errors.InputError(f"config.json: down_block_types={down}; allowed {allowed_down}")
    attn_levels = [i for i, d in enumerate(down) if d == "AttnDownBlock2D"]
    want_up = ["AttnUpBlock2D" if (n - 1 - k) in attn_levels else "UpBlock2D" for k in range(n)]
    if up != want_up:
        raise errors.InputError(
            f"config.json: up_block_types={up} do not mirror down_block_types={down}; "
            f"expected {want_up}"
        )
    head_dim = c["attention_head_dim"]
    widths = [boc[i] for i in attn_levels] + [boc[-1]]
    if head_dim is not None and any(int(head_dim) != w for w in widths):
        raise errors.InputError(
            f"config.json: attention_head_dim={head_dim} means multi-head attention; the DDPM "
            f"U-Net is single-head (attention_head_dim null or equal to the widths {widths})"
        )
    return _imported_config(
        image_size=size,
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        ch=ch,
        ch_mult=tuple(b // ch for b in boc),
        num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=tuple(size // 2**i for i in attn_levels),
        num_groups=int(c["norm_num_groups"]),
        norm_eps=float(c["norm_eps"]),
        dropout=float(c["dropout"]),
    )


def read_diffusers_weights(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read `diffusion_pytorch_model.safetensors` (preferred) or `.bin` without running code."""
    st = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    binf = os.path.join(folder, "diffusion_pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.numpy import load_file

        return dict(load_file(st))
    if os.path.exists(binf):
        from diffusion_jax.torch_pickle import load_torch_state_dict

        return load_torch_state_dict(binf)
    raise errors.InputError(
        f"{folder}: neither diffusion_pytorch_model.safetensors nor diffusion_pytorch_model.bin"
    )


def convert_diffusers_state(
    state: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict
) -> Params:
    """A diffusers UNet2DModel state dict -> our nested params for the imported config."""
    expected = expected_param_shapes(cfg)
    n_levels = len(cfg.model.ch_mult)
    # Weights saved before diffusers' attention refactor use query/key/value/proj_attn.
    legacy = any(k.endswith((".query.weight", ".proj_attn.weight")) for k in state)

    def name_fn(name: str) -> str:
        mod, leaf = _split(name)
        src_leaf = "bias" if leaf == "bias" else "weight"
        return f"{_diffusers_module(mod, n_levels, legacy)}.{src_leaf}"

    flat = _map_params(state, expected, name_fn, _torch_transform, _torch_layout, "diffusers")
    return unflatten_params(flat)


def convert_diffusers(folder: str | os.PathLike[str]) -> tuple[ml_collections.ConfigDict, Params]:
    """A diffusers DDPM folder (config.json + weights) -> (imported config, params)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = diffusers_model_config(json.load(f))
    state = read_diffusers_weights(folder)
    return cfg, convert_diffusers_state(state, cfg)


# ---------------------------------------------------------------------------------------
# Official TensorFlow checkpoints.


def _tf_module(mod: list[str]) -> str:
    """Our module path -> the official variable scope (below the `model` scope)."""
    if mod[0] in ("temb_dense0", "temb_dense1"):
        return f"temb/{mod[0][len('temb_') :]}"
    if len(mod) == 1:
        return mod[0]  # conv_in, norm_out, conv_out
    if mod[0] == "mid":
        return SEP.join(mod)
    path, i, kind, rest = mod[0], mod[1], mod[2], mod[3:]
    if kind == "resample":
        return f"{path}_{i}/{'downsample' if path == 'down' else 'upsample'}/conv"
    j, sub = rest[0], rest[1:]
    return f"{path}_{i}/{'block' if kind == 'blocks' else 'attn'}_{j}/{SEP.join(sub)}"


def _tf_name(name: str, scope: str) -> str:
    mod, leaf = _split(name)
    is_norm = mod[-1].startswith("norm")
    src_leaf = {"kernel": "W", "scale": "gamma", "bias": "beta" if is_norm else "b"}[leaf]
    return f"{scope}/{_tf_module(mod)}/{src_leaf}"


def _tf_transform(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    del name, shape
    return arr


def _tf_layout(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    del name
    return tuple(shape)


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
    return _imported_config(
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
) -> tuple[ml_collections.ConfigDict, Params]:
    """Official TF variables {name: array} -> (imported config, params).

    `cfg` defaults to `tf_model_config(variables, image_size=..., num_groups=...)`.
    """
    model_vars = select_tf_variables(variables, scope=scope, use_ema=use_ema)
    if cfg is None:
        cfg = tf_model_config(model_vars, scope=scope, image_size=image_size, num_groups=num_groups)
    expected = expected_param_shapes(cfg)
    flat = _map_params(
        model_vars, expected, lambda n: _tf_name(n, scope), _tf_transform, _tf_layout, "tf"
    )
    return cfg, unflatten_params(flat)


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
) -> tuple[ml_collections.ConfigDict, Params]:
    """An official DDPM TF checkpoint -> (imported config, params); EMA weights by default."""
    return convert_tf_variables(
        read_tf_checkpoint(ckpt_path),
        scope=scope,
        use_ema=use_ema,
        image_size=image_size,
        num_groups=num_groups,
    )


# ---------------------------------------------------------------------------------------
# Our on-disk format and loading into a model.


def _config_from_json(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
    d = json.loads(json.dumps(d))
    for k in ("ch_mult", "attn_resolutions"):
        if k in d.get("model", {}):
            d["model"][k] = tuple(d["model"][k])
    return ml_collections.ConfigDict(d)


def check_params(params: Params, cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError unless `params` has exactly the parameters of `cfg`'s model."""
    flat = flatten_params(params)
    expected = expected_param_shapes(cfg)
    _map_params(flat, expected, lambda n: n, _tf_transform, _tf_layout, "params")


def save_imported(
    out_dir: str | os.PathLike[str], model_config: ml_collections.ConfigDict, params: Params
) -> None:
    """Write `model_config.json` and `params.safetensors` (see the module docstring)."""
    from safetensors.numpy import save_file

    check_params(params, model_config)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(model_config.to_dict(), f, indent=2, sort_keys=True)
    flat = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flatten_params(params).items()}
    save_file(
        flat,
        os.path.join(out_dir, PARAMS_FILE),
        metadata={"format": FORMAT_NAME, "version": FORMAT_VERSION},
    )


def load_imported(out_dir: str | os.PathLike[str]) -> tuple[ml_collections.ConfigDict, Params]:
    """Read what `save_imported` wrote: (imported config, params)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = os.path.join(out_dir, PARAMS_FILE)
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT_NAME:
        raise errors.InputError(f"{path}: not a {FORMAT_NAME} file (metadata {meta})")
    with open(os.path.join(out_dir, CONFIG_FILE)) as f:
        cfg = _config_from_json(json.load(f))
    params = unflatten_params(load_file(path))
    check_params(params, cfg)
    return cfg, params


def load_params_into(model: nnx.Module, params: Params) -> None:
    """Overwrite the nnx.Param variables of `model` with `params` (strict on names/shapes)."""
    state = nnx.state(model, nnx.Param)
    expected = {k: tuple(v.shape) for k, v in flatten_params(state.to_pure_dict()).items()}
    flat = _map_params(
        flatten_params(params), expected, lambda n: n, _tf_transform, _tf_layout, "params"
    )
    nnx.replace_by_pure_dict(state, unflatten_params(flat))
    nnx.update(model, state)


def build_imported_model(model_config: ml_collections.ConfigDict, params: Params) -> UNet:
    """A U-Net for an imported config with `params` loaded (dropout and the compute dtype,
    `model.dtype`, as in the config).

    The module is created abstractly (no random initialisation) and then filled.
    """
    unet = models.unet_config(model_config)
    model = nnx.eval_shape(lambda: UNet(unet, rngs=nnx.Rngs(0)))
    load_params_into(model, params)
    return model


# ---------------------------------------------------------------------------------------
# A workdir holding the imported model as a training checkpoint.


def load_config_file(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """`get_config()` of an experiment config file such as `configs/cifar10.py` (the
    repository root is made importable, since config files import `configs.base`)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    return runpy.run_path(os.fspath(path))["get_config"]()


def train_state_from_params(config: ml_collections.ConfigDict, params: Params) -> Any:
    """A `state.TrainState` for `config` whose `params` and `ema_params` are `params`, with
    the optimiser state initialised for them and step, loss history etc. as
    `state.init_train_state` makes them.

    `init_train_state` runs under `jax.jit` with its random weights replaced, so the random
    initialisation is dead code that XLA removes (no slow eager init of a large model).
    `params` must match `config`'s model exactly (ValueError otherwise).
    """
    import jax
    import jax.numpy as jnp

    from diffusion_jax import state as state_lib

    model = state_lib.abstract_model(config)
    load_params_into(model, params)
    imported = jax.tree.map(jnp.asarray, nnx.state(model, nnx.Param))

    def build(p):
        _, _, state, tx = state_lib.init_train_state(config)
        return state.replace(params=p, ema_params=jax.tree.map(jnp.copy, p), opt_state=tx.init(p))

    return jax.jit(build)(imported)


def write_workdir(
    workdir: str | os.PathLike[str],
    config: ml_collections.ConfigDict,
    model_config: ml_collections.ConfigDict,
    params: Params,
) -> ml_collections.ConfigDict:
    """Write `workdir/config.json` (config merged with the imported `model_config`) and the
    checkpoint `workdir/checkpoints/0` (see the module docstring); returns the merged config.

    Refuses (ValueError) a workdir that already holds checkpoints.
    """
    from diffusion_jax import checkpoint

    merged = merge_imported_config(config, model_config)
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    try:
        if mngr.latest_step() is not None:
            raise errors.InputError(
                f"{workdir} already holds checkpoints {list(mngr.all_steps())}; use a new --workdir"
            )
        checkpoint.save(mngr, 0, train_state_from_params(merged, params))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    checkpoint.write_config(workdir, merged)
    return merged


# ---------------------------------------------------------------------------------------
# Command line.


def detect_format(source: str | os.PathLike[str]) -> str:
    """Source format: `diffusers` for a folder holding config.json, `tf` for a TensorFlow
    checkpoint (a folder with a `checkpoint` file or `*.index`, or a `PREFIX.index` prefix).

    Raises FileNotFoundError naming the formats looked for when there is neither."""
    source = os.fspath(source)
    if os.path.isfile(os.path.join(source, "config.json")):
        return "diffusers"
    tf_dir = os.path.isdir(source) and any(
        f == "checkpoint" or f.endswith(".index") for f in os.listdir(source)
    )
    if tf_dir or os.path.isfile(source + ".index"):
        return "tf"
    what = "does not exist" if not os.path.exists(source) else "holds neither format"
    raise errors.InputError(
        f"--source {source} {what}; looked for a diffusers folder (config.json with "
        "diffusion_pytorch_model.safetensors or .bin) and a TensorFlow checkpoint (a folder "
        "with a 'checkpoint' file, or a PREFIX with PREFIX.index)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="diffusers folder or TF checkpoint prefix/dir")
    p.add_argument("--out", default="", help="output folder (model_config.json + params)")
    p.add_argument("--workdir", default="", help="output workdir (config.json + checkpoints/0)")
    p.add_argument("--config", default="", help="with --workdir: experiment config file")
    p.add_argument("--format", default="auto", choices=("auto", "diffusers", "tf"))
    p.add_argument("--image_size", type=int, default=None, help="TF only: image size")
    p.add_argument("--num_groups", type=int, default=32, help="TF only: GroupNorm groups")
    p.add_argument("--scope", default="model", help="TF only: model variable scope")
    p.add_argument("--no_ema", action="store_true", help="TF only: raw instead of EMA weights")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    args = p.parse_args(argv)
    if not (args.out or args.workdir):
        p.error("give --out DIR (imported weights) and/or --workdir DIR --config FILE")
    if args.workdir and not args.config:
        p.error("--workdir needs --config (e.g. configs/cifar10.py)")
    with errors.reported(args.debug):
        _convert(args)


def _convert(args: argparse.Namespace) -> None:
    fmt = detect_format(args.source) if args.format == "auto" else args.format
    if fmt == "diffusers":
        cfg, params = convert_diffusers(args.source)
    else:
        cfg, params = convert_tf(
            args.source,
            scope=args.scope,
            use_ema=not args.no_ema,
            image_size=args.image_size,
            num_groups=args.num_groups,
        )
    n = sum(int(v.size) for v in flatten_params(params).values())
    if args.out:
        save_imported(args.out, cfg, params)
        print(f"converted {fmt} {args.source} -> {args.out}: {n:,} parameters")
    if args.workdir:
        write_workdir(args.workdir, load_config_file(args.config), cfg, params)
        print(
            f"converted {fmt} {args.source} -> workdir {args.workdir} (config.json, "
            f"checkpoints/0): {n:,} parameters; evaluate with\n  python -m diffusion_jax.main "
            f"--config {args.config} --workdir {args.workdir} --mode eval --config.eval.once=True"
        )
    print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
