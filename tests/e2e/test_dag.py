"""The DAG through Airflow against real warehouses and the sandbox as a real HTTP server."""
from __future__ import annotations

from datetime import datetime

import pytest
from cutmeshort.models.lead_payload import LeadPayload

from tests.support.dagrun import run_dag
from tests.support import signups, verifications, write_sources
from tests.support.seeding import seed_basic

pytestmark = pytest.mark.usefixtures("airflow_db")


def T(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_partition_sync_end_to_end(warehouse, sandbox):
    seed_basic(warehouse)
    assert run_dag(warehouse, sandbox.url) == "success"  # manual run for 2026-11-28 syncs 2026-11-27

    leads = sandbox.leads()
    bodies = [{k: v for k, v in lead.items() if k != "received_at"} for lead in leads]
    assert bodies == [
        {"eventName": "signup_started", "customerExternalId": "1", "clickId": "c1",
         "timestamp": "2026-11-27T08:00:00Z", "customerName": "Ann", "customerEmail": "ann@example.com"},
        {"eventName": "signup_started", "customerExternalId": "2", "clickId": "c2", "mode": "deferred",
         "timestamp": "2026-11-27T09:00:00Z", "customerName": "Bob",
         "customerAvatar": "https://img.example.com/b.png"},
        {"eventName": "email_verified", "customerExternalId": "2", "timestamp": "2026-11-27T09:05:00Z"},
    ]
    for body in bodies:
        LeadPayload.model_validate(body)

    audit = warehouse.deliveries()
    assert audit[("1", "signup_started")]["status"] == "delivered"
    assert audit[("1", "signup_started")]["tracking"] == "non_deferred"
    assert audit[("2", "signup_started")]["tracking"] == "deferred_start"
    assert "customerEmail left out" in audit[("2", "signup_started")]["notes"]
    assert audit[("2", "email_verified")]["tracking"] == "deferred_confirm"
    assert audit[("2", "email_verified")]["status"] == "delivered"
    assert audit[("3", "signup_started")]["status"] == "skipped"
    assert audit[("3", "signup_started")]["reason"] == "no click_id"
    assert audit[("1", "email_verified")]["status"] == "skipped"
    assert "non-deferred" in audit[("1", "email_verified")]["reason"]
    assert ("4", "signup_started") not in audit  # another partition
    # PII: hashed in the audit payload, the token nowhere
    ann = audit[("1", "signup_started")]
    assert "ann@example.com" not in ann["payload"] and "Ann\"" not in ann["payload"]
    assert "sha256:" in ann["payload"]
    attempts = warehouse.attempts()
    assert len(attempts) == 3 and all(a["http_status"] == 200 for a in attempts)
    (run,) = warehouse.runs()
    assert (run["outcome"], run["delivered"], run["skipped"], run["requests_sent"]) == ("success", 3, 2, 3)

    # A second run of the same partition sends nothing.
    assert run_dag(warehouse, sandbox.url) == "success"
    assert len(sandbox.requests()) == 3


def test_partition_date_conf_and_event_two_in_a_later_run(warehouse, sandbox, tmp_path):
    no_lookback = write_sources(tmp_path, lookback_days=0)  # so that the 29th's run leaves the 28th alone
    seed_basic(warehouse)
    warehouse.add(verifications, dict(customer_external_id="4", event_name="email_verified",
                                      verified_at=T("2026-11-28 11:00:00+00:00")))
    warehouse.add(signups, dict(customer_external_id=5, click_id="c5", customer_name=None, customer_email=None,
                                customer_avatar=None, signed_up_at=T("2026-11-28 23:59:59"),
                                requires_verification=True))
    warehouse.add(verifications, dict(customer_external_id="5", event_name="phone_verified",
                                      verified_at=T("2026-11-29 00:01:00+00:00")))
    # Verification day first (out of order): event 2 of customer 5 must wait for its event 1.
    assert run_dag(warehouse, sandbox.url, logical_date=None, conf={"partition_date": "2026-11-29"},
                   sources=no_lookback) == "success"
    assert sandbox.leads() == []
    waiting = warehouse.deliveries()[("5", "phone_verified")]
    assert waiting["status"] == "pending" and "waiting for event 1" in waiting["reason"]

    assert run_dag(warehouse, sandbox.url, conf={"partition_date": "2026-11-28"}, sources=no_lookback) == "success"
    sent = [(l["customerExternalId"], l["eventName"]) for l in sandbox.leads()]
    assert sent == [("4", "signup_started"), ("5", "signup_started"), ("5", "phone_verified")]
    audit = warehouse.deliveries()
    assert audit[("5", "phone_verified")]["status"] == "delivered"
    assert audit[("5", "phone_verified")]["partition_date"].isoformat() == "2026-11-29"
    assert audit[("4", "email_verified")]["status"] == "skipped"  # 4 was non-deferred
