"""Operators: read the run's context, call one stage of the core, hand back a small summary."""
from __future__ import annotations

from typing import Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from lead_sync import pipeline
from lead_sync.config import load_config
from lead_sync.delivery import CredentialsRefused
from lead_sync.partition import Partition, resolve_partition
from lead_sync.ratelimit import SharedRateLimiter

from lead_sync_airflow.hooks import CutMeShortHook, warehouse_engine


def partition_of(context: Any, zone) -> Partition:
    """conf/param `partition_date` first, else the run's data interval start."""
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    requested = conf.get("partition_date") or (context.get("params") or {}).get("partition_date")
    return resolve_partition(requested, context.get("data_interval_start"), zone)


class ExtractLeadEventsOperator(BaseOperator):
    """Reads the partition (and every partition with open events) and records the mapped lead events."""

    template_fields: Sequence[str] = ("warehouse_conn_id",)

    def __init__(self, *, warehouse_conn_id: str = "warehouse_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warehouse_conn_id = warehouse_conn_id

    def execute(self, context: Any) -> dict:
        config = load_config()
        partition = partition_of(context, config.zone)
        self.log.info("syncing partition %s (%s)", partition.day, config.partition_timezone)
        return pipeline.extract_and_map(warehouse_engine(self.warehouse_conn_id), config, partition, context["run_id"])


class SendLeadEventsOperator(BaseOperator):
    """Sends every open lead event within the rate limit and the run's time budget."""

    template_fields: Sequence[str] = ("warehouse_conn_id", "cutmeshort_conn_id", "time_budget_seconds")

    def __init__(self, *, warehouse_conn_id: str = "warehouse_default",
                 cutmeshort_conn_id: str = "cutmeshort_default",
                 time_budget_seconds: float | str = 3300, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warehouse_conn_id = warehouse_conn_id
        self.cutmeshort_conn_id = cutmeshort_conn_id
        self.time_budget_seconds = time_budget_seconds

    def execute(self, context: Any) -> dict:
        hook = CutMeShortHook(self.cutmeshort_conn_id)
        settings = hook.settings
        engine = warehouse_engine(self.warehouse_conn_id)
        limiter = SharedRateLimiter(engine, hook.rate_bucket(), settings.rate_limit_per_minute)
        with hook.get_conn() as client:
            try:
                report = pipeline.send_open_events(
                    engine, client, limiter, settings.retry_policy, context["run_id"],
                    float(self.time_budget_seconds), self.cutmeshort_conn_id,
                )
            except CredentialsRefused as exc:
                raise AirflowFailException(str(exc)) from None
        self.log.info("sent %d request(s): %d delivered, %d rejected, %d failed%s", report.requests,
                      report.delivered, report.rejected, report.failed,
                      "; time budget used up, the rest stays pending" if report.budget_exhausted else "")
        if report.failed:
            raise AirflowException(f"{report.failed} event(s) failed after all attempts; the next run retries them")
        return {"requests": report.requests, "delivered": report.delivered, "rejected": report.rejected,
                "failed": report.failed, "budget_exhausted": report.budget_exhausted,
                "recovered_unknown": report.recovered_unknown}


class LeadEventsSummaryOperator(BaseOperator):
    """Writes the run's row in lead_event_sync_runs, logs counts per status, fails a failed run."""

    template_fields: Sequence[str] = ("warehouse_conn_id",)

    def __init__(self, *, warehouse_conn_id: str = "warehouse_default", **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.warehouse_conn_id = warehouse_conn_id

    def execute(self, context: Any) -> dict:
        config = load_config()
        summary = pipeline.summarise(warehouse_engine(self.warehouse_conn_id), context["run_id"],
                                     partition_of(context, config.zone))
        self.log.info("\n%s", summary.table())
        if summary.outcome != "success":
            raise AirflowFailException(summary.message or "the run failed")
        return {"outcome": summary.outcome, **summary.counts, "requests": summary.requests_sent}
