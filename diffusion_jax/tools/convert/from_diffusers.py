"""diffusers folders (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256,
ddpm-bedroom-256, ddpm-cat-256) -> the U-Net's parameters and model config."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from diffusion_jax.runtime import errors
from diffusion_jax.tools.convert import mapping

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
    leaf = name.rsplit(mapping.SEP, 1)[-1]
    if leaf == "kernel" and len(shape) == 4:  # conv OIHW -> HWIO
        return arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else None
    if leaf == "kernel" and len(shape) == 2:  # Linear [out, in] (or 1x1 conv) -> [in, out]
        if arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr[:, :, 0, 0]
        return arr.T if arr.ndim == 2 else None
    return arr


def _torch_layout(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    leaf = name.rsplit(mapping.SEP, 1)[-1]
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
    return mapping._imported_config(
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
        from diffusion_jax.runtime.torch_pickle import load_torch_state_dict

        return load_torch_state_dict(binf)
    raise errors.InputError(
        f"{folder}: neither diffusion_pytorch_model.safetensors nor diffusion_pytorch_model.bin"
    )


def convert_diffusers_state(
    state: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict
) -> mapping.Params:
    """A diffusers UNet2DModel state dict -> our nested params for the imported config."""
    expected = mapping.expected_param_shapes(cfg)
    n_levels = len(cfg.model.ch_mult)
    # Weights saved before diffusers' attention refactor use query/key/value/proj_attn.
    legacy = any(k.endswith((".query.weight", ".proj_attn.weight")) for k in state)

    def name_fn(name: str) -> str:
        mod, leaf = mapping._split(name)
        src_leaf = "bias" if leaf == "bias" else "weight"
        return f"{_diffusers_module(mod, n_levels, legacy)}.{src_leaf}"

    flat = mapping._map_params(
        state, expected, name_fn, _torch_transform, _torch_layout, "diffusers"
    )
    return mapping.unflatten_params(flat)


def convert_diffusers(
    folder: str | os.PathLike[str],
) -> tuple[ml_collections.ConfigDict, mapping.Params]:
    """A diffusers DDPM folder (config.json + weights) -> (imported config, params)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = diffusers_model_config(json.load(f))
    state = read_diffusers_weights(folder)
    return cfg, convert_diffusers_state(state, cfg)
