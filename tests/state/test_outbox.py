"""The outbox of bodies to send, on real warehouses: bodies put in place of any, bodies added for
keys read without one (a key that has one after all is still given the new body), bodies dropped."""
from __future__ import annotations

from sqlalchemy import select

from lead_sync.db.keys import CHUNK
from lead_sync.db.schema import ensure_schema, outbox
from lead_sync.state.outbox import add_bodies, drop_bodies, put_bodies


def bodies(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(outbox.c.event_key, outbox.c.body)).all())


def test_put_replaces_a_body_and_adds_the_others(warehouse):
    engine = warehouse.engine
    ensure_schema(engine)
    with engine.begin() as conn:
        put_bodies(conn, {"a": "a1", "b": "b1"})
    with engine.begin() as conn:
        put_bodies(conn, {"b": "b2", "c": "c1"})
    assert bodies(engine) == {"a": "a1", "b": "b2", "c": "c1"}


def test_added_bodies_go_in_and_one_whose_key_has_a_body_replaces_it(warehouse):
    engine = warehouse.engine
    ensure_schema(engine)
    with engine.begin() as conn:
        put_bodies(conn, {"left": "old"})
    with engine.begin() as conn:
        add_bodies(conn, {"new": "n1", "tab\there": "line\nbreak \\ backslash"})
    with engine.begin() as conn:
        put_bodies(conn, {"same transaction": "kept"})  # what the transaction wrote before stays
        add_bodies(conn, {"left": "new", "other": "o1"})
    assert bodies(engine) == {"left": "new", "new": "n1", "tab\there": "line\nbreak \\ backslash",
                              "same transaction": "kept", "other": "o1"}


def test_dropping_bodies_deletes_those_of_these_keys_only(warehouse):
    engine = warehouse.engine
    ensure_schema(engine)
    keys = [f"k{n:05}" for n in range(2 * CHUNK + 3)]  # more than one IN list
    with engine.begin() as conn:
        add_bodies(conn, {key: "b" for key in keys})
    with engine.begin() as conn:
        drop_bodies(conn, keys[1:] + ["absent"])
        drop_bodies(conn, [])
    assert bodies(engine) == {keys[0]: "b"}
