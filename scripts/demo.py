"""`make demo`: run lead_events_sync once through Airflow on an embedded warehouse and the sandbox.

Everything lives under .demo/ (Airflow home, SQLite warehouse); a second run finds the
audit of the first and sends nothing new.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, func, select

from cutmeshort_sandbox.process import SandboxProcess
from lead_sync.db.schema import attempts, deliveries, sync_runs
from lead_sync.events import STATUSES
from lead_sync.audit.report import load_report, render_html

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
WAREHOUSE = WORK / "warehouse.db"
RUN_LOG = WORK / "airflow-run.log"
REPORT = WORK / "report.html"
LOGICAL_DATE = "2026-11-28"  # a manual run's inferred interval is the day before: partition 2026-11-27
TOKEN = "demo-token"


def seed_warehouse() -> None:
    if WAREHOUSE.exists():
        return
    with sqlite3.connect(WAREHOUSE) as conn:
        conn.executescript((ROOT / "include" / "demo" / "warehouse.sql").read_text())
    print(f"seeded demo warehouse {WAREHOUSE.relative_to(ROOT)}")


def airflow_env(sandbox_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(WORK / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_WAREHOUSE_DEFAULT": f"sqlite:///{WAREHOUSE}",
        "AIRFLOW_CONN_CUTMESHORT_DEFAULT": (
            '{"conn_type": "http", "host": "%s", "password": "%s"}' % (sandbox_url, TOKEN)
        ),
        "LEAD_SYNC_SOURCES": str(ROOT / "include" / "sources" / "demo_lead_sources.yaml"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def airflow(env: dict[str, str], *args: str, log: Path | None = None) -> int:
    """An Airflow command; its own output goes to `log` (or nowhere), so that our summary stands alone."""
    with open(log or os.devnull, "w", encoding="utf-8") as out:
        return subprocess.run(["airflow", *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode


def write_report() -> Path:
    engine = create_engine(f"sqlite:///{WAREHOUSE}")
    try:
        REPORT.write_text(render_html(load_report(engine)), encoding="utf-8")
    finally:
        engine.dispose()
    return REPORT


def print_summary(sent: int, elapsed: float) -> None:
    engine = create_engine(f"sqlite:///{WAREHOUSE}")
    with engine.connect() as conn:
        run = conn.execute(select(sync_runs).order_by(sync_runs.c.finished_at.desc()).limit(1)).mappings().first()
        by_status = dict(conn.execute(select(deliveries.c.status, func.count()).group_by(deliveries.c.status)).all())
        reasons = conn.execute(
            select(deliveries.c.status, deliveries.c.reason, func.count())
            .where(deliveries.c.reason.is_not(None)).group_by(deliveries.c.status, deliveries.c.reason)
        ).all()
        total_attempts = conn.execute(select(func.count()).select_from(attempts)).scalar_one()
        first, last = conn.execute(
            select(func.min(attempts.c.sent_at), func.max(attempts.c.sent_at)).where(attempts.c.run_id == run["run_id"])
        ).one() if run else (None, None)
        left_out = conn.execute(select(func.count()).where(deliveries.c.notes.is_not(None))).scalar_one()
    print("\n=== lead_events_sync demo ===")
    if run:
        print(f"run {run['run_id']}  partition {run['partition_date']}  outcome {run['outcome']}")
        print("this run (its partition and the events it touched):")
        for status in STATUSES:
            print(f"  {status:<10} {run[status] or 0:>5}")
    print("whole audit (lead_event_deliveries):")
    for status in STATUSES:
        print(f"  {status:<10} {by_status.get(status, 0):>5}")
    if reasons:
        print("reasons:")
        for status, reason, n in reasons:
            print(f"  {status:<9} x{n:<3} {reason}")
    if left_out:
        print(f"events sent with an optional field left out (see notes): {left_out}")
    print(f"requests the API received this demo: {sent}  (all attempts on record: {total_attempts})")
    rate = sent / elapsed if elapsed > 0 else 0.0
    print(f"DAG run wall time {elapsed:.1f}s including Airflow start-up: {rate:.2f} events/s")
    if sent and first and last and last > first:
        span = (last - first).total_seconds()
        print(f"sending phase: {sent} requests in {span:.2f}s: {sent / span:.1f} events/s "
              "(the API's limit, 60/min, only binds past 60 events)")


def main() -> int:
    WORK.mkdir(exist_ok=True)
    seed_warehouse()
    with SandboxProcess(token=TOKEN, log_path=WORK / "sandbox.log") as sandbox:
        env = airflow_env(sandbox.url)
        marker = WORK / "airflow" / ".migrated"
        if not marker.exists():
            print("preparing the Airflow metadata database (first run only)...")
            if airflow(env, "db", "migrate", log=WORK / "airflow-migrate.log") != 0:
                print(f"airflow db migrate failed: see {(WORK / 'airflow-migrate.log').relative_to(ROOT)}")
                return 1
            marker.touch()
        print(f"running lead_events_sync through Airflow (airflow dags test lead_events_sync {LOGICAL_DATE}) ...")
        started = time.monotonic()
        code = airflow(env, "dags", "test", "lead_events_sync", LOGICAL_DATE, log=RUN_LOG)
        elapsed = time.monotonic() - started
        sent = sandbox.stats()["requests"]
    print_summary(sent, elapsed)
    print(f"\nAirflow's own task log: {RUN_LOG.relative_to(ROOT)}")
    print(f"delivery report: {write_report().relative_to(ROOT)} (open it in a browser; `make report` rewrites it)")
    if code != 0:
        print(f"the DAG run failed (exit {code}): see {RUN_LOG.relative_to(ROOT)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
