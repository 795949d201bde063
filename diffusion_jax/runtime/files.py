"""Writing files so that a reader never sees a partial one: under a temporary name in the
same folder, then renamed into place (a rename within one folder replaces the old file in
one step on POSIX file systems; on object stores such as GCS, through `etils.epath`, the
new object appears whole)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TypeVar

# pathlib.Path or etils.epath.Path (gs://): whatever has parent, name, replace, exists, unlink.
P = TypeVar("P")


@contextlib.contextmanager
def atomic_path(path: P) -> Iterator[P]:
    """Yields a temporary name in `path`'s folder to write; renames it to `path` (replacing
    an older file) when the block ends, or removes it when the block raises."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
        raise
    tmp.replace(path)


def write_atomic(path: P, data: bytes) -> None:
    """Writes `data` to `path` through `atomic_path`: readers see the old file or the new."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
