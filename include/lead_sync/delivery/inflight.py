"""The requests on the wire: worker threads send the jobs the dispatcher queues, decide each
answer and hand it to the writer.

Each worker sends one request at a time, on a connection of its own. What the dispatcher needs
to know comes back under one condition: how many jobs are still outstanding, the retries
scheduled (with their waits: they are not waited for in a worker), a pause a 429's Retry-After
asked for, a refused token, a failure. The dispatcher waits on that condition for answers, and
is woken once enough of them are in to claim a block (at once for anything but a delivery).
"""
from __future__ import annotations

import heapq
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable

from tenacity import Retrying

from lead_sync.delivery.claims import Claim, Settled
from lead_sync.delivery.client import ApiResponse, CutMeShortClient
from lead_sync.delivery.pace import Pace
from lead_sync.delivery.policy import SendReport, decide
from lead_sync.delivery.ratelimit import Grant, SharedRateLimiter
from lead_sync.delivery.retry import CREDENTIALS, RetryPlan, RetryPolicy
from lead_sync.delivery.writer import Writer
from lead_sync.events import DELIVERED, FAILED, REJECTED

# While requests are on the wire the dispatcher waits for their answers, looking again this often.
POLL_SECONDS = 0.05
# Workers started that have not had their first answer yet (each opens its connection with its
# first request), at most: a burst of new connections can overflow a server's accept queue (with
# 32, a loaded Celery deployment test saw attempts audited `retry`), and at a long round trip too
# few hold back how fast the requests in flight grow (4 held make bench (f) near 90 events/s).
CONNECTING_AT_ONCE = 8
# A queued request is not sent when its lease would end less than this (plus a request's timeout) later.
LEASE_SPARE_SECONDS = 5.0


@dataclass(eq=False)
class Event:
    key: str
    payload: dict
    plan: RetryPlan | None = None  # made at its first retryable answer (most events need none)
    tries: int = 0  # attempts by this run; max_attempts counts these


@dataclass(eq=False)
class Job:
    event: Event
    claim: Claim
    grant: Grant
    claimed_at: float  # the sender's clock


class InFlight:
    """The workers of one send and what they report back. `lock` guards the counts below, and
    `cond` (on that lock) is notified as answers come in."""

    def __init__(self, client: CutMeShortClient, writer: Writer, limiter: SharedRateLimiter, policy: RetryPolicy,
                 retries: Retrying, lease_seconds: float, clock: Callable[[], float], report: SendReport,
                 max_in_flight: int | None) -> None:
        self.client = client
        self.writer = writer
        self.limiter = limiter
        self.policy = policy
        self._retry_policy = retries  # one for all events: tenacity keeps its per-call state per thread
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.report = report
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self.pace = Pace(limiter.per_minute, max_in_flight)
        self.stopping = False  # what is queued is not sent
        self.outstanding = 0  # queued or on the wire, not answered yet
        # A delivery wakes the dispatcher once no more than this many are outstanding (any answer,
        # unless it waits to claim a block); every other answer, and the last one, always do.
        self._wake_at: float = math.inf
        self._retries: list[tuple[float, int, Event]] = []  # (due, order, event), a heap
        self._order = itertools.count()
        self.pause_until = 0.0  # a 429 with Retry-After: nothing is sent before then
        self.refused: ApiResponse | None = None  # the first answer that refused the token
        self.failure: BaseException | None = None  # what went wrong in a worker
        self.peak = 0  # the most requests on the wire at once
        self._in_flight = 0
        self._connecting = 0  # workers started that have not made their first request yet

    # --- what the dispatcher asks --------------------------------------------------------------

    def take_stock(self, now: float) -> tuple[int, list[Event], float | None, int]:
        """Read together: the jobs outstanding, the retries due by `now`, when the next retry is
        due, and the room left (requests allowed in flight and the backlog, less those outstanding)."""
        with self.lock:
            outstanding = self.outstanding
            due = [event for at, _, event in self._retries if at <= now]
            later = self._retries[0][0] if self._retries else None
            room = self.pace.limit + self.pace.backlog() - outstanding
        return outstanding, due, later, room

    def has_retries(self) -> bool:
        return bool(self._retries)

    def backlog(self) -> int:
        return self.pace.backlog()

    def unschedule(self, events: list[Event]) -> None:
        """Claimed again now, or taken by another sender (or closed) meanwhile: out of the schedule."""
        with self.lock:
            self._retries = [entry for entry in self._retries if entry[2] not in events]
            heapq.heapify(self._retries)

    def queue(self, jobs: Iterable[Job]) -> None:
        jobs = list(jobs)
        with self.lock:
            self.outstanding += len(jobs)
        self.spawn()
        for job in jobs:
            self._jobs.put(job)

    def spawn(self) -> None:
        """Workers up to the requests allowed in flight, at most CONNECTING_AT_ONCE of them opening
        their connection at a time (a burst of new connections can overflow a server's accept queue:
        the ones dropped wait a second for TCP to try again)."""
        with self.lock:
            new = min(self.pace.limit, max(self.outstanding, 1)) - len(self._workers)
            new = min(new, CONNECTING_AT_ONCE - self._connecting)
            self._connecting += max(new, 0)
        for _ in range(new):
            worker = threading.Thread(target=self._work, name=f"send-worker-{len(self._workers)}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def wait_for_answers(self, until: float | None, wake_at: int | None = None) -> None:
        """Wait for an answer (real time, a short while: the sender's clock may be a test's); with
        `wake_at`, until no more than that many are outstanding (or anything else happens)."""
        timeout = POLL_SECONDS if until is None else min(POLL_SECONDS, max(until - self.clock(), 0.001))
        with self.cond:
            if self.outstanding and self.failure is None and self.writer.error is None:
                self._wake_at = self.outstanding if wake_at is None else wake_at
                self.cond.wait(timeout)
                self._wake_at = math.inf

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.writer.error is not None:
            raise self.writer.error

    def drain(self) -> None:
        """Wait until every queued job is answered (or given back)."""
        while True:
            with self.cond:
                if not self.outstanding:
                    return
                self.cond.wait(POLL_SECONDS)

    def stop(self) -> None:
        """End the workers, each once it is done with the jobs queued before (`drain` waits for those)."""
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join()
        self._workers = []

    # --- the workers -----------------------------------------------------------------------------

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
                    with self.cond:
                        self.failure = self.failure or exc
                        self.outstanding -= 1
                        self.cond.notify_all()
                if connecting:
                    connecting = False
                    with self.cond:
                        self._connecting -= 1
                        self.cond.notify_all()
        finally:
            if connecting:
                with self.cond:
                    self._connecting -= 1
            close = getattr(self.client, "close_thread_connection", None)
            if close is not None:
                close()

    def _send(self, job: Job) -> None:
        claim, event = job.claim, job.event
        late = job.claimed_at + self.lease_seconds - self.client.timeout_seconds - LEASE_SPARE_SECONDS
        if self.stopping or self.refused is not None or self.failure is not None or self.clock() > late:
            self.writer.unsent(claim.event_key, claim.attempt, job.grant.slot)
            event.tries -= 1
            with self.cond:
                self.outstanding -= 1
                self.cond.notify_all()
            return
        sent_at = datetime.fromtimestamp(self.clock(), timezone.utc)
        with self.lock:
            self._in_flight += 1
            self.peak = max(self.peak, self._in_flight)
        began, cpu = time.monotonic(), time.thread_time()
        try:
            response = self.client.track_lead(event.payload)
        finally:
            with self.lock:
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
                event.plan = RetryPlan(self._retry_policy)
            wait = event.plan.after(outcome)  # None: no more tries in this run
        # Tried again by this sender after `wait`: held by it until then (and a lease's time more).
        hold = None if wait is None else wait + self.lease_seconds
        self.writer.settled(Settled(claim.event_key, claim.attempt, sent_at, outcome, answered_at, hold),
                            claim.tracking, stamp)
        with self.cond:
            self.pace.answered(spent, cpu)
            self.report.count(response)
            if outcome.outcome == CREDENTIALS:
                self.refused = self.refused or response
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
                self.pause_until = max(self.pause_until, answered + response.retry_after)
            self.outstanding -= 1
            if self.outstanding <= self._wake_at or outcome.status != DELIVERED:
                self.cond.notify_all()
