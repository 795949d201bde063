"""Checkpoint faults end in one line instead of a traceback storm: an unreadable (truncated)
checkpoint, from which training falls back to the newest readable one, moving the bad one
aside; no readable checkpoint at all; and a full disk during a save, whether the write that
fails is orbax's background one or the step folder made in the foreground.

A module-scoped fixture trains the tiny swiss-roll MLP of test_train for 6 steps with a
checkpoint every 2 (steps 2, 4, 6); each test damages its own copy of that workdir."""

import errno
import gc
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import pytest
from conftest import REPO, restore_state, tiny_mlp_config, tree_allclose

from diffusion_jax import checkpoint, train

# The command-line flags that make configs/swissroll.py the config of `tiny_mlp_config`.
MLP_FLAGS = [
    "--config.training.batch_size=16",
    "--config.data.prefetch=0",
    "--config.model.hidden=32",
    "--config.model.depth=2",
    "--config.model.dropout=0.1",
    "--config.diffusion.num_timesteps=20",
    "--config.diffusion.timestep_sampler=loss_aware",
    "--config.training.warmup_steps=2",
    "--config.training.sample_every=0",
    "--config.training.final_samples=0",
    "--config.training.log_every=1000",
    "--config.training.checkpoint_every=2",
]


def config(num_train_steps=6):
    return tiny_mlp_config(training__checkpoint_every=2, training__num_train_steps=num_train_steps)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    train.train_and_evaluate(config(), str(workdir))
    assert checkpoint.checkpoint_steps(workdir) == [2, 4, 6]
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "workdir"))


def truncate(workdir, step):
    """Cuts the array data files of checkpoint `step` (orbax's OCDBT `d/` folders) to half
    their size, as an interrupted copy would; returns their names."""
    files = [p for p in (workdir / "checkpoints" / str(step)).rglob("*") if p.parent.name == "d"]
    assert files
    for data in files:
        os.truncate(data, data.stat().st_size // 2)
    return {p.name for p in files}


def listing(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


def test_training_resumes_from_the_newest_readable_checkpoint(workdir, trained, capfd, monkeypatch):
    """Step 6 truncated: one line names it and the cause, it is moved aside intact (not
    deleted), training resumes from step 4 and writes a new step 6 equal to the
    uninterrupted run's. TensorStore's late callbacks of the failed read (unraisable
    exceptions, each a traceback on stderr) do not get through."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    bad = truncate(workdir, 6)
    damaged = listing(workdir / "checkpoints" / "6")
    train.train_and_evaluate(config(8), str(workdir))
    gc.collect()
    assert unraisable == []
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err
    (line,) = [line for line in (out + err).splitlines() if "unreadable" in line]
    assert line.startswith("Checkpoint 6 in ") and any(name in line for name in bad)
    assert "truncated" in line and "using step 4" in line
    assert "Resumed from" in out and "at step 4." in out
    (moved,) = (workdir / "checkpoints").glob("6.damaged-*")
    assert moved.name in line and listing(moved) == damaged  # kept as it was
    assert checkpoint.checkpoint_steps(workdir) == [4, 6, 8]
    cfg = config(8)
    tree_allclose(restore_state(cfg, workdir, 6), restore_state(cfg, trained, 6), atol=0)


def test_no_readable_checkpoint_is_one_error_and_changes_nothing(workdir, capfd):
    for step in (2, 4, 6):
        truncate(workdir, step)
    before = listing(workdir / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError) as info:
        train.train_and_evaluate(config(8), str(workdir))
    message = str(info.value)
    assert "\n" not in message and message.startswith("no readable checkpoint in ")
    assert all(f"step {s}: {s}/default/" in message for s in (2, 4, 6))
    assert "truncated" in message and "move these step folders out of the way" in message
    assert listing(workdir / "checkpoints") == before
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err


def cli(workdir, *flags, prelude="", steps=8):
    """`python -m diffusion_jax.main` on the tiny MLP config (after running `prelude`, a
    fault injection, in the same interpreter); returns (return code, all output)."""
    code = f"{prelude}\nfrom absl import app\nfrom diffusion_jax import main\napp.run(main.main)"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = [sys.executable, "-c", code, "--config", str(REPO / "configs/swissroll.py")]
    args += [f"--workdir={workdir}", *MLP_FLAGS, f"--config.training.num_train_steps={steps}"]
    proc = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_cli_unreadable_checkpoints_end_in_one_line(workdir, tmp_path):
    """Through the CLI: a truncated newest checkpoint is one line and training goes on
    (status 0); with every checkpoint truncated, one error line and status 1."""
    truncate(workdir, 6)
    code, out = cli(workdir)
    assert code == 0, out
    assert "Traceback" not in out and len(out.splitlines()) < 20, out
    assert len([line for line in out.splitlines() if "is unreadable" in line]) == 1
    assert checkpoint.checkpoint_steps(workdir) == [4, 6, 8]

    broken = Path(shutil.copytree(workdir, tmp_path / "broken"))
    for step in (4, 6, 8):
        truncate(broken, step)
    code, out = cli(broken)
    assert code == 1, out
    assert "Traceback" not in out and len(out.splitlines()) < 20, out
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert "no readable checkpoint in" in line and "truncated" in line


# A full disk: writes of checkpoint 4's files (orbax writes them into `4.orbax-checkpoint-tmp`
# and renames that when complete) fail with ENOSPC. 'background': its _METADATA file, which
# orbax's background thread writes, so the error surfaces at the next save; 'foreground': its
# folder, which `save` creates.
FULL_DISK = """
import errno, os
from etils import epath

_cls = type(epath.Path("/"))
_real = getattr(_cls, "{method}")


def _full(self, *args, **kwargs):
    if "/4.orbax-checkpoint-tmp" in str(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return _real(self, *args, **kwargs)
"""
METHODS = {"background": "write_text", "foreground": "mkdir"}


@pytest.mark.parametrize("where", ["background", "foreground"])
def test_full_disk_during_a_save_stops_with_one_line(where, tmp_path, trained, capfd):
    """The loop stops with one line naming the step, the directory and the cause; the
    previous checkpoint is intact, and the partial one is never picked up: a rerun resumes
    from step 2 and ends as the uninterrupted run."""
    saved = {}
    real_save = checkpoint.save

    def recording_save(mngr, step, state, *args, **kwargs):
        saved[step] = jax.device_get(state)  # before the next step donates it
        return real_save(mngr, step, state, *args, **kwargs)

    workdir = tmp_path / "workdir"
    fault = {}
    exec(FULL_DISK.format(method=METHODS[where]), fault)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", recording_save)
        mp.setattr(fault["_cls"], METHODS[where], fault["_full"])
        with pytest.raises(checkpoint.CheckpointError) as info:
            train.train_and_evaluate(config(), str(workdir))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"could not write checkpoint 4 to {workdir / 'checkpoints'}: ")
    assert "no space left on device" in message and "(step 2) is intact" in message
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "No space left" not in out + err
    # No writer of orbax's is left behind (one waiting for a folder that was never made
    # would keep the process from exiting for minutes).
    assert not [t for t in threading.enumerate() if type(t).__module__.startswith("orbax")]

    # Checkpoint 2 is complete and is what a restart picks up; the partial 4 is not.
    assert checkpoint.checkpoint_steps(workdir) == [2]
    partial = (workdir / "checkpoints" / "4.orbax-checkpoint-tmp").exists()
    assert partial == (where == "background")
    tree_allclose(restore_state(config(), workdir, 2), saved[2], atol=0)

    # With space again, the run resumes from step 2 and ends as the uninterrupted one.
    train.train_and_evaluate(config(), str(workdir))
    assert checkpoint.checkpoint_steps(workdir) == [2, 4, 6]
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    tree_allclose(restore_state(config(), workdir, 6), restore_state(config(), trained, 6), atol=0)


def test_cli_full_disk_is_one_line_and_status_1(tmp_path):
    workdir = tmp_path / "workdir"
    prelude = FULL_DISK.format(method="write_text") + '\nsetattr(_cls, "write_text", _full)\n'
    code, out = cli(workdir, prelude=prelude, steps=6)
    assert code == 1, out
    assert "Traceback" not in out and len(out.splitlines()) < 20, out
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert f"checkpoint 4 to {workdir / 'checkpoints'}: no space left on device" in line
    assert checkpoint.checkpoint_steps(workdir) == [2]


def test_error_descriptions_are_a_few_words():
    e = ValueError(
        'OUT_OF_RANGE: Error opening "zarr" driver: Error reading "step/.zarray" in OCDBT '
        'database at local file "/w/checkpoints/6/default/": Error reading Byte range [0, 10) '
        'of local file "/w/checkpoints/6/default/d/abc": Requested byte range [0, 10) is not '
        'valid for value of size 5 [tensorstore_spec=\'{"driver": "zarr"}\']'
    )
    described = checkpoint.describe_error(e, "/w/checkpoints")
    assert described == "6/default/d/abc: truncated (5 of 10 bytes)"
    assert checkpoint.describe_error(OSError(errno.ENOSPC, "x")) == "no space left on device"
    assert checkpoint.describe_error(RuntimeError("x")) == "RuntimeError: x"
    assert len(checkpoint.describe_error(ValueError("DATA_LOSS: " + "x" * 999))) <= 300
