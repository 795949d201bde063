"""What a run tells its user: chief-only progress lines, ETAs, and TensorBoard writers."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import traverse_util


def is_chief() -> bool:
    """True on process 0, the one that writes files and logs on a multi-host run."""
    return jax.process_index() == 0


def log(message: str) -> None:
    """Prints `message` on the chief process only, flushed."""
    if is_chief():
        print(message, flush=True)


def format_eta(seconds: float) -> str:
    """'3m07s', '2h05m', '1d 4h10m'; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d " if d else "") + (f"{h}h{m:02d}m" if d or h else f"{m}m{s:02d}s")


class Progress:
    """The rate and ETA of a long job of `total` units (steps, samples), since the previous
    `update`. Not clu's `periodic_actions.ReportProgress`: counting steps, it must be called
    after every single one (a train call advances `training.steps_per_call`), and it reports
    through work-unit notes and absl logging, not the lines that also carry the loss."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self._done, self._time = total, done, time.perf_counter()
        self.interval = 0.0  # seconds between the last two updates

    def update(self, done: int) -> tuple[float, str]:
        """(units per second since the previous update, ETA of the rest as `format_eta`)."""
        now = time.perf_counter()
        self.interval = max(now - self._time, 1e-9)
        rate = (done - self._done) / self.interval
        self._done, self._time = done, now
        return rate, format_eta((self.total - done) / rate if rate > 0 else math.inf)


def hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's scalar leaves as {'training.batch_size': 128, ...} for TensorBoard."""
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


class NoWriter:
    """Stands in for clu's writers where TensorBoard events cannot be written."""

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        pass

    def write_images(self, step: int, images: dict[str, Any]) -> None:
        pass

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass


def make_writer(workdir: str | epath.Path, chief: bool | None = None):
    """clu's TensorBoard writer into `workdir` on the chief host. clu's writers need
    TensorFlow; without it (e.g. a GPU machine with JAX only) metrics go to stdout alone."""
    if not (is_chief() if chief is None else chief):
        return NoWriter()
    try:
        from clu import metric_writers
    except ImportError:
        print("TensorFlow is not installed: no TensorBoard events (progress goes to stdout).")
        return NoWriter()
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir)))
