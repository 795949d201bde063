"""Compile a config's programs for a TPU slice on any host, and report what the TPU compiler
says of them: `python -m diffusion_jax.tools.aot --config configs/cifar10.py --topology v3-8`.

libtpu (`pip install -e ".[tpu]"`) compiles, on a machine without TPUs (`jax.experimental.
topologies`, as MaxText's `train_compile`), the programs a run calls, from ShapeDtypeStructs.

- 'train': `train_step.compile_train_fn` at `training.batch_size` and `training.steps_per_call`
  (a distillation's or consistency run's step through its task, `tasks.for_config`);
- 'preview': the previews' sampler (`tasks.preview_sampler`) at `sampling.preview_num`, with
  the train state that stays on the devices (`build_programs`): its `fits` means it fits
  during training; only when `training.sample_every` > 0;
- 'sample': `generation.make_sampler` at `sampling.batch_size` (the whole chain or solver);
- 'bpd', 'ode_bpd': the evaluation's likelihood programs with the settings of the config's
  first evaluator of that type (`evaluators.settings_of_type`: batch, precision, solver);
- 'inception': the FID Inception forward at the 'fid' evaluator's `batch_size` (image data),
  on one host's devices as the evaluation job runs it.

Per program and per device: argument, temporary, output and code bytes (`memory_analysis`)
and the bytes resident beside the program (the preview's train state) against the chip's
HBM, FLOPs and bytes accessed (`cost_analysis`, times `loop_factor`; for the samplers, whose
work before their loop, casting the parameters to bfloat16, runs once, `per_call` from a twin
compiled with two steps per loop iteration: `loop_counting`), the compiler's
cost-model time per call (`optimal_seconds`, an ESTIMATE, not a measurement), the rate it
implies, the MFU it implies against the chip's bf16 peak, and the collectives. A program that
does not fit exits 1 naming it. Chip facts, memory peak, out-of-memory detection, the loop
correction and the reading of the HLO: `xla_analysis` (shared with the benchmark).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; it needs no accelerator
# a compile-only process shares no chip: libtpu's machine-wide lock must not block it (or others)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from diffusion_jax import input_pipeline
from diffusion_jax.runtime import distributed, errors, paths
from diffusion_jax.sampling import generation, registry
from diffusion_jax.tools import xla_analysis
from diffusion_jax.training import state as state_lib  # noqa: E402
from diffusion_jax.training import tasks

paths.make_configs_importable()
GiB = xla_analysis.GiB

# User-facing slice names (Cloud TPU accelerator types) -> libtpu topology names. v2-v4 and
# v5p count TensorCores in the name, v5e and v6e count chips. Any "vX:AxB[xC]" passes through.
TOPOLOGIES = {
    "v3-8": "v3:2x2",
    "v3-32": "v3:4x4",
    "v3-128": "v3:8x8",
    "v4-8": "v4:2x2x1",
    "v4-16": "v4:2x2x2",
    "v4-32": "v4:2x2x4",
    "v5p-8": "v5p:2x2x1",
    "v5p-32": "v5p:2x2x4",
    "v5e-4": "v5e:2x2",
    "v5e-8": "v5e:2x4",
    "v5e-16": "v5e:4x4",
    "v5e-32": "v5e:4x8",
    "v6e-4": "v6e:2x2",
    "v6e-8": "v6e:2x4",
    "v6e-16": "v6e:4x4",
    "v6e-32": "v6e:4x8",
}


PROGRAMS = ("train", "preview", "sample", "bpd", "ode_bpd", "inception")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user gave it
    topology: str  # libtpu's name, e.g. "v3:2x2"
    devices: tuple  # jax devices of the whole slice (all hosts)
    hbm_bytes: int  # per device
    peak_flops: float  # bf16 per device

    @property
    def processes(self) -> int:
        return len({d.process_index for d in self.devices})

    def mesh(self, local: bool = False) -> Mesh:
        """The run's 1-D 'data' mesh over every device (or process 0's, as the Inception)."""
        devices = [d for d in self.devices if not local or d.process_index == 0]
        return distributed.make_mesh(devices)


def get_topology(name: str) -> Topology:
    """The devices of TPU slice `name` ("v3-8", or libtpu's "v3:2x2"); UserError without
    libtpu or for an unknown name."""
    topology = TOPOLOGIES.get(name, name)
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", topology):
        raise errors.UserError(
            f"unknown TPU topology {name!r}; use one of {', '.join(TOPOLOGIES)} or a libtpu "
            "name such as v3:2x2"
        )
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise errors.UserError(
            'compiling for TPU needs libtpu: pip install -e ".[tpu]" (Linux x86-64)'
        ) from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu's own error for a name it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.UserError(f"libtpu cannot describe topology {topology!r}: {first}") from e
    devices = tuple(desc.devices)
    kind = devices[0].device_kind
    chip = xla_analysis.chip(kind)
    if chip is None or chip.hbm_bytes is None:
        known = ", ".join(k for k in xla_analysis.CHIPS if k.startswith("tpu"))
        raise errors.UserError(f"no chip facts for {kind!r} (topology {topology}); known: {known}")
    chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
    if max(len(devices) // chips, 1) != chip.devices:
        raise errors.UserError(
            f"libtpu lists {len(devices)} devices on the {chips} chips of {topology}; the chip "
            f"table (xla_analysis.CHIPS) has {chip.devices} per {kind} chip"
        )
    return Topology(name, topology, devices, chip.hbm_bytes, chip.peak_flops)


# ---------------------------------------------------------------------------------------------
# The programs, built by the run's own functions


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    fn: Any  # a jax.jit-wrapped function
    args: tuple  # ShapeDtypeStructs with shardings
    units: int  # steps, samples or images per call
    unit: str  # what `units` counts
    mesh: Mesh
    resident: int = 0  # bytes per device on the devices beside it (the preview's train state)
    twin: Any = None  # the same program with TWIN_UNROLL iterations per turn of its loop
    trips: int = 0  # how often its loop turns


TWIN_UNROLL = 2


def _sampler(name: str, make: Callable[[int], Any], trips: int, *rest: Any) -> Program:
    """A sampler's Program (`make(unroll)` builds it) with its unrolled twin."""
    twin = make(TWIN_UNROLL) if trips >= TWIN_UNROLL else None
    return Program(name, make(1), *rest, twin=twin, trips=trips)


def _trips(config: ml_collections.ConfigDict, respacing: str) -> int:
    return registry.build(config, respacing).num_steps


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def device_bytes(tree: Any) -> int:
    """Bytes per device of the arrays (ShapeDtypeStructs with shardings) in `tree`: each
    leaf's shard shape times its item size."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def build_programs(
    config: ml_collections.ConfigDict, topo: Topology, names: tuple[str, ...] = PROGRAMS
) -> list[Program]:
    """The jitted functions a run of `config` calls, with abstract inputs for `topo`.

    'preview' is the sampler a training run builds for its first preview (`tasks.
    preview_sampler` after `training.sample_every` steps rounded up to a whole call of
    `training.steps_per_call`; a distillation's is that round's student), drawing
    `sampling.preview_num` samples from the EMA parameters. The run keeps its whole train
    state on the devices meanwhile: the parameters, the Adam moments, the loss history, and
    a distillation's teacher (`state.DistillState`: five parameter-sized copies with the
    EMA). Its `resident` bytes are the train state's per device as the step places it
    (`device_bytes`) less a replicated EMA, its argument (a split one stays; the argument is
    then a gathered copy): the row's peak is the sampler's own plus that state."""
    mesh = topo.mesh()
    repl = distributed.replicated(mesh)
    sharded = distributed.batch_sharded(mesh)
    graphdef, rest, state = state_lib.abstract_train_state(config, mesh, training=True)
    ema = state_lib.abstract_train_state(config, mesh)[2].ema_params  # the samplers' argument
    split = not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.ema_params))
    apply = generation.model_apply(graphdef, rest)
    data_shape = input_pipeline.data_shape(config)
    key = _abstract((2,), np.uint32, repl)
    image = input_pipeline.is_image_data(config)
    task = tasks.for_config(config)
    programs = []
    if "train" in names:
        k, b = int(config.training.steps_per_call), int(config.training.batch_size)
        stacked = distributed.batch_sharded(mesh, 1)
        batches = {
            "image": _abstract((k, b, *data_shape), np.float32, stacked),
            "label": _abstract((k, b), np.int32, stacked),
        }
        fn = task.compile_step(apply, state_lib.make_optimizer(config), mesh)
        programs.append(Program("train", fn, (state, batches), k, "steps", mesh))
    if "preview" in names and int(config.training.sample_every) > 0:
        per_call = int(config.training.steps_per_call)
        step = min(_round_up(config.training.sample_every, per_call), task.total_steps)
        make = lambda unroll: tasks.preview_sampler(task, apply, mesh, step, unroll)
        trips = _trips(task.sampling_config(step), task.preview_respacing)
        b = int(config.sampling.preview_num)
        args = (ema, key, _abstract((b,), np.int32, sharded))
        resident = device_bytes(state) - (0 if split else device_bytes(ema))
        programs.append(_sampler("preview", make, trips, args, b, "samples", mesh, resident))
    if "sample" in names:
        b = int(config.sampling.batch_size)
        respacing = config.sampling.respacing
        make = lambda unroll: generation.make_sampler(
            config, apply, mesh, b, respacing, unroll=unroll
        )
        args = (ema, key, _abstract((b,), np.int32, sharded))
        programs.append(
            _sampler("sample", make, _trips(config, respacing), args, b, "samples", mesh)
        )
    from diffusion_jax.evaluation import bpd, evaluators, ode_bpd

    def eval_args(batch: int) -> tuple[Any, ...]:
        b = _round_up(batch, mesh.size)
        return (
            ema,
            _abstract((b, *data_shape), np.uint8 if image else np.float32, sharded),
            _abstract((b,), np.int32, sharded),
            _abstract((b,), np.float32, sharded),
            key,
        )

    if "bpd" in names:
        s = evaluators.settings_of_type(config, "bpd")
        fn = bpd.make_bpd_fn(config, apply, mesh, precision=s["precision"])
        args = eval_args(s["batch_size"])
        programs.append(Program("bpd", fn, args, args[1].shape[0], "images", mesh))
    if "ode_bpd" in names:
        s = evaluators.settings_of_type(config, "ode_bpd")
        ode = {k: v for k, v in s.items() if k not in ("num_examples", "batch_size")}
        fn = ode_bpd.make_ode_bpd_fn(config, apply, mesh, **ode)
        args = eval_args(s["batch_size"])
        programs.append(Program("ode_bpd", fn, args, args[1].shape[0], "images", mesh))
    if "inception" in names and image:
        from diffusion_jax.metrics import inception

        s = evaluators.settings_of_type(config, "fid")
        local = topo.mesh(local=True)
        b = _round_up(s["batch_size"], local.size)
        fn = inception.make_forward(local, logits_bias=bool(s["is_logits_bias"]))
        params = jax.tree.map(
            lambda s: _abstract(s.shape, s.dtype, distributed.replicated(local)),
            inception.abstract_state(),
        )
        images = _abstract((b, *data_shape[:-1], 3), np.uint8, distributed.batch_sharded(local))
        programs.append(Program("inception", fn, (params, images), b, "images", local))
    return programs


# ---------------------------------------------------------------------------------------------
# What the compiler says


def analyse(program: Program, topo: Topology) -> dict[str, Any]:
    """Compiles `program` and returns its row (see the module doc); UserError when the
    compiler runs out of the device's memory."""
    start = time.perf_counter()
    lowered = program.fn.lower(*program.args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only running out of HBM is the user's to fix
        if not xla_analysis.is_oom(e):
            raise
        text = str(e)
        largest = xla_analysis.largest_buffers(lowered.as_text(dialect="hlo"))
        raise errors.UserError(
            f"{program.name} does not fit {topo.name} ({topo.hbm_bytes / GiB:.1f} GiB HBM per "
            f"device): {' '.join(text.split())[:300]} Largest arrays (global shapes): "
            + ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in largest)
        ) from e
    seconds = time.perf_counter() - start
    mem, cost = xla_analysis.memory_bytes(compiled), xla_analysis.cost(compiled)
    if mem is None:
        raise errors.UserError(f"{program.name}: the compiler gives no memory analysis")
    peak = mem["peak_bytes"] + program.resident
    hlo = compiled.as_text()
    factor = xla_analysis.loop_factor(hlo)  # the cost analysis counts a loop body once
    estimate = estimated_seconds(cost.get("optimal_seconds"), factor)
    count = lambda key: factor * float(cost.get(key, 0.0))
    twin = _twin_cost(program, cost)
    if twin is not None:  # the rest of the program counted once, the loop `trips` times
        count = lambda key: xla_analysis.per_call(
            float(cost.get(key, 0.0)), float(twin[key]), program.trips, TWIN_UNROLL
        )
        if estimate is not None:
            estimate = estimated_seconds(count("optimal_seconds"), 1.0)
    flops = count("flops")
    return {
        "program": program.name,
        "topology": topo.name,
        "devices": program.mesh.size,
        "processes": len({d.process_index for d in program.mesh.devices.flat}),
        "argument_bytes": mem["argument_bytes"],
        "temp_bytes": mem["temp_bytes"],
        "output_bytes": mem["output_bytes"],
        "alias_bytes": mem["alias_bytes"],
        "code_bytes": mem["code_bytes"],
        "resident_bytes": program.resident,
        "peak_bytes": peak,
        "hbm_bytes": topo.hbm_bytes,
        "fits": peak <= topo.hbm_bytes,
        "flops": flops,
        "bytes_accessed": count("bytes accessed"),
        "loop_factor": factor,
        "loop_counting": "twin" if twin is not None else "factor",
        "estimated_seconds": estimate,
        "per_second": program.units / estimate if estimate else None,
        "unit": program.unit,
        "units_per_call": program.units,
        "mfu": flops / estimate / topo.peak_flops if estimate else None,
        "compile_seconds": seconds,
        "collectives": xla_analysis.collectives(hlo, program.mesh),
        "largest_buffers": xla_analysis.largest_buffers(hlo),
    }


def _twin_cost(program: Program, cost: dict[str, float]) -> dict[str, float] | None:
    """The cost analysis of `program`'s unrolled twin, or None (then the loop factor counts):
    no twin, a twin that does not fit, or one whose counts are not each at least the
    program's (the twin adds loop bodies, never removes work)."""
    if program.twin is None:
        return None
    try:
        twin = xla_analysis.cost(program.twin.lower(*program.args).compile())
    except Exception as e:  # noqa: BLE001 - the twin only refines the estimate
        if not xla_analysis.is_oom(e):
            raise
        return None
    keys = ("flops", "bytes accessed", "optimal_seconds")
    ok = all(float(twin.get(k, 0.0)) >= float(cost.get(k, 0.0)) for k in keys)
    return twin if ok else None


def estimated_seconds(optimal_seconds: float | None, factor: float) -> float | None:
    """The compiler's estimate per call: `optimal_seconds` x the loop factor; None (no
    estimate) when libtpu gives none. libtpu 0.0.42.1 answers a negative optimal_seconds for
    v5e, where its cost model has no estimate: that is no estimate, not a negative time."""
    if optimal_seconds is None or not float(optimal_seconds) > 0:
        return None
    return factor * float(optimal_seconds)


# ---------------------------------------------------------------------------------------------
# The command


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'program':<10} {'args':>7} {'temp':>7} {'out':>7} {'code':>6} {'resid.':>7} "
        f"{'peak/HBM':>14} "
        f"{'GFLOP':>9} {'GB acc.':>8} {'est. s/call':>11} {'est. rate':>20} {'est. MFU':>8} "
        f"{'x-host coll.':>14} {'compile':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["collectives"]
        if r["estimated_seconds"] is None:
            estimate = f"{'none':>11} {'none':>10} {r['unit'] + '/s':<9} {'none':>8}"
        else:
            estimate = (
                f"{r['estimated_seconds']:>11.4g} {r['per_second']:>10.4g} "
                f"{r['unit'] + '/s':<9} {r['mfu']:>8.1%}"
            )
        lines.append(
            f"{r['program']:<10} {r['argument_bytes'] / GiB:>6.2f}G {r['temp_bytes'] / GiB:>6.2f}G "
            f"{r['output_bytes'] / GiB:>6.2f}G {r['code_bytes'] / 2**20:>5.1f}M "
            f"{r['resident_bytes'] / GiB:>6.2f}G "
            f"{r['peak_bytes'] / GiB:>6.2f}/{r['hbm_bytes'] / GiB:<4.0f}GiB"
            f"{'' if r['fits'] else '!'} {r['flops'] / 1e9:>9.1f} "
            f"{r['bytes_accessed'] / 1e9:>8.2f} {estimate} "
            f"{c['cross_host_count']:>3} x {c['cross_host_bytes'] / 2**20:>6.1f}M "
            f"{r['compile_seconds']:>7.0f}s"
        )
    return "\n".join(lines)


def run(
    config: ml_collections.ConfigDict,
    topology: str,
    programs: tuple[str, ...] = PROGRAMS,
    json_path: str = "",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Compiles `programs` of `config` for `topology`, prints the table, writes `json_path`;
    UserError for a program that does not fit (after writing the rows of all programs)."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise errors.UserError(f"unknown programs {unknown}; choose from {', '.join(PROGRAMS)}")
    from diffusion_jax.evaluation import evaluators
    from diffusion_jax.training import config_checks

    topo = get_topology(topology)
    config_checks.validate_config(config, "eval", num_devices=len(topo.devices))
    evaluators.check_config(config)
    log(
        f"{topo.name} = {topo.topology}: {len(topo.devices)} devices "
        f"({topo.devices[0].device_kind}) on {topo.processes} host(s), "
        f"{topo.hbm_bytes / GiB:.0f} GiB HBM and {topo.peak_flops / 1e12:.1f} bf16 TFLOP/s "
        "per device. Times, rates and MFU are the TPU compiler's ESTIMATES (optimal_seconds)."
    )
    rows = []
    for program in build_programs(config, topo, programs):
        log(f"compiling {program.name} ...")
        rows.append(analyse(program, topo))
        r = rows[-1]
        log(
            f"  {r['compile_seconds']:.0f} s; {r['peak_bytes'] / GiB:.2f} of "
            f"{r['hbm_bytes'] / GiB:.0f} GiB per device; estimated "
            + (
                f"{r['estimated_seconds']:.4g} s per call"
                if r["estimated_seconds"]
                else "time: none (libtpu's cost model gives none for this chip)"
            )
        )
        if json_path:  # after each program, so that a long run leaves what it finished
            Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    log(format_table(rows))
    too_big = [r for r in rows if not r["fits"]]
    if too_big:
        r = too_big[0]
        largest = ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in r["largest_buffers"])
        state = r["resident_bytes"] / GiB
        raise errors.UserError(
            f"{r['program']} does not fit {r['topology']}: {r['peak_bytes'] / GiB:.2f} GiB per "
            f"device (arguments {r['argument_bytes'] / GiB:.2f}, temporaries "
            f"{r['temp_bytes'] / GiB:.2f}{f', resident train state {state:.2f}' if state else ''}"
            f") > {r['hbm_bytes'] / GiB:.0f} GiB HBM; largest buffers: {largest}"
        )
    return rows


def main(argv: list[str]) -> None:
    from absl import flags

    f = flags.FLAGS
    with errors.reported(f.debug):
        if len(argv) > 1:
            raise errors.UserError(f"unexpected arguments: {argv[1:]}")
        run(f.config, f.topology, tuple(p for p in f.programs if p), f.json)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
    flags.DEFINE_string("topology", "v3-8", f"TPU slice: {', '.join(TOPOLOGIES)}, or vX:AxB.")
    flags.DEFINE_list("programs", list(PROGRAMS), "Programs to compile.")
    flags.DEFINE_string("json", "", "Write the rows to this JSON file.")
    flags.DEFINE_bool("debug", False, "Show the traceback of user errors.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
