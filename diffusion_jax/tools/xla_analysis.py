"""What XLA says of a compiled program, read one way for `aot` and `benchmark`: the chip table
(HBM and bf16 peak), the memory a call holds at its peak, out-of-memory errors, the loop
correction of the cost analysis (`loop_factor`, `per_call`), and what a program's HLO text
holds (array bytes, collectives, its largest values). No JAX import: it reads the objects it
is given (the benchmark's PyTorch peer imports it through `benchmark.timing`).

The chips (`CHIPS`, per chip; `Chip.devices` JAX devices share one chip evenly):

- TPU v3: 123 TFLOP/s dense bf16 and 32 GiB HBM per chip, 2 TensorCores per chip, each a
  JAX device: 61.5 TFLOP/s and 16 GiB per device. Sources: Google Cloud's "TPU v3" page of
  the Cloud TPU system architecture docs (cloud.google.com/tpu/docs/v3), and Norrie et al.,
  "The Design Process for Google's Training Chips: TPUv2 and TPUv3", IEEE Micro 41(2), 2021.
  The benchmark once used 420 / 8 = 52.5 TFLOP/s per core, from the 2018 announcement of a
  v3 board of 4 chips as "420 teraflops"; the current documentation's 123 per chip (492 per
  4-chip v3-8) is the number the chip's other entries come from (the same pages give the
  v4, v5e, v5p and v6e figures per chip), so it is the one kept.
- TPU v4: 275 TFLOP/s bf16, 32 GiB HBM per chip; its 2 TensorCores form one device
  (megacore). Source: cloud.google.com/tpu/docs/v4; Jouppi et al., "TPU v4", ISCA 2023.
- TPU v5p (device kind "TPU v5"): 459 TFLOP/s bf16, 95 GiB HBM per chip, one device.
  Source: cloud.google.com/tpu/docs/v5p.
- TPU v5e ("TPU v5 lite"): 197 TFLOP/s bf16, 16 GiB HBM per chip, one device. Source:
  cloud.google.com/tpu/docs/v5e.
- TPU v6e ("TPU v6 lite", Trillium): 918 TFLOP/s bf16, 32 GiB HBM per chip, one device.
  Source: cloud.google.com/tpu/docs/v6e.
- NVIDIA H100 SXM: 989 TFLOP/s dense bf16 (1979 with 2:4 sparsity), 80 GB; H100 PCIe: 756
  dense, 80 GB; H200: the H100 SXM's tensor cores (989 dense) with 141 GB. Source: NVIDIA's
  H100 and H200 product pages / data sheets (the dense figure is half the sparse one).
- NVIDIA A100: 312 TFLOP/s dense bf16; HBM 40 or 80 GB by model (not recorded: no caller
  needs it). Source: NVIDIA A100 data sheet.

Model FLOPs utilisation everywhere is FLOPs per device / seconds / `Chip.peak_flops`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import numpy as np

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip kind: its HBM and dense bf16 peak, split evenly over its `devices`."""

    chip_hbm_bytes: int | None  # per chip; None where not recorded
    chip_bf16_flops: float  # dense peak per chip, FLOP/s
    devices: int = 1  # JAX devices per chip (v3: one per TensorCore)

    @property
    def hbm_bytes(self) -> int | None:
        """HBM bytes per JAX device."""
        return None if self.chip_hbm_bytes is None else self.chip_hbm_bytes // self.devices

    @property
    def peak_flops(self) -> float:
        """Dense bf16 peak FLOP/s per JAX device."""
        return self.chip_bf16_flops / self.devices


# Keyed by a lower-case part of `device_kind`, matched in this order (`chip`): "tpu v5 lite"
# before "tpu v5", "h100 pcie" before "h100". The facts and their sources: the module doc.
CHIPS: dict[str, Chip] = {
    "tpu v3": Chip(32 * GiB, 123e12, devices=2),
    "tpu v4": Chip(32 * GiB, 275e12),
    "tpu v5 lite": Chip(16 * GiB, 197e12),
    "tpu v5e": Chip(16 * GiB, 197e12),
    "tpu v5": Chip(95 * GiB, 459e12),  # v5p
    "tpu v6 lite": Chip(32 * GiB, 918e12),
    "tpu v6e": Chip(32 * GiB, 918e12),
    "h100 pcie": Chip(80 * 10**9, 756e12),
    "h100": Chip(80 * 10**9, 989e12),
    "h200": Chip(141 * 10**9, 989e12),
    "a100": Chip(None, 312e12),
}


def chip(device_kind: str) -> Chip | None:
    """The `CHIPS` entry of a JAX `device_kind` ("TPU v3", "NVIDIA H100 80GB HBM3"); None
    for a kind without one (CPU)."""
    kind = device_kind.lower()
    return next((c for pattern, c in CHIPS.items() if pattern in kind), None)


def memory_bytes(compiled: Any) -> dict[str, int] | None:
    """Device bytes XLA's buffer assignment gives one call of a compiled program, per device:
    `argument_bytes`, `output_bytes`, `alias_bytes` (outputs aliased to donated arguments),
    `temp_bytes` (activations, workspace), `code_bytes` (the generated program) and
    `peak_bytes` = arguments + outputs - aliased + temporaries + code, an upper bound on what
    the call holds at once. None where the backend does not report it."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if stats is None:
        return None
    memory = {
        name: int(getattr(stats, f"{attr}_size_in_bytes", 0))
        for name, attr in (
            ("argument", "argument"),
            ("output", "output"),
            ("alias", "alias"),
            ("temp", "temp"),
            ("code", "generated_code"),
        )
    }
    memory["peak"] = (
        memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["code"]
    )
    return {f"{name}_bytes": value for name, value in memory.items()}


def is_oom(error: BaseException) -> bool:
    """True for a device out-of-memory error, at compile or at run time."""
    text = f"{type(error).__name__}: {error}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


# ---------------------------------------------------------------------------------------------
# The loop correction: XLA's cost analysis counts a loop body once


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_CALLEE = re.compile(
    r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}"
)
_PRODUCT = re.compile(r"= (\w+\[[\d,]*\])\S* (convolution|dot)\((.*)$")
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])")
_OPERAND = re.compile(r"(?:(\w+\[[\d,]*\])\S*\s+)?%([\w.\-]+)")


def _dims(shape: str) -> list[int]:
    """[8, 4] of 'f32[8,4]'."""
    return [int(d) for d in shape[shape.index("[") + 1 : -1].split(",") if d]


def _attribute(line: str, name: str, default: str = "") -> str:
    m = re.search(rf"\b{name}=(\{{[^}}]*\}}|[^,\s]+)", line)
    return m.group(1).strip("{}") if m else default


def _valid_positions(kernel: int, out: int, lhs: int, window: list[int]) -> int:
    """The (kernel, output) position pairs of one spatial dimension that read an input element
    rather than padding or a dilation hole; `window` = [stride, low padding, lhs dilation, rhs
    dilation] (XLA's `HloCostAnalysis::GetConvolutionFlops`)."""
    stride, pad, base, dilate = window
    index = np.arange(out)[None, :] * stride - pad + np.arange(kernel)[:, None] * dilate
    return int(((index % base == 0) & (index >= 0) & (index // base < lhs)).sum())


def product_flops(line: str, shapes: dict[str, str]) -> int:
    """FLOPs of one HLO `dot` or `convolution` instruction as XLA's cost analysis counts them
    (2 per multiply-add), 0 for any other line. A dot: 2 x the result's elements x the sizes
    of the left operand's contracting dimensions. A convolution: 2 x input features per
    group x output features x batch per batch group x the (kernel, output) position pairs of
    each spatial dimension that read an input element (`dim_labels`, `window`: padding and
    dilation holes read nothing). Operand shapes come from the line or, by name, `shapes`."""
    m = _PRODUCT.search(line)
    if not m:
        return 0
    result, op, rest = _dims(m.group(1)), m.group(2), m.group(3)
    lhs, rhs = (_dims(shape or shapes[name]) for shape, name in _OPERAND.findall(rest)[:2])
    if op == "dot":
        contracting = [int(d) for d in _attribute(line, "lhs_contracting_dims").split(",") if d]
        return 2 * math.prod(result) * math.prod(lhs[d] for d in contracting)
    lhs_labels, rhs_labels, out_labels = re.split(r"_|->", _attribute(line, "dim_labels"))
    window = dict(item.split("=") for item in _attribute(line, "window").split())
    n = len(lhs_labels) - 2  # spatial dimensions, labelled 0..n-1
    # Per dimension: stride, low padding ('pad=1_2x0_0' is low_high), lhs and rhs dilation.
    knobs = [
        [int(v.split("_")[0]) for v in window[key].split("x")] if key in window else [value] * n
        for key, value in {"stride": 1, "pad": 0, "lhs_dilate": 1, "rhs_dilate": 1}.items()
    ]
    positions = math.prod(
        _valid_positions(
            rhs[rhs_labels.index(str(d))],
            result[out_labels.index(str(d))],
            lhs[lhs_labels.index(str(d))],
            [k[d] for k in knobs],
        )
        for d in range(n)
    )
    groups = int(_attribute(line, "feature_group_count", "1"))
    batch_groups = int(_attribute(line, "batch_group_count", "1"))
    features = lhs[lhs_labels.index("f")] // groups * result[out_labels.index("f")]
    return 2 * features * (lhs[lhs_labels.index("b")] // batch_groups) * positions


def program_flops(hlo: str) -> tuple[int, int]:
    """(per call, each once): the FLOPs of a compiled program's convolutions and matrix
    products (`product_flops`), each times how often it runs per call, and each counted once
    as XLA's cost analysis counts a loop body. A `while` body runs as often as XLA's
    `known_trip_count` says, else as its condition allows (a scan's counter runs from 0 to
    the constant it is compared with); nested loops multiply."""
    body: dict[str, list[str]] = {}
    shapes: dict[str, dict[str, str]] = {}  # computation -> value name -> 'f32[8,4]'
    # computation -> [(callee, None | a while's trip count or condition computation)]
    calls: dict[str, list[tuple[str, str | None]]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = m.group(1)
            body[current], calls[current], shapes[current] = [], [], {}
            entry = current if line.startswith("ENTRY") else entry
            continue
        if current is None:
            continue
        body[current].append(line)
        d = _DEFINITION.match(line)
        if d:
            shapes[current][d.group(1)] = d.group(2)
        loop = re.search(r" while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)", line)
        if loop:
            known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            calls[current].append((loop.group(2), known.group(1) if known else loop.group(1)))
            continue
        for callee, branches in _CALLEE.findall(line):
            for name in [callee] if callee else re.findall(r"%?([\w.\-]+)", branches):
                calls[current].append((name, None))

    def trips(condition: str) -> int:
        """The trip count XLA noted on the loop, else read from its condition (`i < N`)."""
        if condition.isdigit():
            return int(condition)
        lines = body.get(condition, [])
        text = "\n".join(lines + [x for c, _ in calls.get(condition, []) for x in body.get(c, [])])
        bound = re.findall(r"s32\[\]\S* constant\((\d+)\)", text)
        return int(bound[0]) if bound and "direction=LT" in text else 1

    @functools.cache
    def flops(name: str, executed: bool) -> int:  # HLO's call graph has no cycles
        own = sum(product_flops(line, shapes.get(name, {})) for line in body.get(name, []))
        return own + sum(
            (trips(cond) if cond and executed else 1) * flops(callee, executed)
            for callee, cond in calls.get(name, [])
        )

    return (flops(entry, True), flops(entry, False)) if entry else (0, 0)


def loop_factor(hlo: str) -> float:
    """Per-call over counted-once FLOPs of a compiled program's products (`program_flops`;
    1 without products): a product in a 100-step scan weighs 100 times its FLOPs, one
    outside every loop its FLOPs once, and loops without products (e.g. `searchsorted`'s
    binary search) nothing. XLA's cost analysis counts each loop body once; its totals times
    this factor are the per-call cost, exact for the products' FLOPs. Elementwise work and
    bytes are scaled by the products' factor too (off by their share where they are not
    spread over the loops as the products are)."""
    per_call, once = program_flops(hlo)
    return per_call / once if once else 1.0


def per_call(once: float, unrolled: float, trips: int, unroll: int) -> float:
    """One call's count (FLOPs, bytes, seconds) of a program whose single loop runs `trips`
    times, from XLA's counts, which take a loop body once: `once` of the program (the rest +
    one body) and `unrolled` of its twin whose loop body holds `unroll` iterations (the rest +
    `unroll` bodies + `trips % unroll` more, which jax runs after the loop). The result, the
    rest + `trips` bodies, counts the work outside the loop once (`loop_factor` scales it by
    the loop's trips too: a sampler's cast of the parameters to bfloat16, a thousand times).
    Exact for any `trips` >= `unroll` (jax unrolls a single turn without a loop)."""
    if trips < unroll:
        raise ValueError(f"a loop of {trips} trips has no twin with {unroll} per turn")
    body = (unrolled - once) / (unroll + trips % unroll - 1)
    return once + (trips - 1) * body


def cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled (or lowered) program as one dict ({} where the
    backend gives none); a loop body is counted once (`loop_factor`)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {}
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


# ---------------------------------------------------------------------------------------------
# HLO text: array bytes, collectives, the largest values

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BITS = {"pred": 8, "f16": 16, "bf16": 16, "f32": 32, "f64": 64}
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")


def shape_bytes(text: str) -> int:
    """Bytes of every array type in an HLO result type, e.g. '(f32[8,4], bf16[2])' -> 132."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        bits = _BITS[dtype] if dtype in _BITS else int(dtype[1:])
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def replica_groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of one HLO collective (list or iota form); all devices if none."""
    m = _GROUPS_IOTA.search(line)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(shape)).reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    m = _GROUPS_LIST.search(line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m[1])]
    return [list(range(num_devices))]


def collectives(hlo: str, mesh: Any) -> dict[str, Any]:
    """Collectives in a compiled program's HLO: count and result bytes per device, in all, per
    element type and for those whose device groups span several hosts (each op counted once:
    a scan's body once, i.e. per step). Asynchronous pairs count by their '-start' op."""
    owner = [d.process_index for d in mesh.devices.flat]
    out = dict(count=0, bytes=0, cross_host_count=0, cross_host_bytes=0, ops={}, dtypes={})
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z\-]+)\(", line)
        if not m:
            continue
        op = m.group(2).removesuffix("-start")
        if op not in COLLECTIVES or m.group(2).endswith("-done"):
            continue
        size = shape_bytes(m.group(1))
        groups = replica_groups(line, mesh.size)
        cross = any(len({owner[i] for i in g if i < len(owner)}) > 1 for g in groups)
        out["count"] += 1
        out["bytes"] += size
        out["ops"][op] = out["ops"].get(op, 0) + 1
        for dtype, dims in _SHAPE.findall(m.group(1)):
            out["dtypes"][dtype] = out["dtypes"].get(dtype, 0) + shape_bytes(f"{dtype}[{dims}]")
        if cross:
            out["cross_host_count"] += 1
            out["cross_host_bytes"] += size
    return out


def largest_buffers(hlo: str, top: int = 3) -> list[tuple[str, int]]:
    """The `top` largest values (per device) defined in a compiled program's HLO."""
    sizes = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+\[[\d,]*\]\S*|\([^=]*?\)) ", hlo, re.M):
        sizes[m.group(1)] = max(sizes.get(m.group(1), 0), shape_bytes(m.group(2)))
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
