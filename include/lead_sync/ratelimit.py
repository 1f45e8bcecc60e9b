"""A request budget shared by every sender of a deployment, kept in the warehouse.

Senders may run in several tasks, processes and machines at once; the warehouse is the
one store they all reach, so the sliding window of granted requests lives there. Each
grant is a short transaction that first locks the bucket's row (a row lock in
PostgreSQL, the database write lock in SQLite), so two senders never both take the
last free slot.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from .audit import rate_buckets, rate_slots

WINDOW_SECONDS = 60.0


def bucket_name(base_url: str, token: str) -> str:
    """The API counts per token: one bucket per (endpoint, token), named by a digest."""
    return hashlib.sha256(f"{base_url}\x1f{token}".encode()).hexdigest()[:32]


class SharedRateLimiter:
    def __init__(self, engine: Engine, bucket: str, per_minute: int | None,
                 margin_seconds: float = 1.0, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.engine = engine
        self.bucket = bucket
        self.per_minute = per_minute
        # Grants are stamped just before the request leaves; the margin absorbs the
        # difference between that and when the API counts it.
        self.window = WINDOW_SECONDS + margin_seconds
        self.clock = clock
        self.sleep = sleep
        if per_minute:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        with self.engine.connect() as conn:
            if conn.execute(select(rate_buckets.c.bucket).where(rate_buckets.c.bucket == self.bucket)).first():
                return
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(rate_buckets).values(bucket=self.bucket, touched_at=self.clock()))
        except IntegrityError:
            pass  # another sender created it first

    def try_acquire(self) -> float:
        """Take a slot if one is free: returns 0.0, else the seconds until one frees."""
        if not self.per_minute:
            return 0.0
        with self.engine.begin() as conn:
            now = self.clock()
            # The first statement writes the bucket row: it serialises competing senders.
            conn.execute(update(rate_buckets).where(rate_buckets.c.bucket == self.bucket).values(touched_at=now))
            conn.execute(delete(rate_slots).where(rate_slots.c.bucket == self.bucket,
                                                  rate_slots.c.granted_at <= now - self.window))
            used, oldest = conn.execute(
                select(func.count(), func.min(rate_slots.c.granted_at)).where(rate_slots.c.bucket == self.bucket)
            ).one()
            if used < self.per_minute:
                conn.execute(insert(rate_slots).values(bucket=self.bucket, granted_at=now))
                return 0.0
            return max(oldest + self.window - now, 0.01)

    def acquire(self, deadline: float | None = None) -> bool:
        """Wait for a slot; False if none frees before `deadline` (a clock() value)."""
        while True:
            wait = self.try_acquire()
            if wait == 0.0:
                return True
            if deadline is not None and self.clock() + wait > deadline:
                return False
            self.sleep(wait)
