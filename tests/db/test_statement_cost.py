"""Warehouse cost at full speed (contract section 9): at most 0.1 committed transactions per delivered
event, counted by PostgreSQL itself (pg_stat_database), not by the code under test."""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, text

from cutmeshort_sandbox import SandboxServer
from lead_sync import stages
from lead_sync.db.stores import ensure_stores
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.read.config import load_config
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy
from lead_sync.db.engines import prepare_engine

from tests.support.processes import wait_for
from tests.support import TOKEN, pg_url, signups, verifications
from tests.support.clock import FakeClock
from tests.support.seeding import PARTITION, new_run_id

pytestmark = pytest.mark.postgres

SIGNUPS = 1600  # every 4th deferred, with its verification: 2,000 events


def seed_events(wh) -> int:
    ensure_stores(wh.engine)  # as each task does before its stage
    wh.create_sources()
    start = datetime(2026, 11, 27)
    rows = [dict(customer_external_id=n, click_id=f"click-{n}", customer_name=f"Name {n}",
                 customer_email=f"u{n}@example.com", customer_avatar=None,
                 signed_up_at=start + timedelta(seconds=40 * n), requires_verification=n % 4 == 0)
            for n in range(SIGNUPS)]
    checks = [dict(customer_external_id=str(r["customer_external_id"]), event_name="email_verified",
                   verified_at=(r["signed_up_at"] + timedelta(seconds=10)).replace(tzinfo=timezone.utc))
              for r in rows if r["requires_verification"]]
    wh.add(signups, *rows)
    wh.add(verifications, *checks)
    run_id = new_run_id()
    assert stages.extract_and_map(wh.engine, load_config(), PARTITION, run_id)["new"] == len(rows) + len(checks)
    return len(rows) + len(checks)


class Counts:
    """Committed transactions and sessions of one database, from PostgreSQL's statistics."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.admin = create_engine(pg_url(os.environ.get("PGDATABASE", "postgres")), isolation_level="AUTOCOMMIT")

    def read(self) -> tuple[int, int]:
        with self.admin.connect() as conn:
            # A backend writes its counters when it exits: wait until none is left on the database.
            wait_for(lambda: conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"),
                                          {"d": self.database}).scalar() == 0,
                     timeout=30, what="the database's sessions to end", every=0.05)
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            commits, sessions = conn.execute(
                text("SELECT xact_commit, sessions FROM pg_stat_database WHERE datname = :d"),
                {"d": self.database}).one()
        return int(commits), int(sessions)

    def close(self) -> None:
        self.admin.dispose()


@pytest.mark.parametrize("per_minute", [None, 1_000_000], ids=["no-limit", "high-limit"])
def test_at_full_speed_at_most_a_tenth_of_a_transaction_per_delivered_event(pg_warehouse, per_minute):
    total = seed_events(pg_warehouse)
    name = pg_warehouse.url.database
    pg_warehouse.engine.dispose()  # the seeding engine's sessions end (and count) before the first reading
    # Autovacuum's transactions would count too: not during the measurement.
    tuning = create_engine(pg_warehouse.url, isolation_level="AUTOCOMMIT")
    with tuning.connect() as conn:
        for table in ("lead_event_deliveries", "lead_event_outbox", "lead_event_delivery_attempts",
                      "lead_event_rate_slots", "lead_event_rate_buckets", "lead_event_sync_runs"):
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    tuning.dispose()
    counts = Counts(name)
    try:
        commits_before, sessions_before = counts.read()
        # The measured engine: no pool_pre_ping (each ping would be a transaction of its own).
        engine = prepare_engine(create_engine(pg_warehouse.url))
        clock = FakeClock()
        with SandboxServer(host="127.0.0.1", port=0, token=TOKEN, rate_limit_per_minute=None) as sandbox:
            with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=5.0) as client:
                limiter = SharedRateLimiter(engine, "cost-bucket", per_minute, clock=clock)
                report = stages.send_open_events(engine, client, limiter, RetryPolicy(3, 0.05, 0.5), new_run_id(),
                                                   600, "cutmeshort_default", clock=clock, sleep=clock.sleep)
            assert sandbox.stats()["by_status"] == {"200": total}
        engine.dispose()
        commits_after, sessions_after = counts.read()
    finally:
        counts.close()
    assert report.delivered == total == 2000 and report.requests == total
    # Each session's start-up is counted as a committed transaction: those are not the work's.
    work = (commits_after - commits_before) - (sessions_after - sessions_before)
    assert 0 < work <= 0.1 * report.delivered, (work, report.delivered)
