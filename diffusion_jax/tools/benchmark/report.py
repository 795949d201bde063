"""Result files and their text: one line per row, the table of a result, two results side by
side, JSON reading and writing. No JAX import (launch/benchmark_peer.py, the PyTorch peer,
uses it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Forward cost of the DDPM CIFAR-10 U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic
# Models": ch 128, ch_mult 1,2,2,2, 2 res blocks, attention at 16x16, 35.7 M parameters) per
# 32x32 image, 2 FLOPs per multiply-add: about 6.1 G multiply-adds, as tabulated for this
# model by Fang et al. 2023 ("Structural Pruning for Diffusion Models", arXiv:2305.10924).
REFERENCE_FORWARD_GFLOP = 12.1


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _steps(r: dict[str, Any]) -> str:
    return "-" if r.get("steps") is None else str(r["steps"])


def _peak_gb(r: dict[str, Any]) -> float | None:
    memory = r.get("memory") or {}
    return memory["peak_bytes"] / 1e9 if "peak_bytes" in memory else None


def format_row(r: dict[str, Any]) -> str:
    """One line: task, dtype, batch, steps, time, images/s, TFLOP/s, MFU, peak GB, note."""
    return (
        f"{r['task']:<10} {r['dtype']:<9} {r['batch']:>6} {_steps(r):>6} "
        f"{_fmt(r['seconds'], '.4g', ' s'):>11} {_fmt(r['images_per_s'], '.4g'):>9} "
        f"{_fmt(r.get('tflops_per_s'), '.3g'):>8} {_fmt(r.get('mfu'), '.1%'):>6} "
        f"{_fmt(_peak_gb(r), '.3g'):>7}  {r.get('note', '')}"
    ).rstrip()


def _describe(result: dict[str, Any]) -> str:
    dev, host = result["device"], result["host"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    peak = dev.get("peak_tflops_per_device")
    return (
        f"{result['implementation']}: {dev['count']} x {dev['kind']} ({dev['platform']}), peak "
        f"{_fmt(peak, 'g', ' TFLOP/s')}; {versions}; {host['cpu_count']} CPUs, load "
        f"{host.get('load_avg_before', '?')} -> {host['load_avg']}; {host['date']}"
    )


def format_table(result: dict[str, Any]) -> str:
    """The result as a text table (time = median per step for train, per call otherwise)."""
    header = (
        f"{'task':<10} {'dtype':<9} {'batch':>6} {'steps':>6} {'time':>11} {'img/s':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peak GB':>7}  note"
    )
    lines = [_describe(result)]
    checks = result.get("checks", {})
    if checks.get("forward_gflop_per_image"):
        gflop = ", ".join(
            f"{k} {_fmt(v, '.4g')}" for k, v in checks["forward_gflop_per_image"].items()
        )
        line = f"forward GFLOP/image: {gflop}"
        if checks.get("forward_vs_reference"):
            line += (
                f" (published: {REFERENCE_FORWARD_GFLOP}; ratio "
                f"{checks['forward_vs_reference']:.3f})"
            )
        lines.append(line)
    lines += [header, "-" * len(header)]
    lines += [format_row(r) for r in result["results"]]
    return "\n".join(lines)


def _key(r: dict[str, Any]) -> tuple:
    return (r["task"], r["dtype"], r["batch"], r.get("steps"))


def format_comparison(ours: dict[str, Any], peer: dict[str, Any]) -> str:
    """Rows present in both results side by side; speedup = ours img/s / peer img/s."""
    header = (
        f"{'task':<10} {'dtype':<9} {'batch':>6} {'steps':>6} {'ours img/s':>11} "
        f"{'peer img/s':>11} {'speedup':>8}"
    )
    lines = ["ours  = " + _describe(ours), "peer  = " + _describe(peer), header, "-" * len(header)]
    theirs = {_key(r): r for r in peer["results"]}
    matched = 0
    for r in ours["results"]:
        other = theirs.get(_key(r))
        if other is None:
            continue
        matched += 1
        a, b = r.get("images_per_s"), other.get("images_per_s")
        ratio = a / b if a and b else None
        lines.append(
            f"{r['task']:<10} {r['dtype']:<9} {r['batch']:>6} {_steps(r):>6} "
            f"{_fmt(a, '.4g'):>11} {_fmt(b, '.4g'):>11} {_fmt(ratio, '.2f', 'x'):>8}"
        )
    if not matched:
        lines.append("(no row measured by both: same task, dtype, batch and steps needed)")
    mine = {_key(r) for r in ours["results"]}
    for name, result, others in (("ours", ours, theirs), ("peer", peer, mine)):
        for r in result["results"]:
            if _key(r) not in others:
                lines.append(f"{name} only: {format_row(r)}")
    return "\n".join(lines)


def load_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def write_result(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes `result` as indented JSON (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
