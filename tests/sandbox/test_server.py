"""The bundled CutMeShort API sandbox (include/cutmeshort_sandbox): what it accepts and records, how it
is inspected, and its life as a server and a command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from cutmeshort_sandbox.server import SandboxServer

from tests.support.clock import FakeClock
from tests.support.sandbox_http import LEAD, TOKEN, get, lead, post


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
