"""Measurement helpers: wall-clock medians, XLA's FLOP and memory analyses of a compiled
program (`xla_analysis`), applied donation, and the result row (shared with
launch/benchmark_peer.py). No JAX import: they read the objects they are given.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from diffusion_jax.tools import xla_analysis


def median_time(run: Callable[[], Any], *, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `run()`, which must block until its results are ready."""
    for _ in range(max(warmup, 0)):
        run()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled (or lowered) program per device: XLA's cost analysis
    times `xla_analysis.loop_factor` of its HLO (a loop body counts as often as it runs; a
    lowered program's text has no HLO loops: factor 1); None where the backend does not
    report them."""
    flops = float(xla_analysis.cost(compiled).get("flops", 0.0))
    if not flops > 0:
        return None
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - a program without text keeps the analysis's count
        text = ""
    return flops * xla_analysis.loop_factor(text or "")


def donated_aliases(compiled: Any) -> int:
    """Number of input buffers the compiled HLO aliases to outputs (applied donation)."""
    header = compiled.as_text().split("\n", 1)[0]
    match = re.search(r"input_output_alias=\{(.*?)\}(?:,\s*\w+=|$)", header)
    if not match:
        return 0
    return len(re.findall(r"alias\)", match.group(1)))


compiled_memory = xla_analysis.memory_bytes  # per device; `peak_bytes` includes the code
is_oom = xla_analysis.is_oom


def row(
    task: str,
    dtype: str,
    batch: int,
    *,
    steps: int | None = None,
    seconds: float,
    seconds_all: Sequence[float],
    images: float,
    flops: float | None = None,
    peak: float | None = None,
    compile_s: float | None = None,
    note: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """One result row (shared with launch/benchmark_peer.py). `seconds` is the median time
    of one unit (a train step; one sampling / bpd / feature call) processing `images`
    images; `flops` are per device per unit; `peak` is the per-device peak in TFLOP/s
    (`environment.peak_tflops`: `xla_analysis.CHIPS`)."""
    tflops = flops / seconds / 1e12 if flops and seconds > 0 else None
    return {
        "task": task,
        "dtype": dtype,
        "batch": int(batch),
        "steps": steps,
        "seconds": seconds,
        "seconds_all": [round(s, 6) for s in seconds_all],
        "images_per_s": images / seconds if seconds > 0 else None,
        "flops": flops,
        "tflops_per_s": tflops,
        "mfu": tflops / peak if tflops is not None and peak else None,
        "compile_s": compile_s,
        "note": note,
        **extra,
    }
