"""A warehouse that refuses the sender's outcome commits for a while (contract section 12): no answer
is lost, none turns `unknown`, nothing is sent twice. Real PostgreSQL, the sandbox over loopback,
a real Sender: the warehouse refuses for real (a second connection holds a table lock and the
sender's engine has a short lock_timeout)."""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import OperationalError

from lead_sync.delivery import claims
from lead_sync.delivery import writer
from lead_sync import stages
from lead_sync.db.stores import ensure_stores
from lead_sync.db.schema import attempts, deliveries, outbox
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.read.config import load_config
from lead_sync.delivery.sender import Sender
from lead_sync.read.partition import Partition
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy

from tests.support import TOKEN, signups

pytestmark = pytest.mark.postgres

PARTITION = Partition(date(2026, 11, 27), ZoneInfo("UTC"))
REFUSED = "the warehouse refused the outcomes"
_runs = itertools.count(1)


def seed(wh, count: int) -> int:
    """`count` plain signups, recorded by the pipeline's extract stage; returns the events to send."""
    ensure_stores(wh.engine)  # as each task does before its stage
    wh.create_sources()
    start = datetime(2026, 11, 27, 8, 0)
    wh.add(signups, *[dict(customer_external_id=n, click_id=f"click-{n}", customer_name=f"Name {n}",
                           customer_email=f"u{n}@example.com", customer_avatar=None,
                           signed_up_at=start + timedelta(seconds=n), requires_verification=False)
                      for n in range(1, count + 1)])
    summary = stages.extract_and_map(wh.engine, load_config(), PARTITION, f"manual__blip_{next(_runs)}")
    assert summary["new"] == count
    return count


def wait_for(condition, seconds: float, what: str, sender: "Sending | None" = None) -> None:
    """Wait until `condition()`, looking every 50 ms; fails after `seconds` or once the send has ended."""
    deadline = time.monotonic() + seconds
    while not condition():
        if sender is not None and not sender.thread.is_alive():
            pytest.fail(f"the send ended while waiting for {what}: {sender.error!r}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds}s: {what}")
        time.sleep(0.05)


def wait_until_steady(count, seconds: float, what: str, sender: "Sending", steady: float = 1.0) -> int:
    """Wait until `count()` has not changed for `steady` seconds; returns it."""
    deadline = time.monotonic() + seconds
    last, since = count(), time.monotonic()
    while time.monotonic() - since < steady:
        if not sender.thread.is_alive():
            pytest.fail(f"the send ended while waiting for {what}: {sender.error!r}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds}s: {what} (still moving: {last})")
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last


class Sending:
    """A Sender running in a thread of its own, on the real clock."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.report = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-sender", daemon=True)

    def _run(self) -> None:
        try:
            self.report = self.sender.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc


@contextmanager
def sending(wh, sandbox, *, timeout: float = 2.0, max_in_flight: int = 4, per_minute: int = 6000):
    """A Sender on an engine of its own whose statements give up after 200 ms waiting for a lock
    (a table locked elsewhere is a warehouse refusing its commits), started in a thread."""
    engine = create_engine(wh.url, connect_args={"options": "-c lock_timeout=200"}, pool_pre_ping=True)
    try:
        with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=timeout) as client:
            limiter = SharedRateLimiter(engine, "blip-bucket", per_minute)
            sender = Sender(engine, client, limiter, RetryPolicy(4, 0.05, 0.5), f"manual__blip_{next(_runs)}",
                            time.time() + 50, credentials_hint="cutmeshort_default",
                            max_in_flight=max_in_flight)
            run = Sending(sender)
            run.thread.start()
            try:
                yield run
            finally:
                run.thread.join(timeout=50)
    finally:
        engine.dispose()


class TableLock:
    """A lock on a table, held by a transaction on a connection of the test's from `take` to `release`."""

    def __init__(self, wh, table: str, mode: str = "ACCESS EXCLUSIVE") -> None:
        self.wh, self.table, self.mode = wh, table, mode
        self._conn = None

    def take(self) -> None:
        self._conn = self.wh.engine.connect()
        self._conn.begin()
        self._conn.execute(text(f"LOCK TABLE {self.table} IN {self.mode} MODE"))

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.commit()
            conn.close()


def refusals(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == writer.__name__ and r.getMessage().startswith(REFUSED)]


def assert_sent_once_and_audited(wh, sandbox, run: Sending, total: int) -> None:
    assert run.error is None, repr(run.error)
    assert not run.thread.is_alive()
    requests = sandbox.requests()
    assert Counter(r["status"] for r in requests) == {200: total}  # no 409: nothing was sent again
    per_event = Counter((r["body"]["customerExternalId"], r["body"]["eventName"]) for r in requests)
    assert len(per_event) == total and set(per_event.values()) == {1}
    assert (run.report.requests, run.report.delivered) == (total, total)
    assert wh.status_counts() == {"delivered": total}
    rows = wh.attempts()
    assert len(rows) == len(requests) == total
    assert Counter(r["outcome"] for r in rows) == {"delivered": total}  # no `unknown`
    assert Counter(r["http_status"] for r in rows) == {200: total}
    assert len({(r["event_key"], r["attempt"]) for r in rows}) == total
    with wh.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox)).scalar_one() == 0
        assert conn.execute(select(func.count()).where(deliveries.c.inflight_until.is_not(None))).scalar_one() == 0


def assert_quiet_logs(caplog) -> None:
    """Each wait is logged with the error's class and first line: no SQL, no customer values, no token."""
    for record in refusals(caplog):
        message = record.getMessage()
        assert "LockNotAvailable" in message and "lock timeout" in message, message
        assert "\n" not in message and "SQL" not in message and "INSERT" not in message, message
        assert "example.com" not in message and TOKEN not in message, message


def test_a_warehouse_blip_mid_send_loses_no_answer_and_sends_nothing_twice(pg_warehouse, sandbox, caplog):
    caplog.set_level(logging.INFO, logger="lead_sync")
    total = seed(pg_warehouse, 120)
    sandbox.set_faults({"rate_limit_per_minute": None, "latency_ms": 100})
    seen = lambda: len(sandbox.requests())  # noqa: E731
    blip = TableLock(pg_warehouse, "lead_event_delivery_attempts")
    try:
        with sending(pg_warehouse, sandbox) as run:
            wait_for(lambda: seen() >= 20, 20, "20 requests", run)
            blip.take()
            # The writer's commits fail (lock timeout) and are tried again; the sender takes nothing
            # new meanwhile, and the requests it had on the wire are answered.
            wait_for(lambda: len(refusals(caplog)) >= 2, 20, "the writer to try again", run)
            during = wait_until_steady(seen, 20, "the sender to stop sending", run)
            assert 20 <= during < total
            tries = len(refusals(caplog))
            wait_for(lambda: len(refusals(caplog)) > tries, 20, "one more try", run)
            assert seen() == during
            blip.release()
            run.thread.join(timeout=40)
    finally:
        blip.release()
    assert_sent_once_and_audited(pg_warehouse, sandbox, run, total)
    assert_quiet_logs(caplog)
    assert any("took the outcomes again" in r.getMessage() for r in caplog.records)


def _leases(wh) -> tuple[int, int]:
    """(pending events with a lease, those whose lease has run out)."""
    with wh.engine.connect() as conn:
        leased, expired = conn.execute(
            select(func.count(), func.count().filter(deliveries.c.inflight_until < func.now()))
            .where(deliveries.c.status == "pending", deliveries.c.inflight_until.is_not(None))).one()
    return leased, expired


def _every_lease_ran_out(wh) -> bool:
    leased, expired = _leases(wh)
    return 0 < leased == expired


def _unknown(wh) -> int:
    with wh.engine.connect() as conn:
        return conn.execute(select(func.count()).where(attempts.c.outcome == "unknown")).scalar_one()


def test_answers_committed_after_another_sender_audited_their_leases_unknown_replace_those_rows(
        pg_warehouse, sandbox, caplog):
    caplog.set_level(logging.INFO, logger="lead_sync")
    total = seed(pg_warehouse, 30)
    sandbox.set_faults({"rate_limit_per_minute": None, "latency_ms": 100})
    seen = lambda: len(sandbox.requests())  # noqa: E731
    on_attempts = TableLock(pg_warehouse, "lead_event_delivery_attempts")
    # The slots the writer restamps in the same transaction: no recovery needs them.
    on_slots = TableLock(pg_warehouse, "lead_event_rate_slots", "EXCLUSIVE")
    try:
        # A 1 s request timeout: each lease is 12 s.
        with sending(pg_warehouse, sandbox, timeout=1.0, max_in_flight=2) as run:
            assert run.sender.lease_seconds == 12
            wait_for(lambda: seen() >= 6, 20, "6 requests", run)
            on_attempts.take()
            wait_for(lambda: len(refusals(caplog)) >= 2, 20, "the writer to try again", run)
            during = wait_until_steady(seen, 20, "the sender to stop sending", run)
            # The answers wait while the leases of their events run out.
            wait_for(lambda: _every_lease_ran_out(pg_warehouse), 25, "every lease to run out", run)
            # Still refused (now on the slots), while another sender recovers those leases: it audits
            # each request unknown and lets the event go.
            on_slots.take()
            on_attempts.release()
            recovered, deadline = 0, time.monotonic() + 15
            while _leases(pg_warehouse)[1]:
                assert time.monotonic() < deadline, "the leases were not recovered"
                recovered += claims.recover_abandoned(pg_warehouse.engine, "manual__another_run")
                time.sleep(0.05)
            assert recovered > 0 and _unknown(pg_warehouse) == recovered
            assert seen() == during and run.thread.is_alive()
            on_slots.release()
            run.thread.join(timeout=40)
    finally:
        on_attempts.release()
        on_slots.release()
    # The late answers replaced the rows audited unknown; the events are delivered, not sent again.
    assert_sent_once_and_audited(pg_warehouse, sandbox, run, total)
    assert_quiet_logs(caplog)


def test_past_write_retry_seconds_the_send_fails_with_the_warehouse_error(pg_warehouse, sandbox, caplog,
                                                                         monkeypatch):
    """Tried again for WRITE_RETRY_SECONDS (here 2 s) from the first refusal: then the error surfaces."""
    monkeypatch.setattr(writer, "WRITE_RETRY_SECONDS", 2.0)
    caplog.set_level(logging.INFO, logger="lead_sync")
    seed(pg_warehouse, 20)
    sandbox.set_faults({"rate_limit_per_minute": None, "latency_ms": 100})
    blip = TableLock(pg_warehouse, "lead_event_delivery_attempts")
    try:
        with sending(pg_warehouse, sandbox, max_in_flight=2) as run:
            wait_for(lambda: len(sandbox.requests()) >= 4, 20, "4 requests", run)
            blip.take()
            wait_for(lambda: refusals(caplog), 20, "the writer to try again", run)
            refused = time.monotonic()
            run.thread.join(timeout=20)
            ended = time.monotonic()
    finally:
        blip.release()
    assert not run.thread.is_alive()
    assert isinstance(run.error, OperationalError), repr(run.error)
    # The bound, then the answers on the wire and a last try on closing (with its lock timeout).
    assert ended - refused < 2.0 + 2.0
    assert len(refusals(caplog)) >= 2
    assert_quiet_logs(caplog)
