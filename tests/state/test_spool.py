"""The spool of mapped events: what goes in comes back unchanged, per partition, in batches that
never split a key, also once it is kept in a temporary file."""
from __future__ import annotations

import hashlib
from datetime import date, datetime, timezone

import pytest

from lead_sync.events import DEFERRED_START, NON_DEFERRED, PENDING, SKIPPED, LeadEvent
from lead_sync.state import spool
from lead_sync.state.spool import MappedEvents

DAY, OTHER_DAY = date(2026, 11, 27), date(2026, 11, 28)


def key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def event(n: int, day: date = DAY, *, copy: int = 0) -> LeadEvent:
    """Event n; a copy > 0 is another event of the same key (a repeat, as the mapping yields them)."""
    moments = (datetime(2026, 11, 27, 8, n % 60, 1, 123456, tzinfo=timezone.utc),
               datetime(2026, 11, 27, 8, n % 60), None)  # aware, naive, none
    return LeadEvent(key(n), "signups", day, (NON_DEFERRED, DEFERRED_START)[n % 2], (PENDING, SKIPPED)[n % 3 == 0],
                     None if n % 5 == 0 else {"customerName": f"Zoë {n}", "n": n}, f"{n}-{copy}",
                     "signup_started", moments[n % 3], None if n % 3 else "no click id", [f"note {n}"] * (n % 2))


def as_values(events: list[LeadEvent]) -> list[tuple]:
    return [(e.event_key, e.source, e.partition_date, e.tracking, e.status, e.payload, e.customer_external_id,
             e.event_name, e.event_time, e.reason, e.notes) for e in events]


def test_events_come_back_as_they_went_in_per_partition():
    added = [event(n) for n in range(200)]
    other = [event(n, OTHER_DAY) for n in range(7)]
    with MappedEvents() as mapped:
        mapped.add(DAY, added)
        mapped.add_days(days := {OTHER_DAY: other})
        assert days == {}  # handed over, not kept twice
        assert (mapped.count(DAY), mapped.count(OTHER_DAY), mapped.count(date(2026, 1, 1))) == (200, 7, 0)
        [back] = mapped.batches(DAY, None)
        [other_back] = mapped.batches(OTHER_DAY, None)
    assert as_values(back) == as_values(added)  # one batch of everything: in the order added
    assert as_values(other_back) == as_values(other)
    assert {type(e.event_time.tzinfo) for e in back if e.event_time} == {type(None), timezone}


@pytest.mark.parametrize("spill_bytes", [spool.SPILL_BYTES, 1_000], ids=["in_memory", "in_a_file"])
def test_batches_hold_every_event_of_their_keys_in_the_order_added(monkeypatch, spill_bytes):
    monkeypatch.setattr(spool, "SPILL_BYTES", spill_bytes)
    added = [event(n) for n in range(3_000)] + [event(n, copy=1) for n in range(0, 3_000, 7)]
    with MappedEvents() as mapped:
        for start in range(0, len(added), 500):  # as the mapping hands them over, a chunk at a time
            mapped.add(DAY, added[start:start + 500])
        batches = list(mapped.batches(DAY, 400))
    assert all(len(batch) >= 400 for batch in batches[:-1])
    assert sorted(as_values([e for batch in batches for e in batch]), key=repr) == sorted(as_values(added), key=repr)
    order = {e.customer_external_id: i for i, e in enumerate(added)}
    for batch in batches:
        positions = [order[e.customer_external_id] for e in batch]
        assert positions == sorted(positions)
    batch_of = {}
    for number, batch in enumerate(batches):
        for e in batch:
            assert batch_of.setdefault(e.event_key, number) == number  # a key's events are all in one batch


def test_keys_that_are_not_digests_are_kept_too():
    odd = [LeadEvent(f"key-{n}", "s", DAY, NON_DEFERRED, PENDING, {"n": n}) for n in range(50)]
    with MappedEvents() as mapped:
        mapped.add(DAY, odd)
        back = [e for batch in mapped.batches(DAY, 10) for e in batch]
    assert sorted(as_values(back)) == sorted(as_values(odd))
