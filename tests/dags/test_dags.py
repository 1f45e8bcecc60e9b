"""The DAG files: import cleanly, declare the contract's schedule, params and wiring."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pendulum
import pytest
from airflow.dag_processing.dagbag import DagBag

from lead_sync.read.config import MAX_TIME_BUDGET_SECONDS, load_config

from tests.support import ROOT


@pytest.fixture(scope="module")
def bag():
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert sorted(bag.dags) == ["lead_events_drain", "lead_events_sync"]
    return bag


@pytest.fixture(scope="module")
def dag(bag):
    return bag.dags["lead_events_sync"]


def scheduled(dag):
    """The DAG as the scheduler reads it (serialized): its timetable computes the runs."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


def test_tasks_and_wiring(dag):
    assert [t.task_id for t in dag.topological_sort()] == [
        "extract_and_map", "plan_send_batches", "send_lead_events", "audit_summary", "check_outcome"]
    send = dag.get_task("send_lead_events")
    assert send.pool == "cutmeshort_api"
    # Sending is spread over mapped tasks, one per batch the plan returns.
    assert send.is_mapped and send.upstream_task_ids == {"plan_send_batches"}
    summary = dag.get_task("audit_summary")
    assert summary.trigger_rule == "all_done"
    # The summary succeeds on a failed run too, so that the Asset is updated; check_outcome fails the run.
    assert [a.name for a in summary.outlets] == ["lead_event_deliveries"]
    assert dag.get_task("check_outcome").trigger_rule == "all_success"
    assert dag.max_active_runs == 1


@pytest.mark.parametrize("dag_id", ["lead_events_sync", "lead_events_drain"])
def test_every_step_safe_to_repeat_is_retried_and_the_verdict_is_not(bag, dag_id):
    # Reading, mapping, planning and the summary retry on transient errors; a send batch too (its
    # worker may die), as its claims keep a retry from resending what was delivered. check_outcome
    # only reads the summary's verdict: a retry would find the same, so its failure is final.
    dag = bag.dags[dag_id]
    for task in dag.tasks:
        if task.task_id == "check_outcome":
            assert task.retries == 0
        else:
            assert task.retries >= 2, task.task_id
            assert task.retry_delay > timedelta(0), task.task_id


@pytest.mark.parametrize("dag_id", ["lead_events_sync", "lead_events_drain"])
def test_each_dag_is_tagged_and_documented(bag, dag_id):
    dag = bag.dags[dag_id]
    assert "cutmeshort" in dag.tags
    assert dag.doc_md and dag.doc_md.strip()


def test_drain_sends_what_is_open_every_five_minutes(bag):
    drain = bag.dags["lead_events_drain"]
    assert [t.task_id for t in drain.topological_sort()] == [
        "plan_send_batches", "send_open_events", "audit_summary", "check_outcome"]
    assert drain.get_task("plan_send_batches").only_when_open
    send = drain.get_task("send_open_events")
    assert send.pool == "cutmeshort_api" and send.is_mapped
    summary = drain.get_task("audit_summary")
    assert summary.trigger_rule == "none_skipped" and not summary.whole_partition
    assert [a.name for a in summary.outlets] == ["lead_event_deliveries"]
    assert drain.max_active_runs == 1 and not drain.catchup
    after = pendulum.datetime(2026, 11, 28, 10, 2, tz="UTC")
    nxt = scheduled(drain).timetable.next_dagrun_info(last_automated_data_interval=None,
                                                      restriction=_no_restriction(after))
    assert nxt.run_after == datetime(2026, 11, 28, 10, 5, tzinfo=timezone.utc)


def test_daily_data_interval_schedule(dag):
    day = datetime(2026, 11, 27, tzinfo=timezone.utc)
    timetable = scheduled(dag).timetable
    interval = timetable.infer_manual_data_interval(run_after=datetime(2026, 11, 28, tzinfo=timezone.utc))
    assert (interval.start, interval.end) == (day, datetime(2026, 11, 28, tzinfo=timezone.utc))
    nxt = timetable.next_dagrun_info(last_automated_data_interval=interval, restriction=_no_restriction())
    assert nxt.data_interval.start == datetime(2026, 11, 28, tzinfo=timezone.utc)
    assert nxt.run_after == datetime(2026, 11, 29, tzinfo=timezone.utc)  # fires after the day has ended


def _no_restriction(earliest=None):
    from airflow.timetables.base import TimeRestriction

    return TimeRestriction(earliest=earliest, latest=None, catchup=True)


def test_params(dag):
    from airflow.sdk.exceptions import ParamValidationError

    documented = re.search(r"`time_budget_seconds` \(default (\d+)\)", (ROOT / "README.md").read_text())
    assert documented and dag.params["time_budget_seconds"] == int(documented.group(1)), "the README's default"
    partition = dag.params.get_param("partition_date")
    assert partition.resolve(None) is None
    assert partition.resolve("2026-11-27") == "2026-11-27"
    with pytest.raises(ParamValidationError):
        partition.resolve("27/11/2026")


@pytest.mark.parametrize("dag_id", ["lead_events_sync", "lead_events_drain"])
def test_time_budget_param_has_a_limit(bag, dag_id):
    from airflow.sdk.exceptions import ParamValidationError

    budget = bag.dags[dag_id].params.get_param("time_budget_seconds")
    assert 0 < budget.resolve() <= MAX_TIME_BUDGET_SECONDS
    assert budget.resolve(MAX_TIME_BUDGET_SECONDS) == MAX_TIME_BUDGET_SECONDS
    for absurd in (MAX_TIME_BUDGET_SECONDS + 1, 10**12, 0):
        with pytest.raises(ParamValidationError):
            budget.resolve(absurd)


def test_a_drain_run_sends_at_least_until_the_next_one_starts(bag):
    """The whole daily allowance (contract section 8): with a budget shorter than its interval, the
    drain would leave minutes of each interval unsent."""
    budget = bag.dags["lead_events_drain"].params.get_param("time_budget_seconds").resolve()
    assert budget >= load_config().drain_interval_minutes * 60
