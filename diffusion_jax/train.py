"""Data-parallel training: a pure train step jit-compiled over a device mesh.

The batch is sharded over the mesh's 'data' axis; parameters, their EMA, the optimiser
state and the timestep sampler's loss history are replicated. The old state is donated.
Dropout, timestep and noise keys derive from the step number, and the input pipeline is a
function of the step, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx, struct
from jax.experimental import multihost_utils

from diffusion_jax import (
    checkpoint,
    distributed,
    generation,
    input_pipeline,
    losses,
    models,
    schedules,
    timestep_sampler,
    visualize,
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # nnx.State of the model's nnx.Param variables
    ema_params: Any
    opt_state: Any
    loss_history: timestep_sampler.LossHistory | None
    nonfinite_step: jax.Array  # int32 [], the first step (1-based) whose loss was not finite, or -1


# ---------------------------------------------------------------------------------------------
# Configuration checks: everything that can be wrong is reported before any compilation.


def _positive(config: ml_collections.ConfigDict, fields: tuple[str, ...], strict: bool = True):
    for name in fields:
        section, key = name.split(".")
        value = config[section][key]
        if (value <= 0) if strict else (value < 0):
            bound = "> 0" if strict else ">= 0"
            raise ValueError(f"config.{name}={value!r} must be {bound}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ValueError naming the field for any bad value, before anything is compiled."""
    input_pipeline.validate_dataset_name(config.data.name)
    if config.model.name not in models.MODEL_NAMES:
        raise ValueError(
            f"config.model.name={config.model.name!r}; allowed: {', '.join(models.MODEL_NAMES)}"
        )
    schedules.get_beta_schedule(
        config.diffusion.schedule,
        config.diffusion.num_timesteps,
        config.diffusion.beta_start,
        config.diffusion.beta_end,
    )
    schedules.diffusion_from_config(config.diffusion)  # parameterisation names
    if config.diffusion.loss_type not in losses.LOSS_TYPES:
        raise ValueError(
            f"config.diffusion.loss_type={config.diffusion.loss_type!r}; "
            f"allowed: {', '.join(losses.LOSS_TYPES)}"
        )
    if config.diffusion.timestep_sampler not in timestep_sampler.SAMPLERS:
        raise ValueError(
            f"config.diffusion.timestep_sampler={config.diffusion.timestep_sampler!r}; "
            f"allowed: {', '.join(timestep_sampler.SAMPLERS)}"
        )
    _positive(
        config,
        (
            "training.batch_size",
            "training.num_train_steps",
            "training.learning_rate",
            "training.steps_per_call",
            "training.log_every",
            "training.checkpoint_every",
            "training.keep",
            "diffusion.beta_start",
            "diffusion.beta_end",
        ),
    )
    _positive(
        config,
        (
            "training.warmup_steps",
            "training.grad_clip",
            "training.label_dropout",
            "training.sample_every",
            "model.dropout",
            "diffusion.hybrid_lambda",
        ),
        strict=False,
    )
    if not 0.0 <= config.training.ema_decay < 1.0:
        raise ValueError(
            f"config.training.ema_decay={config.training.ema_decay!r} must be in [0, 1)"
        )
    if not 0.0 <= config.training.label_dropout < 1.0:
        raise ValueError(
            f"config.training.label_dropout={config.training.label_dropout!r} must be in [0, 1)"
        )
    num_devices = num_devices or jax.device_count()
    if config.training.batch_size % num_devices:
        raise ValueError(
            f"config.training.batch_size={config.training.batch_size} is not divisible by the "
            f"{num_devices} devices; use a multiple of {num_devices}"
        )
    abstract_model(config)  # model hyper-parameter checks, shapes only


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    return nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------
# The pure train step


def make_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with linear warmup of the learning rate and global-norm clipping (DDPM §4)."""
    warmup = max(int(training.warmup_steps), 1)
    learning_rate = lambda count: training.learning_rate * jnp.minimum(count / warmup, 1.0)
    parts = [optax.adam(learning_rate)]
    if training.grad_clip > 0:
        parts.insert(0, optax.clip_by_global_norm(training.grad_clip))
    return optax.chain(*parts)


def init_train_state(
    config: ml_collections.ConfigDict,
) -> tuple[nnx.GraphDef, nnx.State, TrainState, optax.GradientTransformation]:
    """Builds the model from `config.seed` and the initial (host-local) train state."""
    model = models.build_model(config, nnx.Rngs(params=config.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config.training)
    history = None
    if config.diffusion.timestep_sampler == "loss_aware":
        history = timestep_sampler.init_loss_history(
            config.diffusion.num_timesteps, config.diffusion.history_per_term
        )
    state = TrainState(
        step=jnp.int32(0),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        loss_history=history,
        nonfinite_step=jnp.int32(-1),
    )
    return graphdef, rest, state, tx


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    apply: Callable[..., jax.Array],
    diffusion: schedules.Diffusion,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch {'image': [B, H, W, C], 'label': [B]}."""
    x_start = batch["image"]
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), state.step)
    key_t, key_noise, key_dropout, key_label = jax.random.split(key, 4)
    t, weights = timestep_sampler.sample_timesteps(
        key_t, x_start.shape[0], diffusion.num_timesteps, state.loss_history
    )
    noise = jax.random.normal(key_noise, x_start.shape, x_start.dtype)
    labels = None
    if config.model.num_classes:
        drop = jax.random.bernoulli(key_label, config.training.label_dropout, batch["label"].shape)
        labels = jnp.where(drop, config.model.num_classes, batch["label"])

    def loss_fn(params):
        model_fn = lambda x_t, tt: apply(params, x_t, tt, labels, key_dropout)
        terms = losses.training_losses(
            diffusion,
            model_fn,
            x_start,
            t,
            noise,
            config.diffusion.loss_type,
            config.diffusion.hybrid_lambda,
        )
        return jnp.mean(terms["loss"] * weights), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = config.training.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    history = state.loss_history
    if history is not None:  # IDDPM importance sampling follows the bound terms L_t
        tracked = terms["vb"] if config.diffusion.loss_type != "mse" else terms["loss"]
        history = timestep_sampler.update_loss_history(history, t, tracked)
    finite = jnp.isfinite(loss)
    nonfinite_step = jnp.where(
        (state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step
    )
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema,
        opt_state=opt_state,
        loss_history=history,
        nonfinite_step=nonfinite_step,
    )
    metrics = {
        "loss": loss,
        "mse": jnp.mean(terms["mse"]),
        "vb": jnp.mean(terms["vb"]),
        "grad_norm": optax.global_norm(grads),
        "learning_rate": config.training.learning_rate
        * jnp.minimum(state.step / max(int(config.training.warmup_steps), 1), 1.0),
    }
    return new_state, metrics


def multi_step(step_fn, state: TrainState, batches: dict[str, jax.Array]):
    """K steps in one compiled call: `batches` leaves are [K, B, ...]; metrics are averaged.

    K > 1 runs a `lax.scan` (the accelerator path). K = 1 calls the step directly: XLA:CPU
    runs convolution gradients inside a loop body about 40x slower than outside one.
    """
    if jax.tree.leaves(batches)[0].shape[0] == 1:
        return step_fn(state, jax.tree.map(lambda x: x[0], batches))
    state, metrics = jax.lax.scan(step_fn, state, batches)
    return state, jax.tree.map(jnp.mean, metrics)


def compile_train_fn(config, apply, diffusion, tx, mesh):
    """The jitted `(state, batches [K, B, ...]) -> (state, metrics)`, state donated."""
    step_fn = functools.partial(train_step, config=config, apply=apply, diffusion=diffusion, tx=tx)
    repl = distributed.replicated(mesh)
    return jax.jit(
        functools.partial(multi_step, step_fn),
        in_shardings=(repl, distributed.batch_sharded(mesh, 1)),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
        compiler_options=distributed.compiler_options(mesh),
    )


# ---------------------------------------------------------------------------------------------
# The loop


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d " if d else "") + (f"{h}h{m:02d}m" if d or h else f"{m}m{s:02d}s")


class _Preemption:
    """Turns SIGTERM (preemption, `kill`) into a flag the loop polls, so it can save first."""

    def __init__(self):
        self.requested = False
        self._previous = None

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir` (local or gs://), resuming from its latest checkpoint."""
    validate_config(config)
    workdir = epath.Path(workdir)
    checkpoint.check_compatible(workdir, config)
    mesh = distributed.make_mesh()
    is_chief = jax.process_index() == 0
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_config(workdir, config)

    graphdef, rest, state, tx = init_train_state(config)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    repl = distributed.replicated(mesh)
    state = jax.device_put(state, repl)
    mngr = checkpoint.manager(
        workdir / "checkpoints", config.training.keep, config.training.keep_every
    )
    latest = mngr.latest_step()
    if latest is not None:
        state = checkpoint.restore(mngr, latest, state)
        print(f"Resumed from {workdir / 'checkpoints'} at step {latest}.", flush=True)
    start_step = int(state.step)
    last_good = latest

    apply = generation.model_apply(graphdef, rest)
    diffusion = schedules.diffusion_from_config(config.diffusion)
    train_fn = compile_train_fn(config, apply, diffusion, tx, mesh)
    preview = None
    if config.training.sample_every:  # every process takes part in the sharded sampler
        preview = generation.make_sampler(
            config, apply, mesh, config.sampling.preview_num, config.sampling.preview_respacing
        )

    total = config.training.num_train_steps
    per_call = config.training.steps_per_call
    data = input_pipeline.create_train_iterator(
        config,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    writer = make_writer(workdir, is_chief)
    if start_step == 0:
        writer.write_hparams(
            {k: v for k, v in _flatten(config).items() if isinstance(v, (int, float, str, bool))}
        )
    print(
        f"Training {config.model.name} ({num_params:,} parameters) on {config.data.name} with "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), global batch "
        f"{config.training.batch_size}, steps {start_step} -> {total}. Workdir: {workdir}",
        flush=True,
    )

    # XLA:CPU (simulated multi-device runs) can deadlock in a collective when many sharded
    # steps are queued at once, so there a step is finished before the next is dispatched.
    throttle = jax.default_backend() == "cpu" and mesh.size > 1
    step, tick, tick_step = start_step, time.perf_counter(), start_step
    input_s = 0.0  # host time spent waiting for batches since the last log line
    with _Preemption() as preemption:
        while step < total:
            k = min(per_call, total - step)
            wait = time.perf_counter()
            local = [next(data) for _ in range(k)]
            input_s += time.perf_counter() - wait
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *local)
            state, metrics = train_fn(state, distributed.global_batch(stacked, mesh, 1))
            if throttle:
                jax.block_until_ready(metrics)
            before, step = step, step + k
            stop = preemption.requested or mngr.reached_preemption(step)
            if crossed(before, step, config.training.log_every) or step == total or stop:
                _check_finite(state, workdir, last_good)
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                rate = (step - tick_step) / max(now - tick, 1e-9)
                scalars["steps_per_sec"] = rate
                scalars["input_wait_frac"] = min(input_s / max(now - tick, 1e-9), 1.0)
                tick, tick_step, input_s = now, step, 0.0
                writer.write_scalars(step, scalars)
                print(
                    f"step {step}/{total} | loss {scalars['loss']:.4f} | "
                    f"{rate:.2f} steps/s | {rate * config.training.batch_size:.0f} img/s | "
                    f"input wait {scalars['input_wait_frac']:.1%} | "
                    f"ETA {_format_eta((total - step) / rate if rate > 0 else math.inf)}",
                    flush=True,
                )
            if preview is not None and (
                crossed(before, step, config.training.sample_every) or step == total
            ):
                _write_preview(config, preview, state, step, workdir, writer, is_chief)
            if crossed(before, step, config.training.checkpoint_every) or step == total or stop:
                _check_finite(state, workdir, last_good)
                start = time.perf_counter()
                checkpoint.save(mngr, step, state)
                blocked = time.perf_counter() - start
                writer.write_scalars(step, {"checkpoint_blocking_s": blocked})
                print(
                    f"checkpoint {step}: the loop paused {blocked:.2f} s "
                    f"({'written in the background' if mngr.is_saving_in_progress() else 'done'})",
                    flush=True,
                )
                last_good = step
            if stop:
                print(f"Stopped at step {step} on request; checkpoint saved.", flush=True)
                break
    mngr.wait_until_finished()
    writer.flush()
    if hasattr(data, "close"):
        data.close()
    return state


class _NoWriter:
    """Stands in for clu's writers where TensorBoard events cannot be written."""

    def write_scalars(self, step, scalars):
        pass

    def write_images(self, step, images):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass


def make_writer(workdir: epath.Path, is_chief: bool):
    """clu's TensorBoard writer into `workdir` on the chief host. clu's writers need
    TensorFlow; without it (e.g. a GPU machine with JAX only) metrics go to stdout alone."""
    if not is_chief:
        return _NoWriter()
    try:
        from clu import metric_writers
    except ImportError:
        print("TensorFlow is not installed: no TensorBoard events (progress goes to stdout).")
        return _NoWriter()
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir)))


def _check_finite(state: TrainState, workdir: epath.Path, last_good: int | None) -> None:
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


def _write_preview(config, preview, state, step, workdir, writer, is_chief) -> None:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)
    labels = generation.default_labels(config, config.sampling.preview_num)
    samples = np.asarray(
        multihost_utils.process_allgather(
            preview(state.ema_params, key, labels)["sample"], tiled=True
        )
    )
    if not is_chief:
        return
    path = workdir / "samples" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if config.data.name == "swissroll":
        visualize.save_scatter(samples, path, reference=input_pipeline.make_swissroll()[:2000])
    else:
        grid = visualize.save_grid(samples, path)
        writer.write_images(step, {"samples": grid[None]})
    print(f"Wrote samples {path}", flush=True)


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
