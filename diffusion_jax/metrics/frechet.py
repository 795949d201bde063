"""Frechet Inception Distance and Inception Score from Inception features, in float64 numpy.

* FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule"): the Frechet
  distance between Gaussians fitted to pool3 features,
  ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
* IS (Salimans et al. 2016, "Improved techniques for training GANs"):
  ``exp(E_x KL(p(y|x) || p(y)))`` over the 1008-way Inception softmax, averaged over splits.

Statistics files are ``.npz`` archives with arrays ``mu`` [D] and ``sigma`` [D, D], the
format of pytorch-fid and TTUR, so their published reference statistics can be used as is.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "compute_statistics",
    "frechet_distance",
    "inception_score",
    "load_statistics",
    "save_statistics",
    "trace_sqrt_product",
]


def compute_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, as pytorch-fid computes them.

    Args:
      features: [N, D] features (e.g. Inception pool3, D = 2048), N >= 2.

    Returns:
      ``(mu [D], sigma [D, D])`` in float64; ``sigma`` is the unbiased (N - 1) covariance.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
    mu = x.mean(axis=0)
    centered = x - mu
    sigma = centered.T @ centered / (x.shape[0] - 1)
    return mu, sigma


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric PSD matrix (negative eigenvalues clipped to 0)."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """``tr((S1 S2)^(1/2))`` for symmetric PSD ``S1``, ``S2`` [D, D], in float64.

    ``S1 S2`` is similar to the symmetric PSD matrix ``M = S1^(1/2) S2 S1^(1/2)``, so both
    have the same non-negative eigenvalues and ``tr((S1 S2)^(1/2)) = sum_i sqrt(eig_i(M))``.
    Using ``eigh`` on ``M`` (instead of a general ``sqrtm`` of the non-symmetric ``S1 S2``)
    stays real and finite for singular or near-singular covariances (e.g. N < D samples).
    """
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    root1 = _symmetric_sqrt(s1)
    m = root1 @ s2 @ root1
    m = 0.5 * (m + m.T)
    eigvals = np.linalg.eigvalsh(m)
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` (Dowson & Landau 1982),
    the FID when the Gaussians are fitted to Inception pool3 features.

    Args:
      mu1, mu2: [D] means.
      sigma1, sigma2: [D, D] covariances (symmetric PSD; asymmetry from rounding is removed).

    Returns:
      The distance as a Python float (>= 0 up to rounding).
    """
    m1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}"
        )
    diff = m1 - m2
    trace_term = np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(diff @ diff + trace_term)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score from Inception logits, as the reference (Salimans et al. 2016) code.

    The N rows are cut, in order, into ``splits`` contiguous parts (boundaries
    ``i * N // splits``); per part ``exp(mean_x KL(p(y|x) || p_part(y)))`` with ``p(y|x)`` the
    softmax over the logits and ``p_part(y)`` its mean over the part. Computed in float64
    from log-probabilities, so confident (one-hot) predictions give exact values, not NaN.

    Args:
      logits: [N, K] logits (K = 1008 for the FID Inception network), N >= splits.
      splits: number of parts (10 in the paper).

    Returns:
      ``(mean, std)`` of the per-split scores (population std, as numpy's default).
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < splits or splits < 1:
        raise ValueError(f"logits must be [N >= splits={splits}, K], got shape {x.shape}")
    n = x.shape[0]
    log_p = _log_softmax(x)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        # log of the marginal p_part(y) = log mean_x p(y|x), computed stably.
        peak = part.max(axis=0, keepdims=True)
        log_marginal = peak + np.log(np.exp(part - peak).mean(axis=0, keepdims=True))
        p = np.exp(part)
        kl = np.where(p > 0, p * (part - log_marginal), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def save_statistics(
    path: str | os.PathLike[str] | BinaryIO, mu: ArrayLike, sigma: ArrayLike
) -> None:
    """Write ``mu`` [D] and ``sigma`` [D, D] to ``path`` (or a binary file object) as an
    ``.npz`` (keys mu, sigma). The file is written at exactly ``path`` (no ``.npz`` suffix
    is appended)."""
    if hasattr(path, "write"):
        np.savez(path, mu=np.asarray(mu), sigma=np.asarray(sigma))
        return
    with open(path, "wb") as f:
        np.savez(f, mu=np.asarray(mu), sigma=np.asarray(sigma))


def load_statistics(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu [D], sigma [D, D])`` as float64 from an ``.npz`` with keys mu and sigma.

    Reads the statistics files of pytorch-fid and TTUR (e.g. ``fid_stats_cifar10_train.npz``).
    """
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise KeyError(f"{path}: missing arrays {sorted(missing)} (has {data.files})")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
