"""Tests of the bundled CutMeShort API sandbox (include/cutmeshort_sandbox)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from cutmeshort_sandbox.server import SandboxServer

TOKEN = "test-token-7f3a"
LEAD = {"eventName": "signup_started", "customerExternalId": "cust-1", "clickId": "click-1"}


class FakeClock:
    """Monotonic clock the tests move by hand, so 60-second windows cost no time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(port=0, token=TOKEN, rate_limit_per_minute=None) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def post(server: SandboxServer, body: Any, token: str | None = TOKEN, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if isinstance(body, (bytes, str)):
        return requests.post(f"{server.url}/track/lead", data=body, headers=headers, timeout=5, **kwargs)
    return requests.post(f"{server.url}/track/lead", json=body, headers=headers, timeout=5, **kwargs)


def set_faults(server: SandboxServer, faults: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{server.url}/_sandbox/faults", json=faults, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def get(server: SandboxServer, what: str) -> Any:
    response = requests.get(f"{server.url}/_sandbox/{what}", timeout=5)
    assert response.status_code == 200
    return response.json()


def lead(n: int, **extra: str) -> dict[str, str]:
    return {"eventName": f"event-{n}", "customerExternalId": f"cust-{n}", "clickId": f"click-{n}", **extra}


# ---- success, auth, routing ---------------------------------------------------------


def test_valid_lead_is_recorded(sandbox: SandboxServer) -> None:
    body = {
        **LEAD,
        "timestamp": "2024-05-01T10:00:00Z",
        "customerName": "Ada Lovelace",
        "customerEmail": "ada@example.com",
        "customerAvatar": "https://cdn.example.com/a.png",
    }
    response = post(sandbox, body)
    assert response.status_code == 200
    payload = response.json()
    assert payload["success"] is True
    assert payload["timestamp"].endswith("Z")
    leads = get(sandbox, "leads")
    assert len(leads) == 1
    received_at = leads[0].pop("received_at")
    assert received_at.endswith("Z")
    assert leads[0] == body


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN}],
)
def test_bad_credentials_get_401(sandbox: SandboxServer, headers: dict[str, str]) -> None:
    response = requests.post(f"{sandbox.url}/track/lead", json=LEAD, headers=headers, timeout=5)
    assert response.status_code == 401
    assert response.json() == {
        "success": False,
        "error": "missing or invalid bearer token",
        "type": "unauthorized",
        "statusCode": 401,
    }
    assert get(sandbox, "leads") == []
    assert get(sandbox, "requests")[0]["authorized"] is False


def test_unknown_routes_are_json_404(sandbox: SandboxServer) -> None:
    for method, path in [("GET", "/track/lead"), ("POST", "/track/sale"), ("GET", "/"), ("DELETE", "/track/lead")]:
        response = requests.request(method, f"{sandbox.url}{path}", timeout=5)
        assert response.status_code == 404
        assert response.json()["type"] == "not_found"
    assert get(sandbox, "requests") == []


def test_token_never_appears_in_inspection(sandbox: SandboxServer) -> None:
    post(sandbox, LEAD)
    post(sandbox, b"not json")
    for what in ("requests", "leads", "stats", "faults"):
        text = requests.get(f"{sandbox.url}/_sandbox/{what}", timeout=5).text
        assert TOKEN not in text
        assert "Authorization" not in text


# ---- body validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"customerExternalId": "c", "clickId": "k"}, "eventName"),
        ({"eventName": "e", "clickId": "k"}, "customerExternalId"),
        ({**LEAD, "eventName": "   "}, "eventName"),
        ({**LEAD, "customerExternalId": ""}, "customerExternalId"),
        ({**LEAD, "eventName": "e" * 256}, "eventName"),
        ({**LEAD, "customerExternalId": "c" * 256}, "customerExternalId"),
        ({**LEAD, "customerName": None}, "customerName"),
        ({**LEAD, "clickId": None}, "clickId"),
        ({**LEAD, "utm_source": "x"}, "utm_source"),
        ({**LEAD, "customerExternalId": 42}, "customerExternalId"),
        ({**LEAD, "customerName": ["a"]}, "customerName"),
        ({**LEAD, "mode": "instant"}, "mode"),
        ({**LEAD, "mode": "Deferred"}, "mode"),
        ({"eventName": "e", "customerExternalId": "c", "mode": "deferred"}, "clickId"),
        ({**LEAD, "clickId": " "}, "clickId"),
        ({**LEAD, "clickId": "k" * 256}, "clickId"),
        ({**LEAD, "timestamp": "2024-05-01T10:00:00"}, "timestamp"),
        ({**LEAD, "timestamp": "2024-05-01"}, "timestamp"),
        ({**LEAD, "timestamp": "yesterday"}, "timestamp"),
        ({**LEAD, "customerEmail": "ada.example.com"}, "customerEmail"),
        ({**LEAD, "customerEmail": "a@b@example.com"}, "customerEmail"),
        ({**LEAD, "customerEmail": "@example.com"}, "customerEmail"),
        ({**LEAD, "customerEmail": "ada@localhost"}, "customerEmail"),
        ({**LEAD, "customerEmail": "ada lovelace@example.com"}, "customerEmail"),
        ({**LEAD, "customerAvatar": "ftp://example.com/a.png"}, "customerAvatar"),
        ({**LEAD, "customerAvatar": "https://"}, "customerAvatar"),
        ({**LEAD, "customerAvatar": "a.png"}, "customerAvatar"),
        ({**LEAD, "customerName": "n" * 256}, "customerName"),
        ({**LEAD, "customerName": "Ada\nLovelace"}, "customerName"),
        ({**LEAD, "eventName": "signup\x00"}, "eventName"),
        ({**LEAD, "clickId": "k\x7f"}, "clickId"),
    ],
)
def test_invalid_bodies_get_422(sandbox: SandboxServer, body: dict[str, Any], field: str) -> None:
    response = post(sandbox, body)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert payload["success"] is False
    assert payload["type"] == "validation_error"
    assert payload["statusCode"] == 422
    assert payload["details"]["field"] == field
    assert get(sandbox, "leads") == []


@pytest.mark.parametrize(
    "extra",
    [
        {"timestamp": "2024-05-01T10:00:00+02:00"},
        {"timestamp": "2024-05-01T10:00:00.123456Z"},
        {"customerName": "n" * 255, "eventName": "e" * 255, "customerExternalId": "c" * 255},
        {"customerAvatar": "http://example.com"},
        {"customerEmail": "first.last+tag@mail.example.co.uk"},
        {"customerName": "Zoë Ünïcode ✓"},
    ],
)
def test_boundary_bodies_are_accepted(sandbox: SandboxServer, extra: dict[str, str]) -> None:
    assert post(sandbox, {**LEAD, **extra}).status_code == 200


@pytest.mark.parametrize("raw", [b"not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b"null"])
def test_non_object_bodies_get_400(sandbox: SandboxServer, raw: bytes) -> None:
    response = post(sandbox, raw)
    assert response.status_code == 400
    assert response.json()["type"] == "bad_request"
    entry = get(sandbox, "requests")[0]
    assert entry["status"] == 400
    if raw in (b"not json", b""):
        assert entry["body"] is None
        assert entry["raw"] == raw.decode()
    if raw == b"[1, 2]":
        assert entry["body"] == [1, 2]
        assert "raw" not in entry


def test_fields_match_the_vendor_sdk_schema() -> None:
    lead_payload = pytest.importorskip("cutmeshort.models.lead_payload").LeadPayload
    from cutmeshort_sandbox.validation import KNOWN_FIELDS

    assert KNOWN_FIELDS == set(lead_payload.model_json_schema()["properties"])


def test_bodies_serialised_by_the_vendor_sdk_are_accepted(sandbox: SandboxServer) -> None:
    lead_payload = pytest.importorskip("cutmeshort.models.lead_payload").LeadPayload
    api_client = pytest.importorskip("cutmeshort.api_client").ApiClient

    event_1 = lead_payload(
        event_name="signup_started",
        customer_external_id="sdk-user",
        click_id="sdk-click",
        mode="deferred",
        timestamp=datetime(2024, 5, 1, 9, 30, tzinfo=timezone.utc),
        customer_email="sdk@example.com",
    )
    event_2 = lead_payload(event_name="email_verified", customer_external_id="sdk-user")
    serialise = api_client().sanitize_for_serialization
    assert post(sandbox, serialise(event_1)).status_code == 200
    assert post(sandbox, serialise(event_2)).status_code == 200


# ---- lead semantics -----------------------------------------------------------------


def test_repeat_of_recorded_event_is_409(sandbox: SandboxServer) -> None:
    assert post(sandbox, LEAD).status_code == 200
    response = post(sandbox, {**LEAD, "clickId": "another-click"})
    assert response.status_code == 409
    assert response.json() == {
        "success": False,
        "error": "this lead event was already recorded",
        "type": "conflict",
        "statusCode": 409,
    }
    assert post(sandbox, {**LEAD, "eventName": "demo_booked"}).status_code == 200
    assert len(get(sandbox, "leads")) == 2


def test_deferred_event_2_needs_event_1(sandbox: SandboxServer) -> None:
    event_1 = {"eventName": "signup_started", "customerExternalId": "u-9", "clickId": "c-9", "mode": "deferred"}
    event_2 = {"eventName": "email_verified", "customerExternalId": "u-9"}

    early = post(sandbox, event_2)
    assert early.status_code == 404
    assert early.json() == {
        "success": False,
        "error": "no deferred lead for this customerExternalId",
        "type": "not_found",
        "statusCode": 404,
    }
    assert post(sandbox, event_1).status_code == 200
    assert post(sandbox, event_2).status_code == 200
    assert post(sandbox, event_2).status_code == 409
    assert [lead["eventName"] for lead in get(sandbox, "leads")] == ["signup_started", "email_verified"]


def test_non_deferred_lead_creates_no_association(sandbox: SandboxServer) -> None:
    assert post(sandbox, LEAD).status_code == 200
    assert post(sandbox, {"eventName": "email_verified", "customerExternalId": "cust-1"}).status_code == 404


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


# ---- inspection ---------------------------------------------------------------------


def test_requests_log_shape(sandbox: SandboxServer) -> None:
    post(sandbox, LEAD)
    post(sandbox, LEAD, token=None)
    entries = get(sandbox, "requests")
    assert [entry["seq"] for entry in entries] == [1, 2]
    first = entries[0]
    assert set(first) == {"seq", "received_at", "body", "authorized", "status", "fault"}
    assert first["body"] == LEAD
    assert (first["authorized"], first["status"], first["fault"]) == (True, 200, None)
    assert (entries[1]["authorized"], entries[1]["status"]) == (False, 401)


def test_stats_busiest_window(clock: FakeClock) -> None:
    with SandboxServer(port=0, token=TOKEN, rate_limit_per_minute=None, clock=clock) as server:
        for _ in range(3):
            post(server, LEAD)  # t=0
        clock.advance(30)
        post(server, LEAD, token="wrong")  # t=30: rejected requests count too
        post(server, lead(2))
        clock.advance(30)
        post(server, lead(3))  # t=60: no longer in the same window as t=0
        clock.advance(40)
        post(server, lead(4))  # t=100: the busiest window is in the past
        stats = get(server, "stats")
        assert stats == {
            "requests": 7,
            "by_status": {"200": 4, "401": 1, "409": 2},
            "resets": 0,
            "leads": 4,
            "max_requests_in_any_60s": 5,
            "rate_limit_per_minute": None,
        }


def test_concurrent_requests_record_each_lead_once(sandbox: SandboxServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bodies = [lead(n % 10) for n in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda body: post(sandbox, body).status_code, bodies))
    assert statuses.count(200) == 10
    assert statuses.count(409) == 30
    assert len(get(sandbox, "leads")) == 10
    assert [entry["seq"] for entry in get(sandbox, "requests")] == list(range(1, 41))


# ---- lifecycle ----------------------------------------------------------------------


def test_stop_closes_the_port() -> None:
    server = SandboxServer(port=0, token=TOKEN).start()
    url = server.url
    session = requests.Session()
    assert session.post(f"{url}/track/lead", json=LEAD, headers={"Authorization": f"Bearer {TOKEN}"}).ok
    server.stop()
    server.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(f"{url}/_sandbox/stats", timeout=2)


def _wait_for_file(path: Path, process: subprocess.Popen[str], timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the sandbox did not write its port file")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_command_line_server(tmp_path: Path, stop_signal: signal.Signals) -> None:
    port_file = tmp_path / "port"
    env = {**os.environ, "CUTMESHORT_SANDBOX_TOKEN": "env-token"}
    command = [
        sys.executable, "-m", "cutmeshort_sandbox", "--port", "0", "--port-file", str(port_file),
        "--rate-limit-per-minute", "3", "--faults", json.dumps({"fail_next": [503]}),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(_wait_for_file(port_file, process))
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": "Bearer env-token"}
        assert requests.post(f"{url}/track/lead", json=LEAD, headers=headers, timeout=5).status_code == 503
        assert requests.post(f"{url}/track/lead", json=LEAD, headers=headers, timeout=5).status_code == 200
        wrong = {"Authorization": "Bearer sandbox-token"}
        assert requests.post(f"{url}/track/lead", json=LEAD, headers=wrong, timeout=5).status_code == 401
        assert requests.get(f"{url}/_sandbox/stats", timeout=5).json()["rate_limit_per_minute"] == 3

        os.kill(process.pid, stop_signal)
        out, err = process.communicate(timeout=10)
        assert process.returncode == 0, err
        assert out == f"CutMeShort sandbox listening on http://127.0.0.1:{port}\n"
        assert list(tmp_path.iterdir()) == [port_file]  # no temporary file left behind
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_command_line_rejects_bad_faults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cutmeshort_sandbox", "--port", "0", "--faults", '{"nope": 1}'],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 2
    assert "unknown fault keys: nope" in result.stderr
