"""HTTP client for the CutMeShort lead API: one request per event over a pooled session."""
from __future__ import annotations

import ipaddress
import json
import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.util import parse_url

LEAD_PATH = "/track/lead"
# Body fields whose values must not reach the audit even when an API answer quotes them.
PII_FIELDS = ("customerEmail", "customerName")


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


def _transport_host(url: str) -> str | None:
    """The host the HTTP stack (urllib3) will actually connect to."""
    try:
        host = parse_url(url).host
    except ValueError:
        return None
    return host.strip("[]").lower() if host else None


def check_base_url(base_url: str, allow_insecure_http: bool = False) -> str:
    """https anywhere; plain http only for loopback (or when explicitly allowed for a private network)."""
    text = base_url.strip()
    try:
        parts = urlsplit(text)
        hostname = parts.hostname
    except ValueError:
        parts, hostname = None, None
    if parts is None or parts.scheme not in ("http", "https") or not hostname:
        shown = "" if "@" in text else f" (got {text!r})"  # user info might be a secret
        raise InsecureEndpointError(f"API host must be a URL with scheme, like https://api.cme.sh{shown}")
    # Credentials in the URL would be sent as basic auth, and a backslash or '@' lets
    # parsers disagree on the host (one sees loopback, the socket goes elsewhere).
    if "@" in parts.netloc or "\\" in text or _transport_host(text) != hostname:
        raise InsecureEndpointError(
            "API host must be a plain base URL without user info or backslashes, like https://api.cme.sh; "
            "the token goes in the connection's password"
        )
    if parts.query or parts.fragment:
        raise InsecureEndpointError("API host must be a base URL without query or fragment, like https://api.cme.sh")
    if parts.scheme == "http" and not _is_loopback(hostname) and not allow_insecure_http:
        raise InsecureEndpointError(
            f"refusing plain http:// to {hostname}: the API token must not travel in clear text; use https"
        )
    return text.rstrip("/")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (moment - datetime.now(timezone.utc)).total_seconds())


def _clean_token(token: str | None) -> str:
    """The token as it goes in the header; the errors never quote it."""
    token = (token or "").strip()
    if not token:
        raise ValueError("the CutMeShort API token is empty")
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError("the CutMeShort API token contains spaces, control or non-ASCII characters; "
                         "check the connection's password")
    return token


class _BearerAuth(AuthBase):
    """Session-level auth: requests then neither reads ~/.netrc nor turns URL user info into basic auth."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<token>)"


class CutMeShortClient:
    """Sends lead events; never retries by itself (the delivery policy decides)."""

    def __init__(self, base_url: str, token: str, timeout_seconds: float = 10.0,
                 allow_insecure_http: bool = False, pool_size: int = 4) -> None:
        self._token = _clean_token(token)
        self.base_url = check_base_url(base_url, allow_insecure_http)
        self.timeout_seconds = timeout_seconds
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update({"Accept": "application/json"})
        self._session.auth = _BearerAuth(self._token)
        # A proxy from the environment cannot reach our loopback, and on plain http it
        # would receive the token in clear text.
        loopback = _is_loopback(urlsplit(self.base_url).hostname or "")
        self._proxies = dict.fromkeys(("http", "https", "all")) if loopback else None

    def __repr__(self) -> str:  # never show the token
        return f"CutMeShortClient({self.base_url!r})"

    def track_lead(self, payload: dict) -> ApiResponse:
        started = time.monotonic()
        try:
            response = self._session.post(
                self.base_url + LEAD_PATH, json=payload, timeout=self.timeout_seconds, allow_redirects=False,
                proxies=self._proxies,
            )
        except requests.RequestException as exc:
            return ApiResponse(None, None, _ms(started), None,
                               self._scrub(f"{type(exc).__name__}: {_short(exc)}", payload))
        return ApiResponse(
            response.status_code, self._scrub(response.text, payload), _ms(started),
            parse_retry_after(response.headers.get("Retry-After")), None,
        )

    def _scrub(self, text: str, payload: dict) -> str:
        """Answers and errors end up in the audit: never with the token, an email or a name in them."""
        if not text:
            return text
        text = text.replace(self._token, "[token]")
        for field in PII_FIELDS:
            value = payload.get(field) if isinstance(payload, dict) else None
            if isinstance(value, str) and len(value.strip()) >= 3:
                for form in {value, value.strip(), json.dumps(value)[1:-1]}:
                    if form:
                        text = text.replace(form, f"[{field}]")
        return text

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
