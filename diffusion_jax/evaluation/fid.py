"""FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016), evaluator 'fid'.

`num_samples` samples, drawn with the configured sampler into resumable shards
`DIR/eval/samples/<step>/` (`base.EvalSamples`), against the Inception statistics of the
`reference_examples` first images (0 = all) of `reference_split` (the training set, DDPM §5)
in batches of `batch_size`, computed once and cached as a pytorch-fid / TTUR `.npz` (or read
from `reference_stats`); the IS over `is_splits` splits. The IS logits are pool3 @ W without
the fc bias (`is_logits_bias = False`): the original
improved-gan code multiplies pool3 by the `softmax/logits/MatMul` weight alone, and
torch-fidelity / torchmetrics follow it. The Inception weights are `inception_weights`
("" = the cache, or a download unless DIFFUSION_JAX_OFFLINE); without them FID and IS are
skipped with a one-line notice. Inception features are the chief's work.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import base, sample_job
from diffusion_jax.metrics import frechet, inception, inception_weights
from diffusion_jax.runtime import cache, distributed, errors, files, logs
from diffusion_jax.training import config_checks

# [B, H, W, 3] uint8 NHWC -> (pool3 [B, D], logits [B, K]), host numpy in and out.
FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def to_rgb(images: np.ndarray) -> np.ndarray:
    """[B, H, W, C] -> [B, H, W, 3]: grey (C = 1) is tiled, as the Inception expects RGB."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def load_feature_fn(
    inception_weights_file: str, logits_bias: bool, where: str
) -> tuple[FeatureFn | None, str]:
    """The FID Inception on this host's devices, or (None, reason) without the weights
    (`inception_weights_file`, the cache, or a download unless DIFFUSION_JAX_OFFLINE);
    `where` is the setting's name for the message."""
    try:
        path = inception_weights.inception_weights_path(inception_weights_file)
    except inception_weights.InceptionWeightsUnavailable as e:
        name = inception_weights.FID_WEIGHTS_FILENAME
        at = inception_weights_file or cache.default_cache_dir() / name
        return None, (
            f"{str(e).splitlines()[0].rstrip('.')}; put {name} at {at} or set "
            f"--{where}.inception_weights=PATH"
        )
    mesh = distributed.make_mesh(jax.local_devices())
    params = inception.load_inception_params(path)
    return inception.make_feature_fn(params, mesh, logits_bias=logits_bias), ""


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


@dataclasses.dataclass(frozen=True)
class Reference:
    """The FID reference set: the `stats` file (pytorch-fid / TTUR npz; "" = computed from
    the first `examples` images (0 = all) of `split` in batches of `batch_size`, and cached)."""

    stats: str
    split: str
    examples: int
    batch_size: int

    def path(self, config: ml_collections.ConfigDict) -> epath.Path:
        """`stats` if set, else the cache file
        `$DIFFUSION_JAX_CACHE/fid_stats/fid_stats_<data>_<split>_<size>[_n<N>].npz`."""
        if self.stats:
            return epath.Path(self.stats)
        name = f"fid_stats_{config.data.name}_{self.split}_{config.data.image_size}"
        name += f"_n{self.examples}.npz" if self.examples > 0 else ".npz"
        return epath.Path(cache.default_cache_dir()) / "fid_stats" / name


def reference_statistics(
    config: ml_collections.ConfigDict, reference: Reference, feature_fn: FeatureFn, where: str
) -> tuple[np.ndarray, np.ndarray, epath.Path]:
    """(mu [D], sigma [D, D], path) of the FID reference set: read from its file or the
    cache, else computed from the images of its split and cached in the pytorch-fid/TTUR npz
    format (chief only). `where` names the settings for the message of a missing file."""
    path = reference.path(config)
    if path.exists():
        with path.open("rb") as f:
            mu, sigma = frechet.load_statistics(f)
        return mu, sigma, path
    if reference.stats:
        raise errors.UserError(f"{where}.reference_stats={reference.stats!r}: no such file")
    logs.log(
        f"  computing FID reference statistics of {config.data.name}/{reference.split} -> {path}"
    )
    batches = input_pipeline.create_eval_arrays(
        config, reference.split, reference.examples, batch_size=reference.batch_size
    )
    pool3, _ = extract_features(feature_fn, (b["image"] for b in batches))
    mu, sigma = frechet.compute_statistics(pool3)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    frechet.save_statistics(buffer, mu, sigma)
    files.write_atomic(path, buffer.getvalue())
    return mu, sigma, path


def fid_and_inception_score(
    feature_fn: FeatureFn,
    images: Iterable[np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    is_splits: int,
) -> dict[str, float]:
    """FID of batches of uint8 NHWC `images` against `reference` (mu, sigma), and their
    Inception Score over `is_splits` splits."""
    pool3, logits = extract_features(feature_fn, images)
    mu, sigma = frechet.compute_statistics(pool3)
    is_mean, is_std = frechet.inception_score(logits, splits=int(is_splits))
    return {
        "fid": frechet.frechet_distance(mu, sigma, *reference),
        "is": is_mean,
        "is_std": is_std,
        "fid_num_samples": len(pool3),
    }


class FidInceptionScore:
    """Evaluator 'fid' (see the module doc). `feature_fn` (uint8 NHWC RGB -> (pool3,
    logits)) replaces the FID Inception, e.g. in tests; None loads the Inception."""

    needs = frozenset({base.Need.IMAGES, base.Need.SAMPLES})

    def __init__(
        self,
        context: base.Context,
        *,
        num_samples: int,
        batch_size: int,
        inception_weights: str,
        reference_stats: str,
        reference_split: str,
        reference_examples: int,
        is_splits: int,
        is_logits_bias: bool,
        feature_fn: FeatureFn | None = None,
    ) -> None:
        self.context = context
        self.samples = base.EvalSamples(context, num_samples)
        self.reference = Reference(reference_stats, reference_split, reference_examples, batch_size)
        self.inception_weights, self.is_logits_bias = inception_weights, is_logits_bias
        self.is_splits = is_splits
        self._feature_fn = feature_fn

    @classmethod
    def check_settings(cls, config: Any, path: str) -> None:
        config_checks.check_positive(config, (f"{path}.batch_size", f"{path}.is_splits"))
        # 0 samples: FID is skipped; 0 reference examples: the whole split
        counts = (f"{path}.num_samples", f"{path}.reference_examples")
        config_checks.check_positive(config, counts, strict=False)
        settings = config_checks.field(config, path)
        if 0 < settings.num_samples < settings.is_splits:
            raise errors.ConfigError(
                f"config.{path}.num_samples={settings.num_samples} is fewer than the "
                f"{settings.is_splits} Inception Score splits (config.{path}.is_splits)"
            )

    @functools.cached_property
    def setup(self) -> tuple[FeatureFn | None, tuple[np.ndarray, np.ndarray] | None, str]:
        """(feature_fn, reference (mu, sigma), skip reason); the same decision on all hosts."""
        config, where = self.context.config, f"config.evals.{self.context.name}"
        feature_fn, reason = self._feature_fn, ""
        if self.samples.num_samples <= 0:
            reason = f"{where}.num_samples = 0"
        elif feature_fn is None and logs.is_chief():
            feature_fn, reason = load_feature_fn(self.inception_weights, self.is_logits_bias, where)
        available = bool(feature_fn is not None and not reason)
        if jax.process_count() > 1:
            available = bool(multihost_utils.broadcast_one_to_all(np.int32(available)))
        if not available:
            logs.log(f"FID/IS skipped: {reason or 'no Inception features on the chief'}")
            return None, None, reason or "unavailable"
        reference = None
        if logs.is_chief():
            mu, sigma, path = reference_statistics(config, self.reference, feature_fn, where)
            logs.log(f"FID reference statistics: {path}")
            reference = (mu, sigma)
        return feature_fn, reference, ""

    def run(self, params: Any, step: int) -> dict[str, Any]:
        feature_fn, reference, reason = self.setup
        if reason:
            return {"fid": None, "is": None, "is_std": None, "fid_skipped": reason}
        directory = self.samples.draw(params, step)
        if not logs.is_chief():
            return {}
        images = sample_job.iter_samples(directory, self.samples.num_samples)
        scores = fid_and_inception_score(feature_fn, images, reference, self.is_splits)
        return {**scores, **self.samples.settings()}
