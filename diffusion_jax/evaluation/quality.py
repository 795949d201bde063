"""Sample quality for the data the project ships, evaluator 'quality'.

Where the FID Inception does not apply or is not available offline, the samples are scored
in the feature space of a small classifier trained on the bundled data
(`metrics/digits.py`: Frechet distance, Inception-Score analogue, confidence, classes) or,
for the 2-D swiss roll, by the energy distance and MMD against fresh data
(`metrics/points.py`). Each number comes with its real-data floor (held-out real data scored
the same way), so it means something on its own.

The samples are the eval job's samples of the checkpoint (the first `num_samples`, the
configured sampler, resumable shards in `DIR/eval/samples/<step>/`, shared with FID/IS).
Any folder of sample shards can be scored from the command line:

    python -m diffusion_jax.evaluation.quality DIR/samples/1500 [--num_samples N]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from etils import epath

from diffusion_jax.evaluation import base, sample_job
from diffusion_jax.metrics.dataset_quality import HEADLINE, score, summary
from diffusion_jax.runtime import errors, logs, platforms
from diffusion_jax.training import config_checks

__all__ = ["HEADLINE", "SampleQuality", "score", "summary"]


class SampleQuality:
    """Evaluator 'quality' (see the module doc)."""

    needs = frozenset({base.Need.QUALITY_METRIC, base.Need.SAMPLES})

    def __init__(self, context: base.Context, *, num_samples: int) -> None:
        self.samples = base.EvalSamples(context, num_samples)

    @classmethod
    def check_settings(cls, config: Any, path: str) -> None:
        config_checks.check_positive(config, (f"{path}.num_samples",))

    def run(self, params: Any, step: int) -> dict[str, Any]:
        directory = self.samples.draw(params, step)
        if not logs.is_chief():
            return {}
        num = self.samples.num_samples
        result = score(sample_job.load_samples(directory, num))
        logs.log(f"  {summary(result)}")
        return {**result, "quality_num_samples": num, **self.samples.settings()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sample quality of a folder of sample shards.")
    p.add_argument("directory", help="a folder of shard_*.npz (e.g. WORKDIR/samples/STEP)")
    p.add_argument("--num_samples", type=int, default=0, help="score the first N (0 = all)")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    args = p.parse_args(argv)
    platforms.skip_tpu_off_tpu_vms()
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
