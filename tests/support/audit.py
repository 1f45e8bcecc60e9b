"""An event's audit as a test reads it: its row, its attempts, the body it is sent with while open."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import select, update

from lead_sync.db.schema import deliveries, outbox

from tests.support import Warehouse


def row(wh: Warehouse, cid: int, event: str = "signup_started") -> dict:
    return wh.deliveries()[(str(cid), event)]


def attempts_of(wh: Warehouse, cid: int, event: str = "signup_started") -> list[dict]:
    key = row(wh, cid, event)["event_key"]
    return [a for a in wh.attempts() if a["event_key"] == key]


def outbox_keys(wh: Warehouse) -> set[str]:
    with wh.engine.connect() as conn:
        return set(conn.execute(select(outbox.c.event_key)).scalars())


def outbox_body(wh: Warehouse, key: str) -> dict | None:
    """The body an open event is sent with (None once it is closed)."""
    with wh.engine.connect() as conn:
        body = conn.execute(select(outbox.c.body).where(outbox.c.event_key == key)).scalar()
    return None if body is None else json.loads(body)


def row_and_body(wh: Warehouse, cid: int) -> tuple[dict, dict | None]:
    found = row(wh, cid)
    return found, outbox_body(wh, found["event_key"])


def age_event(wh: Warehouse, cid: int, **hours: float) -> None:
    """Time passes for one event: move its retry clock and next try back by so many hours."""
    values = {column: datetime.now(timezone.utc) - timedelta(hours=h) for column, h in hours.items()}
    with wh.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.event_key == row(wh, cid)["event_key"]).values(**values))
