"""Test support: warehouses (real PostgreSQL and SQLite), source tables, audit reads.

Beside this module, each of one idea:
  audit.py         an event's audit row, attempts and open body
  browser.py       headless Chromium (fixture `chromium`)
  clock.py         FakeClock, for the product's `clock` and `sleep`
  compose.py       docker-compose.yaml as compose resolves it, and the Dockerfile
  dagrun.py        a DAG run through Airflow, in this process or through the CLI
  inboxes.py       SMTP and webhook servers that alerts arrive at (fixtures `smtp_server`, `webhook`)
  mapping.py       source rows as the driver returns them, and what map_rows makes of them
  processes.py     processes a test starts: Airflow's services, a Celery worker
  sandbox_http.py  the sandbox's HTTP routes, as its own tests call them
  seeding.py       source rows, and the seeded partition read through the extract stage
  sending.py       senders on a FakeClock, and what the sandbox received
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sqlalchemy import (
    Boolean, Column, DateTime, Integer, MetaData, String, Table, Text, create_engine, insert, select, text,
)
from sqlalchemy.engine import URL, Engine

from lead_sync.db.schema import attempts, deliveries, sync_runs

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-7f3a9c"
# A lead the API takes: event 1 of a non-deferred signup, nulls left out.
LEAD = {"eventName": "signup_started", "customerExternalId": "42", "clickId": "click-42",
        "timestamp": "2026-11-27T08:00:00Z"}

source_metadata = MetaData()
signups = Table(
    "signups", source_metadata,
    Column("customer_external_id", Integer),
    Column("click_id", Text),
    Column("customer_name", Text),
    Column("customer_email", Text),
    Column("customer_avatar", Text),
    Column("signed_up_at", DateTime(timezone=False)),  # naive: UTC by contract
    Column("requires_verification", Boolean),
)
verifications = Table(
    "verifications", source_metadata,
    Column("customer_external_id", String(64)),  # a different type from signups on purpose
    Column("event_name", Text),
    Column("verified_at", DateTime(timezone=True)),
)
demo_bookings = Table(
    "demo_bookings", source_metadata,
    Column("customer_external_id", Integer),
    Column("click_id", Text),
    Column("customer_name", Text),
    Column("customer_email", Text),
    Column("booked_at", DateTime(timezone=False)),
)


def pg_params() -> dict:
    return {
        "host": os.environ.get("PGHOST", "127.0.0.1"),
        "port": int(os.environ.get("PGPORT", "5432")),
        "username": os.environ.get("PGUSER", "postgres"),
        "password": os.environ.get("PGPASSWORD") or None,
    }


def pg_url(database: str) -> URL:
    return URL.create("postgresql+psycopg2", database=database, **pg_params())


@dataclass
class Warehouse:
    kind: str  # "sqlite" | "postgres"
    url: URL
    engine: Engine

    @property
    def airflow_conn(self) -> str:
        """The warehouse as an AIRFLOW_CONN_* JSON value."""
        if self.kind == "sqlite":
            return json.dumps({"conn_type": "sqlite", "host": self.url.database})
        p = pg_params()
        return json.dumps({"conn_type": "postgres", "host": p["host"], "port": p["port"], "login": p["username"],
                           "password": p["password"], "schema": self.url.database})

    def create_sources(self) -> None:
        source_metadata.create_all(self.engine)

    def add(self, table: Table, *rows: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(table), list(rows))

    def execute(self, sql: str, **params) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)

    def deliveries(self) -> dict[str, dict]:
        """Audit rows by (customer_external_id, event_name), or by key when unnamed."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(deliveries)).mappings().all()
        return {(r["customer_external_id"], r["event_name"]) if r["event_name"] else r["event_key"]: dict(r)
                for r in rows}

    def attempts(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(attempts).order_by(attempts.c.id)).mappings()]

    def runs(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(sync_runs)).mappings()]

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.deliveries().values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts


def new_pg_database() -> str:
    name = f"lead_sync_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url(os.environ.get("PGDATABASE", "postgres")), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name


def drop_pg_database(name: str) -> None:
    admin = create_engine(pg_url(os.environ.get("PGDATABASE", "postgres")), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@contextmanager
def pg_database() -> Iterator[tuple[str, Engine]]:
    """A fresh PostgreSQL database and an engine on it; dropped afterwards."""
    name = new_pg_database()
    engine = create_engine(pg_url(name), pool_pre_ping=True)
    try:
        yield name, engine
    finally:
        engine.dispose()
        drop_pg_database(name)


def pg_commits(database: str) -> int:
    """A database's committed transactions, from PostgreSQL's own statistics, less one per session
    opened: PostgreSQL counts each new connection's start-up as a committed transaction (the same
    view's `sessions` counter says how many there were)."""
    admin = create_engine(pg_url(os.environ.get("PGDATABASE", "postgres")), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            commits, sessions = conn.execute(text(
                "SELECT xact_commit, sessions FROM pg_stat_database WHERE datname = :d"), {"d": database}).one()
            return commits - sessions
    finally:
        admin.dispose()


def apt_install(binary: str, package: str, *, no_recommends: bool = False) -> str:
    """A Debian program, installed here when missing (a failure, never a skip, when that fails)."""
    import pytest

    found = shutil.which(binary)
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *(["--no-install-recommends"] if no_recommends else []), package]
    for command in (["apt-get", "update", "-q"], install):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.fail(f"{binary} is missing and `{' '.join(command)}` could not run: {exc}")
        if done.returncode != 0:
            pytest.fail(f"{binary} is missing and `{' '.join(command)}` failed "
                        f"(exit {done.returncode}):\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    found = shutil.which(binary)
    if not found:
        pytest.fail(f"`apt-get install {package}` succeeded but no {binary} is on PATH")
    return found


def allow_connections(database: str, allowed: bool) -> None:
    """Make a test database refuse new connections (and drop the open ones), or accept them again."""
    admin = create_engine(pg_url(os.environ.get("PGDATABASE", "postgres")), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                             {"d": database})
    finally:
        admin.dispose()


def cutmeshort_conn(url: str, token: str = TOKEN, **extra) -> str:
    return json.dumps({"conn_type": "http", "host": url, "password": token, "extra": extra})


def write_sources(folder: Path, demo: bool = False, **settings) -> Path:
    """The shipped lead-source configuration with some settings changed (e.g. lookback_days=0)."""
    import yaml

    shipped = ROOT / "include" / "sources" / ("demo_lead_sources.yaml" if demo else "lead_sources.yaml")
    raw = yaml.safe_load(shipped.read_text())
    for source in raw["sources"]:
        source["sql"] = str(shipped.parent / source["sql"])
    raw.update(settings)
    path = folder / "lead_sources.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
