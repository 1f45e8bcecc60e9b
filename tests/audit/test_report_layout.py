"""The delivery report at 1280 px, as an auditor looks at it in headless Chromium: a month of look-back
reads by runs with long ids. Every table fits the window, the run ids, the runs that read each day and
the runs' messages are in full view, and the days on which nothing was read are folded into one line."""
from __future__ import annotations

import html
import json
import re
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select

from lead_sync import stages
from lead_sync.audit import report, runs
from lead_sync.clock import utcnow
from lead_sync.db.schema import sync_runs
from lead_sync.db.stores import ensure_stores
from lead_sync.delivery.settings import ApiSettings, ApiTarget
from lead_sync.read.config import load_config
from lead_sync.read.partition import Partition

from tests.support import TOKEN, signups, verifications
from tests.support.browser import headless

WIDTH, HEIGHT = 1280, 900
LOOKBACK = 30  # the report's default window too: every day of it is read
TODAY = utcnow().date()
DAY = TODAY - timedelta(days=1)
SIGNUP_DAYS = (DAY - timedelta(days=12), DAY - timedelta(days=1), DAY)  # the only days with source rows
# Run ids as Airflow makes them, and one given by hand: long, with nowhere to break but its underscores.
EARLY_RUN = f"scheduled__{DAY - timedelta(days=1)}T06:00:00+00:00"
DRY_RUN = f"manual__{TODAY}T07:12:09.482913+00:00"
LONG_RUN = f"manual__rerun_after_the_vendor_outage_requested_by_the_audit_team_{TODAY:%Y_%m_%d}"
LATEST_RUN = f"scheduled__{DAY}T06:00:00+00:00"

# What the page looks like in the browser: the layout of every table, and of the cells an auditor reads.
MEASURE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right}; };
const cell = e => ({...box(e), overflow: e.scrollWidth > e.clientWidth + 1, text: e.textContent.trim()});
const cells = (table, col) => [...document.querySelectorAll(`#${table} td[data-col="${col}"]`)].map(cell);
const out = document.body.appendChild(document.createElement('pre'));
out.id = 'layout';
out.textContent = JSON.stringify({
  viewport: document.documentElement.clientWidth,
  scrollWidth: document.documentElement.scrollWidth,
  tables: Object.fromEntries([...document.querySelectorAll('table')].map(t => [t.id, box(t)])),
  runIds: cells('runs-table', 'run_id'), messages: cells('runs-table', 'message'),
  readBy: cells('reconciliation-table', 'read_by_run'),
  reconciliationDays: [...document.querySelectorAll('#reconciliation-table > tbody > tr')].map(
    tr => tr.querySelector('td[data-col="partition_date"]')?.textContent.trim() || null),
  fold: document.querySelector('#reconciliation .fold')?.innerText || null,
});
</script>"""


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute)


def build_month(wh, sandbox) -> None:
    """Signups on three days of the month, verifications on one; four runs, newest last: a real run of
    the day before yesterday, a dry run and a rerun (one event rejected) of yesterday, each reading
    30 days back, then yesterday's scheduled run (3 days back) whose sending never ran."""
    ensure_stores(wh.engine)  # as each task does before its stage
    wh.create_sources()
    wh.add(signups, *(dict(customer_external_id=100 * n + i, click_id=f"click-{n}-{i}", customer_name=None,
                           customer_email=None, customer_avatar=None, signed_up_at=at(day, 8, i),
                           requires_verification=False)
                      for n, day in enumerate(SIGNUP_DAYS, start=1) for i in range(3)))
    wh.add(verifications, dict(customer_external_id="301", event_name="email_verified",
                               verified_at=datetime(DAY.year, DAY.month, DAY.day, 9, tzinfo=ZoneInfo("UTC"))))
    config = load_config().model_copy(update={"lookback_days": LOOKBACK})
    api = ApiTarget(sandbox.url, TOKEN, ApiSettings(max_attempts=1, backoff_base_seconds=0.01))
    sandbox.set_faults({"permanent_errors": {"302": 422}})

    stages.extract_and_map(wh.engine, config, Partition(DAY - timedelta(days=1), config.zone), EARLY_RUN)
    stages.send(wh.engine, api, EARLY_RUN, 30)
    runs.summarise(wh.engine, EARLY_RUN, DAY - timedelta(days=1))
    stages.extract_and_map(wh.engine, config, Partition(DAY, config.zone), DRY_RUN, dry_run=True)
    runs.summarise(wh.engine, DRY_RUN, DAY)
    stages.extract_and_map(wh.engine, config, Partition(DAY, config.zone), LONG_RUN)
    stages.send(wh.engine, api, LONG_RUN, 30)
    runs.summarise(wh.engine, LONG_RUN, DAY)
    short = config.model_copy(update={"lookback_days": 3})
    stages.extract_and_map(wh.engine, short, Partition(DAY, config.zone), LATEST_RUN)
    runs.summarise(wh.engine, LATEST_RUN, DAY)  # no send: the run fails, with a message saying why


def spans(days: list[date]) -> str:
    """Days as the fold line names them: runs of consecutive days as 'first - last'."""
    out: list[list[date]] = []
    for day in sorted(days):
        if out and day - out[-1][-1] == timedelta(days=1):
            out[-1].append(day)
        else:
            out.append([day])
    return ", ".join(str(s[0]) if len(s) == 1 else f"{s[0]} - {s[-1]}" for s in out)


def test_report_fits_1280_px(sqlite_warehouse, sandbox, tmp_path, chromium):
    build_month(sqlite_warehouse, sandbox)
    with sqlite_warehouse.engine.connect() as conn:
        messages = dict(conn.execute(select(sync_runs.c.run_id, sync_runs.c.message)).all())
    assert set(messages) == {EARLY_RUN, DRY_RUN, LONG_RUN, LATEST_RUN} and messages[LATEST_RUN] and messages[DRY_RUN]
    data = report.load_report(sqlite_warehouse.engine, days=LOOKBACK)
    window = [data.since + timedelta(days=n) for n in range((TODAY - data.since).days)]  # partitions up to DAY
    assert len(window) == LOOKBACK
    assert {r["partition_date"] for r in data.reconciliation} == set(window)  # every day of the month was read
    page = tmp_path / "report.html"
    page.write_text(report.render_html(data), encoding="utf-8")

    shot = tmp_path / "report.png"
    taken = headless(chromium, tmp_path / "profile", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
                     page.as_uri())
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    try:
        from PIL import Image
    except ImportError:
        pass  # the layout below is checked all the same
    else:
        image = Image.open(shot).convert("L")
        assert image.size == (WIDTH, HEIGHT)
        inked = sum(n for shade, n in enumerate(image.histogram()) if shade < 240)
        assert inked > WIDTH * HEIGHT // 100, "the screenshot is blank"

    # The same page with a script that reads its layout out into the DOM Chromium dumps.
    measured = tmp_path / "measured.html"
    measured.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dumped = headless(chromium, tmp_path / "profile", f"--window-size={WIDTH},{HEIGHT}", "--dump-dom",
                      measured.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    found = re.search(r'<pre id="layout">(.*?)</pre>', dumped.stdout, re.S)
    assert found, dumped.stdout[-2000:]
    layout = json.loads(html.unescape(found.group(1)))

    viewport = layout["viewport"]
    assert 1200 <= viewport <= WIDTH  # the window's width, less a scrollbar
    assert layout["scrollWidth"] <= WIDTH, "the page scrolls sideways"
    assert {"runs-table", "reconciliation-table", "daily-table", "attention-table"} <= set(layout["tables"])
    for name, table in layout["tables"].items():
        assert 0 <= table["left"] and table["right"] <= viewport, (name, table)

    def in_view(cells: list[dict], what: str) -> None:
        for cell in cells:
            assert 0 <= cell["left"] and cell["right"] <= viewport and not cell["overflow"], (what, cell)

    in_view(layout["runIds"], "run id")
    assert [c["text"] for c in layout["runIds"]] == [LATEST_RUN, LONG_RUN, DRY_RUN, EARLY_RUN]  # whole, newest first
    in_view(layout["messages"], "message")
    assert {c["text"] for c in layout["messages"]} >= {messages[LATEST_RUN], messages[DRY_RUN]}
    in_view(layout["readBy"], "read_by_run")
    assert layout["readBy"] and {c["text"] for c in layout["readBy"]} <= {LONG_RUN, LATEST_RUN}

    # Days with nothing read are one line; the days with source rows keep theirs, one per source.
    shown = [day for day in layout["reconciliationDays"] if day]
    assert sorted(set(shown)) == [str(d) for d in SIGNUP_DAYS] and len(shown) == 2 * len(SIGNUP_DAYS)
    assert len(layout["reconciliationDays"]) < len(window)
    empty = [d for d in window if d not in SIGNUP_DAYS]
    assert layout["fold"] and layout["fold"].startswith(f"{len(empty)} days with nothing read: {spans(empty)}"), \
        layout["fold"]
