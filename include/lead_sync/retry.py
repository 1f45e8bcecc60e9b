"""Retry policy: which API answers are retried, and how long to wait before the next try."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from .client import ApiResponse

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


def retrying(policy: RetryPolicy, seconds_left: float, should_retry: Callable[[T], bool],
             retry_after: Callable[[T], float | None], sleep: Callable[[float], None]) -> Retrying:
    """Retries a call while `should_retry(result)`, up to max_attempts, within the time left."""
    return Retrying(
        retry=retry_if_result(should_retry),
        stop=stop_after_attempt(policy.max_attempts) | stop_before_delay(max(seconds_left, 0.0)),
        wait=_WaitHonouringRetryAfter(policy, retry_after),
        retry_error_callback=lambda state: state.outcome.result(),
        sleep=sleep,
        reraise=True,
    )
