"""The events a run mapped, kept aside until they are recorded: in memory, then a temporary file.

Each event is kept as a tuple of plain values, written with marshal (which takes built-in types
only: an event's moment is kept as microseconds since the epoch).
"""
from __future__ import annotations

import io
import marshal
import tempfile
from datetime import date, datetime, timedelta, timezone
from typing import Iterable, Iterator

from lead_sync.events import LeadEvent

BATCH_EVENTS = 10_000  # events recorded per transaction, about (see MappedEvents.batches)
BUCKETS = 64  # of each partition's mapped events, by key (ranges of them: see _bucket)
SPILL_BYTES = 8 * 2**20  # mapped events kept in memory before they go to a temporary file

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICRO = timedelta(microseconds=1)


def _bucket(key: str) -> int:
    """A key's bucket: the first six bits of its digest (event_key, row_key), so that a batch of
    buckets is a range of keys and records (and reads back) neighbouring rows of the key index."""
    try:
        return int(key[-40:-38], 16) >> 2
    except ValueError:  # not a digest key
        return hash(key) % BUCKETS


def _to_micros(moment: datetime | None) -> int | tuple | None:
    """A moment as marshal keeps it: microseconds since the epoch (a naive one in a tuple)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return ((moment - _EPOCH.replace(tzinfo=None)) // _MICRO,)
    return (moment - _EPOCH) // _MICRO


def _from_micros(micros: int | tuple | None) -> datetime | None:
    if micros is None:
        return None
    if type(micros) is tuple:
        return _EPOCH.replace(tzinfo=None) + _MICRO * micros[0]
    return _EPOCH + _MICRO * micros


class MappedEvents:
    """The events a run mapped, per partition, until they are recorded.

    Beyond SPILL_BYTES they wait in a temporary file, so that memory does not grow with the
    partitions read. Each partition's events are kept in BUCKETS buckets by key, each in the
    order the events came: a batch of whole buckets holds every event of its keys, so that it
    can be folded to one event per key (first_per_key) on its own.
    """

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=SPILL_BYTES)
        self._segments: dict[tuple[date, int], list[tuple[int, int]]] = {}
        self._counts: dict[date, list[int]] = {}
        self._added = 0

    def __enter__(self) -> "MappedEvents":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def add(self, day: date, events: Iterable[LeadEvent]) -> None:
        buckets: list[list[tuple]] = [[] for _ in range(BUCKETS)]
        added = self._added
        for event in events:
            added += 1
            key, moment = event.event_key, event.event_time
            try:
                bucket = buckets[int(key[-40:-38], 16) >> 2]  # _bucket, inline
            except ValueError:
                bucket = buckets[_bucket(key)]
            bucket.append((added, key, event.source, event.tracking, event.status, event.payload,
                           event.customer_external_id, event.event_name,
                           (moment - _EPOCH) // _MICRO if moment is not None and moment.tzinfo is not None
                           else _to_micros(moment), event.reason, event.notes))
        self._added = added
        counts = self._counts.setdefault(day, [0] * BUCKETS)
        for bucket, records in enumerate(buckets):
            if not records:
                continue
            blob = marshal.dumps(records)
            self._file.seek(0, io.SEEK_END)
            self._segments.setdefault((day, bucket), []).append((self._file.tell(), len(blob)))
            self._file.write(blob)
            counts[bucket] += len(records)

    def add_days(self, events: dict[date, list[LeadEvent]]) -> None:
        """Add what map_rows (map_days) returned, and empty it (nothing of it stays in memory)."""
        for day in list(events):
            self.add(day, events.pop(day))

    def count(self, day: date) -> int:
        return sum(self._counts.get(day, ()))

    def batches(self, day: date, size: int | None = BATCH_EVENTS) -> Iterator[list[LeadEvent]]:
        """The day's events in batches of whole buckets, of `size` events or more each but the
        last (None: all in one), each batch in the order the events were added."""
        counts = self._counts.get(day, [0] * BUCKETS)
        group: list[int] = []
        held = 0
        for bucket, count in enumerate(counts):
            if count:
                group.append(bucket)
                held += count
            if group and size is not None and held >= size:
                yield self._read(day, group)
                group, held = [], 0
        if group:
            yield self._read(day, group)

    def _read(self, day: date, buckets: list[int]) -> list[LeadEvent]:
        records: list[tuple] = []
        for bucket in buckets:
            for offset, length in self._segments[(day, bucket)]:
                self._file.seek(offset)
                records.extend(marshal.loads(self._file.read(length)))
        if len(buckets) > 1:
            records.sort(key=lambda record: record[0])
        return [LeadEvent(key, source, day, tracking, status, payload, customer, name,
                          None if moment is None else _EPOCH + _MICRO * moment if moment.__class__ is int
                          else _from_micros(moment), reason, notes)
                for _, key, source, tracking, status, payload, customer, name, moment, reason, notes in records]
