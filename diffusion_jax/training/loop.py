"""The training loop: the steps of a task (`tasks.py`: training, or progressive distillation)
data-parallel over a device mesh, logs, previews, checkpoints, preemption and the final report.
The loop is the same for every task.

The train step's keys and the input pipeline are functions of the step, so a resumed run
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import signal
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import input_pipeline
from diffusion_jax.metrics import dataset_quality
from diffusion_jax.runtime import distributed, errors, logs, streams, visualize
from diffusion_jax.sampling import generation, registry
from diffusion_jax.training import checkpoint, config_checks, tasks
from diffusion_jax.training import state as state_lib


class NonFiniteLossError(errors.UserError):
    """Training produced a NaN or infinite loss."""


make_writer = logs.make_writer  # the loop's metric writer, looked up here so tests can replace it


# ---------------------------------------------------------------------------------------------
# The loop


class _Preemption:
    """Turns SIGTERM (preemption, `kill`) into a flag the loop polls, so it can save first.

    On a multi-process run the signal may reach one process only, or each at another step;
    `stop_requested` makes every process agree on the same step (any process's flag counts).
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def stop_requested(self, mngr, step: int) -> bool:
        """Whether to save and stop after `step`: the same answer on every process. On more
        than one process this is a collective (a 1-element all-gather), so every process must
        call it after every call of the train step; that is also where a run of several
        processes already waits for the slowest one."""
        local = self.requested or mngr.reached_preemption(step)
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.array([int(local)], np.int32))
        return bool(np.any(flags))

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. a notebook worker)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def crossed(before: int, after: int, every: int) -> bool:
    """True when a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every > before // every


def call_length(step: int, per_call: int, total: int, round_end: int = 0) -> int:
    """The updates of the call after `step`: `per_call`, fewer where `total` or a multiple of
    `round_end` (> 0) comes first, so a distillation's round ends (saved, and kept by
    `keep_period`) fall between calls. A shorter call compiles a second program once."""
    k = min(per_call, total - step)
    return min(k, round_end - step % round_end) if round_end > 0 else k


def train(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
    """Trains `config` in `workdir` (local or gs://), resuming from its newest readable
    checkpoint (an unreadable newer one is reported and moved aside, never deleted). A config
    naming a teacher (`distill.teacher_workdir`, `--mode distill`) distils it instead.

    A SIGTERM from the start on (also during restore and compilation) saves a checkpoint
    after the next step and returns; a checkpoint that cannot be written (e.g. a full disk)
    raises `checkpoint.CheckpointError`, the previous one left intact."""
    with _Preemption() as preemption:
        return _train(config, workdir, preemption)


def _train(config, workdir, preemption: _Preemption) -> state_lib.TrainState:
    task = tasks.for_config(config)
    config_checks.validate_config(config, task.mode)
    workdir = epath.Path(workdir)
    checkpoint.check_compatible(workdir, config)
    task.prepare(workdir)
    mesh = distributed.make_mesh()
    is_chief = jax.process_index() == 0
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_config(workdir, config)

    graphdef, rest, state, tx = state_lib.init_train_state(config)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    shardings = state_lib.state_shardings(config, mesh)
    state = jax.device_put(state, shardings)
    # Checkpoints at the task's boundaries (a distillation's rounds) are written and kept.
    keep_every = task.boundary or config.training.keep_every
    mngr = checkpoint.manager(workdir / "checkpoints", config.training.keep, keep_every)
    latest, state = checkpoint.restore_newest(mngr, state, move_damaged=True)
    if latest is not None:
        print(f"Resumed from {workdir / 'checkpoints'} at step {latest}.", flush=True)
    else:
        state = jax.device_put(task.first_state(state, tx, mesh), shardings)
    start_step = int(state.step)
    last_good = latest
    pending, last_complete = None, latest  # the save being written, the newest complete one

    apply = generation.model_apply(graphdef, rest)
    train_fn = task.compile_step(apply, tx, mesh)
    previews = {}  # by sampler steps: a distillation's students sample with their own

    def preview(step: int):
        n = task.sampling_config(step).sampling.num_steps
        if n not in previews:  # every process takes part in the sharded sampler
            previews[n] = tasks.preview_sampler(task, apply, mesh, step)
        return previews[n]

    total = task.total_steps
    per_call = config.training.steps_per_call
    data = input_pipeline.create_train_iterator(
        config,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    writer = make_writer(workdir, is_chief)
    if start_step == 0:
        writer.write_hparams(logs.hparams(config))
    print(
        f"{task.verb} {config.model.name} ({num_params:,} "
        f"parameters) on {config.data.name} with "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), global batch "
        f"{config.training.batch_size}, steps {start_step} -> {total}. Workdir: {workdir}",
        flush=True,
    )

    # XLA:CPU (simulated multi-device runs) can deadlock in a collective when many sharded
    # steps are queued at once, so there a step is finished before the next is dispatched.
    throttle = jax.default_backend() == "cpu" and mesh.size > 1
    if start_step < total and (line := task.announce(start_step)):
        print(line, flush=True)
    step, progress = start_step, logs.Progress(total, start_step)
    input_s = 0.0  # host time spent waiting for batches since the last log line
    stop = False
    while step < total:
        k = call_length(step, per_call, total, task.boundary)
        wait = time.perf_counter()
        local = [next(data) for _ in range(k)]
        input_s += time.perf_counter() - wait
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *local)
        state, metrics = train_fn(state, distributed.global_batch(stacked, mesh, 1))
        if throttle:
            jax.block_until_ready(metrics)
        before, step = step, step + k
        stop = preemption.stop_requested(mngr, step)
        if crossed(before, step, task.boundary) and step < total and (line := task.announce(step)):
            print(line, flush=True)
        if crossed(before, step, config.training.log_every) or step == total or stop:
            _check_finite(state, workdir, last_good)
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            rate, eta = progress.update(step)
            scalars["steps_per_sec"] = rate
            scalars["input_wait_frac"] = min(input_s / progress.interval, 1.0)
            input_s = 0.0
            writer.write_scalars(step, scalars)
            print(
                f"step {step}/{total} | loss {scalars['loss']:.4f} | "
                f"{rate:.2f} steps/s | {rate * config.training.batch_size:.0f} img/s | "
                f"input wait {scalars['input_wait_frac']:.1%} | ETA {eta}",
                flush=True,
            )
        if config.training.sample_every and (
            crossed(before, step, config.training.sample_every) or step == total
        ):
            ema = jax.device_put(state.ema_params, distributed.replicated(mesh))  # gathered
            _write_preview(config, preview(step), ema, step, workdir, writer, is_chief)
        if (
            crossed(before, step, config.training.checkpoint_every)
            or crossed(before, step, task.boundary)
            or step == total
            or stop
        ):
            _check_finite(state, workdir, last_good)
            start = time.perf_counter()
            # A failure of the previous save's background write surfaces here, named by its
            # step; then this save starts (orbax would wait for the previous one anyway).
            checkpoint.finish_saving(mngr, pending, last_complete)
            last_complete = pending if pending is not None else last_complete
            checkpoint.save(mngr, step, state, last_complete=last_complete)
            pending = step
            blocked = time.perf_counter() - start
            writer.write_scalars(step, {"checkpoint_blocking_s": blocked})
            print(
                f"checkpoint {step}: the loop paused {blocked:.2f} s "
                f"({'written in the background' if mngr.is_saving_in_progress() else 'done'})",
                flush=True,
            )
            last_good = step
        if stop:
            break
    checkpoint.finish_saving(mngr, pending, last_complete)
    if stop:
        print(f"Stopped at step {step} on request; checkpoint saved.", flush=True)
    writer.flush()
    if hasattr(data, "close"):
        data.close()
    if not stop and config.training.final_samples:
        _final_report(task.sampling_config(step), apply, mesh, state, workdir)
    return state


def _final_report(config, apply, mesh, state, workdir: epath.Path) -> None:
    """The end of a run: `training.final_samples` samples from the EMA parameters with the
    configured sampler, their grid (`samples/final.png`), and their quality with its
    real-data floor where the project has a metric for the data."""
    num = -(-int(config.training.final_samples) // jax.device_count()) * jax.device_count()
    draw = generation.make_sampler(config, apply, mesh, num, config.sampling.respacing)
    nfe = registry.build(config).nfe
    logs.log(f"Drawing {num} final samples ({config.sampling.method}, {nfe} NFE each) ...")
    labels = generation.default_labels(config, num)
    ema = jax.device_put(state.ema_params, distributed.replicated(mesh))  # ZeRO-1: gathered
    out = draw(ema, streams.key(config.seed, streams.Stream.FINAL), labels)
    samples = np.asarray(multihost_utils.process_allgather(out["sample"], tiled=True))
    if not logs.is_chief():
        return
    if input_pipeline.is_image_data(config):
        samples = input_pipeline.to_data_levels(samples, int(config.data.levels))
    path = workdir / "samples" / "final.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = samples[: int(config.sampling.grid_num)] if samples.ndim == 4 else samples
    visualize.save_png(visualize.picture(grid, input_pipeline.reference_points(config)), path)
    if config.data.name in dataset_quality.HEADLINE:
        print(f"Sample quality of {num}: {dataset_quality.summary(dataset_quality.score(samples))}")
    print(f"Final samples: {path}\nCheckpoints: {workdir / 'checkpoints'}", flush=True)


def _check_finite(state: state_lib.TrainState, workdir: epath.Path, last_good: int | None) -> None:
    bad = int(state.nonfinite_step)
    if bad >= 0:
        where = (
            f"the last good checkpoint (step {last_good}) in {workdir / 'checkpoints'} is intact"
            if last_good is not None
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"The training loss became non-finite at step {bad}; training stopped and {where}. "
            "Try a lower --config.training.learning_rate or stronger --config.training.grad_clip."
        )


def _write_preview(config, preview, ema, step, workdir, writer, is_chief) -> None:
    """Samples of `preview` from the (replicated) EMA parameters `ema` -> a PNG and TensorBoard."""
    key = streams.key(config.seed, streams.Stream.PREVIEW, step)
    labels = generation.default_labels(config, config.sampling.preview_num)
    samples = np.asarray(
        multihost_utils.process_allgather(preview(ema, key, labels)["sample"], tiled=True)
    )
    if not is_chief:
        return
    path = workdir / "samples" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = visualize.picture(samples, input_pipeline.reference_points(config))
    visualize.save_png(picture, path)
    writer.write_images(step, {"samples": picture[None]})
    print(f"Wrote samples {path}", flush=True)
