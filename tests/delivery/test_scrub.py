"""No secret and no customer value leaves through what an API quotes back: a sandbox that echoes
the token and the body in other spellings, through the send stage, the audit and the summary."""
from __future__ import annotations

import logging
from datetime import date, datetime
from urllib.parse import quote

import pytest
from sqlalchemy import inspect, text

from cutmeshort_sandbox import SandboxServer
from lead_sync import stages
from lead_sync.audit import runs
from lead_sync.db.stores import ensure_stores
from lead_sync.read.config import load_config
from lead_sync.delivery.policy import CredentialsRefused
from lead_sync.read.partition import Partition
from lead_sync.delivery.settings import ApiSettings, ApiTarget

from tests.support import signups

DAY = date(2026, 11, 27)
TOKEN = "sk_live/4f+Zq9/Tt=="  # base64-like: JSON encoders that escape '/' write it differently
CUSTOMERS = {
    1: ("Erika Mustermann", "erika.mustermann@example.org"),
    2: ("J\u00fcrgen M\u00fcller", "j\u00fcrgen@b\u00fccher.de"),
    3: ("Zo\u00eb Quint", "zoe.quint@example.com"),
    4: ("Ana Lima", "ana.lima@example.net"),  # sent when the token is refused
}


def forbidden() -> list[str]:
    token = [TOKEN, TOKEN.replace("/", "\\/"), quote(TOKEN, safe=""), quote(TOKEN, safe="").lower()]
    pii = []
    for name, email in CUSTOMERS.values():
        local, _, domain = email.rpartition("@")
        pii += [name, email, local, name.split()[0], f"{local}@{domain.encode('idna').decode()}"]
    return token + [value.lower() for value in pii]


def assert_clean(text_: str, where: str) -> None:
    lowered = text_.lower()
    for value in forbidden():
        assert value not in text_ and value.lower() not in lowered, f"{value!r} in {where}"


def audit_text(engine) -> dict[str, str]:
    """Every table of ours but the outbox (bodies still to send hold the customer values by design)."""
    found = {}
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            if table.startswith("lead_event") and table != "lead_event_outbox":
                rows = conn.execute(text(f"SELECT * FROM {table}")).all()
                found[table] = "\n".join(" | ".join(str(v) for v in row) for row in rows)
    return found


@pytest.fixture
def echoing():
    with SandboxServer(token=TOKEN, rate_limit_per_minute=None, faults={"echo": True}) as server:
        yield server


def test_an_echoing_api_leaks_no_token_or_customer_value(warehouse, echoing, caplog):
    caplog.set_level(logging.DEBUG)
    ensure_stores(warehouse.engine)  # as each task does before its stage
    warehouse.create_sources()
    warehouse.add(signups, *[dict(customer_external_id=cid, click_id=f"c{cid}", customer_name=name,
                                  customer_email=email, customer_avatar=None,
                                  signed_up_at=datetime(2026, 11, 27, 8, cid), requires_verification=False)
                             for cid, (name, email) in CUSTOMERS.items() if cid < 4])
    config = load_config()
    stages.extract_and_map(warehouse.engine, config, Partition(DAY, config.zone), "run_1")
    # 1 is delivered (its 200 quotes it all back), 2 rejected (422), 3 retried (500) and left open.
    echoing.set_faults({"permanent_errors": {"2": 422, "3": 500}})
    api = ApiTarget(echoing.url, TOKEN, ApiSettings(max_attempts=2, backoff_base_seconds=0.01, timeout_seconds=2))
    report = stages.send(warehouse.engine, api, "run_1", 30)
    assert (report.delivered, report.rejected) == (1, 1)
    summary = runs.summarise(warehouse.engine, "run_1", DAY)
    # A refused token: the run stops, and its message names the connection, not the answer.
    name, email = CUSTOMERS[4]
    warehouse.add(signups, dict(customer_external_id=4, click_id="c4", customer_name=name, customer_email=email,
                                customer_avatar=None, signed_up_at=datetime(2026, 11, 27, 9),
                                requires_verification=False))
    stages.extract_and_map(warehouse.engine, config, Partition(DAY, config.zone), "run_2")
    echoing.set_faults({"revoked": True, "permanent_errors": {}})
    with pytest.raises(CredentialsRefused) as refused:
        stages.send(warehouse.engine, api, "run_2", 30)
    assert "cutmeshort_default" in str(refused.value)
    summary_2 = runs.summarise(warehouse.engine, "run_2", DAY)
    texts = {**audit_text(warehouse.engine), "summary": summary.table(), "message": str(summary.message),
             "summary_2": summary_2.table(), "message_2": str(summary_2.message),
             "refused": str(refused.value), "log": "\n".join(r.getMessage() for r in caplog.records)}
    assert "[token]" in texts["lead_event_deliveries"] or "[token]" in texts["lead_event_delivery_attempts"]
    for where, shown in texts.items():
        assert_clean(shown, where)
