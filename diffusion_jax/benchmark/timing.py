"""Measurement helpers: wall-clock medians, XLA's FLOP and memory analyses of a compiled
program, applied donation, out-of-memory errors, and the result row (shared with
launch/benchmark_peer.py). No JAX import: they read the objects they are given.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


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
    """FLOPs of one call of a compiled (or lowered) program per device, from XLA's cost
    analysis; None where the backend does not report them."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def donated_aliases(compiled: Any) -> int:
    """Number of input buffers the compiled HLO aliases to outputs (applied donation)."""
    header = compiled.as_text().split("\n", 1)[0]
    match = re.search(r"input_output_alias=\{(.*?)\}(?:,\s*\w+=|$)", header)
    if not match:
        return 0
    return len(re.findall(r"alias\)", match.group(1)))


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """Device bytes XLA's buffer assignment gives one call of a compiled program, per device:
    arguments, outputs, the part of the outputs aliased to donated arguments, temporaries
    (activations, workspace) and `peak_bytes` = arguments + outputs - aliased + temporaries,
    an upper bound on what the call holds at once. None where the backend does not report it.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if stats is None:
        return None
    memory = {
        name: int(getattr(stats, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "alias", "temp")
    }
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    return {f"{name}_bytes": value for name, value in memory.items()}


def is_oom(error: BaseException) -> bool:
    """True for a device out-of-memory error (at compile or run time)."""
    text = f"{type(error).__name__}: {error}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


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
    images; `flops` are per device per unit; `peak` is the per-device peak in TFLOP/s."""
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
