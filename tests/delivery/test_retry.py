"""The retry policy: which API answers are retried (`classify`), how they are told in the audit
(`describe`), and the waits between tries on the sender's clock (`retrying`, `RetryPlan`)."""
from __future__ import annotations

import json

import pytest

from lead_sync.delivery.client import ApiResponse, CutMeShortClient
from lead_sync.delivery.retry import (
    CREDENTIALS, DELIVERED, REJECTED, RETRY, RetryPlan, RetryPolicy, classify, describe, retrying,
)

from tests.support import LEAD, TOKEN


def answer(status, body=None, error=None):
    return ApiResponse(status, body, 5, None, error)


@pytest.mark.parametrize("status,kind", [
    (200, DELIVERED), (201, DELIVERED), (202, DELIVERED), (204, DELIVERED), (409, DELIVERED),
    (400, REJECTED), (404, REJECTED), (422, REJECTED), (405, REJECTED), (410, REJECTED), (413, REJECTED),
    (401, CREDENTIALS), (403, CREDENTIALS),
    (408, RETRY), (429, RETRY), (500, RETRY), (502, RETRY), (503, RETRY), (504, RETRY), (599, RETRY),
    (301, RETRY), (307, RETRY), (None, RETRY),
])
def test_classify_every_status_family(status, kind):
    assert classify(answer(status, error=None if status else "ReadTimeout: read timed out")) == kind


def test_describe_is_short_and_names_the_problem():
    body = json.dumps({"success": False, "error": "customerEmail: must be an email address",
                       "type": "validation_error", "statusCode": 422,
                       "details": {"field": "customerEmail", "reason": "must be an email address"}})
    text = describe(answer(422, body))
    assert text.startswith("HTTP 422: customerEmail: must be an email address")
    assert '"field": "customerEmail"' in text
    assert describe(answer(200, '{"success": true}')) == "HTTP 200"
    assert describe(answer(502, "<html>bad   gateway</html>")) == "HTTP 502: <html>bad gateway</html>"
    assert describe(answer(None, error="ConnectionError: reset")) == "no response (ConnectionError: reset)"
    assert len(describe(answer(500, "x" * 5000))) <= 320


def test_describe_of_real_answers_never_includes_the_token(sandbox):
    seen = []
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2.0) as client:
        for faults in ({"fail_next": [500]}, {"fail_next": [422]}, {"burst_429": {"count": 1, "retry_after": 1}},
                       {"revoked": True}, {"revoked": False, "forbidden": True}, {"forbidden": False}):
            sandbox.set_faults(faults)
            response = client.track_lead(LEAD)
            seen.append(response.http_status)
            for text in (describe(response), response.body, response.error):
                assert TOKEN not in str(text)
    assert seen == [500, 422, 429, 401, 403, 200]


# --- retry waits on the sender's clock ----------------------------------------------------

def test_retry_plan_waits_with_jitter_honours_retry_after_and_stops_on_the_injected_clock():
    now = [1_000.0]
    answers = {"busy": None, "later": 7.0}  # an answer's Retry-After
    policy = retrying(RetryPolicy(max_attempts=4, backoff_base_seconds=0.5, backoff_max_seconds=10),
                      deadline=1_020.0, should_retry=lambda a: a != "ok", retry_after=answers.get,
                      sleep=lambda s: None, clock=lambda: now[0])
    plan = RetryPlan(policy)
    assert plan.attempt == 1
    first = plan.after("busy")
    assert 0 <= first <= 0.5 and plan.attempt == 2  # full jitter under 0.5 x 2**0
    assert plan.after("later") == 7.0  # the Retry-After (7 s) is longer than any jitter (<= 1 s)
    # The next try would start after the deadline on the injected clock: no more tries.
    now[0] = 1_019.9
    assert plan.after("later") is None
    # ...while the same answer, earlier on that clock, is retried.
    again = RetryPlan(policy)
    now[0] = 1_000.0
    assert again.after("later") == 7.0
    assert RetryPlan(policy).after("ok") is None  # a final answer
    spent = RetryPlan(policy)
    assert [spent.after("busy") is not None for _ in range(4)] == [True, True, True, False]  # max_attempts
