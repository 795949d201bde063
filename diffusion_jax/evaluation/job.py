"""The evaluation job (`--mode eval`): runs the configured evaluators on every checkpoint of
a workdir exactly once, with the EMA parameters, and records the results.

Each result is one JSON line of `DIR/eval/metrics.jsonl` (the record of what is done, so a
restarted job redoes nothing), TensorBoard scalars and images in `DIR/eval`, and the
evaluators' pictures as `DIR/eval/<picture>_<step>.png`. `eval.once` evaluates the latest
checkpoint and exits; otherwise the job polls every `eval.poll_seconds` and stops once the
checkpoint of the run's last step (`distill.final_step`) is evaluated. Every process takes part in
sampling and bits/dim; files and logs are the chief's (process 0) work.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from diffusion_jax.evaluation import base, evaluators
from diffusion_jax.runtime import distributed, errors, files, logs, visualize
from diffusion_jax.sampling import generation
from diffusion_jax.training import checkpoint, config_checks, distill
from diffusion_jax.training import state as state_lib


def metrics_path(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / "eval" / "metrics.jsonl"


def read_metrics(path: epath.Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _json_safe(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def append_metrics(path: epath.Path, record: dict[str, Any]) -> None:
    """Adds one JSON line; the file is rewritten atomically, so it is never half-written."""
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    line = json.dumps({k: _json_safe(v) for k, v in record.items()}, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, (old + line + "\n").encode())


class Job:
    """The evaluators of `config.eval.evaluators` (instances of `config.evals`), built once
    and run on each checkpoint.

    `evaluator_options` {name: {kwarg: value}} are passed to the evaluators' constructors
    beside their settings, e.g. {'fid': {'feature_fn': fn}} to replace the FID Inception.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | epath.Path,
        evaluator_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.workdir = epath.Path(workdir)
        mesh = distributed.make_mesh()
        graphdef, rest, self.abstract_state = state_lib.abstract_train_state(config, mesh)
        apply = generation.model_apply(graphdef, rest)
        # Likelihoods at precision 'highest' run the network in float32 whatever
        # `model.dtype`, so their value does not depend on the accelerator's bfloat16.
        exact = apply
        if config.model.dtype != "float32":
            f32 = config.copy_and_resolve_references()
            f32.model.dtype = "float32"
            exact = generation.model_apply(*state_lib.abstract_train_state(f32, mesh)[:2])
        self.eval_dir = self.workdir / "eval"
        options = evaluator_options or {}
        self.evaluators = {}
        for name, instance in evaluators.instances(config).items():
            key = name if instance.own_samples else ""
            fn = exact if instance.settings.get("precision") == "highest" else apply
            context = base.Context(name, instance.config, self.workdir, mesh, fn, key)
            evaluator = instance.build(context, **options.get(name, {}))
            self.evaluators[name] = (instance.kind, evaluator)
        self.writer = logs.make_writer(self.eval_dir)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Every evaluator on checkpoint `step`; returns its metrics.jsonl record."""
        start = time.perf_counter()
        if logs.is_chief():
            self.eval_dir.mkdir(parents=True, exist_ok=True)
        # checkpoint.UnreadableCheckpointError (one line, on every process) if it is damaged
        params = checkpoint.restore_step(self.workdir, step, self.abstract_state).ema_params
        record: dict[str, Any] = {"step": int(step)}
        for name, (kind, evaluator) in self.evaluators.items():
            logs.log(f"  {name} ...")
            result = evaluator.run(params, step)
            if name != kind:  # an instance not named after its type: its own names
                result = {f"{name}/{k}" if k != "pictures" else k: v for k, v in result.items()}
                result["pictures"] = {
                    f"{name}_{p}": image for p, image in result.get("pictures", {}).items()
                }
            for picture, image in result.pop("pictures", {}).items():
                visualize.save_png(image, self.eval_dir / f"{picture}_{step:08d}.png")
                self.writer.write_images(step, {picture: image[None]})
            record.update(result)
        record["seconds"] = round(time.perf_counter() - start, 1)
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        scalars = {k: v for k, v in record.items() if k not in ("step", "time")}
        self.writer.write_scalars(
            step, {k: v for k, v in scalars.items() if isinstance(v, int | float)}
        )
        self.writer.flush()
        return record


def format_record(record: dict[str, Any]) -> str:
    """One log line of the headline numbers of a record."""
    parts = [f"step {record['step']}"]
    for key, fmt in (
        ("bpd", ".4f"),
        ("bpd_rate", ".3f"),
        ("bpd_distortion", ".3f"),
        ("ode_bpd", ".4f"),
        ("fid", ".2f"),
        ("is", ".2f"),
        ("digits_fd", ".2f"),
        ("digits_fd_floor", ".2f"),
        ("digits_c2st", ".3f"),
        ("swissroll_energy", ".4f"),
        ("swissroll_energy_floor", ".4f"),
    ):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    return " | ".join(parts) + f" | {record['seconds']:.0f} s"


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str | epath.Path,
    step: int,
    *,
    evaluator_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluates checkpoint `step` of `workdir` (no record is written); see `Job`."""
    return Job(config, workdir, evaluator_options).evaluate(step)


def evaluate_checkpoints(
    config: ml_collections.ConfigDict,
    workdir: str | epath.Path,
    *,
    evaluator_options: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """`--mode eval`: evaluates every not yet evaluated checkpoint of `workdir` once, in step
    order, appending a record to `DIR/eval/metrics.jsonl` after each; returns the new records.

    With `eval.once` only the latest checkpoint (if not done yet); otherwise polls every
    `eval.poll_seconds` until the checkpoint of the run's last step is evaluated.

    An unreadable checkpoint (truncated, corrupt) is reported in one line and recorded as
    `{"step": N, "skipped": "unreadable checkpoint: ..."}`, so neither this job nor a
    restarted one tries it again; `eval.once` then falls back to the newest older one not yet
    done. CheckpointError when no checkpoint of the workdir could be read at all.
    """
    config_checks.validate_config(config, "eval")
    evaluators.check_config(config)
    workdir = epath.Path(workdir)
    if config.eval.once:
        checkpoint.check_workdir_exists(workdir)
    path = metrics_path(workdir)
    records = [r for r in read_metrics(path) if "step" in r]
    done = {int(r["step"]) for r in records}
    evaluated = {int(r["step"]) for r in records if "skipped" not in r}
    job, results, waiting, compatible = None, [], False, False
    while True:
        if not compatible and checkpoint.read_config(workdir) is not None:
            checkpoint.check_compatible(workdir, config)
            compatible = True
        steps = checkpoint.checkpoint_steps(workdir)
        if config.eval.once and not steps:
            raise errors.UserError(
                f"no checkpoint in {checkpoint.checkpoints_dir(workdir)}: train first, or import "
                "released weights with `python -m diffusion_jax.tools.convert --source SRC "
                "--workdir DIR`"
            )
        todo = [s for s in (steps[-1:] if config.eval.once else steps) if s not in done]
        if config.eval.once and not todo:
            logs.log(f"Checkpoint {steps[-1]} is already evaluated ({path}); nothing to do.")
        queue = list(todo)
        while queue:
            step = queue.pop(0)
            if step not in checkpoint.checkpoint_steps(workdir):  # removed by the trainer
                logs.log(f"Checkpoint {step} disappeared before it could be evaluated; skipped.")
                continue
            job = job or Job(config, workdir, evaluator_options)
            logs.log(f"Evaluating checkpoint {step} of {workdir} ...")
            try:
                record = job.evaluate(step)
            except checkpoint.UnreadableCheckpointError as e:
                record = {
                    "step": int(step),
                    "skipped": f"unreadable checkpoint: {e.reason}",
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
                logs.log(
                    f"Checkpoint {step} of {workdir} is unreadable: {e.reason}; recorded as "
                    f"skipped in {path} (not retried)."
                )
                older = [s for s in steps if s < step and s not in done]
                if config.eval.once and older:  # the newest readable one instead
                    queue.append(older[-1])
            else:
                evaluated.add(step)
                logs.log(f"{format_record(record)} -> {path}")
            if logs.is_chief():
                append_metrics(path, record)
            done.add(step)
            results.append(record)
        finished = max(done, default=-1) >= distill.final_step(config)
        if (config.eval.once or finished) and not evaluated and results:
            bad = "; ".join(
                f"step {r['step']}: {r['skipped'].removeprefix('unreadable checkpoint: ')}"
                for r in results
            )
            raise checkpoint.CheckpointError(
                f"no readable checkpoint in {checkpoint.checkpoints_dir(workdir)} ({bad}). "
                f"They are recorded as skipped in {path}: copy intact checkpoints back and "
                "delete their lines there to evaluate them."
            )
        if config.eval.once or finished:
            return results
        if not todo and not waiting:
            missing = "" if workdir.exists() else f" ({workdir} does not exist yet: a typo?)"
            logs.log(
                f"Waiting for new checkpoints in {checkpoint.checkpoints_dir(workdir)}{missing} "
                f"(every {config.eval.poll_seconds} s, until step "
                f"{distill.final_step(config)})."
            )
        waiting = not todo
        time.sleep(float(config.eval.poll_seconds))
