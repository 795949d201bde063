"""What the training loop runs: a task. The loop (`train.py`) is the same for every task; a
task says how long the run is, where its calls must end, how a fresh run starts, its compiled
step, and what its previews and final samples draw with.

- `Training` (`--mode train`): DDPM training, `training.num_train_steps` updates of
  `train_step.train_step`.
- `Distillation` (`--mode distill`, a config that names a teacher): progressive distillation
  (`distill.py`), rounds of `distill.steps_per_round` updates; each round's last student is
  saved and kept.
- `Consistency` (`--mode consistency`, a config naming `consistency.method`): consistency
  distillation or tuning (`consistency_step.py`); each stage's last student is saved and kept.

`for_config` is the one place that tells them apart.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from diffusion_jax.diffusion import process
from diffusion_jax.sampling import generation
from diffusion_jax.training import checkpoint, consistency_step, distill, train_step
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import teacher as teacher_lib

Sampler = Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]
StepFn = Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Training:
    """DDPM training of `config` (Ho et al. 2020, Algorithm 1)."""

    config: ml_collections.ConfigDict
    verb = "Training"
    mode = "train"
    boundary = 0  # no call must end at a given step
    teacher = ""  # the config section naming the trained model the run starts from ('': none)

    @property
    def total_steps(self) -> int:
        return int(self.config.training.num_train_steps)

    def prepare(self, workdir: epath.Path) -> None:
        """Checks before anything is written to `workdir`: a fresh run from a teacher checks
        it; a resumed one holds what it needs in its own checkpoint (a distillation round's or
        a consistency distillation's teacher) and does not read the teacher's workdir."""
        if self.teacher and not checkpoint.checkpoint_steps(workdir):
            teacher_lib.teacher_config(self.config, self.teacher)

    def first_state(self, state: Any, tx: optax.GradientTransformation, mesh: Mesh) -> Any:
        """The state of a fresh run (no checkpoint yet): the initialised one, or the teacher's
        (`teacher.start_from_teacher`)."""
        if not self.teacher:
            return state
        return teacher_lib.start_from_teacher(self.config, self.teacher, state, tx, mesh)

    def compile_step(self, apply: Callable[..., jax.Array], tx, mesh: Mesh) -> StepFn:
        diffusion = process.from_config(self.config.diffusion)
        return train_step.compile_train_fn(self.config, apply, diffusion, tx, mesh)

    def sampling_config(self, step: int) -> ml_collections.ConfigDict:
        """The config the model after `step` updates samples with."""
        return self.config

    @property
    def preview_respacing(self) -> str:
        return self.config.sampling.preview_respacing

    def announce(self, step: int) -> str | None:
        """A line for the part of the run that starts after `step` updates (None: none)."""
        return None


@dataclasses.dataclass(frozen=True)
class Distillation(Training):
    """Progressive distillation of the teacher `config.distill.teacher_workdir` names
    (Salimans & Ho 2022, Algorithm 2; `distill.py`)."""

    verb = "Distilling"
    mode = "distill"
    teacher = "distill"

    @property
    def plan(self) -> distill.Plan:
        return distill.plan(self.config)

    @property
    def boundary(self) -> int:  # a round's last student is saved and kept (`keep_period`)
        return self.plan.steps_per_round

    @property
    def total_steps(self) -> int:
        return distill.final_step(self.config)

    def compile_step(self, apply: Callable[..., jax.Array], tx, mesh: Mesh) -> StepFn:
        step = functools.partial(
            distill.distill_step, config=self.config, apply=apply, tx=tx, rounds=self.plan
        )
        return train_step.compile_steps(step, self.config, mesh)

    def sampling_config(self, step: int) -> ml_collections.ConfigDict:
        """A copy sampling with the steps of the student after `step` updates, on its own
        grid."""
        config = self.config.copy_and_resolve_references()
        config.sampling.num_steps = self.plan.student_steps(self.plan.round_of(step))
        return config

    @property
    def preview_respacing(self) -> str:
        return ""  # a student samples on its own grid

    def announce(self, step: int) -> str | None:
        return self.plan.describe(step // self.plan.steps_per_round)


@dataclasses.dataclass(frozen=True)
class Consistency(Training):
    """Consistency distillation or tuning from the teacher `config.consistency.teacher_workdir`
    names (`consistency_step.py`): `training.num_train_steps` updates of one student."""

    verb = "Consistency training"
    mode = "consistency"
    teacher = "consistency"

    def compile_step(self, apply: Callable[..., jax.Array], tx, mesh: Mesh) -> StepFn:
        step = functools.partial(
            consistency_step.consistency_step, config=self.config, apply=apply, tx=tx
        )
        return train_step.compile_steps(step, self.config, mesh)

    @property
    def boundary(self) -> int:  # each stage's last student is saved and kept
        return consistency_step.steps_per_stage(self.config)

    def announce(self, step: int) -> str | None:
        c = self.config.consistency
        stage = int(consistency_step.stage_of(self.config, step))
        what = "the teacher's ODE step" if c.method == "distillation" else "the data alone"
        return (
            f"stage {stage}/{int(c.num_stages) - 1}: consistency {c.method} "
            f"(targets from {what}; gap s - r = s n(s) / {float(c.q):g}^{stage})"
        )


def for_config(config: ml_collections.ConfigDict) -> Training:
    """The task of `config`: a distillation when it names a teacher (`distill`), a consistency
    run when it names a consistency method, else training."""
    if state_lib.distilling(config):
        return Distillation(config)
    if state_lib.consistency_method(config):
        return Consistency(config)
    return Training(config)


def preview_sampler(
    task: Training, apply: Callable[..., jax.Array], mesh: Mesh, step: int, unroll: int = 1
) -> Sampler:
    """The jitted sampler of the training preview after `step` updates: `sampling.
    preview_num` samples from the model of that step (`task.sampling_config`)."""
    return generation.make_sampler(
        task.sampling_config(step),
        apply,
        mesh,
        task.config.sampling.preview_num,
        task.preview_respacing,
        unroll=unroll,
    )
