"""The prefetch thread: a daemon thread keeping `config.data.prefetch` batches ready."""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


def _put(out: queue.Queue, stop: threading.Event, item: Any) -> None:
    """Puts `item` into `out`, waiting while it is full, unless `stop` is set first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _produce(make: Callable[[], Iterator[Any]], out: queue.Queue, stop: threading.Event) -> None:
    """Thread body: puts items of `make()` into `out` until exhausted, failed or stopped."""
    item: Any = _END
    it = None
    try:
        it = make()
        for value in it:
            _put(out, stop, (True, value))
            if stop.is_set():
                return
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer.
        item = e
    finally:
        if it is not None and hasattr(it, "close"):
            it.close()
    _put(out, stop, (False, item))


class PrefetchIterator(Iterator[Any]):
    """Runs an iterator in a daemon thread, keeping up to `buffer_size` items ready.

    Exceptions raised in the thread are re-raised by `__next__`. `close()` (also called on
    garbage collection and by `with`) stops the thread; being a daemon, it never blocks
    interpreter exit.
    """

    def __init__(self, make: Callable[[], Iterator[Any]], buffer_size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, buffer_size))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_produce,
            args=(make, self._queue, self._stop),
            daemon=True,
            name="input_pipeline_prefetch",
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._stop.set)

    def __iter__(self) -> PrefetchIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        while True:
            try:
                ok, value = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
        if ok:
            return value
        self._done = True
        if value is _END:
            raise StopIteration
        raise value

    def close(self) -> None:
        """Stops the background thread (idempotent)."""
        self._done = True
        self._stop.set()

    def __enter__(self) -> PrefetchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
