"""Processes a test starts (Airflow's services, a browser): loopback ports, bounded waits, stopped by group."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Callable, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.5) -> T:
    """The predicate's first truthy value; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(every)


def start(cmd: list[str], env: dict[str, str], log: IO[bytes], cwd: str | Path = "/") -> subprocess.Popen:
    """A child in its own process group, so that `stop` ends it with everything it started."""
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True, cwd=cwd)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each process group, then SIGKILL to whatever is left."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


def local_deployment(port: int, metadata_db: str) -> dict[str, str]:
    """Settings of a deployment as processes: LocalExecutor, PostgreSQL metadata, the API server on
    127.0.0.1:port, which the tasks reach for the execution API."""
    return {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
    }


def start_airflow_services(env: dict[str, str], port: int, log: IO[bytes]) -> list[subprocess.Popen]:
    """The API server (on 127.0.0.1:port), the scheduler and the DAG processor of one deployment.

    --skip-serve-logs: the scheduler's log server would listen on every interface, on the fixed
    port 8793; with LocalExecutor the API server reads the task logs from disk anyway.
    """
    return [start(["airflow", *cmd], env, log)
            for cmd in (["api-server", "--host", "127.0.0.1", "--port", str(port)],
                        ["scheduler", "--skip-serve-logs"], ["dag-processor"])]
