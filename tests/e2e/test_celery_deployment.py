"""Under a real CeleryExecutor deployment (PostgreSQL metadata, Redis broker, two workers as processes).

1. `lead_events_sync` runs unchanged: its mapped send batches run on both workers under the one
   rate limit. One worker is killed (SIGKILL, with its children) while a batch of it is sending:
   the scheduler finds the task without a heartbeat, retries it on the other worker, and the run
   ends success with every event delivered, each sent once, except the events whose requests died
   with the worker (audited `unknown`, sent once more and answered 409 or 200).
2. A worker whose broker cannot be reached says which broker, and stops.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, select, text

from tests.support.dagrun import airflow_cli_env
from lead_sync.db.schema import ensure_schema, send_batches
from tests.support.processes import (
    celery_deployment, free_port, kill_tree, start_airflow_services, start_celery_worker, stop, stop_trees, wait_for,
)
from tests.support import ROOT, write_sources
from tests.support.seeding import seed_backlog

DAY = "2026-11-20"
RUN_ID = "celery-2026-11-20"
BACKLOG = 300
BATCH_SIZE = 60  # 5 batches of 60
RATE = 240  # the API's per-minute limit, and the connection's: below what one worker alone would send
LATENCY_MS = 100  # a batch sends for several seconds
FIRST_ID = 300_000
EXTRA = dict(rate_limit_per_minute=RATE, timeout_seconds=5, max_attempts=3, backoff_base_seconds=0.05,
             backoff_max_seconds=0.3)
BROKER_DB = 7  # a Redis database of this test's own: flushed before use
WORKERS = ("worker-a", "worker-b")
DONE = ("success", "failed")


def _broker() -> redis.Redis:
    client = redis.Redis(host="127.0.0.1", port=6379, db=BROKER_DB)
    client.flushdb()
    return client


def test_two_celery_workers_one_killed_mid_batch(tmp_path, pg_warehouse, sandbox, metadata_db):
    began = time.monotonic()
    wh = pg_warehouse
    seed_backlog(wh, DAY, BACKLOG, FIRST_ID)
    ensure_schema(wh.engine)  # so that the test can watch the batches from the start
    sandbox.set_faults({"rate_limit_per_minute": RATE, "latency_ms": LATENCY_MS})
    broker = _broker()

    port = free_port()
    env = airflow_cli_env(tmp_path / "airflow", wh, sandbox.url, **EXTRA)
    env.update({
        **celery_deployment(port, metadata_db, f"redis://127.0.0.1:6379/{BROKER_DB}"),
        "LEAD_SYNC_SOURCES": str(write_sources(tmp_path, send_batch_size=BATCH_SIZE, max_send_batches=8)),
        # Only the run this test triggers: no scheduled run, and no unpausing step.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # A killed worker's task is found without a heartbeat after 20 s (default 300 s).
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    })
    meta = create_engine(metadata_db, pool_pre_ping=True)

    def cli(*args: str) -> subprocess.Popen:
        return subprocess.Popen(["airflow", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd="/")

    def ok(proc: subprocess.Popen) -> str:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{' '.join(proc.args)}:\n{out[-3000:]}"
        return out

    def run_state() -> str | None:
        with meta.connect() as conn:
            return conn.execute(text("SELECT state FROM dag_run WHERE dag_id = 'lead_events_sync' AND run_id = :r"),
                                {"r": RUN_ID}).scalar()

    def send_tries() -> list[dict]:
        """Every try of every send batch: the task instances and their earlier tries."""
        query = ("SELECT map_index, try_number, hostname, state FROM {} WHERE dag_id = 'lead_events_sync' "
                 "AND run_id = :r AND task_id = 'send_lead_events'")
        with meta.connect() as conn:
            return [dict(r) for table in ("task_instance", "task_instance_history")
                    for r in conn.execute(text(query.format(table)), {"r": RUN_ID}).mappings()]

    def batch_rows() -> list[dict]:
        with wh.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(send_batches).where(send_batches.c.run_id == RUN_ID)
                                                  .order_by(send_batches.c.batch)).mappings()]

    ok(cli("db", "migrate"))
    logs = open(tmp_path / "services.log", "wb")
    services = start_airflow_services(env, port, logs)
    worker_logs = {name: open(tmp_path / f"{name}.log", "wb") for name in WORKERS}
    workers = {name: start_celery_worker(env, name, worker_logs[name]) for name in WORKERS}
    try:
        ok(cli("pools", "import", str(ROOT / "config" / "airflow_pools.json")))  # cutmeshort_api: 2 slots

        def parsed():
            with meta.connect() as conn:
                errors = conn.execute(text("SELECT filename, stacktrace FROM import_error")).all()
                assert not errors, errors
                return conn.execute(text("SELECT NOT is_paused FROM dag WHERE dag_id = 'lead_events_sync'")).scalar()
        wait_for(parsed, 120, "lead_events_sync to be parsed")
        ok(cli("dags", "trigger", "lead_events_sync", "-r", RUN_ID, "-c", json.dumps({"partition_date": DAY})))
        started = time.monotonic()

        # A batch sending on a worker: its row is open, with that worker's name, and requests arrive.
        def sending() -> dict | None:
            assert run_state() not in DONE, "the run ended before a batch could be caught sending"
            rows = [r for r in batch_rows() if r["finished_at"] is None and r["host"] in WORKERS]
            return rows[0] if rows and len(sandbox.requests()) >= 20 else None
        caught = wait_for(sending, 150, "a send batch sending on a worker", every=0.2)
        victim, survivor = caught["host"], next(w for w in WORKERS if w != caught["host"])
        kill_tree(workers[victim])  # the worker, its pool child, the task's supervisor and the task itself
        killed_after = time.monotonic() - started
        sent_at_kill = len(sandbox.requests())

        state = wait_for(lambda: (s := run_state()) in DONE and s, 180, "the run to end", every=1)
        wall = time.monotonic() - started

        # ---- Airflow: the killed batch's try on the victim, its retry on the survivor; the run succeeded.
        tries = send_tries()
        by_batch = defaultdict(list)
        for t in sorted(tries, key=lambda t: (t["map_index"], t["try_number"])):
            by_batch[t["map_index"]].append((t["try_number"], t["hostname"], t["state"]))
        killed = by_batch[caught["batch"]]
        assert killed[0][1] == victim and killed[-1][1:] == (survivor, "success"), by_batch
        assert all(t[-1][2] == "success" for t in by_batch.values()), by_batch
        assert {t["hostname"] for t in tries} == set(WORKERS), by_batch
        assert state == "success", (state, by_batch)

        # ---- the audit: every batch planned finished; the run's row says success.
        run = next(r for r in wh.runs() if r["run_id"] == RUN_ID)
        rows = batch_rows()
        assert run["outcome"] == "success" and run["send_batches"] == len(rows) == len(by_batch) >= 4, (run, rows)
        assert all(r["finished_at"] and r["result"] == "complete" for r in rows), rows
        assert rows[caught["batch"]]["host"] == survivor, rows  # the retry's row replaced the killed try's

        # ---- the API: every event delivered, each sent once but for those audited `unknown`; never over the limit.
        assert wh.status_counts() == {"delivered": BACKLOG}
        outcomes = Counter(a["outcome"] for a in wh.attempts())
        unknown_keys = {a["event_key"] for a in wh.attempts() if a["outcome"] == "unknown"}
        unknown = {k[0] for k, d in wh.deliveries().items() if d["event_key"] in unknown_keys}
        assert set(outcomes) <= {"delivered", "unknown"}, outcomes
        answers = defaultdict(list)
        for r in sandbox.requests():
            answers[r["body"]["customerExternalId"]].append(r["status"])
        assert len(answers) == BACKLOG
        for customer, got in answers.items():
            if customer in unknown:
                assert len(got) <= 2 and got[-1] in (200, 409), (customer, got)
            else:
                assert got == [200], (customer, got)
        assert Counter(l["customerExternalId"] for l in sandbox.leads()) == Counter({c: 1 for c in answers})
        # The run's row counts the requests whose outcome is known: one per event, which delivered it.
        assert run["requests_sent"] == outcomes["delivered"] == BACKLOG, (run, outcomes)
        busiest = sandbox.stats()["max_requests_in_any_60s"]
        assert busiest <= RATE, busiest

        per_worker = Counter(t[-1][1] for t in by_batch.values())
        twice = Counter(",".join(map(str, answers[c])) for c in unknown)
        print(f"\ncelery deployment: {BACKLOG} events in {len(rows)} batches; batches per worker "
              f"{dict(sorted(per_worker.items()))}, plus the try killed on {victim} (batch {caught['batch']}, "
              f"{killed_after:.0f}s after the trigger, {sent_at_kill} requests in; recorded {killed[0][2]}, "
              f"{len(killed)} tries); unknown outcomes {len(unknown)} (answers {dict(twice)}), requests "
              f"{len(sandbox.requests())} (batch rows count {sum(r['requests'] for r in rows)}); busiest 60 s: "
              f"{busiest} (limit {RATE}); run {state} in {wall:.0f}s; whole test {time.monotonic() - began:.0f}s")
    finally:
        stop_trees([*workers.values(), *services])
        for log in (logs, *worker_logs.values()):
            log.close()
        meta.dispose()
        broker.flushdb()
        broker.close()


@pytest.mark.airflow  # an Airflow process, though no database
def test_worker_names_the_broker_it_cannot_reach(tmp_path):
    closed = free_port()  # nothing listens there
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
           "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{closed}/0"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = start_celery_worker(env, "no-broker", log)
        try:
            code = worker.wait(timeout=60)
        finally:
            stop([worker])
    out = log_path.read_text(errors="replace")
    assert code != 0, out[-3000:]
    assert f"127.0.0.1:{closed}" in out and "Connection refused" in out, out[-3000:]
