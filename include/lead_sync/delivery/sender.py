"""Delivery: send every open event once, in order, within the rate limit and the time budget.

How a send runs (`Sender.run`), with up to `max_in_flight` requests on the wire at once:

- the dispatcher (the calling thread) takes rate-limit slots in blocks (one transaction for
  many), claims as many events in one statement, reads their bodies in one query and queues
  them for the workers; it claims only what the workers will send within moments, so that
  every lease covers its request;
- worker threads send one request each at a time and decide each answer (`decide`);
- a writer thread commits the answers, each attempt row with its event's new state and its
  slot's new stamp, in one transaction per flush, at least every FLUSH_SECONDS: an outcome is
  in the warehouse within 2 s of its response. When the warehouse refuses a flush (a lost or
  refused connection, a lock or statement timeout), its answers are kept and committed once it
  is back, tried again with backoff for up to WRITE_RETRY_SECONDS; meanwhile the dispatcher
  claims nothing new, and the requests on the wire go on;
- a progress thread logs a line every 30 s.

Event 2 of a deferred flow is claimed only once its event 1's delivery is committed. Retries
wait in the dispatcher's schedule (backoff with jitter, Retry-After), not in a worker. The
first request of a run goes alone: a refused token (401/403) stops the run after one request.
All waiting is on the injected `clock`/`sleep` (the deadline, retry waits, rate-limit waits),
and the dispatcher only sleeps when nothing is on the wire.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from lead_sync.delivery import claims
from lead_sync.delivery.claims import Claim, Outcome, Settled
from lead_sync.clock import utcnow
from lead_sync.delivery.client import ApiResponse, CutMeShortClient
from lead_sync.events import DEFERRED_START, DELIVERED, FAILED, REJECTED
from lead_sync.delivery.ratelimit import Grant, SharedRateLimiter
from lead_sync.delivery.retry import CREDENTIALS, RETRY, UNKNOWN, RetryPlan, RetryPolicy, classify, describe, retrying

log = logging.getLogger(__name__)


class CredentialsRefused(RuntimeError):
    """The API refused the token (401/403): nothing more can be sent with it."""


@dataclass
class SendReport:
    requests: int = 0
    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    recovered_unknown: int = 0
    left_open: int = 0  # retried without an answer that settles them: later runs go on
    budget_exhausted: bool = False
    by_status: dict[str, int] = field(default_factory=dict)

    def count(self, response: ApiResponse) -> None:
        self.requests += 1
        key = str(response.http_status) if response.http_status is not None else "no_response"
        self.by_status[key] = self.by_status.get(key, 0) + 1


# An event a run leaves open after its attempts waits before the next run tries it again:
# 5 minutes, doubling with every such run, at most an hour.
RETRY_LATER_SECONDS = 300
RETRY_LATER_MAX_SECONDS = 3600


def retry_later_delay(attempt: int, max_attempts: int) -> timedelta:
    rounds = max(1, attempt // max(max_attempts, 1))
    return timedelta(seconds=min(RETRY_LATER_SECONDS * 2 ** (rounds - 1), RETRY_LATER_MAX_SECONDS))


def decide(response: ApiResponse, attempt_in_run: int, policy: RetryPolicy, claim: Claim | None = None,
           now: datetime | None = None) -> Outcome:
    """Turn one answer into the event's next state.

    A retryable answer on the run's last attempt leaves the event pending for later runs,
    until it has been retried for `give_up_after_hours` since `claim.retry_since`: then it fails.
    """
    kind = classify(response)
    text = describe(response)
    base = dict(http_status=response.http_status, latency_ms=response.latency_ms, error=response.error,
                response=response.body, retry_after=response.retry_after)
    if kind == "delivered":
        reason = "API answered 409 (already recorded): counted as delivered" if response.http_status == 409 else None
        return Outcome(DELIVERED, status=DELIVERED, reason=reason, **base)
    if kind == "rejected":
        return Outcome(REJECTED, status=REJECTED, reason=f"rejected by the API: {text}", **base)
    if kind == CREDENTIALS:
        return Outcome(CREDENTIALS, status=None, reason=None, **base)
    # Without an answer the API may or may not have the event: the audit says so, and a
    # later 409 for the same event shows it had.
    label = UNKNOWN if response.http_status is None and response.sent else RETRY
    if attempt_in_run < policy.max_attempts:
        return Outcome(label, status=None, reason=f"retrying: {text}", **base)
    now = now or utcnow()
    since = claim.retry_since if claim is not None else now
    attempt = claim.attempt if claim is not None else attempt_in_run
    hours = (now - since).total_seconds() / 3600
    if hours >= policy.give_up_after_hours:
        return Outcome(FAILED, status=FAILED,
                       reason=f"gave up after {hours:.1f} h of retries ({attempt} attempts; "
                              f"give_up_after_hours is {policy.give_up_after_hours:g}): {text}", **base)
    later = now + retry_later_delay(attempt, policy.max_attempts)
    give_up_at = since + timedelta(hours=policy.give_up_after_hours)
    return Outcome(label, status=None, next_attempt_at=later,
                   reason=f"retrying: {text} ({attempt} attempts so far; next try after "
                          f"{later:%Y-%m-%d %H:%M} UTC, gives up after {give_up_at:%Y-%m-%d %H:%M} UTC)", **base)


PROGRESS_SECONDS = 30.0

# Requests in flight when `max_in_flight` is not set: enough to send a whole window's allowance
# (the rate limit) within BURST_SECONDS at the latency measured so far, at most DEFAULT_MAX_IN_FLIGHT.
# A sliding window gives slots back at the pace they were spent, so however long the first
# minute's requests take to go out, every later minute's take as long again: spending the
# allowance in a moment is what lets a backlog go out at the full limit.
DEFAULT_MAX_IN_FLIGHT = 128
BURST_SECONDS = 0.2
# Events claimed ahead of the workers: what they send in this long at the rate measured over the
# last second (so a lease never waits long for its request), at most BACKLOG_MAX.
BACKLOG_SECONDS = 0.5
BACKLOG_MAX = 256
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
# While requests are on the wire the dispatcher waits for their answers, looking again this often.
POLL_SECONDS = 0.05
# A full window frees its slots one by one: while requests are on the wire, the sender asks for
# more at most this often.
GRANT_GATHER_SECONDS = 0.01
# Waiting for the leases an earlier sender left, a sender looks again this often whether they are still there.
LEASE_LOOK_SECONDS = 2.0
# Workers started that have not had their first answer yet (each opens its connection with its
# first request), at most: a burst of new connections can overflow a server's accept queue (with
# 32, a loaded Celery deployment test saw attempts audited `retry`), and at a long round trip too
# few hold back how fast the requests in flight grow (4 held make bench (f) near 90 events/s).
CONNECTING_AT_ONCE = 8
# A queued request is not sent when its lease would end less than this (plus a request's timeout) later.
LEASE_SPARE_SECONDS = 5.0


@dataclass(eq=False)
class _Event:
    key: str
    payload: dict
    plan: RetryPlan | None = None  # made at its first retryable answer (most events need none)
    tries: int = 0  # attempts by this run; max_attempts counts these


@dataclass(eq=False)
class _Job:
    event: _Event
    claim: Claim
    grant: Grant
    claimed_at: float  # the sender's clock


def _refused_by_warehouse(exc: BaseException) -> bool:
    """A warehouse error that may pass: a lost or refused connection, a lock or statement timeout,
    a deadlock, no connection free in the pool."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _first_line(exc: BaseException) -> str:
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


class _Writer:
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

    def unwritten(self, keys) -> bool:
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
                    "(refused for %.1fs so far, at most %.0fs)", _first_line(state.outcome.exception()), kept,
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
                log.warning("writing outcomes failed (%s); the send stops", _first_line(exc))
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


class Sender:
    """Delivers open events for one run. Its state lives in the warehouse, not here."""

    def __init__(self, engine: Engine, client: CutMeShortClient, limiter: SharedRateLimiter,
                 policy: RetryPolicy, run_id: str, deadline: float, credentials_hint: str = "",
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time,
                 progress_every: float = PROGRESS_SECONDS,
                 ticks: Callable[[threading.Event, float], bool] | None = None,
                 max_events: int | None = None, max_in_flight: int | None = None) -> None:
        self.engine = engine
        self.client = client
        self.limiter = limiter
        self.policy = policy
        self.run_id = run_id
        self.deadline = deadline  # a clock() value
        self.credentials_hint = credentials_hint
        # Wall seconds and a way to wait on them: the deadline, retry and rate-limit waits, the
        # timestamps the sender writes, the progress rate. Tests step them; requests stay real.
        self.sleep = sleep
        self.clock = clock
        # A lease outlives any request the client can make (connect + read timeouts).
        self.lease_seconds = 2 * client.timeout_seconds + 10
        self.report = SendReport()
        self.progress_every = progress_every
        # How the progress log waits for its next line: a real wait, unless a test steps it.
        self._ticks = ticks or (lambda stopped, seconds: stopped.wait(seconds))
        self._started = clock()
        # A batch's share: it stops taking events after this many; the run's other batches take the rest.
        self.max_events = max_events
        self._taken = 0
        # Holds an event between its retries in this run (see claims.Settled), so that no other
        # sender, such as another batch of the same run, tries it meanwhile.
        self.token = uuid.uuid4().hex
        # None: sized from the rate limit and the latency measured so far (DEFAULT_MAX_IN_FLIGHT at most).
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._writer: _Writer | None = None
        self._stopping = False
        self._outstanding = 0  # claimed and queued or on the wire, not answered yet
        # A delivery wakes the dispatcher once no more than this many are outstanding (any answer,
        # unless it waits to claim a block); every other answer, and the last one, always do.
        self._wake_at: float = math.inf
        self._answered = 0
        self._latency: float | None = None  # seconds, moving average
        self._cpu: float | None = None  # CPU seconds this process spends per request, moving average
        self._fastest: float | None = None  # the shortest round trip so far, seconds
        self._recent: deque[float] = deque()  # time.monotonic() of the answers of the last second
        self._first_answer: float | None = None  # time.monotonic() of the first answer
        self._limit = 1  # requests in flight allowed now: the first one goes alone
        self._retries: list[tuple[float, int, _Event]] = []  # (due, order, event), a heap
        self._order = itertools.count()
        self._pause_until = 0.0  # a 429 with Retry-After: nothing is sent before then
        self._grants: list[Grant] = []  # granted, not used yet
        self._slot_at = 0.0  # no slot is free before then (the limiter said so)
        self._refused: ApiResponse | None = None
        self._failure: BaseException | None = None
        self.peak_in_flight = 0
        self._in_flight = 0
        self._connecting = 0  # workers started that have not made their first request yet
        self._retry_policy = self._retrying()

    def seconds_left(self) -> float:
        return self.deadline - self.clock()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), timezone.utc)

    def progress(self) -> str:
        """Events settled and left, the rate so far, and an ETA."""
        now = self.clock()
        done = self.report.delivered + self.report.rejected + self.report.failed
        left = claims.count_sendable(self.engine)
        rate = done / max(now - self._started, 1e-9)
        eta = f"{left / rate:,.0f}s" if rate > 0 else "unknown"
        return (f"progress: {done} event(s) settled ({self.report.requests} requests), {left} left, "
                f"{rate:.1f} events/s, ETA {eta}")

    def _log_progress(self, stopped: threading.Event) -> None:
        # A thread of its own: a line every `progress_every` seconds, also while the sender
        # waits for the rate limit or a Retry-After.
        while not self._ticks(stopped, self.progress_every):
            try:
                log.info(self.progress())
            except Exception:  # noqa: BLE001 - a progress line must never stop a send
                log.warning("progress: not available this time", exc_info=True)

    def run(self) -> SendReport:
        stopped = threading.Event()
        reporter = threading.Thread(target=self._log_progress, args=(stopped,), name="send-progress", daemon=True)
        reporter.start()
        try:
            self._writer = _Writer(self.engine, self.run_id, self.limiter, self._wake)
            self._writer.start()
            try:
                self._run()
            except BaseException:
                self._shut_down(quiet=True)
                raise
            self._shut_down(quiet=False)
            if self._refused is not None:
                raise CredentialsRefused(
                    f"the CutMeShort API refused the token ({describe(self._refused)}); "
                    f"check the password of connection {self.credentials_hint or 'cutmeshort_default'}. "
                    "Open events stay pending."
                )
            return self.report
        finally:
            stopped.set()
            reporter.join()

    def _run(self) -> None:
        started = self._now()
        self.report.recovered_unknown += claims.recover_abandoned(self.engine, self.run_id, now=started)
        self._send_all(started)
        if self._refused is not None:
            return
        # Events a stopped sender left leased can be taken once their leases run out (those taken
        # since this sender started are not for it to send: a sender beside it has them). It waits
        # for all of them when that fits in the time left, else for those that run out first,
        # looking again every LEASE_LOOK_SECONDS: leases of a sender that is still working (one
        # that started a little earlier) end with its answers, and then there is nothing to wait for.
        logged = False
        while not self.report.budget_exhausted and not self._share_done():
            first, last = claims.lease_expiries(self.engine, taken_before=started)
            if first is None:
                return
            now = self._now()
            wait = (last - now).total_seconds() + 0.5
            if wait >= self.seconds_left():
                wait = (first - now).total_seconds() + 0.5
                if wait >= self.seconds_left():
                    return
            if not logged:
                log.info("waiting up to %.1fs for in-flight leases of an earlier sender to expire", max(wait, 0))
                logged = True
            if wait > LEASE_LOOK_SECONDS:
                self._rest(LEASE_LOOK_SECONDS)
                continue
            self._rest(max(wait, 0))
            recovered = claims.recover_abandoned(self.engine, self.run_id, now=self._now())
            self.report.recovered_unknown += recovered
            self._send_all(started)
            if self._refused is not None or not recovered:
                return

    def _share_done(self) -> bool:
        return self.max_events is not None and self._taken >= self.max_events

    # --- the dispatcher ---------------------------------------------------------------------------

    def _send_all(self, started: datetime) -> None:
        """Claim and queue events until none is left (or time, share or credentials run out), then
        wait for every answer and commit them."""
        try:
            self._dispatch(started)
        except BaseException:
            self._stopping = True  # what is queued is not sent; `run` waits for what is on the wire
            raise
        self._drain()

    def _dispatch(self, started: datetime) -> None:
        firsts_left = True
        confirms_seen: int | None = None  # writer generation when event 2s last ran short
        while True:
            self._raise_failure()
            if self._refused is not None:
                return
            if self._writer.stalled:
                # The warehouse refuses the answers: nothing new is claimed until they are in (or the
                # writer gives up); the requests on the wire go on, their answers kept.
                self._writer.wait_while_stalled(POLL_SECONDS)
                continue
            now = self.clock()
            with self._lock:
                outstanding = self._outstanding
                due = [event for at, _, event in self._retries if at <= now]
                later = self._retries[0][0] if self._retries else None
                capacity = self._limit + self._backlog() - outstanding
            self._spawn_workers()
            firsts_unwritten, generation = self._writer.firsts()
            # The batch's share bounds what it takes; each deferred event 1 it delivered lets it take
            # one event 2 more (that event 2 may qualify only once the share is taken).
            firsts_room = room = None
            if self.max_events is not None:
                firsts_room = self.max_events - self._taken
                room = firsts_room + generation
            firsts = firsts_left and (firsts_room is None or firsts_room > 0)
            confirms = (confirms_seen is None or generation > confirms_seen) and (room is None or room > 0)
            new_possible = firsts or confirms
            if now >= self.deadline:
                if self._retries or (new_possible and self._has_work(started, firsts, confirms)):
                    self.report.budget_exhausted = True
                return
            if now < self._pause_until:
                if not outstanding and self._nothing_left(started, firsts, confirms, firsts_unwritten):
                    return
                if not self._idle_until(self._pause_until, outstanding):
                    return
                continue
            wanted_new = 0
            if new_possible:
                wanted_new = max(0, capacity - len(due))
                if room is not None:
                    wanted_new = min(wanted_new, room)
            retry = due[:max(capacity, 0)]
            if not retry and not wanted_new:
                if outstanding:
                    self._wait_for_answers(later)
                    continue
                if firsts_unwritten:
                    self._writer.flush()  # their event 2s may go now
                    continue
                if later is not None:
                    if not self._idle_until(later, 0):
                        return
                    continue
                return
            threshold = max(1, self._backlog() // 2)
            if outstanding and capacity < threshold:
                # Claim in blocks, not one event per answer: woken once that many are answered.
                self._wait_for_answers(later, wake_at=outstanding - (threshold - capacity))
                continue
            if now < self._slot_at and not self._grants:
                grants, wait = [], self._slot_at - now  # no slot frees before then: no need to ask
            else:
                grants, wait = self._take_grants(len(retry) + wanted_new)
                if not grants:
                    # Ask again once the next slot frees, or a little later while requests are on
                    # the wire (to take several slots per transaction, not one per answer).
                    self._slot_at = now + max(wait, GRANT_GATHER_SECONDS if outstanding else 0.0)
            if not grants:
                if outstanding:
                    self._wait_for_answers(now + wait)
                    continue
                if self._nothing_left(started, firsts, confirms, firsts_unwritten):
                    return  # no need to wait for a slot to find out
                if self.clock() + wait > self.deadline:
                    self.report.budget_exhausted = True
                    return
                self._rest(wait)
                continue
            retry = retry[:len(grants)]
            wanted_new = min(wanted_new, len(grants) - len(retry))
            taken = self._claim(started, retry, wanted_new, firsts, confirms, firsts_room)
            if taken.firsts_short:
                firsts_left = False
            if taken.confirms_short:
                confirms_seen = generation
            self._queue(taken, retry, grants)

    def _has_work(self, started: datetime, firsts: bool = True, confirms: bool = True) -> bool:
        """Whether an event of the kinds this sender may still take is there to take (a read)."""
        now = self._now()
        return any(claims.sendable_keys(self.engine, kind, started, 1, now)
                   for kind, wanted in ((False, firsts), (True, confirms)) if wanted)

    def _nothing_left(self, started: datetime, firsts: bool, confirms: bool, firsts_unwritten: int) -> bool:
        """Nothing on the wire: is anything left for this sender? (Its answers committed first:
        an event 1 delivered lets its event 2 go.)"""
        if self._retries:
            return False
        if firsts_unwritten:
            self._writer.flush()
            generation = self._writer.firsts()[1]
            confirms = self.max_events is None or self.max_events + generation > self._taken
        return not self._has_work(started, firsts, confirms)

    def _idle_until(self, moment: float, outstanding: int) -> bool:
        """Nothing to send before `moment`: wait for it (for the answers first); False when it is past the deadline."""
        if outstanding:
            self._wait_for_answers(moment)
            return True
        if moment >= self.deadline:
            self.report.budget_exhausted = True
            return False
        self._rest(max(moment - self.clock(), 0.0))
        return True

    def _rest(self, seconds: float) -> None:
        """Wait with nothing on the wire: the slots not used go back and every answer is committed first."""
        self._give_back_grants()
        self._writer.flush()
        self.sleep(seconds)

    def _wait_for_answers(self, until: float | None, wake_at: int | None = None) -> None:
        """Wait for an answer (real time, a short while: the sender's clock may be a test's); with
        `wake_at`, until no more than that many are outstanding (or anything else happens)."""
        timeout = POLL_SECONDS if until is None else min(POLL_SECONDS, max(until - self.clock(), 0.001))
        with self._cond:
            if self._outstanding and self._failure is None and self._writer.error is None:
                self._wake_at = self._outstanding if wake_at is None else wake_at
                self._cond.wait(timeout)
                self._wake_at = math.inf

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._writer.error is not None:
            raise self._writer.error

    def _backlog(self) -> int:
        """Events to claim beyond those on the wire: what the workers send in BACKLOG_SECONDS."""
        if not self._answered:
            return 0
        now = time.monotonic()
        while self._recent and self._recent[0] < now - 1.0:
            self._recent.popleft()
        # The rate over the last second, or over the time since the first answer when that is shorter
        # (in a run's first second, counting a whole second would claim in tiny blocks).
        seconds = min(1.0, max(now - self._first_answer, 0.05))
        return min(BACKLOG_MAX, int(len(self._recent) / seconds * BACKLOG_SECONDS))

    def _take_grants(self, count: int) -> tuple[list[Grant], float]:
        """Slots for `count` requests: those still fresh from the last block, then a new block."""
        fresh = self.limiter.clock() - self.limiter.margin_seconds
        stale = [g for g in self._grants if g.granted_at < fresh]
        if stale:
            self._give_back_grants(stale)
        grants = [g for g in self._grants if g.granted_at >= fresh]
        self._grants = []
        wait = 0.0
        if len(grants) < count:
            more, wait = self.limiter.try_acquire_many(count - len(grants))
            grants += more
        self._grants = grants[count:]
        return grants[:count], wait

    def _give_back_grants(self, grants: list[Grant] | None = None) -> None:
        """Slots taken and not used go back at once (another sender, or this one, may use them):
        those too old to use now, and all before a wait."""
        if grants is None:
            grants, self._grants = self._grants, []
        if grants:
            self.limiter.give_back([g.slot for g in grants])
            self._slot_at = 0.0  # a slot may be free now

    def _claim(self, started: datetime, retry: list[_Event], new: int, firsts: bool,
               confirms: bool, firsts_limit: int | None) -> claims.Claimed:
        keys = [event.key for event in retry]
        if keys and self._writer.unwritten(keys):
            self._writer.flush()  # the earlier answer first: its commit ends the earlier claim
        taken = claims.claim_many(self.engine, self.run_id, self.lease_seconds, started, keys=keys, new=new,
                                  firsts=firsts, confirms=confirms, firsts_limit=firsts_limit, sender=self.token,
                                  now=self._now())
        with self._lock:
            # Tried again now, or taken by another sender (or closed) meanwhile: out of the schedule.
            self._retries = [entry for entry in self._retries if entry[2] not in retry]
            heapq.heapify(self._retries)
        return taken

    def _queue(self, taken: claims.Claimed, retry: list[_Event], grants: list[Grant]) -> None:
        by_key = {event.key: event for event in retry}
        now = self.clock()
        grants = list(grants)
        jobs = []
        for claim in taken.claims:
            event = by_key.get(claim.event_key)
            if event is None:
                self._taken += 1
                payload = taken.bodies.get(claim.event_key)
                if payload is None:  # its body went meanwhile (the event was closed): nothing to send
                    self._writer.unsent(claim.event_key, claim.attempt, None)
                    continue
                event = _Event(claim.event_key, payload)
            event.tries += 1
            jobs.append(_Job(event, claim, grants.pop(0), now))
        self._grants = grants + self._grants  # slots left over: the next block uses them first
        with self._lock:
            self._outstanding += len(jobs)
        self._spawn_workers()
        for job in jobs:
            self._jobs.put(job)

    def _spawn_workers(self) -> None:
        """Workers up to the requests allowed in flight, at most CONNECTING_AT_ONCE of them opening
        their connection at a time (a burst of new connections can overflow a server's accept queue:
        the ones dropped wait a second for TCP to try again)."""
        with self._lock:
            new = min(self._limit, max(self._outstanding, 1)) - len(self._workers)
            new = min(new, CONNECTING_AT_ONCE - self._connecting)
            self._connecting += max(new, 0)
        for _ in range(new):
            worker = threading.Thread(target=self._work, name=f"send-worker-{len(self._workers)}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _retrying(self):
        return retrying(
            self.policy, self.deadline,
            should_retry=lambda o: o.status is None and o.outcome != CREDENTIALS,
            retry_after=lambda o: o.retry_after,
            sleep=self.sleep, clock=self.clock,
        )

    def _drain(self) -> None:
        """Wait until every queued request is answered (or given back), then commit the answers."""
        while True:
            with self._cond:
                if not self._outstanding:
                    break
                self._cond.wait(POLL_SECONDS)
        if self._writer.error is None:
            self._writer.flush()

    def _shut_down(self, quiet: bool) -> None:
        """Stop: what is queued goes back unsent, the answers of what is on the wire are committed."""
        self._stopping = True
        try:
            self._drain()
        except BaseException:  # noqa: BLE001
            if not quiet:
                raise
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join()
        self._workers = []
        if self._grants:
            self._writer.give_back([g.slot for g in self._grants])
            self._grants = []
        try:
            self._writer.close()
            claims.let_go(self.engine, self.token)  # the retries this sender will not make now
        except BaseException as exc:  # noqa: BLE001
            if not quiet:
                raise
            log.warning("the last outcomes could not be written (%s); their events are recovered as unknown",
                        _first_line(exc))
        if not quiet and self._failure is not None:
            raise self._failure

    # --- the workers --------------------------------------------------------------------------------

    def _work(self) -> None:
        connecting = True
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                try:
                    self._send(job)
                except BaseException as exc:  # noqa: BLE001 - the dispatcher raises it
                    with self._cond:
                        self._failure = self._failure or exc
                        self._outstanding -= 1
                        self._cond.notify_all()
                if connecting:
                    connecting = False
                    with self._cond:
                        self._connecting -= 1
                        self._cond.notify_all()
        finally:
            if connecting:
                with self._cond:
                    self._connecting -= 1
            close = getattr(self.client, "close_thread_connection", None)
            if close is not None:
                close()

    def _send(self, job: _Job) -> None:
        claim, event = job.claim, job.event
        late = job.claimed_at + self.lease_seconds - self.client.timeout_seconds - LEASE_SPARE_SECONDS
        if self._stopping or self._refused is not None or self._failure is not None or self.clock() > late:
            self._writer.unsent(claim.event_key, claim.attempt, job.grant.slot)
            event.tries -= 1
            with self._cond:
                self._outstanding -= 1
                self._cond.notify_all()
            return
        sent_at = self._now()
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        began, cpu = time.monotonic(), time.thread_time()
        try:
            response = self.client.track_lead(event.payload)
        finally:
            with self._lock:
                self._in_flight -= 1
        spent, cpu = time.monotonic() - began, time.thread_time() - cpu
        answered = self.clock()
        answered_at = datetime.fromtimestamp(answered, timezone.utc)
        outcome = decide(response, event.tries, self.policy, claim, now=answered_at)
        stamp = None
        if job.grant.slot is not None:  # its slot counts from the answer on (never earlier than the API's count)
            stamp = (job.grant.slot, max(self.limiter.clock(), job.grant.granted_at))
        wait = None
        if outcome.status is None and outcome.outcome != CREDENTIALS:
            if event.plan is None:
                # One policy for all of them: tenacity keeps its per-call state per thread.
                event.plan = RetryPlan(self._retry_policy)
            wait = event.plan.after(outcome)  # None: no more tries in this run
        # Tried again by this sender after `wait`: held by it until then (and a lease's time more).
        hold = None if wait is None else wait + self.lease_seconds
        self._writer.settled(Settled(claim.event_key, claim.attempt, sent_at, outcome, answered_at, hold),
                             claim.tracking, stamp)
        with self._cond:
            self._answered_one(spent, cpu)
            self.report.count(response)
            if outcome.outcome == CREDENTIALS:
                self._refused = self._refused or response
            elif outcome.status == DELIVERED:
                self.report.delivered += 1
            elif outcome.status == REJECTED:
                self.report.rejected += 1
            elif outcome.status == FAILED:
                self.report.failed += 1
            elif wait is not None:
                heapq.heappush(self._retries, (answered + wait, next(self._order), event))
            elif outcome.next_attempt_at is not None:
                self.report.left_open += 1  # this run's attempts are spent: a later run retries it
            else:
                self.report.budget_exhausted = True  # stopped retrying for lack of time: stays open
            if response.http_status == 429 and response.retry_after:
                self._pause_until = max(self._pause_until, answered + response.retry_after)
            self._outstanding -= 1
            if self._outstanding <= self._wake_at or outcome.status != DELIVERED:
                self._cond.notify_all()

    def _answered_one(self, seconds: float, cpu: float) -> None:
        """Count an answer (under the lock); size the requests in flight from what was measured:
        a request's time on the wire (`seconds`) and the CPU time this process spent on it."""
        self._answered += 1
        self._recent.append(time.monotonic())
        if self._first_answer is None:
            self._first_answer = self._recent[-1]
        self._latency = seconds if self._latency is None else 0.8 * self._latency + 0.2 * seconds
        self._cpu = cpu if self._cpu is None else 0.8 * self._cpu + 0.2 * cpu
        self._fastest = seconds if self._fastest is None else min(self._fastest, seconds)
        if self.max_in_flight is not None:
            most = self.max_in_flight
        else:
            per_minute = self.limiter.per_minute
            sized = (DEFAULT_MAX_IN_FLIGHT if not per_minute
                     else math.ceil(per_minute * self._latency / BURST_SECONDS))
            # Beyond a round trip's time (the fastest seen: without queueing) over the CPU time this
            # process spends per request, more threads only wait for this process's CPU (a fast API
            # on the same network): they slow every request down, and the sender with it.
            busy = math.ceil(self._fastest / max(self._cpu, 1e-6)) + 1
            most = min(DEFAULT_MAX_IN_FLIGHT, max(1, min(sized, busy)))
        # One request first, then up to twice as many as were answered so far (connections open a
        # few at a time), up to `most`; never fewer than it was.
        self._limit = max(self._limit, min(most, 2 * self._answered))
