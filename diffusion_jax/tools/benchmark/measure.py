"""The measurements, through the code the training and evaluation jobs run, compiled with the
same XLA options (`distributed.compiler_options`, recorded in the result):

* train: images/s of the jitted, donated train step (`train_step.compile_train_fn`) at `--batch`
  and, on accelerators, at the largest batch that fits (doubling until the device runs out
  of memory; `--max_batch` caps the search; on CPU the search is off unless `--max_batch` is
  given), for each compute dtype of `--dtypes` (`config.model.dtype`; parameters stay
  float32). On GPUs JAX preallocates 75% of the memory; XLA_PYTHON_CLIENT_MEM_FRACTION=.95
  lets the search use more;
* sample: seconds for `--sample_images` images x `--sample_steps` ancestral steps
  (`generation.make_sampler`; the full 1000-step chain by default; a smaller count is a
  respaced chain, reported as such, never extrapolated);
* bpd: images/s of the full-chain variational bound, the evaluation's own bound function
  (`evaluation.bpd.make_bpd_fn`, with cycling class labels for conditional models);
  `--bpd_timesteps` < T measures the bound of a chain of that many steps instead;
* inception: images/s of the FID Inception feature extractor
  (`metrics.inception.make_feature_fn`; zero weights: the speed does not depend on them);
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
come from XLA's cost analysis of the compiled program, per device, times
`xla_analysis.loop_factor` (the analysis counts a loop body once: the sampler's and the
bound's chains), as `aot` counts them. Model FLOPs utilisation (MFU) divides the achieved
FLOP/s by the device's dense bf16 peak (`xla_analysis.CHIPS`, the table `aot` uses; n/a
where unknown, e.g. CPU). Each train row also records how
many state buffers the compiled step aliases to its outputs (donation) and the host time to
dispatch a step; each row of a compiled program records XLA's memory analysis of it per
device; `--profile DIR` adds a `jax.profiler` trace of one train step per train row.

TensorFlow is never imported except by the input task on a streamed dataset (the others use
synthetic data on the device).

One cohesive thing, hence its length: one `Benchmark` whose measurements share the mesh, the
model state and the compiled programs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax import input_pipeline
from diffusion_jax.diffusion import process
from diffusion_jax.evaluation import bpd as bpd_lib
from diffusion_jax.evaluation import evaluators
from diffusion_jax.metrics import inception as inception_lib
from diffusion_jax.runtime import distributed
from diffusion_jax.sampling import generation
from diffusion_jax.tools.benchmark.environment import host_info, jax_device_info, package_versions
from diffusion_jax.tools.benchmark.host_init import host_state
from diffusion_jax.tools.benchmark.options import EXTRA_TASKS, TASKS, Options
from diffusion_jax.tools.benchmark.report import REFERENCE_FORWARD_GFLOP, format_row
from diffusion_jax.tools.benchmark.timing import (
    compiled_flops,
    compiled_memory,
    donated_aliases,
    is_oom,
    median_time,
    row,
)
from diffusion_jax.training import checkpoint as checkpoint_lib
from diffusion_jax.training import state as state_lib


def is_reference_model(config: Any) -> bool:
    """True for the CIFAR-10 U-Net of the DDPM paper, whose published forward cost is
    `report.REFERENCE_FORWARD_GFLOP`."""
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

    def params(self) -> Any:
        """The float32 parameters whole on every device, as the forward, sampling and bits/dim
        programs take them (the train state splits them over the devices under ZeRO-1)."""
        return jax.device_put(self.state().params, distributed.replicated(self.mesh))

    def state(self) -> state_lib.TrainState:
        """The float32 train state, shared by every dtype (the parameters do not depend on
        the compute dtype); rebuilt if a failed run consumed it. See `Options.init`."""
        if self._state is None or any(x.is_deleted() for x in jax.tree.leaves(self._state)):
            start = time.perf_counter()
            cfg = self.config_for("float32")
            placed = state_lib.state_shardings(cfg, self.mesh)  # as the train step takes it
            self._tx = state_lib.make_optimizer(cfg)
            if self.opts.init == "model":
                state = jax.jit(lambda: state_lib.init_train_state(cfg)[2], out_shardings=placed)()
            elif self.opts.init == "host":
                abstract = jax.eval_shape(lambda: state_lib.init_train_state(cfg)[2])
                state = jax.device_put(host_state(abstract, cfg.seed), placed)
            else:
                raise ValueError(f"init={self.opts.init!r}; allowed: model, host")
            self._state = jax.block_until_ready(state)
            self.checks["init_s"] = round(time.perf_counter() - start, 2)
            self.log(f"init ({self.opts.init}): {self.checks['init_s']:.1f} s")
        return self._state

    def apply_for(self, dtype: str) -> Callable[..., jax.Array]:
        model = state_lib.abstract_model(self.config_for(dtype))
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        return generation.model_apply(graphdef, rest)

    def _sharded_images(
        self, batch: int, leading: int = 0, uint8: bool = False, channels: int | None = None
    ) -> dict[str, jax.Array]:
        """Random global arrays {'image', 'label'} of `batch` images (`channels`, default the
        data's) sharded over the mesh (each process supplies its share, as the input pipeline
        does); the labels cycle through the classes (`generation.default_labels`)."""
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
        labels = generation.default_labels(self.config, local, offset=jax.process_index() * local)
        labels = np.asarray(labels).reshape(shape[: leading + 1])
        return distributed.global_batch({"image": x, "label": labels}, self.mesh, leading)

    def _check_batch(self, batch: int, what: str) -> None:
        if batch <= 0 or batch % self.n_dev:
            raise ValueError(f"{what}={batch} must be a positive multiple of {self.n_dev} devices")

    def _compile_and_time(self, fn, args: tuple, repeats: int) -> tuple[Any, dict[str, Any]]:
        """(compiled fn, the `row` fields of timing `fn(*args)`: median and all seconds,
        compile seconds, device peak and XLA's memory analysis)."""
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
        batch = max(batch // self.n_dev, 1) * self.n_dev
        apply = self.apply_for(dtype)
        params = self.params()
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
        from diffusion_jax.training import train_step

        cfg = self.config_for(dtype, batch)
        diffusion = process.from_config(cfg.diffusion)
        state = self.state()
        fn = train_step.compile_train_fn(cfg, self.apply_for(dtype), diffusion, self._tx, self.mesh)
        data = self._sharded_images(batch, leading=1)
        start = time.perf_counter()
        compiled = fn.lower(state, data).compile()
        return compiled, data, time.perf_counter() - start

    def _time_train(self, compiled, data, batch: int, dtype: str, task: str, compile_s: float):
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
        return row(
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

    def train(self, dtype: str) -> None:
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
        params = self.params()
        x = self._sharded_images(batch)["image"]
        t = jax.device_put(jnp.arange(batch, dtype=jnp.int32), sharded)
        compiled, timing = self._compile_and_time(fn, (params, x, t), self.opts.repeats)
        flops = compiled_flops(compiled)
        self._add(row("forward", dtype, batch, images=batch, flops=flops, **timing))

    # -- sampling ---------------------------------------------------------------------------

    def _chain_steps(self, cfg: Any, steps: int, flag: str) -> tuple[int, int]:
        """(T, the chain length asked for by `flag`, 0 meaning T), checked to be in [1, T]."""
        total = int(cfg.diffusion.num_timesteps)
        steps = steps or total
        if not 0 < steps <= total:
            raise ValueError(f"{flag}={steps} must be in [1, {total}]")
        return total, steps

    def sample(self, dtype: str) -> None:
        cfg = self.config_for(dtype)
        total, steps = self._chain_steps(cfg, self.opts.sample_steps, "--sample_steps")
        images = self.opts.sample_images
        self._check_batch(images, "--sample_images")
        respacing = "" if steps == total else str(steps)
        sampler = generation.make_sampler(cfg, self.apply_for(dtype), self.mesh, images, respacing)
        params = self.params()
        key = jax.random.PRNGKey(0)
        labels = self._sharded_images(images)["label"]
        compiled, timing = self._compile_and_time(
            sampler, (params, key, labels), self.opts.sample_repeats
        )
        full = steps == total and images >= 256
        note = "full chain" if steps == total else f"respaced chain of {steps} of {total} steps"
        if images < 256:
            note += f", {images} images (not 256)"
        result = row(
            "sample",
            dtype,
            images,
            steps=steps,
            images=images,
            flops=compiled_flops(compiled),
            note=note + ("" if full else " (reduced; not extrapolated)"),
            flops_source="cost analysis x loop factor (xla_analysis)",
            **timing,
        )
        self._add(result)

    # -- bits/dim ---------------------------------------------------------------------------

    def bpd(self, dtype: str) -> None:
        """The evaluation's bound function on one batch of uint8 images with cycling labels
        (all unmasked). `make_bpd_fn` evaluates the config's whole chain, so a reduced
        `--bpd_timesteps` K is measured as the bound of a K-step chain: K model calls per
        image, what the bound respaced to K steps costs."""
        cfg = self.config_for(dtype)
        total, steps = self._chain_steps(cfg, self.opts.bpd_timesteps, "--bpd_timesteps")
        settings = evaluators.settings_of_type(cfg, "bpd")
        batch = self.opts.bpd_batch or int(settings["batch_size"])
        self._check_batch(batch, "--bpd_batch")
        cfg.diffusion.num_timesteps = steps
        fn = bpd_lib.make_bpd_fn(
            cfg, self.apply_for(dtype), self.mesh, precision=settings["precision"]
        )
        data = self._sharded_images(batch, uint8=True)
        local = batch // jax.process_count()
        mask = distributed.global_batch({"mask": np.ones(local, np.float32)}, self.mesh)["mask"]
        args = (self.params(), data["image"], data["label"], mask, jax.random.PRNGKey(0))
        compiled, timing = self._compile_and_time(fn, args, self.opts.sample_repeats)
        note = "full chain" if steps == total else f"bound of a {steps}-step chain, not {total}"
        result = row(
            "bpd",
            dtype,
            batch,
            steps=steps,
            images=batch,
            flops=compiled_flops(compiled),
            note=note + ("" if steps == total else " (reduced; not extrapolated)"),
            **timing,
        )
        self._add(result)

    # -- inception --------------------------------------------------------------------------

    def inception(self) -> None:
        fid = evaluators.settings_of_type(self.config, "fid")
        batch = self.opts.inception_batch or int(fid["batch_size"])
        self._check_batch(batch, "--inception_batch")
        zeros = lambda key, shape, dtype=np.float32: np.zeros(shape, dtype)
        params = nnx.state(inception_lib.InceptionV3(nnx.Rngs(0), kernel_init=zeros))
        size = self.opts.inception_size
        feature_fn = inception_lib.make_feature_fn(params, self.mesh, size=size)
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
        state = self.state()
        size = sum(x.nbytes for x in jax.tree.leaves(state))
        blocked, total = [], []
        with tempfile.TemporaryDirectory(dir=self.opts.checkpoint_dir or None) as folder:
            mngr = checkpoint_lib.manager(Path(folder) / "checkpoints", keep=1)
            for i in range(max(self.opts.warmup, 0) + max(self.opts.repeats, 1)):
                start = time.perf_counter()
                checkpoint_lib.save(mngr, i, state)
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

    def _log_forward_flops(self) -> dict[str, float | None]:
        """XLA's forward FLOPs per image of each dtype, logged and recorded in the checks."""
        fwd = {dtype: self.forward_flops(dtype) for dtype in self.opts.dtypes}
        f32 = fwd.get("float32") or next(iter(fwd.values()))
        self.checks["forward_gflop_per_image"] = {k: v and v / 1e9 for k, v in fwd.items()}
        if f32 is None:
            self.log("forward: no FLOP count from this backend")
            return fwd
        line = f"forward: {f32 / 1e9:.4g} GFLOP/image (XLA cost analysis)"
        if is_reference_model(self.config):
            ratio = f32 / 1e9 / REFERENCE_FORWARD_GFLOP
            self.checks["forward_vs_reference"] = ratio
            line += f"; published: {REFERENCE_FORWARD_GFLOP}, ratio {ratio:.3f}"
        self.log(line)
        return fwd

    def run(self) -> dict[str, Any]:
        """Runs the selected tasks; returns the JSON-able result."""
        load_before = host_info()["load_avg"]
        only = set(self.opts.only)
        if {"train", "sample", "bpd", "forward"} & only and self.opts.forward_flops:
            self._log_forward_flops()
        for dtype in self.opts.dtypes:
            if "forward" in only:
                self.forward(dtype)
            if "train" in only:
                self.train(dtype)
            if "sample" in only:
                self.sample(dtype)
            if "bpd" in only:
                self.bpd(dtype)
        for task in ("inception", "input", "checkpoint"):
            if task in only:
                getattr(self, task)()
        return self.envelope(load_before)

    def envelope(self, load_before: Sequence[float] | None = None) -> dict[str, Any]:
        """The JSON result: device, host, versions, model, options, checks and rows."""
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
