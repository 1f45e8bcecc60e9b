"""The auditors' views: every source row of a partition accounted for, per day and per reason."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from sqlalchemy import text, update

from lead_sync import stages
from lead_sync.audit import runs
from lead_sync.db.stores import ensure_stores
from lead_sync.db.schema import deliveries
from lead_sync.read.config import load_config
from lead_sync.read.partition import Partition
from lead_sync.delivery.settings import ApiSettings, ApiTarget
from tests.support import TOKEN, signups, verifications

DAY = date(2026, 11, 27)


def signup(cid, minute=0, click="c", deferred=False, day=27):
    return dict(customer_external_id=cid, click_id=None if click is None else f"{click}{cid}", customer_name=None,
                customer_email=None, customer_avatar=None, signed_up_at=datetime(2026, 11, day, 8, minute),
                requires_verification=deferred)


def verification(cid, minute=30):
    return dict(customer_external_id=str(cid), event_name="email_verified",
                verified_at=datetime.fromisoformat(f"2026-11-27 09:{minute:02d}:00+00:00"))


def view(wh, name: str, **where) -> list[dict]:
    clause = " AND ".join(f"{k} = :{k}" for k in where) or "1 = 1"
    with wh.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(f"SELECT * FROM {name} WHERE {clause}"), where).mappings()]


def run(wh, sandbox, day: date, run_id: str, config) -> None:
    ensure_stores(wh.engine)  # as each task does before its stage
    stages.extract_and_map(wh.engine, config, Partition(day, config.zone), run_id)
    api = ApiTarget(sandbox.url, TOKEN, ApiSettings(max_attempts=1, backoff_base_seconds=0.01, timeout_seconds=2))
    stages.send(wh.engine, api, run_id, 30)
    runs.summarise(wh.engine, run_id, day)


def test_every_source_row_is_accounted_for(warehouse, sandbox):
    config = load_config()
    warehouse.create_sources()
    warehouse.add(signups,
                  signup(1), signup(1, minute=5),          # delivered, and a repeat of it
                  signup(2), signup(3),                    # rejected (422); failed (500 until it gives up)
                  signup(4, click=None),                   # skipped: no click_id
                  dict(signup(5), customer_external_id=None),  # skipped: no customer id
                  signup(6, deferred=True))                # deferred event 1, delivered
    warehouse.add(verifications,
                  verification(6),                         # event 2, delivered
                  verification(1),                         # skipped: the signup was non-deferred
                  verification(99),                        # pending: waiting for its event 1
                  dict(verification(98), customer_external_id="98\x01"))  # skipped: control characters
    sandbox.set_faults({"permanent_errors": {"2": 422, "3": 500}})
    run(warehouse, sandbox, DAY, "run_1", config)
    # Customer 3 has been retried for 73 h: the next run gives up on it.
    with warehouse.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.customer_external_id == "3").values(
            retry_since=datetime.now(timezone.utc) - timedelta(hours=73), next_attempt_at=None))
    # A row of the 27th loaded late, found by the next day's look-back.
    warehouse.add(signups, signup(7, minute=40))
    warehouse.add(signups, signup(8, day=28))
    run(warehouse, sandbox, DAY + timedelta(days=1), "run_2", config)

    (sign,) = view(warehouse, "lead_event_reconciliation", partition_date=DAY, source="signups")
    assert sign["read_by_run"] == "run_2"  # the look-back read: all of the day's rows, new ones recorded
    assert {k: sign[k] for k in ("source_rows", "delivered", "rejected", "failed", "skipped", "pending", "repeat",
                                 "no_longer_in_source", "unaccounted")} == dict(
        source_rows=8, delivered=3, rejected=1, failed=1, skipped=2, pending=0, repeat=1, no_longer_in_source=0,
        unaccounted=0)
    (checks,) = view(warehouse, "lead_event_reconciliation", partition_date=DAY, source="verifications")
    assert {k: checks[k] for k in ("source_rows", "delivered", "skipped", "pending", "repeat", "unaccounted")} == dict(
        source_rows=4, delivered=1, skipped=2, pending=1, repeat=0, unaccounted=0)
    (next_day,) = view(warehouse, "lead_event_reconciliation", partition_date=DAY + timedelta(days=1),
                       source="signups")
    assert (next_day["source_rows"], next_day["delivered"], next_day["unaccounted"]) == (1, 1, 0)

    daily = {(r["source"], r["event_name"], r["status"]): r for r in view(warehouse, "lead_event_daily",
                                                                         partition_date=DAY)}
    assert daily[("signups", "signup_started", "delivered")]["events"] == 3
    assert daily[("signups", "signup_started", "failed")]["requests"] == 2  # one per run, max_attempts 1
    assert daily[("signups", "signup_started", "rejected")]["requests"] == 1
    errors = {(r["http_status"], r["reason"].split(":")[0]): r for r in view(warehouse, "lead_event_errors",
                                                                            partition_date=DAY)}
    assert errors[(422, "rejected by the API")]["events"] == 1
    assert errors[(500, "gave up after 73.0 h of retries (2 attempts; give_up_after_hours is 72)")]["events"] == 1
    assert errors[(None, "no click_id")]["example_event_key"].startswith("ev_")
    assert not any(r["status"] == "delivered" for r in view(warehouse, "lead_event_daily") if r["events"] == 0)

    # A row deleted after its event was recorded: shown, and still accounted for. And event 2
    # of customer 99 has waited 8 days for an event 1 that never came: skipped.
    warehouse.execute("DELETE FROM signups WHERE customer_external_id = 4")
    with warehouse.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.customer_external_id == "99").values(
            created_at=datetime.now(timezone.utc) - timedelta(days=8)))
    stages.extract_and_map(warehouse.engine, config, Partition(DAY, config.zone), "run_3")  # re-opens 3 too
    (sign,) = view(warehouse, "lead_event_reconciliation", partition_date=DAY, source="signups")
    assert (sign["source_rows"], sign["no_longer_in_source"], sign["skipped"], sign["unaccounted"]) == (7, 1, 2, 0)
    assert (sign["failed"], sign["pending"]) == (0, 1)  # a run of the day re-opened what gave up
    (checks,) = view(warehouse, "lead_event_reconciliation", partition_date=DAY, source="verifications")
    assert (checks["source_rows"], checks["skipped"], checks["pending"], checks["unaccounted"]) == (4, 3, 0, 0)
    reasons = {r["reason"] for r in view(warehouse, "lead_event_errors", partition_date=DAY) if r["http_status"] is None}
    assert {"no click_id", "no customer id", "customer id contains control characters",
            "the customer's signup was non-deferred: no event 1 to confirm",
            "event 1 not delivered after 7 days of waiting (event 1: not on record)"} <= reasons
