"""What the sandbox knows and decides, independent of HTTP plumbing.

All state sits behind one lock. Request handling is split in two phases so that the
handler can sleep (slow and latency faults) without holding the lock.
"""

from __future__ import annotations

import copy
import hmac
import json
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

from .faults import DEFAULT_FAULTS, merge_faults
from .validation import validate_lead

WINDOW_SECONDS = 60.0


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with a Z suffix, millisecond precision."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def error_body(status: int, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Error body in the vendor's shape: success, error, type, statusCode, details."""
    if status == 422:
        kind = "validation_error"
    else:
        try:
            kind = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            kind = "error"
    body: dict[str, Any] = {"success": False, "error": message, "type": kind, "statusCode": status}
    if details is not None:
        body["details"] = dict(details)
    return body


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class _NotJson:
    """Marker for a body that did not parse as JSON."""


NOT_JSON = _NotJson()


@dataclass
class Ticket:
    """One /track/lead request between the two phases of its handling."""

    entry: dict[str, Any]
    body: Any
    reply: Reply | None = None
    reset: bool = False
    delay_before: float = 0.0
    delay_after: float = 0.0


class SandboxState:
    """Thread-safe emulation of the CutMeShort lead API plus its fault switches."""

    def __init__(
        self,
        token: str,
        faults: Mapping[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._token = token
        self._startup_faults = merge_faults(DEFAULT_FAULTS, faults or {})
        # A monotonic clock keeps rate windows right across wall-clock jumps; tests
        # inject their own to move time without sleeping.
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._faults = copy.deepcopy(self._startup_faults)
        self._random = random.Random(self._faults["seed"])
        self._requests: list[dict[str, Any]] = []
        self._arrivals: list[float] = []
        self._leads: list[dict[str, Any]] = []
        self._recorded: set[tuple[str, str]] = set()
        self._deferred: dict[str, str] = {}
        self._windows: dict[str, deque[float]] = {}

    # ---- inspection and control -------------------------------------------------

    def reset(self) -> None:
        """Forget everything received and go back to the start-up faults."""
        with self._lock:
            self._reset_locked()

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._faults)

    def set_faults(self, update: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `update` into the current faults (FaultError if invalid); return them."""
        with self._lock:
            self._faults = merge_faults(self._faults, update)
            if update.get("seed") is not None:
                self._random.seed(self._faults["seed"])
            return copy.deepcopy(self._faults)

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._requests)

    def leads(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._leads)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_status = Counter(
                str(entry["status"]) for entry in self._requests if entry["status"] is not None
            )
            return {
                "requests": len(self._requests),
                "by_status": dict(sorted(by_status.items())),
                "resets": sum(1 for entry in self._requests if entry["fault"] == "reset_rate"),
                "leads": len(self._leads),
                "max_requests_in_any_60s": self._busiest_window_locked(),
                "rate_limit_per_minute": self._faults["rate_limit_per_minute"],
            }

    def _busiest_window_locked(self) -> int:
        # Arrivals are appended in clock order, so two pointers find the densest window.
        best = start = 0
        for end, arrived in enumerate(self._arrivals):
            while arrived - self._arrivals[start] >= WINDOW_SECONDS:
                start += 1
            best = max(best, end - start + 1)
        return best

    # ---- request handling -------------------------------------------------------

    def admit(self, authorization: str | None, raw: bytes) -> Ticket:
        """Phase one: log the request and apply auth, rate limit and injected faults."""
        body = _parse(raw)
        with self._lock:
            now = self._clock()
            faults = self._faults
            authorized = self._credentials_ok(authorization)
            entry: dict[str, Any] = {
                "seq": len(self._requests) + 1,
                "received_at": utc_now_iso(),
                "body": None if body is NOT_JSON else copy.deepcopy(body),
                "authorized": authorized,
                "status": None,
                "fault": None,
            }
            if body is NOT_JSON:
                entry["raw"] = raw.decode("utf-8", errors="replace")
            self._requests.append(entry)
            self._arrivals.append(now)

            ticket = Ticket(entry=entry, body=body, delay_after=faults["latency_ms"] / 1000)
            if self._draw(faults["reset_rate"]):
                entry["fault"] = "reset_rate"
                ticket.reset = True
                return ticket
            ticket.reply = self._early_reply_locked(entry, body, authorized, now)
            if ticket.reply is not None:
                entry["status"] = ticket.reply.status
            elif self._draw(faults["slow_rate"]):
                entry["fault"] = "slow_rate"
                ticket.delay_before = faults["slow_ms"] / 1000
            return ticket

    def _early_reply_locked(
        self, entry: dict[str, Any], body: Any, authorized: bool, now: float
    ) -> Reply | None:
        faults = self._faults
        if faults["revoked"]:
            entry["fault"] = "revoked"
            return Reply(401, error_body(401, "token has been revoked"))
        if faults["forbidden"]:
            entry["fault"] = "forbidden"
            return Reply(403, error_body(403, "token is not allowed to track leads"))
        if not authorized:
            return Reply(401, error_body(401, "missing or invalid bearer token"))

        window = self._windows.setdefault(self._token, deque())
        while window and now - window[0] >= WINDOW_SECONDS:
            window.popleft()
        limit = faults["rate_limit_per_minute"]
        if limit and len(window) >= limit:
            wait = max(1, math.ceil(window[0] + WINDOW_SECONDS - now))
            headers = {"Retry-After": str(wait)} if faults["retry_after_header"] else {}
            return Reply(429, error_body(429, "rate limit exceeded"), headers)

        reply = self._injected_error_locked(entry, body)
        # A 429 does not use up a slot; every other outcome past auth does.
        if reply is None or reply.status != 429:
            window.append(now)
        return reply

    def _injected_error_locked(self, entry: dict[str, Any], body: Any) -> Reply | None:
        faults = self._faults
        burst = faults["burst_429"]
        if burst:
            burst["count"] -= 1
            if burst["count"] <= 0:
                faults["burst_429"] = None
            entry["fault"] = "burst_429"
            headers = {}
            if burst["retry_after"] is not None:
                headers["Retry-After"] = str(burst["retry_after"])
            return Reply(429, error_body(429, "rate limit exceeded"), headers)
        if faults["fail_next"]:
            entry["fault"] = "fail_next"
            status = faults["fail_next"].pop(0)
            return Reply(status, error_body(status, "injected failure"))
        if self._draw(faults["error_rate"]):
            entry["fault"] = "error_rate"
            status = faults["error_status"]
            return Reply(status, error_body(status, "injected failure"))
        customer = body.get("customerExternalId") if isinstance(body, dict) else None
        if isinstance(customer, str) and customer in faults["permanent_errors"]:
            entry["fault"] = "permanent_errors"
            status = faults["permanent_errors"][customer]
            return Reply(status, error_body(status, "injected failure for this customer"))
        return None

    def complete(self, ticket: Ticket) -> Reply:
        """Phase two: validate the body and apply the lead semantics."""
        body = ticket.body
        if not isinstance(body, dict):
            reply = Reply(400, error_body(400, "body must be a JSON object"))
        elif (problem := validate_lead(body)) is not None:
            details = {"field": problem.field, "reason": problem.reason}
            reply = Reply(422, error_body(422, problem.message, details))
        else:
            with self._lock:
                reply = self._record_locked(body, ticket.entry["received_at"])
        with self._lock:
            ticket.entry["status"] = reply.status
        return reply

    def _record_locked(self, body: dict[str, Any], received_at: str) -> Reply:
        customer, event = body["customerExternalId"], body["eventName"]
        if "clickId" not in body and customer not in self._deferred:
            return Reply(404, error_body(404, "no deferred lead for this customerExternalId"))
        if (customer, event) in self._recorded:
            return Reply(409, error_body(409, "this lead event was already recorded"))
        self._recorded.add((customer, event))
        if body.get("mode") == "deferred":
            self._deferred[customer] = body["clickId"]
        self._leads.append({**copy.deepcopy(body), "received_at": received_at})
        return Reply(200, {"success": True, "timestamp": utc_now_iso()})

    def _credentials_ok(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        # Constant-time comparison, as a real API would do.
        return hmac.compare_digest(token.strip().encode(), self._token.encode())

    def _draw(self, rate: float) -> bool:
        # Draw only for active faults so that a seed yields the same sequence no
        # matter which other rates are switched off.
        return rate > 0 and self._random.random() < rate


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return NOT_JSON
