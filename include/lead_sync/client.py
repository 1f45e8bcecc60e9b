"""HTTP client for the CutMeShort lead API: one request per event over a pooled session."""
from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

LEAD_PATH = "/track/lead"


class InsecureEndpointError(ValueError):
    """A token would travel in clear text."""


@dataclass(frozen=True)
class ApiResponse:
    http_status: int | None  # None: no response (timeout, reset, refused)
    body: str | None
    latency_ms: int
    retry_after: float | None  # seconds, from the Retry-After header
    error: str | None  # network error, when there was no response


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str, allow_insecure_http: bool = False) -> str:
    """https anywhere; plain http only for loopback (or when explicitly allowed for a private network)."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InsecureEndpointError(f"API host must be a URL with scheme, like https://api.cme.sh (got {base_url!r})")
    if parts.scheme == "http" and not _is_loopback(parts.hostname) and not allow_insecure_http:
        raise InsecureEndpointError(
            f"refusing plain http:// to {parts.hostname}: the API token must not travel in clear text; use https"
        )
    return base_url.strip().rstrip("/")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (moment - datetime.now(timezone.utc)).total_seconds())


class CutMeShortClient:
    """Sends lead events; never retries by itself (the delivery policy decides)."""

    def __init__(self, base_url: str, token: str, timeout_seconds: float = 10.0,
                 allow_insecure_http: bool = False, pool_size: int = 4) -> None:
        if not token:
            raise ValueError("the CutMeShort API token is empty")
        self.base_url = check_base_url(base_url, allow_insecure_http)
        self.timeout_seconds = timeout_seconds
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/json"})

    def __repr__(self) -> str:  # never show the token
        return f"CutMeShortClient({self.base_url!r})"

    def track_lead(self, payload: dict) -> ApiResponse:
        started = time.monotonic()
        try:
            response = self._session.post(
                self.base_url + LEAD_PATH, json=payload, timeout=self.timeout_seconds, allow_redirects=False
            )
        except requests.RequestException as exc:
            return ApiResponse(None, None, _ms(started), None, f"{type(exc).__name__}: {_short(exc)}")
        return ApiResponse(
            response.status_code, response.text, _ms(started),
            parse_retry_after(response.headers.get("Retry-After")), None,
        )

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "CutMeShortClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _short(exc: Exception) -> str:
    # requests' messages repeat the URL and pool internals; keep the first line, bounded.
    return str(exc).splitlines()[0][:300] if str(exc) else ""
