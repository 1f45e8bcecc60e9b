"""The writer of a send's outcomes: a thread that commits the workers' answers in batches.

Each flush is one transaction (two when the limiter keeps its window in another database) with
every answer's attempt row, its event's new state and its slot's new stamp, at least every
FLUSH_SECONDS: an outcome is in the warehouse within 2 s of its response. When the warehouse
refuses a flush (a lost or refused connection, a lock or statement timeout), its answers are
kept and committed once it is back, tried again with backoff for up to WRITE_RETRY_SECONDS.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from lead_sync.delivery import claims
from lead_sync.delivery.claims import Settled
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.events import DEFERRED_START, DELIVERED

log = logging.getLogger(__name__)

# The writer commits answers at least this often (and at once when this many are waiting).
FLUSH_SECONDS = 0.5
FLUSH_ROWS = 500
# A flush the warehouse refuses is tried again (its answers kept, with those that came since) for
# at most this long from the first refusal, real seconds: long enough for a restart or failover of
# the warehouse, and within what a send task may take. The last flush comes at the latest one
# request's timeout after the time budget, and the task's execution_timeout gives it 120 s past
# that (SEND_GRACE_SECONDS in the Airflow operators): the rest is for a last try and the batch's
# audit. Only then does the send fail; the answers not written are recovered as unknown later.
WRITE_RETRY_SECONDS = 90.0
# The waits between those tries: from WRITE_RETRY_FIRST_WAIT, doubling, plus up to WRITE_RETRY_JITTER,
# at most WRITE_RETRY_MAX_WAIT.
WRITE_RETRY_FIRST_WAIT = 0.25
WRITE_RETRY_MAX_WAIT = 4.0
WRITE_RETRY_JITTER = 0.5


def _refused_by_warehouse(exc: BaseException) -> bool:
    """A warehouse error that may pass: a lost or refused connection, a lock or statement timeout,
    a deadlock, no connection free in the pool."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def first_line(exc: BaseException) -> str:
    """An error's class and its message's first line (SQLAlchemy's next lines quote the SQL)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


@dataclass
class _Batch:
    """What one flush takes from the writer's lists."""

    settled: list[tuple[Settled, bool]]
    stamps: list[tuple[int, float]]
    unsent: list[tuple[str, int]]
    unused: list[int]
    oldest: float | None

    def __bool__(self) -> bool:
        return bool(self.settled or self.stamps or self.unsent or self.unused)


class Writer:
    """Commits answers in batches: one transaction per flush, at least every FLUSH_SECONDS
    (real time, whatever clock the sender waits on). A flush the warehouse refuses keeps what it
    took and is tried again (see WRITE_RETRY_SECONDS); meanwhile `stalled` is true."""

    def __init__(self, engine: Engine, run_id: str, limiter: SharedRateLimiter,
                 on_error: Callable[[], None]) -> None:
        self.engine = engine
        self.run_id = run_id
        self.limiter = limiter
        self._on_error = on_error
        self._cond = threading.Condition()
        self._flushing = threading.Lock()
        self._settled: list[tuple[Settled, bool]] = []  # (answer, a deferred event 1 delivered)
        self._stamps: list[tuple[int, float]] = []
        self._unsent: list[tuple[str, int]] = []
        self._unused: list[int] = []
        self._oldest: float | None = None  # time.monotonic() of the oldest thing waiting
        self._keys: Counter = Counter()  # events with an answer not yet committed
        self._firsts = 0  # deliveries of deferred event 1s not committed yet (waiting or being written)
        self.generation = 0  # committed deliveries of deferred event 1s (their event 2s may go)
        self.error: BaseException | None = None
        self._refused_since: float | None = None  # time.monotonic() of the first failed flush since the last commit
        self._closing = False
        self._retrying = Retrying(
            retry=retry_if_exception(_refused_by_warehouse),
            stop=lambda state: self.refused_for() + state.upcoming_sleep > WRITE_RETRY_SECONDS,
            wait=wait_exponential_jitter(multiplier=WRITE_RETRY_FIRST_WAIT, max=WRITE_RETRY_MAX_WAIT,
                                         jitter=WRITE_RETRY_JITTER),
            before_sleep=self._log_wait,
            reraise=True,
        )
        self._thread = threading.Thread(target=self._loop, name="send-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _waiting(self) -> None:
        """Something waits to be written (called under the lock): the writer's timer starts, or it writes now."""
        if self._oldest is None:
            self._oldest = time.monotonic()
            self._cond.notify_all()
        elif len(self._settled) + len(self._unsent) >= FLUSH_ROWS:
            self._cond.notify_all()

    def settled(self, item: Settled, tracking: str | None, stamp: tuple[int, float] | None) -> None:
        first = tracking == DEFERRED_START and item.outcome.status == DELIVERED
        with self._cond:
            self._settled.append((item, first))
            self._keys[item.event_key] += 1
            if stamp is not None:
                self._stamps.append(stamp)
            self._firsts += first
            self._waiting()

    def unsent(self, key: str, attempt: int, slot: int | None) -> None:
        """A claimed event whose request was not sent: its claim and slot go back."""
        with self._cond:
            self._unsent.append((key, attempt))
            if slot is not None:
                self._unused.append(slot)
            self._waiting()

    def give_back(self, slots: list[int | None]) -> None:
        ids = [s for s in slots if s is not None]
        if ids:
            with self._cond:
                self._unused.extend(ids)
                self._waiting()

    def unwritten(self, keys: Iterable[str]) -> bool:
        with self._cond:
            return any(self._keys[k] for k in keys)

    def firsts(self) -> tuple[int, int]:
        """(deliveries of deferred event 1s not committed yet, `generation`), read together."""
        with self._cond:
            return self._firsts, self.generation

    @property
    def stalled(self) -> bool:
        """The warehouse refused the last flush and the writer is trying again (it has not given up)."""
        with self._cond:
            return self._refused_since is not None and self.error is None

    def wait_while_stalled(self, seconds: float) -> None:
        """Wait up to `seconds` (real time) for a stalled writer to commit, or to give up."""
        with self._cond:
            if self._refused_since is not None and self.error is None:
                self._cond.wait(seconds)

    def refused_for(self) -> float:
        """Seconds since the first flush the warehouse refused (0 when the last one committed)."""
        since = self._refused_since
        return 0.0 if since is None else time.monotonic() - since

    def _log_wait(self, state: RetryCallState) -> None:
        with self._cond:
            kept = len(self._settled)
        log.warning("the warehouse refused the outcomes (%s); %d answer(s) kept, trying again in %.1fs "
                    "(refused for %.1fs so far, at most %.0fs)", first_line(state.outcome.exception()), kept,
                    state.upcoming_sleep, self.refused_for(), WRITE_RETRY_SECONDS)

    def flush(self) -> None:
        """Commit everything waiting, in one transaction (two when the limiter keeps its window
        elsewhere). While the warehouse refuses it, it is tried again with whatever came meanwhile,
        for up to WRITE_RETRY_SECONDS since the first refusal; past that (at once for any other
        error) the error is raised, and kept in `error`, and what is waiting stays waiting."""
        with self._flushing:
            try:
                self._retrying(self._flush_once)
            except BaseException as exc:
                with self._cond:
                    self.error = self.error or exc
                    self._cond.notify_all()
                self._on_error()
                raise

    def _take(self) -> _Batch:
        with self._cond:
            batch = _Batch(self._settled, self._stamps, self._unsent, self._unused, self._oldest)
            self._settled, self._stamps, self._unsent, self._unused = [], [], [], []
            self._oldest = None
        return batch

    def _keep(self, batch: _Batch) -> None:
        """A batch not committed goes back, ahead of what came since."""
        with self._cond:
            self._settled[:0] = batch.settled
            self._stamps[:0] = batch.stamps
            self._unsent[:0] = batch.unsent
            self._unused[:0] = batch.unused
            if batch.oldest is not None:
                self._oldest = batch.oldest if self._oldest is None else min(self._oldest, batch.oldest)
            if self._refused_since is None:
                self._refused_since = time.monotonic()

    def _flush_once(self) -> None:
        batch = self._take()
        if not batch:
            return
        slots_here = self.limiter.engine is self.engine
        try:
            with self.engine.begin() as conn:
                claims.settle_many(conn, self.run_id, [item for item, _ in batch.settled])
                claims.release_many(conn, self.run_id, batch.unsent)
                if slots_here:
                    self.limiter.restamp_in(conn, batch.stamps)
                    self.limiter.give_back_in(conn, batch.unused)
        except BaseException:
            self._keep(batch)
            raise
        self._committed(batch.settled)
        if not slots_here and (batch.stamps or batch.unused):
            try:
                with self.limiter.engine.begin() as conn:
                    self.limiter.restamp_in(conn, batch.stamps)
                    self.limiter.give_back_in(conn, batch.unused)
            except BaseException:
                self._keep(_Batch([], batch.stamps, [], batch.unused, batch.oldest))  # the outcomes are in
                raise
        with self._cond:
            if self._refused_since is not None:
                log.info("the warehouse took the outcomes again after %.1fs", self.refused_for())
                self._refused_since = None
                self._cond.notify_all()  # a dispatcher waiting while stalled goes on

    def _committed(self, settled: list[tuple[Settled, bool]]) -> None:
        firsts = sum(1 for _, first in settled if first)
        with self._cond:
            for item, _ in settled:
                self._keys[item.event_key] -= 1
                if not self._keys[item.event_key]:
                    del self._keys[item.event_key]
            self._firsts -= firsts  # counted until committed, so that nobody sees 0 in between
            self.generation += firsts

    def _due(self) -> float | None:
        """Seconds until the next flush is due; None when nothing waits."""
        if self._oldest is None:
            return None
        if len(self._settled) + len(self._unsent) >= FLUSH_ROWS:
            return 0.0
        return max(0.0, self._oldest + FLUSH_SECONDS - time.monotonic())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and self.error is None:
                    due = self._due()
                    if due == 0.0:
                        break
                    self._cond.wait(due)
                if self._closing or self.error is not None:
                    return
            try:
                self.flush()
            except BaseException as exc:  # noqa: BLE001 - kept in self.error, raised by the sender
                log.warning("writing outcomes failed (%s); the send stops", first_line(exc))
                return

    def close(self) -> None:
        """Stop the thread and commit what is left, through the same retries; raises what went
        wrong in any flush."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        if self.error is not None:
            raise self.error

