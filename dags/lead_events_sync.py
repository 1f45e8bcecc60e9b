"""Nightly lead-event sync: warehouse signups and verifications to CutMeShort, with an audit.

One run per day of the partition time zone (UTC by default): the run whose data interval
is [D, D+1) syncs day D, re-reads the `lookback_days` days before it for rows loaded late,
and sends what is open within its time budget; `lead_events_drain` sends whatever it leaves.
Conf {"partition_date": "YYYY-MM-DD"} names a day explicitly; a run of day D also re-opens
D's `failed` events: that is how a failed partition is rerun.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, Param, dag

from lead_sync.read.config import MAX_TIME_BUDGET_SECONDS, load_config
from lead_sync_airflow.assets import LEAD_EVENT_DELIVERIES
from lead_sync_airflow.operators import (
    ExtractLeadEventsOperator,
    LeadEventsSummaryOperator,
    PlanSendBatchesOperator,
    SendLeadEventsOperator,
    check_outcome,
)

config = load_config()
# Reading, mapping and the summary are safe to repeat: a transient warehouse error is retried.
REPEATABLE = dict(retries=2, retry_delay=timedelta(seconds=30))
# A send batch too: its claims make a retry (say, after its worker died) send nothing already
# delivered, and a request that died on the wire is audited `unknown` and sent again.
SEND_RETRIES = dict(retries=2, retry_delay=timedelta(seconds=30))


@dag(
    dag_id="lead_events_sync",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone=config.partition_timezone),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "partition_date": Param(None, type=["null", "string"], pattern=r"^\d{4}-\d{2}-\d{2}$",
                                description="Day to sync (YYYY-MM-DD); empty = the run's data interval."),
        "time_budget_seconds": Param(3300, type="integer", minimum=1, maximum=MAX_TIME_BUDGET_SECONDS,
                                     description="Sending stops after this long; lead_events_drain sends the rest."),
        "dry_run": Param(False, type="boolean",
                         description="Read and map as a real run; send nothing, change no event; "
                                     "record what would be sent (lead_event_dry_run_events)."),
    },
    default_args={"retries": 0},
    tags=["cutmeshort", "leads"],
    doc_md=__doc__,
)
def lead_events_sync():
    extract = ExtractLeadEventsOperator(task_id="extract_and_map", **REPEATABLE)
    plan = PlanSendBatchesOperator(task_id="plan_send_batches", time_budget_seconds="{{ params.time_budget_seconds }}",
                                   **REPEATABLE)
    # One mapped task per batch; any number run at once, on any worker, under the one rate limit.
    send = SendLeadEventsOperator.partial(
        task_id="send_lead_events", pool="cutmeshort_api", time_budget_seconds="{{ params.time_budget_seconds }}",
        **SEND_RETRIES,
    ).expand_kwargs(plan.output)
    summary = LeadEventsSummaryOperator(task_id="audit_summary", outlets=[LEAD_EVENT_DELIVERIES], **REPEATABLE)
    extract >> plan >> send >> summary >> check_outcome(summary.output)


lead_events_sync()
