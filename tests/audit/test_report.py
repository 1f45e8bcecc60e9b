"""The delivery report (contract section 10): built from an audit the core pipeline wrote against the
sandbox, on SQLite and PostgreSQL; no PII in it; and looked at in headless Chromium as a person would."""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
from datetime import datetime, timedelta
from html.parser import HTMLParser
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, inspect, update

from lead_sync import stages
from lead_sync.audit import runs
from lead_sync.db.stores import ensure_stores
from lead_sync.audit import report
from lead_sync.audit.charts import STATUS_COLORS
from lead_sync.db.schema import deliveries
from lead_sync.clock import utcnow
from lead_sync.read.config import load_config
from lead_sync.read.partition import Partition
from lead_sync.delivery.settings import ApiSettings, ApiTarget

from tests.support import ROOT, TOKEN, signups, verifications
from tests.support.browser import headless

DAY = utcnow().date() - timedelta(days=1)  # yesterday: inside the script's default 30-day window
PARTITION = Partition(DAY, ZoneInfo("UTC"))
RUN_ID = "manual__report_test"
# Distinctive PII that must never reach the report.
PII = ("Zelda", "Quuxley", "zelda.quux", "Yorick", "Plimsoll", "yorick.plim", "example.org", "example.net")


def signup(cid: int, *, click: str | None = "auto", deferred: bool = False, name: str | None = None,
           email: str | None = None) -> dict:
    return dict(customer_external_id=cid, click_id=f"click-{cid}" if click == "auto" else click,
                customer_name=name, customer_email=email, customer_avatar=None,
                signed_up_at=datetime(DAY.year, DAY.month, DAY.day, 8, cid), requires_verification=deferred)


def verification(cid: int) -> dict:
    return dict(customer_external_id=str(cid), event_name="email_verified",
                verified_at=datetime(DAY.year, DAY.month, DAY.day, 9, cid, tzinfo=ZoneInfo("UTC")))


def build_audit(wh, sandbox) -> dict[str, str]:
    """Customers: 1 (Zelda), 3, 4 delivered; 2 deferred, verified, both delivered; 5 rejected (422);
    6 skipped (no click_id); 8 left retrying (500); 7's verification waits for an event 1. Returns keys."""
    ensure_stores(wh.engine)  # as each task does before its stage
    wh.create_sources()
    wh.add(signups, signup(1, name="Zelda Quuxley", email="zelda.quux@example.org"), signup(2, deferred=True),
           signup(3), signup(4), signup(5, name="Yorick Plimsoll", email="yorick.plim@example.net"),
           signup(6, click=None, name="Zelda Quuxley"), signup(8))
    wh.add(verifications, verification(2), verification(7))
    stages.extract_and_map(wh.engine, load_config(), PARTITION, RUN_ID)
    sandbox.set_faults({"permanent_errors": {"5": 422, "8": 500}})
    settings = ApiSettings(max_attempts=2, backoff_base_seconds=0.01, backoff_max_seconds=0.05)
    stages.send(wh.engine, ApiTarget(sandbox.url, TOKEN, settings), RUN_ID, 30)
    runs.summarise(wh.engine, RUN_ID, DAY)
    rows = wh.deliveries()
    return {name: rows[(cid, event)]["event_key"] for name, cid, event in (
        ("zelda", "1", "signup_started"), ("rejected", "5", "signup_started"), ("skipped", "6", "signup_started"),
        ("retrying", "8", "signup_started"), ("waiting", "7", "email_verified"))}


def assert_no_pii(html: str) -> None:
    for secret in (*PII, TOKEN):
        assert secret.lower() not in html.lower(), secret


def test_report_from_a_pipeline_audit(warehouse, sandbox, monkeypatch):
    keys = build_audit(warehouse, sandbox)
    engine = warehouse.engine
    data = report.load_report(engine)

    assert data.daily == {DAY: {"delivered": 5, "rejected": 1, "skipped": 1, "pending": 2}}
    assert data.totals == {"delivered": 5, "rejected": 1, "skipped": 1, "pending": 2, "failed": 0}
    assert data.requests == {DAY: 8}  # 5 delivered, 1 rejected, 2 tries of the 500
    answered = sorted(a["latency_ms"] for a in warehouse.attempts() if a["http_status"] is not None)
    cuts = statistics.quantiles(answered, n=100, method="inclusive")  # = percentile_cont
    assert data.latency.answered == 8
    assert data.latency.p50 == pytest.approx(statistics.median(answered))
    assert data.latency.p90 == pytest.approx(cuts[89]) and data.latency.p99 == pytest.approx(cuts[98])
    assert [(l.day, l.answered) for l in data.latency_daily] == [(utcnow().date(), 8)]
    reasons = {(r.http_status, r.reason.split(":")[0]): r for r in data.reasons}
    assert reasons[(422, "rejected by the API")].events == 1
    assert reasons[(422, "rejected by the API")].example_event_key == keys["rejected"]
    assert reasons[(500, "retrying")].events == 1
    assert reasons[(None, "no click_id")].events == 1
    assert [(r["run_id"], r["outcome"], r["delivered"], r["rejected"]) for r in data.runs] == [(RUN_ID, "success", 5, 1)]
    # What needs attention: the rejected and the retrying event; a day later also the waiting event 2.
    assert {e["event_key"] for e in data.attention} == {keys["rejected"], keys["retrying"]} and data.attention_total == 2
    later = report.load_report(engine, now=utcnow() + timedelta(days=2))
    assert {e["event_key"] for e in later.attention} == {keys["rejected"], keys["retrying"], keys["waiting"]}

    views = set(inspect(engine).get_view_names())
    if "lead_event_reconciliation" in views:
        rows = {r["source"]: r for r in data.reconciliation if r["partition_date"] == DAY}
        assert rows["signups"]["source_rows"] == 7 and rows["verifications"]["source_rows"] == 2
        assert all(r["unaccounted"] == 0 for r in rows.values())
    else:
        assert data.reconciliation is None
    # The same numbers straight from the tables when the views are not there (an older schema).
    monkeypatch.setattr(report, "_view_names", lambda _engine: set())
    tables_only = report.load_report(engine)
    assert (tables_only.daily, tables_only.requests, tables_only.reasons) == (data.daily, data.requests, data.reasons)
    assert tables_only.reconciliation is None and tables_only.from_views == []
    monkeypatch.undo()

    html = report.render_html(data, title="Lead deliveries", base_path="/lead-deliveries")
    for heading in ("Deliveries per day", "Latency", "Top reasons", "Events that need attention", "Recent runs"):
        assert f">{heading} <small>" in html
    assert ("Reconciliation <small>" in html) == (data.reconciliation is not None)
    if data.reconciliation:  # the look-back days before DAY read nothing: one line for them, DAY keeps its rows
        empty = sorted({r["partition_date"] for r in data.reconciliation} - {DAY})
        assert empty == [DAY - timedelta(days=n) for n in range(len(empty), 0, -1)]
        assert f"{len(empty)} days with nothing read: {empty[0]} - {empty[-1]}</summary>" in html
        table = html[html.index('id="reconciliation-table"'):]
        assert table.count(f'<td data-col="partition_date">{DAY}</td>') == 2  # signups, verifications
    assert html.count("<svg") == 2 and f'id="bar-delivered-{DAY}"' in html and f'id="bar-rejected-{DAY}"' in html
    assert f'<tr data-day="{DAY}"><td>{DAY}</td>' in html and '<td class="num" data-status="delivered">5</td>' in html
    assert 'action="/lead-deliveries/customer"' in html and RUN_ID in html and keys["rejected"] in html
    assert not re.search(r"<script|<link|<img|<iframe|(src|href)\s*=\s*[\"']?(https?:)?//", html, re.I)
    assert_no_pii(html)

    # Free text is escaped, and e-mail-shaped text masked, whatever a reason says.
    with engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.event_key == keys["skipped"])
                     .values(reason="<script>alert(1)</script> ask zelda.quux@example.org"))
    html = report.render_html(report.load_report(engine))
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; ask [e-mail]" in html
    assert_no_pii(html)

    events = report.customer_events(engine, "2")
    assert [(e["event_name"], e["tracking"], e["status"], e["attempts_recorded"]) for e in events] == [
        ("signup_started", "deferred_start", "delivered", 1), ("email_verified", "deferred_confirm", "delivered", 1)]
    retrying, = report.customer_events(engine, " 8 ")
    assert retrying["attempt_outcomes"] == {"retry": 2} and retrying["last_error"] is None
    zelda, = report.customer_events(engine, "1")
    assert "payload" not in zelda and "response" not in zelda
    page = report.render_customer_html("1", [zelda])
    assert "Customer 1" in page and keys["zelda"] in page
    assert_no_pii(page)
    assert report.customer_events(engine, "nobody") == []
    assert "No events on record for customer id nobody" in report.render_customer_html("nobody", [])


def test_no_audit_tables(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(report.AuditMissing):
        report.load_report(engine)
    with pytest.raises(report.AuditMissing):
        report.customer_events(engine, "1")


def test_days_with_nothing_read_fold_into_one_line():
    first = DAY - timedelta(days=9)
    # Ten days read, newest first as the view lists them. Day 9 read rows; day 5 read none, but an event of it
    # is still on record; day 2 read only a repeat. Every other figure of every day is 0.
    busy = {(9, "signups"): dict(source_rows=2, delivered=2), (5, "verifications"): dict(pending=1, no_longer_in_source=1),
            (2, "signups"): dict(source_rows=1, repeat=1)}
    zeros = dict(source_rows=0, delivered=0, pending=0, repeat=0, no_longer_in_source=0, unaccounted=0)
    rows = [dict(partition_date=first + timedelta(days=n), source=source, **{**zeros, **busy.get((n, source), {})},
                 read_by_run="run_b" if n > 6 else "run_a", read_at=utcnow())
            for n in range(9, -1, -1) for source in ("signups", "verifications")]

    shown, empty, read_by = report.fold_empty_days(rows)
    assert shown == [r for r in rows if r["partition_date"] in {first + timedelta(days=n) for n in (9, 5, 2)}]
    assert empty == [first + timedelta(days=n) for n in (0, 1, 3, 4, 6, 7, 8)]
    day = lambda n: first + timedelta(days=n)  # noqa: E731
    assert read_by == {"run_b": f"{day(7)} - {day(8)}", "run_a": f"{day(0)} - {day(1)}, {day(3)} - {day(4)}, {day(6)}"}
    assert report.fold_empty_days(shown)[1:] == ([], {})  # nothing left to fold
    no_day = [{k: v for k, v in r.items() if k != "partition_date"} for r in rows]
    assert report.fold_empty_days(no_day)[0] == no_day  # rows without a day are never folded


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_script_refuses_a_warehouse_without_audit(warehouse, tmp_path):
    warehouse.create_sources()  # a warehouse with tables, but not the audit's
    url = warehouse.url.set(password="pw-s3cret") if warehouse.kind == "postgres" else warehouse.url
    out = tmp_path / "report.html"
    done = run_script("--warehouse", url.render_as_string(hide_password=False), "--out", str(out))
    assert done.returncode == 1 and done.stdout == ""
    line, = done.stderr.strip().splitlines()
    assert "no audit tables" in line and url.render_as_string(hide_password=True) in line
    assert "pw-s3cret" not in done.stderr and not out.exists()

    missing = tmp_path / "nowhere.db"
    done = run_script("--warehouse", f"sqlite:///{missing}", "--out", str(out))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and not missing.exists()


# --- as a person would see it: headless Chromium -----------------------------------------------

class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None) -> None:
        self.tag, self.attrs, self.parent, self.children, self.texts = tag, attrs, parent, [], []

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def all(self, tag: str, **attrs) -> list[Node]:
        return [n for n in self.walk() if n.tag == tag and all(n.attrs.get(k.rstrip("_")) == v for k, v in attrs.items())]

    def one(self, tag: str, **attrs) -> Node:
        found, = self.all(tag, **attrs)
        return found

    @property
    def text(self) -> str:
        return " ".join(" ".join(t.split()) for n in self.walk() for t in n.texts if t.strip())


class DomParser(HTMLParser):
    VOID = {"meta", "link", "br", "hr", "img", "input", "source", "wbr", "col", "area", "base"}

    def __init__(self) -> None:
        super().__init__()
        self.root = self.at = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.at)
        self.at.children.append(node)
        if tag not in self.VOID:
            self.at = node

    def handle_startendtag(self, tag, attrs):
        self.at.children.append(Node(tag, dict(attrs), self.at))

    def handle_endtag(self, tag):
        node = self.at
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.at = node.parent

    def handle_data(self, data):
        self.at.texts.append(data)


def test_report_in_a_browser(sqlite_warehouse, sandbox, tmp_path, chromium):
    keys = build_audit(sqlite_warehouse, sandbox)
    out = tmp_path / "report.html"
    done = run_script("--warehouse", sqlite_warehouse.url.render_as_string(), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)

    dumped = headless(chromium, tmp_path / "profile", "--dump-dom", out.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    parser = DomParser()
    parser.feed(dumped.stdout)
    dom = parser.root
    assert dom.one("h1").text == "Lead deliveries"
    # Both charts are real SVG in the DOM; the bars are drawn shapes, one per status that day.
    charts = dom.all("svg", class_="chart")
    assert len(charts) == 2
    bars = {n.attrs["id"]: n for n in charts[0].walk() if n.tag == "g" and n.attrs.get("id", "").startswith("bar-")}
    assert set(bars) == {f"bar-{s}-{DAY}" for s in ("delivered", "rejected", "skipped", "pending")}
    assert all(b.all("path") for b in bars.values())
    assert {f"latency-{p}" for p in ("p50", "p90", "p99")} <= {n.attrs.get("id") for n in charts[1].walk()}
    # Tables, as read on screen.
    day = dom.one("table", id="daily-table").one("tr", **{"data-day": DAY.isoformat()})
    cells = {td.attrs["data-status"]: td.text for td in day.all("td") if "data-status" in td.attrs}
    assert cells == {"delivered": "5", "skipped": "1", "pending": "2", "rejected": "1"}
    assert day.one("td", **{"data-requests": ""}).text == "8"
    assert dom.one("table", id="latency-overall").all("tr")[1].all("td")[1].text == "8"
    attention = dom.one("table", id="attention-table").one("tbody").all("tr")
    assert sorted((r.attrs["data-status"], r.all("td")[0].text) for r in attention) == [
        ("pending", keys["retrying"]), ("rejected", keys["rejected"])]
    runs = dom.one("table", id="runs-table").one("tbody").all("tr")
    assert [r.one("td", **{"data-col": "run_id"}).text for r in runs] == [RUN_ID]
    assert "HTTP 422" in dom.one("table", id="reasons-table").text
    assert_no_pii(dumped.stdout)

    shot = tmp_path / "report.png"
    taken = headless(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2000",
                     out.as_uri())
    assert taken.returncode == 0 and shot.stat().st_size > 20_000, taken.stderr[-2000:]
    from PIL import Image  # with matplotlib

    pixels = Image.open(shot).convert("RGB")
    colours = {colour for _, colour in pixels.getcolors(maxcolors=1 << 20)}
    for status in ("delivered", "rejected", "pending"):  # the chart's bars were painted
        hexa = STATUS_COLORS[status]
        assert tuple(int(hexa[i:i + 2], 16) for i in (1, 3, 5)) in colours, status
