"""The sample-quality metric of the data the project ships, with its real-data floors:
digits (`digits.py`: Frechet distance in a small classifier's feature space, Inception-Score
analogue, confidence, classes, two-sample test) and the 2-D swiss roll (`points.py`: energy
distance, MMD). Used by the 'quality' evaluator, the training run's final report and the
quality-per-NFE benchmark."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax.metrics import digits, points
from diffusion_jax.runtime import errors

# Datasets with a quality metric, and the key of its headline number and floor.
HEADLINE = {
    "digits": ("digits_fd", "digits_fd_floor"),
    "swissroll": ("swissroll_energy", "swissroll_energy_floor"),
}


def score(samples: np.ndarray) -> dict[str, float]:
    """The metric of stored samples: uint8 digits [N, 8, 8, 1] or swiss-roll points [N, 2]."""
    samples = np.asarray(samples)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return points.sample_quality(samples)
    if samples.ndim == 4 and samples.shape[1:3] == (8, 8):
        return digits.sample_quality(samples)
    raise errors.InputError(
        f"samples of shape {samples.shape[1:]}: a quality metric exists for 8x8 digits "
        "[N, 8, 8, 1] and 2-D points [N, 2] only (use FID for other images)"
    )


def summary(result: dict[str, Any]) -> str:
    """One line: the headline numbers, each beside its real-data value."""
    if "digits_fd" in result:
        return (
            f"digits FD {result['digits_fd']:.2f} (real held-out digits: "
            f"{result['digits_fd_floor']:.2f}), classifier IS {result['digits_is']:.2f} (real "
            f"{result['digits_is_real']:.2f}), confidence {result['digits_confidence']:.3f} "
            f"(real {result['digits_confidence_real']:.3f}), "
            f"{int(result['digits_classes'])}/10 classes, two-sample test "
            f"{result['digits_c2st']:.3f} (real {result['digits_c2st_floor']:.3f})"
        )
    return (
        f"swiss-roll energy distance {result['swissroll_energy']:.4f} (fresh data: "
        f"{result['swissroll_energy_floor']:.4f}), MMD {result['swissroll_mmd']:.4f} (fresh "
        f"data: {result['swissroll_mmd_floor']:.4f})"
    )
