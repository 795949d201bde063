"""What a checkpoint's files are, as recorded when it was written, and the evidence that they
are not: the record of every file with its size and CRC-32 (`FILES_NAME`, written by orbax's
post-finalisation callback `FileRecorder` before the step's folder is renamed into place), and
a checksum of every array (`state_checksums`, kept in orbax's step metadata)."""

from __future__ import annotations

import errno
import json
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax.runtime import files, logs


class FileRecorder:
    """Orbax's post-finalisation callback: writes `FILES_NAME` (every file of the step being
    saved, its size and CRC-32) into the step's folder once orbax has written all of it and
    before it renames the folder into place. Runs in orbax's background thread; the chief
    writes, the other processes do nothing."""

    def __init__(self, directory: epath.Path):
        self.directory, self.step = directory, None

    def __call__(self) -> None:
        if self.step is None or not logs.is_chief():
            return
        unfinished = sorted(self.directory.glob(f"{self.step}.orbax-checkpoint-tmp*"))
        step_dir = unfinished[-1] if unfinished else self.directory / str(self.step)
        record = {"files": {rel: [size, crc] for rel, size, crc in list_files(step_dir)}}
        files.write_atomic(step_dir / FILES_NAME, json.dumps(record, sort_keys=True).encode())


# The key of the per-array checksums in orbax's step metadata (`_CHECKPOINT_METADATA`).
CHECKSUMS_KEY = "diffusion_jax_checksums"


# The record of a checkpoint's files, in the step's folder, and the key in the step metadata
# that says one was written (a checkpoint of an older version has neither).
FILES_NAME, FILES_KEY = "diffusion_jax_files.json", "diffusion_jax_files"


STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's metadata file of a step, JSON


_CHECKSUM_MULTIPLIER = 0x9E3779B1  # odd, so i -> i * m is a bijection of uint32


# Files orbax writes after the recorder runs (the step metadata, rewritten with the commit
# time and checked by parsing it; commit markers), and the record itself.
_UNRECORDED = (STEP_METADATA, "commit_success.txt", FILES_NAME)


def list_files(step_dir: epath.Path) -> list[tuple[str, int, int]]:
    """(path relative to `step_dir`, size, CRC-32) of every recorded file below `step_dir`."""
    found, folders = [], [step_dir]
    while folders:
        for path in folders.pop().iterdir():
            if path.is_dir():
                folders.append(path)
            elif path.name not in _UNRECORDED:
                found.append((str(path.relative_to(step_dir)), *_size_and_crc(path)))
    return sorted(found)


def _size_and_crc(path: epath.Path) -> tuple[int, int]:
    size, crc = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return size, crc


def damage_evidence(step_dir: epath.Path) -> str | None:
    """Why the files of the checkpoint in `step_dir` are not those that were written (a few
    words), or None when they are, or when it was written without a record of its files.
    What the storage raises while they are read propagates (the storage did not answer)."""
    if not step_dir.exists():  # it was listed a moment ago
        raise FileNotFoundError(errno.ENOENT, "the checkpoint's folder is not listed", step_dir)
    try:
        text = (step_dir / STEP_METADATA).read_text()
    except FileNotFoundError:
        return f"{STEP_METADATA}: missing"
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        return f"{STEP_METADATA}: not valid JSON ({e.msg}; {len(text)} bytes)"
    if not (metadata.get("custom_metadata") or {}).get(FILES_KEY):
        return None  # written before files were recorded
    try:
        recorded = json.loads((step_dir / FILES_NAME).read_text())["files"]
    except FileNotFoundError:
        return f"{FILES_NAME}: missing"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{FILES_NAME}: not valid (it was whole when written)"
    for rel, (size, crc) in sorted(recorded.items()):
        path = step_dir / rel
        if not path.exists():
            return f"{rel}: missing"
        actual, actual_crc = _size_and_crc(path)
        if actual != size:
            how = "emptied" if actual == 0 else "truncated" if actual < size else "grown"
            return f"{rel}: {how} ({actual} of {size} bytes)"
        if actual_crc != crc:
            return f"{rel}: its bytes differ from those written (CRC-32)"
    return None


def legacy_damage(directory: epath.Path, step: int) -> bool:
    """For a checkpoint without a record of its files, the rule from before files were
    recorded: a read that failed on every try while every file of the step reads is damage."""
    step_dir = directory / str(step)
    try:
        metadata = json.loads((step_dir / STEP_METADATA).read_text())
        if (metadata.get("custom_metadata") or {}).get(FILES_KEY):
            return False
        list_files(step_dir)
    except Exception:  # noqa: BLE001 - the storage does not answer: not damage
        return False
    return True


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """[2] uint32 of one array: the sum of its elements' bits and their sum weighted by a
    bijective hash of the flat index, both modulo 2^32. Integer sums wrap exactly, so the
    result does not depend on the array's sharding or the order of the reduction; any change
    of one element changes both."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis in range(x.ndim):
        stride = np.uint32(math.prod(x.shape[axis + 1 :]))
        index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * stride
    weight = index * np.uint32(_CHECKSUM_MULTIPLIER) + np.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


def state_checksums(state: Any) -> dict[str, list[int]]:
    """{array name: [sum of bits, index-weighted sum of bits] (mod 2^32)} of every array in
    `state`, computed on its devices; the same on every process."""
    sums = jax.device_get(_checksums(state))
    leaves = jax.tree_util.tree_flatten_with_path(sums)[0]
    return {path_name(path): [int(v) for v in np.asarray(leaf)] for path, leaf in leaves}


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def path_name(path) -> str:
    return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)
