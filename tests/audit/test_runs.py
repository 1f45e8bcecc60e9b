"""The run's bookkeeping (lead_sync.audit.runs) on SQLite and PostgreSQL: one row per run and per
send batch, however often Airflow starts their tasks again, and the run's row keeps the worst way
its sending ended."""
from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select

from lead_sync.audit import runs
from lead_sync.clock import as_utc, utcnow
from lead_sync.db.schema import send_batches, sync_runs
from lead_sync.db.stores import ensure_stores
from lead_sync.delivery.policy import SendReport

DAY = date(2026, 11, 27)
RUN = "manual__bookkeeping"
OTHER = "manual__another_run"


@pytest.fixture
def engine(warehouse):
    ensure_stores(warehouse.engine)
    return warehouse.engine


def run_rows(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["run_id"]: dict(r) for r in conn.execute(select(sync_runs)).mappings()}


def batch_rows(engine, run_id: str = RUN) -> dict[int, dict]:
    with engine.connect() as conn:
        return {r["batch"]: dict(r) for r in conn.execute(
            select(send_batches).where(send_batches.c.run_id == run_id)).mappings()}


def test_starting_a_run_twice_keeps_one_row_and_starts_it_over(engine):
    runs.start_run(engine, RUN, DAY, "lead_events_sync")
    runs.start_run(engine, OTHER, DAY, "lead_events_sync")
    first = run_rows(engine)[RUN]
    assert (first["outcome"], first["finished_at"], first["dry_run"]) == ("running", None, False)
    # The run ended badly; then its extraction is cleared and runs again, as a dry run this time.
    runs.set_send_result(engine, RUN, runs.SEND_CREDENTIALS, "credentials refused")
    runs.update_run(engine, RUN, finished_at=utcnow(), outcome="failed", would_send=7)
    other_before = run_rows(engine)[OTHER]
    runs.start_run(engine, RUN, DAY + timedelta(days=1), "lead_events_sync", dry_run=True)

    found = run_rows(engine)
    assert sorted(found) == sorted([RUN, OTHER])  # one row per run id
    again = found[RUN]
    assert again["outcome"] == "running" and again["finished_at"] is None
    assert again["send_result"] is None and again["message"] is None and again["would_send"] is None
    assert again["dry_run"] is True and again["partition_date"] == DAY + timedelta(days=1)
    assert as_utc(again["started_at"]) >= as_utc(first["started_at"])
    assert found[OTHER] == other_before  # another run's row is left as it was


def test_a_retried_batch_keeps_one_row_and_counts_its_tries(engine):
    runs.start_run(engine, RUN, DAY)
    runs.start_batch(engine, RUN, 0, "worker-a")
    runs.start_batch(engine, RUN, 1, "worker-b")
    runs.finish_batch(engine, RUN, 0, runs.SEND_OK, SendReport(requests=3, delivered=3))
    # Batch 1's worker died: Airflow retries the task on another worker.
    runs.start_batch(engine, RUN, 1, "worker-c")
    rows = batch_rows(engine)
    assert sorted(rows) == [0, 1]
    assert (rows[0]["tries"], rows[0]["host"], rows[0]["result"], rows[0]["delivered"]) == (
        1, "worker-a", runs.SEND_OK, 3)
    assert (rows[1]["tries"], rows[1]["host"], rows[1]["finished_at"]) == (2, "worker-c", None)
    runs.finish_batch(engine, RUN, 1, runs.SEND_BUDGET, SendReport(requests=2, delivered=1, left_open=1))
    assert batch_rows(engine)[1]["finished_at"] is not None
    # Cleared after it finished, the batch starts over: not finished, no result, one more try.
    runs.start_batch(engine, RUN, 1, "worker-a")
    again = batch_rows(engine)[1]
    assert (again["tries"], again["host"], again["finished_at"], again["result"]) == (3, "worker-a", None, None)
    assert batch_rows(engine)[0]["tries"] == 1  # the other batch is left as it was


def test_the_run_keeps_the_worst_way_its_batches_ended(engine):
    """Credentials refused is worse than a time budget used up, which is worse than complete."""
    runs.start_run(engine, RUN, DAY)
    runs.start_run(engine, OTHER, DAY)

    def result() -> tuple[str | None, str | None]:
        row = run_rows(engine)[RUN]
        return row["send_result"], row["message"]

    runs.set_send_result(engine, RUN, runs.SEND_OK, None)
    assert result() == (runs.SEND_OK, None)
    runs.set_send_result(engine, RUN, runs.SEND_BUDGET, "time budget used up")
    assert result() == (runs.SEND_BUDGET, "time budget used up")
    runs.set_send_result(engine, RUN, runs.SEND_OK, None)  # a later batch that completed
    assert result() == (runs.SEND_BUDGET, "time budget used up")
    runs.set_send_result(engine, RUN, runs.SEND_CREDENTIALS, "refused: check cutmeshort_default")
    assert result() == (runs.SEND_CREDENTIALS, "refused: check cutmeshort_default")
    runs.set_send_result(engine, RUN, runs.SEND_BUDGET, "time budget used up")
    runs.set_send_result(engine, RUN, runs.SEND_OK, None)
    assert result() == (runs.SEND_CREDENTIALS, "refused: check cutmeshort_default")
    assert run_rows(engine)[OTHER]["send_result"] is None  # by run: another run's row is untouched
