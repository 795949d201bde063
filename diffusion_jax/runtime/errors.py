"""The project's one error type for problems a user can fix, and how command lines report it.

A `UserError` (a bad config value, a missing dataset or workdir, an unreadable checkpoint, a
converter input of the wrong kind) ends a command in one line on stderr and exit code 1. Any
other exception is a bug and keeps its traceback. `--debug` on a command line, or the
environment variable `DIFFUSION_JAX_DEBUG=1`, shows the traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

DEBUG_ENV = "DIFFUSION_JAX_DEBUG"


class UserError(Exception):
    """A problem with the user's input or environment; the message is one line saying what is
    wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that is not allowed (a ValueError too, for callers that expect one)."""


def check_choice(field: str, value: object, allowed: Iterable[object]) -> None:
    """ConfigError naming `field`, its `value` and the `allowed` ones, unless it is one."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(
            f"{field}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}"
        )


class InputError(UserError, ValueError):
    """A file or folder the user named holds something other than what it should: converter
    sources, weights, statistics, TFRecords."""


@contextlib.contextmanager
def reported(debug: bool = False) -> Iterator[None]:
    """Runs a command's body: a UserError becomes `error: <message>` and exit 1 (its traceback
    only with `debug` or DIFFUSION_JAX_DEBUG set and not 0); Ctrl-C exits 130; every other
    exception propagates with its traceback."""
    debug = debug or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    try:
        yield
    except UserError as e:
        if debug:
            raise
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        sys.exit(130)
