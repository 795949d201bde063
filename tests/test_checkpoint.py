"""Checkpoint faults end in one line instead of a traceback storm: every kind of damage to a
checkpoint's bytes (conftest.DAMAGE: array data truncated, emptied, overwritten or deleted,
manifests garbled, metadata missing, truncated or empty), from which training and the
evaluation job fall back to the newest readable one, training moving the bad one aside;
storage that does not answer, which changes nothing; no readable checkpoint at all; and a
full disk during a save, whether the write that fails is orbax's background one or the step
folder made in the foreground.

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
import numpy as np
import pytest
from conftest import DAMAGE, ONE_DATA_FILE, REPO, restore_state, tiny_mlp_config, tree_allclose

from diffusion_jax.evaluation import job
from diffusion_jax.training import checkpoint, checkpoint_errors, checkpoint_files, loop
from diffusion_jax.training import state as state_lib

# The command-line flags that make configs/swissroll.py the config of `tiny_mlp_config`.
MLP_FLAGS = [
    "--config.training.batch_size=16",
    "--config.data.prefetch=0",
    "--config.model.hidden=256",
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
    """The tiny MLP, 256 wide so that its arrays are stored in the OCDBT data files rather
    than inline in the index (as a U-Net's are)."""
    return tiny_mlp_config(
        model__hidden=256, training__checkpoint_every=2, training__num_train_steps=num_train_steps
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    loop.train(config(), str(workdir))
    assert checkpoint.checkpoint_steps(workdir) == [2, 4, 6]
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "workdir"))


def damage(workdir, step, kind, seed=0):
    """Applies `kind` of damage to checkpoint `step`; returns the damaged folder's listing."""
    step_dir = workdir / "checkpoints" / str(step)
    {**DAMAGE, **ONE_DATA_FILE}[kind](step_dir, np.random.default_rng(seed))
    return listing(step_dir)


def listing(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


def resume(workdir):
    """What training does when it starts: (step, state, lines) of the newest readable
    checkpoint, each damaged newer one reported in a line and moved aside."""
    _, _, abstract, _ = state_lib.init_train_state(config(8))
    mngr = checkpoint.manager(workdir / "checkpoints")
    lines = []
    try:
        step, state = checkpoint.restore_newest(mngr, abstract, move_damaged=True, log=lines.append)
    finally:
        mngr.close()
    return step, state, lines


def assert_fell_back(workdir, trained, damaged, step, state, lines, bad=6, to=4):
    """Training took checkpoint `to`, bit-identical to the intact run's; one line named `bad`;
    `bad` was moved aside exactly as it was damaged, never deleted."""
    assert step == to
    tree_allclose(state, restore_state(config(8), trained, to), atol=0)
    (line,) = [line for line in lines if line.startswith(f"Checkpoint {bad} in ")]
    assert "is unreadable: " in line and f"using step {to}" in line and "\n" not in line
    (moved,) = (workdir / "checkpoints").glob(f"{bad}.damaged-*")
    assert moved.name in line and listing(moved) == damaged


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_training_falls_back_from_every_kind_of_damage(kind, workdir, trained, capfd):
    damaged = damage(workdir, 6, kind)
    step, state, lines = resume(workdir)
    assert_fell_back(workdir, trained, damaged, step, state, lines)
    assert checkpoint.checkpoint_steps(workdir) == [2, 4]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ERROR" not in out + err


@pytest.mark.parametrize("attempt", range(3))
@pytest.mark.parametrize("kind", [k for k in DAMAGE if k.startswith("data ")])
def test_array_data_damage_falls_back_every_time(kind, attempt, workdir, trained):
    """Reads are asynchronous, so which array fails first varies from run to run."""
    damaged = damage(workdir, 6, kind)
    assert_fell_back(workdir, trained, damaged, *resume(workdir))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", sorted(ONE_DATA_FILE))
def test_one_damaged_data_file_never_restores_other_numbers(kind, seed, workdir, trained):
    """One data file damaged: training either falls back, or restores exactly the saved
    state (a file that holds nothing the state needs); never other numbers. Overwritten
    bytes inside array data are caught by the checksums recorded at save time (TensorStore
    checksums only its indices)."""
    damaged = damage(workdir, 6, kind, seed)
    step, state, lines = resume(workdir)
    if step == 6:
        assert lines == []
        tree_allclose(state, restore_state(config(8), trained, 6), atol=0)
    else:
        assert_fell_back(workdir, trained, damaged, step, state, lines)


def test_two_damaged_newest_checkpoints(workdir, trained):
    damaged6 = damage(workdir, 6, "data overwritten")
    damaged4 = damage(workdir, 4, "manifest garbled")
    step, state, lines = resume(workdir)
    assert_fell_back(workdir, trained, damaged6, step, state, lines, bad=6, to=2)
    assert_fell_back(workdir, trained, damaged4, step, state, lines, bad=4, to=2)


def test_checksums_are_exact_integer_sums_of_the_bits():
    """[sum of bits, sum of bits * (i * 0x9E3779B1 + 1)] mod 2^32 per array (i the flat
    index), re-derived in NumPy uint64 for float32, int32, bfloat16 and scalar leaves."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    tree = {
        "w": jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32),
        "n": jnp.asarray(rng.integers(-9, 9, size=(4,)), jnp.int32),
        "h": jnp.asarray(rng.normal(size=(6, 2)), jnp.bfloat16),
        "s": jnp.asarray(7, jnp.int32),
    }
    got = checkpoint_files.state_checksums(tree)
    for name, x in tree.items():
        x = np.asarray(x)
        bits = x.view({2: np.uint16, 4: np.uint32}[x.itemsize]).astype(np.uint64).ravel()
        weight = (np.arange(bits.size, dtype=np.uint64) * 0x9E3779B1 + 1) % 2**32
        assert got[name] == [int(bits.sum() % 2**32), int((bits * weight % 2**32).sum() % 2**32)]
    flipped = dict(tree, w=tree["w"].at[1, 2, 3].multiply(-1.0))
    assert checkpoint_files.state_checksums(flipped)["w"] != got["w"]
    ordered, swapped = (checkpoint_files.state_checksums(jnp.arange(4) * s) for s in (1, -1))
    reordered = checkpoint_files.state_checksums(jnp.arange(4)[::-1])  # same values, other places
    assert ordered[""][0] == reordered[""][0] and ordered[""][1] != reordered[""][1]
    assert swapped != ordered


def test_storage_that_does_not_answer_changes_nothing(workdir, quick_retries, monkeypatch):
    """A read that fails while the checkpoints folder cannot be listed (an unreachable
    bucket, an unmounted disk) is not damage: one CheckpointError that says so, nothing
    moved, no fallback to an older checkpoint."""
    before = listing(workdir / "checkpoints")
    real_iterdir = type(checkpoint.checkpoints_dir(workdir)).iterdir

    def unreachable(self):  # the storage stops answering
        if "checkpoints" in str(self):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real_iterdir(self)

    _, _, abstract, _ = state_lib.init_train_state(config(8))
    mngr = checkpoint.manager(workdir / "checkpoints")
    monkeypatch.setattr(type(checkpoint.checkpoints_dir(workdir)), "iterdir", unreachable)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_newest(mngr, abstract, move_damaged=True)
    assert not isinstance(info.value, checkpoint.UnreadableCheckpointError)
    message = str(info.value)
    assert (
        message.startswith("could not read checkpoint 6 in ") and "nothing was changed" in message
    )
    assert "the storage did not answer in 5 tries" in message
    assert "Input/output error" in message and "\n" not in message
    monkeypatch.undo()
    assert listing(workdir / "checkpoints") == before


def test_running_out_of_memory_is_not_damage(workdir, monkeypatch):
    """A restore that fails for want of memory is raised as it is (a traceback), and the
    intact checkpoint stays where it is."""
    before = listing(workdir / "checkpoints")

    def no_memory(self, *args, **kwargs):
        raise MemoryError("cannot allocate")

    _, _, abstract, _ = state_lib.init_train_state(config(8))
    mngr = checkpoint.manager(workdir / "checkpoints")
    monkeypatch.setattr(type(mngr), "restore", no_memory)
    with pytest.raises(MemoryError):
        checkpoint.restore_newest(mngr, abstract, move_damaged=True)
    assert listing(workdir / "checkpoints") == before


def eval_once(workdir):
    """`--mode eval --config.eval.once=True` with a cheap evaluator; the new records."""
    cfg = config(6)
    cfg.eval.once = True
    cfg.eval.evaluators = ("samples",)
    return job.evaluate_checkpoints(cfg, workdir)


@pytest.mark.parametrize("kind", [*sorted(DAMAGE), "two newest"])
def test_eval_job_skips_every_kind_of_damage(kind, workdir, capfd):
    """`--mode eval` with eval.once: each damaged newest checkpoint is one line and a
    `skipped` record (never retried), the newest readable one is evaluated instead, and
    nothing is renamed (the job only reads)."""
    bad = {6: "data truncated", 4: "manifest garbled"} if kind == "two newest" else {6: kind}
    damaged = {step: damage(workdir, step, how) for step, how in bad.items()}
    records = eval_once(workdir)
    assert [r["step"] for r in records] == [*bad, min(bad) - 2]
    assert all(r["skipped"].startswith("unreadable checkpoint: ") for r in records[:-1])
    assert "skipped" not in records[-1]
    assert {s: listing(workdir / "checkpoints" / str(s)) for s in bad} == damaged
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ERROR" not in out + err
    assert len([line for line in out.splitlines() if "is unreadable" in line]) == len(bad)
    assert eval_once(workdir) == []  # a rerun: nothing left to do


def test_training_resumes_from_the_newest_readable_checkpoint(workdir, trained, capfd, monkeypatch):
    """Step 6 truncated: one line names it and the cause, it is moved aside intact (not
    deleted), training resumes from step 4 and writes a new step 6 equal to the
    uninterrupted run's. TensorStore's late callbacks of the failed read (unraisable
    exceptions, each a traceback on stderr) do not get through."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    damage(workdir, 6, "data truncated")
    damaged = listing(workdir / "checkpoints" / "6")
    loop.train(config(8), str(workdir))
    gc.collect()
    assert unraisable == []
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err
    (line,) = [line for line in (out + err).splitlines() if "unreadable" in line]
    assert line.startswith("Checkpoint 6 in ") and "is unreadable: default/" in line
    assert ": truncated (" in line and "using step 4" in line
    assert "Resumed from" in out and "at step 4." in out
    (moved,) = (workdir / "checkpoints").glob("6.damaged-*")
    assert moved.name in line and listing(moved) == damaged  # kept as it was
    assert checkpoint.checkpoint_steps(workdir) == [4, 6, 8]
    cfg = config(8)
    tree_allclose(restore_state(cfg, workdir, 6), restore_state(cfg, trained, 6), atol=0)


def test_no_readable_checkpoint_is_one_error_and_changes_nothing(workdir, capfd):
    for step in (2, 4, 6):
        damage(workdir, step, "data truncated")
    before = listing(workdir / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError) as info:
        loop.train(config(8), str(workdir))
    message = str(info.value)
    assert "\n" not in message and message.startswith("no readable checkpoint in ")
    assert all(f"step {s}: default/" in message for s in (2, 4, 6))
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
    damage(workdir, 6, "data truncated")
    code, out = cli(workdir)
    assert code == 0, out
    assert "Traceback" not in out and len(out.splitlines()) < 20, out
    assert len([line for line in out.splitlines() if "is unreadable" in line]) == 1
    assert checkpoint.checkpoint_steps(workdir) == [4, 6, 8]

    broken = Path(shutil.copytree(workdir, tmp_path / "broken"))
    for step in (4, 6, 8):
        damage(broken, step, "data truncated")
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
            loop.train(config(), str(workdir))
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
    loop.train(config(), str(workdir))
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
    described = checkpoint_errors.describe_error(e, "/w/checkpoints")
    assert described == "6/default/d/abc: truncated (5 of 10 bytes)"
    assert checkpoint_errors.describe_error(OSError(errno.ENOSPC, "x")) == "no space left on device"
    assert checkpoint_errors.describe_error(RuntimeError("x")) == "RuntimeError: x"
    assert len(checkpoint_errors.describe_error(ValueError("DATA_LOSS: " + "x" * 999))) <= 300


def test_config_json_is_whole_after_a_failed_write(tmp_path, monkeypatch):
    """The disk fills while config.json is rewritten: the file keeps its old contents
    (written under a temporary name, then renamed), never half of the new ones."""
    checkpoint.write_config(tmp_path, config(6))
    before = checkpoint.config_path(tmp_path).read_text()
    path_type = type(checkpoint.config_path(tmp_path))

    def half_then_full(self, data, *args, **kwargs):
        with open(self, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(path_type, "write_bytes", half_then_full)
    monkeypatch.setattr(path_type, "write_text", half_then_full)
    with pytest.raises(OSError):
        checkpoint.write_config(tmp_path, config(8))
    monkeypatch.undo()
    assert checkpoint.config_path(tmp_path).read_text() == before


# Faults at the library boundary while every file of the checkpoint is as written: a storage
# that does not answer for a moment (a blip), one that stays away (a blip that lasts), and
# programming errors. Each is injected where the world raises it: orbax's restore, TensorStore's
# open, the file system's reads.

UNAVAILABLE = "UNAVAILABLE: Connection reset by peer; retry later"
BOUNDARY = {
    "orbax restore": (lambda: checkpoint.ocp.CheckpointManager, "restore"),
    "tensorstore open": (lambda: __import__("tensorstore"), "open"),
    "file read": (lambda: type(checkpoint.epath.Path("/")), "read_text"),
}
STORAGE_ERRORS = {
    "orbax restore": ValueError(UNAVAILABLE),
    "tensorstore open": ValueError(UNAVAILABLE),
    "file read": OSError(errno.EIO, os.strerror(errno.EIO)),
}


def inject(monkeypatch, where, error, times):
    """Makes the `where` call raise `error` for its first `times` calls (None: every call)."""
    owner, name = BOUNDARY[where][0](), BOUNDARY[where][1]
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        if where == "file read" and "/checkpoints/6/default/" not in str(args[0]):
            return real(*args, **kwargs)  # the files that only a restore of 6 reads
        calls.append(1)
        if times is None or len(calls) <= times:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(checkpoint, "READ_RETRY_DELAYS_S", (0.01,) * 4, raising=False)


@pytest.mark.parametrize("where", sorted(BOUNDARY))
def test_a_storage_blip_is_retried_not_damage(where, workdir, trained, quick_retries, monkeypatch):
    """The first read fails as a storage that did not answer for a moment: training resumes
    from the newest checkpoint, bit-identical, nothing renamed, one retry line."""
    before = listing(workdir / "checkpoints")
    inject(monkeypatch, where, STORAGE_ERRORS[where], times=1)
    step, state, lines = resume(workdir)
    monkeypatch.undo()
    assert step == 6
    tree_allclose(state, restore_state(config(8), trained, 6), atol=0)
    (line,) = lines
    assert line.startswith("Reading checkpoint 6 in ") and "try 2 of 5 in 0.01 s" in line
    assert listing(workdir / "checkpoints") == before


@pytest.mark.parametrize("where", sorted(BOUNDARY))
def test_a_blip_that_lasts_stops_in_one_line_and_changes_nothing(
    where, workdir, quick_retries, monkeypatch
):
    before = listing(workdir / "checkpoints")
    inject(monkeypatch, where, STORAGE_ERRORS[where], times=None)
    with pytest.raises(checkpoint.CheckpointError) as info:
        resume(workdir)
    monkeypatch.undo()
    message = str(info.value)
    assert not isinstance(info.value, checkpoint.UnreadableCheckpointError)
    assert message.startswith("could not read checkpoint 6 in ") and "\n" not in message
    assert "the storage did not answer in 5 tries" in message
    assert "nothing was changed" in message
    assert listing(workdir / "checkpoints") == before


@pytest.mark.parametrize("error", [TypeError("unexpected keyword"), AttributeError("no attr")])
@pytest.mark.parametrize("where", ["orbax restore", "tensorstore open"])
def test_a_bug_in_the_read_keeps_its_traceback(where, error, workdir, monkeypatch):
    """A programming error (a version mismatch, a bug) is raised as it is, on the first try,
    and no intact checkpoint is renamed."""
    before = listing(workdir / "checkpoints")
    calls = inject(monkeypatch, where, error, times=None)
    with pytest.raises(type(error)):
        resume(workdir)
    monkeypatch.undo()
    assert len(calls) >= 1 and listing(workdir / "checkpoints") == before


def test_damage_is_decided_from_the_files_not_the_error(workdir, trained, monkeypatch):
    """A damaged checkpoint is damaged whatever its read raises, a bug's exception type
    included: the files say so, and the line names the file."""
    damaged = damage(workdir, 6, "data truncated")
    inject(monkeypatch, "orbax restore", TypeError("unexpected keyword"), times=1)  # of 6
    step, state, lines = resume(workdir)
    monkeypatch.undo()
    assert_fell_back(workdir, trained, damaged, step, state, lines)
    (line,) = [line for line in lines if line.startswith("Checkpoint 6")]
    assert "is unreadable: default/ocdbt.process_0/d/" in line and ": truncated (" in line


def strip_file_record(step_dir):
    """Makes `step_dir` a checkpoint as versions before the file record wrote it."""
    import json

    (step_dir / checkpoint_files.FILES_NAME).unlink()
    path = step_dir / "_CHECKPOINT_METADATA"
    metadata = json.loads(path.read_text())
    del metadata["custom_metadata"][checkpoint_files.FILES_KEY]
    path.write_text(json.dumps(metadata))


def test_checkpoints_without_a_file_record_restore_and_fall_back(
    workdir, trained, quick_retries, monkeypatch
):
    """Checkpoints of an older version: intact ones restore (after a blip too); a damaged one
    is judged by the old rule after every retry failed (its files all read: damage)."""
    for step in (4, 6):
        strip_file_record(workdir / "checkpoints" / str(step))
    inject(monkeypatch, "orbax restore", ValueError(UNAVAILABLE), times=1)
    step, state, _ = resume(workdir)
    monkeypatch.undo()
    assert step == 6
    tree_allclose(state, restore_state(config(8), trained, 6), atol=0)
    damaged = damage(workdir, 6, "data truncated")
    step, state, lines = resume(workdir)
    assert_fell_back(workdir, trained, damaged, step, state, lines)
    assert sum("try 5 of 5" in line for line in lines) == 1


def checkpoint_listing(workdir):
    return listing(Path(workdir) / "checkpoints")


FAULT_PRELUDE = """
import orbax.checkpoint as ocp
from diffusion_jax.training import checkpoint
checkpoint.READ_RETRY_DELAYS_S = (0.1, 0.1, 0.1, 0.1)
_real, _calls = ocp.CheckpointManager.restore, []

def _failing(*args, **kwargs):
    _calls.append(1)
    if {times} is None or len(_calls) <= {times}:
        raise {error}
    return _real(*args, **kwargs)

ocp.CheckpointManager.restore = _failing
"""


@pytest.mark.slow
def test_cli_storage_blips_and_bugs(workdir):
    """Through `python -m diffusion_jax.main`: a blip on the first read resumes at the newest
    step (status 0); a blip that lasts is one line and status 1; a TypeError is a traceback.
    Neither of the failures renames anything."""
    before = checkpoint_listing(workdir)
    for times, error, status in [
        ("None", f"ValueError({UNAVAILABLE!r})", 1),
        ("None", "TypeError('restore() got an unexpected keyword argument')", 1),
    ]:
        code, out = cli(workdir, prelude=FAULT_PRELUDE.format(times=times, error=error))
        assert code == status, out
        assert checkpoint_listing(workdir) == before
        if error.startswith("TypeError"):
            assert "Traceback" in out and "TypeError: restore() got an unexpected" in out
        else:
            assert "Traceback" not in out and len(out.splitlines()) < 20, out
            (line,) = [line for line in out.splitlines() if line.startswith("error:")]
            assert "could not read checkpoint 6" in line and "did not answer in 5 tries" in line
            assert "nothing was changed" in line
    code, out = cli(
        workdir, prelude=FAULT_PRELUDE.format(times=1, error=f"ValueError({UNAVAILABLE!r})")
    )
    assert code == 0, out
    assert "Traceback" not in out and "Resumed from" in out and "at step 6." in out
    assert "try 2 of 5" in out and "unreadable" not in out
    assert checkpoint.checkpoint_steps(workdir) == [4, 6, 8]
    assert not list((workdir / "checkpoints").glob("*.damaged-*"))


@pytest.mark.slow
def test_two_processes_take_the_same_decision(tmp_path):
    """Two processes (jax.distributed over CPU), the failure on process 1 only: a blip is
    retried by both, which restore the newest checkpoint; a blip that lasts stops both in one
    line; a bug is raised as it is on process 1 and named on process 0. No process waits for
    the other forever (the time-out), and nothing is renamed."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    directory = tmp_path / "checkpoints"
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(REPO)
    )
    worker = [sys.executable, str(REPO / "tests" / "checkpoint_worker.py")]
    procs = [
        subprocess.Popen(
            [*worker, str(i), str(port), str(directory), "none,blip,lasting,bug"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = {}
    for out in outputs:
        for line in out.splitlines():
            if line.startswith('{"scenario"'):
                r = json.loads(line)
                results[r["scenario"], r["process"]] = r
    assert len(results) == 8, outputs
    for p in (0, 1):
        assert results["none", p] == {"scenario": "none", "process": p, "step": 2, "equal": True}
        assert results["blip", p] == {"scenario": "blip", "process": p, "step": 2, "equal": True}
        lasting = results["lasting", p]
        assert lasting["error"] == "CheckpointError", lasting
        assert "the storage did not answer in 5 tries" in lasting["message"]
        assert "nothing was changed" in lasting["message"]
    assert "Connection reset by peer" in results["lasting", 1]["message"]
    assert "(on process 1)" in results["lasting", 0]["message"]
    assert results["bug", 1]["error"] == "TypeError"
    assert (
        results["bug", 0]["error"] == "RuntimeError" and "process 1" in results["bug", 0]["message"]
    )
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


@pytest.mark.parametrize("times", [1, None])
def test_eval_job_never_records_a_blip_as_skipped(times, workdir, quick_retries, monkeypatch):
    """`--mode eval` records an unreadable checkpoint as skipped for good; a storage blip must
    not be one: a blip that passes evaluates checkpoint 6, one that lasts stops the job in
    one line with nothing recorded."""
    inject(monkeypatch, "orbax restore", ValueError(UNAVAILABLE), times=times)
    if times is None:
        with pytest.raises(checkpoint.CheckpointError, match="did not answer in 5 tries"):
            eval_once(workdir)
        records = job.metrics_path(workdir)
        assert not records.exists() or "skipped" not in records.read_text()
    else:
        (record,) = eval_once(workdir)
        assert record["step"] == 6 and "skipped" not in record
