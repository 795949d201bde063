"""Test setup: 8 simulated CPU devices, float32 by default.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives in conftest.
"""

import os
import shutil
import signal
import subprocess
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import digits, swissroll  # noqa: E402
from diffusion_jax.training import checkpoint  # noqa: E402
from diffusion_jax.training import state as state_lib  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 simulated CPU devices, got {len(devs)}"
    return devs


# Test doubles shared by several test files.

REPO = Path(__file__).resolve().parents[1]


def _shrink(config, overrides):
    config.training.batch_size = 16
    config.training.warmup_steps = 2
    config.training.sample_every = 0
    config.training.final_samples = 0
    config.training.log_every = 1000
    config.data.prefetch = 0
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def tiny_config(**overrides):
    """The digits config with a very small U-Net, sampling with the base config's sampler
    (the paper's chain, 20 steps here) instead of the digits' 20-step solver."""
    config = digits.get_config()
    config.sampling.update(method="ancestral", num_steps=0, spacing="", denoise_to_zero=False)
    config.model.ch = 8
    config.model.num_groups = 4
    config.model.dropout = 0.1
    return _shrink(config, overrides)


def tiny_mlp_config(**overrides):
    """The swiss roll with a small MLP (with dropout) and a 20-step chain: compiles in
    seconds, so the exact-equality tests of the training machinery use it."""
    config = swissroll.get_config()
    config.model.hidden = 32
    config.model.depth = 2
    config.model.dropout = 0.1
    config.diffusion.num_timesteps = 20
    config.diffusion.timestep_sampler = "loss_aware"
    return _shrink(config, overrides)


def tree_allclose(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def interrupt_then_finish(args, stops, timeout=600):
    """Runs `python -m diffusion_jax.main *args` once per (line prefix, signal) of `stops`,
    sending the signal when a printed line starts with the prefix (SIGKILL: it dies; SIGTERM:
    it saves, says so and exits 0), then once more to the end; returns that run's output,
    which resumed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = lambda: subprocess.Popen(
        [sys.executable, "-m", "diffusion_jax.main", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for at, sig in stops:
        proc, lines = start(), []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(at):
                proc.send_signal(sig)
                break
        lines.append(proc.communicate(timeout=120)[0])
        text = "".join(lines)
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, text
        else:
            assert proc.returncode == 0 and "Stopped at step" in text, text
    out = start().communicate(timeout=timeout)[0]
    assert "Resumed from" in out, out
    return out


def restore_state(config, workdir, step=None):
    _, _, abstract, _ = state_lib.init_train_state(config)
    mngr = checkpoint.manager(Path(workdir) / "checkpoints")
    step = mngr.latest_step() if step is None else step
    return checkpoint.restore(mngr, step, abstract)


def sampler_config(schedule: str = "linear", num_timesteps: int = 1000, **sampling):
    """The base config on 2x2x1 images with `sampling` overrides (method, num_steps, ...)."""
    from configs import base as base_config

    config = base_config.get_base_config()
    config.data.image_size, config.data.channels = 2, 1
    config.diffusion.schedule, config.diffusion.num_timesteps = schedule, num_timesteps
    for key, value in sampling.items():
        config.sampling[key] = value
    return config


def draw(
    config, denoise, x_init=None, *, shape=None, key=None, clip=False, respacing=None, **run_options
):
    """Runs the sampler of `config` (`registry.build`) with `denoise` from `x_init` (or x_T of
    `shape` from `key`), jitted; returns `run.sample`'s dict."""
    from diffusion_jax.sampling import registry, run

    stepper = registry.build(config, respacing)
    predict = run.make_predict(denoise, config.diffusion.model_output, clip)
    shape = x_init.shape if x_init is not None else shape
    key = jax.random.PRNGKey(1) if key is None else key
    fn = lambda k, x: run.sample(stepper, predict, shape, k, x_init=x, **run_options)
    return jax.jit(fn)(key, x_init)


# Fault injection: damage to a checkpoint's bytes as the world does it (an interrupted copy, a
# full disk, a bad sector, a lost file). Each `DAMAGE[kind](step_dir, rng)` damages the
# checkpoint folder `step_dir`; the array-data kinds damage every array data file,
# `ONE_DATA_FILE[kind]` one file the seeded `rng` picks.


def data_files(step_dir, folder="ocdbt.process_*"):
    """The array data files of a checkpoint (`default/ocdbt.process_<i>/d/*`); with
    folder='default', the root index's (the B-tree nodes of the merged OCDBT database)."""
    files = sorted(p for p in Path(step_dir).glob(f"**/{folder}/d/*") if p.is_file())
    assert files, f"no {folder}/d files in {step_dir}"
    return files


def _truncate(path):
    os.truncate(path, min(1000, path.stat().st_size // 2))  # what a partial copy leaves


def _empty(path):
    os.truncate(path, 0)


def _overwrite(path):
    """64 bytes in the middle replaced by others (a bad sector, a flipped block)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 64, len(data))):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def _delete(path):
    path.unlink()


FILE_FAULTS = {
    "truncated": _truncate,
    "emptied": _empty,
    "overwritten": _overwrite,
    "deleted": _delete,
}


def _every_data_file(fault):
    return lambda step_dir, rng: [fault(p) for p in data_files(step_dir)]


def _one_data_file(fault):
    def damage(step_dir, rng):
        files = data_files(step_dir)
        fault(files[rng.integers(len(files))])

    return damage


DAMAGE = {f"data {kind}": _every_data_file(fault) for kind, fault in FILE_FAULTS.items()}
DAMAGE.update(
    {
        "manifest garbled": lambda d, rng: [_overwrite(p) for p in d.rglob("manifest.ocdbt")],
        "index truncated": lambda d, rng: [_truncate(p) for p in data_files(d, "default")],
        "_METADATA missing": lambda d, rng: _delete(d / "default" / "_METADATA"),
        "_CHECKPOINT_METADATA truncated": lambda d, rng: os.truncate(
            d / "_CHECKPOINT_METADATA", 40
        ),
        "_sharding zero-length": lambda d, rng: _empty(d / "default" / "_sharding"),
        "array_metadatas zero-length": lambda d, rng: [
            _empty(p) for p in (d / "default" / "array_metadatas").iterdir()
        ],
        "default folder deleted": lambda d, rng: shutil.rmtree(d / "default"),
    }
)
ONE_DATA_FILE = {f"one data file {k}": _one_data_file(f) for k, f in FILE_FAULTS.items()}
