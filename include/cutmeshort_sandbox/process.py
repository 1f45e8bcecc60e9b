"""The sandbox as a child process, for the demo and the end-to-end tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


class SandboxProcess:
    """Starts `python -m cutmeshort_sandbox` on a free loopback port; stops it by its pid."""

    def __init__(self, token: str, rate_limit_per_minute: int = 60, faults: dict | None = None,
                 log_path: Path | None = None, start_timeout: float = 20.0) -> None:
        self.token = token
        self.rate_limit_per_minute = rate_limit_per_minute
        self.faults = faults
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "SandboxProcess":
        folder = Path(tempfile.mkdtemp(prefix="cutmeshort-sandbox-"))
        port_file = folder / "port"
        cmd = [sys.executable, "-m", "cutmeshort_sandbox", "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--rate-limit-per-minute", str(self.rate_limit_per_minute)]
        if self.faults:
            cmd += ["--faults", json.dumps(self.faults)]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "CUTMESHORT_SANDBOX_TOKEN": self.token}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + self.start_timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the CutMeShort sandbox did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def _call(self, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def stats(self) -> dict:
        return self._call("/_sandbox/stats")

    def requests(self) -> list[dict]:
        return self._call("/_sandbox/requests")

    def leads(self) -> list[dict]:
        return self._call("/_sandbox/leads")

    def set_faults(self, faults: dict) -> dict:
        return self._call("/_sandbox/faults", faults)

    def reset(self) -> None:
        self._call("/_sandbox/reset", {})

    def __enter__(self) -> "SandboxProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
