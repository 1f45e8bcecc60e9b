"""A request budget shared by every sender of a deployment, kept in the warehouse.

Senders may run in several tasks, processes and machines at once; the warehouse is the
one store they all reach, so the sliding window of granted requests lives there. Each
grant is a short transaction that first locks the bucket's row (a row lock in
PostgreSQL, the database write lock in SQLite), so two senders never both take the
last free slot.
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Callable

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from .audit import ensure_schema, rate_buckets, rate_slots

WINDOW_SECONDS = 60.0


def bucket_name(base_url: str, token: str) -> str:
    """The API counts per token: one bucket per (endpoint, token), named by a digest.

    Spellings of one endpoint (case, trailing slash, surrounding blanks) and of one token
    (surrounding blanks, which the client trims) share a bucket: splitting it would let
    each spelling spend the full limit.
    """
    endpoint = base_url.strip().rstrip("/").lower()
    return hashlib.sha256(f"{endpoint}\x1f{token.strip()}".encode()).hexdigest()[:32]


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
        self._last = threading.local()  # id of the slot granted last, per thread
        if per_minute:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        ensure_schema(self.engine)  # a send may come before anything else created the tables
        self._create_bucket()

    def _create_bucket(self) -> None:
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
        self._last.slot = None
        wait = self._try_acquire_locked()
        if wait is None:
            # The bucket row is gone, and without it nothing serialises the senders.
            self._create_bucket()
            wait = self._try_acquire_locked()
            if wait is None:
                raise RuntimeError(f"rate-limit bucket {self.bucket} cannot be created")
        return wait

    def _try_acquire_locked(self) -> float | None:
        with self.engine.begin() as conn:
            # The first statement writes the bucket row: it serialises competing senders.
            locked = conn.execute(
                update(rate_buckets).where(rate_buckets.c.bucket == self.bucket).values(touched_at=self.clock())
            ).rowcount
            if locked != 1:
                return None
            # Read the clock once the lock is held: a grant is never stamped before it is made.
            now = self.clock()
            conn.execute(delete(rate_slots).where(rate_slots.c.bucket == self.bucket,
                                                  rate_slots.c.granted_at <= now - self.window))
            used, oldest = conn.execute(
                select(func.count(), func.min(rate_slots.c.granted_at)).where(rate_slots.c.bucket == self.bucket)
            ).one()
            if used < self.per_minute:
                slot = conn.execute(insert(rate_slots).values(bucket=self.bucket, granted_at=now))
                self._last.slot = slot.inserted_primary_key[0]
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

    def release(self) -> None:
        """Give back the slot granted last, when no request was sent with it (the event was taken meanwhile)."""
        slot, self._last.slot = getattr(self._last, "slot", None), None
        if slot is None:
            return
        with self.engine.begin() as conn:
            conn.execute(delete(rate_slots).where(rate_slots.c.id == slot))
