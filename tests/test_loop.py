"""Training: sharded equals single-device, resume equals uninterrupted, multi-process equals
single-process, the loss falls, the CLI writes its outputs, and bad configs fail early."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, restore_state, tiny_config, tiny_mlp_config, tree_allclose

from configs import swissroll
from diffusion_jax import input_pipeline
from diffusion_jax.diffusion import losses, process
from diffusion_jax.runtime import distributed
from diffusion_jax.sampling import generation
from diffusion_jax.training import checkpoint, loop, train_step
from diffusion_jax.training import state as state_lib


def run_steps(config, mesh, num_steps):
    graphdef, rest, state, tx = state_lib.init_train_state(config)
    apply = generation.model_apply(graphdef, rest)
    diffusion = process.from_config(config.diffusion)
    fn = train_step.compile_train_fn(config, apply, diffusion, tx, mesh)
    state = jax.device_put(state, state_lib.state_shardings(config, mesh))
    data = input_pipeline.create_train_iterator(config)
    for _ in range(num_steps):
        batch = jax.tree.map(lambda x: x[None], next(data))
        state, metrics = fn(state, distributed.global_batch(batch, mesh, 1))
    return jax.device_get(state), jax.device_get(metrics)


def test_sharded_step_equals_single_device_step(devices):
    config = tiny_mlp_config()
    sharded, m8 = run_steps(config, distributed.make_mesh(devices), 2)
    single, m1 = run_steps(config, distributed.make_mesh(devices[:1]), 2)
    assert int(sharded.step) == 2
    tree_allclose(sharded.params, single.params, atol=1e-6)
    tree_allclose(sharded.ema_params, single.ema_params, atol=1e-6)
    tree_allclose(sharded.opt_state, single.opt_state, atol=1e-6)
    tree_allclose(sharded.loss_history, single.loss_history, atol=1e-6)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)


def test_zero1_trajectory_equals_replicated_and_splits_the_state(devices):
    """ZeRO-1 (`training.shard_optimizer`) on 8 devices: after 3 steps the loss, parameters,
    EMA and Adam moments equal the replicated run's to float32 rounding (XLA may order the
    split update's sums differently), and each device holds 1/8 of every parameter, moment and
    EMA array whose largest axis 8 divides."""
    mesh = distributed.make_mesh(devices)
    split, m_split = run_steps(tiny_mlp_config(training__shard_optimizer=True), mesh, 3)
    repl, m_repl = run_steps(tiny_mlp_config(training__shard_optimizer=False), mesh, 3)
    np.testing.assert_allclose(m_split["loss"], m_repl["loss"], rtol=1e-6)
    for name in ("params", "ema_params", "opt_state", "loss_history"):
        tree_allclose(getattr(split, name), getattr(repl, name), atol=1e-6)

    config = tiny_mlp_config(training__shard_optimizer=True)
    shardings = state_lib.state_shardings(config, mesh)
    state = jax.device_put(state_lib.init_train_state(config)[2], shardings)
    leaves = jax.tree.leaves((state.params, state.opt_state, state.ema_params))
    big = [x for x in leaves if x.ndim and max(x.shape) % 8 == 0]
    assert big and len(big) > len(leaves) // 2, [x.shape for x in leaves]
    for x in big:
        assert x.addressable_shards[0].data.size * 8 == x.size, (x.shape, x.sharding)
    assert [x for x in jax.tree.leaves(state.params) if x.ndim and max(x.shape) % 8 == 0]


def test_zero1_checkpoints_move_between_device_counts(devices, tmp_path):
    """A checkpoint written with the state split over 8 devices restores on one device; one
    written replicated (an older run) resumes into the split state and continues as a run
    that was split from the start (to float32 rounding). The split run draws its previews
    and final samples from the gathered EMA."""
    config = tiny_mlp_config(training__checkpoint_every=3, training__num_train_steps=6)
    previews = config.copy_and_resolve_references()
    previews.training.update(sample_every=3, final_samples=16)
    loop.train(previews, str(tmp_path / "split"))
    assert (tmp_path / "split" / "samples" / "final.png").exists()
    written = restore_state(config, tmp_path / "split", 6)  # single-device arrays
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(written))

    old = tiny_mlp_config(
        training__checkpoint_every=3, training__num_train_steps=3, training__shard_optimizer=False
    )
    loop.train(old, str(tmp_path / "mixed"))
    loop.train(config, str(tmp_path / "mixed"))  # resumes at step 3, split
    resumed = restore_state(config, tmp_path / "mixed", 6)
    assert int(resumed.step) == 6
    tree_allclose(written, resumed, atol=1e-6)


def test_several_steps_per_call_equal_single_steps(devices):
    config = tiny_mlp_config()
    mesh = distributed.make_mesh(devices)
    one_by_one, _ = run_steps(config, mesh, 2)
    graphdef, rest, state, tx = state_lib.init_train_state(config)
    fn = train_step.compile_train_fn(
        config,
        generation.model_apply(graphdef, rest),
        process.from_config(config.diffusion),
        tx,
        mesh,
    )
    data = input_pipeline.create_train_iterator(config)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), next(data), next(data))
    state, _ = fn(
        jax.device_put(state, state_lib.state_shardings(config, mesh)),
        distributed.global_batch(stacked, mesh, 1),
    )
    tree_allclose(jax.device_get(state.params), one_by_one.params, atol=1e-6)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    config = tiny_mlp_config(
        training__checkpoint_every=3,
        training__num_train_steps=6,
    )
    loop.train(config, str(tmp_path / "straight"))
    config.training.num_train_steps = 3
    loop.train(config, str(tmp_path / "resumed"))
    config.training.num_train_steps = 6
    loop.train(config, str(tmp_path / "resumed"))  # restarts from step 3
    straight = restore_state(config, tmp_path / "straight", 6)
    resumed = restore_state(config, tmp_path / "resumed", 6)
    assert int(resumed.step) == 6
    # Same data order, keys and optimiser state, so every leaf is bitwise equal.
    tree_allclose(straight, resumed, atol=0)


def mmd(x, y, bandwidth=0.2):
    """Squared maximum mean discrepancy with a Gaussian kernel (a two-sample statistic)."""
    k = lambda u, v: np.exp(-((u[:, None] - v[None]) ** 2).sum(-1) / (2 * bandwidth**2))
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


@pytest.mark.slow
def test_swissroll_samples_match_the_data(tmp_path):
    """2000 steps through the CLI on one device (this process's 8 simulated devices would
    train the small MLP 3x slower), then 1024 samples of the 100-step chain."""
    config = swissroll.get_config()
    proc = cli(
        tmp_path,
        f"--config.training.batch_size={config.training.batch_size}",
        "--config.training.num_train_steps=2000",
        "--config.training.checkpoint_every=2000",
        "--config.training.sample_every=0",
        config="swissroll",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    state = restore_state(config, tmp_path, 2000)
    graphdef, rest, _, _ = state_lib.init_train_state(config)
    mesh = distributed.make_mesh(jax.devices()[:1])
    apply = generation.model_apply(graphdef, rest)
    sampler = generation.make_sampler(config, apply, mesh, 1024, "")
    labels = jnp.zeros(1024, jnp.int32)
    x = np.asarray(sampler(state.ema_params, jax.random.PRNGKey(0), labels)["sample"])
    data = input_pipeline.make_swissroll()
    rng = np.random.default_rng(0)
    draw = lambda: data[rng.choice(len(data), 1024, replace=False)]
    # The yardstick is the same statistic between independent draws of the data itself,
    # and, as a model that learnt nothing useful, a Gaussian with the data's mean and cov.
    floor = max(mmd(draw(), draw()) for _ in range(5))
    gaussian = rng.multivariate_normal(data.mean(0), np.cov(data.T), 1024)
    model, baseline = mmd(x, draw()), mmd(gaussian, draw())
    assert model < 3 * floor, (model, floor)
    assert model < 0.25 * baseline, (model, baseline)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"training__batch_size": 12}, "batch_size=12 is not divisible by the 8 devices"),
        ({"data__name": "mnist"}, "data.name.*mnist"),
        ({"model__name": "dit"}, "model.name='dit'"),
        ({"training__learning_rate": -1e-4}, "learning_rate=-0.0001 must be > 0"),
        ({"training__ema_decay": 1.5}, "ema_decay=1.5"),
        ({"diffusion__loss_type": "l1"}, "loss_type='l1'"),
        ({"diffusion__schedule": "sigmoid"}, "schedule='sigmoid'"),
        ({"model__ch": 6}, "num_groups|divisible"),
    ],
)
def test_bad_config_fails_before_compilation(overrides, match, tmp_path):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=match):
        loop.train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_workdir_with_another_model_shape_refuses_to_resume(tmp_path):
    config = tiny_mlp_config(training__num_train_steps=1)
    loop.train(config, str(tmp_path))
    config.model.hidden = 64
    with pytest.raises(ValueError, match=r"model.hidden: workdir has 32, this config has 64"):
        loop.train(config, str(tmp_path))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_mlp_config(
        training__learning_rate=1e30,
        training__warmup_steps=1,
        training__grad_clip=0.0,
        training__checkpoint_every=1,
        training__num_train_steps=4,
    )
    config.model.dropout = 0.0
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite at step \d+.*last good"):
        loop.train(config, str(tmp_path))
    mngr = checkpoint.manager(tmp_path / "checkpoints")
    good = mngr.latest_step()
    assert good is not None and good < 4
    state = restore_state(config, tmp_path, good)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


class RecordingWriter:
    """Stands in for the TensorBoard writer; keeps every scalar by step."""

    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars.setdefault(step, {}).update(scalars)

    def write_images(self, step, images):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass


@pytest.mark.parametrize("slow", ["input", "step"])
def test_loop_reports_input_wait_and_checkpoint_pause(slow, tmp_path, monkeypatch, capsys):
    """input_wait_frac is the share of wall time spent in next(data): about 1 when batches
    arrive slowly, about 0 when the step is what takes the time."""
    delay = 0.25
    writer = RecordingWriter()
    monkeypatch.setattr(loop, "make_writer", lambda workdir, is_chief: writer)
    if slow == "input":
        make_iterator = input_pipeline.create_train_iterator

        def slow_iterator(*args, **kwargs):
            for batch in make_iterator(*args, **kwargs):
                time.sleep(delay)
                yield batch

        monkeypatch.setattr(input_pipeline, "create_train_iterator", slow_iterator)
    else:
        compile_fn = train_step.compile_train_fn

        def slow_compile(*args, **kwargs):
            fn = compile_fn(*args, **kwargs)

            def step(state, batch):
                time.sleep(delay)
                return fn(state, batch)

            return step

        monkeypatch.setattr(train_step, "compile_train_fn", slow_compile)
    config = tiny_mlp_config(
        training__num_train_steps=8, training__log_every=4, training__checkpoint_every=8
    )
    loop.train(config, str(tmp_path))
    wait = writer.scalars[8]["input_wait_frac"]  # steps 5-8: compilation is behind us
    # 4 x 0.25 s of sleep against a few ms (tens under load) of real work per step
    if slow == "input":
        assert wait > 0.7
    else:
        assert wait < 0.1
    out = capsys.readouterr().out
    assert f"input wait {wait:.1%}" in out
    assert "checkpoint 8: the loop paused" in out
    assert 0 <= writer.scalars[8]["checkpoint_blocking_s"] < 60


def cli(workdir, *overrides, env=None, devices=1, config="digits"):
    env = dict(os.environ, **(env or {}))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    args = [
        sys.executable,
        "-m",
        "diffusion_jax.main",
        "--config",
        str(REPO / f"configs/{config}.py"),
        f"--workdir={workdir}",
        "--config.training.batch_size=16",
        "--config.data.prefetch=0",
        *(["--config.model.ch=8", "--config.model.num_groups=4"] if config == "digits" else []),
        "--config.training.final_samples=0",
        *overrides,
    ]
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_cli_trains_the_embedded_default_and_writes_its_outputs(tmp_path):
    """The CLI end to end on a tiny digits model: the loss falls, and a checkpoint,
    TensorBoard events and a PNG grid are written."""
    proc = cli(
        tmp_path,
        "--config.training.num_train_steps=60",
        "--config.training.log_every=30",
        "--config.training.learning_rate=2e-3",
        "--config.training.warmup_steps=2",
        "--config.training.sample_every=60",
        "--config.sampling.preview_respacing=5",
        "--config.sampling.preview_num=16",
        "--config.training.final_samples=16",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "step 60/60" in out and "img/s" in out and "ETA" in out
    # It ends with the final grid, its quality beside the real floor, and what to run next.
    assert (tmp_path / "samples" / "final.png").exists()
    assert "Sample quality of 16: digits FD" in out and "real held-out digits" in out
    assert "--mode eval" in out and "--mode sample" in out
    assert "oneDNN" not in out and "Traceback" not in out
    assert (tmp_path / "checkpoints" / "60").is_dir()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    png = tmp_path / "samples" / "step_00000060.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["ch"] == 8

    # The held-out L_simple of the trained parameters is well below the initial one.
    config = tiny_config()
    graphdef, rest, initial, _ = state_lib.init_train_state(config)
    trained = restore_state(config, tmp_path, 60)
    apply = generation.model_apply(graphdef, rest)
    diffusion = process.from_config(config.diffusion)
    images, _ = input_pipeline.load_arrays(config, "train")
    x0 = jnp.asarray(images[:256] / 127.5 - 1.0, jnp.float32)
    key_t, key_n = jax.random.split(jax.random.PRNGKey(42))
    t = jax.random.randint(key_t, (256,), 0, 1000)
    noise = jax.random.normal(key_n, x0.shape)

    @jax.jit
    def held_out_loss(params):
        fn = lambda x_t, tt: apply(params, x_t, tt)
        return jnp.mean(losses.training_losses(diffusion, fn, x0, t, noise)["loss"])

    before, after = float(held_out_loss(initial.params)), float(held_out_loss(trained.params))
    assert before == pytest.approx(1.0, abs=0.05)  # zero-initialised output: E[eps^2] = 1
    assert after < 0.6 * before


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = cli(
        tmp_path,
        "--config.training.num_train_steps=100000",
        "--config.training.log_every=1",
        "--config.training.checkpoint_every=100000",
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "Stopped at step" in out
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and 3 <= max(steps) < 100000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """Two CLI processes with 4 CPU devices each (jax.distributed on localhost) train exactly
    as this 8-device process does."""
    config = tiny_mlp_config(training__num_train_steps=3, training__checkpoint_every=3)
    config.model.hidden, config.model.depth = 128, 3  # the swissroll config's model
    config.diffusion.num_timesteps, config.diffusion.timestep_sampler = 100, "uniform"
    loop.train(config, str(tmp_path / "one"))
    procs = two_processes(
        tmp_path / "two",
        "--config.training.num_train_steps=3",
        "--config.training.checkpoint_every=3",
        "--config.training.sample_every=0",
        "--config.model.dropout=0.1",
        "--config.training.warmup_steps=2",
    )
    deadline = time.time() + 300
    outs = [p.communicate(timeout=max(deadline - time.time(), 1))[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "8 cpu device(s)" in outs[0]
    one, two = (
        restore_state(config, tmp_path / "one", 3),
        restore_state(config, tmp_path / "two", 3),
    )
    tree_allclose(one.params, two.params, atol=1e-6)
    tree_allclose(one.ema_params, two.ema_params, atol=1e-6)
    tree_allclose(one.opt_state, two.opt_state, atol=1e-6)


def two_processes(workdir, *overrides):
    """`cli` as processes 0 and 1 of a 2-process run (4 CPU devices each)."""
    port = free_port()
    return [
        cli(
            workdir,
            *overrides,
            devices=4,
            config="swissroll",
            env={
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]


def finish(procs, timeout=180):
    """The outputs of `procs`; a process still running after `timeout` s (hanging in a
    collective) is killed and fails the test."""
    deadline, outs = time.time() + timeout, []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"a process did not exit (hanging in a collective?): {p.communicate()[0]}")
    return outs


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """A SIGTERM to process 1 only: both processes save the same step and exit 0 (none is
    left in a collective); the restarted pair ends bit-identical to an uninterrupted pair."""
    overrides = [
        "--config.model.hidden=32",
        "--config.model.depth=2",
        "--config.model.dropout=0.1",
        "--config.diffusion.num_timesteps=20",
        "--config.diffusion.timestep_sampler=loss_aware",
        "--config.training.warmup_steps=2",
        "--config.training.sample_every=0",
        "--config.training.num_train_steps=20",
        "--config.training.log_every=1",
        "--config.training.checkpoint_every=1000",
    ]
    straight = two_processes(tmp_path / "straight", *overrides)
    stopped = two_processes(tmp_path / "stopped", *overrides)
    procs = straight + stopped
    try:
        head = []
        for line in stopped[1].stdout:
            head.append(line)
            if line.startswith("step "):
                stopped[1].send_signal(signal.SIGTERM)
                break
        outs = finish(stopped)
        outs[1] = "".join(head) + outs[1]
        assert [p.returncode for p in stopped] == [0, 0], outs
        saved = [re.findall(r"^Stopped at step (\d+) on request", out, re.M) for out in outs]
        assert saved[0] == saved[1] and len(saved[0]) == 1, outs
        step = int(saved[0][0])
        assert 1 <= step < 20
        assert checkpoint.checkpoint_steps(tmp_path / "stopped") == [step]

        restarted = two_processes(tmp_path / "stopped", *overrides)
        procs += restarted
        outs = finish(restarted + straight)
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in restarted + straight), outs
    assert all(f"at step {step}." in out for out in outs[:2])
    config = tiny_mlp_config()
    resumed = restore_state(config, tmp_path / "stopped", 20)
    tree_allclose(resumed, restore_state(config, tmp_path / "straight", 20), atol=0)
