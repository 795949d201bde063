"""Progressive distillation: the two-step DDIM target against float64, a student of an exact
Gaussian teacher learns the exact one-step map, a run resumes bit-identically across a round
boundary without its teacher's workdir, every round's last student is kept whatever the
updates per call, and a student's workdir samples and evaluates with its own step count."""

import dataclasses
import json
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    REPO,
    interrupt_then_finish,
    restore_state,
    tiny_mlp_config,
    tree_allclose,
)

from configs import digits_distill, swissroll
from diffusion_jax.diffusion import process
from diffusion_jax.evaluation import job, sample_job
from diffusion_jax.runtime import errors
from diffusion_jax.sampling import registry, run
from diffusion_jax.training import checkpoint, config_checks, distill, loop
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import teacher as teacher_lib


def _config(start_steps=16, end_steps=4, **distill_fields):
    config = digits_distill.get_config()
    config.distill.start_steps = start_steps
    config.distill.end_steps = end_steps
    for k, v in distill_fields.items():
        config.distill[k] = v
    return config


def _log_alpha64(config, t):
    """log(alpha_t) in float64 from the cosine schedule's definition (IDDPM eq. 17, betas
    clipped at 0.999), linear in t between the chain's knots t = k / T."""
    T = config.diffusion.num_timesteps
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    k = np.arange(T + 1) / T
    betas = np.minimum(1 - f(k[1:]) / f(k[:-1]), 0.999)
    knots = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])
    return np.interp(t, k, knots)


def _teacher64(z, t, config):
    """A fixed nonlinear 'v' network and its DDIM quantities in float64: (eps, x0, alpha, sigma)."""
    alpha = np.exp(_log_alpha64(config, t))
    sigma = np.sqrt(1 - alpha**2)
    v = np.sin(3 * z) * (1 + t) - 0.3 * z
    return sigma * z + alpha * v, alpha * z - sigma * v, alpha, sigma


def test_two_step_ddim_target_equals_a_float64_rederivation():
    config = _config()
    start = config.distill.start_steps
    table = {k: jnp.asarray(v, jnp.float32) for k, v in distill.time_table(config).items()}
    rng = np.random.default_rng(0)
    checked = 0
    for d in (2, 4, 8):  # the rounds' student steps: 8, 4, 2
        j = np.arange(d, start + 1, d)
        z = rng.normal(size=(len(j), 4, 4, 1))

        def predict(z, k):
            t = (table["t_model"][k] + 1.0) / config.diffusion.num_timesteps
            v = jnp.sin(3 * z) * (1 + t[:, None, None, None]) - 0.3 * z
            return process.eps_and_x0("v", v, z, table["alpha"][k], table["sigma"][k])

        got = distill.ddim_target(
            jnp.asarray(z, jnp.float32), predict, table, jnp.asarray(j), jnp.asarray(d)
        )
        # float64: two DDIM steps t -> t' -> t'', then the x0 whose one step lands there
        t, t_mid, t_end = (j / start)[:, None, None, None], None, None
        t_mid, t_end = t - d / (2 * start), t - d / start
        eps, x0, a, s = _teacher64(z, t, config)
        a_mid, a_end = np.exp(_log_alpha64(config, t_mid)), np.exp(_log_alpha64(config, t_end))
        s_mid, s_end = np.sqrt(1 - a_mid**2), np.sqrt(1 - a_end**2)
        z_mid = a_mid * x0 + s_mid * eps
        eps2, x02, _, _ = _teacher64(z_mid, t_mid, config)
        z_end = a_end * x02 + s_end * eps2
        want = (z_end - s_end / s * z) / (a_end - s_end / s * a)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
        # the target's one DDIM step from t lands where the teacher's two steps do
        one = a_end * want + s_end * (z - a * want) / s
        np.testing.assert_allclose(one, z_end, atol=1e-9)
        checked += len(j)
    assert checked == 8 + 4 + 2


def test_the_target_matches_two_steps_of_the_sampling_package():
    """Two steps of `ddim` over the trailing grid of 2 S steps (the samplers' own code) from
    t = 1 land where one step with the target x~ does."""
    config = _config(start_steps=8)
    config.sampling.num_steps = 8
    table = {k: jnp.asarray(v, jnp.float32) for k, v in distill.time_table(config).items()}
    fn = lambda z, t: jnp.sin(3 * z) - 0.3 * z + 0.001 * t[:, None, None, None]

    def predict(z, k):
        out = fn(z, table["t_model"][k])
        return process.eps_and_x0("v", out, z, table["alpha"][k], table["sigma"][k])

    z = jax.random.normal(jax.random.PRNGKey(3), (5, 4, 4, 1))
    stepper = registry.build(config)
    two = {k: v[:2] for k, v in stepper.rows.items()}
    short = dataclasses.replace(stepper, rows=two)
    pred = run.make_predict(fn, "v", clip_denoised=False)
    sampled = jax.jit(lambda z: run.sample(short, pred, z.shape, jax.random.PRNGKey(0), x_init=z))
    z_two = sampled(z)["sample"]
    j, d = jnp.full((5,), 8), jnp.asarray(2)  # t = 1 -> 7/8 -> 6/8: the 4-step student's step
    x_tilde = distill.ddim_target(z, predict, table, j, d)
    a, s = float(table["alpha"][8]), float(table["sigma"][8])
    a_end, s_end = float(table["alpha"][6]), float(table["sigma"][6])
    one = a_end * x_tilde + s_end * (z - a * x_tilde) / s
    np.testing.assert_allclose(np.asarray(one), np.asarray(z_two), atol=1e-5)


def test_a_student_of_an_exact_gaussian_teacher_learns_the_exact_one_step_map():
    """Data N(mu, s^2) per dimension; the teacher is the exact v of that distribution (affine in
    z at every time), the student a per-time affine map (the family holds the answer), trained
    by `distill_step` itself. Its one DDIM step then equals two exact teacher steps."""
    config = _config(start_steps=8, end_steps=4, steps_per_round=10_000)
    config.training.learning_rate = 3e-2
    start, T = 8, config.diffusion.num_timesteps
    table64 = distill.time_table(config)
    mu, s2 = np.array([0.5, -0.3, 0.1]), np.array([0.04, 0.25, 0.09])

    def exact_v(t_index):  # v = A z + c with x0 = E[x0 | z] = mu + g (z - a mu)
        if t_index == 0:  # the data (sigma = 0): never an input
            return np.zeros(3), np.zeros(3)
        a, s = table64["alpha"][t_index], table64["sigma"][t_index]
        g = a * s2 / (a**2 * s2 + s**2)
        # x0 = g z + (1 - a g) mu; v = (a z - x0) / s
        return (a - g) / s, -(1 - a * g) * mu / s

    A, c = zip(*(exact_v(j) for j in range(start + 1)), strict=True)
    teacher = {
        "A": jnp.asarray(np.array(A), jnp.float32),
        "c": jnp.asarray(np.array(c), jnp.float32),
    }

    def x0_and_eps(z, k):  # the exact teacher's DDIM quantities, float64
        v = exact_v(k)[0] * z + exact_v(k)[1]
        a, s = table64["alpha"][k], table64["sigma"][k]
        return a * z - s * v, s * z + a * v

    def apply(params, z, t_model, labels, dropout_key):
        j = jnp.round((t_model + 1.0) / T * start).astype(jnp.int32)
        return params["A"][j][:, None, None, :] * z + params["c"][j][:, None, None, :]

    tx = optax.adam(optax.linear_schedule(config.training.learning_rate, 0.0, 10_000))
    rounds = distill.Plan(start, 4, 10_000, fine_tune=False)  # a v teacher: round 0 halves
    state = state_lib.DistillState(
        step=jnp.int32(0),
        params=teacher,
        ema_params=teacher,
        opt_state=tx.init(teacher),
        loss_history=None,
        nonfinite_step=jnp.int32(-1),
        teacher_params=teacher,
    )
    step = jax.jit(
        lambda st, b: distill.distill_step(st, b, config=config, apply=apply, tx=tx, rounds=rounds)
    )
    rng = np.random.default_rng(0)
    for _ in range(1500):
        x0 = mu + np.sqrt(s2) * rng.normal(size=(256, 1, 1, 3))
        state, metrics = step(state, {"image": jnp.asarray(x0, jnp.float32)})
    assert np.isfinite(float(metrics["loss"]))
    # Closed form: the teacher's two exact DDIM steps from z_t are affine in z; so is x~.
    for j in (2, 4, 6, 8):
        z = rng.normal(size=(64, 1, 1, 3))
        a, s = table64["alpha"], table64["sigma"]
        x_mid, e_mid = x0_and_eps(z, j)
        z_mid = a[j - 1] * x_mid + s[j - 1] * e_mid
        x_end, e_end = x0_and_eps(z_mid, j - 1)
        z_end = a[j - 2] * x_end + s[j - 2] * e_end
        t_model = jnp.full((64,), j / start * T - 1.0)
        v = np.asarray(apply(state.params, jnp.asarray(z, jnp.float32), t_model, None, None))
        x_student, e_student = a[j] * z - s[j] * v, s[j] * z + a[j] * v
        one = a[j - 2] * x_student + s[j - 2] * e_student
        np.testing.assert_allclose(one, z_end, atol=3e-3, err_msg=f"t = {j}/{start}")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The swiss roll's small MLP trained for 2 steps (an eps model): a teacher workdir. The
    machinery is the model's; an MLP compiles in seconds where a U-Net takes a minute."""
    workdir = tmp_path_factory.mktemp("teacher")
    config = tiny_mlp_config(training__num_train_steps=2, training__checkpoint_every=2)
    loop.train(config, str(workdir))
    return workdir


# A distillation of `teacher`: round 0 (fine-tune) is updates 1-3, round 1 (4 steps) 4-6.
STUDENT = {
    "model.hidden": 32,
    "model.depth": 2,
    "diffusion.num_timesteps": 20,
    "diffusion.model_output": "v",
    "distill.start_steps": 8,
    "distill.end_steps": 4,
    "distill.steps_per_round": 3,
    "training.batch_size": 16,
    "training.learning_rate": 1e-3,
    "training.warmup_steps": 0,
    "training.ema_decay": 0.0,
    "training.num_train_steps": 0,
    "training.checkpoint_every": 2,
    "training.log_every": 1,
    "training.sample_every": 0,
    "training.final_samples": 0,
    "sampling.method": "ddim",
    "sampling.spacing": "trailing",
    "sampling.num_steps": 4,
    "data.prefetch": 0,
}


def _student_config(teacher, **overrides):
    config = swissroll.get_config()
    for dotted, value in {**STUDENT, **overrides}.items():
        section, key = dotted.split(".")
        config[section][key] = value
    config.distill.teacher_workdir = str(teacher)
    return config


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    """A finished distillation of `teacher`: round 0 (fine-tune) and round 1 (4 steps)."""
    workdir = tmp_path_factory.mktemp("student")
    state = loop.train(_student_config(teacher), str(workdir))
    assert int(state.step) == 6
    return workdir


def test_a_round_resumes_bit_identically_without_the_teachers_workdir(teacher, student, tmp_path):
    """The checkpoint holds the round's teacher: the resumed run never reads its workdir."""
    copy = shutil.copytree(teacher, tmp_path / "teacher")
    config = _student_config(copy, **{"training.num_train_steps": 4})  # stops inside round 1
    loop.train(config, str(tmp_path / "run"))
    shutil.rmtree(copy)
    config.training.num_train_steps = 0
    loop.train(config, str(tmp_path / "run"))  # resumes from step 4
    a = restore_state(config, student, 6)
    b = restore_state(config, tmp_path / "run", 6)
    assert isinstance(b, state_lib.DistillState)
    tree_allclose(a, b, atol=0)
    # round 1 started from round 0's last EMA, as student and teacher
    end_of_round_0 = restore_state(config, student, 3)
    tree_allclose(b.teacher_params, end_of_round_0.ema_params, atol=0)


def test_every_rounds_last_student_is_kept_when_calls_do_not_divide_a_round(teacher, tmp_path):
    """4 updates a call, 21 a round, keep 1: a call stops at each round end, so checkpoints 21,
    42 and 63 hold the rounds' last students and orbax's keep_period keeps them."""
    config = _student_config(
        teacher,
        **{
            "distill.end_steps": 2,  # three rounds: the fine-tune, 4 steps, 2 steps
            "distill.steps_per_round": 21,
            "training.steps_per_call": 4,
            "training.keep": 1,
            "training.checkpoint_every": 10,
            "training.log_every": 10,
        },
    )
    loop.train(config, str(tmp_path))
    assert checkpoint.checkpoint_steps(tmp_path) == [21, 42, 63]
    saved = {s: restore_state(config, tmp_path, s) for s in (21, 42, 63)}
    assert {s: int(state.step) for s, state in saved.items()} == {21: 21, 42: 42, 63: 63}
    # each round's teacher is the saved last student (EMA) of the round before
    tree_allclose(saved[42].teacher_params, saved[21].ema_params, atol=0)
    tree_allclose(saved[63].teacher_params, saved[42].ema_params, atol=0)


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(teacher, student, tmp_path):
    """`--mode distill` killed with SIGKILL inside round 1 (checkpoint 4 may still be in
    flight, step 5 is lost) and restarted ends bitwise where the uninterrupted run did."""
    args = [
        "--mode=distill",
        f"--config={REPO / 'configs/swissroll.py'}",
        f"--workdir={tmp_path}",
        f"--config.distill.teacher_workdir={teacher}",
        *(f"--config.{k}={v}" for k, v in STUDENT.items()),
    ]
    out = interrupt_then_finish(args, [("step 5/6", signal.SIGKILL)])
    assert "step 6/6" in out, out
    config = _student_config(teacher)
    tree_allclose(restore_state(config, student, 6), restore_state(config, tmp_path, 6), atol=0)


def test_the_students_workdir_samples_and_evaluates_with_its_step_count(teacher, student):
    config = _student_config(teacher)
    config.sampling.num_samples = 16
    config.sampling.batch_size = 16
    directory = sample_job.sample(config, str(student))
    settings = json.loads((directory / "settings.json").read_text())
    assert (settings["method"], settings["spacing"], settings["nfe"]) == ("ddim", "trailing", 4)
    assert sample_job.load_samples(directory, 16).shape == (16, 2)
    config.eval.evaluators = ("samples",)
    config.eval.once = True
    config.evals.samples.grid_num = 16
    records = job.evaluate_checkpoints(config, str(student))
    assert [r["step"] for r in records] == [6]


def test_a_teacher_with_another_schedule_or_output_is_refused(teacher, tmp_path):
    config = _student_config(teacher)
    config.diffusion.schedule = "linear"
    with pytest.raises(errors.ConfigError, match="diffusion.schedule='cosine'"):
        teacher_lib.teacher_config(config, "distill")
    config = _student_config(teacher, **{"model.hidden": 64})
    with pytest.raises(errors.ConfigError, match="different model shape"):
        teacher_lib.teacher_config(config, "distill")
    config = _student_config(teacher, **{"distill.teacher_output": "v"})
    with pytest.raises(errors.ConfigError, match="predicts 'eps'"):
        teacher_lib.teacher_config(config, "distill")


@pytest.mark.parametrize(
    "mode, overrides, match",
    [
        ("train", {}, "run it with --mode distill"),
        ("distill", {"distill__teacher_workdir": ""}, "needs the trained teacher"),
        ("distill", {"distill__start_steps": 12}, "times a power of 2"),
        ("distill", {"distill__start_steps": 4}, "times a power of 2"),
        ("distill", {"diffusion__model_output": "eps"}, "model_output='eps'"),
        ("distill", {"distill__steps_per_round": 0}, "steps_per_round=0"),
    ],
)
def test_bad_distillation_settings_are_refused(mode, overrides, match):
    config = digits_distill.get_config()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    with pytest.raises(errors.ConfigError, match=match):
        config_checks.validate_config(config, mode, num_devices=1)


def test_the_plan_halves_the_steps_each_round():
    rounds = distill.plan(digits_distill.get_config())
    assert rounds.fine_tune and rounds.num_rounds == 5
    assert [rounds.student_steps(r) for r in range(5)] == [64, 32, 16, 8, 4]
    assert rounds.total_steps == 5 * rounds.steps_per_round
    assert distill.final_step(digits_distill.get_config()) == rounds.total_steps
