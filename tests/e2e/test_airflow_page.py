"""The "Lead deliveries" page inside Airflow's UI (contract section 10), end to end.

A real `airflow api-server` (PostgreSQL metadata database, simple auth manager with a viewer
and a user with no role) serves the plugin's page from a warehouse the core pipeline filled
against the API sandbox. Anonymous requests get 401 and no data; a logged-in user the auth
manager does not let read the DAG lead_events_sync gets 403 and no data; the viewer gets the
report and the customer lookup; a headless Chromium with the UI's `_token` cookie renders the
page (chart and counts) and finds the "Lead deliveries" link in the UI's navigation.
"""
from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from tests.support.dagrun import airflow_cli_env
from tests.support.processes import free_port, start, stop, wait_for
from lead_sync import stages
from lead_sync.audit import runs
from lead_sync.db.stores import ensure_stores
from lead_sync.read.config import load_config
from lead_sync.read.partition import Partition
from lead_sync.delivery.settings import ApiSettings, ApiTarget
from tests.support import TOKEN, apt_install, signups

PREFIX = "/lead-deliveries"
USER = "auditor"
# Logged in, but with no role: the simple auth manager grants such a user nothing, no DAG read either.
OUTSIDER = "outsider"

# A customer whose name, e-mail and click id must never reach a page; one the API rejects (422).
ZELDA = 4242
ZELDA_NAME, ZELDA_EMAIL, ZELDA_CLICK = "Zelda Quuxley", "zelda.quux@example.org", "zq-click-8c1f"
REJECTED = 4243
UNKNOWN = 987654
SECRETS = ("Zelda", "Quuxley", "zelda.quux", "example.org", ZELDA_CLICK, TOKEN)  # nor the API token


# --- helpers ---------------------------------------------------------------------------------

def _login(base: str, home: Path, user: str) -> str:
    """A JWT for `user`, with the password the simple auth manager generated."""
    password_file = home / "simple_auth_manager_passwords.json.generated"

    def password():
        try:
            return json.loads(password_file.read_text()).get(user)
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # not written yet, or being written

    secret = wait_for(password, 30, f"{user}'s generated password")
    login = requests.post(f"{base}/auth/token", json={"username": user, "password": secret}, timeout=10)
    assert login.status_code in (200, 201), login.text
    return login.json()["access_token"]


def _assert_refused(answer: requests.Response, where: str) -> None:
    """403 with the plain notice page and nothing of the deliveries."""
    assert answer.status_code == 403, (where, answer.status_code, answer.text[:300])
    assert answer.headers["content-type"].startswith("text/html"), where
    assert '<h2 id="notice">Not allowed</h2>' in answer.text and "lead_events_sync" in answer.text, where
    for data in ("delivered", "rejected", str(ZELDA), str(REJECTED), "<table", "<svg", "<form", "Traceback"):
        assert data not in answer.text, (where, data)
    _no_secrets(answer.text, where)







def _no_secrets(text: str, where: str) -> None:
    found = [s for s in SECRETS if s.lower() in text.lower()]
    assert not found, f"{where} shows {found}"


def _card(page: str, status: str) -> int:
    match = re.search(rf'data-status="{status}">\s*<div class="n">([0-9,]+)</div>', page)
    assert match, f"no {status} card in the report"
    return int(match.group(1).replace(",", ""))


def _seed(wh, sandbox, day) -> None:
    """Source rows for `day`, then the core pipeline's extract, send and summary (as a DAG run does)."""
    moment = datetime.combine(day, datetime.min.time())

    def row(cid, minute, click: str | None = "", name=None, email=None):
        return dict(customer_external_id=cid, click_id=click or (None if click is None else f"click-{cid}"),
                    customer_name=name, customer_email=email, customer_avatar=None,
                    signed_up_at=moment + timedelta(hours=8, minutes=minute), requires_verification=False)

    ensure_stores(wh.engine)  # as each task does before its stage
    wh.create_sources()
    wh.add(signups, row(ZELDA, 1, click=ZELDA_CLICK, name=ZELDA_NAME, email=ZELDA_EMAIL), row(4244, 2), row(4245, 3),
           row(REJECTED, 4), row(4246, 5, click=None))  # the last: skipped, no click id
    sandbox.set_faults({"permanent_errors": {str(REJECTED): 422}})
    config = load_config()
    run_id = f"manual__page_{secrets.token_hex(3)}"
    summary = stages.extract_and_map(wh.engine, config, Partition(day, config.zone), run_id)
    assert summary["new"] == 5, summary
    api = ApiTarget(sandbox.url, TOKEN, ApiSettings(max_attempts=1, backoff_base_seconds=0.01, timeout_seconds=5,
                                                    rate_limit_per_minute=600))
    report = stages.send(wh.engine, api, run_id, 60)
    assert (report.delivered, report.rejected) == (3, 1), report
    # Zelda's name, e-mail and click id really went out: the pages have them to hide.
    (sent,) = [r["body"] for r in sandbox.requests() if r["body"].get("customerExternalId") == str(ZELDA)]
    assert (sent.get("customerName"), sent.get("customerEmail"), sent.get("clickId")) == (
        ZELDA_NAME, ZELDA_EMAIL, ZELDA_CLICK), sent
    runs.summarise(wh.engine, run_id, day)
    assert wh.status_counts() == {"delivered": 3, "rejected": 1, "skipped": 1}


# --- headless Chromium over the DevTools protocol ----------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


def _chromium() -> str:
    """Debian's chromium."""
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return apt_install("chromium", "chromium")


class DevTools:
    """Just enough of the Chrome DevTools Protocol: call a method, evaluate JavaScript, wait."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self._stack = ExitStack()
        self._ws = self._stack.enter_context(connect(ws_url, max_size=None, open_timeout=15))
        self._next = 0

    def call(self, method: str, timeout: float = 30, **params):
        self._next += 1
        ident = self._next
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} within {timeout} s")
            message = json.loads(self._ws.recv(timeout=left))
            if message.get("id") == ident:  # events in between are not needed here
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, timeout: float = 30) -> None:
        self.call("Page.navigate", url=url)
        wait_for(lambda: self.evaluate(f"location.href === {json.dumps(url)} && document.readyState === 'complete'"),
              timeout, f"{url} to load", every=0.2)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self._stack.close()


def _devtools(user_data: Path, proc: subprocess.Popen) -> DevTools:
    port_file = user_data / "DevToolsActivePort"

    def ready():
        assert proc.poll() is None, f"chromium exited with {proc.returncode}"
        return port_file.exists() and len(port_file.read_text().split()) >= 2

    wait_for(ready, 30, "chromium's DevTools port")
    port = int(port_file.read_text().split()[0])
    targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
    pages = [t for t in targets if t.get("type") == "page"]
    page = pages[0] if pages else requests.put(f"http://127.0.0.1:{port}/json/new?about:blank", timeout=10).json()
    return DevTools(page["webSocketDebuggerUrl"])


# --- fixtures ------------------------------------------------------------------------------------



# --- unit: what the plugin declares ---------------------------------------------------------------

def test_plugin_declares_a_protected_app_and_a_nav_link():
    from fastapi.params import Depends as DependsParam

    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse, FastAPIAppResponse
    from airflow.api_fastapi.core_api.security import get_user
    from lead_sync_airflow import web

    plugin = web.LeadDeliveriesPlugin
    (app,) = plugin.fastapi_apps
    FastAPIAppResponse(**{**app, "app": "x"})
    assert app["url_prefix"] == PREFIX
    (view,) = plugin.external_views
    checked = ExternalViewResponse(**view)
    assert (checked.name, checked.href, checked.destination) == ("Lead deliveries", f"{PREFIX}/", "nav")
    deps = app["app"].router.dependencies
    assert any(isinstance(d, DependsParam) and d.dependency is get_user for d in deps)
    assert any(isinstance(d, DependsParam) and d.dependency is web.may_read_dag for d in deps)  # read on the DAG
    # Every route of the app is an API route (so the dependency applies): no open docs or schema.
    assert {type(r).__name__ for r in app["app"].routes} == {"APIRoute"}


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.postgres
def test_report_page_in_the_airflow_ui(tmp_path, pg_warehouse, sandbox, metadata_db):
    chromium = _chromium()
    day = datetime.now(timezone.utc).date() - timedelta(days=1)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    home = tmp_path / "airflow"
    env = airflow_cli_env(home, pg_warehouse, sandbox.url)
    env.update({
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:viewer,{OUTSIDER}:",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "MPLCONFIGDIR": str(tmp_path / "matplotlib"),
    })
    done = subprocess.run(["airflow", "db", "migrate"], env=env, capture_output=True, text=True, timeout=180, cwd="/")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    procs: list[subprocess.Popen] = []
    logs = open(tmp_path / "api-server.log", "wb")
    browser_log = open(tmp_path / "chromium.log", "wb")
    devtools = None
    try:
        procs.append(start(["airflow", "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                           env, logs))

        def healthy():
            if procs[0].poll() is not None:
                pytest.fail("the API server exited:\n" + (tmp_path / "api-server.log").read_text()[-3000:])
            try:
                return requests.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(healthy, 120, "the API server")
        page = f"{base}{PREFIX}/"
        lookup = f"{base}{PREFIX}/customer"
        assert requests.get(page, timeout=10).status_code == 401  # the plugin is mounted (else the UI's 200)

        # Log in as the viewer and as the user with no role, both created by the simple auth manager.
        token = _login(base, home, USER)
        auth = {"Authorization": f"Bearer {token}"}
        outsider = _login(base, home, OUTSIDER)
        outsider_auth = {"Authorization": f"Bearer {outsider}"}
        # Airflow's own API agrees: the viewer may read the DAG (404: it is not parsed here), the outsider not.
        dag_url = f"{base}/api/v2/dags/lead_events_sync"
        assert requests.get(dag_url, headers=auth, timeout=10).status_code == 404
        assert requests.get(dag_url, headers=outsider_auth, timeout=10).status_code == 403
        # Refused before the warehouse is read: 403, not the missing audit's 404.
        _assert_refused(requests.get(page, headers=outsider_auth, timeout=30), "the page before any run")

        # Before any run: the warehouse has no audit, and the page says so (no traceback).
        missing = requests.get(page, headers=auth, timeout=30)
        assert missing.status_code == 404, missing.text[:500]
        assert "No delivery audit yet" in missing.text and "Traceback" not in missing.text

        _seed(pg_warehouse, sandbox, day)

        # Anonymous, with data in the warehouse: 401 and nothing of it, whatever the route (the UI's
        # single-page app would answer 200 to a path nobody serves).
        for url, params in ((page, None), (lookup, {"id": str(ZELDA)}), (lookup, {"id": "1"})):
            answer = requests.get(url, params=params, timeout=10)
            assert answer.status_code == 401, (url, answer.status_code, answer.text[:300])
            assert answer.json() == {"detail": "Not authenticated"}
            for data in ("delivered", "rejected", str(ZELDA), str(REJECTED), "<table", "<svg", "Lead deliveries"):
                assert data not in answer.text, (url, data)
        # A forged token is no better.
        forged = requests.get(page, headers={"Authorization": "Bearer not.a.jwt"}, cookies={"_token": "x.y.z"},
                              timeout=10)
        assert forged.status_code in (401, 403) and "delivered" not in forged.text and str(ZELDA) not in forged.text
        # Logged in without read access to lead_events_sync: 403 and nothing of the data, by header
        # or by the UI's cookie, on every route (an empty lookup is not redirected either).
        for url, params in ((page, None), (lookup, {"id": str(ZELDA)}), (lookup, {"id": str(REJECTED)}),
                            (lookup, {"id": " "})):
            for how in ({"headers": outsider_auth}, {"cookies": {"_token": outsider}}):
                answer = requests.get(url, params=params, timeout=30, allow_redirects=False, **how)
                _assert_refused(answer, f"{url} {params} {list(how)}")
        # Without the trailing slash the mount does not match: the UI's app shell answers, with no data.
        slashless = requests.get(f"{base}{PREFIX}", timeout=10)
        assert "delivered" not in slashless.text and str(REJECTED) not in slashless.text

        report = requests.get(page, headers=auth, timeout=60)
        assert report.status_code == 200, report.text[:2000]
        assert report.headers["content-type"].startswith("text/html")
        assert "<h1>Lead deliveries</h1>" in report.text  # the route's own page, not the UI's
        assert 'id="deliveries-per-day"' in report.text and '<svg class="chart"' in report.text
        assert f'id="bar-delivered-{day.isoformat()}"' in report.text
        assert [_card(report.text, status) for status in ("delivered", "rejected", "skipped")] == [3, 1, 1]
        assert 'id="latency-overall"' in report.text and 'id="reasons-table"' in report.text
        assert f"<td>{REJECTED}</td>" in report.text  # the rejected event needs attention
        assert f'action="{PREFIX}/customer"' in report.text  # the lookup box
        assert report.headers["cache-control"] == "no-store" and "frame-ancestors 'self'" in report.headers[
            "content-security-policy"]
        # The same with the UI's cookie instead of the header.
        by_cookie = requests.get(page, cookies={"_token": token}, timeout=60)
        assert by_cookie.status_code == 200 and _card(by_cookie.text, "delivered") == 3

        zelda = requests.get(lookup, params={"id": str(ZELDA)}, headers=auth, timeout=30)
        assert zelda.status_code == 200 and "<h1>Customer 4242</h1>" in zelda.text
        assert 'id="customer-table"' in zelda.text and "signup_started" in zelda.text
        assert 'data-status="delivered"' in zelda.text and "no-events" not in zelda.text
        rejected = requests.get(lookup, params={"id": str(REJECTED)}, headers=auth, timeout=30)
        assert 'data-status="rejected"' in rejected.text and "422" in rejected.text
        unknown = requests.get(lookup, params={"id": str(UNKNOWN)}, headers=auth, timeout=30)
        assert unknown.status_code == 200 and 'id="no-events"' in unknown.text and "No events" in unknown.text
        hostile = requests.get(lookup, params={"id": "<script>alert(1)</script>"}, headers=auth, timeout=30)
        assert "<script>" not in hostile.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in hostile.text
        empty = requests.get(lookup, params={"id": " "}, headers=auth, timeout=30, allow_redirects=False)
        assert empty.status_code == 303 and empty.headers["location"] == "./"
        for name, answer in (("report", report), ("customer page", zelda), ("rejected customer", rejected),
                             ("unknown customer", unknown)):
            _no_secrets(answer.text, name)

        # A logged-in browser: the UI's _token cookie, the page rendered.
        user_data = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
        procs.append(start([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", "--remote-debugging-port=0",
                            "about:blank"], dict(os.environ), browser_log, cwd=tmp_path))
        devtools = _devtools(user_data, procs[-1])
        devtools.call("Page.enable")
        assert devtools.call("Network.setCookie", name="_token", value=token, url=base, path="/")["success"]
        devtools.open(page)
        shown = devtools.evaluate("""JSON.stringify({
            h1: document.querySelector('h1')?.innerText,
            text: document.body.innerText,
            chartWidth: document.querySelector('#deliveries-per-day svg.chart')?.getBoundingClientRect().width || 0,
            bars: document.querySelectorAll('#deliveries-per-day svg.chart [id^="bar-"]').length,
            cards: Object.fromEntries([...document.querySelectorAll('.card')].map(
                c => [c.dataset.status, c.querySelector('.n').innerText])),
            lookup: !!document.querySelector('form.lookup input[name="id"]'),
        })""")
        shown = json.loads(shown)
        assert shown["h1"] == "Lead deliveries", shown["text"][:500]
        assert shown["chartWidth"] > 300 and shown["bars"] >= 3, shown
        assert {k: shown["cards"][k] for k in ("delivered", "rejected", "skipped")} == {
            "delivered": "3", "rejected": "1", "skipped": "1"}
        assert shown["lookup"] and "Events that need attention" in shown["text"]
        _no_secrets(shown["text"], "the rendered report")
        devtools.screenshot(tmp_path / "lead-deliveries.png")

        # The search box leads to the customer's events.
        devtools.evaluate(f"document.querySelector('#customer-id').value = '{ZELDA}'; "
                          "document.querySelector('form.lookup').submit(); true")
        wait_for(lambda: devtools.evaluate("location.pathname + location.search") == f"{PREFIX}/customer?id={ZELDA}"
              and devtools.evaluate("document.readyState") == "complete", 20, "the customer page")
        text = devtools.evaluate("document.body.innerText")
        assert "Customer 4242" in text and "signup_started" in text and "delivered" in text
        _no_secrets(text, "the customer page in the browser")

        # Airflow's own UI, logged in by the same cookie, links the page from its navigation.
        devtools.open(f"{base}/")
        link = wait_for(lambda: devtools.evaluate(
            "(() => { const nav = document.querySelector('[data-testid=nav-sidebar]');"
            " const a = nav && [...nav.querySelectorAll('a')].find(a => a.innerText.includes('Lead deliveries')"
            "   || (a.getAttribute('aria-label') || '').includes('Lead deliveries'));"
            " return a ? a.getAttribute('href') : null; })()"), 45, "the Lead deliveries link in the UI's navigation")
        assert link.rstrip("/").endswith("plugin/lead-deliveries"), link
        devtools.screenshot(tmp_path / "airflow-nav.png")
        # Following it shows the report inside the UI (an iframe of /lead-deliveries/).
        devtools.evaluate("[...document.querySelectorAll('[data-testid=nav-sidebar] a')]"
                          ".find(a => (a.getAttribute('href') || '').includes('plugin/lead-deliveries')).click(); true")
        framed = wait_for(lambda: devtools.evaluate(
            "(() => { const f = document.querySelector('iframe');"
            " const d = f && f.contentDocument; return d && d.querySelector('#deliveries-per-day svg.chart')"
            " ? f.getAttribute('src') : null; })()"), 30, "the report inside the UI")
        assert framed.rstrip("/").endswith(PREFIX), framed
        devtools.screenshot(tmp_path / "airflow-plugin-page.png")
    finally:
        if devtools is not None:
            try:
                devtools.close()
            except Exception:
                pass
        stop(procs)
        logs.close()
        browser_log.close()
