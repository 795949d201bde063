"""Orbax checkpoints of the training state, and the run's config kept beside them.

Saves are asynchronous; the manager keeps the last `training.keep` checkpoints plus every
`training.keep_every`-th step for evaluation. Orbax finalises a checkpoint by an atomic
rename, so `latest_step()` never returns a half-written one.

Faults end in one line (`CheckpointError`, a `UserError` that main.py prints before exiting
with status 1) instead of TensorStore's and asyncio's tracebacks. Whether a checkpoint is
damaged is decided only from evidence that its files are not what was written: each save
records every file of the checkpoint with its size and CRC-32 (`checkpoint_files`: written
inside the step's folder before orbax renames it into place, so a finished checkpoint always
has it), and a checksum of each array (in orbax's step metadata), verified after every
restore (TensorStore checksums only its indices: bytes overwritten inside array
data would otherwise restore as wrong numbers). When a read fails:

- files missing, of other sizes or other contents than recorded, or unparsable metadata:
  damaged (`UnreadableCheckpointError`); readers fall back to the newest readable one, and
  training moves the damaged one aside to `<step>.damaged-<time>` (never deletes it);
- files as written and the failure an I/O error (OSError, or TensorStore's ValueError of a
  status): the storage, not the checkpoint; the read is retried `len(READ_RETRY_DELAYS_S)`
  times with backoff, then one line says the storage did not answer and nothing was changed;
- any other exception (TypeError, AttributeError, MemoryError, ...): a bug or a resource
  problem, raised as it is with its traceback; nothing is changed.

On several processes every read ends in one collective, so all processes take the same
decision (the most severe one any of them reached) and none waits for another forever.
A checkpoint written before the files were recorded is judged as it used to be: a read
that fails on every try while all its files read is damage. A save that fails (e.g. a full
disk), in the foreground or in orbax's background thread, names the step and the directory.

One cohesive thing, hence its length: the save and the read of a checkpoint with the read's
retries and verdicts; the record of its files is in `checkpoint_files`, the error text in
`checkpoint_errors`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import models
from diffusion_jax.runtime import errors, files, logs
from diffusion_jax.training import checkpoint_errors, checkpoint_files


class CheckpointError(errors.UserError):
    """A checkpoint could not be read or written. The message is one line: which checkpoint,
    why (the root cause in a few words) and what to do."""


class UnreadableCheckpointError(CheckpointError):
    """Checkpoint `step` in `directory` cannot be read: truncated, corrupt or missing files."""

    def __init__(self, directory: str | epath.Path, step: int, reason: str):
        self.directory, self.step, self.reason = epath.Path(directory), int(step), reason
        super().__init__(f"checkpoint {step} in {directory} is unreadable: {reason}")


# config.model fields that change the network's function but not its shapes (a warning).
FUNCTION_FIELDS = ("num_groups", "norm_eps", "dtype")


def manager(
    directory: str | epath.Path, keep: int = 3, keep_every: int | None = None
) -> ocp.CheckpointManager:
    """The training run's manager (saves in the background: `finish_saving` waits). Unfinished
    saves of an earlier run (orbax's `<step>.orbax-checkpoint-tmp` folders, e.g. left by a
    full disk) are removed.

    The step's folders are created in the foreground: when that fails (a full disk),
    orbax's background writers would otherwise wait 5 minutes for them, and the process
    could not exit before they gave up."""
    checkpoint_errors.quiet_reported_errors()
    directory = epath.Path(directory)
    recorder = checkpoint_files.FileRecorder(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=True,
        async_options=ocp.options.AsyncOptions(
            create_directories_asynchronously=False, post_finalization_callback=recorder
        ),
    )
    with checkpoint_errors.without_orbax_logs():
        mngr = ocp.CheckpointManager(directory, options=options)
    mngr._diffusion_jax_recorder = recorder  # noqa: SLF001 - `save` names the step it records
    return mngr


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: Any,
    force: bool = True,
    *,
    last_complete: int | None = None,
) -> bool:
    """Starts writing `state` as checkpoint `step` (in the background for an asynchronous
    manager). CheckpointError (one line) if it cannot be; `last_complete`, the newest
    checkpoint known to be complete, is named in it."""
    metadata = {
        checkpoint_files.CHECKSUMS_KEY: checkpoint_files.state_checksums(state),
        checkpoint_files.FILES_KEY: checkpoint_files.FILES_NAME,
    }
    try:
        mngr.wait_until_finished()  # the recorder of the previous save has run
        mngr._diffusion_jax_recorder.step = step  # noqa: SLF001
        return mngr.save(
            step, args=ocp.args.StandardSave(state), force=force, custom_metadata=metadata
        )
    except Exception as e:  # noqa: BLE001 - every write failure becomes the one line
        _let_background_writers_end()
        raise write_error(mngr.directory, step, e, last_complete) from None


def finish_saving(
    mngr: ocp.CheckpointManager, step: int | None, last_complete: int | None = None
) -> None:
    """Waits for the background write of checkpoint `step` (None: no save pending); a failed
    write raises CheckpointError naming `step`."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        _let_background_writers_end()
        raise write_error(mngr.directory, step, e, last_complete) from None


def _let_background_writers_end(timeout: float = 60.0) -> None:
    """After a failed save, waits (at most `timeout` s in all) for orbax's other background
    writers of it, which go on after the first one failed: an exit right away would cut them
    off mid-write, each printing a traceback."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        if type(thread).__module__.startswith("orbax") or thread.name == "async_save":
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


def write_error(
    directory: str | epath.Path, step: int | None, error: BaseException, last_complete: int | None
) -> CheckpointError:
    """The one-line CheckpointError for a failed write of checkpoint `step` in `directory`."""
    which = f"checkpoint {step}" if step is not None else "a checkpoint"
    if last_complete is not None:
        after = (
            f"the last complete checkpoint (step {last_complete}) is intact; "
            f"{'free some space' if checkpoint_errors.is_disk_full(error) else 'fix this'} "
            "and rerun to resume from it"
        )
    else:
        after = "no checkpoint of this run is complete yet"
    return CheckpointError(
        f"could not write {which} to {directory}: "
        f"{checkpoint_errors.describe_error(error, directory)}; training stopped and {after}"
    )


# How long to wait before each new try of a read that failed while the checkpoint's files are
# as written (a storage that did not answer for a moment): 5 tries over 15 s.
READ_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0)

# What one try of a read came to, least severe first: on several processes the most severe
# outcome of any process is every process's decision.
OK, STORAGE, DAMAGED, CONFIG, BUG = range(5)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, *, log=None) -> Any:
    """Restores `step` into the structure, shapes and shardings of `abstract_state`.

    UnreadableCheckpointError when its files are not as written (damaged); ConfigError when
    it holds another structure or other shapes than `abstract_state`; CheckpointError when the
    read still fails after `len(READ_RETRY_DELAYS_S)` retries (each reported through `log`)
    with the files as written (the storage did not answer); any other failure is raised as it
    is. A collective on several processes: they all reach the same outcome.
    """
    log = log or logs.log
    directory = epath.Path(mngr.directory)
    start, tries = time.monotonic(), len(READ_RETRY_DELAYS_S) + 1
    for attempt in range(tries):
        outcome, result = _try_read(mngr, directory, step, abstract_state)
        decision, where = _agree(outcome)
        if decision == OK:
            return result
        if outcome == decision and decision != STORAGE:
            raise result  # a bug keeps its traceback; damage and a misfit are one line
        if decision == BUG:
            raise RuntimeError(f"reading checkpoint {step} failed on process {where} (see there)")
        if decision == CONFIG:
            raise errors.ConfigError(
                f"checkpoint {step} in {directory} does not fit this config (process {where})"
            )
        if decision == DAMAGED:
            raise UnreadableCheckpointError(directory, step, f"damaged (process {where})")
        why = (
            checkpoint_errors.describe_error(result, directory)
            if outcome == STORAGE
            else f"on process {where}"
        )
        if attempt + 1 < tries:
            delay = READ_RETRY_DELAYS_S[attempt]
            log(
                f"Reading checkpoint {step} in {directory} failed ({why}) while its files are "
                f"as written: try {attempt + 2} of {tries} in {delay:g} s."
            )
            time.sleep(delay)
    if _all_processes(checkpoint_files.legacy_damage(directory, step)):
        raise UnreadableCheckpointError(directory, step, why)
    raise CheckpointError(
        f"could not read checkpoint {step} in {directory}: the storage did not answer in "
        f"{tries} tries over {time.monotonic() - start:.0f} s ({why}); its files are as "
        "written and nothing was changed: rerun once the storage answers"
    )


def _agree(outcome: int) -> tuple[int, int]:
    """(the most severe outcome of any process, the first process that reached it)."""
    if jax.process_count() == 1:
        return outcome, 0
    from jax.experimental import multihost_utils

    outcomes = np.asarray(multihost_utils.process_allgather(np.array([outcome], np.int32)))
    return int(outcomes.max()), int(outcomes.reshape(-1).argmax())


def _try_read(
    mngr: ocp.CheckpointManager, directory: epath.Path, step: int, abstract_state: Any
) -> tuple[int, Any]:
    """(outcome, the state or the exception) of one read of checkpoint `step`; never raises.
    A failure is classified from the checkpoint's files (`checkpoint_files.damage_evidence`) and the
    exception's type, never from its text."""
    checkpoint_errors.quiet_reported_errors()
    step_dir = directory / str(step)
    try:
        return OK, _read(mngr, step_dir, abstract_state)
    except errors.ConfigError as e:
        return CONFIG, e
    except UnreadableCheckpointError as e:
        return DAMAGED, e
    except Exception as error:  # noqa: BLE001 - classified here; a bug is raised by `restore`
        if any(
            isinstance(e, MemoryError | jax.errors.JaxRuntimeError)
            for e in checkpoint_errors.chain(error)
        ):
            return BUG, error  # out of host or device memory: not the checkpoint's doing
        try:
            evidence = checkpoint_files.damage_evidence(step_dir)
        except Exception as probe:  # noqa: BLE001 - the storage did not answer the check
            return (STORAGE if checkpoint_errors.is_storage_error(probe) else BUG), probe
        if evidence is not None:
            return DAMAGED, UnreadableCheckpointError(directory, step, evidence)
        return (STORAGE if checkpoint_errors.is_storage_error(error) else BUG), error


def _read(mngr: ocp.CheckpointManager, step_dir: epath.Path, abstract_state: Any) -> Any:
    """Checkpoint `step_dir`, verified against the array checksums recorded with it."""
    metadata = json.loads((step_dir / checkpoint_files.STEP_METADATA).read_text())
    checksums = (metadata.get("custom_metadata") or {}).get(checkpoint_files.CHECKSUMS_KEY)
    saved = ocp.StandardCheckpointHandler().metadata(step_dir / "default")
    mismatch = _structure_mismatch(abstract_state, saved)
    if mismatch:
        raise errors.ConfigError(
            f"checkpoint {step_dir.name} in {step_dir.parent} does not fit this config and "
            f"code: {mismatch} (another model or training state than this config's; not a "
            "damaged checkpoint)"
        )
    args = ocp.args.StandardRestore(abstract_state)
    if jax.process_count() == 1:
        state = mngr.restore(int(step_dir.name), args=args)
    else:  # orbax's restore ends in a barrier that a process whose read failed never
        # reaches, leaving the others waiting: its handler reads without one (`_agree` follows)
        state = ocp.StandardCheckpointHandler().restore(step_dir / "default", args=args)
    if checksums is not None:
        differ = sorted(
            k for k, v in checkpoint_files.state_checksums(state).items() if checksums.get(k) != v
        )
        if differ:
            raise UnreadableCheckpointError(
                step_dir.parent,
                int(step_dir.name),
                f"{len(differ)} arrays do not match the checksums recorded when it was saved "
                f"(e.g. {differ[0]}): their bytes were changed",
            )
    return state


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([int(ok)], np.int32))))


def restore_newest(
    mngr: ocp.CheckpointManager,
    abstract_state: Any,
    steps: list[int] | None = None,
    *,
    move_damaged: bool = False,
    log=None,
) -> tuple[int | None, Any]:
    """(step, state) of the newest readable checkpoint among `steps` (all of `mngr`'s by
    default), or (None, `abstract_state`) when there is none. Each unreadable one newer than
    it is reported in one line through `log` and, with `move_damaged` (training, so a later
    save of the same step does not collide with it), renamed to `<step>.damaged-<time>`,
    never deleted. CheckpointError when every checkpoint is unreadable."""
    log = log or logs.log
    directory = epath.Path(mngr.directory)
    steps = sorted(mngr.all_steps() if steps is None else steps, reverse=True)
    damaged: list[UnreadableCheckpointError] = []
    for step in steps:
        try:
            state = restore(mngr, step, abstract_state, log=log)
        except UnreadableCheckpointError as e:
            damaged.append(e)
            continue
        for bad in damaged:
            if move_damaged:
                moved = move_aside(directory, bad.step, bad.reason)
                log(
                    f"Checkpoint {bad.step} in {directory} is unreadable: {bad.reason}; "
                    f"moved it to {moved.name} (kept, not deleted); using step {step}."
                )
            else:
                log(
                    f"Checkpoint {bad.step} in {directory} is unreadable: {bad.reason}; "
                    f"using step {step}."
                )
        if move_damaged and damaged:
            mngr.reload()
        return step, state
    if damaged:
        raise CheckpointError(
            f"no readable checkpoint in {directory}: "
            + "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
            + ". Nothing was changed: copy an intact checkpoint back, or move these step "
            "folders out of the way to start from scratch."
        )
    return None, abstract_state


def move_aside(directory: epath.Path, step: int, reason: str) -> epath.Path:
    """Renames checkpoint `step` to `<step>.damaged-<time>` (a name orbax ignores) on the
    chief, while every process waits; CheckpointError when it cannot be renamed."""
    directory = epath.Path(directory)
    target = directory / f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    error = None
    if logs.is_chief():
        try:
            (directory / str(step)).rename(target)
        except Exception as e:  # noqa: BLE001 - e.g. a directory rename the store refuses
            error = e
    if not _all_processes(error is None):
        why = f"{type(error).__name__}: {error}" if error else "failed on the chief"
        raise CheckpointError(
            f"checkpoint {step} in {directory} is unreadable ({reason}) and could not be "
            f"renamed to {target.name} ({why}); move it out of {directory} by hand (nothing "
            "was deleted), then rerun"
        )
    return target


def _shapes(tree) -> dict[str, tuple | None]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        checkpoint_files.path_name(path): (
            None if getattr(leaf, "shape", None) is None else tuple(leaf.shape)
        )
        for path, leaf in leaves
    }


def _structure_mismatch(abstract_state: Any, saved: Any) -> str | None:
    """What differs between the leaves (names, shapes) of `abstract_state` and those a
    checkpoint's metadata lists; None when they agree (or the metadata lists none)."""
    mine, theirs = _shapes(abstract_state), _shapes(saved)
    if not theirs:
        return None
    parts = []
    missing, extra = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
    if missing:
        parts.append(f"{len(missing)} entries are not in it (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} of its entries are not in this state (e.g. {extra[0]})")
    differ = sorted(
        k
        for k in mine.keys() & theirs.keys()
        if None not in (mine[k], theirs[k]) and mine[k] != theirs[k]
    )
    if differ:
        k = differ[0]
        parts.append(f"{len(differ)} shapes differ (e.g. {k}: saved {theirs[k]}, here {mine[k]})")
    return "; ".join(parts) or None


def config_path(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / "config.json"


def write_config(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
    path = config_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True).encode())


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict | None:
    path = config_path(workdir)
    if not path.exists():
        return None
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_compatible(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses (ConfigError) a config whose parameter shapes differ from those of the run
    saved in `workdir` (`models.shape_signature`), and warns about other differing network
    fields (e.g. model.num_groups of an imported model)."""
    saved = read_config(workdir)
    if saved is None:
        return
    theirs, mine = models.shape_signature(saved), models.shape_signature(config)
    diffs = [
        f"{k}: workdir has {theirs.get(k)!r}, this config has {v!r}"
        for k, v in mine.items()
        if theirs.get(k) != v
    ]
    if diffs:
        raise errors.ConfigError(
            f"{workdir} holds a run with a different model shape, so it cannot be used with "
            "this config:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --workdir, or set these fields to the workdir's values."
        )
    for name in FUNCTION_FIELDS:
        value, saved_value = config.model.get(name), saved.get("model", {}).get(name)
        if saved_value is not None and value != saved_value:
            logs.log(
                f"warning: config.model.{name}={value!r} but {workdir} was written with "
                f"{saved_value!r}"
            )


# ---------------------------------------------------------------------------------------------
# Reading the checkpoints of a workdir (evaluation, sampling): nothing is created or deleted.


def checkpoints_dir(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / "checkpoints"


def reader(workdir: str | epath.Path) -> ocp.CheckpointManager:
    """A manager that neither creates, deletes nor saves anything."""
    checkpoint_errors.quiet_reported_errors()
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    with checkpoint_errors.without_orbax_logs():
        return ocp.CheckpointManager(checkpoints_dir(workdir), options=options)


def checkpoint_steps(workdir: str | epath.Path) -> list[int]:
    """Steps of the finished checkpoints in `workdir/checkpoints`, ascending."""
    if not checkpoints_dir(workdir).exists():
        return []
    mngr = reader(workdir)
    try:
        return sorted(int(s) for s in mngr.all_steps())
    finally:
        mngr.close()


def restore_step(workdir: str | epath.Path, step: int, abstract_state: Any) -> Any:
    """The state of checkpoint `step`, placed as `abstract_state`'s shardings say
    (UnreadableCheckpointError when it is damaged; see `restore`)."""
    mngr = reader(workdir)
    try:
        return restore(mngr, step, abstract_state)
    finally:
        mngr.close()


def restore_newest_step(
    workdir: str | epath.Path, abstract_state: Any, steps: list[int] | None = None
) -> tuple[int, Any]:
    """(step, state) of the newest readable checkpoint of `workdir` among `steps` (default:
    all), each unreadable newer one reported in a line; CheckpointError when there is none."""
    mngr = reader(workdir)
    try:
        step, state = restore_newest(mngr, abstract_state, steps)
    finally:
        mngr.close()
    if step is None:
        raise CheckpointError(f"no checkpoint in {checkpoints_dir(workdir)}")
    return step, state


def check_workdir_exists(workdir: str | epath.Path) -> None:
    """UserError saying that `workdir` does not exist (a typo?)."""
    if not epath.Path(workdir).exists():
        raise errors.UserError(
            f"the workdir {workdir} does not exist (a typo?); give the --workdir of a training "
            "run, or import released weights with `python -m diffusion_jax.tools.convert "
            "--source SRC --workdir DIR --config FILE`"
        )
