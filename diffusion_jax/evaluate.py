"""Evaluation job and sampling at scale (DDPM §4-5): bits/dim, FID, Inception Score, pictures.

`--mode eval` (`evaluate_checkpoints`) watches `DIR/checkpoints` and evaluates every
checkpoint exactly once, with the EMA parameters:

* bits/dim on the first `eval.bpd_num_examples` images of `data.eval_split` under the
  full-chain variational bound (DDPM eq. 5, `likelihood.calc_bpd_loop`), split into rate
  and distortion (DDPM §4.3, `likelihood.rate_distortion`);
* FID (Heusel et al. 2017) of `eval.num_samples` samples against the Inception statistics of
  `eval.fid_split` (the training set, DDPM §5), computed once and cached as a pytorch-fid /
  TTUR `.npz` (or read from `eval.fid_stats`), and the Inception Score (Salimans et al.
  2016) over `eval.is_splits` splits. The IS logits are pool3 @ W without the fc bias
  (`eval.is_logits_bias = False`): the original improved-gan code multiplies pool3 by the
  `softmax/logits/MatMul` weight alone, and torch-fidelity / torchmetrics follow it. Without
  the Inception weights FID and IS are skipped with a one-line notice;
* pictures in `DIR/eval/`: the sample grid, the progressive generation strip (x0_hat along
  the chain, DDPM Fig. 6), the rate/distortion plot (Fig. 5) and the interpolation grid
  (§4.4, Fig. 8).

Each result is one JSON line of `DIR/eval/metrics.jsonl` (the record of what is done, so a
restarted job redoes nothing) and TensorBoard scalars in `DIR/eval`. `eval.once` evaluates the
latest checkpoint and exits; otherwise the job polls every `eval.poll_seconds` and stops once
the checkpoint at `training.num_train_steps` is evaluated.

`--mode sample` (`sample`) draws `sampling.num_samples` samples sharded over all devices into
resumable shards `DIR/samples/<step>/shard_00012.npz` (uint8 'image' [B, H, W, C] NHWC, or
float32 points [B, 2] for the swiss roll, and int32 'label' [B]; shard i holds samples
i*B .. i*B + B - 1 with B = `sampling.batch_size`), each written atomically (temporary name,
then rename) and never rewritten, plus `grid.png`. Shard i is a function of the checkpoint,
the seed, the sampler settings (`settings.json`, checked on resume) and i alone, so a resumed
run equals an uninterrupted one. The eval job draws its FID samples the same way into
`DIR/eval/samples/<step>/` (resumable too, and apart from `--mode sample`'s, so the two
modes may use different sampler settings). Samples use `sampling.method` (ancestral | ddim,
`eta`), `sampling.respacing` ("" = the full chain) and `sampling.guidance_scale`
(classifier-free guidance).

Multi-host: every process takes part in sampling and bits/dim; Inception features, files
and logs are the chief's (process 0) work.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import (
    checkpoint,
    distributed,
    generation,
    input_pipeline,
    likelihood,
    sampling,
    schedules,
    train,
    visualize,
)
from diffusion_jax.metrics import fid, inception

# [B, H, W, 3] uint8 NHWC -> (pool3 [B, D], logits [B, K]), host numpy in and out.
FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# Independent random streams below the seed (fold_in), the same for every checkpoint.
_SAMPLES_STREAM, _GRID_STREAM, _BPD_STREAM, _INTERP_STREAM = 1, 2, 3, 4
# Fields of config.model that fix the network's function (dropout is off at evaluation).
_MODEL_FIELDS = ("num_groups", "norm_eps", "dtype")


def _key(config: ml_collections.ConfigDict, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), stream)


def _is_chief() -> bool:
    return jax.process_index() == 0


def _log(message: str) -> None:
    if _is_chief():
        print(message, flush=True)


def _is_image_data(config: ml_collections.ConfigDict) -> bool:
    return config.data.name != "swissroll"


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoints_dir(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / "checkpoints"


def _reader(workdir: str | epath.Path) -> ocp.CheckpointManager:
    """A manager that neither creates, deletes nor saves anything."""
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoints_dir(workdir), options=options)


def checkpoint_steps(workdir: str | epath.Path) -> list[int]:
    """Steps of the finished checkpoints in `workdir/checkpoints`, ascending."""
    if not checkpoints_dir(workdir).exists():
        return []
    mngr = _reader(workdir)
    try:
        return sorted(int(s) for s in mngr.all_steps())
    finally:
        mngr.close()


def abstract_train_state(
    config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[nnx.GraphDef, nnx.State, train.TrainState]:
    """(graphdef, non-parameter state, TrainState of ShapeDtypeStructs replicated over
    `mesh`) without initialising any parameter (shapes only)."""
    graphdef, _, rest = nnx.split(train.abstract_model(config), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model {config.model.name!r} has non-parameter state; not supported")
    shapes = jax.eval_shape(lambda: train.init_train_state(config)[2])
    repl = distributed.replicated(mesh)
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)
    return graphdef, rest, state


def restore_state(
    workdir: str | epath.Path, step: int, abstract_state: train.TrainState
) -> train.TrainState:
    """The TrainState of checkpoint `step`, placed as `abstract_state`'s shardings say."""
    mngr = _reader(workdir)
    try:
        return checkpoint.restore(mngr, step, abstract_state)
    finally:
        mngr.close()


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> None:
    """Refuses a config whose parameter shapes differ from the workdir's (ValueError) and warns
    about other differing network fields (e.g. model.num_groups of an imported model)."""
    checkpoint.check_compatible(workdir, config)
    saved = checkpoint.read_config(workdir)
    if saved is None:
        return
    for name in _MODEL_FIELDS:
        mine, theirs = config.model.get(name), saved.get("model", {}).get(name)
        if theirs is not None and mine != theirs:
            _log(f"warning: config.model.{name}={mine!r} but {workdir} was written with {theirs!r}")


# ---------------------------------------------------------------------------------------------
# Batches: padded to a fixed shape, all hosts in lockstep


def local_batch_size(global_batch: int) -> int:
    """This host's share of a global batch, rounded up to a multiple of its devices."""
    per_host = -(-global_batch // jax.process_count())
    local = jax.local_device_count()
    return -(-per_host // local) * local


def round_up_to_devices(n: int) -> int:
    return -(-n // jax.device_count()) * jax.device_count()


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def padded_batches(
    batches: Iterable[dict[str, np.ndarray]], size: int, image_shape: tuple[int, ...]
) -> Iterator[dict[str, np.ndarray]]:
    """Batches {'image' uint8 [b, H, W, C], 'label' [b]} zero-padded to `size` rows with
    'mask' [size] (1 = real example); on several hosts, they continue until all hosts are done
    (an exhausted host contributes all-padding batches)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not _any_process(batch is not None):
            return
        n = 0 if batch is None else len(batch["label"])
        if n > size:
            raise ValueError(f"batch of {n} exceeds the padded size {size}")
        out = {
            "image": np.zeros((size, *image_shape), np.uint8),
            "label": np.zeros((size,), np.int32),
            "mask": np.zeros((size,), np.float32),
        }
        if n:
            out["image"][:n] = batch["image"]
            out["label"][:n] = batch["label"]
            out["mask"][:n] = 1.0
        yield out


# ---------------------------------------------------------------------------------------------
# Bits/dim (DDPM eq. 5) and rate/distortion (§4.3)


def make_bpd_fn(
    config: ml_collections.ConfigDict, apply: Callable[..., jax.Array], mesh: Mesh
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted `(params, image uint8 [B, H, W, C], label [B], mask [B], key) -> sums`.

    The sums over the unmasked examples (replicated): 'count', 'total_bpd', 'prior_bpd',
    'vb' [T] and 'x0_mse' [T] of `likelihood.calc_bpd_loop` on the full chain. Conditional
    models are evaluated with the true labels and without guidance.
    """
    diffusion = schedules.diffusion_from_config(config.diffusion)
    conditional = bool(config.model.num_classes)

    def run(params, image, label, mask, key):
        x_start = image.astype(jnp.float32) / 127.5 - 1.0
        y = label if conditional else None
        out = likelihood.calc_bpd_loop(
            diffusion,
            lambda x_t, t: apply(params, x_t, t, y),
            x_start,
            key,
            clip_denoised=config.sampling.clip_denoised,
        )
        # Elementwise products, not `mask @ x`: TPU/GPU matmuls may run float32 in bf16/TF32.
        sums = {
            k: jnp.sum(mask.reshape((-1,) + (1,) * (out[k].ndim - 1)) * out[k], axis=0)
            for k in ("total_bpd", "prior_bpd", "vb", "x0_mse")
        }
        return {"count": jnp.sum(mask), **sums}

    sharded, repl = distributed.batch_sharded(mesh), distributed.replicated(mesh)
    return jax.jit(
        run,
        in_shardings=(repl, sharded, sharded, sharded, repl),
        out_shardings=repl,
        compiler_options=distributed.compiler_options(mesh),
    )


def summarize_bpd(sums: dict[str, np.ndarray]) -> dict[str, Any]:
    """Means of the sums of `make_bpd_fn`: 'bpd' (total bound), 'bpd_prior' (L_T),
    'bpd_rate' (L_1 + ... + L_T), 'bpd_distortion' (L_0, the decoder) in bits/dim, 'rmse'
    (distortion of x0_hat(x_1) on the 0-255 scale), 'count', and the curves 'rate' [T],
    'distortion' [T], 'vb' [T] indexed by timestep (see `likelihood.rate_distortion`)."""
    count = float(sums["count"])
    if count <= 0:
        raise ValueError("bits/dim: no evaluation examples")
    mean = {k: np.asarray(v, np.float64) / count for k, v in sums.items() if k != "count"}
    rd = likelihood.rate_distortion(
        {
            "vb": mean["vb"][None],
            "prior_bpd": mean["prior_bpd"][None],
            "x0_mse": mean["x0_mse"][None],
        }
    )
    rate, distortion = np.asarray(rd["rate"], np.float64), np.asarray(rd["distortion"], np.float64)
    return {
        "bpd": float(mean["total_bpd"]),
        "bpd_prior": float(mean["prior_bpd"]),
        "bpd_rate": float(rate[0]),
        "bpd_distortion": float(mean["vb"][0]),
        "rmse": float(distortion[0]),
        "count": int(round(count)),
        "rate": rate,
        "distortion": distortion,
        "vb": mean["vb"],
    }


def compute_bpd(
    bpd_fn: Callable[..., dict[str, jax.Array]],
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    key: jax.Array,
) -> dict[str, Any]:
    """Bits/dim over `batches` (from `padded_batches`: image, label, mask), one fresh
    key per batch (fold_in of `key`); returns `summarize_bpd` of the summed results."""
    total = None
    for i, batch in enumerate(batches):
        g = distributed.global_batch(batch, mesh)
        sums = bpd_fn(params, g["image"], g["label"], g["mask"], jax.random.fold_in(key, i))
        sums = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(sums))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
        _log(
            f"  bits/dim: {int(total['count'])} examples, running mean "
            f"{total['total_bpd'] / max(total['count'], 1):.4f}"
        )
    if total is None:
        raise ValueError("bits/dim: the evaluation split yielded no examples")
    return summarize_bpd(total)


# ---------------------------------------------------------------------------------------------
# Sample shards (resumable)


def samples_dir(workdir: str | epath.Path, step: int) -> epath.Path:
    """Where `--mode sample` writes the shards of checkpoint `step`."""
    return epath.Path(workdir) / "samples" / str(step)


def fid_samples_dir(workdir: str | epath.Path, step: int) -> epath.Path:
    """Where the eval job writes the FID/IS sample shards of checkpoint `step`."""
    return epath.Path(workdir) / "eval" / "samples" / str(step)


def shard_path(directory: epath.Path, index: int) -> epath.Path:
    return directory / f"shard_{index:05d}.npz"


def sample_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Everything a shard's content depends on besides its index and the checkpoint."""
    s = config.sampling
    ddim = s.method == "ddim" or s.respacing.startswith("ddim")  # as generation.make_sampler
    return {
        "method": "ddim" if ddim else s.method,
        "respacing": s.respacing,
        "eta": float(s.eta) if ddim else None,  # ancestral sampling does not use eta
        "guidance_scale": float(s.guidance_scale),
        "clip_denoised": bool(s.clip_denoised),
        "batch_size": int(s.batch_size),
        "seed": int(config.seed),
        "num_classes": int(config.model.num_classes),
    }


def _write_atomic(path: epath.Path, data: bytes) -> None:
    """Writes `data` under a temporary name in the same folder, then renames it into place
    (replacing an older file), so readers never see a partial file."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def _check_sample_settings(directory: epath.Path, settings: dict[str, Any]) -> None:
    path = directory / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            diffs = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            raise ValueError(
                f"{directory} holds samples drawn with other settings (saved, now): {diffs}. "
                "Restore those settings to resume, or delete the folder to start over."
            )
    elif _is_chief():
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(settings, indent=2, sort_keys=True).encode())


def _missing_shards(directory: epath.Path, num_shards: int) -> list[int]:
    """Indices of shards not yet written, as the chief sees them (shared by all hosts)."""
    missing = np.asarray([not shard_path(directory, i).exists() for i in range(num_shards)])
    if jax.process_count() > 1:
        missing = multihost_utils.broadcast_one_to_all(missing)
    return [int(i) for i in np.flatnonzero(missing)]


def _to_storage(config: ml_collections.ConfigDict, samples: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] -> uint8 NHWC images (rounded as saved images are), or float32
    points for the 2-D swiss roll."""
    if _is_image_data(config):
        return visualize.to_uint8(samples)
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
    _check_sample_settings(directory, sample_settings(config))
    num_shards = math.ceil(num_samples / batch)
    missing = _missing_shards(directory, num_shards)
    todo = missing[:max_new] if max_new > 0 else missing
    if num_shards - len(missing):
        _log(f"  {num_shards - len(missing)}/{num_shards} shards already in {directory}")
    start = time.perf_counter()
    for n, index in enumerate(todo, 1):
        labels = generation.default_labels(config, batch, offset=index * batch)
        out = draw(params, jax.random.fold_in(_key(config, _SAMPLES_STREAM), index), labels)
        images = _to_storage(config, multihost_utils.process_allgather(out["sample"], tiled=True))
        if _is_chief():
            buffer = io.BytesIO()
            np.savez(buffer, image=images, label=np.asarray(labels, np.int32))
            _write_atomic(shard_path(directory, index), buffer.getvalue())
        rate = n * batch / max(time.perf_counter() - start, 1e-9)
        left = (len(todo) - n) * batch / rate
        done = num_shards - len(missing) + n
        _log(
            f"  shard {index:05d} written: {done}/{num_shards} shards "
            f"({min(done * batch, num_samples)}/{num_samples} samples), {rate:.1f} samples/s, "
            f"ETA {train._format_eta(left)}"
        )
    return len(todo) == len(missing)


def iter_samples(directory: epath.Path, num_samples: int) -> Iterator[np.ndarray]:
    """The stored samples of `directory`, shard by shard in index order, the last shard cut
    so that `num_samples` are yielded in all (one shard in memory at a time)."""
    have, index = 0, 0
    while have < num_samples:
        path = shard_path(directory, index)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run --mode sample or eval to draw it")
        with path.open("rb") as f, np.load(f) as data:
            part = data["image"][: num_samples - have]
        have += len(part)
        index += 1
        yield part


def load_samples(directory: epath.Path, num_samples: int) -> np.ndarray:
    """The first `num_samples` stored samples of `directory`'s shards, in index order."""
    return np.concatenate(list(iter_samples(directory, num_samples)))


# ---------------------------------------------------------------------------------------------
# FID and Inception Score


def to_rgb(images: np.ndarray) -> np.ndarray:
    """[B, H, W, C] -> [B, H, W, 3]: grey (C = 1) is tiled, as the Inception expects RGB."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def load_feature_fn(config: ml_collections.ConfigDict) -> tuple[FeatureFn | None, str]:
    """The FID Inception on this host's devices, or (None, reason) without the weights
    (`eval.inception_weights`, the cache, or a download unless DIFFUSION_JAX_OFFLINE)."""
    explicit = config.eval.inception_weights
    try:
        path = inception.inception_weights_path(explicit)
    except inception.InceptionWeightsUnavailable as e:
        where = explicit or inception.default_cache_dir() / inception.FID_WEIGHTS_FILENAME
        return None, (
            f"{str(e).splitlines()[0].rstrip('.')}; put {inception.FID_WEIGHTS_FILENAME} at "
            f"{where} or set --config.eval.inception_weights=PATH"
        )
    mesh = distributed.make_mesh(jax.local_devices())
    params = inception.load_inception_params(path)
    return inception.make_feature_fn(params, mesh, logits_bias=bool(config.eval.is_logits_bias)), ""


def extract_features(
    feature_fn: FeatureFn, images: Iterable[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (pool3 [N, D], logits [N, K]) of uint8 NHWC batches (grey tiled to RGB).

    Smaller batches (the last one) are zero-padded to the first batch's size, so the feature
    function sees one shape and compiles once; the padding's features are dropped.
    """
    pools, logits, size = [], [], None
    for batch in images:
        batch = to_rgb(np.asarray(batch))
        n = len(batch)
        size = size or n
        if n < size:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        p, lg = feature_fn(batch)
        pools.append(np.asarray(p)[:n])
        logits.append(np.asarray(lg)[:n])
    if not pools:
        raise ValueError("no images to extract Inception features from")
    return np.concatenate(pools), np.concatenate(logits)


def reference_stats_path(config: ml_collections.ConfigDict) -> epath.Path:
    """`eval.fid_stats` if set, else the cache file
    `$DIFFUSION_JAX_CACHE/fid_stats/fid_stats_<data>_<split>_<size>[_n<N>].npz`."""
    if config.eval.fid_stats:
        return epath.Path(config.eval.fid_stats)
    n = int(config.eval.fid_reference_examples)
    name = f"fid_stats_{config.data.name}_{config.eval.fid_split}_{config.data.image_size}"
    name += f"_n{n}.npz" if n > 0 else ".npz"
    return epath.Path(inception.default_cache_dir()) / "fid_stats" / name


def reference_statistics(
    config: ml_collections.ConfigDict, feature_fn: FeatureFn
) -> tuple[np.ndarray, np.ndarray, epath.Path]:
    """(mu [D], sigma [D, D], path) of the FID reference set: read from `eval.fid_stats` or
    the cache, else computed from the images of `eval.fid_split` and cached (written
    atomically) in the pytorch-fid/TTUR npz format (chief only)."""
    path = reference_stats_path(config)
    if path.exists():
        with path.open("rb") as f:
            mu, sigma = fid.load_statistics(f)
        return mu, sigma, path
    if config.eval.fid_stats:
        raise FileNotFoundError(f"config.eval.fid_stats={config.eval.fid_stats!r}: no such file")
    split = config.eval.fid_split
    _log(f"  computing FID reference statistics of {config.data.name}/{split} -> {path}")
    batches = input_pipeline.create_eval_arrays(
        config, split, config.eval.fid_reference_examples, batch_size=config.eval.batch_size
    )
    pool3, _ = extract_features(feature_fn, (b["image"] for b in batches))
    mu, sigma = fid.compute_statistics(pool3)
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, buffer.getvalue())
    return mu, sigma, path


def fid_and_inception_score(
    config: ml_collections.ConfigDict,
    feature_fn: FeatureFn,
    images: Iterable[np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
) -> dict[str, float]:
    """FID of batches of uint8 NHWC `images` against `reference` (mu, sigma), and their
    Inception Score over `eval.is_splits` splits."""
    pool3, logits = extract_features(feature_fn, images)
    mu, sigma = fid.compute_statistics(pool3)
    is_mean, is_std = fid.inception_score(logits, splits=int(config.eval.is_splits))
    return {
        "fid": fid.frechet_distance(mu, sigma, *reference),
        "is": is_mean,
        "is_std": is_std,
        "fid_num_samples": len(pool3),
    }


# ---------------------------------------------------------------------------------------------
# Pictures


def progressive_strip(snapshots: np.ndarray, rows: int) -> tuple[np.ndarray, int]:
    """Snapshots [S, B, H, W, C] (noisy -> clean) -> (images [rows * S, H, W, C], S): row r
    is example r's x0_hat along the chain (DDPM Fig. 6)."""
    s = snapshots.shape[0]
    strip = np.swapaxes(np.asarray(snapshots)[:, :rows], 0, 1)
    return strip.reshape((-1, *snapshots.shape[2:])), s


def interpolation_grid(
    x_a: np.ndarray, x_b: np.ndarray, decoded: np.ndarray
) -> tuple[np.ndarray, int]:
    """Sources [P, H, W, C] and decoded mixtures [L, P, H, W, C] -> (images, L + 2): row p is
    x_a[p], the mixtures for lambda = 0 .. 1, then x_b[p] (DDPM Fig. 8)."""
    rows = np.concatenate([x_a[None], np.asarray(decoded), x_b[None]], axis=0)
    return np.swapaxes(rows, 0, 1).reshape((-1, *x_a.shape[1:])), rows.shape[0]


def snapshot_every(chain_length: int, num_snapshots: int) -> int:
    """Spacing that puts `num_snapshots` snapshots from about T - 1 down to 0."""
    return max(1, (chain_length - 1) // max(num_snapshots - 1, 1))


def make_interpolation_fn(
    config: ml_collections.ConfigDict, apply: Callable[..., jax.Array]
) -> Callable[..., jax.Array]:
    """Jitted `(params, x_a, x_b [P, H, W, C], labels [P], key) -> [L, P, H, W, C]`: DDPM
    §4.4 on the full chain from timestep `eval.interpolation_t` with L =
    `eval.interpolation_lambdas` evenly spaced lambdas in [0, 1]. It runs where its inputs
    are (one device: the batch is small and need not divide the device count)."""
    diffusion = schedules.diffusion_from_config(config.diffusion)
    t_index = min(int(config.eval.interpolation_t), diffusion.num_timesteps - 1)
    lambdas = np.linspace(0.0, 1.0, int(config.eval.interpolation_lambdas))

    def run(params, x_a, x_b, labels, key):
        tiled = jnp.tile(labels, len(lambdas)) if config.model.num_classes else None
        fn = generation.denoise_fn(config, apply, params, tiled)
        return sampling.interpolate(
            diffusion, fn, x_a, x_b, lambdas, t_index, key, config.sampling.clip_denoised
        )

    return jax.jit(run, compiler_options=distributed.compiler_options())


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def metrics_path(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / "eval" / "metrics.jsonl"


def read_metrics(path: epath.Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _json_safe(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def append_metrics(path: epath.Path, record: dict[str, Any]) -> None:
    """Adds one JSON line; the file is rewritten atomically, so it is never half-written."""
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    line = json.dumps({k: _json_safe(v) for k, v in record.items()}, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, (old + line + "\n").encode())


# ---------------------------------------------------------------------------------------------
# The evaluation of one checkpoint


class Evaluator:
    """Evaluates checkpoints of one workdir; the jitted functions are built once and reused
    for every checkpoint (parameters are arguments).

    `feature_fn`: the Inception feature function (uint8 NHWC RGB -> (pool3, logits)); None
    loads the FID Inception (FID/IS are skipped with a notice when its weights are absent).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | epath.Path,
        feature_fn: FeatureFn | None = None,
    ) -> None:
        self.config = config
        self.workdir = epath.Path(workdir)
        self.eval_dir = self.workdir / "eval"
        self.mesh = distributed.make_mesh()
        graphdef, rest, self.abstract_state = abstract_train_state(config, self.mesh)
        self.apply = generation.model_apply(graphdef, rest)
        self._feature_fn = feature_fn
        self.writer = train.make_writer(self.eval_dir, _is_chief())

    @functools.cached_property
    def bpd_fn(self) -> Callable[..., dict[str, jax.Array]]:
        return make_bpd_fn(self.config, self.apply, self.mesh)

    @functools.cached_property
    def grid_sampler(self) -> Callable[..., dict[str, jax.Array]]:
        c = self.config
        chain = schedules.diffusion_from_config(c.diffusion, c.sampling.respacing).num_timesteps
        every = snapshot_every(chain, int(c.eval.progressive_steps))
        batch = round_up_to_devices(max(int(c.eval.grid_num), int(c.eval.progressive_rows)))
        return generation.make_sampler(
            c, self.apply, self.mesh, batch, c.sampling.respacing, snapshot_every=every
        )

    @functools.cached_property
    def fid_sampler(self) -> Callable[..., dict[str, jax.Array]]:
        c = self.config
        return generation.make_sampler(
            c, self.apply, self.mesh, int(c.sampling.batch_size), c.sampling.respacing
        )

    @functools.cached_property
    def interpolation_fn(self) -> Callable[..., jax.Array]:
        return make_interpolation_fn(self.config, self.apply)

    @functools.cached_property
    def fid_setup(self) -> tuple[FeatureFn | None, tuple[np.ndarray, np.ndarray] | None, str]:
        """(feature_fn, reference (mu, sigma), skip reason); the same decision on all hosts."""
        feature_fn, reason = self._feature_fn, ""
        if int(self.config.eval.num_samples) <= 0:
            reason = "eval.num_samples = 0"
        elif feature_fn is None and _is_chief():
            feature_fn, reason = load_feature_fn(self.config)
        available = bool(feature_fn is not None and not reason)
        if jax.process_count() > 1:
            available = bool(multihost_utils.broadcast_one_to_all(np.int32(available)))
        if not available:
            _log(f"FID/IS skipped: {reason or 'no Inception features on the chief'}")
            return None, None, reason or "unavailable"
        reference = None
        if _is_chief():
            mu, sigma, path = reference_statistics(self.config, feature_fn)
            _log(f"FID reference statistics: {path}")
            reference = (mu, sigma)
        return feature_fn, reference, ""

    def _png(self, kind: str, step: int) -> epath.Path:
        return self.eval_dir / f"{kind}_{step:08d}.png"

    def evaluate(self, step: int) -> dict[str, Any]:
        """All metrics and pictures of checkpoint `step`; returns its metrics.jsonl record."""
        c, start = self.config, time.perf_counter()
        if _is_chief():
            self.eval_dir.mkdir(parents=True, exist_ok=True)
        params = restore_state(self.workdir, step, self.abstract_state).ema_params
        record: dict[str, Any] = {"step": int(step)}
        if _is_image_data(c):
            record.update(self._bits_per_dim(params, step))
        self._samples_and_pictures(params, step)
        if _is_image_data(c):
            self._interpolation(params, step)
            record.update(self._fid(params, step))
        record["seconds"] = round(time.perf_counter() - start, 1)
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        scalars = {k: v for k, v in record.items() if k not in ("step", "time")}
        scalars = {k: v for k, v in scalars.items() if isinstance(v, int | float)}
        self.writer.write_scalars(step, scalars)
        self.writer.flush()
        return record

    def _bits_per_dim(self, params: Any, step: int) -> dict[str, Any]:
        c = self.config
        local = local_batch_size(int(c.eval.batch_size))
        batches = input_pipeline.create_eval_arrays(
            c,
            c.data.eval_split,
            c.eval.bpd_num_examples,
            batch_size=local,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        shape = generation.sample_shape(c, 1)[1:]
        result = compute_bpd(
            self.bpd_fn,
            params,
            padded_batches(batches, local, shape),
            self.mesh,
            _key(c, _BPD_STREAM),
        )
        if _is_chief():
            visualize.save_rate_distortion(
                result["rate"], result["distortion"], self._png("rate_distortion", step)
            )
            buffer = io.BytesIO()
            np.savez(buffer, **{k: result[k] for k in ("rate", "distortion", "vb")})
            _write_atomic(self.eval_dir / f"rate_distortion_{step:08d}.npz", buffer.getvalue())
        keys = ("bpd", "bpd_prior", "bpd_rate", "bpd_distortion", "rmse")
        return {**{k: result[k] for k in keys}, "bpd_num_examples": result["count"]}

    def _samples_and_pictures(self, params: Any, step: int) -> None:
        """The sample grid and the progressive generation strip (one sampling run)."""
        c = self.config
        batch = round_up_to_devices(max(int(c.eval.grid_num), int(c.eval.progressive_rows)))
        labels = generation.default_labels(c, batch)
        out = self.grid_sampler(params, _key(c, _GRID_STREAM), labels)
        samples = multihost_utils.process_allgather(out["sample"], tiled=True)
        snapshots = multihost_utils.process_allgather(out["snapshots"], tiled=True)
        if not _is_chief():
            return
        samples = np.asarray(samples)[: int(c.eval.grid_num)]
        if not _is_image_data(c):
            visualize.save_scatter(samples, self._png("samples", step))
            return
        grid = visualize.save_grid(samples, self._png("samples", step))
        self.writer.write_images(step, {"samples": grid[None]})
        images, ncol = progressive_strip(np.asarray(snapshots), int(c.eval.progressive_rows))
        visualize.save_grid(images, self._png("progressive", step), ncol=ncol)

    def _interpolation(self, params: Any, step: int) -> None:
        """The interpolation grid of the first 2P test images (chief only, one device)."""
        if not _is_chief():
            return
        c = self.config
        pairs = int(c.eval.interpolation_pairs)
        batches = input_pipeline.create_eval_arrays(
            c, c.data.eval_split, 2 * pairs, batch_size=2 * pairs
        )
        batch = next(iter(batches))
        if len(batch["label"]) < 2 * pairs:
            raise ValueError(f"eval.interpolation_pairs={pairs} needs {2 * pairs} test images")
        x = input_pipeline.to_model_range(batch["image"])
        x_a, x_b = x[:pairs], x[pairs:]
        local_params = jax.tree.map(lambda a: a.addressable_data(0), params)
        decoded = self.interpolation_fn(
            local_params, x_a, x_b, batch["label"][:pairs], _key(c, _INTERP_STREAM)
        )
        images, ncol = interpolation_grid(x_a, x_b, np.asarray(decoded))
        visualize.save_grid(images, self._png("interpolation", step), ncol=ncol)

    def _fid(self, params: Any, step: int) -> dict[str, Any]:
        feature_fn, reference, reason = self.fid_setup
        if reason:
            return {"fid": None, "is": None, "is_std": None, "fid_skipped": reason}
        num = int(self.config.eval.num_samples)
        directory = fid_samples_dir(self.workdir, step)
        _log(f"  drawing {num} samples for FID/IS into {directory}")
        write_sample_shards(self.config, self.fid_sampler, params, directory, num)
        if not _is_chief():
            return {}
        return fid_and_inception_score(
            self.config, feature_fn, iter_samples(directory, num), reference
        )


def _format_record(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, fmt in (
        ("bpd", ".4f"),
        ("bpd_rate", ".3f"),
        ("bpd_distortion", ".3f"),
        ("fid", ".2f"),
        ("is", ".2f"),
    ):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    return " | ".join(parts) + f" | {record['seconds']:.0f} s"


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str | epath.Path,
    step: int,
    *,
    feature_fn: FeatureFn | None = None,
) -> dict[str, Any]:
    """Evaluates checkpoint `step` of `workdir` (no record is written); see `Evaluator`."""
    return Evaluator(config, workdir, feature_fn).evaluate(step)


# ---------------------------------------------------------------------------------------------
# Entry points


def _validate(config: ml_collections.ConfigDict) -> None:
    train.validate_config(config)
    if config.sampling.batch_size % jax.device_count():
        raise ValueError(
            f"config.sampling.batch_size={config.sampling.batch_size} is not divisible by the "
            f"{jax.device_count()} devices"
        )
    for name in (
        "batch_size",
        "grid_num",
        "progressive_steps",
        "interpolation_lambdas",
        "is_splits",
    ):
        if int(config.eval[name]) < 1:
            raise ValueError(f"config.eval.{name}={config.eval[name]!r} must be >= 1")
    if 0 < config.eval.num_samples < config.eval.is_splits:
        raise ValueError(
            f"config.eval.num_samples={config.eval.num_samples} is fewer than the "
            f"{config.eval.is_splits} Inception Score splits (eval.is_splits)"
        )


def evaluate_checkpoints(
    config: ml_collections.ConfigDict,
    workdir: str | epath.Path,
    *,
    feature_fn: FeatureFn | None = None,
) -> list[dict[str, Any]]:
    """`--mode eval`: evaluates every not yet evaluated checkpoint of `workdir` once, in step
    order, appending a record to `DIR/eval/metrics.jsonl` after each; returns the new records.

    With `eval.once` only the latest checkpoint (if not done yet); otherwise polls every
    `eval.poll_seconds` until the checkpoint at `training.num_train_steps` is evaluated.
    """
    _validate(config)
    workdir = epath.Path(workdir)
    check_workdir_config(config, workdir)
    path = metrics_path(workdir)
    done = {int(r["step"]) for r in read_metrics(path) if "step" in r}
    evaluator, results, waiting = None, [], False
    while True:
        steps = checkpoint_steps(workdir)
        if config.eval.once and not steps:
            raise FileNotFoundError(
                f"no checkpoint in {checkpoints_dir(workdir)}: train first, or import released "
                "weights with `python -m diffusion_jax.convert --source SRC --workdir DIR`"
            )
        todo = [s for s in (steps[-1:] if config.eval.once else steps) if s not in done]
        if config.eval.once and not todo:
            _log(f"Checkpoint {steps[-1]} is already evaluated ({path}); nothing to do.")
        for step in todo:
            if step not in checkpoint_steps(workdir):  # removed by the trainer's retention
                _log(f"Checkpoint {step} disappeared before it could be evaluated; skipped.")
                continue
            evaluator = evaluator or Evaluator(config, workdir, feature_fn)
            _log(f"Evaluating checkpoint {step} of {workdir} ...")
            record = evaluator.evaluate(step)
            if _is_chief():
                append_metrics(path, record)
            done.add(step)
            results.append(record)
            _log(f"{_format_record(record)} -> {path}")
        if config.eval.once or max(done, default=-1) >= config.training.num_train_steps:
            return results
        if not todo and not waiting:
            _log(
                f"Waiting for new checkpoints in {checkpoints_dir(workdir)} (every "
                f"{config.eval.poll_seconds} s, until step {config.training.num_train_steps})."
            )
        waiting = not todo
        time.sleep(float(config.eval.poll_seconds))


def sample(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> epath.Path:
    """`--mode sample`: `sampling.num_samples` samples of checkpoint `sampling.checkpoint_step`
    (-1: the latest) into resumable shards of `DIR/samples/<step>/`, plus `grid.png` once all
    are written; `sampling.max_shards` > 0 stops after that many new shards."""
    _validate(config)
    workdir = epath.Path(workdir)
    check_workdir_config(config, workdir)
    steps = checkpoint_steps(workdir)
    wanted = int(config.sampling.checkpoint_step)
    if not steps or (wanted >= 0 and wanted not in steps):
        raise FileNotFoundError(
            f"no checkpoint {'' if wanted < 0 else wanted} in {checkpoints_dir(workdir)} "
            f"(available: {steps or 'none'})"
        )
    step = steps[-1] if wanted < 0 else wanted
    directory = samples_dir(workdir, step)
    settings = sample_settings(config)
    _check_sample_settings(directory, settings)  # before any slow work
    mesh = distributed.make_mesh()
    graphdef, rest, abstract = abstract_train_state(config, mesh)
    params = restore_state(workdir, step, abstract).ema_params
    c = config.sampling
    draw = generation.make_sampler(
        config, generation.model_apply(graphdef, rest), mesh, int(c.batch_size), c.respacing
    )
    num = int(c.num_samples)
    _log(
        f"Sampling {num} samples from checkpoint {step} ({settings['method']}, respacing "
        f"{c.respacing or 'none'}, guidance {c.guidance_scale}) on {jax.device_count()} "
        f"device(s), shards of {c.batch_size} -> {directory}"
    )
    complete = write_sample_shards(config, draw, params, directory, num, max_new=int(c.max_shards))
    if not complete:
        _log(f"Stopped after {c.max_shards} new shards (sampling.max_shards); rerun to continue.")
        return directory
    if _is_chief():
        grid = load_samples(directory, min(num, int(config.eval.grid_num)))
        if _is_image_data(config):
            visualize.save_grid(grid, directory / "grid.png")
        else:
            visualize.save_scatter(grid, directory / "grid.png")
        _log(f"Done: {num} samples in {directory} (grid: {directory / 'grid.png'})")
    return directory
