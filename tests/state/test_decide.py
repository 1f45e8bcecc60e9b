"""What recording makes of each mapped event against its row on record (decide.decide, no database),
and, through reruns on real warehouses, that an unchanged open event keeps the reason its sender
gave it."""
from __future__ import annotations

import json
from collections import Counter
from datetime import date, datetime, timedelta, timezone

import pytest

from lead_sync.delivery import claims
from lead_sync.events import DELIVERED, FAILED, NON_DEFERRED, PENDING, REJECTED, SKIPPED, LeadEvent
from lead_sync.mapping.payloads import payload_digest, payload_json
from lead_sync.state.decide import decide
from lead_sync.state.on_record import LOADED
from lead_sync.state.preview import Preview
from lead_sync.state.writes import INSERTED

from tests.support.audit import row, row_and_body
from tests.support.seeding import NEXT_DAY, rename, rerun, seed, signup
from tests.support.sending import sending

DAY = date(2026, 11, 27)
NOW = datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)
EARLIER = NOW - timedelta(hours=20)


def event(n: int = 1, *, status: str = PENDING, name: str = "Ann", day: date = DAY) -> LeadEvent:
    payload = {"clickId": f"click-{n}", "eventName": "signup_started", "customerExternalId": str(n),
               "customerName": name}
    return LeadEvent(f"{n:064x}", "signups", day, NON_DEFERRED, status, payload if status == PENDING else None,
                     str(n), "signup_started", datetime(2026, 11, 27, 8, n, tzinfo=timezone.utc),
                     None if status == PENDING else "no click id")


def recorded(e: LeadEvent, **changes) -> dict:
    """The row an earlier run left for this very event (its body in the outbox while pending)."""
    row = dict(event_key=e.event_key, source=e.source, partition_date=e.partition_date,
               customer_external_id=e.customer_external_id, event_name=e.event_name, tracking=e.tracking,
               status=e.status, attempts=0, reason=e.reason, notes="; ".join(e.notes) or None,
               payload_sha256=payload_digest(e.payload), event_time=e.event_time, created_at=EARLIER,
               inflight_until=None, retry_since=None, next_attempt_at=None, has_body=e.status == PENDING)
    assert set(row) == {*LOADED, "has_body"}
    row.update(changes)
    return row


def decided(events, existing, *, reopen=False, keep_unchanged=False, copying=False):
    counts = Counter()
    writes = decide(events, existing, "run-2", NOW, counts, reopen, keep_unchanged=keep_unchanged, copying=copying)
    return writes, counts


def written_keys(writes) -> set[str]:
    """Every key the writes would change anything of."""
    return ({r[0] for r in writes.inserts} | {u["b_key"] for u in writes.updates} | {t[0] for t in writes.touched}
            | set(writes.bodies) | set(writes.new_bodies) | set(writes.dropped) | set(writes.new_dropped))


def test_a_new_event_is_inserted_with_its_body_to_send_and_a_skipped_one_without():
    sendable, skipped = event(1), event(2, status=SKIPPED)
    writes, counts = decided([sendable, skipped], {})
    assert counts == {"new": 2}
    rows = {r[0]: dict(zip(INSERTED, r)) for r in writes.inserts}
    assert rows[sendable.event_key]["status"] == PENDING and rows[skipped.event_key]["status"] == SKIPPED
    assert rows[sendable.event_key]["attempts"] == 0 and rows[sendable.event_key]["created_at"] == NOW
    assert json.loads(writes.new_bodies[sendable.event_key]) == sendable.payload
    assert rows[sendable.event_key]["payload"] == payload_json(sendable.payload)[1]  # the audit's copy: redacted
    assert writes.new_dropped == [skipped.event_key]


def test_for_copy_new_rows_have_their_dates_and_numbers_as_text():
    e = event(1)
    writes, _ = decided([e], {}, copying=True)
    row = dict(zip(INSERTED, writes.inserts[0]))
    assert (row["partition_date"], row["event_time"], row["created_at"], row["attempts"]) == (
        DAY.isoformat(), e.event_time.isoformat(), NOW.isoformat(), "0")


@pytest.mark.parametrize("stored, count", [
    (dict(status=DELIVERED, has_body=False), "already_delivered"),
    (dict(partition_date=DAY - timedelta(days=1)), "repeats"),
    (dict(inflight_until=NOW + timedelta(minutes=1), attempts=1), "in_flight"),
    (dict(status=FAILED, has_body=True), "failed_final"),
], ids=["delivered", "recorded_under_another_day", "held_by_a_sender", "failed"])
def test_events_recording_leaves_alone_are_not_written(stored, count):
    e = event(1, name="Changed")
    writes, counts = decided([e], {e.event_key: recorded(event(1), **stored)})
    assert counts == {count: 1} and written_keys(writes) == set()


def test_a_rejected_event_is_reopened_only_when_its_body_changed():
    same, changed = event(1), event(2, name="Changed")
    existing = {e.event_key: recorded(e, status=REJECTED, has_body=False) for e in (same, event(2))}
    writes, counts = decided([same, changed], existing)
    assert counts == {"still_rejected": 1, "reevaluated": 1}
    [update] = writes.updates
    assert update["b_key"] == changed.event_key and update["status"] == PENDING
    assert update["reason"] == "source row changed since the rejection: to be sent again"
    assert json.loads(writes.bodies[changed.event_key]) == changed.payload


def test_a_failed_event_is_reopened_by_a_run_of_its_own_partition_with_a_fresh_retry_window():
    e = event(1)
    stored = recorded(e, status=FAILED, attempts=4, retry_since=EARLIER, next_attempt_at=NOW + timedelta(hours=1))
    writes, counts = decided([e], {e.event_key: stored}, reopen=True)
    assert counts == {"reevaluated": 1, "reopened": 1}
    [update] = writes.updates
    assert (update["status"], update["retry_since"], update["next_attempt_at"]) == (PENDING, None, None)
    assert update["reason"] == f"re-opened by run run-2 of partition {DAY}: to be sent again"
    assert e.event_key in writes.replaced  # its body stayed in the outbox: replaced, not added


def test_every_rewrite_is_made_only_where_the_row_is_still_as_read():
    e = event(1, name="Changed")
    writes, _ = decided([e], {e.event_key: recorded(event(1), attempts=2)})
    [update] = writes.updates
    assert (update["was_status"], update["was_attempts"]) == (PENDING, 2)


def test_an_unchanged_event_is_touched_or_with_keep_unchanged_left_as_it_is():
    e = event(1)
    existing = {e.event_key: recorded(e)}
    writes, counts = decided([e], existing)
    assert counts == {"reevaluated": 1} and writes.touched == [(e.event_key, PENDING, 0)]
    assert writes.updates == [] and writes.bodies == {} and writes.dropped == []
    writes, _ = decided([e], existing, keep_unchanged=True)
    assert written_keys(writes) == set()


def test_an_unchanged_event_whose_body_is_not_as_its_status_says_is_mended():
    pending, skipped = event(1), event(2, status=SKIPPED)
    existing = {pending.event_key: recorded(pending, has_body=False),
                skipped.event_key: recorded(skipped, has_body=True)}
    writes, _ = decided([pending, skipped], existing, keep_unchanged=True)
    assert sorted(t[0] for t in writes.touched) == sorted([pending.event_key, skipped.event_key])
    assert json.loads(writes.bodies[pending.event_key]) == pending.payload
    assert writes.dropped == [skipped.event_key]


@pytest.mark.parametrize("reason", ["retrying: HTTP 500",
                                    "an earlier request's outcome is unknown (sender stopped); sent again"])
def test_an_unchanged_open_event_keeps_its_senders_reason_and_a_run_of_its_partition_makes_it_due(reason):
    e = event(1)
    stored = recorded(e, reason=reason, attempts=1, next_attempt_at=NOW + timedelta(hours=1))
    writes, _ = decided([e], {e.event_key: stored})  # not its own partition: nothing would change
    assert writes.touched == [(e.event_key, PENDING, 1)] and writes.updates == []
    writes, _ = decided([e], {e.event_key: stored}, reopen=True)
    [update] = writes.updates
    assert update["reason"] == reason and update["next_attempt_at"] is None


def test_a_preview_writes_nothing_and_says_what_each_event_would_become():
    new, held, waiting = event(1), event(2), event(3)
    existing = {held.event_key: recorded(held, inflight_until=NOW + timedelta(minutes=1), attempts=1),
                waiting.event_key: recorded(waiting, next_attempt_at=NOW + timedelta(hours=1))}
    preview: list[Preview] = []
    assert decide([new, held, waiting], existing, "dry", NOW, Counter(), False, preview) is None
    assert [(p.event.event_key, p.status, p.due) for p in preview] == [
        (new.event_key, PENDING, True), (held.event_key, PENDING, False), (waiting.event_key, PENDING, False)]


# --- a sender's reason on an open event, through reruns --------------------------------------------

def _left_retrying(wh, sandbox) -> None:
    """Customer 1 left open by a sender, retrying (HTTP 500 every time); customer 2 delivered."""
    seed(wh, signup(1), signup(2, 1))
    sandbox.set_faults({"permanent_errors": {"1": 500}})
    with sending(wh, sandbox, per_minute=None, max_attempts=2) as sender:
        sender.run()
    sandbox.set_faults({"permanent_errors": {}})


def _left_unknown(wh, sandbox) -> None:
    """Customer 1's sender stopped with its request in flight: recovery reopened it, outcome unknown."""
    seed(wh, signup(1), signup(2, 1))
    key = row(wh, 1)["event_key"]
    assert claims.claim_many(wh.engine, "manual__stopped", 1, datetime.now(timezone.utc), keys=[key]).claims
    assert claims.recover_abandoned(wh.engine, "manual__recovery",
                                    now=datetime.now(timezone.utc) + timedelta(seconds=5)) == 1


@pytest.mark.parametrize("left, reason", [
    (_left_retrying, "retrying: HTTP 500"),
    (_left_unknown, "an earlier request's outcome is unknown (sender stopped); sent again"),
], ids=["retrying", "outcome_unknown"])
def test_a_rerun_keeps_the_reason_a_sender_gave_an_unchanged_open_event(warehouse, sandbox, left, reason):
    left(warehouse, sandbox)
    before, body = row_and_body(warehouse, 1)
    assert before["status"] == "pending" and before["reason"].startswith(reason) and body is not None
    # The run of its own partition keeps the sender's reason and the body; it only makes the event due now.
    summary = rerun(warehouse)
    assert "changed_meanwhile" not in summary
    after, same_body = row_and_body(warehouse, 1)
    assert same_body == body and after["reason"] == before["reason"] and after["next_attempt_at"] is None
    moving = ("updated_at", "last_run_id", "next_attempt_at")
    assert {k: v for k, v in after.items() if k not in moving} == {k: v for k, v in before.items() if k not in moving}
    before = after
    # A run that re-reads it as an open partition only says it re-evaluated it.
    later = rerun(warehouse, NEXT_DAY)
    touched, same_body = row_and_body(warehouse, 1)
    assert same_body == body and touched["last_run_id"] != before["last_run_id"]
    assert {k: v for k, v in touched.items() if k not in ("updated_at", "last_run_id")} == \
        {k: v for k, v in before.items() if k not in ("updated_at", "last_run_id")}
    assert later["reevaluated"] >= 1


def test_a_changed_source_row_replaces_a_senders_reason(warehouse, sandbox):
    _left_retrying(warehouse, sandbox)
    before, body = row_and_body(warehouse, 1)
    rename(warehouse, "v2")
    rerun(warehouse)
    after, new_body = row_and_body(warehouse, 1)
    assert after["status"] == "pending" and after["reason"] is None
    assert after["next_attempt_at"] is None  # a run of its own partition sends it now
    assert new_body["customerName"] == "Name v2 1" and "customerName" not in body
    assert after["attempts"] == before["attempts"]
