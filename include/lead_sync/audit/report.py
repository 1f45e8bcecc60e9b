"""The delivery report: one self-contained HTML page from the audit tables (contract section 10).

Public API (no Airflow here; the plugin page reuses it): `load_report`, `render_html`,
`customer_events`, `render_customer_html`, `AuditMissing`. Whatever it shows leaves out payloads,
API answers, names and e-mail addresses; free text (reasons, errors) has anything shaped like an
e-mail address masked, as a second line of defence. The charts are drawn by `charts`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from itertools import groupby
from numbers import Number
from pathlib import Path
from typing import Any, Iterable

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Date, MetaData, Table, and_, case, cast, column, func, inspect, or_, select, table
from sqlalchemy.engine import Engine

from lead_sync.audit.charts import STATUS_COLORS, STATUS_ORDER, deliveries_chart, latency_chart
from lead_sync.clock import as_utc, utcnow
from lead_sync.db.engines import prepare_engine
from lead_sync.db.schema import attempts, deliveries, sync_runs
from lead_sync.events import DELIVERED, FAILED, PENDING, REJECTED, STATUSES

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

TOP_REASONS = 10
RECENT_RUNS = 20
ATTENTION_ROWS = 200
PENDING_TOO_OLD = timedelta(days=1)

VIEW_DAILY = "lead_event_daily"
VIEW_ERRORS = "lead_event_errors"
VIEW_RECONCILIATION = "lead_event_reconciliation"

# The columns of lead_event_sync_runs the report shows, in this order, when the table has them.
RUN_COLUMNS = ("run_id", "dag_id", "partition_date", "started_at", "finished_at", "outcome", "send_result",
               "dry_run", "would_send", "events_read", "repeats", "requests_sent", "delivered", "rejected",
               "failed", "skipped", "pending", "message")

_EMAIL = re.compile(r"[^\s@<>\"'(),;:]+@[^\s@<>\"'(),;:]+\.[A-Za-z]{2,}")


class AuditMissing(RuntimeError):
    """The warehouse has no delivery audit (lead_event_deliveries) yet."""


@dataclass(frozen=True)
class Latency:
    """Latency percentiles (ms) of answered attempts: overall (day None) or of one day of sending (UTC)."""

    day: date | None
    answered: int
    p50: float | None
    p90: float | None
    p99: float | None


@dataclass(frozen=True)
class Reason:
    http_status: int | None
    reason: str
    events: int
    example_event_key: str | None


@dataclass
class ReportData:
    generated_at: datetime
    since: date  # first partition day in the window
    days: int
    totals: dict[str, int]  # events per status, partitions in the window
    daily: dict[date, dict[str, int]]  # partition day -> status -> events
    requests: dict[date, int]  # partition day -> requests made for its events
    latency: Latency
    latency_daily: list[Latency]
    reasons: list[Reason]  # most frequent first (not delivered, with a reason)
    runs: list[dict[str, Any]]  # newest first
    run_columns: list[str]
    attention: list[dict[str, Any]]  # failed, rejected, pending retrying or older than a day
    attention_total: int
    reconciliation: list[dict[str, Any]] | None  # None: the view does not exist
    reconciliation_columns: list[str] = field(default_factory=list)
    from_views: list[str] = field(default_factory=list)  # which views the numbers came from

    @property
    def total_events(self) -> int:
        return sum(self.totals.values())

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


# --- reading -----------------------------------------------------------------------------------

def _view_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_view_names())


def _require_audit(engine: Engine) -> None:
    if not inspect(engine).has_table(deliveries.name):
        raise AuditMissing(f"no delivery audit: table {deliveries.name} does not exist in this warehouse")


def _as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, datetime):
        return value.date()
    return date.fromisoformat(str(value)[:10])


def _as_moment(value: Any) -> datetime | None:
    """Timestamps as aware UTC; views on SQLite hand them back as text."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return as_utc(value)


def scrub(text: Any) -> Any:
    """Mask anything shaped like an e-mail address in free text."""
    return _EMAIL.sub("[e-mail]", text) if isinstance(text, str) else text


def percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, as PostgreSQL's percentile_cont."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _daily(conn, views: set[str], since: date) -> tuple[dict, dict]:
    if VIEW_DAILY in views:
        v = table(VIEW_DAILY, column("partition_date"), column("status"), column("events"), column("requests"))
        source = (v.c.partition_date, v.c.status, func.sum(v.c.events), func.sum(v.c.requests))
        where = v.c.partition_date >= since
        group = (v.c.partition_date, v.c.status)
    else:
        d = deliveries.c
        source = (d.partition_date, d.status, func.count(), func.coalesce(func.sum(d.attempts), 0))
        where = d.partition_date >= since
        group = (d.partition_date, d.status)
    daily: dict[date, dict[str, int]] = defaultdict(dict)
    requests: dict[date, int] = defaultdict(int)
    for day, status, events, sent in conn.execute(select(*source).where(where).group_by(*group)):
        day = _as_date(day)
        daily[day][status] = daily[day].get(status, 0) + int(events or 0)
        requests[day] += int(sent or 0)
    return dict(sorted(daily.items())), dict(sorted(requests.items()))


def _reasons(conn, views: set[str], since: date) -> list[Reason]:
    if VIEW_ERRORS in views:
        v = table(VIEW_ERRORS, column("partition_date"), column("http_status"), column("reason"), column("events"),
                  column("example_event_key"))
        query = (select(v.c.http_status, v.c.reason, func.sum(v.c.events).label("n"), func.min(v.c.example_event_key))
                 .where(v.c.partition_date >= since).group_by(v.c.http_status, v.c.reason))
    else:
        d = deliveries.c
        query = (select(d.http_status, d.reason, func.count().label("n"), func.min(d.event_key))
                 .where(d.partition_date >= since, d.status != DELIVERED, d.reason.is_not(None))
                 .group_by(d.http_status, d.reason))
    rows = conn.execute(query.order_by(column("n").desc(), column("reason")).limit(TOP_REASONS)).all()
    return [Reason(int(s) if s is not None else None, scrub(r), int(n), k) for s, r, n, k in rows]


def _latency(conn, dialect: str, since: datetime) -> tuple[Latency, list[Latency]]:
    a = attempts.c
    answered = and_(a.http_status.is_not(None), a.latency_ms.is_not(None), a.sent_at >= since)
    if dialect == "postgresql":
        pcts = [func.percentile_cont(q).within_group(a.latency_ms) for _, q in QUANTILES]
        day = cast(func.timezone("UTC", a.sent_at), Date)
        n, *overall = conn.execute(select(func.count(), *pcts).where(answered)).one()
        per_day = [Latency(_as_date(d), int(c), *(float(p) for p in ps))
                   for d, c, *ps in conn.execute(select(day, func.count(), *pcts).where(answered)
                                                 .group_by(day).order_by(day))]
        return Latency(None, int(n), *(float(p) if p is not None else None for p in overall)), per_day
    by_day: dict[date, list[int]] = defaultdict(list)
    for sent_at, ms in conn.execute(select(a.sent_at, a.latency_ms).where(answered)):
        by_day[_as_moment(sent_at).date()].append(int(ms))
    everything = sorted(ms for values in by_day.values() for ms in values)

    def summary(day: date | None, values: list[int]) -> Latency:
        values = sorted(values)
        return Latency(day, len(values), *(percentile(values, q) for _, q in QUANTILES))

    return summary(None, everything), [summary(d, by_day[d]) for d in sorted(by_day)]


def _runs(conn, engine: Engine) -> tuple[list[dict], list[str]]:
    if not inspect(engine).has_table(sync_runs.name):
        return [], []
    runs = Table(sync_runs.name, MetaData(), autoload_with=conn)  # reflected: columns added later show too
    shown = [name for name in RUN_COLUMNS if name in runs.c]
    rows = conn.execute(select(*(runs.c[name] for name in shown))
                        .order_by(runs.c.started_at.desc()).limit(RECENT_RUNS)).mappings()
    return [{k: scrub(v) for k, v in row.items()} for row in rows], shown


ATTENTION_COLUMNS = ("event_key", "partition_date", "source", "event_name", "customer_external_id", "status",
                     "reason", "attempts", "http_status", "last_attempt_at")


def _attention(conn, since: date, now: datetime) -> tuple[list[dict], int]:
    d = deliveries.c
    needs = or_(
        and_(d.status.in_((FAILED, REJECTED)), d.partition_date >= since),
        and_(d.status == PENDING, or_(d.reason.like("retrying%"), d.created_at < now - PENDING_TOO_OLD)),
    )
    total = conn.execute(select(func.count()).where(needs)).scalar_one()
    severity = case({FAILED: 0, PENDING: 1, REJECTED: 2}, value=d.status, else_=3)
    rows = conn.execute(select(*(d[name] for name in ATTENTION_COLUMNS)).where(needs)
                        .order_by(severity, d.partition_date.desc(), d.event_key).limit(ATTENTION_ROWS)).mappings()
    return [{k: scrub(v) for k, v in row.items()} for row in rows], int(total)


def _reconciliation(conn, engine: Engine, views: set[str], since: date) -> tuple[list[dict] | None, list[str]]:
    if VIEW_RECONCILIATION not in views:
        return None, []
    view = Table(VIEW_RECONCILIATION, MetaData(), autoload_with=conn)
    columns = [c.name for c in view.columns]
    query = select(view)
    if "partition_date" in view.c:
        query = query.where(view.c.partition_date >= since).order_by(view.c.partition_date.desc(),
                                                                      *([view.c.source] if "source" in view.c else []))
    rows = []
    for row in conn.execute(query).mappings():
        values = dict(row)
        if "partition_date" in values:
            values["partition_date"] = _as_date(values["partition_date"])
        for name in values:
            if name.endswith("_at") and isinstance(values[name], (str, datetime)):
                values[name] = _as_moment(values[name])  # views on SQLite hand timestamps back as text
        rows.append(values)
    return rows, columns


def load_report(engine: Engine, now: datetime | None = None, days: int = 30) -> ReportData:
    """Everything the report shows, for the partitions of the last `days` days (attempts sent since then).

    Reads the views lead_event_daily, lead_event_errors and lead_event_reconciliation where
    they exist and the tables otherwise. Raises AuditMissing without lead_event_deliveries.
    """
    prepare_engine(engine)
    _require_audit(engine)
    now = as_utc(now) if now is not None else utcnow()
    since = (now - timedelta(days=days)).date()
    since_moment = datetime(since.year, since.month, since.day, tzinfo=timezone.utc)
    views = _view_names(engine)
    with engine.connect() as conn:
        daily, requests = _daily(conn, views, since)
        reasons = _reasons(conn, views, since)
        overall, per_day = _latency(conn, engine.dialect.name, since_moment)
        runs, run_columns = _runs(conn, engine)
        attention, attention_total = _attention(conn, since, now)
        reconciliation, reconciliation_columns = _reconciliation(conn, engine, views, since)
    totals = {status: 0 for status in STATUSES}
    for counts in daily.values():
        for status, n in counts.items():
            totals[status] = totals.get(status, 0) + n
    used = sorted(views & {VIEW_DAILY, VIEW_ERRORS, VIEW_RECONCILIATION})
    return ReportData(now, since, days, totals, daily, requests, overall, per_day, reasons, runs, run_columns,
                      attention, attention_total, reconciliation, reconciliation_columns, used)


CUSTOMER_COLUMNS = ("event_key", "source", "partition_date", "event_name", "tracking", "status", "reason", "notes",
                    "attempts", "http_status", "event_time", "first_attempt_at", "last_attempt_at", "delivered_at",
                    "last_run_id")


def customer_events(engine: Engine, customer_external_id: str) -> list[dict]:
    """The audit rows of one customer (oldest first) with a summary of their attempts; no payloads."""
    prepare_engine(engine)
    _require_audit(engine)
    d, a = deliveries.c, attempts.c
    customer = str(customer_external_id).strip()
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(
            select(*(d[name] for name in CUSTOMER_COLUMNS)).where(d.customer_external_id == customer)
            .order_by(d.event_time, d.created_at, d.event_key)).mappings()]
        keys = [r["event_key"] for r in rows]
        tried: dict[str, list] = defaultdict(list)
        if keys:
            for row in conn.execute(select(a.event_key, a.attempt, a.sent_at, a.http_status, a.latency_ms, a.outcome,
                                           a.error).where(a.event_key.in_(keys)).order_by(a.event_key, a.id)).mappings():
                tried[row["event_key"]].append(row)
    for row in rows:
        history = tried.get(row["event_key"], [])
        outcomes: dict[str, int] = defaultdict(int)
        for attempt in history:
            outcomes[attempt["outcome"]] += 1
        last = history[-1] if history else None
        row.update(
            reason=scrub(row["reason"]), notes=scrub(row["notes"]),
            attempts_recorded=len(history), attempt_outcomes=dict(outcomes),
            last_sent_at=_as_moment(last["sent_at"]) if last else None,
            last_latency_ms=last["latency_ms"] if last else None,
            last_error=scrub(last["error"]) if last else None,
        )
    return rows


# --- rendering ---------------------------------------------------------------------------------

def _format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return as_utc(value).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def figure_columns(rows: list[dict], columns: Iterable[str]) -> set[str]:
    """The columns that hold a number (not yes/no) in some row: a table's narrow count columns."""
    return {c for c in columns if any(isinstance(r.get(c), Number) and not isinstance(r.get(c), bool) for r in rows)}


def day_spans(days: Iterable[date]) -> str:
    """Days in order, consecutive ones (the same ordinal less position) as 'first - last', separated by commas."""
    spans = [[d for _, d in run] for _, run in groupby(enumerate(sorted(set(days))), lambda p: p[1].toordinal() - p[0])]
    return ", ".join(str(s[0]) if len(s) == 1 else f"{s[0]} - {s[-1]}" for s in spans)


def fold_empty_days(rows: list[dict]) -> tuple[list[dict], list[date], dict[str, str]]:
    """Reconciliation rows less the days where every figure of every row (source rows, events per status,
    repeats, ...) is 0; those days; and the spans of them each run read. Rows without a day are kept."""
    figures = figure_columns(rows, {c for row in rows for c in row})
    busy = {row.get("partition_date") for row in rows if any(row.get(c) for c in figures)} | {None}
    folded = [row for row in rows if row.get("partition_date") not in busy]
    read_by: dict[str, list[date]] = defaultdict(list)
    for row in folded:
        read_by[row.get("read_by_run")].append(row["partition_date"])
    return ([row for row in rows if row.get("partition_date") in busy], sorted({r["partition_date"] for r in folded}),
            {run: day_spans(days) for run, days in read_by.items() if run is not None})


_ENV: Environment | None = None


def _env() -> Environment:
    global _ENV
    if _ENV is None:
        env = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
                          autoescape=select_autoescape(default=True, default_for_string=True),
                          trim_blocks=True, lstrip_blocks=True)
        env.filters["v"] = _format_value
        env.filters["ms"] = _ms
        # Column names may break after their underscores, so narrow columns keep narrow headers.
        env.filters["name"] = lambda name: Markup("_<wbr>").join(Markup.escape(p) for p in str(name).split("_"))
        env.filters["n"] = lambda value: "" if value is None else f"{value:,}"
        env.globals.update(STATUS_ORDER=STATUS_ORDER, STATUS_COLORS=STATUS_COLORS)
        _ENV = env
    return _ENV


def render_html(data: ReportData, *, title: str = "Lead deliveries", base_path: str = "") -> str:
    """The report as one HTML page that needs nothing else (styles and charts inline).

    `base_path`: where the page is served (the Airflow plugin); when given, the page has a form
    that looks up one customer's events with GET `<base_path>/customer?id=<customer id>`.
    """
    days = sorted(data.daily)
    statuses = [s for s in STATUS_ORDER if data.totals.get(s)] or [DELIVERED]
    reconciliation, empty_days, empty_read_by = fold_empty_days(data.reconciliation or [])
    return _env().get_template("report.html").render(
        title=title, data=data, base_path=base_path.rstrip("/"), days=days, statuses=statuses,
        run_figures=figure_columns(data.runs, data.run_columns), reconciliation=reconciliation,
        reconciliation_figures=figure_columns(data.reconciliation or [], data.reconciliation_columns),
        empty_days=empty_days, empty_spans=day_spans(empty_days), empty_read_by=empty_read_by,
        deliveries_chart=deliveries_chart(data.daily, data.since, data.generated_at.date()),
        latency_chart=latency_chart(data.latency_daily, data.since, data.generated_at.date()),
    )


def render_customer_html(customer_id: str, events: Iterable[dict], *, title: str = "Lead deliveries",
                         base_path: str = "") -> str:
    """One customer's events (from customer_events) as an HTML page; says so when there are none."""
    return _env().get_template("customer.html").render(
        title=title, customer_id=str(customer_id), events=list(events), base_path=base_path.rstrip("/"))
