"""Being told (spec section 8): alerts once per change of state, recoveries, no PII, no token.

The core (`lead_sync.audit.alerts`) runs against SQLite and real PostgreSQL; delivery
(`lead_sync_airflow.notify`) goes to a real SMTP server (aiosmtpd) and a real HTTP server
standing in for the Slack webhook, both on 127.0.0.1, through Airflow connections.
"""
from __future__ import annotations

import json
import logging
from datetime import date, datetime, timedelta, timezone

import airflow  # noqa: F401  (puts the plugins folder on sys.path)
import pytest
from sqlalchemy import insert, select, update

from lead_sync.audit import alerts
from lead_sync.audit.runs import RunSummary
from lead_sync.db.schema import deliveries
from lead_sync.db.stores import ensure_stores
from lead_sync.read.config import AlertsConfig
from lead_sync_airflow import notify

from tests.support.inboxes import smtp_conn
from tests.support.processes import free_port

NOW = datetime(2024, 5, 2, 6, 0, tzinfo=timezone.utc)
DAY = date(2024, 5, 1)
NIGHTLY = "lead_events_sync"
DRAIN = "lead_events_drain"
RUN_ID = "scheduled__2024-05-01T00:00:00+00:00"
COUNTS = {"pending": 4, "delivered": 17, "rejected": 3, "failed": 2, "skipped": 5}
REASONS = [("rejected", "clickId is unknown", 3), ("failed", "HTTP 503 after 5 attempts", 2)]

# What must never reach a message: customer data in the audit rows, the API token.
CUSTOMER_EMAIL = "zelda.quux@example.org"
CUSTOMER_NAME = "Zelda Quuxington"
CUSTOMER_ID = "cust-zq-880311"
API_TOKEN = "cms-live-tok-5e1f0c9a7b3d"
SLACK_SECRET_PATH = "T0SECRET/B0SECRET/xoxsecretpath"
FORBIDDEN = (CUSTOMER_EMAIL, CUSTOMER_NAME, CUSTOMER_ID, API_TOKEN, SLACK_SECRET_PATH)


def summary(outcome: str = "success", *, dag_id: str = NIGHTLY, run_id: str = RUN_ID,
            decided: dict[str, int] | None = None, message: str | None = None,
            top_reasons: list[tuple[str, str, int]] | None = None) -> RunSummary:
    return RunSummary(
        run_id=run_id, dag_id=dag_id, partition_date=DAY, counts=dict(COUNTS), requests_sent=22,
        send_result="complete", outcome=outcome,
        message=message or ("2 event(s) failed after all attempts; the next run retries them"
                            if outcome == "failed" else None),
        decided={} if decided is None else decided,
        top_reasons=REASONS if top_reasons is None else top_reasons,
    )


CFG = AlertsConfig(email=["ops@example.com"], rejected_share=0.05, backlog_hours=24)


def add_event(engine, key: str, status: str, created_at: datetime) -> None:
    """An audit row carrying customer data, as the pipeline stores it."""
    payload = {"customerExternalId": CUSTOMER_ID, "customerName": CUSTOMER_NAME, "customerEmail": CUSTOMER_EMAIL}
    with engine.begin() as conn:
        conn.execute(insert(deliveries).values(
            event_key=key, source="signups", partition_date=DAY, customer_external_id=CUSTOMER_ID,
            event_name="signup", tracking="non_deferred", status=status, attempts=0,
            reason=f"waiting ({CUSTOMER_EMAIL})", payload=json.dumps(payload), response=CUSTOMER_NAME,
            created_at=created_at, updated_at=created_at,
        ))


def stored(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["alert"]: dict(r) for r in conn.execute(select(alerts.alert_state)).mappings()}


@pytest.fixture
def engine(warehouse):
    ensure_stores(warehouse.engine)
    return warehouse.engine


# --- the core: when an alert is raised, against SQLite and PostgreSQL -------------------------

def test_a_failed_run_alerts_once_and_a_later_success_recovers(engine):
    first = alerts.evaluate(engine, CFG, summary("failed"), NOW)
    assert [(a.key, a.firing) for a in first] == [(f"run_failed:{NIGHTLY}", True)]
    alert = first[0]
    assert alert.subject.startswith(f"[{NIGHTLY}] ALERT")
    assert "run failed" in alert.subject
    for text in (alert.subject + alert.text, alert.html):
        assert NIGHTLY in text and DAY.isoformat() in text
    for needle in (RUN_ID, "failed after all attempts", "requests sent:  22", "clickId is unknown",
                   "HTTP 503 after 5 attempts"):
        assert needle.lower() in alert.text.lower()
    for status, n in COUNTS.items():
        assert any(line.split() == [status, str(n)] for line in alert.text.splitlines()), status
    assert stored(engine) == {}  # evaluate changes nothing
    alerts.mark_sent(engine, first, NOW)
    assert stored(engine)[f"run_failed:{NIGHTLY}"]["firing"] is True

    # Still failing: nothing new to say.
    assert alerts.evaluate(engine, CFG, summary("failed", run_id="manual__2"), NOW + timedelta(hours=1)) == []
    # The drain DAG is a DAG of its own; its success does not clear the nightly alert.
    assert alerts.evaluate(engine, CFG, summary(dag_id=DRAIN, run_id=f"{DRAIN}/r1"), NOW) == []

    recovered = alerts.evaluate(engine, CFG, summary(run_id="scheduled__2024-05-02"), NOW + timedelta(days=1))
    assert [(a.key, a.firing) for a in recovered] == [(f"run_failed:{NIGHTLY}", False)]
    assert recovered[0].subject.startswith(f"[{NIGHTLY}] RECOVERED")
    assert "scheduled__2024-05-02" in recovered[0].text
    alerts.mark_sent(engine, recovered, NOW + timedelta(days=1))
    assert stored(engine)[f"run_failed:{NIGHTLY}"]["firing"] is False
    assert alerts.evaluate(engine, CFG, summary(), NOW + timedelta(days=2)) == []


def test_no_stored_state_means_not_firing(engine):
    """A first successful run has nothing to recover from."""
    assert alerts.evaluate(engine, CFG, summary(decided={"delivered": 10}), NOW) == []


def test_each_dag_has_its_own_failed_run_alert(engine):
    got = alerts.evaluate(engine, CFG, summary("failed", dag_id=DRAIN, run_id=f"{DRAIN}/manual__x"), NOW)
    assert [a.key for a in got] == [f"run_failed:{DRAIN}"]
    assert got[0].subject.startswith(f"[{DRAIN}] ALERT")
    assert f"{DRAIN}/manual__x" in got[0].text


def test_rejected_share_over_the_threshold_alerts_and_clears(engine):
    key = f"rejected_share:{NIGHTLY}"
    # 1 in 20 = 5%: not above 5%.
    assert alerts.evaluate(engine, CFG, summary(decided={"delivered": 19, "rejected": 1}), NOW) == []
    over = alerts.evaluate(engine, CFG, summary(decided={"delivered": 8, "rejected": 1, "failed": 1}), NOW)
    assert [(a.key, a.firing) for a in over] == [(key, True)]
    assert over[0].subject.startswith(f"[{NIGHTLY}] ALERT") and "rejected share" in over[0].subject
    assert "1 of the 10 events" in over[0].text and "10.0%" in over[0].text and "5.0%" in over[0].text
    alerts.mark_sent(engine, over, NOW)
    before = stored(engine)[key]

    # A run that settled nothing (nothing sent, or only skipped events) says nothing either way.
    assert alerts.evaluate(engine, CFG, summary(decided={}), NOW + timedelta(hours=1)) == []
    assert alerts.evaluate(engine, CFG, summary(decided={"delivered": 0, "rejected": 0}), NOW) == []
    assert stored(engine)[key] == before
    # Still above: no repeat.
    assert alerts.evaluate(engine, CFG, summary(decided={"rejected": 5}), NOW + timedelta(hours=2)) == []

    back = alerts.evaluate(engine, CFG, summary(decided={"delivered": 99, "rejected": 1}), NOW + timedelta(hours=3))
    assert [(a.key, a.firing) for a in back] == [(key, False)]
    assert back[0].subject.startswith(f"[{NIGHTLY}] RECOVERED")
    alerts.mark_sent(engine, back, NOW + timedelta(hours=3))
    assert stored(engine)[key]["firing"] is False


def test_a_pending_event_older_than_the_backlog_hours_alerts_until_cleared(engine):
    add_event(engine, "old", "pending", NOW - timedelta(hours=30))
    add_event(engine, "young", "pending", NOW - timedelta(hours=1))
    add_event(engine, "done", "delivered", NOW - timedelta(hours=100))
    got = alerts.evaluate(engine, CFG, summary(), NOW)
    assert [(a.key, a.firing) for a in got] == [("backlog", True)]
    assert got[0].subject.startswith(f"[{NIGHTLY}] ALERT") and "backlog" in got[0].subject
    assert "1 pending event(s) created more than 24 h ago" in got[0].text
    assert "the oldest is 30.0 h old" in got[0].text
    alerts.mark_sent(engine, got, NOW)
    assert alerts.evaluate(engine, CFG, summary(dag_id=DRAIN, run_id=f"{DRAIN}/x"), NOW) == []  # one per deployment

    with engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.event_key == "old").values(status="delivered"))
    cleared = alerts.evaluate(engine, CFG, summary(), NOW + timedelta(minutes=5))
    assert [(a.key, a.firing) for a in cleared] == [("backlog", False)]
    assert cleared[0].subject.startswith(f"[{NIGHTLY}] RECOVERED") and "cleared" in cleared[0].subject
    alerts.mark_sent(engine, cleared, NOW + timedelta(minutes=5))
    # The young one turns old a day later: a new alert.
    assert [a.key for a in alerts.evaluate(engine, CFG, summary(), NOW + timedelta(hours=26))] == ["backlog"]


def test_an_alert_not_marked_sent_is_produced_again(engine):
    add_event(engine, "old", "pending", NOW - timedelta(hours=48))
    first = alerts.evaluate(engine, CFG, summary("failed"), NOW)
    assert sorted(a.key for a in first) == ["backlog", f"run_failed:{NIGHTLY}"]
    again = alerts.evaluate(engine, CFG, summary("failed"), NOW)
    assert [(a.key, a.subject, a.text) for a in again] == [(a.key, a.subject, a.text) for a in first]
    # Only what is passed to mark_sent is recorded.
    alerts.mark_sent(engine, [a for a in first if a.key == "backlog"], NOW)
    assert [a.key for a in alerts.evaluate(engine, CFG, summary("failed"), NOW)] == [f"run_failed:{NIGHTLY}"]


def test_quoted_reasons_are_escaped_and_kept_on_one_line(engine):
    hostile = "<b>bad</b> & {{ conf }}\nSubject: injected"
    got = alerts.evaluate(engine, CFG, summary("failed", top_reasons=[("rejected", hostile, 1)]), NOW)
    text, page = got[0].text, got[0].html
    assert "<b>bad</b> & {{ conf }} Subject: injected" in text
    assert "<b>bad" not in page and "&lt;b&gt;bad&lt;/b&gt; &amp; {{ conf }}" in page
    assert "\n" not in got[0].subject


def test_an_address_quoted_in_a_reason_is_masked(engine):
    leaky = [("rejected", f"customerEmail '{CUSTOMER_EMAIL}' is not allowed", 2)]
    (got,) = alerts.evaluate(engine, CFG, summary("failed", top_reasons=leaky), NOW)
    assert CUSTOMER_EMAIL not in got.text + got.html
    assert "customerEmail '[e-mail]' is not allowed" in got.text


# --- delivery: real SMTP and webhook servers -----------------------------------------------

@pytest.fixture
def connections(monkeypatch, webhook):
    """The webhook connection (the SlackWebhookHook takes a password holding '://' as the whole
    URL) and the API connection whose token must never show up in an alert."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)  # slack_sdk would send through it
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_ALERTS", json.dumps(
        {"conn_type": "slackwebhook", "password": f"http://127.0.0.1:{webhook.port}/hook/{SLACK_SECRET_PATH}"}))
    monkeypatch.setenv("AIRFLOW_CONN_CUTMESHORT_DEFAULT", json.dumps(
        {"conn_type": "http", "host": "https://api.example.com", "password": API_TOKEN}))


@pytest.fixture
def sqlite_engine(sqlite_warehouse):
    ensure_stores(sqlite_warehouse.engine)
    return sqlite_warehouse.engine


TEAM = AlertsConfig(email=["ops@example.com", "Data.Team@example.net"], slack_conn_id="slack_alerts")
CONTEXT: dict = {}


def test_alerts_arrive_by_mail_and_slack_without_pii_or_token(sqlite_engine, smtp_server, webhook, connections,
                                                             monkeypatch):
    inbox, port = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(port))
    add_event(sqlite_engine, "old", "pending", NOW - timedelta(hours=30))

    assert notify.raise_alerts(sqlite_engine, TEAM, summary("failed"), CONTEXT, now=NOW) == 2
    mails = inbox.parsed()
    assert len(mails) == 2 and len(webhook.posts) == 2
    assert all(sorted(rcpts) == ["Data.Team@example.net", "ops@example.com"] for rcpts, *_ in mails)
    subjects = sorted(subject for _, subject, _, _ in mails)
    assert subjects == [f"[{NIGHTLY}] ALERT: backlog of open events (partition {DAY})",
                        f"[{NIGHTLY}] ALERT: run failed (partition {DAY})"]
    for _, _, body, _ in mails:
        for needle in (NIGHTLY, RUN_ID, DAY.isoformat(), "clickId is unknown", "HTTP 503 after 5 attempts"):
            assert needle in body
        assert "delivered" in body and str(COUNTS["delivered"]) in body
    assert all(path == f"/hook/{SLACK_SECRET_PATH}" for path, _ in webhook.posts)
    for text in webhook.texts():
        assert NIGHTLY in text and RUN_ID in text and DAY.isoformat() in text and "clickId is unknown" in text

    everything = [raw + body for _, _, body, raw in mails] + [body for _, body in webhook.posts]
    for sent in everything:
        for secret in FORBIDDEN:
            assert secret.lower() not in sent.lower(), secret

    # Sent and recorded: nothing more to say until the state changes.
    assert notify.raise_alerts(sqlite_engine, TEAM, summary("failed"), CONTEXT, now=NOW) == 0
    assert len(inbox.messages) == 2 and len(webhook.posts) == 2
    assert notify.raise_alerts(sqlite_engine, TEAM, summary(), CONTEXT, now=NOW) == 1
    assert inbox.parsed()[-1][1] == f"[{NIGHTLY}] RECOVERED: run failed: cleared (partition {DAY})"
    assert "RECOVERED" in webhook.texts()[-1]


def test_slack_text_cannot_mention_or_link(sqlite_engine, smtp_server, webhook, connections, monkeypatch):
    inbox, port = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(port))
    hostile = summary("failed", top_reasons=[("rejected", "<!channel> see <http://evil.example|here> {{ x }}", 1)])
    assert notify.raise_alerts(sqlite_engine, TEAM, hostile, CONTEXT, now=NOW) == 1
    (text,) = webhook.texts()
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text and "{{ x }}" in text  # not rendered as Jinja
    assert "{{ x }}" in inbox.parsed()[0][2]


def test_no_alerts_section_sends_nothing(sqlite_engine, smtp_server, webhook, monkeypatch):
    inbox, port = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(port))
    assert notify.raise_alerts(sqlite_engine, None, summary("failed"), CONTEXT, now=NOW) == 0
    assert inbox.messages == [] and webhook.posts == []
    assert stored(sqlite_engine) == {}


def test_mail_server_down_fails_loudly_and_the_alert_is_raised_again(sqlite_engine, smtp_server, webhook,
                                                                    connections, monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(free_port()))  # nothing listens there
    with caplog.at_level(logging.ERROR, logger="lead_sync_airflow.notify"):
        with pytest.raises(RuntimeError, match=r"1 of 1 alert\(s\) could not be sent \(e-mail: 1 failed\)"):
            notify.raise_alerts(sqlite_engine, TEAM, summary("failed"), CONTEXT, now=NOW)
    errors = [r for r in caplog.records if r.name == "lead_sync_airflow.notify" and r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info is not None and "e-mail" in errors[0].getMessage()
    assert len(webhook.posts) == 1  # the other channel was still tried
    assert stored(sqlite_engine) == {}  # not recorded as sent

    inbox, port = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(port))
    assert notify.raise_alerts(sqlite_engine, TEAM, summary("failed"), CONTEXT, now=NOW) == 1
    assert [m[1] for m in inbox.parsed()] == [f"[{NIGHTLY}] ALERT: run failed (partition {DAY})"]
    assert stored(sqlite_engine)[f"run_failed:{NIGHTLY}"]["firing"] is True


def test_slack_refusing_fails_the_call_and_keeps_the_alert(sqlite_engine, smtp_server, webhook, connections,
                                                          monkeypatch):
    inbox, port = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(port))
    webhook.status = 500
    with pytest.raises(RuntimeError, match=r"Slack: 1 failed") as raised:
        notify.raise_alerts(sqlite_engine, TEAM, summary("failed"), CONTEXT, now=NOW)
    assert SLACK_SECRET_PATH not in str(raised.value)
    assert len(inbox.messages) == 1 and stored(sqlite_engine) == {}
    webhook.status = 200
    assert notify.raise_alerts(sqlite_engine, TEAM, summary("failed"), CONTEXT, now=NOW) == 1
