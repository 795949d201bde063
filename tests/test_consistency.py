"""Consistency models (`diffusion/consistency.py`, `training/consistency_step.py`, the `consistency`
stepper): the boundary condition, the teacher's ODE steps against float64, the stop-gradient on
the target, students of an exact Gaussian teacher that learn its known consistency function,
the samplers against hand computation, bit-identical resumption, and one-line refusals."""

import json
import signal
import subprocess
import sys

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

from configs import digits_consistency, swissroll
from diffusion_jax.diffusion import consistency as cm
from diffusion_jax.diffusion import process as process_lib
from diffusion_jax.evaluation import job, sample_job
from diffusion_jax.runtime import distributed, errors, streams
from diffusion_jax.sampling import registry
from diffusion_jax.training import checkpoint, config_checks, consistency_step, loop, tasks
from diffusion_jax.training import state as state_lib

MU = np.array([0.5, -0.3, 0.1])
S2 = np.array([0.04, 0.25, 0.09])


def _config(method="distillation", **fields):
    config = digits_consistency.get_config()
    config.consistency.method = method
    for k, v in fields.items():
        config.consistency[k] = v
    return config


def _process(config):
    return process_lib.from_config(config.diffusion)


def exact_f(x_tilde, s, s_min):
    """The consistency function of N(MU, S2) data in x~ units (float64): the probability-flow ODE
    x~(s) = MU + (x~(s') - MU) sqrt((S2 + s^2) / (S2 + s'^2)) taken from s to s_min."""
    s = np.reshape(s, (-1,) + (1,) * (np.ndim(x_tilde) - 1))
    return MU + (x_tilde - MU) * np.sqrt((S2 + s_min**2) / (S2 + s**2))


def test_the_boundary_condition_holds_for_any_network():
    """f(x, t_min) = x / alpha exactly, whatever x0_hat; far from t_min f -> x0_hat."""
    process = _process(_config())
    s_min, s_max = cm.sigma_range(process)
    alpha = 1.0 / np.sqrt(1.0 + s_min**2)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
    garbage = 100.0 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
    f = cm.consistency_fn(x, garbage, jnp.full(4, alpha), jnp.full(4, s_min), s_min)
    np.testing.assert_allclose(np.asarray(f), np.asarray(x) / alpha, rtol=1e-6)
    far = cm.consistency_fn(x, garbage, jnp.full(4, 1e-3), jnp.full(4, s_max), s_min)
    np.testing.assert_allclose(np.asarray(far), np.asarray(garbage), rtol=1e-5, atol=1e-3)


def test_partner_schedule_shrinks_by_q_per_stage():
    """r = s (1 - n(s) / q^stage), n(s) = 1 + k sigmoid(-b s), never below s_min: stage 0 is
    denoising (r = s_min), and the gap s - r halves per stage once r > s_min (q = 2)."""
    s = jnp.asarray(np.geomspace(0.02, 150.0, 40), jnp.float32)
    s_min = 0.01
    gaps = []
    for stage in range(6):
        r = np.asarray(cm.partner(s, jnp.asarray(stage), s_min, 2.0, 8.0, 1.0), np.float64)
        n = 1 + 8 / (1 + np.exp(np.asarray(s, np.float64)))
        want = np.clip(np.asarray(s, np.float64) * (1 - n / 2.0**stage), s_min, s)
        np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-7)
        gaps.append(np.asarray(s, np.float64) - r)
    np.testing.assert_allclose(gaps[0], np.asarray(s) - s_min, rtol=1e-5)
    free = want > s_min  # stage 5, and therefore every stage 4 point with r > s_min
    np.testing.assert_allclose(gaps[4][free] / gaps[5][free], 2.0, rtol=1e-4)


def _apply(process, s_min):
    """apply(params, x, t_model, labels, key) of two networks on x [B, 1, 1, 3]: for the
    teacher's params {'exact'} the exact eps of N(MU, S2) data; for a student {'mu', 'log_s2'}
    the v whose consistency function (`cm.consistency_fn`) is that of N(mu, exp(log_s2)) data,
    `exact_f` with those moments (the family holds the answer: mu = MU, log_s2 = log S2)."""
    T = process.num_full_timesteps

    def apply(params, x, t_model, labels, dropout_key):
        t = (t_model + 1.0) / T
        alpha = process.alpha(t)[:, None, None, None]
        sigma = process.sigma(t)[:, None, None, None]
        if "exact" in params:
            g = alpha * S2 / (alpha**2 * S2 + sigma**2)
            x0 = MU + g * (x - alpha * MU)
            return (x - alpha * x0) / sigma
        mu, s2 = params["mu"], jnp.exp(params["log_s2"])
        s, x_tilde = sigma / alpha, x / alpha
        f = mu + (x_tilde - mu) * jnp.sqrt((s2 + s_min**2) / (s2 + s**2))
        k = (s - s_min) / s  # invert f = (c_skip - k c_skip^EDM) x~ + k x0_hat for x0_hat
        k_safe = jnp.where(k > 0, k, 1.0)  # at s_min f = x~ whatever x0_hat
        x0 = (f - (cm.c_skip(s, s_min) - k * cm.c_skip(s, 0.0)) * x_tilde) / k_safe
        return (alpha * x - x0) / sigma

    return apply


def _state(params, tx, method, target_decay=0.0, step=0):
    return state_lib.ConsistencyState(
        step=jnp.int32(step),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        loss_history=None,
        nonfinite_step=jnp.int32(-1),
        teacher_params={"exact": jnp.zeros(())} if method == "distillation" else None,
        target_params=params if target_decay > 0 else None,
    )


def _gaussian_config(method, steps, **fields):
    config = _config(method, **{"num_stages": 8, **fields})
    config.diffusion.schedule = "linear"
    config.training.num_train_steps = steps
    config.training.ema_decay = 0.0
    config.model.num_classes = 0
    return config


def _train_gaussian_student(method, steps=1200, **fields):
    """`consistency_step` itself from mu = 0, s2 = 1 on batches of N(MU, S2) data."""
    config = _gaussian_config(method, steps, **fields)
    process = _process(config)
    apply = _apply(process, cm.sigma_range(process)[0])
    student = {"mu": jnp.zeros(3), "log_s2": jnp.zeros(3)}
    tx = optax.adam(optax.cosine_decay_schedule(2e-2, steps))
    state = _state(student, tx, method, config.consistency.target_decay)
    step = jax.jit(
        lambda st, b: consistency_step.consistency_step(st, b, config=config, apply=apply, tx=tx)
    )
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x0 = MU + np.sqrt(S2) * rng.normal(size=(256, 1, 1, 3))
        state, metrics = step(state, {"image": jnp.asarray(x0, jnp.float32)})
    assert np.isfinite(float(metrics["loss"]))
    return state.params


@pytest.mark.parametrize(
    "method, fields, tolerance",
    [  # measured: variance 1.6-1.8% low (DDIM), 0.6-0.8% high (Heun), within 3% (tuning)
        ("distillation", {}, 0.03),
        ("distillation", {"teacher_solver": "heun", "target_decay": 0.9}, 0.012),
        ("tuning", {}, 0.05),
    ],
)
def test_a_student_of_an_exact_gaussian_teacher_learns_the_consistency_function(
    method, fields, tolerance
):
    """Data N(MU, S2) per channel, whose consistency function is known in closed form
    (`exact_f`); the student's family is that of every N(mu, s2), started at N(0, 1) and trained
    by `consistency_step` itself: distillation from the exact teacher's DDIM or Heun steps,
    tuning from the data alone. It ends at the data's moments."""
    params = _train_gaussian_student(method, **fields)
    np.testing.assert_allclose(params["mu"], MU, atol=0.005)
    np.testing.assert_allclose(np.exp(params["log_s2"]), S2, rtol=tolerance)


def test_without_the_stop_gradient_on_the_target_the_gradient_differs():
    """The update's gradient is that of the loss with the target held fixed: equal to the
    gradient through a precomputed constant target, and not to the gradient through both (in
    stage 6, where r > s_min and the target depends on the parameters)."""
    step = 1500
    config = _gaussian_config("tuning", 2000)
    process = _process(config)
    s_min, s_max = cm.sigma_range(process)
    apply = _apply(process, s_min)
    params = {"mu": jnp.asarray([0.2, 0.0, -0.1]), "log_s2": jnp.asarray([-1.0, -0.5, 0.3])}
    tx = optax.sgd(1.0)
    x0 = jnp.asarray(MU + np.sqrt(S2) * np.random.default_rng(0).normal(size=(64, 1, 1, 3)))
    x0 = x0.astype(jnp.float32)
    state = _state(params, tx, "tuning", step=step)
    new, _ = consistency_step.consistency_step(
        state, {"image": x0}, config=config, apply=apply, tx=tx
    )
    grad = jax.tree.map(lambda a, b: a - b, state.params, new.params)  # SGD at rate 1

    # The same pairs and noise as the update (its keys come from the step).
    c = config.consistency
    k = jax.random.split(streams.key(config.seed, streams.Stream.TRAIN, step), 3)
    s = cm.sample_sigmas(k[0], 64, c.p_mean, c.p_std, s_min, s_max)
    r = cm.partner(s, consistency_step.stage_of(config, step), s_min, c.q, c.k, c.b)
    eps = jax.random.normal(k[1], x0.shape, jnp.float32)

    def f(p, level, x_tilde):
        alpha, sigma, t = consistency_step.point(process, level)
        x = alpha[:, None, None, None] * x_tilde
        _, x0_hat = process_lib.eps_and_x0("v", apply(p, x, t, None, None), x, alpha, sigma)
        return cm.consistency_fn(x, x0_hat, alpha, level, s_min)

    x_s, x_r = x0 + s[:, None, None, None] * eps, x0 + r[:, None, None, None] * eps
    w = cm.weight(s, r, c.weighting)
    loss = lambda p, target: jnp.mean(w * cm.distance(f(p, s, x_s), target, c.distance))
    held = jax.grad(loss)(params, f(params, r, x_r))
    both = jax.grad(lambda p: loss(p, f(p, r, x_r)))(params)
    for name in params:
        np.testing.assert_allclose(grad[name], held[name], rtol=1e-4, atol=1e-7)
    assert not np.allclose(both["log_s2"], held["log_s2"], rtol=1e-2)


def _exact_consistency_v(process, s_min):
    """model_fn(x, t_model) -> v of the student `_apply` at the data's own moments, whose
    consistency function is exactly `exact_f`."""
    apply = _apply(process, s_min)
    params = {"mu": jnp.asarray(MU, jnp.float32), "log_s2": jnp.asarray(np.log(S2), jnp.float32)}
    return lambda x, t_model: apply(params, x, t_model, None, None)


def test_one_step_sampling_is_the_consistency_function_at_t_max():
    from conftest import draw, sampler_config

    config = sampler_config(method="consistency", num_steps=1, clip_denoised=False)
    config.diffusion.model_output = "v"
    process = _process(config)
    s_min, s_max = cm.sigma_range(process)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (256, 1, 1, 3))
    out = draw(config, _exact_consistency_v(process, s_min), x_T)
    assert registry.build(config).nfe == 1
    alpha = 1.0 / np.sqrt(1.0 + s_max**2)
    want = exact_f(np.asarray(x_T, np.float64) / alpha, s_max, s_min)
    np.testing.assert_allclose(np.asarray(out["sample"]), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_steps", [2, 4])
def test_multistep_sampling_of_the_exact_consistency_function_draws_the_data(num_steps):
    """Re-noising f to s_k with sqrt(s_k^2 - s_min^2) z puts x~ on the data's marginal at s_k,
    so every step's f is again N(MU, S2 + s_min^2): the samples' mean and variance match."""
    from conftest import draw, sampler_config

    config = sampler_config(method="consistency", num_steps=num_steps, clip_denoised=False)
    config.diffusion.model_output = "v"
    process = _process(config)
    s_min, _ = cm.sigma_range(process)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (20_000, 1, 1, 3))
    got = np.asarray(draw(config, _exact_consistency_v(process, s_min), x_T)["sample"], np.float64)
    got = got.reshape(-1, 3)
    assert np.all(np.abs(got.mean(0) - MU) < 4 * np.sqrt(S2 / 20_000)), got.mean(0)
    np.testing.assert_allclose(got.var(0), S2 + s_min**2, rtol=0.05)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The swiss roll's small MLP trained for 2 steps (an eps model): a teacher workdir."""
    workdir = tmp_path_factory.mktemp("teacher")
    config = tiny_mlp_config(training__num_train_steps=2, training__checkpoint_every=2)
    loop.train(config, str(workdir))
    return workdir


# A consistency distillation of `teacher` with an EMA target: 3 stages of 2 updates.
STUDENT = {
    "model.hidden": 32,
    "model.depth": 2,
    "diffusion.num_timesteps": 20,
    "diffusion.model_output": "v",
    "consistency.method": "distillation",
    "consistency.target_decay": 0.5,
    "consistency.teacher_solver": "heun",
    "consistency.num_stages": 3,
    "training.batch_size": 16,
    "training.learning_rate": 1e-3,
    "training.warmup_steps": 0,
    "training.num_train_steps": 6,
    "training.checkpoint_every": 1,
    "training.log_every": 1,
    "training.sample_every": 0,
    "training.final_samples": 0,
    "sampling.method": "consistency",
    "sampling.num_steps": 2,
    "data.prefetch": 0,
}


def _student_config(teacher, **overrides):
    config = swissroll.get_config()
    for dotted, value in {**STUDENT, **overrides}.items():
        section, key = dotted.split(".")
        config[section][key] = value
    config.consistency.teacher_workdir = str(teacher)
    return config


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("student")
    state = loop.train(_student_config(teacher), str(workdir))
    assert int(state.step) == 6 and isinstance(state, state_lib.ConsistencyState)
    return workdir


def test_the_student_starts_from_the_teacher_and_keeps_each_stage(teacher, student):
    config = _student_config(teacher)
    taught = restore_state(tiny_mlp_config(training__num_train_steps=2), teacher, 2)
    last = restore_state(config, student, 6)
    tree_allclose(last.teacher_params, taught.ema_params, atol=0)  # the frozen teacher
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: np.abs(a - b).max(), last.params, taught.ema_params)
    )
    assert max(moved) > 0
    assert {2, 4, 6} <= set(checkpoint.checkpoint_steps(student))  # every stage's last


@pytest.mark.parametrize(
    "overrides, slots",
    [
        ({}, ("teacher_params", "target_params")),  # distillation with an EMA target
        ({"consistency.method": "tuning", "consistency.target_decay": 0.0}, ()),
    ],
)
def test_a_fresh_run_starts_every_copy_from_the_teachers_ema(teacher, overrides, slots):
    """`tasks.Consistency.first_state`: student, EMA and the state's teacher and target slots
    (where the run has them; tuning without a target has neither) all equal the teacher's EMA
    parameters, and the optimiser starts at zero moments."""
    config = _student_config(teacher, **overrides)
    _, _, state, tx = state_lib.init_train_state(config)
    task = tasks.for_config(config)
    first = task.first_state(state, tx, distributed.make_mesh())
    taught = restore_state(tiny_mlp_config(training__num_train_steps=2), teacher, 2).ema_params
    for name in ("params", "ema_params", *slots):
        tree_allclose(getattr(first, name), taught, atol=0)
    for name in {"teacher_params", "target_params"} - set(slots):
        assert getattr(first, name) is None
    assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(first.opt_state[1][0].mu))


@pytest.mark.slow
def test_sigterm_and_kill_9_then_resume_equal_the_uninterrupted_run(teacher, student, tmp_path):
    """`--mode consistency` stopped by SIGTERM after step 2 (saves and exits), then killed
    with SIGKILL after step 4, then run to the end: bitwise the uninterrupted run's state."""
    args = [
        "--mode=consistency",
        f"--config={REPO / 'configs/swissroll.py'}",
        f"--workdir={tmp_path}",
        f"--config.consistency.teacher_workdir={teacher}",
        *(f"--config.{k}={v}" for k, v in STUDENT.items()),
    ]
    stops = [("step 2/6", signal.SIGTERM), ("step 4/6", signal.SIGKILL)]
    out = interrupt_then_finish(args, stops)
    assert "step 6/6" in out, out
    config = _student_config(teacher)
    tree_allclose(restore_state(config, student, 6), restore_state(config, tmp_path, 6), atol=0)


def test_the_students_workdir_samples_and_evaluates_with_its_steps(teacher, student):
    config = _student_config(teacher)
    config.sampling.num_samples = 16
    config.sampling.batch_size = 16
    directory = sample_job.sample(config, str(student))
    settings = json.loads((directory / "settings.json").read_text())
    assert (settings["method"], settings["nfe"]) == ("consistency", 2)
    assert sample_job.load_samples(directory, 16).shape == (16, 2)
    config.eval.evaluators = ("samples",)
    config.eval.once = True
    config.evals.samples.grid_num = 16
    records = job.evaluate_checkpoints(config, str(student))
    assert [r["step"] for r in records] == [6]


@pytest.mark.parametrize(
    "mode, overrides, match",
    [
        ("train", {}, "run it with --mode consistency"),
        ("distill", {}, "run it with --mode consistency"),
        ("consistency", {"consistency__method": "ict"}, "allowed: distillation, tuning"),
        ("consistency", {"consistency__teacher_workdir": ""}, "starts from a trained model"),
        ("consistency", {"diffusion__model_output": "eps"}, "model_output='eps'"),
        ("consistency", {"consistency__num_stages": 5000}, "num_stages=5000 is more than the"),
        ("consistency", {"consistency__q": 1.0}, "q=1.0 must be > 1"),
        ("consistency", {"consistency__target_decay": 1.0}, "target_decay=1.0"),
        ("consistency", {"consistency__teacher_solver": "euler"}, "allowed: ddim, heun"),
        ("consistency", {"consistency__distance": "lpips"}, "allowed: pseudo_huber, l2"),
    ],
)
def test_bad_consistency_settings_are_refused(mode, overrides, match):
    config = digits_consistency.get_config()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    with pytest.raises(errors.ConfigError, match=match):
        config_checks.validate_config(config, mode, num_devices=1)


def test_a_missing_teacher_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion_jax.main",
            "--mode=consistency",
            f"--config={REPO / 'configs/digits_consistency.py'}",
            f"--workdir={tmp_path / 'run'}",
            f"--config.consistency.teacher_workdir={tmp_path / 'nowhere'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert "nowhere" in line
