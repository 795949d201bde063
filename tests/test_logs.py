"""Progress lines (runtime/logs.py)."""

import math

from diffusion_jax.runtime import logs


def test_eta_formats():
    assert logs.format_eta(187) == "3m07s"
    assert logs.format_eta(2 * 3600 + 5 * 60) == "2h05m"
    assert logs.format_eta(86400 + 4 * 3600 + 600) == "1d 4h10m"
    assert logs.format_eta(math.inf) == "?"


def test_progress_rate_and_eta_since_the_previous_update(monkeypatch):
    """On a fake clock: 100 units in 4 s -> 25/s and the remaining 900 in 36 s; the next
    rate counts only the units and seconds since then; no progress -> ETA unknown."""
    clock = iter([10.0, 14.0, 24.0, 30.0])
    monkeypatch.setattr(logs.time, "perf_counter", lambda: next(clock))
    progress = logs.Progress(total=1000)
    assert progress.update(100) == (25.0, "0m36s")
    assert progress.update(600) == (50.0, "0m08s") and progress.interval == 10.0
    assert progress.update(600) == (0.0, "?")
