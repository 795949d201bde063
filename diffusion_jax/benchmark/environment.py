"""The context every result is read in: the host, the JAX devices, package versions, and each
device kind's dense bf16 peak (for the model FLOPs utilisation). JAX is imported only by
`jax_device_info`.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

# Dense bf16 peak TFLOP/s per JAX device, matched in order against `device_kind`.
# TPU v3 exposes each of its 2 cores per chip as a device: 420 / 8 per core (v3-8 = 420);
# v4 and later expose one device per chip.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("a100", 312.0),
    ("tpu v3", 420.0 / 8),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of one device of this kind, or None when unknown (CPU)."""
    kind = device_kind.lower()
    for pattern, peak in PEAK_TFLOPS:
        if pattern in kind:
            return peak
    return None


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
