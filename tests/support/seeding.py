"""Source rows for a warehouse, and the seeded partition read through the pipeline's own extract stage."""
from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from lead_sync import stages
from lead_sync.db.stores import ensure_stores
from lead_sync.read.config import load_config
from lead_sync.read.partition import Partition

from tests.support import Warehouse, signups, verifications

DAY = date(2026, 11, 27)
PARTITION = Partition(DAY, ZoneInfo("UTC"))
NEXT_DAY = Partition(PARTITION.day + timedelta(days=1), PARTITION.zone)  # its run re-reads PARTITION as open
_runs = itertools.count(1)


def new_run_id() -> str:
    return f"manual__test_{next(_runs)}"


# --- one partition, through the extract stage -------------------------------------------------

def signup(cid: int, minute: int = 0, *, deferred: bool = False, name: str | None = None,
           email: str | None = None) -> dict:
    """A signups row on DAY."""
    return dict(customer_external_id=cid, click_id=f"click-{cid}", customer_name=name, customer_email=email,
                customer_avatar=None, signed_up_at=datetime(2026, 11, 27, 8, minute),
                requires_verification=deferred)


def verification(cid: int, minute: int = 30, event: str = "email_verified") -> dict:
    """A verifications row on DAY."""
    return dict(customer_external_id=str(cid), event_name=event,
                verified_at=datetime.fromisoformat(f"2026-11-27 09:{minute:02d}:00+00:00"))


def seed(wh: Warehouse, *rows: dict, verified: tuple[dict, ...] = ()) -> str:
    """Source rows in, stages.extract_and_map over them; returns the run id it used."""
    ensure_stores(wh.engine)  # as each task does before its stage
    wh.create_sources()
    if rows:
        wh.add(signups, *rows)
    if verified:
        wh.add(verifications, *verified)
    run_id = new_run_id()
    summary = stages.extract_and_map(wh.engine, load_config(), PARTITION, run_id)
    assert summary["new"] == len(rows) + len(verified)
    return run_id


def rerun(wh: Warehouse, day: Partition = PARTITION) -> dict:
    """stages.extract_and_map of `day` (the seeded partition, or a later one that re-reads it as open)."""
    ensure_stores(wh.engine)  # as each task does before its stage
    return stages.extract_and_map(wh.engine, load_config(), day, new_run_id())


def rename(wh: Warehouse, note: str) -> None:
    """Every signup's source row changes (its name, so its payload): a rerun wants to rewrite each open event."""
    wh.execute(f"UPDATE signups SET customer_name = 'Name {note} ' || customer_external_id")


# --- source rows for runs through Airflow ---------------------------------------------------

def seed_basic(wh: Warehouse) -> None:
    """Four signups around 2026-11-27 (one deferred, one without a click_id, one on the 28th) and
    two verifications (one of a non-deferred signup)."""
    at = datetime.fromisoformat
    wh.create_sources()
    wh.add(signups,
           dict(customer_external_id=1, click_id="c1", customer_name="Ann", customer_email="ann@example.com",
                customer_avatar=None, signed_up_at=at("2026-11-27 08:00:00"), requires_verification=False),
           dict(customer_external_id=2, click_id=" c2 ", customer_name="Bob", customer_email="nope",
                customer_avatar="https://img.example.com/b.png", signed_up_at=at("2026-11-27 09:00:00"),
                requires_verification=True),
           dict(customer_external_id=3, click_id=None, customer_name="Cy", customer_email=None, customer_avatar=None,
                signed_up_at=at("2026-11-27 10:00:00"), requires_verification=None),
           dict(customer_external_id=4, click_id="c4", customer_name=None, customer_email=None, customer_avatar=None,
                signed_up_at=at("2026-11-28 10:00:00"), requires_verification=False))
    wh.add(verifications,
           dict(customer_external_id=" 2 ", event_name="email_verified", verified_at=at("2026-11-27 09:05:00+00:00")),
           dict(customer_external_id="1", event_name="email_verified", verified_at=at("2026-11-27 09:06:00+00:00")))


def seed_day(wh: Warehouse, day: str, count: int, first_id: int = 1, deferred_every: int = 3) -> int:
    """`count` signups on `day`, every `deferred_every`-th deferred and verified; returns deliverable events."""
    wh.create_sources()
    start = datetime.fromisoformat(day)
    rows, checks = [], []
    for n in range(count):
        cid = first_id + n
        deferred = deferred_every and n % deferred_every == 0
        at = start + timedelta(minutes=7 * n + 1)
        rows.append(dict(customer_external_id=cid, click_id=f"clk{cid}", customer_name=f"Name {cid}",
                         customer_email=f"u{cid}@example.com", customer_avatar=None, signed_up_at=at,
                         requires_verification=bool(deferred)))
        if deferred:
            checks.append(dict(customer_external_id=str(cid), event_name="email_verified",
                               verified_at=(at + timedelta(minutes=2)).isoformat() + "+00:00"))
    wh.add(signups, *rows)
    if checks:
        wh.add(verifications, *checks)
    return len(rows) + len(checks)


def seed_backlog(wh: Warehouse, day: str, count: int, first_id: int) -> None:
    """`count` non-deferred signups, all inside one day (40 s apart)."""
    wh.create_sources()
    start = datetime.fromisoformat(day)
    wh.add(signups, *[dict(customer_external_id=first_id + n, click_id=f"clk{first_id + n}",
                           customer_name=f"Name {first_id + n}", customer_email=f"u{first_id + n}@example.com",
                           customer_avatar=None, signed_up_at=start + timedelta(seconds=20 + 40 * n),
                           requires_verification=False) for n in range(count)])
