"""The operators' own checks (plugins/lead_sync_airflow/operators.py): what they refuse, before any work."""
from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException
from sqlalchemy import inspect

from lead_sync_airflow.operators import PlanSendBatchesOperator, SendLeadEventsOperator
from tests.support import cutmeshort_conn

ABSURD_BUDGETS = ["86401", 86_401, "1e12", 1e12, "inf", float("inf"), float("nan"), "0", -5, "soon"]


@pytest.fixture
def connections(monkeypatch, sqlite_warehouse, sandbox):
    """warehouse_default and cutmeshort_default: an empty SQLite warehouse and the API sandbox."""
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", sqlite_warehouse.airflow_conn)
    monkeypatch.setenv("AIRFLOW_CONN_CUTMESHORT_DEFAULT", cutmeshort_conn(sandbox.url))
    return sqlite_warehouse, sandbox


def _refused(info: pytest.ExceptionInfo) -> None:
    message = str(info.value)
    assert "time_budget_seconds" in message and "86400" in message, message


@pytest.mark.parametrize("budget", ABSURD_BUDGETS)
def test_plan_refuses_an_absurd_time_budget_before_reading_anything(connections, budget):
    warehouse, _ = connections
    # A dry run plans nothing, yet its budget is read and refused all the same.
    with pytest.raises(AirflowFailException) as info:
        PlanSendBatchesOperator(task_id="plan", time_budget_seconds=budget).execute({"params": {"dry_run": True}})
    _refused(info)
    # The drain's plan: refused before it looks for open events (which would create the audit).
    with pytest.raises(AirflowFailException) as info:
        PlanSendBatchesOperator(task_id="plan", time_budget_seconds=budget, only_when_open=True).execute({})
    _refused(info)
    assert inspect(warehouse.engine).get_table_names() == []


@pytest.mark.parametrize("budget", ABSURD_BUDGETS)
def test_send_refuses_an_absurd_time_budget(connections, budget):
    warehouse, sandbox = connections
    send = SendLeadEventsOperator(task_id="send", time_budget_seconds=budget, run_label="manual__budget")
    send.render_template_fields({})  # as the task runner does first: no error of its own for the budget
    with pytest.raises(AirflowFailException) as info:
        send.execute({})
    _refused(info)
    assert sandbox.requests() == [] and inspect(warehouse.engine).get_table_names() == []


def test_a_send_task_cannot_outlive_its_budget_plus_one_request(monkeypatch, sandbox):
    # Before: send tasks had no execution_timeout, and a slow answer could hold a worker for ever.
    from datetime import timedelta

    from lead_sync_airflow.operators import SEND_GRACE_SECONDS

    monkeypatch.setenv("AIRFLOW_CONN_CUTMESHORT_DEFAULT", cutmeshort_conn(sandbox.url, timeout_seconds=7))
    send = SendLeadEventsOperator(task_id="send", time_budget_seconds="{{ params.budget }}", run_label="manual__1")
    send.render_template_fields({"params": {"budget": 600}})
    assert send.execution_timeout == timedelta(seconds=600 + 7 + SEND_GRACE_SECONDS)


def test_each_task_creates_the_audit_it_needs_before_its_stage(connections):
    # The stages assume the schema is there: each task ensures it first. A send task that runs on
    # a warehouse nothing has written yet (its limiter's bucket lives in the audit tables) finds
    # nothing to send and leaves the audit ready; so does the drain's plan, skipped for want of work.
    from airflow.sdk.exceptions import AirflowSkipException

    warehouse, sandbox = connections
    send = SendLeadEventsOperator(task_id="send", time_budget_seconds=30, run_label="manual__empty")
    send.render_template_fields({})
    assert send.execute({})["requests"] == 0
    assert {"lead_event_deliveries", "lead_event_rate_buckets", "lead_event_sync_runs"} <= set(
        inspect(warehouse.engine).get_table_names())
    assert sandbox.requests() == []
    with pytest.raises(AirflowSkipException):
        PlanSendBatchesOperator(task_id="plan", time_budget_seconds=30, only_when_open=True).execute({})


def test_check_outcome_fails_a_failed_run_and_an_unsent_alert_with_their_reasons():
    from lead_sync_airflow.operators import check_outcome

    verdict = check_outcome.function  # the task's own code, as the task runner calls it
    assert verdict({"outcome": "success", "message": None, "alert_error": None}) is None
    with pytest.raises(AirflowFailException, match="1 event\\(s\\) gave up"):
        verdict({"outcome": "failed", "message": "1 event(s) gave up", "alert_error": None})
    with pytest.raises(AirflowFailException, match="an alert could not be sent: smtp down.*the next run sends"):
        verdict({"outcome": "success", "alert_error": "an alert could not be sent: smtp down"})
    with pytest.raises(AirflowFailException, match="see audit_summary"):
        verdict(None)  # the summary handed back nothing
