"""HTTP client for the CutMeShort lead API: one request per event over kept-alive connections.

Built on urllib3 (the transport under requests) without the requests layer: at several hundred
requests a second, requests' per-request work (hooks, cookie jar, environment merging) costs
more CPU than the request itself. Safe for use from several threads at once: each thread sends
over a connection pool of its own, created on its first request and kept for its later ones."""
from __future__ import annotations

import ipaddress
import json
import math
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import certifi
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError, SSLError
from urllib3.util import parse_url

LEAD_PATH = "/track/lead"
# A connection left idle this long is not used again: servers drop idle keep-alive connections
# (often after 60 s), and a request on one they are dropping at that moment gets no answer.
IDLE_RECONNECT_SECONDS = 30.0
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


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for this URL (HTTPS_PROXY, ALL_PROXY, NO_PROXY...), as
    requests would use it; never for loopback: a proxy cannot reach our loopback, and on plain
    http it would receive the token in clear text."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _is_loopback(host) or proxy_bypass(host):
        return None
    proxies = getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def _error_kind(exc: Exception) -> str:
    """A stable name for a request that got no answer (the audit quotes it)."""
    if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError: urllib3 makes it one of those
        return "ConnectionError"
    if isinstance(exc, ReadTimeoutError):
        return "ReadTimeout"
    if isinstance(exc, ConnectTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, SSLError):
        return "SSLError"
    return "ConnectionError"


class CutMeShortClient:
    """Sends lead events; never retries by itself (the delivery policy decides)."""

    def __init__(self, base_url: str, token: str, timeout_seconds: float = 10.0,
                 allow_insecure_http: bool = False) -> None:
        token = _clean_token(token)
        self._token = token
        self.base_url = check_base_url(base_url, allow_insecure_http)
        self.timeout_seconds = timeout_seconds
        self._url = self.base_url + LEAD_PATH
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                         "Accept": "application/json"}
        self._proxy = _proxy_for(self.base_url)
        self._local = threading.local()
        self._pools: list[urllib3.PoolManager] = []  # every thread's, to close them all
        self._pools_lock = threading.Lock()

    def __repr__(self) -> str:  # never show the token
        return f"CutMeShortClient({self.base_url!r})"

    @property
    def _pool(self) -> urllib3.PoolManager:
        """The calling thread's pool: one connection, kept alive between its requests. No retries
        and no redirects inside it (the delivery policy decides)."""
        pool = getattr(self._local, "pool", None)
        if pool is None:
            options = dict(num_pools=1, maxsize=1, retries=False, ca_certs=certifi.where(),
                           timeout=urllib3.Timeout(connect=self.timeout_seconds, read=self.timeout_seconds))
            pool = urllib3.ProxyManager(self._proxy, **options) if self._proxy else urllib3.PoolManager(**options)
            with self._pools_lock:
                self._pools.append(pool)
            self._local.pool = pool
        return pool

    def close_thread_connection(self) -> None:
        """Close the calling thread's connection (a worker thread that is done sending)."""
        pool = getattr(self._local, "pool", None)
        if pool is not None:
            self._local.pool = None
            with self._pools_lock:
                if pool in self._pools:
                    self._pools.remove(pool)
            pool.clear()

    def track_lead(self, payload: dict) -> ApiResponse:
        pool = self._pool
        started = time.monotonic()
        last = getattr(self._local, "last_used", None)
        if last is not None and started - last > IDLE_RECONNECT_SECONDS:
            pool.clear()  # its kept connection goes; the next request opens a fresh one
        try:
            body = json.dumps(payload, allow_nan=False).encode()
            response = pool.request("POST", self._url, body=body, headers=self._headers, redirect=False)
        except (HTTPError, ValueError) as exc:
            self._local.last_used = time.monotonic()
            kind = "InvalidJSONError" if isinstance(exc, ValueError) else _error_kind(exc)
            return ApiResponse(None, None, _ms(started), None, self._scrub(f"{kind}: {_short(exc)}", payload))
        self._local.last_used = time.monotonic()
        return ApiResponse(
            response.status, self._scrub(response.data.decode("utf-8", errors="replace"), payload), _ms(started),
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
        with self._pools_lock:
            pools, self._pools = self._pools, []
            self._local = threading.local()  # a thread sending after this gets a new pool
        for pool in pools:
            pool.clear()

    def __enter__(self) -> "CutMeShortClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _short(exc: Exception) -> str:
    # urllib3's messages repeat the pool and the URL; keep the first line, bounded.
    return str(exc).splitlines()[0][:300] if str(exc) else ""
