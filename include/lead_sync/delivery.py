"""Delivery: send every open event once, in order, within the rate limit and the time budget."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy.engine import Engine

from . import claims
from .claims import Claim, Outcome
from .clock import utcnow
from .client import ApiResponse, CutMeShortClient
from .events import DELIVERED, FAILED, REJECTED
from .ratelimit import SharedRateLimiter
from .retry import CREDENTIALS, RETRY, UNKNOWN, RetryPolicy, classify, describe, retrying

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
    label = UNKNOWN if response.http_status is None else RETRY
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


class _OutOfTime(Exception):
    pass


class Sender:
    """Delivers open events for one run. Its state lives in the warehouse, not here."""

    def __init__(self, engine: Engine, client: CutMeShortClient, limiter: SharedRateLimiter,
                 policy: RetryPolicy, run_id: str, deadline: float, credentials_hint: str = "",
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 progress_every: float = PROGRESS_SECONDS,
                 ticks: Callable[[threading.Event, float], bool] | None = None,
                 max_events: int | None = None) -> None:
        self.engine = engine
        self.client = client
        self.limiter = limiter
        self.policy = policy
        self.run_id = run_id
        self.deadline = deadline  # time.time() value
        self.credentials_hint = credentials_hint
        self.sleep = sleep
        # A lease outlives any request the client can make (connect + read timeouts).
        self.lease_seconds = 2 * client.timeout_seconds + 10
        self.report = SendReport()
        self.clock = clock  # for the progress log's rate only
        self.progress_every = progress_every
        # How the progress log waits for its next line: a real wait, unless a test steps it.
        self._ticks = ticks or (lambda stopped, seconds: stopped.wait(seconds))
        self._started = clock()
        # A batch's share: it stops taking events after this many; the run's other batches take the rest.
        self.max_events = max_events
        self._taken = 0
        # Holds an event between its retries in this run (see claims.settle), so that no other
        # sender, such as another batch of the same run, tries it meanwhile.
        self.token = uuid.uuid4().hex

    def seconds_left(self) -> float:
        return self.deadline - time.time()

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
            return self._run()
        finally:
            stopped.set()
            reporter.join()

    def _run(self) -> SendReport:
        started = utcnow()
        self.report.recovered_unknown += claims.recover_abandoned(self.engine, self.run_id)
        self._send_all(started)
        # Events a stopped sender left leased can be taken once the lease runs out.
        expiry = claims.next_lease_expiry(self.engine)
        if expiry is not None and not self.report.budget_exhausted and not self._share_done():
            wait = (expiry - utcnow()).total_seconds() + 0.5
            if wait < self.seconds_left():
                log.info("waiting %.1fs for in-flight leases of an earlier sender to expire", max(wait, 0))
                self.sleep(max(wait, 0))
                self.report.recovered_unknown += claims.recover_abandoned(self.engine, self.run_id)
                self._send_all(started)
        return self.report

    def _send_all(self, started: datetime) -> None:
        # Event 1s first, then the event 2s whose event 1 is now delivered.
        for confirms in (False, True):
            while not self.report.budget_exhausted:
                keys = claims.sendable_keys(self.engine, confirms, started)
                if not keys:
                    break
                for key in keys:
                    if self.seconds_left() <= 0:
                        self.report.budget_exhausted = True
                        break
                    if self._share_done():
                        return
                    self._deliver(key)

    def _share_done(self) -> bool:
        return self.max_events is not None and self._taken >= self.max_events

    def _deliver(self, key: str) -> None:
        payload = claims.outbox_body(self.engine, key)
        if payload is None:
            return
        tries = 0  # attempts by this run; max_attempts counts these
        held = False  # kept from other senders until this one retries it or lets it go

        def attempt() -> Outcome | None:
            nonlocal tries, held
            if not self.limiter.acquire(self.deadline):
                raise _OutOfTime
            taken = claims.claim(self.engine, key, self.run_id, self.lease_seconds, self.token)
            if taken is None:
                # Another sender took it, or it closed meanwhile: no request, so the slot goes back
                # (senders working the same backlog would otherwise waste the shared budget).
                self.limiter.release()
                return None
            if tries == 0:
                self._taken += 1
            tries += 1
            sent_at = utcnow()
            response = self.client.track_lead(payload)
            self.report.count(response)
            outcome = decide(response, tries, self.policy, taken)
            claims.settle(self.engine, key, taken.attempt, self.run_id, sent_at, outcome,
                          hold_seconds=self.policy.backoff_max_seconds + self.lease_seconds)
            held = outcome.status is None and outcome.next_attempt_at is None
            if outcome.outcome == CREDENTIALS:
                raise CredentialsRefused(
                    f"the CutMeShort API refused the token ({describe(response)}); "
                    f"check the password of connection {self.credentials_hint or 'cutmeshort_default'}. "
                    "Open events stay pending."
                )
            return outcome

        policy = retrying(
            self.policy, self.seconds_left(),
            should_retry=lambda o: o is not None and o.status is None,
            retry_after=lambda o: o.retry_after if o is not None else None,
            sleep=self.sleep,
        )
        try:
            outcome = policy(attempt)
        except _OutOfTime:
            self.report.budget_exhausted = True
            return
        finally:
            if held:
                claims.unhold(self.engine, key, self.token)
        if outcome is None:
            return
        if outcome.status == DELIVERED:
            self.report.delivered += 1
        elif outcome.status == REJECTED:
            self.report.rejected += 1
        elif outcome.status == FAILED:
            self.report.failed += 1
        elif outcome.next_attempt_at is not None:
            self.report.left_open += 1  # this run's attempts are spent: a later run retries it
        else:
            self.report.budget_exhausted = True  # stopped retrying for lack of time: stays open
