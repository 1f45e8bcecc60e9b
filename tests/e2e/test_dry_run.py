"""Dry run (conf {"dry_run": true}) through Airflow: reads and maps as a real run, sends nothing,
changes no event, records what it would send; a real run right after sends exactly that."""
from __future__ import annotations

import json
from datetime import datetime

import pytest
from sqlalchemy import select

from tests.support.dagrun import run_dag
from lead_sync.db.schema import dry_run_events
from tests.support import signups, verifications

pytestmark = pytest.mark.usefixtures("airflow_db")


def signup(cid, day=27, click="c", deferred=False, name=None, email=None):
    return dict(customer_external_id=cid, click_id=None if click is None else f"{click}{cid}", customer_name=name,
                customer_email=email, customer_avatar=None, signed_up_at=datetime(2026, 11, day, 8, cid),
                requires_verification=deferred)


def verification(cid, day=27):
    return dict(customer_external_id=str(cid), event_name="email_verified",
                verified_at=datetime.fromisoformat(f"2026-11-{day} 09:{cid:02d}:00+00:00"))


def sent(sandbox) -> list[tuple[str, str]]:
    return [(r["body"]["customerExternalId"], r["body"]["eventName"]) for r in sandbox.requests()]


def test_dry_run_changes_nothing_and_lists_exactly_what_the_real_run_sends(warehouse, sandbox):
    warehouse.create_sources()
    warehouse.add(signups, signup(1), signup(2, deferred=True), signup(3, click=None), signup(4))
    warehouse.add(verifications, verification(2))
    sandbox.set_faults({"permanent_errors": {"4": 422}})
    assert run_dag(warehouse, sandbox.url, conf={"partition_date": "2026-11-27"}) == "success"
    before_requests = len(sandbox.requests())
    # New rows: a late row of the 27th, a deferred signup of the 28th with its verification,
    # a verification whose signup is not on record, a customer with a distinctive name and e-mail.
    warehouse.add(signups, signup(5), signup(6, day=28, deferred=True),
                  signup(8, day=28, name="Zelda Quuxley", email="zelda.quux@example.org"))
    warehouse.add(verifications, verification(6, day=28), verification(7, day=28))
    audit_before = warehouse.deliveries()

    assert run_dag(warehouse, sandbox.url, conf={"partition_date": "2026-11-28", "dry_run": True}) == "success"
    assert len(sandbox.requests()) == before_requests  # nothing sent
    assert warehouse.deliveries() == audit_before  # no event changed, none added
    dry = next(r for r in warehouse.runs() if r["dry_run"])
    assert (dry["outcome"], dry["send_result"], dry["requests_sent"]) == ("success", "dry_run", 0)
    with warehouse.engine.connect() as conn:
        listed = [dict(r) for r in conn.execute(select(dry_run_events).where(
            dry_run_events.c.run_id == dry["run_id"])).mappings()]
    would = {(r["customer_external_id"], r["event_name"]) for r in listed if r["would_send"]}
    assert would == {("5", "signup_started"), ("6", "signup_started"), ("6", "email_verified"),
                     ("8", "signup_started")}
    assert dry["would_send"] == 4
    waiting = next(r for r in listed if r["customer_external_id"] == "7")
    assert (waiting["status"], waiting["would_send"]) == ("pending", False)
    assert "waiting for event 1" in waiting["reason"]
    zelda = next(r for r in listed if r["customer_external_id"] == "8")
    assert "zelda" not in zelda["payload"].lower() and "sha256:" in json.loads(zelda["payload"])["customerName"]

    # The real run right after sends exactly the events the dry run listed.
    assert run_dag(warehouse, sandbox.url, conf={"partition_date": "2026-11-28"}) == "success"
    assert set(sent(sandbox)[before_requests:]) == would
    assert len(sandbox.requests()) == before_requests + len(would)
