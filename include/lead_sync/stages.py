"""The run's stages as plain functions, in the data's order: extract-and-map, plan the send, send.

What each Airflow task calls. Every stage assumes the schema is there: the task creates what is
missing first (`lead_sync.db.stores.ensure_stores`), as scripts and tests that call a stage do.
The run's row, its batches and its summary are `lead_sync.audit.runs`.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from lead_sync.audit import runs
from lead_sync.audit.publish import publish_audit
from lead_sync.clock import utcnow
from lead_sync.db.stores import Stores, as_stores
from lead_sync.delivery import claims
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.delivery.policy import CredentialsRefused, SendReport
from lead_sync.delivery.ratelimit import SharedRateLimiter, bucket_name
from lead_sync.delivery.retry import RetryPolicy
from lead_sync.delivery.sender import Sender
from lead_sync.delivery.settings import ApiTarget
from lead_sync.mapping.days import ReadTally, map_rows
from lead_sync.read.config import SyncConfig
from lead_sync.read.partition import Partition, contiguous, days_window
from lead_sync.read.sources import read_source_rows
from lead_sync.state import recording as state
from lead_sync.state.on_record import open_partition_days, recorded_keys, recorded_sources
from lead_sync.state.preview import Preview, record_preview
from lead_sync.state.spool import MappedEvents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadPlan:
    """Which partitions a run reads, and how.

    `full`: every row is re-evaluated (the run's own partition, and partitions holding
    pending events). `lookback`: only rows not on record yet are mapped and recorded
    (late rows); what is on record there is passed over unread by the mapping.
    """

    home: date
    full: tuple[date, ...]
    lookback: tuple[date, ...]


def plan_read(engine: Engine, config: SyncConfig, partition: Partition) -> ReadPlan:
    names = [s.name for s in config.sources]
    full = {partition.day} | open_partition_days(engine, names)
    behind = {partition.day - timedelta(days=n) for n in range(1, config.lookback_days + 1)}
    return ReadPlan(partition.day, tuple(sorted(full)), tuple(sorted(behind - full)))


def account_reads(engine: Engine, run_id: str, day: date, lookback: bool, tallies: dict[str, ReadTally],
                  on_record: dict[str, str] | None = None, counted: dict[str, Counter] | None = None) -> list[dict]:
    """How every source row read for a partition is accounted for, per source.

    A row is either the row behind an event of this partition and source on record, or a
    repeat (its event came from another row, of this read, another day or another source).
    `missing`: events of this partition and source on record that the read no longer yielded.
    `on_record` (key -> source of the partition's events), when the caller knows it already;
    `counted` (found and missing per source), when the caller counted them already.
    """
    # Per source: its events on record that the read yielded, and those it did not.
    found, missing = (counted["found"], counted["missing"]) if counted else (Counter(), Counter())
    for key, source in (() if counted else on_record.items() if on_record is not None
                        else recorded_sources(engine, day)):
        tally = tallies.get(source)
        if tally is not None:
            (found if key in tally.keys else missing)[source] += 1
    rows = []
    for source, tally in tallies.items():
        events = found[source]
        rows.append(dict(run_id=run_id, partition_date=day, source=source, read_at=utcnow(), lookback=lookback,
                         rows_read=tally.rows, events=events, repeats=tally.rows - events,
                         missing=missing[source]))
    return rows


@state.gc_paused
def extract_and_map(stores: Engine | Stores, config: SyncConfig, partition: Partition, run_id: str,
                    dag_id: str | None = None, dry_run: bool = False) -> dict:
    """Read the partition, the look-back days before it and every partition with pending events;
    record the mapped events. The run's own partition re-opens its `failed` events.

    A dry run records nothing of the events: it writes what a real run would make of each
    (lead_event_dry_run_events) and how many it would send now (its lead_event_sync_runs row).
    Assumes the schema is there (`ensure_stores`).
    """
    stores = as_stores(stores)
    engine = stores.state  # what is recorded; the sources are read from stores.warehouse
    runs.start_run(engine, run_id, partition.day, dag_id, dry_run)
    plan = plan_read(engine, config, partition)
    names = [s.name for s in config.sources]
    parts = {day: Partition(day, config.zone) for day in plan.full + plan.lookback}
    # The look-back passes over what is on record for its days: key -> source, read once.
    known_sources = {day: recorded_keys(engine, day) for day in plan.lookback}
    known = {day: set(keys) for day, keys in known_sources.items()}
    tallies: dict[str, dict[date, ReadTally]] = {s.name: {} for s in config.sources}
    totals: Counter = Counter()
    mapped = MappedEvents()  # until recorded, mapped events wait in a temporary file, not in memory
    for first, last in contiguous(list(parts)):
        window = days_window(first, last)
        days = {d: p for d, p in parts.items() if first <= d <= last}
        home = parts[plan.home] if first <= plan.home <= last else None
        for source in config.sources:
            for columns, rows in read_source_rows(stores.warehouse, config, source, window):
                events, passed = map_rows(source, columns, rows, days, home, known, tallies[source.name])
                totals["lookback_known"] += passed
                mapped.add_days(events)
    reads: list[dict] = []
    preview: list[Preview] | None = [] if dry_run else None
    for day in sorted(parts):
        lookback = day in known
        recorded: list[str] = []
        counted: dict[str, Counter] = {}  # how the partition on record stands against this read (closing counts it)
        if mapped.count(day) or not lookback:
            # The run's own partition leaves an event it would not change as it is: a rerun writes nothing.
            counts, events, repeats = state.record_mapped(
                engine, mapped, day, names, run_id, config.verification_wait_days, reopen=day == plan.home,
                close_missing=not lookback, preview=preview, keep_unchanged=day == plan.home,
                read={n: t[day].keys if day in t else set() for n, t in tallies.items()}, accounts=counted,
                keys=recorded if lookback else None)
            counts["events_read"] += events + repeats
            counts["repeats"] += repeats
            if lookback:
                counts["late_rows"] += counts["new"]
            totals.update(counts)
            log.info("partition %s%s: %d events mapped (%s)", day, " (look-back: new rows only)" if lookback else "",
                     events, dict(counts))
        if not dry_run:
            # A look-back day's record is what was known plus what this run just recorded.
            on_record = {**known_sources[day], **recorded_keys(engine, day, recorded)} if lookback else None
            reads += account_reads(engine, run_id, day, lookback,
                                   {n: t.get(day, ReadTally()) for n, t in tallies.items()}, on_record, counted)
    mapped.close()
    state.record_reads(engine, reads)
    if totals["new"] or totals["reopened"]:
        state.refresh_statistics(engine)
    values = dict(events_read=totals["events_read"], repeats=totals["repeats"])
    if dry_run:
        totals["would_send"] = record_preview(engine, run_id, preview)
        values.update(dry_run=True, would_send=totals["would_send"])
        log.info("dry run: %d event(s) would be sent now; nothing was sent or changed (lead_event_dry_run_events)",
                 totals["would_send"])
    runs.update_run(engine, run_id, **values)
    publish_audit(stores)
    return {"partition_date": partition.day.isoformat(), "partitions_read": [d.isoformat() for d in plan.full],
            "lookback_read": [d.isoformat() for d in plan.lookback],
            **{k: int(v) for k, v in totals.items()}}


@dataclass(frozen=True)
class Batch:
    """One mapped send task of a run: its number, and how many events it takes at most."""

    batch: int
    max_events: int


def plan_send(stores: Engine | Stores, run_id: str, time_budget_seconds: float, batch_size: int,
              max_batches: int) -> list[Batch]:
    """Split what is open into batches for mapped send tasks: a few events are one batch, a
    backlog at most `max_batches`. Every batch of the run stops at one deadline (its time budget).
    No batch when nothing is open: sending is then complete. Assumes the schema is there."""
    engine = as_stores(stores).state
    open_events = claims.count_to_send(engine)
    count = min(math.ceil(open_events / batch_size), max_batches)
    share = math.ceil(open_events / count) if count else 0
    values: dict = dict(send_batches=count, send_deadline=utcnow() + timedelta(seconds=time_budget_seconds))
    if not count:
        values.update(send_result=runs.SEND_OK, message=None)
    runs.update_run(engine, run_id, **values)
    log.info("%d event(s) to send: %d batch(es) of up to %d", open_events, count, share)
    return [Batch(n, share) for n in range(count)]


def send_open_events(stores: Engine | Stores, client: CutMeShortClient, limiter: SharedRateLimiter, policy: RetryPolicy,
                     run_id: str, time_budget_seconds: float, connection_name: str,
                     batch: Batch | None = None, host: str | None = None, *, max_in_flight: int | None = None,
                     clock=time.time, sleep=time.sleep) -> SendReport:
    """Send what is open (a batch's share of it); record how sending ended, also when credentials are
    refused. With a separate state store, the batch's audit reaches the warehouse in one transaction.
    `max_in_flight`: requests on the wire at once (None: sized by the sender); `clock`/`sleep`: the
    wall clock the time budget and every wait are on. Assumes the schema is there."""
    stores = as_stores(stores)
    engine = stores.state
    try:
        return _send_open_events(engine, client, limiter, policy, run_id, time_budget_seconds, connection_name,
                                 batch, host, max_in_flight, clock, sleep)
    finally:
        try:
            publish_audit(stores)
        except SQLAlchemyError as exc:
            # Every outcome is safe in the state store: the next copy (the run's summary at the
            # latest) writes what this one could not.
            log.warning("the audit could not be copied to the warehouse now (%s); the next copy writes it",
                        str(exc).splitlines()[0])


def _send_open_events(engine: Engine, client: CutMeShortClient, limiter: SharedRateLimiter, policy: RetryPolicy,
                      run_id: str, time_budget_seconds: float, connection_name: str, batch: Batch | None,
                      host: str | None, max_in_flight: int | None = None, clock=time.time,
                      sleep=time.sleep) -> SendReport:
    deadline = clock() + time_budget_seconds
    run_deadline = runs.run_deadline(engine, run_id)
    if run_deadline is not None:
        deadline = min(deadline, run_deadline.timestamp())
    if batch is not None:
        runs.start_batch(engine, run_id, batch.batch, host)
    sender = Sender(engine, client, limiter, policy, run_id, deadline, credentials_hint=connection_name,
                    max_events=batch.max_events if batch is not None else None, max_in_flight=max_in_flight,
                    clock=clock, sleep=sleep)
    try:
        report = sender.run()
    except CredentialsRefused as exc:
        runs.set_send_result(engine, run_id, runs.SEND_CREDENTIALS, str(exc))
        if batch is not None:
            runs.finish_batch(engine, run_id, batch.batch, runs.SEND_CREDENTIALS, sender.report)
        raise
    result = runs.SEND_BUDGET if report.budget_exhausted else runs.SEND_OK
    message = ("time budget used up: the rest stays pending and lead_events_drain goes on sending it"
               if report.budget_exhausted else None)
    runs.set_send_result(engine, run_id, result, message)
    if batch is not None:
        runs.finish_batch(engine, run_id, batch.batch, result, report)
    return report


def send(stores: Engine | Stores, api: ApiTarget, run_id: str, time_budget_seconds: float,
         batch: Batch | None = None, host: str | None = None, client: CutMeShortClient | None = None) -> SendReport:
    """The send stage wired up: the deployment's shared rate limit, the client (the hook's, else
    one made from `api`; closed when sending ends), the retry policy. Assumes the schema is there."""
    settings = api.settings
    stores = as_stores(stores)
    limiter = SharedRateLimiter(stores.state, bucket_name(api.base_url, api.token), settings.rate_limit_per_minute)
    with client or api.client() as client:
        return send_open_events(stores, client, limiter, settings.retry_policy, run_id, time_budget_seconds,
                                api.connection_name, batch, host, max_in_flight=settings.max_in_flight)
