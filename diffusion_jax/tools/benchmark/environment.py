"""The context every result is read in: the host, the JAX devices, package versions, and each
device kind's dense bf16 peak (for the model FLOPs utilisation; `xla_analysis.CHIPS`, the
table `aot` uses too). JAX is imported only by `jax_device_info`.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

from diffusion_jax.tools import xla_analysis


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of one device of this kind (`xla_analysis.CHIPS`), or None
    when unknown (CPU)."""
    chip = xla_analysis.chip(device_kind)
    return None if chip is None else chip.peak_flops / 1e12


def host_info() -> dict[str, Any]:
    """CPU count, load average, platform and date: the context every result is read in."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed versions of `names` ("absent" for those not installed)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def jax_device_info(count: int | None = None) -> dict[str, Any]:
    """The JAX devices used (the first `count`; default all): platform, kind, count, peak."""
    import jax

    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "kind": dev.device_kind,
        "count": count or jax.device_count(),
        "process_count": jax.process_count(),
        "peak_tflops_per_device": peak_tflops(dev.device_kind),
    }
