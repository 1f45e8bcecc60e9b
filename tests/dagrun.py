"""Running lead_events_sync through Airflow itself (dag.test, in this process)."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from support import ROOT, TOKEN, Warehouse, cutmeshort_conn


@lru_cache(maxsize=None)
def _dag(sources: str | None):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["lead_events_sync"]


def run_dag(warehouse: Warehouse, api_url: str, *, logical_date: str | None = "2026-11-28",
            conf: dict | None = None, token: str = TOKEN, sources: Path | None = None, **extra) -> str:
    """One DAG run; returns its final state ("success" or "failed")."""
    os.environ["AIRFLOW_CONN_WAREHOUSE_DEFAULT"] = warehouse.airflow_conn
    os.environ["AIRFLOW_CONN_CUTMESHORT_DEFAULT"] = cutmeshort_conn(api_url, token, **extra)
    if sources:
        os.environ["LEAD_SYNC_SOURCES"] = str(sources)
    else:
        os.environ.pop("LEAD_SYNC_SOURCES", None)
    dag = _dag(str(sources) if sources else None)
    moment = datetime.fromisoformat(logical_date).replace(tzinfo=timezone.utc) if logical_date else None
    run = dag.test(logical_date=moment, run_conf=conf)
    state = run.state
    return state.value if hasattr(state, "value") else str(state)
