"""Day after day (spec section 8), through Airflow itself (dag.test, in this process).

Being told: alerts by e-mail (a real SMTP server, aiosmtpd) and Slack (a real HTTP server standing
in for the webhook) raised by the DAG's own summary task, once per change of state, with no PII and
no token; an SMTP server that is down fails the run loudly without losing or re-sending a lead, and the
run still updates the Asset lead_event_deliveries.
Configuration errors stop the DAG at parse time. A transient warehouse outage is retried by Airflow's
own task retries. Late rows are sent by the next nightly run (look-back), and a rerun of their day
sends them whatever the look-back.
"""
from __future__ import annotations

import html
import json
import re
import threading
from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import inspect, select

from tests.support.dagrun import run_through_airflow
from lead_sync.audit import alerts as core_alerts
from tests.support import ROOT, TOKEN, Warehouse, allow_connections, signups, write_sources
from tests.support.inboxes import Inbox, smtp_conn
from tests.support.processes import free_port

pytestmark = pytest.mark.usefixtures("airflow_db")

NIGHTLY = "lead_events_sync"
FAST = dict(timeout_seconds=1, backoff_base_seconds=0.05, backoff_max_seconds=0.3)
# An event refused with a 5xx gives up (status failed) at its second attempt: the run fails.
GIVE_UP = dict(max_attempts=2, give_up_after_hours=1e-7, **FAST)
RECIPIENTS = ["data@example.com", "ops@example.com"]
ALERTS = {"email": ["ops@example.com", "data@example.com"], "rejected_share": 0.05, "backlog_hours": 24}

# What must never reach an alert: customer data from the warehouse, the API token, the webhook's secret path.
ZELDA_ID = 880311
ZELDA_EMAIL = "zelda.quux@example.org"
ZELDA_NAME = "Zelda Quuxley"
SLACK_SECRET_PATH = "T0SECRET/B0SECRET/xoxsecretpath"
FORBIDDEN = (ZELDA_EMAIL, ZELDA_NAME, str(ZELDA_ID), TOKEN, SLACK_SECRET_PATH)


def T(value: str) -> datetime:
    return datetime.fromisoformat(value)


def signup(cid: int, at: str, **changes) -> dict:
    row = dict(customer_external_id=cid, click_id=f"clk{cid}", customer_name=f"Name {cid}",
               customer_email=f"u{cid}@example.com", customer_avatar=None, signed_up_at=T(at),
               requires_verification=False)
    row.update(changes)
    return row


ZELDA = signup(ZELDA_ID, "2026-11-27 07:30:00", click_id="clk-zq", customer_name=ZELDA_NAME,
               customer_email=ZELDA_EMAIL)


def seed(wh: Warehouse, count: int, day: str = "2026-11-27") -> int:
    """Zelda plus `count - 1` ordinary non-deferred signups on `day` (ids 1..count-1)."""
    wh.create_sources()
    wh.add(signups, ZELDA, *(signup(n, f"{day} {8 + n % 12:02d}:{n % 60:02d}:00") for n in range(1, count)))
    return count


# --- running the DAG, and reading back what Airflow recorded ----------------------------------

class Run:
    def __init__(self, dag_run) -> None:
        from airflow.models.asset import AssetEvent
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        state = dag_run.state
        self.state = state.value if hasattr(state, "value") else str(state)
        self.run_id = dag_run.run_id
        self.logical_date = dag_run.logical_date
        with create_session() as session:
            tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_run.dag_id,
                                                             TaskInstance.run_id == dag_run.run_id)).all()
            self.tasks = {ti.task_id: (str(getattr(ti.state, "value", ti.state)), ti.try_number) for ti in tis}
            events = session.scalars(select(AssetEvent).where(AssetEvent.source_dag_id == dag_run.dag_id,
                                                              AssetEvent.source_run_id == dag_run.run_id)).all()
            self.asset_events = len(events)

    def task_state(self, task_id: str) -> str:
        return self.tasks[task_id][0]


def run(wh: Warehouse, api_url: str, **kwargs) -> Run:
    """tests/support/dagrun.run_through_airflow, handing back the run id and the task instances' states and try numbers."""
    return Run(run_through_airflow(wh, api_url, **kwargs))


def run_row(wh: Warehouse, run_id: str) -> dict:
    (row,) = [r for r in wh.runs() if r["run_id"] == run_id]
    return row


def alert_state(wh: Warehouse) -> dict[str, dict]:
    if not inspect(wh.engine).has_table(core_alerts.alert_state.name):
        return {}
    with wh.engine.connect() as conn:
        return {r["alert"]: dict(r) for r in conn.execute(select(core_alerts.alert_state)).mappings()}


def lead_counts(sandbox) -> Counter:
    return Counter((lead["customerExternalId"], lead["eventName"]) for lead in sandbox.leads())


def status_line(body: str, status: str) -> int:
    """The count on the body's 'Events per status' line for `status`."""
    (n,) = [int(line.split()[1]) for line in body.splitlines() if line.split()[:1] == [status]
            and len(line.split()) == 2]
    return n


def assert_nothing_secret(mails: list[tuple], posts: list[tuple[str, str]] = ()) -> None:
    """Neither the raw mails (headers, encoded parts) nor their decoded text, nor the Slack posts."""
    texts = [subject + "\n" + body + "\n" + raw + "\n" + html.unescape(raw) for _, subject, body, raw in mails]
    texts += [body + "\n" + json.loads(body)["text"] for _, body in posts]
    assert texts
    for sent in texts:
        for secret in FORBIDDEN:
            assert secret.lower() not in sent.lower(), secret


def read(inbox: Inbox) -> list[tuple[list[str], str, str, str]]:
    """(recipients, subject, body as text, raw message) per mail; the body is HTML: unescaped here."""
    return [(rcpts, subject, html.unescape(body), raw) for rcpts, subject, body, raw in inbox.parsed()]


@pytest.fixture
def mail(monkeypatch, smtp_server):
    """smtp_default -> a real SMTP server on 127.0.0.1; returns its inbox."""
    inbox, port = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(port))
    return inbox


# --- 1. alerts end to end ------------------------------------------------------------------

def test_failed_run_alerts_once_by_mail_and_slack_then_recovers(warehouse, sandbox, mail, webhook,
                                                                 tmp_path, monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)  # slack_sdk would send through it
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_ALERTS", json.dumps(
        {"conn_type": "slackwebhook", "password": f"http://127.0.0.1:{webhook.port}/hook/{SLACK_SECRET_PATH}"}))
    config = write_sources(tmp_path, alerts={**ALERTS, "slack_conn_id": "slack_alerts"})
    total = seed(warehouse, 4)

    # The token is refused: the run fails, one ALERT by mail (to both addresses) and one by Slack.
    sandbox.set_faults({"revoked": True})
    first = run(warehouse, sandbox.url, sources=config, **FAST)
    assert first.state == "failed"
    assert first.task_state("audit_summary") == "success" and first.task_state("check_outcome") == "failed"
    mails = read(mail)
    assert len(mails) == 1 and len(webhook.posts) == 1
    rcpts, subject, body, _ = mails[0]
    assert sorted(rcpts) == RECIPIENTS
    assert subject == f"[{NIGHTLY}] ALERT: run failed (partition 2026-11-27)"
    # A manual run of logical date 2026-11-28 (its id is stamped with the moment it was made).
    assert first.run_id.startswith("manual__") and first.logical_date.date().isoformat() == "2026-11-28"
    for needle in (NIGHTLY, first.run_id, "Partition:      2026-11-27", "refused the token", "cutmeshort_default"):
        assert needle in body, needle
    assert status_line(body, "pending") == total and status_line(body, "delivered") == 0
    (slack,) = webhook.texts()
    assert webhook.posts[0][0] == f"/hook/{SLACK_SECRET_PATH}"
    for needle in ("ALERT: run failed", NIGHTLY, first.run_id, "2026-11-27", "refused the token"):
        assert needle in slack, needle
    assert alert_state(warehouse)[f"run_failed:{NIGHTLY}"]["firing"] is True

    # Still failing, the next night: nothing new to say.
    second = run(warehouse, sandbox.url, logical_date="2026-11-29", sources=config, **FAST)
    assert second.state == "failed" and second.run_id != first.run_id
    assert second.task_state("audit_summary") == "success"
    assert len(mail.messages) == 1 and len(webhook.posts) == 1

    # The token works again: everything is delivered once, and one RECOVERED message names the run.
    sandbox.set_faults({"revoked": False})
    third = run(warehouse, sandbox.url, logical_date="2026-11-30", sources=config, **FAST)
    assert third.state == "success"
    counts = lead_counts(sandbox)
    assert len(counts) == total and set(counts.values()) == {1}
    mails = read(mail)
    assert len(mails) == 2 and len(webhook.posts) == 2
    rcpts, subject, body, _ = mails[1]
    assert sorted(rcpts) == RECIPIENTS
    assert subject == f"[{NIGHTLY}] RECOVERED: run failed: cleared (partition 2026-11-29)"
    assert third.run_id in body and "It had been firing since" in body
    assert "RECOVERED" in webhook.texts()[1] and third.run_id in webhook.texts()[1]
    assert alert_state(warehouse)[f"run_failed:{NIGHTLY}"]["firing"] is False

    assert_nothing_secret(mails, webhook.posts)


def test_rejected_share_over_the_threshold_alerts(warehouse, sandbox, mail, tmp_path):
    config = write_sources(tmp_path, alerts=ALERTS)
    total = seed(warehouse, 10)
    sandbox.set_faults({"permanent_errors": {str(ZELDA_ID): 422}})  # 1 of 10 = 10% > 5%
    result = run(warehouse, sandbox.url, sources=config, **FAST)
    assert result.state == "success"  # a rejection is an answer, not a failure of the run
    assert len(lead_counts(sandbox)) == total - 1
    assert warehouse.deliveries()[(str(ZELDA_ID), "signup_started")]["status"] == "rejected"

    mails = read(mail)
    assert len(mails) == 1
    rcpts, subject, body, _ = mails[0]
    assert sorted(rcpts) == RECIPIENTS
    assert subject == f"[{NIGHTLY}] ALERT: rejected share above threshold (partition 2026-11-27)"
    for needle in (NIGHTLY, result.run_id, "1 of the 10 events this run's requests settled were rejected (10.0%)",
                   "threshold of 5.0%", "rejected by the API: HTTP 422", "Settled by this run's requests: "
                   "delivered 9, rejected 1, failed 0"):
        assert needle in body, needle
    assert status_line(body, "delivered") == 9 and status_line(body, "rejected") == 1
    assert_nothing_secret(mails)
    assert alert_state(warehouse)[f"rejected_share:{NIGHTLY}"]["firing"] is True


# --- 2. the mail server is down --------------------------------------------------------------

def test_smtp_down_fails_the_run_loudly_loses_nothing_and_the_alert_comes_later(
        warehouse, sandbox, smtp_server, tmp_path, monkeypatch, capfd):
    config = write_sources(tmp_path, alerts=ALERTS)
    total = seed(warehouse, 5)
    sandbox.set_faults({"permanent_errors": {"2": 500}})  # event 2 gives up: the run fails
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(free_port()))  # nothing listens there

    capfd.readouterr()
    first = run(warehouse, sandbox.url, sources=config, **GIVE_UP)
    task_output = "".join(capfd.readouterr())  # the task runner prints a failed task's exception
    assert first.state == "failed"
    assert first.task_state("send_lead_events") == "failed"
    # The summary writes the audit and updates the Asset; check_outcome fails the run, naming the alert.
    assert first.task_state("audit_summary") == "success" and first.asset_events == 1
    assert first.task_state("check_outcome") == "failed"
    assert first.tasks["check_outcome"][1] == 1  # AirflowFailException: not retried
    assert "an alert could not be sent: 1 of 1 alert(s) could not be sent (e-mail: 1 failed)" in task_output
    # The audit is written all the same.
    row = run_row(warehouse, first.run_id)
    assert row["outcome"] == "failed" and row["finished_at"] is not None
    assert (row["delivered"], row["failed"], row["requests_sent"]) == (total - 1, 1, total - 1 + 2)
    assert alert_state(warehouse) == {}  # not recorded as sent: the next run raises it again
    delivered_once = lead_counts(sandbox)
    assert len(delivered_once) == total - 1 and set(delivered_once.values()) == {1}
    requests_before = len(sandbox.requests())
    assert requests_before == total - 1 + 2

    # The mail server is back; a rerun of the partition re-opens event 2 (still refused by the API).
    inbox, port = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_conn(port))
    second = run(warehouse, sandbox.url, logical_date=None, conf={"partition_date": "2026-11-27"}, sources=config,
                 **GIVE_UP)
    assert second.state == "failed" and second.task_state("audit_summary") == "success"
    new = sandbox.requests()[requests_before:]
    assert [r["body"]["customerExternalId"] for r in new] == ["2", "2"]  # no delivered lead sent twice
    assert lead_counts(sandbox) == delivered_once
    mails = read(inbox)
    assert len(mails) == 1
    assert mails[0][1] == f"[{NIGHTLY}] ALERT: run failed (partition 2026-11-27)"
    assert second.run_id in mails[0][2] and status_line(mails[0][2], "failed") == 1
    assert alert_state(warehouse)[f"run_failed:{NIGHTLY}"]["firing"] is True

    # The API takes event 2: every lead delivered exactly once, and the recovery is told.
    sandbox.set_faults({"permanent_errors": {}})
    third = run(warehouse, sandbox.url, logical_date=None, conf={"partition_date": "2026-11-27"}, sources=config,
                **GIVE_UP)
    assert third.state == "success"
    counts = lead_counts(sandbox)
    assert len(counts) == total and set(counts.values()) == {1}
    assert [m[1] for m in read(inbox)][1:] == [f"[{NIGHTLY}] RECOVERED: run failed: cleared (partition 2026-11-27)"]
    assert (second.asset_events, third.asset_events) == (1, 1)  # lead_event_deliveries, for downstream DAGs
    assert_nothing_secret(read(inbox))


# --- 3. configuration errors at parse time; no alerts section ---------------------------------

@pytest.mark.parametrize("settings, key, limit", [
    ({"alerts": {"email": ["ops@example.com"], "foo": 1}}, "alerts.foo", None),
    ({"alerts": {"email": ["ops@example.com", "not an address"]}}, "alerts.email", None),
    ({"lookback_days": -1}, "lookback_days", "0"),
    ({"lookback_days": 91}, "lookback_days", "90"),
], ids=["unknown-key", "bad-address", "lookback-negative", "lookback-too-long"])
def test_a_bad_configuration_is_an_import_error_naming_the_key(settings, key, limit, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("LEAD_SYNC_SOURCES", str(write_sources(tmp_path, **settings)))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    # Both DAGs read the sync configuration: neither is loaded, each error names the key.
    assert set(bag.import_errors) == {str(ROOT / "dags" / f"{d}.py") for d in (NIGHTLY, "lead_events_drain")}
    for error in bag.import_errors.values():
        assert "ConfigError" in error
        found = re.search(re.escape(key) + r"(\.\d+)?: [^;\n]*", error)
        assert found, error
        if limit is not None:
            assert re.search(rf"(?<![-\d.]){limit}(?![\d.])", found.group(0)), found.group(0)
        if key == "alerts.email":
            assert "not an address" in found.group(0)
    assert not bag.dags


def test_no_alerts_section_sends_nothing_and_fails_nothing(warehouse, sandbox, mail):
    total = seed(warehouse, 3)
    sandbox.set_faults({"revoked": True})
    failed = run(warehouse, sandbox.url, **FAST)  # the shipped configuration: no `alerts`
    assert failed.state == "failed" and failed.task_state("audit_summary") == "success"
    sandbox.set_faults({"revoked": False})
    ok = run(warehouse, sandbox.url, **FAST)
    assert ok.state == "success" and ok.task_state("audit_summary") == "success"
    assert len(lead_counts(sandbox)) == total
    assert mail.messages == []
    assert alert_state(warehouse) == {}


# --- 4. a transient warehouse error, retried by Airflow ---------------------------------------


@pytest.mark.postgres
def test_a_warehouse_refusing_connections_is_retried_by_airflow(pg_warehouse, sandbox, capfd):
    total = seed(pg_warehouse, 4)
    name = pg_warehouse.url.database
    outage = {}

    def pull_the_plug(context) -> None:
        """At the start of the first try of extract_and_map: the warehouse refuses connections for 2 s."""
        if context["ti"].try_number == 1 and not outage:
            allow_connections(name, False)
            outage["timer"] = threading.Timer(2.0, allow_connections, (name, True))
            outage["timer"].start()

    def adjust(dag) -> None:
        extract = dag.task_dict["extract_and_map"]
        assert extract.retries >= 1  # what recovers from the outage (tests/dags states the retry rules)
        extract.retry_delay = timedelta(seconds=3)  # outlasts the 2 s outage, and keeps the test short
        extract.on_execute_callback = [pull_the_plug]

    capfd.readouterr()
    try:
        result = run(pg_warehouse, sandbox.url, adjust=adjust, **FAST)
        task_output = "".join(capfd.readouterr())
    finally:
        if "timer" in outage:
            outage["timer"].join()
        allow_connections(name, True)
    assert outage, "the outage never started"
    assert f'database "{name}" is not currently accepting connections' in task_output  # what try 1 met
    assert result.state == "success", result.tasks
    assert result.tasks["extract_and_map"] == ("success", 2)
    assert all(try_number == 1 for task, (_, try_number) in result.tasks.items() if task != "extract_and_map")
    counts = lead_counts(sandbox)
    assert len(counts) == total and set(counts.values()) == {1}
    assert len(sandbox.requests()) == total
    assert pg_warehouse.status_counts() == {"delivered": total}
    assert run_row(pg_warehouse, result.run_id)["outcome"] == "success"


# --- 5. late rows -------------------------------------------------------------------------

LATE = signup(7, "2026-11-27 22:15:00")


def test_a_late_row_is_sent_by_the_next_nightly_run_and_nothing_delivered_is_rewritten(warehouse, sandbox):
    warehouse.create_sources()
    warehouse.add(signups, signup(1, "2026-11-27 08:00:00"), signup(2, "2026-11-28 09:00:00"))
    assert run(warehouse, sandbox.url, logical_date="2026-11-28").state == "success"  # partition 11-27
    assert list(lead_counts(sandbox)) == [("1", "signup_started")]
    before = warehouse.deliveries()[("1", "signup_started")]
    assert before["status"] == "delivered" and before["notes"] is None

    # Loaded late, after its day's run; and event 1's own row changes (an address the mapping would drop).
    warehouse.add(signups, LATE)
    warehouse.execute("UPDATE signups SET customer_email = 'not-an-address' WHERE customer_external_id = 1")
    nightly = run(warehouse, sandbox.url, logical_date="2026-11-29")  # partition 11-28, look-back 3 days
    assert nightly.state == "success"
    assert lead_counts(sandbox) == Counter({("1", "signup_started"): 1, ("2", "signup_started"): 1,
                                            ("7", "signup_started"): 1})
    audit = warehouse.deliveries()
    late = audit[("7", "signup_started")]
    assert (late["status"], late["partition_date"].isoformat(), late["last_run_id"]) == \
        ("delivered", "2026-11-27", nightly.run_id)
    assert audit[("1", "signup_started")] == before  # updated_at, last_run_id, notes, payload: untouched
    assert audit[("1", "signup_started")]["notes"] is None  # not re-validated by the look-back

    # The next nightly run again: nothing more to send.
    assert run(warehouse, sandbox.url, logical_date="2026-11-30").state == "success"
    assert len(sandbox.requests()) == 3


def test_without_look_back_a_late_row_waits_for_a_rerun_of_its_day(warehouse, sandbox, tmp_path):
    no_lookback = write_sources(tmp_path, lookback_days=0)
    warehouse.create_sources()
    warehouse.add(signups, signup(1, "2026-11-27 08:00:00"), signup(2, "2026-11-28 09:00:00"))
    assert run(warehouse, sandbox.url, logical_date="2026-11-28", sources=no_lookback).state == "success"
    before = warehouse.deliveries()[("1", "signup_started")]

    warehouse.add(signups, LATE)
    assert run(warehouse, sandbox.url, logical_date="2026-11-29", sources=no_lookback).state == "success"
    assert lead_counts(sandbox) == Counter({("1", "signup_started"): 1, ("2", "signup_started"): 1})
    assert ("7", "signup_started") not in warehouse.deliveries()

    rerun = run(warehouse, sandbox.url, logical_date=None, conf={"partition_date": "2026-11-27"},
                sources=no_lookback)
    assert rerun.state == "success"
    assert lead_counts(sandbox) == Counter({("1", "signup_started"): 1, ("2", "signup_started"): 1,
                                            ("7", "signup_started"): 1})
    audit = warehouse.deliveries()
    assert audit[("7", "signup_started")]["last_run_id"] == rerun.run_id
    assert audit[("1", "signup_started")] == before
