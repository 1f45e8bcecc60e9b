"""Under a real scheduler (LocalExecutor, PostgreSQL metadata): the whole daily allowance.

One deployment, three things proved in turn (section 8):
1. A nightly run that cannot send its partition within its time budget leaves the rest
   pending, and `lead_events_drain` (every 5 minutes, on its own) sends it: nobody acts,
   nothing is sent twice, the API's per-minute limit is never exceeded.
2. Downstream: a DAG scheduled on the Asset `lead_event_deliveries` runs after the nightly run.
3. Giving up is final for automatic runs and reversible by a run of the partition:
   `airflow tasks clear` of the partition's run, or a manual rerun with conf `partition_date`.
"""
from __future__ import annotations

import json
import subprocess
import textwrap
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, func, select, text

from cutmeshort_sandbox import SandboxServer
from tests.support.dagrun import airflow_cli_env
from tests.support.processes import free_port, local_deployment, start_airflow_services, stop, wait_for
from lead_sync.db.schema import attempts, deliveries, ensure_schema
from tests.support import ROOT, TOKEN, write_sources
from tests.support.seeding import seed_backlog, seed_day
from tests.support.sending import lead_counts
from tests.support.vendor import assert_vendor_schema

pytestmark = pytest.mark.postgres

NIGHTLY_DAY = "2026-11-27"
BACKLOG = 1200  # two windows of the limit: the nightly run sends one, the drain the other
RATE = 600  # the API's per-minute limit, and the connection's
FIRST_ID = 100_000
# Retries quick enough for a test; a generous client timeout, as the machine is busy.
EXTRA = dict(rate_limit_per_minute=RATE, timeout_seconds=5, max_attempts=3, backoff_base_seconds=0.05,
             backoff_max_seconds=0.3)
DOWNSTREAM_DAG = "lead_deliveries_report"
DOWNSTREAM_FILE = textwrap.dedent('''
    """Stands for a dbt model or a report: runs whenever the delivery audit changes."""
    import json
    import os
    import re
    from datetime import datetime, timezone
    from pathlib import Path

    from airflow.sdk import Asset, dag, task


    @dag(dag_id="%s", schedule=[Asset("lead_event_deliveries")], start_date=datetime(2026, 1, 1), catchup=False)
    def lead_deliveries_report():
        @task
        def record(**context):
            sources = [{"dag_id": e.source_dag_id, "run_id": e.source_run_id}
                       for events in context["triggering_asset_events"].values() for e in events]
            out = Path(os.environ["LEAD_REPORT_OUT"])
            out.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", context["run_id"])
            (out / f"{name}.json").write_text(json.dumps({
                "run_id": context["run_id"], "ran_at": datetime.now(timezone.utc).isoformat(), "sources": sources}))

        record()


    lead_deliveries_report()
''' % DOWNSTREAM_DAG)
DONE = ("success", "failed")






def _now() -> datetime:
    return datetime.now(timezone.utc)


def _busiest_minute(stamps: list[datetime]) -> int:
    stamps = sorted(stamps)
    best = start = 0
    for end, moment in enumerate(stamps):
        while (moment - stamps[start]).total_seconds() >= 60:
            start += 1
        best = max(best, end - start + 1)
    return best




@pytest.fixture
def api():
    """The API sandbox with the per-minute limit of this test (the shared fixture has 60)."""
    with SandboxServer(host="127.0.0.1", port=0, token=TOKEN, rate_limit_per_minute=RATE) as server:
        yield server
        assert_vendor_schema([r["body"] for r in server.requests() if r["authorized"]])


def test_drain_downstream_asset_and_reopening_under_the_scheduler(tmp_path, pg_warehouse, api, metadata_db):
    began = time.monotonic()
    wh = pg_warehouse
    wh.create_sources()  # empty at first: see the scheduled run below
    ensure_schema(wh.engine)  # so that the test can watch the audit from the start

    dags = tmp_path / "dags"
    dags.mkdir()
    for name in ("lead_events_sync.py", "lead_events_drain.py"):
        (dags / name).symlink_to(ROOT / "dags" / name)
    (dags / f"{DOWNSTREAM_DAG}.py").write_text(DOWNSTREAM_FILE)
    reports = tmp_path / "reports"

    port = free_port()
    env = airflow_cli_env(tmp_path / "airflow", wh, api.url, **EXTRA)
    env.update({
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        **local_deployment(port, metadata_db),
        "LEAD_REPORT_OUT": str(reports),
        # The drain every minute (default 5), so that the test does not wait for a 5-minute tick.
        "LEAD_SYNC_SOURCES": str(write_sources(tmp_path, drain_interval_minutes=1)),
    })
    meta = create_engine(metadata_db, pool_pre_ping=True)

    def cli(*args: str) -> str:
        done = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=180, cwd="/")
        assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    def dag_runs(dag_id: str) -> list[dict]:
        with meta.connect() as conn:
            return [dict(r) for r in conn.execute(text(
                "SELECT run_id, run_type, state, logical_date, start_date, end_date, clear_number FROM dag_run "
                "WHERE dag_id = :d ORDER BY id"), {"d": dag_id}).mappings()]

    def dag_run(dag_id: str, run_id: str) -> dict | None:
        return next((r for r in dag_runs(dag_id) if r["run_id"] == run_id), None)

    def task_states(dag_id: str, run_id: str) -> dict[str, str]:
        with meta.connect() as conn:
            return dict(conn.execute(text("SELECT task_id, state FROM task_instance WHERE dag_id = :d AND run_id = :r"),
                                     {"d": dag_id, "r": run_id}).all())

    def finished(dag_id: str, run_id: str, clear_number: int = 0) -> dict | None:
        run = dag_run(dag_id, run_id)
        return run if run and run["state"] in DONE and run["clear_number"] >= clear_number else None

    def audit_runs() -> dict[str, dict]:
        return {r["run_id"]: r for r in wh.runs()}

    def events(customer_ids) -> dict[str, dict]:
        return {k[0]: v for k, v in wh.deliveries().items() if k[0] in customer_ids}

    def day_counts(day: str) -> dict[str, int]:
        with wh.engine.connect() as conn:
            return dict(conn.execute(select(deliveries.c.status, func.count())
                                     .where(deliveries.c.partition_date == datetime.fromisoformat(day).date())
                                     .group_by(deliveries.c.status)).all())

    cli("db", "migrate")
    cli("pools", "set", "cutmeshort_api", "2", "CutMeShort API sends")
    logs = open(tmp_path / "services.log", "wb")
    services = start_airflow_services(env, port, logs)
    timeline: list[tuple[str, datetime]] = []
    try:
        def parsed():
            with meta.connect() as conn:
                errors = conn.execute(text("SELECT filename, stacktrace FROM import_error")).all()
                assert not errors, errors
                found = {d for (d,) in conn.execute(text("SELECT dag_id FROM dag WHERE is_stale IS NOT TRUE"))}
            return {"lead_events_sync", "lead_events_drain", DOWNSTREAM_DAG} <= found
        wait_for(parsed, 120, "the three DAGs to be parsed")
        for dag_id in (DOWNSTREAM_DAG, "lead_events_drain", "lead_events_sync"):
            cli("dags", "unpause", dag_id)
        # Unpausing starts the latest scheduled run of each: the nightly one syncs yesterday (the
        # machine's clock may make that the very day this test uses), the drain's finds nothing.
        # Both end before the warehouse has a row, so that the one manual run below is the nightly run.
        wait_for(lambda: any(r["run_type"] == "scheduled" and r["state"] in DONE for r in dag_runs("lead_events_sync")),
              180, "the scheduled nightly run started by unpausing")
        wait_for(lambda: any(r["run_type"] == "scheduled" and r["state"] in DONE for r in dag_runs("lead_events_drain")),
              120, "the idle drain run started by unpausing")
        assert api.requests() == []
        assert not any(r["run_id"].startswith("lead_events_drain/") for r in wh.runs())  # idle: skipped, no row

        seed_backlog(wh, NIGHTLY_DAY, BACKLOG, FIRST_ID)
        # Two events of earlier days, for part 3; no run below reads those days until then.
        seed_day(wh, "2026-11-20", 1, first_id=555, deferred_every=0)
        seed_day(wh, "2026-11-19", 1, first_id=556, deferred_every=0)

        # ---- 1. one nightly run, then nobody acts --------------------------------------------------
        nightly = "nightly-2026-11-27"
        timeline.append(("nightly run triggered", _now()))
        cli("dags", "trigger", "lead_events_sync", "-r", nightly,
            "-c", json.dumps({"partition_date": NIGHTLY_DAY, "time_budget_seconds": 60}))
        wait_for(lambda: finished("lead_events_sync", nightly), 240, "the nightly run")
        night = audit_runs()[nightly]
        assert dag_run("lead_events_sync", nightly)["state"] == "success"
        assert night["outcome"] == "success" and night["send_result"] == "budget_exhausted", night
        assert 0 < night["requests_sent"] < BACKLOG, night
        timeline.append(("nightly run ended (audit finished_at)", night["finished_at"]))

        wait_for(lambda: day_counts(NIGHTLY_DAY) == {"delivered": BACKLOG}, 12 * 60,
              "lead_events_drain to deliver the whole backlog", every=2)
        with wh.engine.connect() as conn:
            sent = conn.execute(select(attempts.c.run_id, attempts.c.outcome, attempts.c.sent_at)
                                .order_by(attempts.c.id)).all()
            last_delivered = conn.execute(select(func.max(deliveries.c.delivered_at))).scalar()
        by_run: dict[str, int] = {}
        for run_id, outcome, _ in sent:
            assert outcome == "delivered", (run_id, outcome)
            by_run[run_id] = by_run.get(run_id, 0) + 1
        drained = {r: n for r, n in by_run.items() if r.startswith("lead_events_drain/")}
        assert set(by_run) == {nightly, *drained}, by_run
        assert by_run[nightly] == night["requests_sent"] and sum(drained.values()) == BACKLOG - by_run[nightly]
        assert drained, "no drain run sent anything"
        # The last drain run writes its summary a moment after its last delivery.
        def summarised() -> dict | None:
            found = audit_runs()
            return found if all(found[d]["outcome"] != "running" for d in drained) else None
        rows = wait_for(summarised, 120, "the drain runs' summaries")
        for run_id, n in drained.items():
            assert rows[run_id]["outcome"] == "success" and rows[run_id]["requests_sent"] == n, rows[run_id]
        nightly_last = max(at for r, _, at in sent if r == nightly)
        drain_first = min(at for r, _, at in sent if r in drained)
        nightly_first = min(at for r, _, at in sent if r == nightly)
        timeline += [("nightly run's first request", nightly_first), ("nightly run's last request", nightly_last),
                     ("first drain run started (audit started_at)", min(rows[r]["started_at"] for r in drained)),
                     ("drain's first request", drain_first), ("last event delivered", last_delivered)]
        # Every event reached the API exactly once; the API never answered 429; no 60 s held more than the limit.
        counts = lead_counts(api)
        assert len(counts) == BACKLOG and set(counts.values()) == {1}
        requests = api.requests()
        assert len(requests) == BACKLOG and {r["status"] for r in requests} == {200}
        busiest = _busiest_minute([datetime.fromisoformat(r["received_at"].replace("Z", "+00:00")) for r in requests])
        stats = api.stats()
        assert busiest <= RATE and stats["max_requests_in_any_60s"] <= RATE, (busiest, stats)
        # Section 8: sending resumes within the drain's interval of the run that left it (every minute
        # here, 5 by default), plus a little scheduling latency on top of the tick.
        resumed_after = (drain_first - night["finished_at"]).total_seconds()
        assert resumed_after <= 60 + 30, resumed_after

        # ---- 2. the downstream DAG ran on the Asset the nightly run updated --------------------------
        def asset_scheduling_state() -> str:
            """What Airflow knows of the Asset's events and the downstream DAG's runs, for a failure message."""
            queries = {
                "asset events": "SELECT id, source_dag_id, source_run_id, timestamp FROM asset_event ORDER BY id",
                "queued (ADRQ)": "SELECT target_dag_id, created_at FROM asset_dag_run_queue",
                "downstream runs": "SELECT r.run_id, r.state, r.run_after, ti.state AS task_state, ti.try_number "
                                   "FROM dag_run r LEFT JOIN task_instance ti ON ti.run_id = r.run_id AND "
                                   f"ti.dag_id = r.dag_id WHERE r.dag_id = '{DOWNSTREAM_DAG}' ORDER BY r.id",
                "consumed": "SELECT r.run_id, c.event_id FROM dagrun_asset_event c JOIN dag_run r ON r.id = c.dag_run_id",
                "downstream DAG": f"SELECT is_paused, is_stale FROM dag WHERE dag_id = '{DOWNSTREAM_DAG}'",
            }
            with meta.connect() as conn:
                return "\n".join(f"{name}: {[tuple(row) for row in conn.execute(text(sql))]}" for name, sql in queries.items())

        def downstream_of(run_id: str):
            found = [json.loads(p.read_text()) for p in reports.glob("*.json")] if reports.exists() else []
            return [r for r in found if any(s["run_id"] == run_id for s in r["sources"])]
        def wait_for_downstream_of(run_id: str, timeout: float, what: str) -> list[dict]:
            try:
                return wait_for(lambda: downstream_of(run_id), timeout, what)
            except AssertionError as timed_out:
                raise AssertionError(f"{timed_out}\n{asset_scheduling_state()}") from None

        after_nightly = wait_for_downstream_of(nightly, 120, "the downstream DAG to run on the nightly's Asset")
        ran_at = datetime.fromisoformat(after_nightly[0]["ran_at"])
        assert ran_at > night["finished_at"]
        assert dag_run(DOWNSTREAM_DAG, after_nightly[0]["run_id"])["run_type"] == "asset_triggered"
        timeline.append(("downstream DAG ran (Asset of the nightly run)", ran_at))

        print("\n--- the whole daily allowance: timeline (UTC) ---")
        t0 = timeline[0][1]
        for what, at in sorted(timeline, key=lambda item: item[1]):
            print(f"  {at:%H:%M:%S.%f}"[:-3] + f"  +{(at - t0).total_seconds():7.1f}s  {what}")
        print(f"  nightly sent {by_run[nightly]} (send_result {night['send_result']}); drain runs sent "
              f"{drained}; resumed {resumed_after:.0f}s after the nightly run ended; busiest 60 s: {busiest} "
              f"requests (sandbox: {stats['max_requests_in_any_60s']})")

        # ---- 3. giving up, final for automatic runs; re-opened by a run of the partition ---------------
        api.set_faults({"permanent_errors": {"555": 500, "556": 500}})
        part = "partition-2026-11-20"
        # A logical date, so that `airflow tasks clear -s/-e` can find this manual run again.
        cli("dags", "trigger", "lead_events_sync", "-r", part, "-l", "2026-11-20T00:00:00+00:00",
            "-c", json.dumps({"partition_date": "2026-11-20"}))
        wait_for(lambda: finished("lead_events_sync", part), 240, "the run of 2026-11-20")
        assert dag_run("lead_events_sync", part)["state"] == "success"  # left open: not a failure
        # Its look-back read 2026-11-19 too: both events were tried and left open, retrying.
        ev = events({"555", "556"})
        assert {c: (e["status"], e["attempts"], e["partition_date"].isoformat()) for c, e in ev.items()} == \
            {"555": ("pending", 3, "2026-11-20"), "556": ("pending", 3, "2026-11-19")}, ev
        assert all(e["reason"].startswith("retrying: HTTP 500") for e in ev.values()), ev
        # 73 hours later (give_up_after_hours is 72), and due.
        wh.execute("UPDATE lead_event_deliveries SET retry_since = now() - interval '73 hours', "
                   "next_attempt_at = now() - interval '1 minute' WHERE customer_external_id IN ('555', '556')")
        cli("dags", "trigger", "lead_events_drain", "-r", "give-up")
        wait_for(lambda: all(e["status"] == "failed" for e in events({"555", "556"}).values()), 180,
              "a drain run to give the two events up")
        ev = events({"555", "556"})
        gave_up_in = {e["last_run_id"] for e in ev.values()}
        assert len(gave_up_in) == 1 and next(iter(gave_up_in)).startswith("lead_events_drain/"), gave_up_in
        gave_up_in = next(iter(gave_up_in))
        assert all(e["attempts"] == 6 and e["reason"].startswith("gave up after 73.0 h") for e in ev.values()), ev
        wait_for(lambda: finished("lead_events_drain", gave_up_in.split("/", 1)[1]), 120, "the give-up drain run")
        assert audit_runs()[gave_up_in]["outcome"] == "failed"
        assert audit_runs()[gave_up_in]["failed"] == 2
        assert dag_run("lead_events_drain", gave_up_in.split("/", 1)[1])["state"] == "failed"
        wait_for(lambda: finished("lead_events_drain", "give-up"), 120, "the triggered drain run")
        seen = len(api.requests())

        # Final for automatic runs: a later drain run finds nothing to send, even with the API healthy again.
        api.set_faults({"permanent_errors": {}})
        cli("dags", "trigger", "lead_events_drain", "-r", "after-give-up")
        wait_for(lambda: finished("lead_events_drain", "after-give-up"), 120, "the drain run after giving up")
        assert task_states("lead_events_drain", "after-give-up")["send_open_events"] == "skipped"
        assert len(api.requests()) == seen
        assert {e["status"] for e in events({"555", "556"}).values()} == {"failed"}

        # `airflow tasks clear` of the partition's run re-opens its failed event (only its own partition's).
        before = audit_runs()[part]["finished_at"]
        cli("tasks", "clear", "lead_events_sync", "-s", "2026-11-20", "-e", "2026-11-20", "-y")
        wait_for(lambda: (r := audit_runs()[part])["finished_at"] and r["finished_at"] > before
              and finished("lead_events_sync", part, clear_number=1), 240, "the cleared run of 2026-11-20")
        assert dag_run("lead_events_sync", part)["state"] == "success"
        ev = events({"555", "556"})
        assert ev["555"]["status"] == "delivered" and ev["556"]["status"] == "failed", ev
        assert lead_counts(api)[("555", "signup_started")] == 1

        # A manual rerun with conf partition_date re-opens the other day's failed event.
        rerun = "rerun-2026-11-19"
        cli("dags", "trigger", "lead_events_sync", "-r", rerun, "-c", json.dumps({"partition_date": "2026-11-19"}))
        wait_for(lambda: finished("lead_events_sync", rerun), 240, "the rerun of 2026-11-19")
        assert dag_run("lead_events_sync", rerun)["state"] == "success"
        assert events({"556"})["556"]["status"] == "delivered"

        counts = lead_counts(api)
        assert len(counts) == BACKLOG + 2 and set(counts.values()) == {1}
        # Each re-opened event: six 500s, then exactly one more request, which delivered it.
        for customer in ("555", "556"):
            answers = [r["status"] for r in api.requests() if r["body"]["customerExternalId"] == customer]
            assert answers == [500] * 6 + [200], (customer, answers)
        assert 429 not in {r["status"] for r in api.requests()}
        assert wh.status_counts() == {"delivered": BACKLOG + 2}
        # Every run that changed the audit updated the Asset, a failed one too; an idle drain run did not.
        with meta.connect() as conn:
            updated = set(conn.execute(text("SELECT source_dag_id, source_run_id FROM asset_event")).all())
        writers = {("lead_events_drain", r.split("/", 1)[1]) if r.startswith("lead_events_drain/")
                   else ("lead_events_sync", r) for r in audit_runs()}
        assert updated == writers, (updated, writers)
        assert ("lead_events_drain", "after-give-up") not in updated
        for run_id in drained:
            wait_for_downstream_of(run_id.split("/", 1)[1], 60, f"the downstream DAG to run after {run_id}")
        print(f"  part 3: gave up in {gave_up_in}; 555 re-opened by `tasks clear` of {part} and delivered by "
              f"{ev['555']['last_run_id']}; 556 by the rerun {rerun}; whole test {time.monotonic() - began:.0f}s")
    finally:
        stop(services)
        logs.close()
        meta.dispose()
