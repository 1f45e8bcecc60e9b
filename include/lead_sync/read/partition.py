"""Which day a run syncs, and the UTC bounds of that day in the partition time zone."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from lead_sync import clock

PAD_DAYS = 2
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
# The earliest day a run may name; the latest is tomorrow in UTC (a zone ahead of UTC is already there).
FIRST_PARTITION_DATE = date(2000, 1, 1)


@dataclass(frozen=True)
class Partition:
    day: date
    zone: ZoneInfo

    @property
    def start(self) -> datetime:
        return datetime.combine(self.day, time(0), self.zone).astimezone(timezone.utc)

    @property
    def end(self) -> datetime:
        return datetime.combine(self.day + timedelta(days=1), time(0), self.zone).astimezone(timezone.utc)

    def sql_window(self) -> dict[str, str]:
        """Bounds handed to source SQL: two days wider on each side, as plain ISO dates.

        Dates compare correctly against PostgreSQL timestamps and against SQLite text
        timestamps whatever their separator; two days cover any pair of real-world offsets
        (-12:00 to +14:00) between a row and the partition zone. The exact cut is made in Python.
        """
        return days_window(self.day, self.day)

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


def days_window(first: date, last: date) -> dict[str, str]:
    """The SQL bounds that cover every partition from `first` to `last` (see Partition.sql_window)."""
    return {
        "window_start": (first - timedelta(days=PAD_DAYS)).isoformat(),
        "window_end": (last + timedelta(days=PAD_DAYS + 1)).isoformat(),
    }


def contiguous(days: list[date]) -> list[tuple[date, date]]:
    """Sorted days as (first, last) runs of consecutive days: each run is read with one query."""
    runs: list[tuple[date, date]] = []
    for day in sorted(set(days)):
        if runs and day == runs[-1][1] + timedelta(days=1):
            runs[-1] = (runs[-1][0], day)
        else:
            runs.append((day, day))
    return runs


def last_partition_date() -> date:
    """Tomorrow in UTC: no zone's today is later."""
    return clock.utcnow().date() + timedelta(days=1)


def parse_partition_date(value: str) -> date:
    if not isinstance(value, str) or not _DATE.match(value.strip()):
        raise ValueError(f"partition_date must be YYYY-MM-DD, got {value!r}")
    try:
        day = date.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError(f"partition_date is not a calendar date: {value!r}") from exc
    last = last_partition_date()
    if not FIRST_PARTITION_DATE <= day <= last:
        raise ValueError(f"partition_date must be from {FIRST_PARTITION_DATE.isoformat()} to {last.isoformat()} "
                         f"(tomorrow, UTC), got {value!r}")
    return day


def resolve_partition(
    partition_date: str | None, data_interval_start: datetime | None, zone: ZoneInfo
) -> Partition:
    """conf `partition_date` wins; otherwise the day the data interval starts on."""
    if partition_date:
        return Partition(parse_partition_date(partition_date), zone)
    if data_interval_start is None:
        raise ValueError(
            "this run has no data interval (manual run without a logical date): "
            'pass the day to sync as conf {"partition_date": "YYYY-MM-DD"}'
        )
    start = data_interval_start
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    return Partition(start.astimezone(zone).date(), zone)
