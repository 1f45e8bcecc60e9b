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


def worker_hostname() -> str:
    """`[core] hostname_callable` of a test's Celery worker: the name in LEAD_SYNC_WORKER_NAME, since
    two workers on one machine would otherwise record the same host on their task instances."""
    return os.environ["LEAD_SYNC_WORKER_NAME"]


def celery_deployment(port: int, metadata_db: str, broker_url: str) -> dict[str, str]:
    """`local_deployment` with CeleryExecutor: tasks go through the broker (Redis) to `airflow celery
    worker` processes; task results are kept in the metadata database."""
    from sqlalchemy.engine import make_url

    backend = make_url(metadata_db).set(drivername="postgresql").render_as_string(hide_password=False)
    return {
        **local_deployment(port, metadata_db),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{backend}",
    }


def start_celery_worker(env: dict[str, str], name: str, log: IO[bytes], concurrency: int = 1) -> subprocess.Popen:
    """`airflow celery worker` named `name`, to Celery (-H) and on the task instances it runs.

    Its own pid file (the default one in AIRFLOW_HOME is shared by every worker of that home);
    --skip-serve-logs: the log server would take the fixed port 8793 on every interface, once
    per worker; the API server reads the task logs from disk.
    """
    worker_env = {
        **env,
        "LEAD_SYNC_WORKER_NAME": name,
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "processes.worker_hostname",  # importable through PYTHONPATH
        "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), env.get("PYTHONPATH")) if p),
    }
    pid_file = Path(env["AIRFLOW_HOME"]) / f"airflow-worker-{name}.pid"
    return start(["airflow", "celery", "worker", "-H", name, "-c", str(concurrency), "--skip-serve-logs",
                  "--pid", str(pid_file)], worker_env, log)


def _tree(proc: subprocess.Popen) -> list:
    """The process and all its descendants, while they are still attached to it."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_all(found: list) -> None:
    import psutil

    for each in found:
        try:
            each.kill()  # psutil checks that the pid is still that process's
        except psutil.NoSuchProcess:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to a process, its group and every descendant, as when its machine dies. Its group is
    not all: a task's supervisor puts the task process in a process group of its own."""
    found = _tree(proc)  # before anything dies: an orphan is no longer found under the process
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _kill_all(found)
    proc.wait(timeout=10)


def stop_trees(procs: list[subprocess.Popen]) -> None:
    """`stop`, then SIGKILL to whatever the processes had started that outlived them (task
    processes in process groups of their own)."""
    found = [each for proc in procs for each in _tree(proc)[1:]]
    stop(procs)
    _kill_all(found)
