"""The imported-weights folder (`model_config.json` + `params.safetensors`), loading it into
a model, and a workdir holding it as a training checkpoint."""

from __future__ import annotations

import json
import os
import runpy
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from diffusion_jax import models
from diffusion_jax.models.unet import UNet
from diffusion_jax.runtime import errors, paths
from diffusion_jax.tools.convert import mapping

FORMAT_NAME = "diffusion_jax.imported"
FORMAT_VERSION = "1"
CONFIG_FILE = "model_config.json"
PARAMS_FILE = "params.safetensors"


# ---------------------------------------------------------------------------------------
# Our on-disk format and loading into a model.


def _config_from_json(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
    d = json.loads(json.dumps(d))
    for k in ("ch_mult", "attn_resolutions"):
        if k in d.get("model", {}):
            d["model"][k] = tuple(d["model"][k])
    return ml_collections.ConfigDict(d)


def check_params(params: mapping.Params, cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError unless `params` has exactly the parameters of `cfg`'s model."""
    flat = mapping.flatten_params(params)
    expected = mapping.expected_param_shapes(cfg)
    mapping._map_params(flat, expected, lambda n: n, mapping.as_is, mapping.same_layout, "params")


def save_imported(
    out_dir: str | os.PathLike[str], model_config: ml_collections.ConfigDict, params: mapping.Params
) -> None:
    """Write `model_config.json` and `params.safetensors` (see the module docstring)."""
    from safetensors.numpy import save_file

    check_params(params, model_config)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(model_config.to_dict(), f, indent=2, sort_keys=True)
    flat = {
        k: np.ascontiguousarray(v, dtype=np.float32)
        for k, v in mapping.flatten_params(params).items()
    }
    save_file(
        flat,
        os.path.join(out_dir, PARAMS_FILE),
        metadata={"format": FORMAT_NAME, "version": FORMAT_VERSION},
    )


def load_imported(
    out_dir: str | os.PathLike[str],
) -> tuple[ml_collections.ConfigDict, mapping.Params]:
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
    params = mapping.unflatten_params(load_file(path))
    check_params(params, cfg)
    return cfg, params


def load_params_into(model: nnx.Module, params: mapping.Params) -> None:
    """Overwrite the nnx.Param variables of `model` with `params` (strict on names/shapes)."""
    state = nnx.state(model, nnx.Param)
    expected = {k: tuple(v.shape) for k, v in mapping.flatten_params(state.to_pure_dict()).items()}
    flat = mapping._map_params(
        mapping.flatten_params(params),
        expected,
        lambda n: n,
        mapping.as_is,
        mapping.same_layout,
        "params",
    )
    nnx.replace_by_pure_dict(state, mapping.unflatten_params(flat))
    nnx.update(model, state)


def build_imported_model(model_config: ml_collections.ConfigDict, params: mapping.Params) -> UNet:
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
    paths.make_configs_importable()
    return runpy.run_path(os.fspath(path))["get_config"]()


def train_state_from_params(config: ml_collections.ConfigDict, params: mapping.Params) -> Any:
    """A `state.TrainState` for `config` whose `params` and `ema_params` are `params`, with
    the optimiser state initialised for them and step, loss history etc. as
    `state.init_train_state` makes them.

    `init_train_state` runs under `jax.jit` with its random weights replaced, so the random
    initialisation is dead code that XLA removes (no slow eager init of a large model).
    `params` must match `config`'s model exactly (ValueError otherwise).
    """
    import jax
    import jax.numpy as jnp

    from diffusion_jax.training import state as state_lib

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
    params: mapping.Params,
) -> ml_collections.ConfigDict:
    """Write `workdir/config.json` (config merged with the imported `model_config`) and the
    checkpoint `workdir/checkpoints/0` (see the module docstring); returns the merged config.

    Refuses (ValueError) a workdir that already holds checkpoints.
    """
    from diffusion_jax.training import checkpoint

    merged = mapping.merge_imported_config(config, model_config)
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
