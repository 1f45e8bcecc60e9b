"""The outcome policy (contract section 5): what one API answer makes of its event, and what a
send reports. No warehouse, no HTTP: answers are made here."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from lead_sync.delivery.claims import Claim
from lead_sync.delivery.client import ApiResponse
from lead_sync.delivery.policy import (
    RETRY_LATER_MAX_SECONDS, RETRY_LATER_SECONDS, SendReport, decide, retry_later_delay,
)
from lead_sync.delivery.retry import CREDENTIALS, RETRY, UNKNOWN, RetryPolicy
from lead_sync.events import DELIVERED, FAILED, REJECTED

NOW = datetime(2026, 11, 27, 8, 0, tzinfo=timezone.utc)
POLICY = RetryPolicy(max_attempts=3, give_up_after_hours=72)


def answer(status: int | None, body: str | None = None, error: str | None = None, retry_after: float | None = None,
           sent: bool = True) -> ApiResponse:
    return ApiResponse(status, body, 12, retry_after, error, sent=sent)


def claim(attempt: int, retried_for: timedelta) -> Claim:
    """An event at its `attempt`-th attempt over all runs, retried since `retried_for` ago."""
    return Claim(attempt, NOW - retried_for, "key-1")


# --- final answers ---------------------------------------------------------------------------

@pytest.mark.parametrize("attempt", [1, POLICY.max_attempts])
def test_a_2xx_delivers_at_any_attempt_and_keeps_what_the_api_answered(attempt):
    outcome = decide(answer(201, '{"success": true}'), attempt, POLICY, claim(attempt, timedelta(hours=100)), NOW)
    assert (outcome.outcome, outcome.status, outcome.reason) == (DELIVERED, DELIVERED, None)
    assert (outcome.http_status, outcome.latency_ms, outcome.response) == (201, 12, '{"success": true}')
    assert outcome.next_attempt_at is None


def test_a_409_counts_as_delivered_and_says_so():
    outcome = decide(answer(409), 1, POLICY, now=NOW)
    assert (outcome.outcome, outcome.status) == (DELIVERED, DELIVERED)
    assert "409" in outcome.reason and "already recorded" in outcome.reason


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_client_error_rejects_at_once_quoting_the_api(status):
    outcome = decide(answer(status, '{"error": "clickId: required"}'), 1, POLICY, now=NOW)
    assert (outcome.outcome, outcome.status) == (REJECTED, REJECTED)
    assert outcome.reason == f"rejected by the API: HTTP {status}: clickId: required"


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_leaves_the_event_as_it_is(status):
    outcome = decide(answer(status), POLICY.max_attempts, POLICY, claim(9, timedelta(hours=100)), NOW)
    assert (outcome.outcome, outcome.status, outcome.reason, outcome.next_attempt_at) == (CREDENTIALS, None, None, None)


# --- retryable answers -----------------------------------------------------------------------

@pytest.mark.parametrize("response", [answer(500), answer(429, retry_after=7.0), answer(None, error="ReadTimeout")])
def test_a_retryable_answer_before_the_runs_last_attempt_keeps_the_event_open_for_this_run(response):
    outcome = decide(response, POLICY.max_attempts - 1, POLICY, claim(2, timedelta(hours=100)), NOW)
    assert outcome.status is None and outcome.next_attempt_at is None  # this run tries again
    assert outcome.reason.startswith("retrying: ")
    assert outcome.retry_after == response.retry_after


def test_a_request_that_provably_never_left_is_a_retry_not_an_unknown_outcome():
    # Before: a refused connection, a failed DNS lookup or TLS handshake was audited `unknown`,
    # as if the API might have the event.
    never_left = ApiResponse(None, None, 3, None, "ConnectionError: connection refused", sent=False)
    no_answer = ApiResponse(None, None, 3, None, "ReadTimeout: no whole answer within timeout_seconds")
    assert decide(never_left, 1, POLICY).outcome == RETRY
    assert decide(no_answer, 1, POLICY).outcome == UNKNOWN


def test_the_runs_last_attempt_leaves_the_event_to_a_later_run_within_give_up_after_hours():
    event = claim(POLICY.max_attempts, timedelta(hours=POLICY.give_up_after_hours - 1))
    outcome = decide(answer(503), POLICY.max_attempts, POLICY, event, NOW)
    assert (outcome.outcome, outcome.status) == (RETRY, None)
    assert outcome.next_attempt_at == NOW + retry_later_delay(event.attempt, POLICY.max_attempts)
    give_up_at = event.retry_since + timedelta(hours=POLICY.give_up_after_hours)
    assert outcome.reason.startswith("retrying: HTTP 503 (3 attempts so far; next try after ")
    assert f"gives up after {give_up_at:%Y-%m-%d %H:%M} UTC" in outcome.reason


@pytest.mark.parametrize("over", [timedelta(0), timedelta(hours=5)])
def test_the_runs_last_attempt_past_give_up_after_hours_fails_the_event(over):
    event = claim(9, timedelta(hours=POLICY.give_up_after_hours) + over)
    outcome = decide(answer(None, error="ReadTimeout"), POLICY.max_attempts, POLICY, event, NOW)
    assert (outcome.outcome, outcome.status, outcome.next_attempt_at) == (FAILED, FAILED, None)
    assert outcome.reason.startswith("gave up after ") and "(9 attempts; give_up_after_hours is 72)" in outcome.reason
    assert outcome.reason.endswith("no response (ReadTimeout)")


def test_a_later_runs_wait_starts_at_retry_later_seconds_doubles_per_run_up_to_the_maximum():
    per_run = POLICY.max_attempts
    waits = [retry_later_delay(per_run * run, per_run).total_seconds() for run in range(1, 12)]
    assert waits[0] == RETRY_LATER_SECONDS
    assert all(later in (2 * earlier, RETRY_LATER_MAX_SECONDS) for earlier, later in zip(waits, waits[1:]))
    assert waits[-1] == RETRY_LATER_MAX_SECONDS and max(waits) == RETRY_LATER_MAX_SECONDS
    # Attempts within one run's share count as that run.
    assert retry_later_delay(per_run + 1, per_run) == retry_later_delay(per_run, per_run)


# --- the report --------------------------------------------------------------------------------

def test_the_report_counts_requests_by_status_and_those_without_an_answer():
    report = SendReport()
    for response in (answer(200), answer(429), answer(200), answer(None, error="ReadTimeout")):
        report.count(response)
    assert report.requests == 4
    assert report.by_status == {"200": 2, "429": 1, "no_response": 1}
