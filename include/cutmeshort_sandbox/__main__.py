"""Command line: `python -m cutmeshort_sandbox [--port 8765] [...]`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from .faults import DEFAULT_FAULTS, FaultError, merge_faults
from .server import DEFAULT_TOKEN, SandboxServer

TOKEN_ENV = "CUTMESHORT_SANDBOX_TOKEN"


class _Shutdown(Exception):
    """Raised from the signal handler to leave the main wait."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Shutdown


def _faults_argument(text: str) -> dict[str, Any]:
    try:
        faults = json.loads(text)
        # Checked here so that a typo fails at start rather than on the first request.
        merge_faults(DEFAULT_FAULTS, faults)
    except (ValueError, FaultError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return dict(faults)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cutmeshort_sandbox",
        description="Local emulator of the CutMeShort POST /track/lead API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one (default 8765)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or DEFAULT_TOKEN,
        help=f"accepted bearer token (default ${TOKEN_ENV}, else {DEFAULT_TOKEN})",
    )
    parser.add_argument(
        "--rate-limit-per-minute",
        type=int,
        default=60,
        help="accepted requests per token per sliding minute; 0 disables (default 60)",
    )
    parser.add_argument("--latency-ms", type=int, default=0, help="delay added to every response")
    parser.add_argument("--faults", type=_faults_argument, default=None, help="start-up faults as a JSON object")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port to this file")
    return parser


def _write_port_file(path: Path, port: int) -> None:
    # Write then rename, so a process polling for the file never reads half of it.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{port}\n", encoding="utf-8")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        server = SandboxServer(
            host=args.host,
            port=args.port,
            token=args.token,
            rate_limit_per_minute=args.rate_limit_per_minute or None,
            latency_ms=args.latency_ms,
            faults=args.faults,
        )
    except FaultError as exc:
        parser.error(str(exc))
    try:
        server.start()
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    try:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        print(f"CutMeShort sandbox listening on {server.url}", flush=True)
        if args.port_file is not None:
            _write_port_file(args.port_file, server.port)
        threading.Event().wait()
    except _Shutdown:
        pass
    finally:
        # A second signal must not interrupt the shutdown itself.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
