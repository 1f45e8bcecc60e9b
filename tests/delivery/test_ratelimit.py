"""SharedRateLimiter on real SQLite and PostgreSQL warehouses, including OS processes competing for one bucket."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
from sqlalchemy import delete, func, select

from lead_sync.db.schema import ensure_schema, rate_buckets, rate_slots
from lead_sync.delivery.ratelimit import MARGIN_SECONDS, SharedRateLimiter, bucket_name
from lead_sync.db.engines import prepare_engine

from tests.support import TOKEN
from tests.support.clock import FakeClock

WINDOW = 60.0
FREES = WINDOW + MARGIN_SECONDS  # a slot frees this long after its stamp


def limiter_clock() -> FakeClock:
    """Epoch seconds moved by hand, so a minute costs nothing. Its waits are never more than a window
    (plus margin), and never nothing (busy-looping)."""
    return FakeClock(1_800_000_000.0, longest_sleep=62, allow_zero_sleep=False)


def limiter(wh, clock: FakeClock, per_minute: int | None, bucket: str = "bucket-a") -> SharedRateLimiter:
    prepare_engine(wh.engine)
    ensure_schema(wh.engine)  # as each task does first (tests/plugin/test_operators.py: the send task)
    return SharedRateLimiter(wh.engine, bucket, per_minute, clock=clock)


def acquire(lim: SharedRateLimiter, count: int, deadline: float | None = None) -> list:
    """As a sender takes slots (try_acquire_many, waiting what it says on the limiter's FakeClock):
    at least one and up to `count`, or [] if none frees before `deadline`."""
    while True:
        granted, wait = lim.try_acquire_many(count)
        if granted:
            return granted
        if deadline is not None and lim.clock() + wait > deadline:
            return []
        lim.clock.sleep(wait)


def busiest_window(times: list[float], width: float = WINDOW) -> int:
    times = sorted(times)
    best = start = 0
    for end, moment in enumerate(times):
        while moment - times[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


def slot_count(engine, bucket: str) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(rate_slots).where(rate_slots.c.bucket == bucket)).scalar()


def test_never_more_than_n_grants_in_any_60s(warehouse):
    clock = limiter_clock()
    lim = limiter(warehouse, clock, per_minute=5)
    rng = random.Random(7)
    grants = []
    started = clock.now
    for _ in range(60):
        clock.now += rng.choice([0.0, 0.0, 0.5, 3.0, 11.0, 29.0])  # bursts and pauses
        assert len(acquire(lim, 1)) == 1
        grants.append(clock.now)
    assert busiest_window(grants) == 5  # the limit is reached, never passed
    # ...and not by starving: each wait ends exactly when the oldest slot of the window frees.
    assert all(s <= FREES for s in clock.sleeps) and clock.sleeps
    assert clock.now - started < 60 / 5 * FREES + FREES * 2
    # Expired slots are cleared as it goes: only the current window is kept.
    assert slot_count(warehouse.engine, "bucket-a") <= 5


def test_a_full_window_makes_the_next_grant_wait_for_the_oldest_slot(warehouse):
    clock = limiter_clock()
    lim = limiter(warehouse, clock, per_minute=3)
    first = clock.now
    for step in range(3):
        assert len(lim.try_acquire_many(1)[0]) == 1
        clock.now += 10
    # 3 grants at +0, +10, +20; now +30: the first slot frees a window (60 s and the margin) after +0.
    assert lim.try_acquire_many(1) == ([], pytest.approx(first + FREES - clock.now))
    assert slot_count(warehouse.engine, "bucket-a") == 3
    assert len(acquire(lim, 1)) == 1
    assert clock.sleeps == [pytest.approx(FREES - 30)]
    assert clock.now == pytest.approx(first + FREES)


def test_acquire_grants_nothing_when_the_deadline_is_too_near(warehouse):
    clock = limiter_clock()
    lim = limiter(warehouse, clock, per_minute=2)
    assert len(acquire(lim, 1, deadline=clock.now + 5) + acquire(lim, 1, deadline=clock.now + 5)) == 2
    start = clock.now
    assert acquire(lim, 1, deadline=start + 30) == []
    assert acquire(lim, 1, deadline=start + FREES - 0.1) == []
    assert clock.sleeps == [] and clock.now == start  # gave up at once, without waiting
    assert slot_count(warehouse.engine, "bucket-a") == 2
    assert len(acquire(lim, 1, deadline=start + FREES + 0.5)) == 1  # both slots free a window later
    assert clock.sleeps == [pytest.approx(FREES)]
    assert slot_count(warehouse.engine, "bucket-a") == 1


# --- several slots per transaction (a sender with many requests in flight) --------------------

def test_a_block_grants_what_is_free_in_one_go_and_gives_back_what_was_not_used(warehouse):
    clock = limiter_clock()
    lim = limiter(warehouse, clock, per_minute=5)
    granted, wait = lim.try_acquire_many(3)
    assert wait == 0.0 and len(granted) == 3 and {g.granted_at for g in granted} == {clock.now}
    assert len({g.slot for g in granted}) == 3
    clock.now += 5
    more, wait = lim.try_acquire_many(10)  # only 2 are free
    assert wait == 0.0 and len(more) == 2 and slot_count(warehouse.engine, "bucket-a") == 5
    none, wait = lim.try_acquire_many(1)
    assert none == [] and wait == pytest.approx(FREES - 5)
    lim.give_back([g.slot for g in more])  # never sent: free again at once
    assert slot_count(warehouse.engine, "bucket-a") == 3
    assert [len(lim.try_acquire_many(4)[0]), len(acquire(lim, 4, deadline=clock.now + 1))] == [2, 0]
    assert clock.sleeps == []
    # Waiting for the oldest slots, then taking what freed.
    assert len(acquire(lim, 4)) == 3 and clock.sleeps == [pytest.approx(FREES - 5)]


def test_a_slot_restamped_at_its_answer_frees_a_window_after_the_answer(warehouse):
    clock = limiter_clock()
    lim = limiter(warehouse, clock, per_minute=2)
    (slow, quick), _ = lim.try_acquire_many(2)
    start = clock.now
    # The first request took 8 s to be answered (its stamp moves there), the other was answered at once.
    with warehouse.engine.begin() as conn:
        lim.restamp_in(conn, [(slow.slot, start + 8.0), (quick.slot, start)])
        lim.restamp_in(conn, [(quick.slot, start - 5.0)])  # a stamp never moves back
    clock.now = start + FREES
    granted, wait = lim.try_acquire_many(2)
    assert len(granted) == 1 and wait == 0.0  # the quick one's slot is free, the slow one's is not
    assert lim.try_acquire_many(1) == ([], pytest.approx(8.0))
    clock.now += 8.0
    assert len(lim.try_acquire_many(1)[0]) == 1


def test_no_limit_grants_blocks_without_the_database(sqlite_warehouse):
    clock = limiter_clock()
    lim = SharedRateLimiter(sqlite_warehouse.engine, "b", None, clock=clock)
    granted, wait = lim.try_acquire_many(50)
    assert len(granted) == 50 and wait == 0.0 and {g.slot for g in granted} == {None}
    lim.give_back([g.slot for g in granted])
    with sqlite_warehouse.engine.connect() as conn:
        assert not sqlite_warehouse.engine.dialect.has_table(conn, "lead_event_rate_slots")


def test_buckets_are_independent_and_named_without_the_token(warehouse):
    clock = limiter_clock()
    one = limiter(warehouse, clock, 1, bucket=bucket_name("https://api.cme.sh", TOKEN))
    other = limiter(warehouse, clock, 1, bucket=bucket_name("https://api.cme.sh", "another-token"))
    assert one.bucket != other.bucket and TOKEN not in one.bucket
    assert one.bucket == bucket_name("https://api.cme.sh", TOKEN)
    assert len(one.try_acquire_many(1)[0]) == 1 and len(other.try_acquire_many(1)[0]) == 1
    assert one.try_acquire_many(1)[1] > 0 and other.try_acquire_many(1)[1] > 0


def test_spellings_of_one_endpoint_and_token_share_a_bucket():
    one = bucket_name("https://api.cme.sh", TOKEN)
    assert bucket_name(" https://API.cme.sh/ ", f"{TOKEN}\n") == one
    assert bucket_name("https://api.cme.sh", "another-token") != one
    assert bucket_name("https://sandbox.example.com", TOKEN) != one
    assert TOKEN not in one and len(one) <= min(rate_buckets.c.bucket.type.length, rate_slots.c.bucket.type.length)


def test_giving_back_frees_only_the_slots_given_back(warehouse):
    clock = limiter_clock()
    one, other = limiter(warehouse, clock, 2), limiter(warehouse, clock, 2)
    (mine,), _ = one.try_acquire_many(1)
    (theirs,), _ = other.try_acquire_many(1)
    assert one.try_acquire_many(1)[0] == []  # full
    one.give_back([None])  # a grant without a slot: nothing to give back
    assert slot_count(warehouse.engine, "bucket-a") == 2
    other.give_back([theirs.slot])  # its request was never sent
    assert slot_count(warehouse.engine, "bucket-a") == 1
    other.give_back([theirs.slot])  # only once
    assert slot_count(warehouse.engine, "bucket-a") == 1
    assert len(one.try_acquire_many(2)[0]) == 1  # the slot given back, and no other
    one.give_back([mine.slot])
    assert slot_count(warehouse.engine, "bucket-a") == 1


def test_no_limit_grants_without_touching_the_database(sqlite_warehouse):
    clock = limiter_clock()
    lim = SharedRateLimiter(sqlite_warehouse.engine, "b", None, clock=clock)
    assert all(acquire(lim, 1, deadline=clock.now) for _ in range(100))
    with sqlite_warehouse.engine.connect() as conn:
        assert not sqlite_warehouse.engine.dialect.has_table(conn, "lead_event_rate_slots")


def test_limiter_recreates_a_lost_bucket_row(warehouse):
    clock = limiter_clock()
    lim = limiter(warehouse, clock, per_minute=2)
    assert len(lim.try_acquire_many(1)[0]) == 1
    with warehouse.engine.begin() as conn:
        conn.execute(delete(rate_buckets))
    # Without its row nothing would serialise competing senders: it comes back.
    assert len(lim.try_acquire_many(1)[0]) == 1
    assert lim.try_acquire_many(1) == ([], pytest.approx(FREES))
    with warehouse.engine.connect() as conn:
        assert conn.execute(select(rate_buckets.c.bucket)).scalars().all() == ["bucket-a"]


def test_a_limiter_for_a_bucket_that_is_there_keeps_it_as_it_is(warehouse):
    clock = limiter_clock()
    first = limiter(warehouse, clock, per_minute=2)
    assert len(first.try_acquire_many(1)[0]) == 1
    with warehouse.engine.connect() as conn:
        before = conn.execute(select(rate_buckets)).all()
    clock.now += 30
    second = limiter(warehouse, clock, per_minute=2)  # another sender of the same deployment
    with warehouse.engine.connect() as conn:
        assert conn.execute(select(rate_buckets)).all() == before
    assert len(second.try_acquire_many(2)[0]) == 1  # the window the first one started

# --- real processes competing for one bucket -----------------------------------------------

CHILD = r"""
import json, sys, time
from pathlib import Path
from sqlalchemy import create_engine
from lead_sync.delivery.ratelimit import SharedRateLimiter

url, ready = sys.argv[1], sys.argv[5]
per_minute, attempts, rounds = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# SQLite: wait for the competing writer (what prepare_engine does, without importing pandas here).
engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
waits = []  # what acquire waited for a slot
def sleep(seconds):
    waits.append(seconds)
    time.sleep(seconds)
def acquire(limiter, count, deadline):  # as a sender takes slots
    while True:
        granted, wait = limiter.try_acquire_many(count)
        if granted or time.time() + wait > deadline:
            return granted
        sleep(wait)
# One bucket per round; the processes race to create each of them, too.
limiters = [SharedRateLimiter(engine, f"shared-{r}", per_minute) for r in range(rounds)]
Path(ready).touch()
start = float(sys.stdin.readline())  # the same wall-clock start for every process
results = []
for r, limiter in enumerate(limiters):
    time.sleep(max(0.0, start + r * ROUND_SECONDS - time.time()))
    for _ in range(attempts):
        asked, before = time.time(), len(waits)
        granted = bool(acquire(limiter, 1, time.time() + 3.0))
        results.append([r, granted, asked, time.time(), len(waits) - before])
print(json.dumps(results))
"""

PROCESSES = 4
PER_MINUTE = 20
ATTEMPTS_EACH = 7  # per round: 28 attempts on one bucket, N + 8
ROUNDS = 3  # each round is a fresh bucket, so a race at the N-th slot gets three chances to show
ROUND_SECONDS = 0.75


def test_processes_sharing_one_bucket_never_exceed_the_limit(warehouse, tmp_path):
    ensure_schema(warehouse.engine)
    url = warehouse.url.render_as_string(hide_password=False)
    code = CHILD.replace("ROUND_SECONDS", repr(ROUND_SECONDS))
    procs: list[subprocess.Popen] = []
    try:
        for n in range(PROCESSES):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", code, url, str(PER_MINUTE), str(ATTEMPTS_EACH), str(ROUNDS),
                 str(tmp_path / f"ready-{n}")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready-{n}").exists() for n in range(PROCESSES)):
            assert time.monotonic() < deadline, "child processes did not get ready"
            assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs if p.poll() is not None]
            time.sleep(0.02)
        start = time.time() + 0.2
        for proc in procs:
            proc.stdin.write(f"{start}\n")
            proc.stdin.flush()
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    results = [r for out in outputs for r in out]
    assert len(results) == PROCESSES * ATTEMPTS_EACH * ROUNDS
    for round_ in range(ROUNDS):
        mine = [(granted, asked, done, waited) for r, granted, asked, done, waited in results if r == round_]
        granted_at = [done for granted, _, done, _ in mine if granted]
        # All attempts of a round fall in its first window: exactly N granted, not one more, none lost.
        assert max(done for _, _, done, _ in mine) - min(asked for _, asked, _, _ in mine) < 10
        assert (round_, len(granted_at)) == (round_, PER_MINUTE)
        assert busiest_window(granted_at) == PER_MINUTE
        assert slot_count(warehouse.engine, f"shared-{round_}") == PER_MINUTE
        # Nobody waited: every grant was free at once, and a refusal came without a wait, the next
        # slot being a minute away, past the 3 s deadline.
        assert [waited for _, _, _, waited in mine] == [0] * len(mine)
    with warehouse.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(rate_buckets)).scalar() == ROUNDS
