"""PostgreSQL's advisory lock (locks.lock_for_transaction): one holder at a time, until its transaction ends."""
from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from lead_sync.db.locks import lock_for_transaction


def _waits_for(engine, name: str) -> bool:
    """Whether taking the lock `name` in another session has to wait (given up after a tenth of a second)."""
    with engine.connect() as other:
        other.execute(text("SET lock_timeout = '100ms'"))
        try:
            lock_for_transaction(other, name)
        except OperationalError:
            return True
        other.rollback()
        return False


def test_a_lock_is_held_until_its_transaction_ends_and_only_against_its_own_name(pg_warehouse):
    engine = pg_warehouse.engine
    with engine.connect() as holder:
        lock_for_transaction(holder, "lead_sync_test_lock")
        assert _waits_for(engine, "lead_sync_test_lock")
        assert not _waits_for(engine, "lead_sync_other_lock")
        holder.commit()
        assert not _waits_for(engine, "lead_sync_test_lock")


def test_a_lock_is_given_up_with_a_rolled_back_transaction(pg_warehouse):
    engine = pg_warehouse.engine
    with engine.connect() as holder:
        lock_for_transaction(holder, "lead_sync_test_lock")
        holder.rollback()
        assert not _waits_for(engine, "lead_sync_test_lock")
