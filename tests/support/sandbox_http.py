"""The sandbox as a client sees it over HTTP: a lead, posting one, its control and inspection routes."""
from __future__ import annotations

from typing import Any

import requests

from cutmeshort_sandbox.server import SandboxServer

# The token these tests start their sandboxes with, and a lead it takes.
TOKEN = "test-token-7f3a"
LEAD = {"eventName": "signup_started", "customerExternalId": "cust-1", "clickId": "click-1"}


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
