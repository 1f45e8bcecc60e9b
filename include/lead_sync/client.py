"""HTTP client for the CutMeShort lead API: one request per event over kept-alive connections.

Each sending thread keeps one connection of its own, opened by the standard library's
`http.client` (proxy tunnel, TLS); every request is the same head plus its body, and httptools'
C parser reads the answer. At thousands of requests a second the client's CPU, not the network,
sets the pace: http.client's own request and answer handling costs 2.5 times the CPU, urllib3's
and httpx's about 5 times (README, "Choices"). The client never retries and never follows a
redirect: the delivery policy decides what happens after an answer or its absence."""
from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import math
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies, proxy_bypass

import certifi
import httptools
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


def _proxy_parts(proxy: str) -> tuple[str, int, dict[str, str]]:
    """Host, port and the Proxy-Authorization header (from user info) of an http:// proxy URL."""
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the proxy the environment names for the API must be an http:// URL (got scheme "
                         f"{parts.scheme!r}); HTTPS goes through it in a CONNECT tunnel")
    headers = {}
    if parts.username is not None:
        user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
    return parts.hostname, parts.port or 80, headers


def _request_head(base_url: str, headers: dict[str, str], absolute: bool, proxy_headers: dict[str, str]) -> bytes:
    """The request line and headers of every request, up to its Content-Length. `absolute`: the
    request goes to a plain-http proxy, which takes the whole URL and its own credentials."""
    parts = urlsplit(base_url)
    target = base_url + LEAD_PATH if absolute else (parts.path or "") + LEAD_PATH
    if any(not "!" <= ch <= "~" for ch in target):
        raise ValueError("the API host's path must be plain ASCII without spaces or control characters")
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    if parts.port is not None and parts.port != (443 if parts.scheme == "https" else 80):
        host = f"{host}:{parts.port}"
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    if absolute:
        lines += [f"{k}: {v}" for k, v in proxy_headers.items()]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


class _Answer:
    """One response as httptools' parser reads it (its callbacks)."""

    __slots__ = ("parser", "status", "framed", "body", "retry_after", "complete", "keep_alive")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status: int | None = None  # set once the headers are read
        self.framed = False  # a Content-Length or a Transfer-Encoding says where the body ends
        self.body: list[bytes] = []
        self.retry_after: str | None = None
        self.complete = False
        self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.status is not None and 100 <= self.status < 200:  # an interim answer: the real one follows
            self.status, self.framed, self.retry_after = None, False, None
            self.body = []
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # read now: llhttp forgets it after the message


class _Connection:
    """One thread's kept-alive connection to the API (through the proxy when there is one).

    `http.client` opens it (TCP, the proxy's CONNECT tunnel, TLS with the hostname checked); the
    requests go out as bytes and httptools (llhttp, the parser under uvicorn) reads the answers."""

    def __init__(self, client: "CutMeShortClient") -> None:
        self.opened = 0  # sockets opened
        self.requests = 0
        self.last_used: float | None = None
        self.sock: socket.socket | None = None
        self.head = client._head
        self.timeout = client.timeout_seconds
        self._opener = client._opener()

    def _socket(self) -> socket.socket:
        if self.sock is not None and _dropped(self.sock):
            self.close()  # the server closed it while it was idle: a request on it would get no answer
        if self.sock is None:
            try:
                self._opener.connect()
            except Exception as exc:  # noqa: BLE001 - every failure to connect is a "no answer"
                self._opener.close()
                raise _NoAnswer(_connect_error(exc), exc) from exc
            self.sock, self._opener.sock = self._opener.sock, None  # ours now: http.client sends nothing on it
            self.sock.settimeout(self.timeout)
            self.opened += 1
        return self.sock

    def post(self, body: bytes) -> tuple[int, bytes, str | None]:
        """(status, body, Retry-After); raises _NoAnswer when no answer came."""
        sock = self._socket()
        self.requests += 1
        answer = _Answer()
        keep = True
        try:
            sock.sendall(b"%sContent-Length: %d\r\n\r\n%s" % (self.head, len(body), body))
            while not answer.complete:
                data = sock.recv(65536)
                if not data:
                    if answer.status is not None and not answer.framed:  # a body that ends with the connection
                        answer.complete, keep = True, False
                        break
                    raise ConnectionError("the server closed the connection before its answer was complete")
                try:
                    answer.parser.feed_data(data)
                except httptools.HttpParserError:
                    if not answer.complete:
                        raise
                    keep = False  # bytes after the answer that are no answer: the connection is not reused
        except Exception as exc:  # noqa: BLE001 - the request may or may not have reached the API
            self.close()
            raise _NoAnswer(_exchange_error(exc), exc) from exc
        finally:
            self.last_used = time.monotonic()
        if not (keep and answer.keep_alive):
            self.close()
        return answer.status, b"".join(answer.body), answer.retry_after

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


def _dropped(sock) -> bool:
    """An idle kept-alive socket with something to read has been closed by the server (or holds
    bytes nobody asked for): not fit for another request."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _NoAnswer(Exception):
    def __init__(self, kind: str, cause: BaseException) -> None:
        super().__init__(kind)
        self.kind, self.cause = kind, cause


def _connect_error(exc: BaseException) -> str:
    """A stable name for a connection that could not be opened (the audit quotes it)."""
    if isinstance(exc, TimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return "SSLError"
    return "ConnectionError"


def _exchange_error(exc: BaseException) -> str:
    """A stable name for a request sent over an open connection that got no answer."""
    if isinstance(exc, TimeoutError):
        return "ReadTimeout"
    if isinstance(exc, ssl.SSLError):
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
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                         "Accept": "application/json"}
        # One TLS context for every thread's connection: loading the CA bundle costs tens of milliseconds.
        https = urlsplit(self.base_url).scheme == "https"
        self._tls = ssl.create_default_context(cafile=certifi.where()) if https else None
        self._proxy = _proxy_for(self.base_url)
        parts = urlsplit(self.base_url)
        api = (parts.hostname, parts.port or (443 if https else 80))
        # Where each connection goes (the proxy when there is one) and the tunnel it asks the proxy
        # for (HTTPS); a proxy the client cannot use is refused now, not at the first send.
        self._address, self._tunnel, proxy_headers = api, None, {}
        if self._proxy is not None:
            proxy_host, proxy_port, proxy_headers = _proxy_parts(self._proxy)
            self._address = (proxy_host, proxy_port)
            if https:
                self._tunnel = (*api, proxy_headers)
        self._head = _request_head(self.base_url, self._headers, self._proxy is not None and not https, proxy_headers)
        self._local = threading.local()
        self._connections: list[_Connection] = []  # every thread's, to close them all
        self._connections_lock = threading.Lock()

    def __repr__(self) -> str:  # never show the token
        return f"CutMeShortClient({self.base_url!r})"

    def _opener(self) -> http.client.HTTPConnection:
        """What opens a thread's connections: TCP, the CONNECT tunnel through a proxy, TLS. A
        plain-http proxy gets the absolute URL in the request line instead (`_head`)."""
        host, port = self._address
        if self._tls is None:
            return http.client.HTTPConnection(host, port, timeout=self.timeout_seconds)
        opener = http.client.HTTPSConnection(host, port, timeout=self.timeout_seconds, context=self._tls)
        if self._tunnel is not None:
            tunnel_host, tunnel_port, headers = self._tunnel
            opener.set_tunnel(tunnel_host, tunnel_port, headers=headers)
        return opener

    def _connection(self) -> _Connection:
        """The calling thread's connection, created on its first request and kept for its later ones."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = _Connection(self)
            with self._connections_lock:
                self._connections.append(connection)
            self._local.connection = connection
        return connection

    def close_thread_connection(self) -> None:
        """Close the calling thread's connection (a worker thread that is done sending)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            self._local.connection = None
            with self._connections_lock:
                if connection in self._connections:
                    self._connections.remove(connection)
            connection.close()

    def track_lead(self, payload: dict) -> ApiResponse:
        started = time.monotonic()
        try:
            body = json.dumps(payload, allow_nan=False).encode()
        except ValueError as exc:
            return ApiResponse(None, None, _ms(started), None, self._scrub(f"InvalidJSONError: {_short(exc)}", payload))
        connection = self._connection()
        if connection.last_used is not None and started - connection.last_used > IDLE_RECONNECT_SECONDS:
            connection.close()  # the next request opens a fresh connection
        try:
            status, data, retry_after = connection.post(body)
        except _NoAnswer as exc:
            return ApiResponse(None, None, _ms(started), None,
                               self._scrub(f"{exc.kind}: {_short(exc.cause)}", payload))
        return ApiResponse(status, self._scrub(data.decode("utf-8", errors="replace"), payload), _ms(started),
                           parse_retry_after(retry_after), None)

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
        with self._connections_lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()  # a thread sending after this gets a new connection
        for connection in connections:
            connection.close()

    def __enter__(self) -> "CutMeShortClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _short(exc: BaseException) -> str:
    # The first line, bounded: the audit keeps it.
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
