"""Deciding each mapped event against its row on record: insert it, rewrite it, touch it, or leave it.

Delivered events are never touched again; a rejected one is reopened only when its body changed;
a failed one only by a run of its own partition (`reopen`); an event a sender holds is its
sender's; one on record under another day is a repeat. Everything else is re-evaluated: its row
is rewritten when anything of it would change.
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

from lead_sync.clock import as_utc
from lead_sync.events import DELIVERED, FAILED, PENDING, REJECTED, LeadEvent
from lead_sync.mapping.payloads import payload_digest, payload_json
from lead_sync.state.preview import Preview
from lead_sync.state.writes import Writes

# What a sender writes as the reason of an event it leaves open: a retry (delivery's outcomes),
# and claims.recover_abandoned's unknown outcome.
_RETRYING = "retrying:"
_UNKNOWN_OUTCOME = "an earlier request's outcome is unknown (sender stopped); sent again"


def _senders_reason(reason: str | None) -> bool:
    return reason is not None and (reason.startswith(_RETRYING) or reason == _UNKNOWN_OUTCOME)


def _same_moment(stored: datetime | None, moment: datetime | None) -> bool:
    """A timestamp on record (naive from SQLite: UTC) is the same instant as `moment`."""
    if stored is None or moment is None:
        return stored is moment
    if stored.tzinfo is None:
        stored = stored.replace(tzinfo=timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return stored == moment


def decide(events: list[LeadEvent], existing: dict[str, dict], run_id: str, now: datetime, counts: Counter,
           reopen: bool, preview: list[Preview] | None = None, keep_unchanged: bool = False,
           copying: bool = False, meanwhile: Counter | None = None) -> Writes | None:
    """Decide each event against its row on record (see on_record.rows_on_record): what to write,
    or with `preview`, only what it would do (then nothing is returned).

    A re-evaluated row that would not change is not rewritten: with `keep_unchanged` it is left
    as it is (unless its body in the outbox needs mending), otherwise only its updated_at and
    last_run_id are set. An open event whose payload did not change keeps the reason a sender
    gave it (retrying, outcome unknown); a run of its own partition still makes it due now. With
    `copying` (COPY will write them), new rows have their dates and numbers as text already.
    `meanwhile` counts, as the writes are made, the rows a sender changed since they were read.
    """
    inserts, updates, touched, bodies, replaced, dropped = [], [], [], {}, [], []
    new_bodies, new_dropped = {}, []
    now_value, days = (now.isoformat(), {}) if copying else (now, None)
    for event in events:
        key = event.event_key
        row = existing.get(key)
        if row is not None and preview is not None:
            kept = Preview(event, row["status"], row["reason"], False)
        digest = payload_digest(event.payload)
        if row is None:
            counts["new"] += 1
            if preview is not None:
                preview.append(Preview(event, event.status, event.reason, event.status == PENDING))
                continue
            body, audited = payload_json(event.payload)
            day, moment, attempts = event.partition_date, event.event_time, 0
            if copying:
                day = days.get(day) or days.setdefault(day, day.isoformat())
                moment, attempts = moment if moment is None else moment.isoformat(), "0"
            inserts.append((key, event.source, day, event.customer_external_id, event.event_name, event.tracking,
                            event.status, event.reason, "; ".join(event.notes) or None, audited, digest, moment,
                            attempts, now_value, now_value, run_id))
            if event.status == PENDING:
                new_bodies[key] = body
            else:
                new_dropped.append(key)
            continue
        status = row["status"]
        if status == DELIVERED:
            counts["already_delivered"] += 1
            if preview is not None:
                preview.append(kept)
            continue
        elif row["partition_date"] != event.partition_date:
            counts["repeats"] += 1  # the same customer and event name, recorded under another day
            if preview is not None:
                preview.append(Preview(event, "repeat", "recorded under another day", False))
            continue
        elif as_utc(row["inflight_until"]) is not None:
            counts["in_flight"] += 1  # a sender holds it; its outcome decides
            if preview is not None:
                preview.append(kept)
            continue
        elif status == REJECTED and row["payload_sha256"] == digest:
            counts["still_rejected"] += 1
            if preview is not None:
                preview.append(kept)
            continue
        elif status == FAILED and not reopen:
            counts["failed_final"] += 1  # gave up: only a run of its own partition re-opens it
            if preview is not None:
                preview.append(kept)
            continue
        reason, retry_since, next_attempt_at = event.reason, row["retry_since"], row["next_attempt_at"]
        if event.status == PENDING and status == FAILED:
            reason = f"re-opened by run {run_id} of partition {event.partition_date}: to be sent again"
            retry_since = None  # a fresh give_up_after_hours
            counts["reopened"] += 1
        elif event.status == PENDING and status == REJECTED:
            reason = "source row changed since the rejection: to be sent again"
        if (event.status == PENDING and status == PENDING and row["payload_sha256"] == digest
                and _senders_reason(row["reason"])):
            reason = row["reason"]  # the same payload: the sender's word on it stands
        if reopen:
            next_attempt_at = None  # a run of its own partition sends it now
        counts["reevaluated"] += 1
        if preview is not None:
            later = as_utc(next_attempt_at)
            preview.append(Preview(event, event.status, reason,
                                   event.status == PENDING and (later is None or later <= now)))
            continue
        notes = "; ".join(event.notes) or None
        has_body = row["has_body"]
        if (status == event.status and row["payload_sha256"] == digest and row["reason"] == reason
                and row["notes"] == notes and row["source"] == event.source and row["tracking"] == event.tracking
                and row["customer_external_id"] == event.customer_external_id
                and row["event_name"] == event.event_name and _same_moment(row["event_time"], event.event_time)
                and _same_moment(row["retry_since"], retry_since)
                and _same_moment(row["next_attempt_at"], next_attempt_at)):
            # Nothing but updated_at and last_run_id would change (the payload: by its digest).
            # Its body (the payload did not change) is in the outbox exactly when it is pending:
            # mending that is a write, made only where the row is still as read (a touch).
            mend = (event.status == PENDING) != has_body
            if mend or not keep_unchanged:
                touched.append((key, status, row["attempts"]))
            if event.status == PENDING and not has_body:
                bodies[key] = payload_json(event.payload)[0]
            elif event.status != PENDING and has_body:
                dropped.append(key)
            continue
        body, audited = payload_json(event.payload)
        updates.append({
            "source": event.source,
            "tracking": event.tracking,
            "customer_external_id": event.customer_external_id,
            "event_name": event.event_name,
            "reason": reason,
            "notes": notes,
            "payload": audited,
            "payload_sha256": digest,
            "event_time": event.event_time,
            "updated_at": now,
            "last_run_id": run_id,
            "retry_since": retry_since,
            "next_attempt_at": next_attempt_at,
            "b_key": key,
            "status": event.status,
            "was_status": status,
            "was_attempts": row["attempts"],
        })
        if has_body:
            replaced.append(key)
        if event.status == PENDING:
            bodies[key] = body
        else:
            dropped.append(key)
    if preview is not None:
        return None
    return Writes(run_id, now, inserts, new_bodies, new_dropped, updates, touched, bodies, replaced, dropped,
                  Counter() if meanwhile is None else meanwhile)
