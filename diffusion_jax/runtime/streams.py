"""Every random stream of the project below `config.seed`, in one place.

`key(seed, stream, *indices)` = fold_in(PRNGKey(seed), stream), then fold_in of each index
(the training step, a preview's step, a batch): streams are independent of each other and the
same for every checkpoint, so the eval job's samples of checkpoint k and k' share their noise.
The training keys are a stream of their own (before, fold_in(PRNGKey(seed), step) shared its
namespace with the sampling streams: stream k began where training step k's key did).
(The input pipeline's NumPy shuffling streams are `input_pipeline.batches`'.)
"""

from __future__ import annotations

import enum

import jax


class Stream(enum.IntEnum):
    SAMPLES = 1  # sample shards: `--mode sample` and the eval job's samples
    GRID = 2  # evaluator 'samples': the grid and the progressive strip
    BPD = 3  # evaluator 'bpd': q(x_t | x_0) noise
    INTERPOLATION = 4  # evaluator 'interpolation'
    ODE_BPD = 5  # evaluator 'ode_bpd': dequantization and Hutchinson probes
    FINAL = 6  # the final samples of a training run
    PREVIEW = 7  # training previews, by step
    TRAIN = 8  # the training step's timesteps, noise and dropout, by step


def key(seed: int, stream: Stream, *indices: int | jax.Array) -> jax.Array:
    """The key of `stream` below `seed`, folded with `indices` in order."""
    k = jax.random.fold_in(jax.random.PRNGKey(int(seed)), int(stream))
    for i in indices:
        k = jax.random.fold_in(k, i)
    return k
