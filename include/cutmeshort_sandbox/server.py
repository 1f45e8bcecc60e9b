"""Loopback HTTP server emulating the CutMeShort `POST /track/lead` API.

Besides the emulated endpoint it serves unauthenticated control routes under
`/_sandbox/` to switch faults and inspect what was received.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

from .faults import FaultError
from .state import Reply, SandboxState, error_body

DEFAULT_TOKEN = "sandbox-token"
MAX_BODY_BYTES = 1024 * 1024


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a sender opening a few connections at once while
    # the server is busy overflows it, and each dropped connection waits a second for TCP to try
    # again. An API's load balancer takes far more.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: SandboxState) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.state = state
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name, which can stall on machines
        # with slow DNS; the sandbox only needs the address it was given.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out and hang up are part of the scenarios, not errors.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def close_open_connections(self) -> None:
        # Keep-alive connections would otherwise keep being served after stop().
        with self.connections_lock:
            for connection in list(self.open_connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "CutMeShortSandbox/1.0"
    # Headers and body go out in two writes; with Nagle on, keep-alive clients would
    # wait for a delayed ACK (about 40 ms) on every request.
    disable_nagle_algorithm = True
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 60

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet by design: tests and benchmarks would drown in access lines.
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        raw = self._read_body()
        if raw is None:
            return
        path = urlsplit(self.path).path
        state = self.server.state
        if (method, path) == ("POST", "/track/lead"):
            self._track_lead(raw)
        elif (method, path) == ("GET", "/_sandbox/requests"):
            self._send(Reply(200, state.requests()))
        elif (method, path) == ("GET", "/_sandbox/leads"):
            self._send(Reply(200, state.leads()))
        elif (method, path) == ("GET", "/_sandbox/stats"):
            self._send(Reply(200, state.stats()))
        elif (method, path) == ("GET", "/_sandbox/faults"):
            self._send(Reply(200, state.faults()))
        elif (method, path) == ("POST", "/_sandbox/faults"):
            self._set_faults(raw)
        elif (method, path) == ("POST", "/_sandbox/reset"):
            state.reset()
            self._send(Reply(200, {"success": True}))
        else:
            self._send(Reply(404, error_body(404, f"no route for {method} {path}")))

    def _track_lead(self, raw: bytes) -> None:
        state = self.server.state
        ticket = state.admit(self.headers.get("Authorization"), raw)
        if ticket.reset:
            self._reset_connection()
            return
        reply = ticket.reply
        if reply is None:
            if ticket.delay_before:
                time.sleep(ticket.delay_before)
            reply = state.complete(ticket)
        if ticket.delay_after:
            time.sleep(ticket.delay_after)
        if state.faults()["echo"]:
            reply = Reply(reply.status, {**(reply.body if isinstance(reply.body, dict) else {"answer": reply.body}),
                                         "echo": _echo(self.headers.get("Authorization") or "", raw)}, reply.headers)
            self._send(reply, escape_slashes=True)
            return
        self._send(reply)

    def _set_faults(self, raw: bytes) -> None:
        try:
            update = json.loads(raw.decode("utf-8"))
            faults = self.server.state.set_faults(update)
        except (ValueError, RecursionError) as exc:
            message = str(exc) if isinstance(exc, FaultError) else "faults must be a JSON object"
            self._send(Reply(400, error_body(400, message)))
            return
        self._send(Reply(200, faults))

    def _read_body(self) -> bytes | None:
        """Read the request body, or answer and close when it cannot be framed."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._send_and_close(411, "send a Content-Length, not a chunked body")
            return None
        length_header = self.headers.get("Content-Length", "0").strip() or "0"
        if not length_header.isdigit():
            self._send_and_close(400, "invalid Content-Length")
            return None
        length = int(length_header)
        if length > MAX_BODY_BYTES:
            self._send_and_close(413, "body too large")
            return None
        return self.rfile.read(length)

    def _send_and_close(self, status: int, message: str) -> None:
        # The unread body would be mistaken for the next request on this connection.
        self.close_connection = True
        self._send(Reply(status, error_body(status, message), {"Connection": "close"}))

    def _send(self, reply: Reply, escape_slashes: bool = False) -> None:
        text = json.dumps(reply.body)
        payload = (text.replace("/", "\\/") if escape_slashes else text).encode("utf-8")
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _reset_connection(self) -> None:
        # Linger (on, 0 s) makes close() send RST, which clients see as a reset.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        # rfile holds a reference to the socket; it must go too for close() to take effect.
        self.rfile.close()
        self.connection.close()


def _echo(authorization: str, raw: bytes) -> dict[str, str]:
    """What the `echo` fault quotes back of a request (see faults.DEFAULT_FAULTS)."""
    token = authorization.removeprefix("Bearer ")
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    echoed = {"authorization": authorization, "message": f"token {token} is not valid for this workspace",
              "token_url": f"https://api.cme.sh/keys?token={quote(token, safe='')}"}
    email, name = body.get("customerEmail"), body.get("customerName")
    if isinstance(email, str):
        local, _, domain = email.rpartition("@")
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_domain = domain
        echoed["email"] = f"{email.upper()} is already registered (as {local}@{ascii_domain})"
    if isinstance(name, str):
        echoed["name"] = f"Dear {name.lower()}, hello {name.split()[0] if name.split() else name}"
    return echoed


class SandboxServer:
    """The sandbox served from a daemon thread; also a context manager.

    `rate_limit_per_minute` and `latency_ms` are shorthands for the fault keys of the
    same names; `faults` sets any other keys at start-up. `POST /_sandbox/reset`
    returns to these start-up settings.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = DEFAULT_TOKEN,
        rate_limit_per_minute: int | None = 60,
        latency_ms: int = 0,
        faults: Mapping[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        startup = {"rate_limit_per_minute": rate_limit_per_minute, "latency_ms": latency_ms}
        startup.update(faults or {})
        self.state = SandboxState(token=token, faults=startup, clock=clock)
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SandboxServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("sandbox already started")
        self._httpd = _HTTPServer(self._address, self.state)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            # Short poll so that stop() returns quickly; tests start many servers.
            kwargs={"poll_interval": 0.02},
            name="cutmeshort-sandbox",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.server_close()
        httpd.close_open_connections()
        if thread is not None:
            thread.join()

    @property
    def host(self) -> str:
        return self._address[0]

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("sandbox not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Direct access for in-process callers; the same data as the /_sandbox/ routes.

    def requests(self) -> list[dict[str, Any]]:
        return self.state.requests()

    def leads(self) -> list[dict[str, Any]]:
        return self.state.leads()

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def faults(self) -> dict[str, Any]:
        return self.state.faults()

    def set_faults(self, update: Mapping[str, Any]) -> dict[str, Any]:
        return self.state.set_faults(update)

    def reset(self) -> None:
        self.state.reset()
