"""Running lead_events_sync through Airflow itself (dag.test, in this process)."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from tests.support import ROOT, TOKEN, Warehouse, cutmeshort_conn


def _dag():
    """Parsed afresh for every run: dag.test() keeps a run's conf in the DAG's params."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["lead_events_sync"]


def run_through_airflow(warehouse: Warehouse, api_url: str, *, logical_date: str | None = "2026-11-28",
             conf: dict | None = None, token: str = TOKEN, sources: Path | None = None, adjust=None, **extra):
    """One DAG run through dag.test(); returns Airflow's DagRun. `adjust(dag)` may change the parsed DAG first."""
    os.environ["AIRFLOW_CONN_WAREHOUSE_DEFAULT"] = warehouse.airflow_conn
    os.environ["AIRFLOW_CONN_CUTMESHORT_DEFAULT"] = cutmeshort_conn(api_url, token, **extra)
    if sources:
        os.environ["LEAD_SYNC_SOURCES"] = str(sources)
    else:
        os.environ.pop("LEAD_SYNC_SOURCES", None)
    dag = _dag()
    if adjust:
        adjust(dag)
    moment = datetime.fromisoformat(logical_date).replace(tzinfo=timezone.utc) if logical_date else None
    return dag.test(logical_date=moment, run_conf=conf)


def run_dag(warehouse: Warehouse, api_url: str, **kwargs) -> str:
    """One DAG run (see run_through_airflow); returns its final state ("success" or "failed")."""
    state = run_through_airflow(warehouse, api_url, **kwargs).state
    return state.value if hasattr(state, "value") else str(state)


def airflow_cli_env(home: Path, warehouse: Warehouse, api_url: str, token: str = TOKEN, **extra) -> dict[str, str]:
    """Exactly the environment contract section 2 names: no PYTHONPATH, pools or variables."""
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_WAREHOUSE_DEFAULT": warehouse.airflow_conn,
        "AIRFLOW_CONN_CUTMESHORT_DEFAULT": cutmeshort_conn(api_url, token, **extra),
    }


def airflow_cli(home: Path, warehouse: Warehouse, api_url: str, *args: str, token: str = TOKEN,
                **extra) -> subprocess.CompletedProcess:
    """`airflow dags test lead_events_sync ARGS` in a child process."""
    return subprocess.run(["airflow", "dags", "test", "lead_events_sync", *args],
                          env=airflow_cli_env(home, warehouse, api_url, token, **extra), cwd="/",
                          capture_output=True, text=True, timeout=300)
