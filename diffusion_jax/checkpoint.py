"""Orbax checkpoints of the training state, and the run's config kept beside them.

Saves are asynchronous; the manager keeps the last `training.keep` checkpoints plus every
`training.keep_every`-th step for evaluation. Orbax finalises a checkpoint by an atomic
rename, so `latest_step()` never returns a half-written one.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from etils import epath

# Config fields that fix the shapes of the saved parameters.
SHAPE_FIELDS = ("data.image_size", "data.channels", "diffusion.model_var_type") + tuple(
    f"model.{k}"
    for k in (
        "name",
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "num_classes",
        "resamp_with_conv",
        "hidden",
        "depth",
    )
)


def manager(
    directory: str | epath.Path,
    keep: int = 3,
    keep_every: int | None = None,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(epath.Path(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = True) -> bool:
    return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Restores `step` into the structure, shapes and shardings of `abstract_state`."""
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    return list(value) if isinstance(value, tuple) else value


def config_path(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / "config.json"


def write_config(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
    path = config_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict | None:
    path = config_path(workdir)
    if not path.exists():
        return None
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_compatible(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run whose saved parameters have another shape than `config`'s."""
    saved = read_config(workdir)
    if saved is None:
        return
    diffs = [
        f"{f}: workdir has {_get(saved, f)!r}, this config has {_get(config, f)!r}"
        for f in SHAPE_FIELDS
        if _get(saved, f) != _get(config, f)
    ]
    if diffs:
        raise ValueError(
            f"{workdir} holds a run with a different model shape, so it cannot be resumed:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --workdir, or set these fields to the workdir's values."
        )
