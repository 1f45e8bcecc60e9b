"""Sending in mapped batches: the plan, batches at once under one limit, a batch that never finished."""
from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import create_engine, select, update

from lead_sync import stages
from lead_sync.audit import runs
from lead_sync.clock import utcnow
from lead_sync.delivery import claims
from lead_sync.db.schema import deliveries, send_batches, sync_runs
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.delivery.policy import SendReport
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy
from lead_sync.db.engines import prepare_engine

from tests.support import TOKEN
from tests.support.audit import row
from tests.support.clock import FakeClock
from tests.support.seeding import DAY, seed, signup, verification
from tests.support.sending import sending, sent


def _batch_rows(wh, run_id: str) -> list[dict]:
    with wh.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(send_batches).where(send_batches.c.run_id == run_id).order_by(send_batches.c.batch)).mappings()]


def _send_batch(url, sandbox, run_id: str, batch: stages.Batch, per_minute: int | None = 600,
                budget: float = 30.0, host: str | None = None) -> SendReport:
    """One mapped send task: its own engine and client, as on a worker."""
    engine = prepare_engine(create_engine(url))
    try:
        with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2.0) as client:
            limiter = SharedRateLimiter(engine, "batch-bucket", per_minute)
            return stages.send_open_events(engine, client, limiter, RetryPolicy(3, 0.05, 0.5), run_id, budget,
                                             "cutmeshort_default", batch, host)
    finally:
        engine.dispose()


def test_a_few_events_are_one_batch_and_a_backlog_a_bounded_number(warehouse):
    run_id = seed(warehouse, *(signup(n, n) for n in range(1, 11)))
    assert stages.plan_send(warehouse.engine, run_id, 60, batch_size=500, max_batches=16) == [stages.Batch(0, 10)]
    assert stages.plan_send(warehouse.engine, run_id, 60, batch_size=3, max_batches=16) == [
        stages.Batch(n, 3) for n in range(4)]
    # A backlog larger than max_batches batches: still max_batches, each taking a larger share.
    assert stages.plan_send(warehouse.engine, run_id, 60, batch_size=1, max_batches=4) == [
        stages.Batch(n, 3) for n in range(4)]
    with warehouse.engine.connect() as conn:
        assert conn.execute(select(sync_runs.c.send_batches).where(sync_runs.c.run_id == run_id)).scalar() == 4


def test_event_twos_count_with_their_pending_event_one(warehouse):
    run_id = seed(warehouse, signup(1, deferred=True), verified=(verification(1),))
    assert stages.plan_send(warehouse.engine, run_id, 60, batch_size=1, max_batches=16) == [
        stages.Batch(0, 1), stages.Batch(1, 1)]


def test_nothing_open_plans_no_batch_and_the_run_succeeds(warehouse):
    run_id = seed(warehouse, {**signup(1), "click_id": None})  # skipped: nothing to send
    assert stages.plan_send(warehouse.engine, run_id, 60, batch_size=500, max_batches=16) == []
    summary = runs.summarise(warehouse.engine, run_id, DAY)
    assert (summary.outcome, summary.send_result) == ("success", runs.SEND_OK)


def test_batches_at_once_send_every_event_once_under_one_limit(warehouse, sandbox):
    run_id = seed(warehouse, *(signup(n, n) for n in range(1, 25)), signup(30, deferred=True),
                  verified=(verification(30),))
    batches = stages.plan_send(warehouse.engine, run_id, 60, batch_size=7, max_batches=16)
    assert len(batches) == 4
    sandbox.set_faults({"latency_ms": 20})
    reports, errors = {}, []

    def one(batch: stages.Batch) -> None:
        try:
            reports[batch.batch] = _send_batch(warehouse.url, sandbox, run_id, batch, host=f"worker-{batch.batch % 2}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(b,), daemon=True) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(reports) == 4, errors
    # Every event reached the API exactly once, event 2 after its event 1.
    assert len(sandbox.requests()) == 26 and {s for _, _, s in sent(sandbox)} == {200}
    order = [(c, e) for c, e, _ in sent(sandbox)]
    assert order.index(("30", "signup_started")) < order.index(("30", "email_verified"))
    assert warehouse.status_counts() == {"delivered": 26}
    # Each batch took at most its share (7), and the one that delivered customer 30's event 1 may have
    # taken its event 2 beyond it (it qualifies only once that delivery is committed).
    assert max(r.requests for r in reports.values()) <= 8 and sum(r.requests > 7 for r in reports.values()) <= 1
    assert sum(r.requests for r in reports.values()) == 26
    rows = _batch_rows(warehouse, run_id)
    assert [r["batch"] for r in rows] == [0, 1, 2, 3] and all(r["finished_at"] is not None for r in rows)
    assert sum(r["delivered"] for r in rows) == 26 and {r["host"] for r in rows} == {"worker-0", "worker-1"}
    summary = runs.summarise(warehouse.engine, run_id, DAY)
    assert (summary.outcome, summary.requests_sent, summary.counts) == ("success", 26, {"delivered": 26})


def test_a_batch_that_never_finished_fails_the_run_until_its_retry_does(warehouse, sandbox):
    run_id = seed(warehouse, *(signup(n, n) for n in range(1, 7)))
    first, second = stages.plan_send(warehouse.engine, run_id, 60, batch_size=3, max_batches=16)
    assert _send_batch(warehouse.url, sandbox, run_id, first).delivered == 3
    # The second batch's worker died at its start: its row says it started, not that it finished.
    runs.start_batch(warehouse.engine, run_id, second.batch, "worker-b")
    summary = runs.summarise(warehouse.engine, run_id, DAY)
    assert summary.outcome == "failed"
    assert summary.message.startswith("1 of 2 send batch(es) did not finish")
    assert summary.counts == {"delivered": 3, "pending": 3}
    # Airflow retries the batch: it sends the rest, nothing twice, and the summary is whole again.
    assert _send_batch(warehouse.url, sandbox, run_id, second, host="worker-a").delivered == 3
    assert len(sandbox.requests()) == 6
    summary = runs.summarise(warehouse.engine, run_id, DAY)
    assert (summary.outcome, summary.counts, summary.requests_sent) == ("success", {"delivered": 6}, 6)
    assert [(r["host"], r["tries"]) for r in _batch_rows(warehouse, run_id)] == [(None, 1), ("worker-a", 2)]


def test_the_run_row_keeps_the_worst_way_a_batch_ended(warehouse, sandbox):
    run_id = seed(warehouse, *(signup(n, n) for n in range(1, 5)))
    first, second = stages.plan_send(warehouse.engine, run_id, 60, batch_size=2, max_batches=16)
    # The first batch runs out of time (a budget of 0 s): the rest stays pending.
    assert _send_batch(warehouse.url, sandbox, run_id, first, budget=0).budget_exhausted
    assert _send_batch(warehouse.url, sandbox, run_id, second).delivered == 2
    with warehouse.engine.connect() as conn:
        result = conn.execute(select(sync_runs.c.send_result).where(sync_runs.c.run_id == run_id)).scalar()
    assert result == runs.SEND_BUDGET


def test_every_batch_stops_at_the_run_deadline(warehouse, sandbox):
    run_id = seed(warehouse, *(signup(n, n) for n in range(1, 5)))
    (batch,) = stages.plan_send(warehouse.engine, run_id, 60, batch_size=500, max_batches=16)
    with warehouse.engine.begin() as conn:  # the run's budget was used up by batches before this one
        conn.execute(update(sync_runs).where(sync_runs.c.run_id == run_id).values(
            send_deadline=utcnow()))
    report = _send_batch(warehouse.url, sandbox, run_id, batch, budget=600)
    assert report.budget_exhausted and report.requests == 0 and sandbox.requests() == []


def test_batches_of_one_run_share_its_attempts_of_an_event(warehouse, sandbox):
    """An event retried by one batch is held by it between tries: another batch of the same run
    starting meanwhile does not try it, so the run makes max_attempts attempts, not a set per batch."""
    run_id = seed(warehouse, *(signup(n, n) for n in range(1, 5)))
    first, second = stages.plan_send(warehouse.engine, run_id, 60, batch_size=2, max_batches=16)
    sandbox.set_faults({"permanent_errors": {"1": 500}})
    # The second batch starts while the first waits to retry customer 1.
    clock = FakeClock(on_sleep={1: lambda: _send_batch(warehouse.url, sandbox, run_id, second)})
    with sending(warehouse, sandbox, run_id, max_attempts=3, per_minute=600, bucket="batch-bucket",
                 clock=clock) as sender:
        sender.max_events = first.max_events
        sender.run()
    tried = [r for r in sandbox.requests() if r["body"]["customerExternalId"] == "1"]
    assert len(tried) == 3 and clock.sleeps
    assert warehouse.status_counts() == {"delivered": 3, "pending": 1}
    # Done with it, the batch let it go: a later run may take it when it is due.
    assert row(warehouse, 1)["inflight_until"] is None and row(warehouse, 1)["next_attempt_at"] is not None


def test_a_claim_takes_no_event_left_for_later(warehouse):
    """Due is checked when an event is claimed, not only when it is listed: another run may have
    tried it in between and left it open for later."""
    run_id = seed(warehouse, signup(1))
    key = row(warehouse, 1)["event_key"]
    later = utcnow() + timedelta(minutes=5)
    with warehouse.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.event_key == key).values(next_attempt_at=later))
    assert claims.claim_many(warehouse.engine, run_id, 60, utcnow(), new=1).claims == []
    assert claims.claim_many(warehouse.engine, run_id, 60, utcnow(), keys=[key]).claims == []
    assert claims.claim_many(warehouse.engine, run_id, 60, later, keys=[key], now=later).claims[0].attempt == 1
