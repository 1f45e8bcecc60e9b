"""Under a real scheduler (LocalExecutor): `airflow backfill create` and `airflow tasks clear` send nothing twice."""
from __future__ import annotations

import subprocess
from datetime import datetime

import pytest

from tests.support.dagrun import airflow_cli_env
from tests.support.processes import free_port, local_deployment, start_airflow_services, stop, wait_for
from lead_sync.db.schema import ensure_schema
from tests.support import signups, verifications
from tests.support.seeding import seed_day
from tests.support.sending import lead_counts

pytestmark = pytest.mark.postgres




def _finished_runs(warehouse) -> list[dict]:
    # Unpausing also starts the latest scheduled run (today's yesterday); only backfill runs count here.
    return [r for r in warehouse.runs() if r["finished_at"] is not None and r["run_id"].startswith("backfill__")]






def test_backfill_and_clear_under_the_scheduler(tmp_path, pg_warehouse, sandbox, metadata_db):
    total = sum(seed_day(pg_warehouse, f"2026-11-{d}", 3, first_id=d * 100) for d in (24, 25, 26))
    # A deferred signup late on the 24th verified early on the 25th: event 2 lives in a later partition.
    pg_warehouse.add(signups, dict(customer_external_id=2499, click_id="late", customer_name=None,
                                   customer_email=None, customer_avatar=None,
                                   signed_up_at=datetime(2026, 11, 24, 23, 50), requires_verification=True))
    pg_warehouse.add(verifications, dict(customer_external_id="2499", event_name="email_verified",
                                         verified_at=datetime.fromisoformat("2026-11-25T00:05:00+00:00")))
    total += 2
    ensure_schema(pg_warehouse.engine)  # so that the test can watch lead_event_sync_runs from the start

    port = free_port()
    env = airflow_cli_env(tmp_path / "airflow", pg_warehouse, sandbox.url)
    env.update(local_deployment(port, metadata_db))

    def cli(*args: str, may_fail: bool = False) -> str | None:
        done = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=180)
        if may_fail and done.returncode != 0:
            return None
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    cli("db", "migrate")
    cli("pools", "set", "cutmeshort_api", "1", "CutMeShort API sends")
    logs = open(tmp_path / "services.log", "wb")
    services = start_airflow_services(env, port, logs)
    try:
        wait_for(lambda: "lead_events_sync" in cli("dags", "list", "-o", "plain"), 120, "the DAG to be parsed")
        cli("dags", "unpause", "lead_events_sync")  # the scheduler runs no task of a paused DAG
        # Latest day first: the verification on the 25th is seen before its signup on the 24th.
        cli("backfill", "create", "--dag-id", "lead_events_sync", "--from-date", "2026-11-24",
            "--to-date", "2026-11-26", "--run-backwards")
        wait_for(lambda: len(_finished_runs(pg_warehouse)) == 3, 240, "three backfill runs")
        runs = {r["partition_date"].isoformat(): r for r in _finished_runs(pg_warehouse)}
        assert sorted(runs) == ["2026-11-24", "2026-11-25", "2026-11-26"]
        assert all(r["run_id"].startswith("backfill__") and r["outcome"] == "success" for r in runs.values())
        counts = lead_counts(sandbox)
        assert len(counts) == total and set(counts.values()) == {1}
        order = [(l["customerExternalId"], l["eventName"]) for l in sandbox.leads()]
        assert order.index(("2499", "signup_started")) < order.index(("2499", "email_verified"))
        sent = len(sandbox.requests())

        # The whole range again, then one day cleared in place: nothing is sent twice.
        # One backfill per DAG at a time: the scheduler closes the first one shortly after its last run.
        wait_for(lambda: cli("backfill", "create", "--dag-id", "lead_events_sync", "--from-date", "2026-11-24",
                          "--to-date", "2026-11-26", "--reprocess-behavior", "completed", may_fail=True) is not None,
              120, "the first backfill to close")
        wait_for(lambda: len(_finished_runs(pg_warehouse)) == 3 and all(
            r["started_at"] > runs[r["partition_date"].isoformat()]["finished_at"] for r in _finished_runs(pg_warehouse)
        ), 240, "the reprocessed backfill runs")
        before = {r["run_id"]: r["finished_at"] for r in _finished_runs(pg_warehouse)}
        cli("tasks", "clear", "lead_events_sync", "-s", "2026-11-25", "-e", "2026-11-25", "-y")
        wait_for(lambda: any(r["finished_at"] > before[r["run_id"]] for r in _finished_runs(pg_warehouse)),
              240, "the cleared run")
        assert len(sandbox.requests()) == sent
        assert pg_warehouse.status_counts() == {"delivered": total}
    finally:
        stop(services)
        logs.close()
