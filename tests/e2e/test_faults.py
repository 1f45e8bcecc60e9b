"""Delivery under faults, through Airflow against real PostgreSQL: count what the API got and what the audit says."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import update

from tests.support.dagrun import airflow_cli_env, run_dag
from lead_sync.db.schema import deliveries
from tests.support import allow_connections, signups, verifications
from tests.support.seeding import seed_day
from tests.support.sending import lead_counts

pytestmark = [pytest.mark.usefixtures("airflow_db"), pytest.mark.postgres]

FAST = dict(timeout_seconds=1, backoff_base_seconds=0.05, backoff_max_seconds=0.3)


def api_hits(sandbox) -> Counter:
    """Requests per event that the API answered 2xx or 409 (i.e. that it had in hand)."""
    return Counter((r["body"]["customerExternalId"], r["body"]["eventName"]) for r in sandbox.requests()
                   if r["status"] in (200, 409) and isinstance(r["body"], dict))


def test_rerun_same_day_and_backfill_range_send_nothing_twice(pg_warehouse, sandbox):
    total = sum(seed_day(pg_warehouse, f"2026-11-{d}", 4, first_id=d * 100) for d in (24, 25, 26))
    assert run_dag(pg_warehouse, sandbox.url, conf={"partition_date": "2026-11-25"}) == "success"
    first = len(sandbox.requests())
    assert first == 12  # the 25th, and the 24th through the look-back (3 days)
    assert run_dag(pg_warehouse, sandbox.url, conf={"partition_date": "2026-11-25"}) == "success"
    assert len(sandbox.requests()) == first
    # A change in the warehouse is re-evaluated by a rerun: a new late row for the same day is sent.
    pg_warehouse.add(signups, dict(customer_external_id=2599, click_id="late", customer_name=None, customer_email=None,
                                   customer_avatar=None, signed_up_at=datetime(2026, 11, 25, 23, 0),
                                   requires_verification=False))
    assert run_dag(pg_warehouse, sandbox.url, conf={"partition_date": "2026-11-25"}) == "success"
    assert len(sandbox.requests()) == first + 1
    # A backfill over the range, latest day first, then the whole range again.
    for day in ("26", "25", "24", "24", "25", "26"):
        assert run_dag(pg_warehouse, sandbox.url, logical_date=f"2026-11-{int(day) + 1}") == "success"
    counts = lead_counts(sandbox)
    assert sum(counts.values()) == total + 1 and set(counts.values()) == {1}
    assert len(sandbox.requests()) == total + 1
    assert pg_warehouse.status_counts() == {"delivered": total + 1}


def test_429_5xx_and_timeouts_end_delivered_exactly_once(pg_warehouse, sandbox):
    total = seed_day(pg_warehouse, "2026-11-27", 12)
    sandbox.set_faults({"burst_429": {"count": 2, "retry_after": 1}, "error_rate": 0.25, "error_status": 503,
                        "slow_rate": 0.15, "slow_ms": 1500, "seed": 7})
    assert run_dag(pg_warehouse, sandbox.url, max_attempts=12, **FAST) == "success"

    counts = lead_counts(sandbox)
    assert len(counts) == total and set(counts.values()) == {1}
    audit = pg_warehouse.deliveries()
    assert all(row["status"] == "delivered" for row in audit.values())
    attempts = pg_warehouse.attempts()
    requests = sandbox.requests()
    assert len(attempts) == len(requests)  # every request the API saw is on record, and nothing else
    # Answers match one for one, except that a request slower than the client's timeout is
    # on record without a status (the client gave up) while the API did answer it.
    slow = [r for r in requests if r["fault"] == "slow_rate"]
    assert Counter(a["http_status"] for a in attempts if a["http_status"] is not None) == \
        Counter(r["status"] for r in requests if r["fault"] != "slow_rate")
    assert sum(a["http_status"] is None for a in attempts) == len(slow)
    faults = Counter(r["fault"] for r in requests)
    assert faults["burst_429"] == 2 and faults["error_rate"] > 0 and faults["slow_rate"] > 0
    # After a 429 with Retry-After: 1, the next attempt waited at least that long.
    first_429 = next(i for i, a in enumerate(attempts) if a["http_status"] == 429)
    gap = attempts[first_429 + 1]["sent_at"] - attempts[first_429]["sent_at"]
    assert gap >= timedelta(seconds=0.95)
    # Per event, attempt numbers run 1..n without gaps.
    by_event: dict[str, list[int]] = {}
    for a in attempts:
        by_event.setdefault(a["event_key"], []).append(a["attempt"])
    assert all(nums == list(range(1, len(nums) + 1)) for nums in by_event.values())
    assert all(audit_row["attempts"] == len(by_event[audit_row["event_key"]]) for audit_row in audit.values())


def test_permanent_422_is_rejected_once_and_resent_after_its_row_changes(pg_warehouse, sandbox):
    seed_day(pg_warehouse, "2026-11-27", 3, deferred_every=0)
    sandbox.set_faults({"permanent_errors": {"2": 422}})
    assert run_dag(pg_warehouse, sandbox.url, **FAST) == "success"
    row = pg_warehouse.deliveries()[("2", "signup_started")]
    assert (row["status"], row["attempts"], row["http_status"]) == ("rejected", 1, 422)
    assert row["reason"].startswith("rejected by the API: HTTP 422")
    assert pg_warehouse.runs()[0]["rejected"] == 1

    sandbox.set_faults({"permanent_errors": {}})
    assert run_dag(pg_warehouse, sandbox.url, **FAST) == "success"  # unchanged row: not sent again
    assert len(sandbox.requests()) == 3
    pg_warehouse.execute("UPDATE signups SET click_id = 'fixed' WHERE customer_external_id = 2")
    assert run_dag(pg_warehouse, sandbox.url, **FAST) == "success"
    assert len(sandbox.requests()) == 4
    assert sandbox.leads()[-1]["clickId"] == "fixed"
    assert pg_warehouse.deliveries()[("2", "signup_started")]["status"] == "delivered"


def test_permanent_5xx_gives_up_fails_that_run_only_and_a_partition_rerun_reopens_it(pg_warehouse, sandbox):
    seed_day(pg_warehouse, "2026-11-27", 3, deferred_every=0)
    sandbox.set_faults({"permanent_errors": {"3": 500}})
    # give_up_after_hours so short (3.6 ms) that the run's last attempt is already past it.
    quick = dict(max_attempts=3, give_up_after_hours=0.000001, **FAST)
    assert run_dag(pg_warehouse, sandbox.url, **quick) == "failed"
    row = pg_warehouse.deliveries()[("3", "signup_started")]
    assert (row["status"], row["attempts"]) == ("failed", 3) and row["reason"].startswith("gave up after")
    (run,) = pg_warehouse.runs()
    assert run["outcome"] == "failed" and "gave up" in run["message"]
    assert len(sandbox.requests()) == 2 + 3

    # Final for automatic runs: the next nightly run does not retry it and is not failed by it.
    sandbox.set_faults({"permanent_errors": {}})
    assert run_dag(pg_warehouse, sandbox.url, logical_date="2026-11-29", **quick) == "success"
    assert len(sandbox.requests()) == 5
    assert pg_warehouse.deliveries()[("3", "signup_started")]["status"] == "failed"

    # A rerun of its partition re-opens it and sends it again.
    assert run_dag(pg_warehouse, sandbox.url, conf={"partition_date": "2026-11-27"}, **quick) == "success"
    assert lead_counts(sandbox)[("3", "signup_started")] == 1
    again = pg_warehouse.deliveries()[("3", "signup_started")]
    assert (again["status"], again["attempts"]) == ("delivered", 4)
    assert len(sandbox.requests()) == 6


def test_revoked_token_stops_at_once_and_a_good_token_delivers_everything(pg_warehouse, sandbox):
    total = seed_day(pg_warehouse, "2026-11-27", 6)
    sandbox.set_faults({"revoked": True})
    assert run_dag(pg_warehouse, sandbox.url, **FAST) == "failed"
    assert len(sandbox.requests()) <= 2
    counts = pg_warehouse.status_counts()
    assert counts.get("rejected", 0) == 0 and counts.get("failed", 0) == 0
    run = pg_warehouse.runs()[0]
    assert run["outcome"] == "failed" and "cutmeshort_default" in run["message"]

    sandbox.set_faults({"revoked": False})
    assert run_dag(pg_warehouse, sandbox.url, **FAST) == "success"
    assert len(lead_counts(sandbox)) == total


def test_partition_over_the_time_budget_carries_over(pg_warehouse, sandbox):
    total = seed_day(pg_warehouse, "2026-11-27", 12, deferred_every=0)
    sandbox.set_faults({"rate_limit_per_minute": 5})
    state = run_dag(pg_warehouse, sandbox.url, conf={"time_budget_seconds": 3}, rate_limit_per_minute=5, **FAST)
    assert state == "success"
    assert len(sandbox.leads()) == 5 and len(sandbox.requests()) == 5  # no 429: the limiter held
    counts = pg_warehouse.status_counts()
    assert counts == {"delivered": 5, "pending": total - 5}
    assert pg_warehouse.runs()[0]["send_result"] == "budget_exhausted"

    sandbox.set_faults({"rate_limit_per_minute": None})
    assert run_dag(pg_warehouse, sandbox.url, logical_date="2026-11-29", rate_limit_per_minute=1000, **FAST) == "success"
    counts = lead_counts(sandbox)
    assert len(counts) == total and set(counts.values()) == {1}


def test_event_two_waits_then_is_skipped_past_the_wait_limit(pg_warehouse, sandbox):
    pg_warehouse.create_sources()
    pg_warehouse.add(verifications, dict(customer_external_id="77", event_name="email_verified",
                                         verified_at="2026-11-27T10:00:00+00:00"))
    assert run_dag(pg_warehouse, sandbox.url) == "success"
    row = pg_warehouse.deliveries()[("77", "email_verified")]
    assert row["status"] == "pending" and "not on record" in row["reason"]
    # Eight days later (the default wait is seven), still no event 1.
    with pg_warehouse.engine.begin() as conn:
        conn.execute(update(deliveries).values(created_at=row["created_at"] - timedelta(days=8)))
    assert run_dag(pg_warehouse, sandbox.url, logical_date="2026-12-06") == "success"
    row = pg_warehouse.deliveries()[("77", "email_verified")]
    assert row["status"] == "skipped" and "after 7 days" in row["reason"]
    assert sandbox.requests() == []


def _start_run(home, warehouse, api_url, *args, **extra) -> subprocess.Popen:
    return subprocess.Popen(["airflow", "dags", "test", "lead_events_sync", *args],
                            env=airflow_cli_env(home, warehouse, api_url, **extra), cwd="/",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_9_while_sending_then_rerun_loses_nothing(airflow_db, pg_warehouse, sandbox):
    total = seed_day(pg_warehouse, "2026-11-27", 15)
    sandbox.set_faults({"latency_ms": 400})
    proc = _start_run(airflow_db, pg_warehouse, sandbox.url, "2026-11-28", timeout_seconds=2)
    try:
        deadline = time.monotonic() + 120
        while len(sandbox.requests()) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        _stop(proc)  # kill -9 of the whole process group, mid-request
    assert len(lead_counts(sandbox)) < total

    sandbox.set_faults({"latency_ms": 0})
    assert run_dag(pg_warehouse, sandbox.url, timeout_seconds=2) == "success"
    assert len(lead_counts(sandbox)) == total  # nothing lost
    assert pg_warehouse.status_counts() == {"delivered": total}
    twice = {event for event, n in api_hits(sandbox).items() if n > 1}
    unknown = [a for a in pg_warehouse.attempts() if a["outcome"] == "unknown"]
    # Requests on the wire (or claimed for it) when the process died are audited `unknown`; only
    # those may reach the API twice.
    assert unknown and len(twice) <= len(unknown)
    for event in twice:
        row = pg_warehouse.deliveries()[event]
        assert row["event_key"] in {a["event_key"] for a in unknown}



def test_warehouse_going_away_fails_cleanly_and_a_rerun_completes(pg_warehouse, sandbox, monkeypatch):
    # The run is in this process (dag.test): the writer gives the warehouse 5 s instead of 90 before
    # the send fails, and Airflow's retries come after 1 s instead of 30 (the outcome is the same).
    from lead_sync.delivery import writer as delivery

    monkeypatch.setattr(delivery, "WRITE_RETRY_SECONDS", 5.0)

    def quick_retries(dag) -> None:
        for task in dag.tasks:
            task.retry_delay = timedelta(seconds=1)

    total = seed_day(pg_warehouse, "2026-11-27", 15)
    sandbox.set_faults({"latency_ms": 300})
    name = pg_warehouse.url.database

    def pull_the_plug() -> None:
        deadline = time.monotonic() + 60
        while len(sandbox.requests()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        allow_connections(name, False)

    plug = threading.Thread(target=pull_the_plug)
    plug.start()
    try:
        state = run_dag(pg_warehouse, sandbox.url, timeout_seconds=1, adjust=quick_retries)
    finally:
        plug.join(timeout=90)
        allow_connections(name, True)
    assert state == "failed"
    sent_before = len(lead_counts(sandbox))
    assert 0 < sent_before < total

    sandbox.set_faults({"latency_ms": 0})
    assert run_dag(pg_warehouse, sandbox.url, timeout_seconds=1) == "success"
    counts = lead_counts(sandbox)
    assert len(counts) == total and set(counts.values()) == {1}
    assert pg_warehouse.status_counts() == {"delivered": total}


def test_concurrent_runs_share_one_rate_limit(airflow_db, pg_warehouse, sandbox, tmp_path):
    seed_day(pg_warehouse, "2026-11-26", 12, first_id=100, deferred_every=0)
    seed_day(pg_warehouse, "2026-11-27", 12, first_id=200, deferred_every=0)
    sandbox.set_faults({"rate_limit_per_minute": None})
    # Two deployments' worth of senders: each run has its own Airflow home (a copy of the
    # migrated metadata database), so that only the warehouse and the API are shared.
    homes = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        shutil.copy(airflow_db / "airflow.db", home / "airflow.db")
        homes.append(home)
    runs = [
        _start_run(home, pg_warehouse, sandbox.url, logical_date, "-c", '{"time_budget_seconds": 12}',
                   rate_limit_per_minute=8)
        for home, logical_date in zip(homes, ("2026-11-27", "2026-11-28"), strict=True)
    ]
    try:
        for proc in runs:
            proc.wait(timeout=240)
    finally:
        for proc in runs:
            _stop(proc)
    stats = sandbox.stats()
    assert 0 < stats["requests"] <= 8
    assert stats["max_requests_in_any_60s"] <= 8
    counts = lead_counts(sandbox)
    assert set(counts.values()) == {1}
    audit = pg_warehouse.status_counts()
    assert audit.get("delivered", 0) == len(counts) and audit.get("pending", 0) == 24 - len(counts)
