"""Sends what the nightly runs left open (time budget, rate limit, retries), every 5 minutes
(`drain_interval_minutes` in the sync configuration).

An idle run (nothing pending and due) is skipped at once and writes nothing; otherwise what
is open is split into mapped send batches. A run that
sends writes its row in lead_event_sync_runs under "lead_events_drain/<run id>", with the
events it touched, and updates the Asset `lead_event_deliveries`. One run at a time; the
rate limit and the claims are shared with every other sender.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronTriggerTimetable, Param, dag

from lead_sync.read.config import MAX_TIME_BUDGET_SECONDS, load_config
from lead_sync_airflow.assets import LEAD_EVENT_DELIVERIES
from lead_sync_airflow.operators import (
    LeadEventsSummaryOperator,
    PlanSendBatchesOperator,
    SendLeadEventsOperator,
    check_outcome,
)

config = load_config()


@dag(
    dag_id="lead_events_drain",
    schedule=CronTriggerTimetable(f"*/{config.drain_interval_minutes} * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "time_budget_seconds": Param(1200, type="integer", minimum=1, maximum=MAX_TIME_BUDGET_SECONDS,
                                     description="Sending stops after this long; the next run goes on."),
    },
    default_args={"retries": 0},
    tags=["cutmeshort", "leads"],
    doc_md=__doc__,
)
def lead_events_drain():
    plan = PlanSendBatchesOperator(task_id="plan_send_batches", only_when_open=True,
                                   time_budget_seconds="{{ params.time_budget_seconds }}", retries=2)
    # As in lead_events_sync: mapped batches, retried without resending what was delivered.
    send = SendLeadEventsOperator.partial(
        task_id="send_open_events", pool="cutmeshort_api", time_budget_seconds="{{ params.time_budget_seconds }}",
        retries=2, retry_delay=timedelta(seconds=30),
    ).expand_kwargs(plan.output)
    summary = LeadEventsSummaryOperator(task_id="audit_summary", whole_partition=False, trigger_rule="none_skipped",
                                        outlets=[LEAD_EVENT_DELIVERIES], retries=2)
    plan >> send >> summary >> check_outcome(summary.output)


lead_events_drain()
