"""HTTP client for the CutMeShort lead API: one request per event, on `requests`.

Each sending thread has a `requests.Session` of its own (one kept-alive connection), as the
environment configures it: proxies (`NO_PROXY` as requests reads it), the CA bundle
(`REQUESTS_CA_BUNDLE`), plus the connection's own `verify` and `cert`. requests owns HTTP framing,
TLS and proxies; this module owns the API's rules: a safe base URL, the bearer token (never basic
auth, never a netrc entry), a total deadline per request, a bounded answer, Retry-After, and
masking of the token and customer values in what an answer quotes. The client never retries and
never follows a redirect: the delivery policy decides what happens after an answer or its absence.
"""
from __future__ import annotations

import heapq
import ipaddress
import itertools
import json
import math
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError
from urllib3.util import parse_url

from lead_sync.delivery.scrub import Scrubber, customer_values

LEAD_PATH = "/track/lead"
# A connection left idle this long is not used again: servers drop idle keep-alive connections
# (often after 60 s), and a request on one they are dropping at that moment gets no answer.
IDLE_RECONNECT_SECONDS = 30.0
# An answer is read up to this much; a longer one is no answer (and its connection is dropped).
MAX_ANSWER_BYTES = 64 * 1024
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
    # False only when the request provably never left (connection refused, DNS, TLS handshake,
    # proxy refused): the API cannot have the event.
    sent: bool = True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _transport_host(url: str) -> str | None:
    """The host another parser (urllib3's, as most HTTP stacks read URLs) sees in the URL: when
    it is not the one urlsplit sees, which the client connects to, the URL is ambiguous."""
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
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise InsecureEndpointError("API host's port must be a number from 1 to 65,535")
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




class _Deadline:
    """One request's deadline: the connection it went out on is dropped when the deadline passes."""

    __slots__ = ("at", "connection", "done", "fired")

    def __init__(self, at: float) -> None:
        self.at = at
        self.connection: HTTPConnection | None = None
        self.done = False
        self.fired = False


# The deadline of the request the calling thread is making (set by the client, read by the
# connection classes below when urllib3 sends on them).
_current = threading.local()


def _attach(connection: HTTPConnection) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.connection = connection


class _WatchedHTTPConnection(HTTPConnection):
    def request(self, *args, **kwargs):  # noqa: ANN002, ANN003 - urllib3's signature
        _attach(self)
        return super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def request(self, *args, **kwargs):  # noqa: ANN002, ANN003 - urllib3's signature
        _attach(self)
        return super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _Adapter(HTTPAdapter):
    """requests' adapter with connections the watchdog can drop (direct and through a proxy).
    No retries (urllib3 would otherwise never resend, but say so explicitly): one request, one try."""

    def __init__(self) -> None:
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs):  # noqa: ANN003
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


class _Watchdog:
    """Drops the connection of every request still unanswered at its deadline, however slowly
    the server sends: requests' own timeout bounds each socket read, not the whole answer."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, seconds: float) -> _Deadline:
        deadline = _Deadline(time.monotonic() + seconds)
        with self._cond:
            first = not self._heap or deadline.at < self._heap[0][0]
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="cutmeshort-deadlines", daemon=True)
                self._thread.start()
            elif first:
                self._cond.notify()
        return deadline

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _, _, deadline = heapq.heappop(self._heap)
                sock = getattr(deadline.connection, "sock", None)
                if sock is None:  # not connected yet: look again shortly (connecting has its own timeout)
                    deadline.at += 0.05
                    heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
                    continue
                deadline.fired = True
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns; urllib3 discards the connection
                except OSError:
                    pass

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class _TooLong(Exception):
    """An answer longer than MAX_ANSWER_BYTES."""


def _not_sent(exc: BaseException) -> bool:
    """Whether a failed request provably never reached the API: no connection was made."""
    if isinstance(exc, (requests.exceptions.ConnectTimeout, requests.exceptions.ProxyError,
                        requests.exceptions.SSLError)):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError carries the cause
        return isinstance(reason, NewConnectionError)
    return False


def _error_name(exc: BaseException) -> str:
    """A stable name for a request that got no answer (the audit quotes it)."""
    for kind in (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout, requests.exceptions.ProxyError,
                 requests.exceptions.SSLError):
        if isinstance(exc, kind):
            return kind.__name__
    return "ConnectionError"


class CutMeShortClient:
    """Sends lead events; never retries by itself (the delivery policy decides)."""

    def __init__(self, base_url: str, token: str, timeout_seconds: float = 10.0,
                 allow_insecure_http: bool = False, verify: bool | str = True,
                 cert: str | tuple[str, str] | None = None) -> None:
        token = _clean_token(token)
        self._token = token
        self.base_url = check_base_url(base_url, allow_insecure_http)
        self.timeout_seconds = timeout_seconds
        host = urlsplit(self.base_url).hostname or ""
        if verify is False and not _is_loopback(host) and not allow_insecure_http:
            raise InsecureEndpointError(
                f"verify: false (no certificate check) is refused for {host}: only the sandbox on loopback may "
                "skip it, or set allow_insecure_http for a sandbox on a private network")
        self._url = self.base_url + LEAD_PATH
        # What the environment says for this URL (proxies, NO_PROXY, REQUESTS_CA_BUNDLE), read once by
        # requests' own rules rather than again on every request (it walks os.environ each time).
        environment = requests.Session().merge_environment_settings(self._url, {}, False, None, None)
        # Never a proxy for loopback: it cannot reach our loopback, and on plain http it would read the token.
        self._proxies = {} if _is_loopback(host) else environment["proxies"]
        # An explicit `verify` wins over the environment's CA bundle.
        self._verify = environment["verify"] if verify is True else verify
        self._cert = cert
        self._scrub = Scrubber({"token": token})
        self._watchdog = _Watchdog()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []  # every thread's, to close them all
        self._sessions_lock = threading.Lock()

    def __repr__(self) -> str:  # never show the token
        return f"CutMeShortClient({self.base_url!r})"

    def _session(self) -> requests.Session:
        """The calling thread's session, created on its first request and kept for its later ones."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # the environment was read when the client was made
            session.proxies, session.verify = dict(self._proxies), self._verify
            session.mount("http://", _Adapter())
            session.mount("https://", _Adapter())
            session.auth = _Bearer(self._token)
            session.headers.update({"Content-Type": "application/json", "Accept": "application/json"})
            if self._cert is not None:
                session.cert = self._cert
            with self._sessions_lock:
                self._sessions.append(session)
            self._local.session = session
            self._local.last_used = None
        return session

    def close_thread_connection(self) -> None:
        """Close the calling thread's session (a worker thread that is done sending)."""
        session = getattr(self._local, "session", None)
        if session is not None:
            self._local.session = None
            with self._sessions_lock:
                if session in self._sessions:
                    self._sessions.remove(session)
            session.close()

    def track_lead(self, payload: dict) -> ApiResponse:
        started = time.monotonic()
        values = customer_values(payload, PII_FIELDS)
        try:
            body = json.dumps(payload, allow_nan=False).encode()
        except ValueError as exc:
            return ApiResponse(None, None, _ms(started), None, self._scrub(f"InvalidJSONError: {_short(exc)}", values),
                               sent=False)
        session = self._session()
        last_used = self._local.last_used
        if last_used is not None and started - last_used > IDLE_RECONNECT_SECONDS:
            session.close()  # its pools are made again: the next request opens a fresh connection
        deadline = _current.deadline = self._watchdog.arm(self.timeout_seconds)
        try:
            with session.post(self._url, data=body, timeout=self.timeout_seconds, allow_redirects=False,
                              stream=True) as answer:
                status, retry_after = answer.status_code, answer.headers.get("Retry-After")
                data = _read(answer)
        except _TooLong:
            return ApiResponse(None, None, _ms(started), None,
                               f"AnswerTooLong: the answer was longer than {MAX_ANSWER_BYTES // 1024} KiB; "
                               "its connection was dropped")
        except requests.RequestException as exc:
            if deadline.fired:
                error = (f"ReadTimeout: no whole answer within timeout_seconds ({self.timeout_seconds:g} s); "
                         "its connection was dropped")
                return ApiResponse(None, None, _ms(started), None, error)
            return ApiResponse(None, None, _ms(started), None,
                               self._scrub(f"{_error_name(exc)}: {_short(exc)}", values), sent=not _not_sent(exc))
        finally:
            deadline.done = True
            _current.deadline = None
            self._local.last_used = time.monotonic()
        if deadline.fired:  # dropped just as the last byte came: not an answer to rely on
            return ApiResponse(None, None, _ms(started), None,
                               f"ReadTimeout: no whole answer within timeout_seconds ({self.timeout_seconds:g} s)")
        text = data.decode("utf-8", errors="replace")
        # A refused token's answer may quote it in some spelling no mask knows: none of it is kept.
        kept = None if status in (401, 403) else self._scrub(text, values)
        return ApiResponse(status, kept, _ms(started), parse_retry_after(retry_after), None)

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
            self._local = threading.local()  # a thread sending after this gets a new session
        for session in sessions:
            session.close()
        self._watchdog.close()

    def __enter__(self) -> "CutMeShortClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Bearer(requests.auth.AuthBase):
    """`Authorization: Bearer <token>` on every request (requests' own auth is basic)."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return "_Bearer([token])"


def _read(answer: requests.Response) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES (decoded); past that, _TooLong."""
    chunks, size = [], 0
    for chunk in answer.iter_content(16384):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            answer.raw.close()  # the rest is never read: the connection goes, not back to the pool
            raise _TooLong
        chunks.append(chunk)
    return b"".join(chunks)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _short(exc: BaseException) -> str:
    # The first line, bounded: the audit keeps it.
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
