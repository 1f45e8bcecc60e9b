"""Retry policy: which API answers are retried, and how long to wait before the next try."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, TypeVar

from tenacity import (
    DoSleep,
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from lead_sync.delivery.client import ApiResponse

T = TypeVar("T")

DELIVERED = "delivered"
REJECTED = "rejected"
CREDENTIALS = "credentials"
RETRY = "retry"
UNKNOWN = "unknown"  # no answer (timeout, reset, sender died): the API may have the event


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # per event and run
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    give_up_after_hours: float = 72.0  # across runs, from the first attempt: then `failed`


def classify(response: ApiResponse) -> str:
    """delivered (2xx, 409), rejected (this event is wrong), credentials (401/403) or retry."""
    code = response.http_status
    if code is None:
        return RETRY
    if 200 <= code < 300 or code == 409:
        return DELIVERED
    if code in (401, 403):
        return CREDENTIALS
    if code in (408, 429) or code >= 500 or code < 200 or 300 <= code < 400:
        return RETRY
    return REJECTED


def describe(response: ApiResponse) -> str:
    """A short, token-free account of an answer for the audit."""
    if response.http_status is None:
        return f"no response ({response.error})"
    detail = ""
    if response.body:
        try:
            body = json.loads(response.body)
            if isinstance(body, dict):
                detail = str(body.get("error") or body.get("message") or "")
                if isinstance(body.get("details"), dict) and body["details"]:
                    detail += f" {json.dumps(body['details'], ensure_ascii=False)}"
        except ValueError:
            detail = response.body
    detail = " ".join(detail.split())[:300]
    return f"HTTP {response.http_status}" + (f": {detail}" if detail else "")


class _WaitHonouringRetryAfter:
    """Full-jitter exponential backoff, but never shorter than the server's Retry-After."""

    def __init__(self, policy: RetryPolicy, retry_after: Callable[[object], float | None]) -> None:
        self._jitter = wait_random_exponential(multiplier=policy.backoff_base_seconds, max=policy.backoff_max_seconds)
        self._retry_after = retry_after

    def __call__(self, state: RetryCallState) -> float:
        asked = self._retry_after(state.outcome.result()) if state.outcome and not state.outcome.failed else None
        return max(self._jitter(state), asked or 0.0)


class _StopAtDeadline(stop_base):
    """Stop when the next try would start at or after `deadline`, on the sender's own clock (tenacity's
    stop_before_delay measures on a monotonic clock of its own, which a test cannot move)."""

    def __init__(self, clock: Callable[[], float], deadline: float) -> None:
        self._clock = clock
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._clock() + retry_state.upcoming_sleep >= self._deadline


def retrying(policy: RetryPolicy, deadline: float, should_retry: Callable[[T], bool],
             retry_after: Callable[[T], float | None], sleep: Callable[[float], None],
             clock: Callable[[], float]) -> Retrying:
    """Retries a call while `should_retry(result)`, up to max_attempts, while the next try starts
    before `deadline` (a `clock()` value)."""
    return Retrying(
        retry=retry_if_result(should_retry),
        stop=stop_after_attempt(policy.max_attempts) | _StopAtDeadline(clock, deadline),
        wait=_WaitHonouringRetryAfter(policy, retry_after),
        retry_error_callback=lambda state: state.outcome.result(),
        sleep=sleep,
        reraise=True,
    )


class RetryPlan:
    """One event's retries under a `retrying` policy, without sleeping in it: `after(result)`
    says how long to wait before the next try, or None when there is none (the result is final,
    the attempts are spent, or the next try would come too late). A sender with many requests in
    flight schedules the waits itself instead of blocking a worker on them."""

    def __init__(self, policy: Retrying) -> None:
        self._policy = policy
        self._state = RetryCallState(policy, None, (), {})

    @property
    def attempt(self) -> int:
        """The number of the attempt whose result comes next (1 for the first)."""
        return self._state.attempt_number

    def after(self, result: object) -> float | None:
        self._policy.begin()  # the policy's statistics are per thread; any thread may report a result
        self._state.set_result(result)
        action = self._policy.iter(self._state)
        if isinstance(action, DoSleep):
            self._state.prepare_for_next_attempt()
            return float(action)
        return None
