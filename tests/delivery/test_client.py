"""CutMeShortClient and the retry classification, against the sandbox as a real loopback HTTP server."""
from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lead_sync.delivery.client import CutMeShortClient, InsecureEndpointError, check_base_url, parse_retry_after
from lead_sync.delivery.retry import CREDENTIALS, RETRY, classify, describe

from tests.support import LEAD, TOKEN


def lead(n: int) -> dict:
    return {**LEAD, "customerExternalId": str(n), "clickId": f"click-{n}"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EchoServer:
    """A minimal loopback server that records what it receives and answers as told.

    Used where the sandbox cannot show a header it received or send an arbitrary answer
    (an echoed token, an HTTP-date Retry-After, a redirect).
    """

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.status = 200
        self.headers: dict[str, str] = {}
        self.body = '{"success": true}'
        self.connections: set[socket.socket] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer.connections.add(self.connection)

            def log_message(self, *args) -> None:
                pass

            def do_CONNECT(self) -> None:
                outer.received.append({"method": "CONNECT", "path": self.path,
                                       "proxy_authorization": self.headers.get("Proxy-Authorization")})
                self.send_response(407)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                auth = self.headers.get("Authorization") or ""
                outer.received.append({"path": self.path, "authorization": auth,
                                       "authorizations": self.headers.get_all("Authorization") or [],
                                       "body": raw.decode()})
                payload = outer.body.replace("{authorization}", auth).encode()
                self.send_response(outer.status)
                for name, value in outer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def drop_connections(self) -> None:
        """Close every open connection from the server's side, as a server's idle timeout does."""
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "EchoServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture
def client(sandbox):
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2.0) as c:
        yield c


def no_token(*texts) -> None:
    for text in texts:
        assert TOKEN not in str(text)


# --- authentication -------------------------------------------------------------------

def test_bearer_token_is_sent_and_accepted(client, sandbox):
    response = client.track_lead(LEAD)
    assert response.http_status == 200 and response.error is None
    assert json.loads(response.body)["success"] is True
    (received,) = sandbox.requests()
    assert received["authorized"] is True and received["status"] == 200
    assert received["body"] == LEAD
    assert sandbox.leads()[0]["customerExternalId"] == "42"


def test_exact_authorization_header_is_bearer_never_basic(echo):
    with CutMeShortClient(echo.url, TOKEN) as c:
        assert c.track_lead(LEAD).http_status == 200
    (received,) = echo.received
    assert received["path"] == "/track/lead"
    assert received["authorizations"] == [f"Bearer {TOKEN}"]
    assert json.loads(received["body"]) == LEAD


def test_netrc_entry_does_not_replace_the_bearer_token(sandbox, tmp_path, monkeypatch):
    # requests would otherwise send basic auth from a netrc entry for the API host.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1\nlogin someone\npassword from-netrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    with CutMeShortClient(sandbox.url, TOKEN) as c:
        assert c.track_lead(LEAD).http_status == 200
    assert [r["authorized"] for r in sandbox.requests()] == [True]


def test_wrong_token_gets_401_without_quoting_any_token(sandbox):
    with CutMeShortClient(sandbox.url, "not-the-right-token") as c:
        response = c.track_lead(LEAD)
    assert response.http_status == 401
    assert classify(response) == CREDENTIALS
    assert "not-the-right-token" not in describe(response)
    assert sandbox.leads() == []


def test_token_surrounding_whitespace_is_trimmed(sandbox):
    with CutMeShortClient(sandbox.url, f"  {TOKEN}\n") as c:
        assert c.track_lead(LEAD).http_status == 200


@pytest.mark.parametrize("token", ["", "   ", None])
def test_empty_token_is_refused(sandbox, token):
    with pytest.raises(ValueError, match="empty"):
        CutMeShortClient(sandbox.url, token)


@pytest.mark.parametrize("token", [f"{TOKEN}\nX-Other: 1", f"abc {TOKEN}", f"{TOKEN}\x00", f"{TOKEN}\u2019"])
def test_malformed_token_is_refused_without_quoting_it(sandbox, token):
    # Before: a header-invalid token came back as an InvalidHeader error quoting the header value.
    with pytest.raises(ValueError) as caught:
        CutMeShortClient(sandbox.url, token)
    no_token(caught.value, repr(caught.value))
    assert "password" in str(caught.value)
    assert sandbox.requests() == []


# --- the token stays out of everything readable -----------------------------------------

def test_token_not_in_repr(client):
    session = client._session()
    no_token(repr(client), str(client), repr(session.auth), repr(session.__dict__))
    assert client.base_url in repr(client)


def test_token_not_in_network_errors(sandbox):
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=0.3) as c:
        sandbox.set_faults({"slow_rate": 1.0, "slow_ms": 1500})
        timeout = c.track_lead(LEAD)
        sandbox.set_faults({"slow_rate": 0.0, "reset_rate": 1.0})
        reset = c.track_lead(LEAD)
    with CutMeShortClient(f"http://127.0.0.1:{closed_port()}", TOKEN, timeout_seconds=0.5) as c:
        refused = c.track_lead(LEAD)
    for response in (timeout, reset, refused):
        assert response.http_status is None and response.error
        no_token(response.error, describe(response))


def test_token_echoed_by_a_server_is_scrubbed(echo):
    echo.status = 401
    echo.body = '{"success": false, "error": "token {authorization} is revoked"}'
    with CutMeShortClient(echo.url, TOKEN) as c:
        response = c.track_lead(LEAD)
    assert echo.received[0]["authorization"] == f"Bearer {TOKEN}"  # it did travel, and came back
    assert response.http_status == 401
    # A refused token's answer is not kept at all: no spelling of the token can hide in it.
    assert response.body is None and describe(response) == "HTTP 401"


def test_email_and_name_quoted_in_an_answer_are_scrubbed(echo):
    # The audit keeps the answer (and describe() of it): a server quoting the body must not put PII there.
    echo.status = 422
    echo.body = ('{"success": false, "error": "customerEmail zoe.q@example.com rejected for Zo\\u00eb Quint",'
                 ' "details": {"customerName": "Zo\\u00eb Quint", "raw": "zoe.q@example.com"}}')
    body = {**LEAD, "customerEmail": "zoe.q@example.com", "customerName": "Zo\u00eb Quint"}
    with CutMeShortClient(echo.url, TOKEN) as c:
        response = c.track_lead(body)
    assert json.loads(echo.received[0]["body"])["customerEmail"] == "zoe.q@example.com"  # sent as is
    text = describe(response)
    for shown in (response.body, text):
        assert "zoe.q@example.com" not in shown and "Zo\\u00eb Quint" not in shown and "Zo\u00eb" not in shown
    assert text.startswith("HTTP 422: customerEmail [customerEmail] rejected for [customerName]")


# --- connection handling ----------------------------------------------------------------

def test_a_thread_reuses_one_connection(echo):
    with CutMeShortClient(echo.url, TOKEN) as c:
        for n in range(20):
            assert c.track_lead(lead(n)).http_status == 200
    assert len(echo.received) == 20
    assert len(echo.connections) == 1  # one socket for twenty requests


def test_threads_sending_at_once_each_use_a_connection_of_their_own(client, sandbox):
    sandbox.set_faults({"latency_ms": 150})
    barrier = threading.Barrier(6)
    sessions, statuses = {}, []

    def one(n: int) -> None:
        barrier.wait()
        for k in range(3):
            statuses.append(client.track_lead(lead(10 * n + k)).http_status)
        sessions[n] = client._session()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert statuses == [200] * 18 and sandbox.stats()["leads"] == 18
    assert len({id(s) for s in sessions.values()}) == 6 and client._session() not in sessions.values()
    # The six were on the wire together: the sandbox received them within one answer's time (150 ms).
    moments = sorted(datetime.fromisoformat(r["received_at"].replace("Z", "+00:00")) for r in sandbox.requests())
    assert (moments[5] - moments[0]).total_seconds() < 0.15
    client.close()
    assert client._sessions == []


def test_a_connection_idle_too_long_is_not_used_again(echo, monkeypatch):
    import lead_sync.delivery.client as client_module

    with CutMeShortClient(echo.url, TOKEN) as c:
        assert c.track_lead(lead(1)).http_status == 200
        assert c.track_lead(lead(2)).http_status == 200
        monkeypatch.setattr(client_module, "IDLE_RECONNECT_SECONDS", 0.0)  # any pause is too long now
        assert c.track_lead(lead(3)).http_status == 200
    # The third request went over a new connection, the first two over one.
    assert len(echo.received) == 3 and len(echo.connections) == 2


def test_a_connection_the_server_closed_while_idle_is_not_used(echo):
    # Servers drop idle keep-alive connections after their own timeout (often a few seconds): the
    # next request opens a new connection instead of going out on the closed one and getting no answer.
    from urllib3.util.wait import wait_for_read

    with CutMeShortClient(echo.url, TOKEN) as c:
        assert c.track_lead(lead(1)).http_status == 200
        pools = c._session().get_adapter(echo.url).poolmanager.pools
        (kept,) = [conn for key in pools.keys() for conn in pools[key].pool.queue if conn is not None]
        echo.drop_connections()
        assert wait_for_read(kept.sock, timeout=5)  # the server's close has reached the client
        assert c.track_lead(lead(2)).http_status == 200
    assert len(echo.received) == 2 and len(echo.connections) == 2


def test_timeout_returns_no_status_quickly(sandbox):
    sandbox.set_faults({"slow_rate": 1.0, "slow_ms": 2000})
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=0.3) as c:
        started = time.monotonic()
        response = c.track_lead(LEAD)
        elapsed = time.monotonic() - started
    assert response.http_status is None and response.body is None
    assert "Timeout" in response.error
    assert elapsed < 1.0 and 250 <= response.latency_ms < 1000
    assert classify(response) == RETRY
    assert describe(response).startswith("no response (ReadTimeout")
    assert sandbox.stats()["requests"] == 1  # no retry inside the client


def test_connection_reset_returns_no_status_and_is_not_retried_by_the_client(client, sandbox):
    sandbox.set_faults({"reset_rate": 1.0})
    started = time.monotonic()
    response = client.track_lead(LEAD)
    assert time.monotonic() - started < 1.0
    assert response.http_status is None and response.error.startswith("ConnectionError")
    assert classify(response) == RETRY
    stats = sandbox.stats()
    assert (stats["requests"], stats["resets"], stats["leads"]) == (1, 1, 0)
    # The pool recovers: the next request opens a fresh connection and succeeds.
    sandbox.set_faults({"reset_rate": 0.0})
    assert client.track_lead(LEAD).http_status == 200
    assert sandbox.stats()["requests"] == 2


def test_connection_refused_returns_no_status_quickly():
    with CutMeShortClient(f"http://127.0.0.1:{closed_port()}", TOKEN, timeout_seconds=0.5) as c:
        started = time.monotonic()
        response = c.track_lead(LEAD)
    assert time.monotonic() - started < 1.0
    assert response.http_status is None and response.error.startswith("ConnectionError")
    assert classify(response) == RETRY


def test_proxy_from_environment_is_not_used_for_loopback(sandbox, monkeypatch):
    # Before: HTTP_PROXY sent the request, bearer token included, to the proxy in clear text.
    dead_proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2.0) as c:
        assert c.track_lead(LEAD).http_status == 200
    assert sandbox.stats()["requests"] == 1


def test_proxy_from_environment_is_used_for_other_hosts(echo, monkeypatch):
    # A deployment behind a proxy reaches the API through it, as with requests: here the echo
    # server plays the proxy, and a plain-http proxy gets the request with the absolute URL.
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, echo.url)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with CutMeShortClient("http://api.example.test", TOKEN, allow_insecure_http=True) as c:
        assert c.track_lead(LEAD).http_status == 200
    assert [r["path"] for r in echo.received] == ["http://api.example.test/track/lead"]
    # NO_PROXY names the host: straight to it (here: nothing listens, so no answer).
    monkeypatch.setenv("no_proxy", "api.example.test")
    with CutMeShortClient("http://api.example.test", TOKEN, allow_insecure_http=True, timeout_seconds=1.0) as c:
        assert c.track_lead(LEAD).http_status is None
    assert len(echo.received) == 1


def test_https_through_a_proxy_is_a_connect_tunnel_with_the_proxy_credentials(echo, monkeypatch):
    # The token never reaches the proxy: HTTPS goes through it in a CONNECT tunnel, and the
    # proxy's own credentials (user info in HTTPS_PROXY) go in Proxy-Authorization.
    proxy = echo.url.replace("http://", "http://proxy%40user:s3cret@")
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with CutMeShortClient("https://api.example.test", TOKEN, timeout_seconds=2.0) as c:
        response = c.track_lead(LEAD)
    assert response.http_status is None and response.error.startswith("ProxyError")
    assert "407" in response.error and response.sent is False
    expected = "Basic " + base64.b64encode(b"proxy@user:s3cret").decode()
    assert echo.received == [{"method": "CONNECT", "path": "api.example.test:443", "proxy_authorization": expected}]
    no_token(json.dumps(echo.received))


def test_no_proxy_cidr_entries_are_honoured_as_requests_reads_them(echo, monkeypatch):
    # Before: NO_PROXY's CIDR entries were ignored, and the token went to the proxy.
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, echo.url)
    for name in ("ALL_PROXY", "all_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "192.0.2.0/24")
    # 192.0.2.0/24 is reserved for documentation: nothing answers there, so no answer, directly.
    with CutMeShortClient("http://192.0.2.10", TOKEN, allow_insecure_http=True, timeout_seconds=0.5) as c:
        assert c.track_lead(LEAD).http_status is None
    assert echo.received == []
    monkeypatch.setenv("no_proxy", "198.51.100.0/24")  # another network: through the proxy
    with CutMeShortClient("http://192.0.2.10", TOKEN, allow_insecure_http=True, timeout_seconds=2.0) as c:
        assert c.track_lead(LEAD).http_status == 200
    assert [r["path"] for r in echo.received] == ["http://192.0.2.10/track/lead"]


def test_https_checks_the_certificate(tmp_path):
    # A server whose certificate no CA in certifi's bundle signed: no request goes out over it.
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted = []

        def serve() -> None:
            conn, _ = server.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    accepted.append(tls.recv(1))
            except (ssl.SSLError, OSError):
                accepted.append(None)  # the client hung up in the handshake

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with CutMeShortClient(f"https://127.0.0.1:{port}", TOKEN, timeout_seconds=2.0) as c:
            response = c.track_lead(LEAD)
        thread.join(timeout=5)
    assert response.http_status is None and response.error.startswith("SSLError")
    assert "certificate verify failed" in response.error
    assert accepted == [None]  # nothing was sent
    assert response.sent is False  # and the audit need not call it unknown


class RawServer:
    """Answers each request with bytes given as they are (what a server may do at the edges of HTTP)."""

    def __init__(self, answers: list[bytes], close_after: bool = False) -> None:
        self.answers, self.close_after = list(answers), close_after
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.answers:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        request += chunk
                    if not request:
                        break
                    head, _, body = request.partition(b"\r\n\r\n")
                    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                    while len(body) < length:
                        body += conn.recv(65536)
                    conn.sendall(self.answers.pop(0))
                    if self.close_after:
                        break

    def close(self) -> None:
        self._server.close()


@pytest.mark.parametrize("raw, status, body", [
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, "ok"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\": 1\r\n1\r\n}\r\n0\r\n\r\n", 200,
     '{"a": 1}'),
    (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n", 429, ""),
])
def test_answers_framed_every_way_http_allows_are_read(raw, status, body):
    server = RawServer([raw, raw])
    try:
        with CutMeShortClient(server.url, TOKEN, timeout_seconds=2.0) as c:
            for _ in range(2):
                response = c.track_lead(LEAD)
                assert (response.http_status, response.body) == (status, body)
                assert response.retry_after == (7.0 if status == 429 else None)
        assert server.connections == 1  # kept alive after each of them
    finally:
        server.close()


def test_an_answer_that_ends_with_the_connection_is_read_and_the_next_request_reconnects():
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"success\": true}"
    server = RawServer([raw, raw], close_after=True)
    try:
        with CutMeShortClient(server.url, TOKEN, timeout_seconds=2.0) as c:
            assert [(r.http_status, r.body) for r in (c.track_lead(LEAD), c.track_lead(LEAD))] == \
                [(200, '{"success": true}')] * 2
        assert server.connections == 2
    finally:
        server.close()


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",  # cut short
    b"this is not HTTP\r\n\r\n",
    b"",  # closed without a byte
])
def test_an_answer_cut_short_or_not_http_is_no_answer(raw):
    server = RawServer([raw], close_after=True)
    try:
        with CutMeShortClient(server.url, TOKEN, timeout_seconds=2.0) as c:
            response = c.track_lead(LEAD)
        assert response.http_status is None and response.error.startswith("ConnectionError")
        assert classify(response) == RETRY
    finally:
        server.close()


def test_redirects_are_not_followed(echo):
    echo.status = 307
    echo.headers = {"Location": echo.url + "/elsewhere"}
    with CutMeShortClient(echo.url, TOKEN) as c:
        response = c.track_lead(LEAD)
    assert response.http_status == 307
    assert [r["path"] for r in echo.received] == ["/track/lead"]
    assert classify(response) == RETRY


# --- Retry-After ------------------------------------------------------------------------

def test_retry_after_seconds_from_the_sandbox(client, sandbox):
    sandbox.set_faults({"burst_429": {"count": 2, "retry_after": 7}})
    first = client.track_lead(LEAD)
    assert (first.http_status, first.retry_after) == (429, 7.0)
    assert classify(first) == RETRY
    sandbox.set_faults({"burst_429": {"count": 1, "retry_after": None}})
    second = client.track_lead(LEAD)
    assert (second.http_status, second.retry_after) == (429, None)
    ok = client.track_lead(LEAD)
    assert (ok.http_status, ok.retry_after) == (200, None)


def test_retry_after_http_date_over_http(echo):
    echo.status = 503
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    echo.headers = {"Retry-After": format_datetime(when, usegmt=True)}
    with CutMeShortClient(echo.url, TOKEN) as c:
        response = c.track_lead(LEAD)
    assert response.http_status == 503
    assert 28.0 <= response.retry_after <= 30.0


@pytest.mark.parametrize("value,expected", [
    ("5", 5.0), (" 2 ", 2.0), ("1.5", 1.5), ("0", 0.0), ("-3", 0.0),
    (None, None), ("", None), ("soon", None), ("inf", None), ("nan", None), ("1e999", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: no wait
])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value) == expected


def test_parse_retry_after_future_http_date():
    when = datetime.now(timezone.utc) + timedelta(seconds=90)
    assert 88.0 <= parse_retry_after(format_datetime(when, usegmt=True)) <= 90.0


# --- check_base_url ---------------------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("https://api.cme.sh", "https://api.cme.sh"),
    ("https://api.cme.sh/", "https://api.cme.sh"),
    (" https://api.example.com:8443/base/ ", "https://api.example.com:8443/base"),
    ("https://10.1.2.3", "https://10.1.2.3"),
    ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
    ("http://127.0.0.1", "http://127.0.0.1"),
    ("http://[::1]:8765/", "http://[::1]:8765"),
    ("http://localhost:8765", "http://localhost:8765"),
    ("http://LOCALHOST", "http://LOCALHOST"),
])
def test_check_base_url_accepts_https_anywhere_and_http_on_loopback(url, expected):
    assert check_base_url(url) == expected


@pytest.mark.parametrize("url", [
    "http://api.cme.sh",
    "http://10.0.0.5:8765",
    "http://0.0.0.0:8765",
    "http://localhost.example.com",
    "http://127.0.0.1.nip.io",
    "http://[::ffff:7f00:1]",
    "http://[2001:db8::1]",
])
def test_check_base_url_refuses_clear_text_to_other_hosts(url):
    with pytest.raises(InsecureEndpointError, match="clear text"):
        check_base_url(url)
    assert check_base_url(url, allow_insecure_http=True) == url.rstrip("/")


@pytest.mark.parametrize("url", [
    # Before: urlsplit saw 'localhost' and allowed http, while urllib3 connects to evil.example.
    "http://evil.example\\@localhost/",
    "http://user:secret@127.0.0.1:8765",  # would turn into basic auth
    "https://tok@api.cme.sh",
])
def test_check_base_url_refuses_user_info_and_ambiguous_hosts(url):
    with pytest.raises(InsecureEndpointError) as caught:
        check_base_url(url, allow_insecure_http=True)
    assert "secret" not in str(caught.value) and "tok@" not in str(caught.value)


@pytest.mark.parametrize("url", ["api.cme.sh", "ftp://api.cme.sh", "https://", "", "https://api.cme.sh/?x=1",
                                 "https://api.cme.sh/#frag"])
def test_check_base_url_refuses_non_urls(url):
    with pytest.raises(InsecureEndpointError):
        check_base_url(url)


def test_client_refuses_clear_text_to_a_remote_host_before_sending():
    with pytest.raises(InsecureEndpointError, match="clear text"):
        CutMeShortClient("http://api.cme.sh", TOKEN)
    with CutMeShortClient("http://api.cme.sh", TOKEN, allow_insecure_http=True) as c:
        assert c.base_url == "http://api.cme.sh"


# --- a slow, huge or echoing API ---------------------------------------------------------

class TrickleServer:
    """Answers each request one byte at a time, `every` seconds apart (a server that never stalls
    long enough for a per-read timeout); or, with `huge`, a body of that many bytes as fast as it can."""

    def __init__(self, every: float = 0.05, huge: int | None = None) -> None:
        self.every, self.huge = every, huge
        self.sent = 0
        self.stopped = threading.Event()  # the client hung up: sending failed
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        with conn:
            read_request(conn)
            try:
                if self.huge is not None:
                    conn.sendall(b"HTTP/1.1 422 Unprocessable\r\nContent-Length: %d\r\n\r\n" % self.huge)
                    block = b"x" * 65536
                    while self.sent < self.huge:
                        conn.sendall(block)
                        self.sent += len(block)
                else:
                    answer = b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"success": true}'
                    for byte in answer:
                        conn.sendall(bytes([byte]))
                        self.sent += 1
                        time.sleep(self.every)
            except OSError:
                pass
            self.stopped.set()

    def close(self) -> None:
        self._server.close()


def test_a_trickling_answer_ends_at_the_total_deadline():
    # Before: timeout_seconds bounded each socket read, and a byte every 200 ms held the request
    # for the whole answer (73 bytes: 14.6 s).
    server = TrickleServer(every=0.2)
    try:
        with CutMeShortClient(server.url, TOKEN, timeout_seconds=1.0) as c:
            started = time.monotonic()
            response = c.track_lead(LEAD)
            elapsed = time.monotonic() - started
        assert response.http_status is None and response.error.startswith("ReadTimeout")
        assert "timeout_seconds" in response.error and response.sent is True
        assert 0.9 <= elapsed < 5.0
        assert server.stopped.wait(5)  # the connection was dropped: the server could not go on
        assert server.sent < 40  # of 56 + 17 bytes
    finally:
        server.close()


def test_a_huge_answer_is_not_read_whole():
    # Before: a 422 with a 400 MiB body was read whole into memory.
    server = TrickleServer(huge=400 * 2**20)
    try:
        with CutMeShortClient(server.url, TOKEN, timeout_seconds=5.0) as c:
            response = c.track_lead(LEAD)
        assert response.http_status is None and response.body is None
        assert response.error.startswith("AnswerTooLong")
        assert server.stopped.wait(5)
        assert server.sent < 64 * 2**20  # what socket buffers held, not the answer
    finally:
        server.close()


def read_request(conn) -> bytes:
    """One whole request (head and Content-Length body): closing with any of it unread would reset
    the connection, and the client could lose the answer."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(65536)
        if not chunk:
            return request
        request += chunk
    head, _, body = request.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)Content-Length: (\d+)", head).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return request


def tls_server(tmp_path, answer=b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"success": true}'):
    """A loopback HTTPS server with a certificate of its own CA (127.0.0.1 in its names); returns
    (url, CA file, stop)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    read_request(tls)
                    tls.sendall(answer)
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return f"https://127.0.0.1:{server.getsockname()[1]}", str(cert), server.close


def test_a_private_ca_from_requests_ca_bundle_or_verify_is_trusted(tmp_path, monkeypatch):
    # Before: only certifi's bundle was trusted, so behind a TLS-inspecting proxy nothing was delivered.
    url, ca, stop = tls_server(tmp_path)
    try:
        for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            monkeypatch.delenv(name, raising=False)
        with CutMeShortClient(url, TOKEN, timeout_seconds=2.0) as c:
            refused = c.track_lead(LEAD)
        assert refused.error.startswith("SSLError") and refused.sent is False
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca)
        with CutMeShortClient(url, TOKEN, timeout_seconds=2.0) as c:
            assert c.track_lead(LEAD).http_status == 200
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        with CutMeShortClient(url, TOKEN, timeout_seconds=2.0, verify=ca) as c:
            assert c.track_lead(LEAD).http_status == 200
    finally:
        stop()


def test_verify_false_only_for_loopback_unless_insecure_is_allowed():
    with pytest.raises(InsecureEndpointError, match="verify"):
        CutMeShortClient("https://api.cme.sh", TOKEN, verify=False)
    CutMeShortClient("https://api.cme.sh", TOKEN, verify=False, allow_insecure_http=True).close()
    CutMeShortClient("https://127.0.0.1:8443", TOKEN, verify=False).close()


def test_a_refused_connection_was_not_sent_a_reset_one_may_have_been(sandbox):
    with CutMeShortClient(f"http://127.0.0.1:{closed_port()}", TOKEN, timeout_seconds=0.5) as c:
        refused = c.track_lead(LEAD)
    assert refused.http_status is None and refused.sent is False
    sandbox.set_faults({"reset_rate": 1.0})
    with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2.0) as c:
        reset = c.track_lead(LEAD)
    assert reset.http_status is None and reset.sent is True


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:0", "https://api.cme.sh:65536/"])
def test_a_port_out_of_range_is_refused_as_such(url):
    # Before: port 99999 was refused with a message about user info.
    with pytest.raises(InsecureEndpointError, match="1 to 65,535"):
        check_base_url(url)


SLASHED_TOKEN = "tok/en+Ab9/x=="  # base64 has slashes: escaped as '\/' by PHP and some Java encoders


def test_an_api_that_echoes_the_token_in_any_spelling_never_puts_it_in_the_answer():
    from cutmeshort_sandbox import SandboxServer
    from urllib.parse import quote

    with SandboxServer(token=SLASHED_TOKEN, rate_limit_per_minute=None, faults={"echo": True}) as server:
        server.set_faults({"fail_next": [422, 500]})
        with CutMeShortClient(server.url, SLASHED_TOKEN) as c:
            answers = [c.track_lead(LEAD) for _ in range(3)]
    assert [a.http_status for a in answers] == [422, 500, 200]
    for response in answers:
        raw = response.body
        assert "echo" in raw  # the echo is there, masked
        for spelling in (SLASHED_TOKEN, SLASHED_TOKEN.replace("/", "\\/"), quote(SLASHED_TOKEN, safe=""),
                         quote(SLASHED_TOKEN, safe="").lower()):
            assert spelling not in raw and spelling not in describe(response)
        assert SLASHED_TOKEN not in json.dumps(json.loads(raw))  # decoded, too
        assert "[token]" in raw


@pytest.mark.parametrize("email, name", [
    ("zoe.q@example.com", "Zo\u00eb Quint"),
    ("j\u00fcrgen.m\u00fcller@b\u00fccher.de", "J\u00fcrgen M\u00fcller"),  # an international address
])
def test_customer_values_the_api_quotes_back_are_masked_in_any_case(sandbox, email, name):
    sandbox.set_faults({"echo": True, "fail_next": [422]})
    body = {**LEAD, "customerEmail": email, "customerName": name}
    with CutMeShortClient(sandbox.url, TOKEN) as c:
        response = c.track_lead(body)
    assert response.http_status == 422
    local, _, domain = email.rpartition("@")
    for shown in (response.body, describe(response), json.dumps(json.loads(response.body), ensure_ascii=False)):
        lowered = shown.lower()
        for value in (email, name, local, name.split()[0], f"{local}@{domain.encode('idna').decode()}"):
            assert value.lower() not in lowered, value
    assert "[customerEmail]" in response.body and "[customerName]" in response.body
