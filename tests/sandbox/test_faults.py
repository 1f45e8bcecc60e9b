"""The bundled CutMeShort API sandbox (include/cutmeshort_sandbox) under load and faults: its rate
limit, and the faults a test injects (refusals, 429 bursts, errors, resets, slowness)."""
from __future__ import annotations

import time

import pytest
import requests

from cutmeshort_sandbox.server import SandboxServer

from tests.support.clock import FakeClock
from tests.support.sandbox_http import LEAD, TOKEN, get, lead, post, set_faults


# ---- rate limit ---------------------------------------------------------------------


def test_rate_limit_with_retry_after(clock: FakeClock) -> None:
    with SandboxServer(port=0, token=TOKEN, rate_limit_per_minute=3, clock=clock) as server:
        assert post(server, lead(1)).status_code == 200
        assert post(server, {"eventName": "bad"}).status_code == 422  # counts: it passed auth
        clock.advance(20)
        assert post(server, lead(1)).status_code == 409  # counts too
        assert post(server, lead(2), token="wrong").status_code == 401  # does not count

        limited = post(server, lead(2))
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "40"
        assert limited.json()["statusCode"] == 429

        clock.advance(39.5)
        assert post(server, lead(2)).headers["Retry-After"] == "1"
        clock.advance(0.5)  # both t=0 requests leave the window; the 429s took no slot
        assert post(server, lead(2)).status_code == 200
        assert post(server, lead(3)).status_code == 200
        limited = post(server, lead(4))
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "20"  # the t=20 request frees the next slot
        assert server.stats()["by_status"] == {"200": 3, "401": 1, "409": 1, "422": 1, "429": 3}


def test_rate_limit_without_retry_after(clock: FakeClock) -> None:
    with SandboxServer(port=0, token=TOKEN, rate_limit_per_minute=3, clock=clock) as server:
        set_faults(server, {"retry_after_header": False})
        for n in range(3):
            assert post(server, lead(n)).status_code == 200
        limited = post(server, lead(4))
        assert limited.status_code == 429
        assert "Retry-After" not in limited.headers


def test_rate_limit_can_be_switched_at_run_time(sandbox: SandboxServer) -> None:
    for n in range(3):
        assert post(sandbox, lead(n)).status_code == 200
    set_faults(sandbox, {"rate_limit_per_minute": 3})
    assert post(sandbox, lead(3)).status_code == 429
    set_faults(sandbox, {"rate_limit_per_minute": 0})
    assert post(sandbox, lead(3)).status_code == 200


# ---- faults -------------------------------------------------------------------------


def test_revoked_and_forbidden(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"revoked": True})
    revoked = post(sandbox, LEAD)
    assert revoked.status_code == 401
    assert revoked.json()["type"] == "unauthorized"
    set_faults(sandbox, {"revoked": False, "forbidden": True})
    forbidden = post(sandbox, LEAD)
    assert forbidden.status_code == 403
    assert forbidden.json()["type"] == "forbidden"
    set_faults(sandbox, {"forbidden": False})
    assert post(sandbox, LEAD).status_code == 200
    assert [entry["fault"] for entry in get(sandbox, "requests")] == ["revoked", "forbidden", None]


def test_burst_429_with_and_without_retry_after(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"burst_429": {"count": 2, "retry_after": 7}})
    for _ in range(2):
        response = post(sandbox, LEAD)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "7"
    assert post(sandbox, LEAD).status_code == 200

    set_faults(sandbox, {"burst_429": {"count": 1, "retry_after": None}})
    response = post(sandbox, lead(2))
    assert response.status_code == 429
    assert "Retry-After" not in response.headers
    assert post(sandbox, lead(2)).status_code == 200
    assert get(sandbox, "faults")["burst_429"] is None


def test_injected_429s_take_no_rate_limit_slot(clock: FakeClock) -> None:
    with SandboxServer(port=0, token=TOKEN, rate_limit_per_minute=3, clock=clock) as server:
        set_faults(server, {"burst_429": {"count": 2, "retry_after": 1}, "fail_next": [429, 500]})
        assert [post(server, lead(n)).status_code for n in range(7)] == [429, 429, 429, 500, 200, 200, 429]


def test_fail_next_answers_in_order(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"fail_next": [500, 422, 503]})
    assert [post(sandbox, LEAD).status_code for _ in range(4)] == [500, 422, 503, 200]
    assert get(sandbox, "faults")["fail_next"] == []
    assert len(get(sandbox, "leads")) == 1
    assert [entry["fault"] for entry in get(sandbox, "requests")] == ["fail_next"] * 3 + [None]


def test_error_rate_is_reproducible_with_seed(sandbox: SandboxServer) -> None:
    def run() -> list[int]:
        set_faults(sandbox, {"error_rate": 0.5, "error_status": 500, "seed": 1234})
        return [post(sandbox, lead(n)).status_code for n in range(20)]

    first = run()
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5)
    second = run()
    assert first == second
    assert set(first) == {200, 500}
    assert len(get(sandbox, "leads")) == first.count(200)


def test_error_rate_one_uses_default_status(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"error_rate": 1})
    response = post(sandbox, LEAD)
    assert response.status_code == 503
    assert response.json()["type"] == "service_unavailable"


def test_permanent_errors_per_customer(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"permanent_errors": {"cust-bad": 422, "cust-down": 500}})
    for _ in range(2):
        assert post(sandbox, {**LEAD, "customerExternalId": "cust-bad"}).status_code == 422
        assert post(sandbox, {**LEAD, "customerExternalId": "cust-down"}).status_code == 500
    assert post(sandbox, LEAD).status_code == 200
    assert [lead["customerExternalId"] for lead in get(sandbox, "leads")] == ["cust-1"]


def test_reset_rate_resets_the_connection(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"reset_rate": 1})
    with pytest.raises(requests.exceptions.ConnectionError):
        post(sandbox, LEAD)
    set_faults(sandbox, {"reset_rate": 0})
    assert post(sandbox, LEAD).status_code == 200
    entries = get(sandbox, "requests")
    assert [(entry["status"], entry["fault"]) for entry in entries] == [(None, "reset_rate"), (200, None)]
    stats = get(sandbox, "stats")
    assert stats["resets"] == 1
    assert stats["requests"] == 2
    assert stats["by_status"] == {"200": 1}


def test_slow_requests_exceed_client_timeout(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"slow_rate": 1, "slow_ms": 400})
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(
            f"{sandbox.url}/track/lead", json=LEAD, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=0.1
        )
    # The server still finishes the request after its delay.
    deadline = time.monotonic() + 3
    while get(sandbox, "requests")[0]["status"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert get(sandbox, "requests")[0]["status"] == 200
    assert get(sandbox, "requests")[0]["fault"] == "slow_rate"


def test_latency_delays_every_response() -> None:
    with SandboxServer(port=0, token=TOKEN, latency_ms=150) as server:
        started = time.monotonic()
        assert post(server, LEAD, token="wrong").status_code == 401
        assert post(server, LEAD).status_code == 200
        assert time.monotonic() - started >= 0.3
        assert get(server, "faults")["latency_ms"] == 150
        set_faults(server, {"latency_ms": 0})
        started = time.monotonic()
        post(server, lead(2))
        assert time.monotonic() - started < 0.15


def test_faults_are_merged_and_checked(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"error_rate": 0.25})
    merged = set_faults(sandbox, {"error_status": 502})
    assert merged["error_rate"] == 0.25
    assert merged["error_status"] == 502
    assert get(sandbox, "faults") == merged
    for bad in ({"no_such_fault": 1}, {"error_rate": 2}, {"fail_next": [200]}, {"revoked": "yes"}, [1]):
        response = requests.post(f"{sandbox.url}/_sandbox/faults", json=bad, timeout=5)
        assert response.status_code == 400
    bad_json = requests.post(f"{sandbox.url}/_sandbox/faults", data=b"{", timeout=5)
    assert bad_json.status_code == 400
    assert get(sandbox, "faults") == merged


def test_check_order_auth_before_faults(sandbox: SandboxServer) -> None:
    set_faults(sandbox, {"fail_next": [500]})
    assert post(sandbox, LEAD, token="wrong").status_code == 401
    assert post(sandbox, {"bad": "body"}).status_code == 500  # faults come before validation
    assert post(sandbox, {"bad": "body"}).status_code == 422


def test_reset_restores_startup_settings() -> None:
    startup = {"permanent_errors": {"cust-x": 500}}
    with SandboxServer(port=0, token=TOKEN, rate_limit_per_minute=5, faults=startup) as server:
        post(server, LEAD)
        set_faults(server, {"revoked": True, "rate_limit_per_minute": 1, "permanent_errors": {}})
        post(server, lead(2))
        response = requests.post(f"{server.url}/_sandbox/reset", timeout=5)
        assert response.status_code == 200
        assert get(server, "requests") == []
        assert get(server, "leads") == []
        faults = get(server, "faults")
        assert faults["revoked"] is False
        assert faults["rate_limit_per_minute"] == 5
        assert faults["permanent_errors"] == {"cust-x": 500}
        assert post(server, LEAD).status_code == 200  # the recorded pair was forgotten
        assert get(server, "stats")["requests"] == 1


