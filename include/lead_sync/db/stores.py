"""Where the pipeline keeps what: the warehouse, and optionally a separate state store.

By default the warehouse holds everything: the sources, the delivery state (which is also the
audit), the outbox and the rate-limit window. With a state store (a PostgreSQL connection,
`lead_sync_state`), the state, the outbox and the rate-limit window live there, and the
warehouse only gets reads of its sources and batched copies of the audit tables
(`publish.publish_audit`), so that a warehouse where each transaction is slow or billed (or
that has no row locks) is not written once per event.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Engine

from lead_sync.db.engines import prepare_engine
from lead_sync.db.locks import lock_for_transaction
from lead_sync.db.schema import AUDIT_TABLES, SQL_DIR, ensure_schema


class StateStoreError(ValueError):
    """The state store connection cannot be used."""


@dataclass(frozen=True)
class Stores:
    warehouse: Engine  # the sources, and the audit tables auditors read
    state: Engine  # delivery state, outbox, rate-limit window: the warehouse itself unless separate

    @property
    def separate(self) -> bool:
        return self.state is not self.warehouse


def as_stores(engine: Engine | Stores) -> Stores:
    """The pipeline's stages take a warehouse engine (state kept there) or both stores."""
    return engine if isinstance(engine, Stores) else Stores(prepare_engine(engine), engine)


def _server_database(engine: Engine) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(text(
            "SELECT current_database(), inet_server_addr()::text, inet_server_port()")).one())


def open_stores(warehouse: Engine, state: Engine | None, state_name: str = "lead_sync_state") -> Stores:
    """Both stores, checked; without a state engine the warehouse keeps the state."""
    prepare_engine(warehouse)
    if state is None:
        return Stores(warehouse, warehouse)
    if state.dialect.name != "postgresql":
        raise StateStoreError(f"connection {state_name!r} must be a PostgreSQL database (it is "
                              f"{state.dialect.name}); remove it to keep the delivery state in the warehouse")
    if warehouse.dialect.name == "postgresql" and _server_database(warehouse) == _server_database(state):
        raise StateStoreError(f"connection {state_name!r} is the warehouse's own database; point it at another "
                              "database, or remove it to keep the delivery state in the warehouse")
    return Stores(warehouse, state)


def ensure_stores(stores: Engine | Stores) -> None:
    """Create what is missing: every table in the state store (with its change marks when it is
    separate), and the audit tables and views in the warehouse. Each task calls it once, before
    its stage; it only reads the catalogs when everything is there already."""
    stores = as_stores(stores)
    ensure_schema(stores.state)
    if not stores.separate:
        return
    ensure_schema(stores.warehouse, tables=AUDIT_TABLES)
    # Only when some mark is missing: CREATE OR REPLACE TRIGGER locks its table against the
    # senders writing it. (A change to state_store.sql must also change what _marked checks.)
    if _marked(stores.state):
        return
    per_table = (SQL_DIR / "state_store_table.sql").read_text(encoding="utf-8")
    with stores.state.begin() as conn:
        # One creator at a time: CREATE OR REPLACE of one trigger by two sessions can collide.
        lock_for_transaction(conn, "lead_sync_state_schema")
        conn.exec_driver_sql((SQL_DIR / "state_store.sql").read_text(encoding="utf-8"))
        for table in AUDIT_TABLES:
            conn.exec_driver_sql(per_table.replace("{table}", table.name))


def _marked(state: Engine) -> bool:
    """Whether every audit table of the state store has its change marks: the two columns, the
    index of unpublished rows and the trigger (see sql/state_store_table.sql)."""
    names = [t.name for t in AUDIT_TABLES]
    with state.connect() as conn:
        return bool(conn.execute(text(
            "SELECT (SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            "         WHERE c.relname = ANY(:tables) AND pg_table_is_visible(c.oid) AND NOT a.attisdropped"
            "           AND a.attname IN ('audit_seq', 'published_seq')) = 2 * :n"
            "   AND (SELECT count(*) FROM pg_class i"
            "         WHERE i.relname = ANY(:indexes) AND i.relkind = 'i' AND pg_table_is_visible(i.oid)) = :n"
            "   AND (SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            "         WHERE c.relname = ANY(:tables) AND pg_table_is_visible(c.oid)"
            "           AND t.tgname = c.relname || '_changed') = :n"),
            {"tables": names, "indexes": [f"ix_{n}_unpublished" for n in names], "n": len(names)}).scalar())
