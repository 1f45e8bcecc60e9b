"""Being told: which alerts a run raises or clears, and what each message says.

Three conditions, each with a stored state in `lead_event_alert_state` (one row per alert
key; no row = not firing):

- `run_failed:<dag_id>`: the run failed; clears when a later run of that DAG succeeds.
- `rejected_share:<dag_id>`: of the events this run's requests settled, the share rejected
  is above `alerts.rejected_share`; a run that settled nothing leaves it as it is.
- `backlog`: some event has been pending for longer than `alerts.backlog_hours` (an event 2
  still waiting for its event 1 does not count).

A message goes out only when a condition changes state (alert, or recovery). `evaluate`
says what to send and changes nothing; `mark_sent` records the alerts that were sent, so
an alert whose sending failed is raised again by the next run.

Messages carry only the run summary's fields and counts from the audit: never a payload,
a customer id or anything from a connection.
"""
from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import exists, func, or_, select
from sqlalchemy.engine import Connection, Engine

from lead_sync.audit.runs import RunSummary
from lead_sync.db.schema import alert_state, deliveries
from lead_sync.db.upsert import upsert
from lead_sync.events import DEFERRED_CONFIRM, DEFERRED_START, DELIVERED, FAILED, PENDING, REJECTED, STATUSES
from lead_sync.read.config import AlertsConfig

log = logging.getLogger(__name__)

RUN_FAILED = "run_failed"
REJECTED_SHARE = "rejected_share"
BACKLOG = "backlog"
REASON_CHARS = 200
# Reasons are meant to be PII-free; an e-mail address quoted by the API is masked all the same.
EMAIL_LIKE = re.compile(r"[^\s@<>()\[\]\"',;:]+@[^\s@<>()\[\]\"',;:]+\.[A-Za-z]{2,}")


@dataclass
class Alert:
    key: str
    firing: bool  # the state being announced: True = ALERT, False = RECOVERED
    subject: str
    text: str  # plain text body
    html: str  # the same content, HTML-escaped, for e-mail
    detail: str = ""  # one line: what changed (kept in the state table)


@dataclass
class _Stored:
    firing: bool
    since: datetime | None


def _utc(moment: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already (SQLite hands them back naive)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _one_line(value: object, limit: int = REASON_CHARS) -> str:
    """Quoted text (reasons come from the API) on one line: control characters dropped, e-mail
    addresses masked, length bounded."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(value)).strip()
    text = EMAIL_LIKE.sub("[e-mail]", text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f} h"


def _load_state(conn: Connection) -> dict[str, _Stored]:
    rows = conn.execute(select(alert_state.c.alert, alert_state.c.firing, alert_state.c.since)).all()
    return {key: _Stored(bool(firing), _utc(since) if since else None) for key, firing, since in rows}


def _backlog(conn: Connection, cutoff: datetime) -> tuple[int, datetime | None]:
    # An event 2 whose event 1 is not delivered is waiting by design (verification_wait_days),
    # not held up in sending: it is no backlog.
    first = deliveries.alias("first")
    event_one_delivered = exists().where(
        first.c.customer_external_id == deliveries.c.customer_external_id,
        first.c.tracking == DEFERRED_START,
        first.c.status == DELIVERED,
    )
    count, oldest = conn.execute(
        select(func.count(), func.min(deliveries.c.created_at))
        .where(deliveries.c.status == PENDING, deliveries.c.created_at < cutoff,
               or_(deliveries.c.tracking != DEFERRED_CONFIRM, event_one_delivered))
    ).one()
    return int(count), (_utc(oldest) if oldest is not None else None)


def _rejected_share(decided: dict[str, int]) -> tuple[float, int, int] | None:
    """(share, rejected, settled), or None when the run's requests settled nothing."""
    rejected = int(decided.get(REJECTED, 0) or 0)
    settled = int(decided.get(DELIVERED, 0) or 0) + rejected + int(decided.get(FAILED, 0) or 0)
    return None if settled == 0 else (rejected / settled, rejected, settled)


def evaluate(engine: Engine, cfg: AlertsConfig, summary: RunSummary, now: datetime) -> list[Alert]:
    """The alerts and recoveries to send now for this run; the stored state is not changed.
    Assumes the schema is there (`lead_sync.db.stores.ensure_stores`)."""
    now = _utc(now)
    cutoff = now - timedelta(hours=cfg.backlog_hours)
    with engine.connect() as conn:
        stored = _load_state(conn)
        backlog_count, oldest = _backlog(conn, cutoff)

    def was_firing(key: str) -> _Stored:
        return stored.get(key) or _Stored(False, None)

    out: list[Alert] = []
    threshold = f"{cfg.rejected_share:.1%}"

    key = f"{RUN_FAILED}:{summary.dag_id}"
    firing = summary.outcome == "failed"
    if firing != was_firing(key).firing:
        if firing:
            what = "run failed"
            detail = f"the run failed: {_one_line(summary.message or 'no reason recorded')}"
        else:
            what = "run failed: cleared"
            detail = f"run {_one_line(summary.run_id)} succeeded; earlier runs of this DAG had failed"
        out.append(_compose(key, firing, what, detail, summary, was_firing(key).since))

    key = f"{REJECTED_SHARE}:{summary.dag_id}"
    share = _rejected_share(summary.decided or {})
    if share is not None:
        value, rejected, settled = share
        firing = value > cfg.rejected_share
        if firing != was_firing(key).firing:
            measured = f"{rejected} of the {settled} events this run's requests settled were rejected ({value:.1%})"
            if firing:
                what = "rejected share above threshold"
                detail = f"{measured}, above the threshold of {threshold}"
            else:
                what = "rejected share recovered"
                detail = f"{measured}, within the threshold of {threshold}"
            out.append(_compose(key, firing, what, detail, summary, was_firing(key).since))

    key = BACKLOG
    firing = backlog_count > 0
    if firing != was_firing(key).firing:
        hours = f"{cfg.backlog_hours:g} h"
        if firing:
            what = "backlog of open events"
            age = _hours(now - oldest) if oldest else "unknown"
            detail = (f"{backlog_count} pending event(s) created more than {hours} ago; "
                      f"the oldest is {age} old")
        else:
            what = "backlog cleared"
            detail = f"no pending event is older than {hours} any more"
        out.append(_compose(key, firing, what, detail, summary, was_firing(key).since))
    return out


def _compose(key: str, firing: bool, what: str, detail: str, summary: RunSummary,
             since: datetime | None) -> Alert:
    state = "ALERT" if firing else "RECOVERED"
    dag = _one_line(summary.dag_id)
    subject = f"[{dag}] {state}: {what} (partition {summary.partition_date.isoformat()})"
    headline = f"{state}: {what}"
    lines = [detail]
    if not firing and since is not None:
        lines.append(f"It had been firing since {since:%Y-%m-%d %H:%M} UTC.")
    lines += [
        "",
        f"DAG:            {dag}",
        f"Run:            {_one_line(summary.run_id)}",
        f"Partition:      {summary.partition_date.isoformat()}",
        f"Outcome:        {_one_line(summary.outcome)}",
        f"Send result:    {_one_line(summary.send_result or 'none')}",
        f"Requests sent:  {int(summary.requests_sent)}",
    ]
    if summary.message:
        lines.append(f"Message:        {_one_line(summary.message, 500)}")
    lines += ["", "Events per status:"]
    lines += [f"  {status:<10} {int(summary.counts.get(status, 0)):>8}" for status in STATUSES]
    decided = summary.decided or {}
    lines.append("Settled by this run's requests: " + ", ".join(
        f"{status} {int(decided.get(status, 0) or 0)}" for status in (DELIVERED, REJECTED, FAILED)))
    lines += ["", "Top reasons:"]
    if summary.top_reasons:
        lines += [f"  {int(n):>8}  {_one_line(status, 20):<10} {_one_line(reason)}"
                  for status, reason, n in summary.top_reasons[:5]]
    else:
        lines.append("  (none)")
    body = "\n".join(lines)
    text = f"{subject}\n\n{body}\n"
    html_body = (
        "<html><body>"
        f"<p><b>{html.escape(headline)}</b></p>"
        f'<pre style="font-family: monospace">{html.escape(body)}</pre>'
        "</body></html>"
    )
    return Alert(key=key, firing=firing, subject=subject, text=text, html=html_body, detail=_one_line(detail, 1000))


def mark_sent(engine: Engine, alerts: list[Alert], now: datetime) -> None:
    """Record the state each of these alerts announced (one row per alert key)."""
    if not alerts:
        return
    now = _utc(now)
    with engine.begin() as conn:
        upsert(conn, alert_state, [{"alert": a.key, "firing": a.firing, "since": now, "notified_at": now,
                                    "detail": a.detail or a.subject} for a in alerts])
