"""Recording as a pipeline: the next batch is read, and the last one written, while this one is decided.

On PostgreSQL the database works on one batch while Python decides another; elsewhere (SQLite,
in process, one writer at a time) each step is done in turn.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from sqlalchemy.engine import Connection, Engine

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], read: Callable[[T], R], threaded: bool) -> Iterator[tuple[T, R]]:
    """Each item with read(item); `threaded`, a thread of its own reads the next item's while the
    caller works on this one (read must open its own connection)."""
    if not threaded:
        for item in items:
            yield item, read(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lead-sync-read") as pool:
        pending = None
        for item in items:
            future = pool.submit(read, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


class Writer:
    """Writes batches (each a function of a connection) in order, one transaction each. On
    PostgreSQL a thread of its own does it, so that the database writes one batch while the next
    is prepared; elsewhere each is written at once. A failed write is raised by the next call."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.threaded = engine.dialect.name == "postgresql"
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[Connection], None]) -> None:
        if not self.threaded:
            with self.engine.begin() as conn:
                write(conn)
            return
        self._check()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lead-sync-writer", daemon=True)
            self._thread.start()
        self._queue.put(write)

    def flush(self) -> None:
        """Wait until everything submitted is committed."""
        if self._thread is not None:
            self._queue.join()
        self._check()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            write = self._queue.get()
            try:
                if write is None:
                    return
                if self._error is None:  # after a failure, the rest is not written
                    with self.engine.begin() as conn:
                        write(conn)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()
