"""The DAG file: imports cleanly, declares the contract's schedule, params and wiring."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from airflow.dag_processing.dagbag import DagBag

from support import ROOT


@pytest.fixture(scope="module")
def dag():
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert list(bag.dags) == ["lead_events_sync"]
    return bag.dags["lead_events_sync"]


def test_tasks_and_wiring(dag):
    assert [t.task_id for t in dag.topological_sort()] == ["extract_and_map", "send_lead_events", "audit_summary"]
    send = dag.get_task("send_lead_events")
    assert send.pool == "cutmeshort_api"
    assert dag.get_task("audit_summary").trigger_rule == "all_done"
    assert dag.max_active_runs == 1


def test_daily_data_interval_schedule(dag):
    day = datetime(2026, 11, 27, tzinfo=timezone.utc)
    interval = dag.timetable.infer_manual_data_interval(run_after=datetime(2026, 11, 28, tzinfo=timezone.utc))
    assert (interval.start, interval.end) == (day, datetime(2026, 11, 28, tzinfo=timezone.utc))
    nxt = dag.timetable.next_dagrun_info(last_automated_data_interval=interval, restriction=_no_restriction())
    assert nxt.data_interval.start == datetime(2026, 11, 28, tzinfo=timezone.utc)
    assert nxt.run_after == datetime(2026, 11, 29, tzinfo=timezone.utc)  # fires after the day has ended


def _no_restriction():
    from airflow.timetables.base import TimeRestriction

    return TimeRestriction(earliest=None, latest=None, catchup=True)


def test_params(dag):
    from airflow.sdk.exceptions import ParamValidationError

    assert dag.params["time_budget_seconds"] == 3300
    partition = dag.params.get_param("partition_date")
    assert partition.resolve(None) is None
    assert partition.resolve("2026-11-27") == "2026-11-27"
    with pytest.raises(ParamValidationError):
        partition.resolve("27/11/2026")
