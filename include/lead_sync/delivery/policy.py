"""The outcome policy: what one API answer makes of its event, and what a send reports.

A final answer closes the event (delivered, rejected); a retryable one keeps it open, to be
tried again in this run or, its run's attempts spent, by a later run after a wait that grows
run by run, until it has been retried for `give_up_after_hours`: then it fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from lead_sync.clock import utcnow
from lead_sync.delivery.claims import Claim, Outcome
from lead_sync.delivery.client import ApiResponse
from lead_sync.delivery.retry import CREDENTIALS, RETRY, UNKNOWN, RetryPolicy, classify, describe
from lead_sync.events import DELIVERED, FAILED, REJECTED


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
    """How long an event left open at its `attempt`-th attempt (over all runs) waits for the next run."""
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
