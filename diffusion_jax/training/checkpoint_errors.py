"""Errors of checkpoint storage in a few words, what counts as a storage error, and the filters
that keep the tracebacks orbax and asyncio would print for an error this package reports in
one line off the console."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import sys
from pathlib import PurePath

from etils import epath


@contextlib.contextmanager
def without_orbax_logs():
    """Drops orbax's log records while a manager is built: it reads every step's metadata and
    logs each damaged one as an error, which `restore` reports in one line when it reads it."""
    logger = logging.getLogger("absl")
    quiet = logging.Filter()
    quiet.filter = lambda record: "orbax" not in PurePath(record.pathname).parts
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def is_storage_error(error: BaseException) -> bool:
    """Whether `error` is what storage raises: every exception of its chain an OSError (file
    systems, connections, time-outs), a ValueError (TensorStore's error statuses, JSON that
    does not parse) or orbax's bare `Exception` around one; programming errors (TypeError,
    AttributeError, KeyError, ...) are not."""
    return all(isinstance(e, OSError | ValueError) or type(e) is Exception for e in chain(error))


# TensorStore's status codes of stored bytes that are bad: used only to keep the tracebacks
# orbax logs for an error we report in one line off the console, never to classify it.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


_STATUS = re.compile(r"^([A-Z_]+): ")


_SPEC = re.compile(r"\s*\[(tensorstore_spec|source locations)\b.*", re.S)


def _error_text(error: BaseException, root: str | epath.Path | None = None) -> str:
    text = _SPEC.sub("", str(error)).strip().splitlines()[0] if str(error).strip() else ""
    if root is not None:
        text = text.replace(f"{epath.Path(root)}/", "")
    return text


def chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions a traceback shows below it (raised from, or while handling
    and not suppressed), outermost first; the last is the root cause."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def is_disk_full(error: BaseException) -> bool:
    for e in chain(error):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
    return False


def describe_error(error: BaseException, root: str | epath.Path | None = None) -> str:
    """The root cause of an I/O error in a few words, paths relative to `root`, from the
    innermost exception of its chain: e.g. 'no space left on device', '6/default/d/0a1b...:
    truncated (50589 of 101178 bytes)', 'array params.conv_in.kernel: truncated (1000 of 4096
    bytes)', '6/default/manifest.ocdbt: data loss (...)'."""
    if is_disk_full(error):
        return "no space left on device"
    error = chain(error)[-1]
    text = _error_text(error, root)
    status = _STATUS.match(text)
    files = [f for f in re.findall(r'file "([^"]+)"', text) if not f.endswith("/")]
    array = re.match(r'[A-Z_]+: Error reading "([^"/]+?)(\.value)?/', text)
    where = f"{files[-1]}: " if files else f"array {array[1]}: " if array else ""
    size = re.search(r"byte range \[\d+, (\d+)\) is not valid for value of size (\d+)", text)
    if size:
        why = f"truncated ({size[2]} of {size[1]} bytes)"
    elif isinstance(error, json.JSONDecodeError):
        where, why = "", f"a metadata file is not valid JSON ({error.msg}; truncated?)"
    elif isinstance(error, FileNotFoundError) and error.filename:
        where, why = "", f"{_error_text(OSError(error.filename), root)}: missing"
    elif status and status[1] == "NOT_FOUND":
        why = "missing" if where else text.rsplit(": ", 1)[-1]
    elif status:
        why = f"{status[1].lower().replace('_', ' ')} ({text.rsplit(': ', 1)[-1]})"
    else:
        why = f"{type(error).__name__}: {text}"
    message = where + why
    return message if len(message) <= 300 else message[:297] + "..."


def _reported_by_us(exc: BaseException | None) -> bool:
    """Errors our own one-line reports describe: damaged data, a full disk."""
    if exc is None:
        return False
    if is_disk_full(exc):
        return True
    status = _STATUS.match(_error_text(chain(exc)[-1]))
    return bool(status) and status[1] in _DAMAGE_CODES + ("RESOURCE_EXHAUSTED",)


class _ReportedErrorFilter(logging.Filter):
    """Drops the tracebacks orbax's background threads and asyncio log for an error that is
    also raised to this package's code, which reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        from_orbax = "orbax" in PurePath(record.pathname).parts
        if not (from_orbax or record.name == "asyncio"):
            return True
        return not _reported_by_us(record.exc_info[1])


def quiet_reported_errors() -> None:
    """Installs, once, the filters that keep a failed read or write to our one line:
    `_ReportedErrorFilter`, and an unraisable-exception hook that drops TensorStore's
    callbacks into the event loop of a restore that already failed ("Event loop is closed",
    dozens of tracebacks, printed from TensorStore's threads after the error is raised) and
    the garbage-collected read coroutines of that restore."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ReportedErrorFilter) for f in logger.filters):
            logger.addFilter(_ReportedErrorFilter())
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        exc, where = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return  # TensorStore's callback into the closed loop of a failed restore
        if where is not None and "orbax" in PurePath(where.co_filename).parts:
            return  # a read coroutine of that restore, collected with its error unretrieved
        previous(unraisable)

    hook._drops_closed_loop_callbacks = True
    sys.unraisablehook = hook
