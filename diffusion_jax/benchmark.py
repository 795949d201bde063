"""Throughput benchmark: training, sampling, bits/dim evaluation and Inception features.

    python -m diffusion_jax.benchmark [--config configs/cifar10.py] [--only train,sample]
        [--batch 128] [--dtypes float32,bfloat16] [--repeats 5] [--sample_steps 1000]
        [--sample_images 256] [--out result.json] [--peer]
    python -m diffusion_jax.benchmark --compare ours.json peer.json

    # a few minutes on a 2-core CPU:
    python -m diffusion_jax.benchmark --only train,sample --batch 16 --sample_steps 20 \
        --sample_images 16 --repeats 3 --iters 1 --out ours.json

Measures on whatever devices JAX sees, through the code the training and evaluation jobs
run (`train.compile_train_fn`, `generation.make_sampler`, `likelihood.calc_bpd_loop`,
`metrics.inception.make_feature_fn`), compiled with the same XLA options
(`distributed.compiler_options`, recorded in the result):

* train: images/s of the jitted, donated train step at `--batch` and, on accelerators, at
  the largest batch that fits (doubling until the device runs out of memory; `--max_batch`
  caps the search; on CPU the search is off unless `--max_batch` is given), for each compute
  dtype of `--dtypes` (`config.model.dtype`; parameters stay float32). On GPUs JAX
  preallocates 75% of the memory; XLA_PYTHON_CLIENT_MEM_FRACTION=.95 lets the search use
  more;
* sample: seconds for `--sample_images` images x `--sample_steps` ancestral steps (the
  full 1000-step chain by default; a smaller count is a respaced chain, reported as such,
  never extrapolated);
* bpd: images/s of the full-chain variational bound (`--bpd_timesteps` < T respaces it);
* inception: images/s of the FID Inception feature extractor (zero weights: the speed does
  not depend on the values);
* forward (only with `--only forward`): one forward pass of the training batch;
* input (only with `--only input`): images/s this host's training input pipeline
  (`input_pipeline.create_train_iterator` for `config.data`, prefetch thread included)
  delivers to the devices at `--batch`, as the training loop consumes it: next batch, then
  `distributed.global_batch`. It needs the dataset (say what is missing otherwise) and
  imports TensorFlow only for streamed datasets;
* checkpoint (only with `--only checkpoint`): seconds the training loop is paused by an
  asynchronous orbax save of the float32 train state (`checkpoint.save`), and seconds until
  the save is on disk (`--checkpoint_dir`, default the system's temporary folder).

Each timing compiles first, warms up (`--warmup` calls), synchronises with
`block_until_ready` before reading the clock and reports the median of `--repeats`. FLOPs
come from XLA's cost analysis of the compiled program, per device (sampling and bpd: the
forward pass's FLOPs x images x steps, as the analysis counts a loop body once). XLA counts
only the non-padding taps of a convolution, so its forward count of the CIFAR-10 model is
0.964 x the 12.1 GFLOP of REFERENCE.md §3 (which counts every tap). Model FLOPs utilisation
(MFU) divides the achieved FLOP/s by the device's dense bf16 peak from `PEAK_TFLOPS` (n/a
where unknown, e.g. CPU). Each train row also records how many state buffers the compiled
step aliases to its outputs (donation) and the host time to dispatch a step. Each row of a
compiled program records XLA's memory analysis of it per device (`memory`: arguments,
outputs, donated aliases, temporaries; `peak GB` in the table); `--profile DIR`
adds a `jax.profiler` trace of one train step per train row. Results go to
`--out` as JSON and are printed as a table; `launch/benchmark_peer.py` writes the same
format for the PyTorch peer, `--compare` prints two results side by side and `--peer` runs
the peer right after us and compares.

TensorFlow is never imported except by the input task on a streamed dataset (the others use
synthetic data on the device).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "cifar10.py"
TASKS = ("train", "sample", "bpd", "inception")
EXTRA_TASKS = ("forward", "input", "checkpoint")  # run only when asked for with --only
# REFERENCE.md §3: forward cost of the CIFAR-10 U-Net per 32x32 image (multiply-add = 2).
REFERENCE_FORWARD_GFLOP = 12.1
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


# --------------------------------------------------------------------------------------------
# Environment


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


# --------------------------------------------------------------------------------------------
# Measurement helpers


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


# --------------------------------------------------------------------------------------------
# The benchmark


@dataclasses.dataclass
class Options:
    """What to measure and how; 0 means "the default described in the field comment"."""

    only: tuple[str, ...] = TASKS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    batch: int = 0  # 0: config.training.batch_size
    max_batch: int = 0  # cap of the doubling search; 0: 65536 on accelerators, off on CPU
    warmup: int = 1
    repeats: int = 5
    iters: int = 0  # train steps per timed repeat; 0: enough for about 1 s
    sample_images: int = 256
    sample_steps: int = 0  # 0: the full chain (config.diffusion.num_timesteps)
    sample_repeats: int = 3
    bpd_batch: int = 0  # 0: config.eval.batch_size
    bpd_timesteps: int = 0  # 0: the full chain
    inception_batch: int = 0  # 0: config.eval.batch_size
    inception_size: int = 299
    forward_flops: bool = True  # measure the forward GFLOP/image vs REFERENCE.md
    num_devices: int = 0  # use the first N devices (single process); 0: all
    init: str = "model"  # "model": the real initialiser; "host": same laws, drawn on the host
    checkpoint_dir: str = ""  # where the checkpoint task writes (a temporary folder inside)
    profile: str = ""  # if set, a jax.profiler trace of one train step per row goes here


def host_state(abstract: Any, seed: int = 0) -> Any:
    """A train state of `abstract`'s structure drawn on the host in well under a second.

    Parameters (and their EMA copy) follow the laws of the model's initialisers: kernels
    uniform with variance 1 / fan_avg (variance scaling, scale 1 for every layer), embeddings
    standard normal, norm scales 1, biases 0; the optimiser state and the other fields are
    0 (`nonfinite_step` -1). Timings do not depend on the values; `--init model` runs the
    real initialiser instead, whose compilation takes 12-20 s on a 2-core CPU (every
    distinct parameter shape compiles its own threefry kernel).
    """
    import jax

    rng = np.random.default_rng(seed)
    cache: dict[str, np.ndarray] = {}

    def fill(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        field = keys[0]
        name = next((k for k in reversed(keys) if isinstance(k, str) and k != "value"), "")
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if field == "nonfinite_step":
            return np.full(shape, -1, dtype)
        if field not in ("params", "ema_params"):
            return np.zeros(shape, dtype)
        ident = jax.tree_util.keystr(tuple(path[1:]))
        if ident not in cache:  # ema_params starts equal to params
            if name == "kernel" and len(shape) >= 2:
                receptive = math.prod(shape[:-2])
                fan_avg = receptive * (shape[-2] + shape[-1]) / 2
                limit = math.sqrt(3.0 / fan_avg)
                value = rng.uniform(-limit, limit, shape)
            elif name == "embedding":
                value = rng.standard_normal(shape)
            elif name == "scale":
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            cache[ident] = value.astype(dtype)
            return cache[ident]
        return cache[ident].copy()  # separate buffers: the state is donated

    return jax.tree_util.tree_map_with_path(fill, abstract)


def is_reference_model(config: Any) -> bool:
    """True for the CIFAR-10 U-Net whose forward cost REFERENCE.md §3 gives."""
    m = config.model
    return (
        m.name == "unet"
        and int(m.ch) == 128
        and tuple(m.ch_mult) == (1, 2, 2, 2)
        and int(m.num_res_blocks) == 2
        and tuple(m.attn_resolutions) == (16,)
        and int(config.data.image_size) == 32
        and int(config.data.channels) == 3
    )


class Benchmark:
    """Runs the selected measurements for one config; `run()` returns the JSON result."""

    def __init__(self, config: Any, options: Options, log: Callable[[str], None] = print):
        import jax

        from diffusion_jax import distributed

        unknown = set(options.only) - set(TASKS + EXTRA_TASKS)
        if unknown:
            allowed = ", ".join(TASKS + EXTRA_TASKS)
            raise ValueError(f"--only: unknown task(s) {sorted(unknown)}; allowed: {allowed}")
        self.config = config
        self.opts = options
        self.log = log
        if options.num_devices and jax.process_count() > 1:
            raise ValueError("num_devices applies to single-process runs only")
        devices = jax.devices()[: options.num_devices or None]
        self.mesh = distributed.make_mesh(devices)
        self.n_dev = len(devices)
        self.device = jax_device_info(self.n_dev)
        self.peak = self.device["peak_tflops_per_device"]
        self.on_cpu = self.device["platform"] == "cpu"
        self._state = None
        self._tx = None
        self.results: list[dict[str, Any]] = []
        self.checks: dict[str, Any] = {}

    # -- model and state --------------------------------------------------------------------

    def config_for(self, dtype: str, batch: int | None = None) -> Any:
        cfg = self.config.copy_and_resolve_references()
        cfg.model.dtype = dtype
        if batch is not None:
            cfg.training.batch_size = batch
        return cfg

    def state(self):
        """The float32 train state, shared by every dtype (the parameters do not depend on
        the compute dtype); rebuilt if a failed run consumed it. See `Options.init`."""
        import jax

        from diffusion_jax import distributed, train

        if self._state is None or any(x.is_deleted() for x in jax.tree.leaves(self._state)):
            start = time.perf_counter()
            cfg = self.config_for("float32")
            repl = distributed.replicated(self.mesh)
            self._tx = train.make_optimizer(cfg.training)
            if self.opts.init == "model":
                state = jax.jit(lambda: train.init_train_state(cfg)[2], out_shardings=repl)()
            elif self.opts.init == "host":
                abstract = jax.eval_shape(lambda: train.init_train_state(cfg)[2])
                state = jax.device_put(host_state(abstract, cfg.seed), repl)
            else:
                raise ValueError(f"init={self.opts.init!r}; allowed: model, host")
            self._state = jax.block_until_ready(state)
            self.checks["init_s"] = round(time.perf_counter() - start, 2)
            self.log(f"init ({self.opts.init}): {self.checks['init_s']:.1f} s")
        return self._state

    def apply_for(self, dtype: str):
        from flax import nnx

        from diffusion_jax import generation, train

        graphdef, _, rest = nnx.split(train.abstract_model(self.config_for(dtype)), nnx.Param, ...)
        return generation.model_apply(graphdef, rest)

    def _sharded_images(
        self, batch: int, leading: int = 0, uint8: bool = False, channels: int | None = None
    ):
        """Random global arrays {'image', 'label'} of `batch` images (`channels`, default the
        data's) sharded over the mesh (each process supplies its share, as the input pipeline
        does)."""
        import jax

        from diffusion_jax import distributed

        data = self.config.data
        local = batch // jax.process_count()
        shape = (1,) * leading + (
            local,
            data.image_size,
            data.image_size,
            channels or data.channels,
        )
        rng = np.random.default_rng(0)
        if uint8:
            x = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            x = rng.uniform(-1, 1, shape).astype(np.float32)
        labels = np.zeros(shape[: leading + 1], np.int32)
        return distributed.global_batch({"image": x, "label": labels}, self.mesh, leading)

    def _check_batch(self, batch: int, what: str) -> None:
        if batch <= 0 or batch % self.n_dev:
            raise ValueError(f"{what}={batch} must be a positive multiple of {self.n_dev} devices")

    def _compile_and_time(self, fn, args: tuple, repeats: int) -> tuple[Any, dict[str, Any]]:
        """(compiled fn, the `row` fields of timing `fn(*args)`: median and all seconds,
        compile seconds, device peak and XLA's memory analysis)."""
        import jax

        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        run = lambda: jax.block_until_ready(compiled(*args))
        seconds, times = median_time(run, warmup=self.opts.warmup, repeats=repeats)
        timing = dict(
            seconds=seconds,
            seconds_all=times,
            compile_s=round(compile_s, 2),
            peak=self.peak,
            memory=compiled_memory(compiled),
        )
        return compiled, timing

    def _add(self, result: dict[str, Any]) -> None:
        self.log(format_row(result))
        self.results.append(result)

    # -- forward FLOPs ----------------------------------------------------------------------

    def forward_flops(self, dtype: str = "float32", batch: int = 8) -> float | None:
        """XLA's FLOPs of one forward pass per image (no compile: the lowered module)."""
        import jax
        import jax.numpy as jnp

        batch = max(batch // self.n_dev, 1) * self.n_dev
        apply = self.apply_for(dtype)
        params = self.state().params
        x = self._sharded_images(batch)["image"]
        t = jnp.zeros((batch,), jnp.int32)
        lowered = jax.jit(lambda p, x, t: apply(p, x, t)).lower(params, x, t)
        flops = compiled_flops(lowered)
        if flops is None:
            flops = compiled_flops(lowered.compile())
        return None if flops is None else flops / batch

    # -- train ------------------------------------------------------------------------------

    def compile_train(self, dtype: str, batch: int):
        """(compiled train step, a [1, batch, ...] sharded batch, compile seconds)."""
        from diffusion_jax import schedules, train

        cfg = self.config_for(dtype, batch)
        diffusion = schedules.diffusion_from_config(cfg.diffusion)
        state = self.state()
        fn = train.compile_train_fn(cfg, self.apply_for(dtype), diffusion, self._tx, self.mesh)
        data = self._sharded_images(batch, leading=1)
        start = time.perf_counter()
        compiled = fn.lower(state, data).compile()
        return compiled, data, time.perf_counter() - start

    def _time_train(self, compiled, data, batch: int, dtype: str, task: str, compile_s: float):
        import jax

        holder = {"state": self.state()}

        def steps(n: int) -> float:
            """n steps dispatched back to back, one sync at the end; returns the time until
            the last dispatch returned (the host never waits for the device in between)."""
            start = time.perf_counter()
            state, metrics = holder["state"], None
            for _ in range(n):
                state, metrics = compiled(state, data)
            dispatched = time.perf_counter() - start
            holder["state"] = state
            self._state = state
            jax.block_until_ready((state, metrics))
            return dispatched

        start = time.perf_counter()
        steps(1)  # first run: allocations, autotuning
        first = time.perf_counter() - start
        iters = self.opts.iters or max(1, math.ceil(1.0 / max(first, 1e-6)))
        for _ in range(max(self.opts.warmup - 1, 0)):
            steps(iters)
        times, dispatch = [], []
        for _ in range(max(self.opts.repeats, 1)):
            start = time.perf_counter()
            dispatch.append(steps(iters))
            times.append((time.perf_counter() - start) / iters)
        seconds = statistics.median(times)
        if self.opts.profile:
            folder = Path(self.opts.profile) / f"{task}_{dtype}_batch{batch}"
            with jax.profiler.trace(str(folder), create_perfetto_trace=True):
                steps(1)
            self.log(f"{task} {dtype}: profile of one step in {folder} (TensorBoard, Perfetto)")
        flops = compiled_flops(compiled)
        leaves = len(jax.tree.leaves(self._state))
        aliased = donated_aliases(compiled)
        result = row(
            task,
            dtype,
            batch,
            seconds=seconds,
            seconds_all=times,
            images=batch,
            flops=flops,
            peak=self.peak,
            compile_s=round(compile_s, 2),
            iters=iters,
            dispatch_s_per_step=statistics.median(dispatch) / iters,
            donated=f"{aliased}/{leaves}",
            memory=compiled_memory(compiled),
            flops_per_image=flops * self.n_dev / batch if flops else None,
        )
        return result

    def train(self, dtype: str) -> None:
        import jax

        batch = self.opts.batch or int(self.config.training.batch_size)
        self._check_batch(batch, "--batch")
        compiled, data, compile_s = self.compile_train(dtype, batch)
        self._add(self._time_train(compiled, data, batch, dtype, "train", compile_s))
        cap = self.opts.max_batch or (0 if self.on_cpu else 65536)
        if cap <= batch:
            return
        best = None
        trial = batch * 2
        while trial <= cap:
            try:
                compiled, data, compile_s = self.compile_train(dtype, trial)
                state, metrics = compiled(self.state(), data)
                self._state = state
                jax.block_until_ready((state, metrics))
            except Exception as error:  # noqa: BLE001 - only OOM ends the search
                if not is_oom(error):
                    raise
                self.log(f"train {dtype}: batch {trial} does not fit ({type(error).__name__})")
                break
            best = (compiled, data, trial, compile_s)
            self.log(f"train {dtype}: batch {trial} fits")
            trial *= 2
        if best is None:
            return
        compiled, data, trial, compile_s = best
        result = self._time_train(compiled, data, trial, dtype, "train_max", compile_s)
        result["note"] = f"largest batch {batch} x 2^k that fit" + (
            f" (search capped at {cap})" if trial * 2 > cap else ""
        )
        self._add(result)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, dtype: str) -> None:
        """One jitted forward pass (no dropout) of the training batch: the unit of sampling."""
        import jax
        import jax.numpy as jnp

        from diffusion_jax import distributed

        batch = self.opts.batch or int(self.config.training.batch_size)
        self._check_batch(batch, "--batch")
        apply = self.apply_for(dtype)
        repl = distributed.replicated(self.mesh)
        sharded = distributed.batch_sharded(self.mesh)
        fn = jax.jit(
            lambda p, x, t: apply(p, x, t),
            in_shardings=(repl, sharded, sharded),
            out_shardings=sharded,
            compiler_options=distributed.compiler_options(self.mesh),
        )
        params = self.state().params
        x = self._sharded_images(batch)["image"]
        t = jax.device_put(jnp.arange(batch, dtype=jnp.int32), sharded)
        compiled, timing = self._compile_and_time(fn, (params, x, t), self.opts.repeats)
        result = row(
            "forward",
            dtype,
            batch,
            images=batch,
            flops=compiled_flops(compiled),
            **timing,
        )
        self._add(result)

    # -- sampling ---------------------------------------------------------------------------

    def sample(self, dtype: str, fwd_flops: float | None) -> None:
        import jax

        from diffusion_jax import generation

        cfg = self.config_for(dtype)
        total = int(cfg.diffusion.num_timesteps)
        steps = self.opts.sample_steps or total
        images = self.opts.sample_images
        self._check_batch(images, "--sample_images")
        if not 0 < steps <= total:
            raise ValueError(f"--sample_steps={steps} must be in [1, {total}]")
        respacing = "" if steps == total else str(steps)
        sampler = generation.make_sampler(cfg, self.apply_for(dtype), self.mesh, images, respacing)
        params = self.state().params
        key = jax.random.PRNGKey(0)
        labels = self._sharded_images(images)["label"]
        compiled, timing = self._compile_and_time(
            sampler, (params, key, labels), self.opts.sample_repeats
        )
        full = steps == total and images >= 256
        note = "full chain" if steps == total else f"respaced chain of {steps} of {total} steps"
        if images < 256:
            note += f", {images} images (not 256)"
        flops = fwd_flops * images * steps / self.n_dev if fwd_flops else None
        result = row(
            "sample",
            dtype,
            images,
            steps=steps,
            images=images,
            flops=flops,
            note=note + ("" if full else " (reduced; not extrapolated)"),
            flops_source="forward cost analysis x images x steps",
            **timing,
        )
        self._add(result)

    # -- bits/dim ---------------------------------------------------------------------------

    def bpd(self, dtype: str, fwd_flops: float | None) -> None:
        import jax

        from diffusion_jax import distributed, generation, likelihood, schedules

        cfg = self.config_for(dtype)
        total = int(cfg.diffusion.num_timesteps)
        steps = self.opts.bpd_timesteps or total
        batch = self.opts.bpd_batch or int(cfg.eval.batch_size)
        self._check_batch(batch, "--bpd_batch")
        diffusion = schedules.diffusion_from_config(
            cfg.diffusion, "" if steps == total else str(steps)
        )
        apply = self.apply_for(dtype)

        def bpd(params, x, key):
            fn = generation.denoise_fn(cfg, apply, params, jax.numpy.zeros(x.shape[:1], "int32"))
            return likelihood.calc_bpd_loop(diffusion, fn, x, key)["total_bpd"]

        repl = distributed.replicated(self.mesh)
        sharded = distributed.batch_sharded(self.mesh)
        fn = jax.jit(
            bpd,
            in_shardings=(repl, sharded, repl),
            out_shardings=sharded,
            compiler_options=distributed.compiler_options(self.mesh),
        )
        params = self.state().params
        x = self._sharded_images(batch)["image"]
        key = jax.random.PRNGKey(0)
        compiled, timing = self._compile_and_time(fn, (params, x, key), self.opts.sample_repeats)
        note = "full chain" if steps == total else f"respaced bound over {steps} of {total} steps"
        result = row(
            "bpd",
            dtype,
            batch,
            steps=steps,
            images=batch,
            flops=fwd_flops * batch * steps / self.n_dev if fwd_flops else None,
            note=note + ("" if steps == total else " (reduced; not extrapolated)"),
            **timing,
        )
        self._add(result)

    # -- inception --------------------------------------------------------------------------

    def inception(self) -> None:
        from flax import nnx

        from diffusion_jax.metrics import inception

        batch = self.opts.inception_batch or int(self.config.eval.batch_size)
        self._check_batch(batch, "--inception_batch")
        zeros = lambda key, shape, dtype=np.float32: np.zeros(shape, dtype)
        params = nnx.state(inception.InceptionV3(nnx.Rngs(0), kernel_init=zeros))
        size = self.opts.inception_size
        feature_fn = inception.make_feature_fn(params, self.mesh, size=size)
        # RGB: the evaluation tiles grey images to 3 channels before Inception
        images = self._sharded_images(batch, uint8=True, channels=3)["image"]
        compiled, timing = self._compile_and_time(
            feature_fn.forward, (feature_fn.params, images), self.opts.repeats
        )
        result = row(
            "inception",
            "float32",
            batch,
            images=batch,
            flops=compiled_flops(compiled),
            note=f"{self.config.data.image_size}px uint8 -> {size}px, pool3 + logits",
            **timing,
        )
        self._add(result)

    # -- input pipeline ---------------------------------------------------------------------

    def input(self) -> None:
        import jax

        from diffusion_jax import distributed, input_pipeline

        batch = self.opts.batch or int(self.config.training.batch_size)
        self._check_batch(batch, "--batch")
        cfg = self.config_for(str(self.config.model.dtype), batch)
        data = None
        try:
            data = input_pipeline.create_train_iterator(
                cfg, process_index=jax.process_index(), process_count=jax.process_count()
            )

            def batches(n: int) -> None:
                for _ in range(n):
                    local = jax.tree.map(lambda x: x[None], next(data))
                    jax.block_until_ready(distributed.global_batch(local, self.mesh, 1))

            start = time.perf_counter()
            batches(1)
            first = time.perf_counter() - start
            start = time.perf_counter()
            batches(5)  # warm-up; sizes the repeats to about 1 s each
            per = (time.perf_counter() - start) / 5
            n = self.opts.iters or max(1, math.ceil(1.0 / max(per, 1e-6)))
            seconds, times = median_time(
                lambda: batches(n), warmup=max(self.opts.warmup - 1, 0), repeats=self.opts.repeats
            )
        except input_pipeline.DatasetUnavailableError as error:
            self.log(f"input: skipped, dataset {cfg.data.name!r} unavailable:\n{error}")
            self.checks["input_unavailable"] = str(error)
            return
        finally:
            if data is not None and hasattr(data, "close"):
                data.close()
        result = row(
            "input",
            "float32",
            batch,
            seconds=seconds / n,
            seconds_all=[t / n for t in times],
            images=batch,
            iters=n,
            first_batch_s=round(first, 3),
            note=(
                f"{cfg.data.name} {cfg.data.image_size}px, prefetch {cfg.data.get('prefetch', 2)}, "
                f"this host's pipeline -> devices"
            ),
        )
        self._add(result)

    # -- checkpoint -------------------------------------------------------------------------

    def checkpoint(self) -> None:
        import tempfile

        import jax

        from diffusion_jax import checkpoint

        state = self.state()
        size = sum(x.nbytes for x in jax.tree.leaves(state))
        blocked, total = [], []
        with tempfile.TemporaryDirectory(dir=self.opts.checkpoint_dir or None) as folder:
            mngr = checkpoint.manager(Path(folder) / "checkpoints", keep=1)
            for i in range(max(self.opts.warmup, 0) + max(self.opts.repeats, 1)):
                start = time.perf_counter()
                checkpoint.save(mngr, i, state)
                returned = time.perf_counter() - start
                mngr.wait_until_finished()
                if i >= self.opts.warmup:
                    blocked.append(returned)
                    total.append(time.perf_counter() - start)
            mngr.close()
        result = row(
            "checkpoint",
            "float32",
            0,
            seconds=statistics.median(blocked),
            seconds_all=blocked,
            images=0,
            written_s=statistics.median(total),
            written_s_all=[round(t, 6) for t in total],
            megabytes=round(size / 2**20, 1),
            note=(
                f"async orbax save of the train state ({size / 2**20:.0f} MB): time = loop pause; "
                f"on disk after {statistics.median(total):.2f} s"
            ),
        )
        result["images_per_s"] = None
        self._add(result)

    # -- all --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Runs the selected tasks; returns the JSON-able result."""
        load_before = host_info()["load_avg"]
        fwd = {}
        needs_model = {"train", "sample", "bpd", "forward"} & set(self.opts.only)
        if needs_model and self.opts.forward_flops:
            for dtype in self.opts.dtypes:
                fwd[dtype] = self.forward_flops(dtype)
            f32 = fwd.get("float32") or next(iter(fwd.values()))
            self.checks["forward_gflop_per_image"] = {k: v and v / 1e9 for k, v in fwd.items()}
            if f32 is None:
                self.log("forward: no FLOP count from this backend")
            else:
                line = f"forward: {f32 / 1e9:.4g} GFLOP/image (XLA cost analysis)"
                if is_reference_model(self.config):
                    ratio = f32 / 1e9 / REFERENCE_FORWARD_GFLOP
                    self.checks["forward_vs_reference"] = ratio
                    line += f"; REFERENCE.md §3: {REFERENCE_FORWARD_GFLOP}, ratio {ratio:.3f}"
                self.log(line)
        for dtype in self.opts.dtypes:
            if "forward" in self.opts.only:
                self.forward(dtype)
            if "train" in self.opts.only:
                self.train(dtype)
            if "sample" in self.opts.only:
                self.sample(dtype, fwd.get(dtype))
            if "bpd" in self.opts.only:
                self.bpd(dtype, fwd.get(dtype))
        if "inception" in self.opts.only:
            self.inception()
        if "input" in self.opts.only:
            self.input()
        if "checkpoint" in self.opts.only:
            self.checkpoint()
        return self.envelope(load_before)

    def envelope(self, load_before: Sequence[float] | None = None) -> dict[str, Any]:
        """The JSON result: device, host, versions, model, options, checks and rows."""
        import jax

        from diffusion_jax import distributed

        host = host_info()
        if load_before is not None:
            host["load_avg_before"] = list(load_before)
        model = self.config.model
        return {
            "implementation": "diffusion_jax",
            "device": self.device,
            "host": host,
            "versions": {
                "jax": jax.__version__,
                **package_versions(["jaxlib", "flax", "optax", "numpy"]),
            },
            "model": {
                "name": model.name,
                "ch": model.ch,
                "ch_mult": list(model.ch_mult),
                "image_size": self.config.data.image_size,
                "dropout": model.dropout,
            },
            "options": dataclasses.asdict(self.opts),
            "compiler_options": distributed.compiler_options(self.mesh),
            "checks": self.checks,
            "results": self.results,
        }


def run_benchmark(config: Any, options: Options, log: Callable[[str], None] = print) -> dict:
    """Measures `config` (an ml_collections ConfigDict) as `options` says; see the module."""
    return Benchmark(config, options, log).run()


# --------------------------------------------------------------------------------------------
# Output


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
                f" (REFERENCE.md §3: {REFERENCE_FORWARD_GFLOP}; ratio "
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


# --------------------------------------------------------------------------------------------
# Command line


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "ml_collections config file.")
    d = Options()
    flags.DEFINE_list("only", list(TASKS), f"Tasks to run, from {','.join(TASKS + EXTRA_TASKS)}.")
    flags.DEFINE_list("dtypes", list(d.dtypes), "Compute dtypes (config.model.dtype) to measure.")
    flags.DEFINE_integer("batch", d.batch, "Train global batch; 0 = config.training.batch_size.")
    flags.DEFINE_integer("max_batch", d.max_batch, "Cap of the largest-batch search (0 = auto).")
    flags.DEFINE_integer("warmup", d.warmup, "Untimed calls before timing.")
    flags.DEFINE_integer("repeats", d.repeats, "Timed repeats (train, inception); median kept.")
    flags.DEFINE_integer("iters", d.iters, "Train steps per repeat; 0 = about 1 s worth.")
    flags.DEFINE_integer("sample_images", d.sample_images, "Images per sampling call.")
    flags.DEFINE_integer("sample_steps", d.sample_steps, "Sampling steps; 0 = full chain.")
    flags.DEFINE_integer("sample_repeats", d.sample_repeats, "Timed repeats of sample and bpd.")
    flags.DEFINE_integer("bpd_batch", d.bpd_batch, "Bits/dim batch; 0 = config.eval.batch_size.")
    flags.DEFINE_integer("bpd_timesteps", d.bpd_timesteps, "Bits/dim chain length; 0 = full.")
    flags.DEFINE_integer("inception_batch", d.inception_batch, "0 = config.eval.batch_size.")
    flags.DEFINE_integer("inception_size", d.inception_size, "Inception input side.")
    flags.DEFINE_integer("num_devices", d.num_devices, "Use the first N devices; 0 = all.")
    flags.DEFINE_enum("init", d.init, ["model", "host"], "Parameter init (see host_state).")
    flags.DEFINE_string("checkpoint_dir", d.checkpoint_dir, "Checkpoint task folder (local).")
    flags.DEFINE_string("profile", d.profile, "Trace one train step per train row into this dir.")
    flags.DEFINE_string("out", "", "Write the JSON result here.")
    flags.DEFINE_list("compare", [], "Print result files side by side (ours first) and exit.")
    flags.DEFINE_bool("peer", False, "Also run launch/benchmark_peer.py and compare.")
    flags.DEFINE_list("peer_args", [], "Extra arguments for the peer, e.g. --compile.")


def _run_peer(opts: Options, batch: int, out: str) -> dict[str, Any] | None:
    """Runs the PyTorch peer with matching settings in a subprocess (after our run, so the
    two never compete for the device)."""
    from absl import flags

    tasks = [t for t in opts.only if t in ("train", "sample", "forward")]
    if not tasks:
        return None
    cmd = [
        sys.executable,
        str(REPO_ROOT / "launch" / "benchmark_peer.py"),
        f"--only={','.join(tasks)}",
        f"--dtypes={','.join(opts.dtypes)}",
        f"--batch={batch}",
        f"--max_batch={opts.max_batch}",
        f"--warmup={opts.warmup}",
        f"--repeats={opts.repeats}",
        f"--iters={opts.iters}",
        f"--sample_images={opts.sample_images}",
        f"--sample_steps={opts.sample_steps}",
        f"--sample_repeats={opts.sample_repeats}",
        f"--out={out}",
        *flags.FLAGS.peer_args,
    ]
    print("peer:", " ".join(cmd), flush=True)
    if subprocess.run(cmd, check=False).returncode:
        print("peer benchmark failed (is torch + diffusers installed?)", flush=True)
        return None
    return load_result(out)


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    from diffusion_jax import distributed

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if FLAGS.compare:
        paths = list(FLAGS.compare) + list(argv[1:])
        if len(paths) != 2:
            raise SystemExit(f"--compare needs two result files, got {paths}")
        print(format_comparison(load_result(paths[0]), load_result(paths[1])))
        return
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    distributed.maybe_initialize_distributed()
    opts = Options(
        only=tuple(FLAGS.only),
        dtypes=tuple(FLAGS.dtypes) or (str(FLAGS.config.model.dtype),),
        batch=FLAGS.batch,
        max_batch=FLAGS.max_batch,
        warmup=FLAGS.warmup,
        repeats=FLAGS.repeats,
        iters=FLAGS.iters,
        sample_images=FLAGS.sample_images,
        sample_steps=FLAGS.sample_steps,
        sample_repeats=FLAGS.sample_repeats,
        bpd_batch=FLAGS.bpd_batch,
        bpd_timesteps=FLAGS.bpd_timesteps,
        inception_batch=FLAGS.inception_batch,
        inception_size=FLAGS.inception_size,
        num_devices=FLAGS.num_devices,
        init=FLAGS.init,
        checkpoint_dir=FLAGS.checkpoint_dir,
        profile=FLAGS.profile,
    )
    log = lambda s: print(s, flush=True)
    result = run_benchmark(FLAGS.config, opts, log)
    if FLAGS.out:
        write_result(result, FLAGS.out)
    print(format_table(result), flush=True)
    if FLAGS.peer:
        peer_out = (FLAGS.out or "benchmark.json").removesuffix(".json") + "_peer.json"
        batch = opts.batch or int(FLAGS.config.training.batch_size)
        peer = _run_peer(opts, batch, peer_out)
        if peer is not None:
            print(format_comparison(result, peer), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(REPO_ROOT))  # config files import `configs.base`
    from absl import app

    _define_flags()
    app.run(main)
