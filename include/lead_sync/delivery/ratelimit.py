"""A request budget shared by every sender of a deployment, kept in the warehouse.

Senders may run in several tasks, processes and machines at once; the warehouse is the
one store they all reach, so the sliding window of granted requests lives there. Each
grant is a short transaction that first locks the bucket's row (a row lock in
PostgreSQL, the database write lock in SQLite), so two senders never both take the
last free slot. One transaction may grant several slots at once (a sender sending many
requests at a time), and give back several it did not use.

When the window is never exceeded. A slot is stamped when it is granted, before its
request leaves; the API counts the request when it arrives. Once the request is answered,
the sender moves the slot's stamp to the moment of the answer (`restamp`, written with
the request's outcome), which is no earlier than the API's count: from then on the slot
frees a full window after the API counted it, whatever the request's journey took
(connection set-up, a slow network, a wait in the sender's queue). The margin covers the
clocks of the workers, which stamp the slots, differing by up to `margin_seconds` (NTP
keeps them within milliseconds). Not covered: a request whose answer is not written within
a minute of its grant (a timeout_seconds near a minute), and one whose sender was killed
before writing its answer after it had waited in the sender's queue longer than the margin
(the queue holds at most half a second of requests), in a window that was full: such a
request counts from its grant, and the API may have counted it up to that wait later.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from sqlalchemy import Float, Integer, String, case, delete, func, insert, literal, select, update
from sqlalchemy.engine import Connection, Engine

from lead_sync.db.bulk import update_each
from lead_sync.db.keys import chunks
from lead_sync.db.schema import rate_buckets, rate_slots
from lead_sync.db.upsert import upsert

WINDOW_SECONDS = 60.0
MARGIN_SECONDS = 0.1


def bucket_name(base_url: str, token: str) -> str:
    """The API counts per token: one bucket per (endpoint, token), named by a digest.

    Spellings of one endpoint (case, trailing slash, surrounding blanks) and of one token
    (surrounding blanks, which the client trims) share a bucket: splitting it would let
    each spelling spend the full limit.
    """
    endpoint = base_url.strip().rstrip("/").lower()
    return hashlib.sha256(f"{endpoint}\x1f{token.strip()}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Grant:
    """One slot of the window: the right to send one request. `slot` is None without a limit."""

    slot: int | None
    granted_at: float  # the limiter's clock


class SharedRateLimiter:
    def __init__(self, engine: Engine, bucket: str, per_minute: int | None,
                 margin_seconds: float = MARGIN_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.bucket = bucket
        self.per_minute = per_minute
        self.margin_seconds = margin_seconds
        # A slot frees this long after its stamp (see the module's note on the margin).
        self.window = WINDOW_SECONDS + margin_seconds
        self.clock = clock
        if per_minute:
            self._create_bucket()  # the tables are there: the send task ensured them (ensure_stores)

    def _create_bucket(self) -> None:
        # Insert-or-keep: senders racing to create the bucket all succeed, and one that is there stays as it is.
        with self.engine.begin() as conn:
            upsert(conn, rate_buckets, {"bucket": self.bucket, "touched_at": self.clock()}, update=())

    def try_acquire_many(self, count: int) -> tuple[list[Grant], float]:
        """Take up to `count` free slots in one transaction. Returns them, and when none was free,
        the seconds until one frees (0.0 when some were granted)."""
        if count <= 0:
            return [], 0.0
        if not self.per_minute:
            now = self.clock()
            return [Grant(None, now) for _ in range(count)], 0.0
        result = self._grant_locked(count)
        if result is None:
            # The bucket row is gone, and without it nothing serialises the senders.
            self._create_bucket()
            result = self._grant_locked(count)
            if result is None:
                raise RuntimeError(f"rate-limit bucket {self.bucket} cannot be created")
        return result

    def _grant_locked(self, count: int) -> tuple[list[Grant], float] | None:
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
            free = min(count, self.per_minute - used)
            if free <= 0:
                return [], max(oldest + self.window - now, 0.01)
            # The slots in one INSERT ... SELECT over a counting CTE: the database makes the rows,
            # not one set of bound values per row.
            count_up = select(literal(1, Integer).label("n")).cte("n", recursive=True)
            count_up = count_up.union_all(select(count_up.c.n + 1).where(count_up.c.n < free))
            rows = select(literal(self.bucket, String).label("bucket"), literal(now, Float).label("granted_at"))
            ids = list(conn.execute(insert(rate_slots).from_select(["bucket", "granted_at"], rows.select_from(count_up))
                                    .returning(rate_slots.c.id)).scalars())
            return [Grant(slot, now) for slot in ids], 0.0

    def give_back(self, slots: Iterable[int | None]) -> None:
        """Give back slots whose requests were never sent, in one transaction."""
        ids = [s for s in slots if s is not None]
        if ids:
            with self.engine.begin() as conn:
                self.give_back_in(conn, ids)

    @staticmethod
    def give_back_in(conn: Connection, slots: Sequence[int]) -> None:
        """`give_back` inside a caller's transaction (the sender's outcome writes)."""
        for chunk in chunks(list(slots)):  # bounded lists of bound values (SQLite's limit)
            conn.execute(delete(rate_slots).where(rate_slots.c.id.in_(chunk)))

    @staticmethod
    def restamp_in(conn: Connection, stamps: Sequence[tuple[int, float]]) -> None:
        """Move used slots' stamps to when their requests were answered (never earlier than the
        API's count of them), inside the transaction that writes the outcomes. A slot no longer
        in the table (its window is over) stays gone."""
        slot = rate_slots.c
        update_each(conn, rate_slots, {"id": slot.id.type, "at": slot.granted_at.type},
                    [{"id": slot_id, "at": at} for slot_id, at in sorted(stamps)],
                    lambda p: [slot.id == p("id")],
                    lambda p: dict(granted_at=case((slot.granted_at < p("at"), p("at")), else_=slot.granted_at)))
