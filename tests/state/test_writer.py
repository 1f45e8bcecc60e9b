"""Recording as a pipeline: the writer commits batches in order, one transaction each, and a failed
one stops the rest; the read of the next batch runs while this one is decided."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, select

from lead_sync.state.writer import Writer, read_ahead

metadata = MetaData()
written = Table("written", metadata, Column("n", Integer, primary_key=True))


def put(n: int):
    def write(conn) -> None:
        conn.execute(insert(written).values(n=n))
    return write


def on_record(engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(select(written.c.n).order_by(written.c.n)).scalars())


def test_the_writer_commits_each_batch_in_order_and_flush_waits_for_them(warehouse):
    engine = warehouse.engine
    metadata.create_all(engine)
    writer = Writer(engine)
    assert writer.threaded == (engine.dialect.name == "postgresql")  # SQLite: one writer at a time, in process
    order = []
    try:
        for n in range(5):
            writer.submit(put(n))
            writer.submit(lambda conn, n=n: order.append(n))
        writer.flush()
        assert on_record(engine) == list(range(5)) and order == list(range(5))
    finally:
        writer.close()


def test_a_failed_batch_is_raised_by_the_next_call_and_nothing_after_it_is_written(warehouse):
    engine = warehouse.engine
    metadata.create_all(engine)
    writer = Writer(engine)

    def fails(conn) -> None:
        conn.execute(insert(written).values(n=10))
        raise RuntimeError("disk full")

    try:
        writer.submit(put(1))
        with pytest.raises(RuntimeError, match="disk full"):
            writer.submit(fails)
            writer.submit(put(2))  # threaded: the failure may be known only now
            writer.flush()
        if writer.threaded:
            writer.submit(put(3))  # after the error was raised, the writer takes batches again
            writer.flush()
    finally:
        writer.close()
    assert on_record(engine) == ([1, 3] if writer.threaded else [1])  # the failed batch's row rolled back


def test_read_ahead_pairs_each_item_with_its_read_in_order():
    items = list(range(6))
    assert list(read_ahead(iter(items), lambda n: n * n, threaded=False)) == [(n, n * n) for n in items]
    assert list(read_ahead(iter(items), lambda n: n * n, threaded=True)) == [(n, n * n) for n in items]


def test_threaded_the_next_item_is_read_while_the_caller_works_on_this_one():
    started = {n: threading.Event() for n in range(3)}

    def read(n: int) -> int:
        started[n].set()
        return n

    for item, _ in read_ahead(iter(range(3)), read, threaded=True):
        if item < 2:  # the read of the next item started before the caller is done with this one
            assert started[item + 1].wait(5)
