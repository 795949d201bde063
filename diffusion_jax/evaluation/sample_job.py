"""Sampling at scale: resumable sample shards, and `--mode sample`.

`--mode sample` (`sample`) draws `sampling.num_samples` samples of a checkpoint sharded over
all devices into `DIR/samples/<step>/shard_00012.npz` (uint8 'image' [B, H, W, C] NHWC, or
float32 points [B, 2] for the swiss roll, and int32 'label' [B]; shard i holds samples
i*B .. i*B + B - 1 with B = `sampling.batch_size`), each written atomically (temporary name,
then rename) and never rewritten, plus `grid.png`. Shard i is a function of the checkpoint,
the seed, the sampler settings (`settings.json`, checked on resume) and i alone, so a resumed
run equals an uninterrupted one. The evaluation job draws its FID samples the same way into
`DIR/eval/samples/<step>/`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import input_pipeline
from diffusion_jax.runtime import distributed, errors, files, logs, streams, visualize
from diffusion_jax.sampling import generation, registry
from diffusion_jax.training import checkpoint, config_checks
from diffusion_jax.training import state as state_lib


def samples_dir(workdir: str | epath.Path, step: int) -> epath.Path:
    """Where `--mode sample` writes the shards of checkpoint `step`."""
    return epath.Path(workdir) / "samples" / str(step)


def shard_path(directory: epath.Path, index: int) -> epath.Path:
    return directory / f"shard_{index:05d}.npz"


def sample_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Everything a shard's content depends on besides its index and the checkpoint."""
    s = config.sampling
    return {
        **registry.resolved(s, s.respacing, config.diffusion.schedule),
        "nfe": registry.build(config).nfe,
        "guidance_scale": float(s.guidance_scale),
        "clip_denoised": bool(s.clip_denoised),
        "batch_size": int(s.batch_size),
        "seed": int(config.seed),
        "num_classes": int(config.model.num_classes),
    }


def check_sample_settings(directory: epath.Path, settings: dict[str, Any]) -> None:
    """Refuses (ValueError) to add to shards drawn with other settings; records them once."""
    path = directory / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            diffs = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            raise errors.UserError(
                f"{directory} holds samples drawn with other settings (saved, now): {diffs}. "
                "Restore those settings to resume, or delete the folder to start over."
            )
    elif logs.is_chief():
        directory.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, json.dumps(settings, indent=2, sort_keys=True).encode())


def _missing_shards(directory: epath.Path, num_shards: int) -> list[int]:
    """Indices of shards not yet written, as the chief sees them (shared by all hosts)."""
    missing = np.asarray([not shard_path(directory, i).exists() for i in range(num_shards)])
    if jax.process_count() > 1:
        missing = multihost_utils.broadcast_one_to_all(missing)
    return [int(i) for i in np.flatnonzero(missing)]


def to_storage(config: ml_collections.ConfigDict, samples: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] -> uint8 NHWC images on the data's grey levels (`data.levels`), or
    float32 points for the 2-D swiss roll."""
    if input_pipeline.is_image_data(config):
        return input_pipeline.to_data_levels(samples, int(config.data.levels))
    return np.asarray(samples, np.float32)


def write_sample_shards(
    config: ml_collections.ConfigDict,
    draw: Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]],
    params: Any,
    directory: epath.Path,
    num_samples: int,
    *,
    max_new: int = 0,
) -> bool:
    """Makes sure shards 0 .. ceil(num_samples / B) - 1 exist in `directory`, drawing the
    missing ones with `draw` (`generation.make_sampler` of batch B = sampling.batch_size).

    Finished shards are never redrawn or rewritten; shard i uses key fold_in(seed stream, i)
    and labels `default_labels(config, B, offset=i * B)`. `max_new` > 0 stops after that many
    new shards. Returns True when all needed shards exist.
    """
    batch = int(config.sampling.batch_size)
    check_sample_settings(directory, sample_settings(config))
    num_shards = math.ceil(num_samples / batch)
    missing = _missing_shards(directory, num_shards)
    todo = missing[:max_new] if max_new > 0 else missing
    if num_shards - len(missing):
        logs.log(f"  {num_shards - len(missing)}/{num_shards} shards already in {directory}")
    progress = logs.Progress(len(todo) * batch)
    key = streams.key(config.seed, streams.Stream.SAMPLES)
    for n, index in enumerate(todo, 1):
        labels = generation.default_labels(config, batch, offset=index * batch)
        out = draw(params, jax.random.fold_in(key, index), labels)
        images = to_storage(config, multihost_utils.process_allgather(out["sample"], tiled=True))
        if logs.is_chief():
            buffer = io.BytesIO()
            np.savez(buffer, image=images, label=np.asarray(labels, np.int32))
            files.write_atomic(shard_path(directory, index), buffer.getvalue())
        rate, eta = progress.update(n * batch)
        done = num_shards - len(missing) + n
        logs.log(
            f"  shard {index:05d} written: {done}/{num_shards} shards "
            f"({min(done * batch, num_samples)}/{num_samples} samples), {rate:.1f} samples/s, "
            f"ETA {eta}"
        )
    return len(todo) == len(missing)


def iter_samples(directory: epath.Path, num_samples: int) -> Iterator[np.ndarray]:
    """The stored samples of `directory`, shard by shard in index order, the last shard cut
    so that `num_samples` are yielded in all (one shard in memory at a time)."""
    have, index = 0, 0
    while have < num_samples:
        path = shard_path(directory, index)
        if not path.exists():
            raise errors.UserError(f"{path} is missing; run --mode sample or eval to draw it")
        with path.open("rb") as f, np.load(f) as data:
            part = data["image"][: num_samples - have]
        have += len(part)
        index += 1
        yield part


def load_samples(directory: epath.Path, num_samples: int) -> np.ndarray:
    """The first `num_samples` stored samples of `directory`'s shards, in index order."""
    return np.concatenate(list(iter_samples(directory, num_samples)))


def sample(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> epath.Path:
    """`--mode sample`: `sampling.num_samples` samples of checkpoint `sampling.checkpoint_step`
    (-1: the latest) into resumable shards of `DIR/samples/<step>/`, plus `grid.png` once all
    are written; `sampling.max_shards` > 0 stops after that many new shards."""
    config_checks.validate_config(config, "sample")
    workdir = epath.Path(workdir)
    checkpoint.check_workdir_exists(workdir)
    checkpoint.check_compatible(workdir, config)
    steps = checkpoint.checkpoint_steps(workdir)
    wanted = int(config.sampling.checkpoint_step)
    if not steps or (wanted >= 0 and wanted not in steps):
        raise errors.UserError(
            f"no checkpoint {'' if wanted < 0 else wanted} in "
            f"{checkpoint.checkpoints_dir(workdir)} (available: {steps or 'none'})"
        )
    step = steps[-1] if wanted < 0 else wanted
    settings = sample_settings(config)
    check_sample_settings(samples_dir(workdir, step), settings)  # before any slow work
    mesh = distributed.make_mesh()
    graphdef, rest, abstract = state_lib.abstract_train_state(config, mesh)
    if wanted >= 0:  # that one: an unreadable checkpoint is an error (one line)
        params = checkpoint.restore_step(workdir, step, abstract).ema_params
    else:  # the newest readable one; each unreadable newer one is reported in a line
        step, state = checkpoint.restore_newest_step(workdir, abstract, steps)
        params = state.ema_params
        check_sample_settings(samples_dir(workdir, step), settings)
    directory = samples_dir(workdir, step)
    c = config.sampling
    draw = generation.make_sampler(
        config, generation.model_apply(graphdef, rest), mesh, int(c.batch_size), c.respacing
    )
    num = int(c.num_samples)
    logs.log(
        f"Sampling {num} samples from checkpoint {step} ({settings['method']}, "
        f"{settings['nfe']} network evaluations per sample, guidance {c.guidance_scale}) on "
        f"{jax.device_count()} device(s), shards of {c.batch_size} -> {directory}"
    )
    complete = write_sample_shards(config, draw, params, directory, num, max_new=int(c.max_shards))
    if not complete:
        logs.log(
            f"Stopped after {c.max_shards} new shards (sampling.max_shards); rerun to continue."
        )
        return directory
    if logs.is_chief():
        grid = load_samples(directory, min(num, int(c.grid_num)))
        picture = visualize.picture(grid, input_pipeline.reference_points(config))
        visualize.save_png(picture, directory / "grid.png")
        logs.log(f"Done: {num} samples in {directory} (grid: {directory / 'grid.png'})")
    return directory
