"""Operators (and the check_outcome task): read the run's context, call one stage of the core,
hand back a small summary."""
from __future__ import annotations

from datetime import date, timedelta
from typing import Any, Sequence

from airflow.sdk import BaseOperator, Context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from lead_sync.delivery import claims
from lead_sync import stages
from lead_sync.audit import runs
from lead_sync.clock import utcnow
from lead_sync.read.config import ConfigError, check_time_budget, load_config
from lead_sync.delivery.policy import CredentialsRefused
from lead_sync.mapping.rules import SourceShapeError
from lead_sync.read.partition import Partition, resolve_partition

from lead_sync.db.stores import StateStoreError, Stores, ensure_stores

from lead_sync_airflow.hooks import CutMeShortHook, stores
from lead_sync_airflow.notify import raise_alerts

# The audit's run id: the DAG run's id. Every DAG but the nightly sync prefixes it with its
# DAG id, as two DAGs' scheduled runs can share an id.
# A send task's execution_timeout: its time budget, one request's timeout, and this for writing
# the last answers and the batch's audit.
SEND_GRACE_SECONDS = 120

RUN_LABEL = "{{ run_id if dag.dag_id == 'lead_events_sync' else dag.dag_id ~ '/' ~ run_id }}"


def _conf(context: Context, key: str) -> Any:
    """A run's conf value, else its param of that name."""
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    return conf.get(key) if conf.get(key) is not None else (context.get("params") or {}).get(key)


def dry_run_of(context: Context) -> bool:
    """conf {"dry_run": true}: read and map as a real run, send nothing, change no event."""
    value = _conf(context, "dry_run")
    if value not in (None, True, False):
        raise AirflowFailException(f'dry_run must be true or false, got {value!r}')
    return bool(value)


def partition_of(context: Context, zone) -> Partition:
    """conf/param `partition_date` first, else the run's data interval start. A bad date is the
    user's to fix: the task fails at once, without retries."""
    try:
        return resolve_partition(_conf(context, "partition_date"), context.get("data_interval_start"), zone)
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from None


def _time_budget(value: Any) -> float:
    """The run's time budget in seconds; an absurd one fails the task at once (no retry)."""
    try:
        return check_time_budget(value)
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from None


class ExtractLeadEventsOperator(BaseOperator):
    """Reads the partition, its look-back days and every partition with pending events; records the mapped events.

    Safe to repeat: Airflow's task retries cover transient warehouse errors; a bad
    configuration or source query fails at once instead.
    """

    template_fields: Sequence[str] = ("warehouse_conn_id", "run_label")

    def __init__(self, *, warehouse_conn_id: str = "warehouse_default", run_label: str = RUN_LABEL,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warehouse_conn_id = warehouse_conn_id
        self.run_label = run_label

    def execute(self, context: Context) -> dict:
        try:
            config = load_config()
            partition = partition_of(context, config.zone)
        except (ConfigError, ValueError) as exc:
            raise AirflowFailException(str(exc)) from None
        dry_run = dry_run_of(context)
        self.log.info("%ssyncing partition %s (%s), look-back %d day(s)", "DRY RUN: " if dry_run else "",
                      partition.day, config.partition_timezone, config.lookback_days)
        both = _stores(self.warehouse_conn_id)
        try:
            return stages.extract_and_map(both, config, partition, self.run_label, self.dag_id, dry_run)
        except (ConfigError, SourceShapeError, StateStoreError) as exc:
            raise AirflowFailException(str(exc)) from None


class PlanSendBatchesOperator(BaseOperator):
    """Splits what is open into batches for the mapped send tasks; returns their arguments.

    With `only_when_open`, a run that finds nothing to send is skipped (the drain's idle runs).
    A dry run plans no batch.
    """

    template_fields: Sequence[str] = ("warehouse_conn_id", "time_budget_seconds", "run_label")

    def __init__(self, *, warehouse_conn_id: str = "warehouse_default", time_budget_seconds: float | str = 3300,
                 run_label: str = RUN_LABEL, only_when_open: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warehouse_conn_id = warehouse_conn_id
        self.time_budget_seconds = time_budget_seconds
        self.run_label = run_label
        self.only_when_open = only_when_open

    def execute(self, context: Context) -> list[dict]:
        budget = _time_budget(self.time_budget_seconds)
        if not self.only_when_open and dry_run_of(context):
            self.log.info("dry run: nothing is sent")
            return []
        try:
            config = load_config()
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from None
        both = _stores(self.warehouse_conn_id)
        if self.only_when_open:
            if not claims.has_sendable(both.state):
                raise AirflowSkipException("nothing is open: no event to send")
            runs.start_run(both.state, self.run_label, _today(), self.dag_id)
        batches = stages.plan_send(both, self.run_label, budget, config.send_batch_size, config.max_send_batches)
        return [{"batch": b.batch, "max_events": b.max_events} for b in batches]


class SendLeadEventsOperator(BaseOperator):
    """Sends open lead events within the shared rate limit and the run's time budget: one batch
    (a mapped task's share of them), or everything open when no batch is given."""

    template_fields: Sequence[str] = ("warehouse_conn_id", "cutmeshort_conn_id", "time_budget_seconds", "run_label")

    def __init__(self, *, warehouse_conn_id: str = "warehouse_default",
                 cutmeshort_conn_id: str = "cutmeshort_default",
                 time_budget_seconds: float | str = 3300, run_label: str = RUN_LABEL,
                 batch: int | None = None, max_events: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warehouse_conn_id = warehouse_conn_id
        self.cutmeshort_conn_id = cutmeshort_conn_id
        self.time_budget_seconds = time_budget_seconds
        self.run_label = run_label
        self.batch = batch
        self.max_events = max_events

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        # Nothing holds a worker beyond the time budget plus one request (and the last answers'
        # commit): the sender stops taking work at the budget, and a request ends at its deadline.
        if self.execution_timeout is None:
            try:
                budget = check_time_budget(self.time_budget_seconds)
                timeout = CutMeShortHook(self.cutmeshort_conn_id).settings.timeout_seconds
            except (TypeError, ValueError):
                return  # execute refuses it, with the reason
            self.execution_timeout = timedelta(seconds=budget + timeout + SEND_GRACE_SECONDS)

    def execute(self, context: Context) -> dict:
        hook = CutMeShortHook(self.cutmeshort_conn_id)
        try:
            api, client = hook.target(), hook.get_conn()
        except ValueError as exc:  # the connection's settings: for the user to fix, not to retry
            raise AirflowFailException(str(exc)) from None
        budget = _time_budget(self.time_budget_seconds)
        both = _stores(self.warehouse_conn_id)
        batch = None if self.batch is None else stages.Batch(int(self.batch), int(self.max_events or 0) or 10**9)
        ti = context.get("ti")
        try:
            report = stages.send(both, api, self.run_label, budget, batch, host=getattr(ti, "hostname", None),
                                 client=client)
        except CredentialsRefused as exc:
            raise AirflowFailException(str(exc)) from None
        self.log.info("%ssent %d request(s): %d delivered, %d rejected, %d gave up, %d left for a later run%s",
                      "" if batch is None else f"batch {batch.batch}: ", report.requests, report.delivered,
                      report.rejected, report.failed, report.left_open,
                      "; time budget used up, the rest stays pending" if report.budget_exhausted else "")
        if report.failed:
            # Final for this run: a retry of the task would have nothing to do.
            raise AirflowFailException(f"{report.failed} event(s) gave up after give_up_after_hours of retries "
                                       "(status failed); a run of their partition re-opens them")
        return {"requests": report.requests, "delivered": report.delivered, "rejected": report.rejected,
                "failed": report.failed, "left_open": report.left_open,
                "budget_exhausted": report.budget_exhausted, "recovered_unknown": report.recovered_unknown}


def _stores(warehouse_conn_id: str) -> Stores:
    """The warehouse and the state store (connection lead_sync_state, when it exists), with every
    table and view there: each task creates what is missing here, once, before its stage."""
    try:
        both = stores(warehouse_conn_id)
    except StateStoreError as exc:
        raise AirflowFailException(str(exc)) from None
    ensure_stores(both)
    return both


def _today() -> date:
    return utcnow().date()


class LeadEventsSummaryOperator(BaseOperator):
    """Writes the run's row in lead_event_sync_runs, logs counts per status and raises the alerts.

    It succeeds whatever the run's outcome, so that its outlet (the Asset
    `lead_event_deliveries`) is updated by every run that changed the audit; the
    `check_outcome` task after it fails a failed run, and a run whose alert could not be
    sent (logged here as an error, with its cause).
    """

    template_fields: Sequence[str] = ("warehouse_conn_id", "run_label")

    def __init__(self, *, warehouse_conn_id: str = "warehouse_default", run_label: str = RUN_LABEL,
                 whole_partition: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.warehouse_conn_id = warehouse_conn_id
        self.run_label = run_label
        self.whole_partition = whole_partition

    def execute(self, context: Context) -> dict:
        try:
            config = load_config()
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from None
        both = _stores(self.warehouse_conn_id)
        day = partition_of(context, config.zone).day if self.whole_partition else _run_day(both.state, self.run_label)
        summary = runs.summarise(both, self.run_label, day, self.dag_id, self.whole_partition)
        self.log.info("\n%s", summary.table())
        alert_error = None
        try:
            if not summary.dry_run:
                raise_alerts(both.state, config.alerts, summary, context)
        except RuntimeError as exc:  # logged with its cause; the next run raises the alert again
            alert_error = f"an alert could not be sent: {exc}"
            self.log.error("%s (check_outcome fails this run for it)", alert_error)
        return {"outcome": summary.outcome, "message": summary.message, "alert_error": alert_error,
                **summary.counts, "requests": summary.requests_sent}


def _run_day(engine, run_id: str) -> date:
    return runs.run_partition_day(engine, run_id) or _today()


@task(task_id="check_outcome")
def check_outcome(summary: dict | None) -> None:
    """Fails the DAG run when the summary (`audit_summary`'s result) found it failed (an event gave
    up, credentials refused, ...) or could not send an alert."""
    result = summary or {}
    problems = []
    if result.get("outcome") != "success":
        problems.append(result.get("message") or "the run failed (see audit_summary)")
    if result.get("alert_error"):
        problems.append(f"{result['alert_error']} (the audit is written; the next run sends the alert)")
    if problems:
        raise AirflowFailException("; ".join(problems))
