"""Sample quality for the data the project ships, evaluator 'quality'.

Where the FID Inception does not apply or is not available offline, the samples are scored
in the feature space of a small classifier trained on the bundled data
(`metrics/digits.py`: Frechet distance, Inception-Score analogue, confidence, classes) or,
for the 2-D swiss roll, by the energy distance and MMD against fresh data
(`metrics/points.py`). Each number comes with its real-data floor (held-out real data scored
the same way), so it means something on its own.

The samples are the eval job's samples of the checkpoint (`eval.num_samples`, the configured
sampler, resumable shards in `DIR/eval/samples/<step>/`, shared with FID/IS). Any folder of
sample shards can be scored from the command line:

    python -m diffusion_jax.evaluation.quality DIR/samples/1500 [--num_samples N]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from etils import epath

from diffusion_jax import errors, logs, sample
from diffusion_jax.evaluation import base
from diffusion_jax.metrics import digits, points

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


class SampleQuality:
    """Evaluator 'quality' (see the module doc)."""

    def __init__(self, context: base.Context) -> None:
        self.samples = base.EvalSamples(context)

    def run(self, params: Any, step: int) -> dict[str, Any]:
        directory = self.samples.draw(params, step)
        if not logs.is_chief():
            return {}
        num = self.samples.num_samples
        result = score(sample.load_samples(directory, num))
        logs.log(f"  {summary(result)}")
        return {**result, "quality_num_samples": num, **self.samples.settings()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sample quality of a folder of sample shards.")
    p.add_argument("directory", help="a folder of shard_*.npz (e.g. WORKDIR/samples/STEP)")
    p.add_argument("--num_samples", type=int, default=0, help="score the first N (0 = all)")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    args = p.parse_args(argv)
    directory = epath.Path(args.directory)
    with errors.reported(args.debug):
        shards = sorted(directory.glob("shard_*.npz"))
        if not shards:
            raise errors.UserError(f"no shard_*.npz in {directory}")
        samples = np.concatenate([np.load(s.open("rb"))["image"] for s in shards])
        if args.num_samples:
            samples = samples[: args.num_samples]
        result = score(samples)
    print(f"{len(samples)} samples in {directory}: {summary(result)}")
    for k, v in sorted(result.items()):
        print(f"  {k} = {v:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
