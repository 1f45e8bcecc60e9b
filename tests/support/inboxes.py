"""Where alerts arrive: a real SMTP server (aiosmtpd) and a stand-in for the Slack webhook, both on
127.0.0.1 (a pytest plugin: tests/conftest.py registers it)."""
from __future__ import annotations

import email
import json
import threading
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from aiosmtpd.controller import Controller

from tests.support.processes import free_port


class Inbox:
    """aiosmtpd's handler: keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"

    def parsed(self) -> list[tuple[list[str], str, str, str]]:
        """(recipients, subject, decoded body, raw message) per mail."""
        out = []
        for rcpts, raw in self.messages:
            msg = email.message_from_bytes(raw, policy=policy.default)
            body = "".join(part.get_content() for part in msg.walk() if part.get_content_maintype() == "text")
            out.append((rcpts, str(msg["Subject"]), body, raw.decode("utf-8", "replace")))
        return out


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    """An SMTP server on 127.0.0.1: its inbox and its port."""
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


def smtp_conn(port: int) -> str:
    """An Airflow SMTP connection (AIRFLOW_CONN_* JSON) to 127.0.0.1:port, without TLS."""
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                       "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "airflow@example.com",
                                 "timeout": 5, "retry_limit": 0}})


class Webhook:
    """An HTTP server that keeps every POST (path, body) and answers with `status`."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str]] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                hook.posts.append((self.path, body))
                answer = b"ok" if hook.status == 200 else b"invalid_payload"
                self.send_response(hook.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def texts(self) -> list[str]:
        return [json.loads(body)["text"] for _, body in self.posts]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    hook.thread.start()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()
