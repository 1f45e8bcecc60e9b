"""The delivery report inside Airflow's UI (contract section 10): a page served by the API server.

`airflow api-server` mounts `app` under /lead-deliveries/ and the UI links it from its
navigation. Every route needs a logged-in Airflow user whom the auth manager lets read the DAG
lead_events_sync (contract section 12), checked by app-wide dependencies before a route reads
the warehouse: `get_user` accepts the UI's `_token` cookie or an `Authorization: Bearer <JWT>`
header (from `POST /auth/token`) and answers 401 to anyone else; `may_read_dag` answers 403,
with a plain notice page, to a user without that permission.

What the pages show is `lead_sync.audit.report`'s business (the same report as `make report`, no PII);
this module only wires it to the `warehouse_default` connection.
"""
from __future__ import annotations

import html
import logging

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep, get_user
from airflow.models.dag import DagModel
from airflow.plugins_manager import AirflowPlugin

from lead_sync.audit import report

from lead_sync_airflow.hooks import warehouse_engine

log = logging.getLogger(__name__)

URL_PREFIX = "/lead-deliveries"
TITLE = "Lead deliveries"
WAREHOUSE_CONN_ID = "warehouse_default"
# Whoever may read this DAG may see its deliveries.
DAG_ID = "lead_events_sync"

# The pages need no script and nothing from elsewhere (styles and SVG charts are inline);
# framing is allowed for the Airflow UI itself, which shows the page under /plugin/lead-deliveries.
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                "form-action 'self'; base-uri 'none'; frame-ancestors 'self'"),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


class NotAllowed(Exception):
    """The logged-in user may not read the DAG DAG_ID."""


def may_read_dag(user: GetUserDep) -> None:
    """GET on the DAG DAG_ID, asked of the auth manager as the API's own DAG routes ask it
    (`requires_access_dag`: the DAG's team, if any, from the metadata database)."""
    details = DagDetails(id=DAG_ID, team_name=DagModel.get_team_name(DAG_ID))
    if not get_auth_manager().is_authorized_dag(method="GET", details=details, user=user):
        raise NotAllowed


app = FastAPI(
    title=TITLE,
    # Applies to every route below: no user, no data (401); no read access to the DAG, no data (403).
    dependencies=[Depends(get_user), Depends(may_read_dag)],
    docs_url=None, redoc_url=None, openapi_url=None,  # Starlette routes that would skip the dependencies
)


def _page(body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status_code, headers=_HEADERS)


def _notice(heading: str, line: str, status_code: int) -> HTMLResponse:
    """A plain page saying what is wrong (never a traceback)."""
    return _page(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(TITLE)}</title></head>
<body style="font: 15px/1.5 system-ui, sans-serif; margin: 32px">
<h1>{html.escape(TITLE)}</h1>
<h2 id="notice">{html.escape(heading)}</h2>
<p>{html.escape(line)}</p>
</body></html>
""", status_code)


@app.exception_handler(NotAllowed)
def _not_allowed(request: Request, exc: NotAllowed) -> HTMLResponse:
    return _notice("Not allowed",
                   f"Your Airflow user may not read the DAG {DAG_ID}, so this page shows none of its deliveries; "
                   "an Airflow administrator can grant that access.", 403)


def _base_path(request: Request) -> str:
    """Where this app is mounted (/lead-deliveries, behind any root path the API server has)."""
    return (request.scope.get("root_path") or URL_PREFIX).rstrip("/")


def _render(build) -> HTMLResponse:
    """`build(engine)` -> HTML, against the warehouse; the missing audit and an unusable warehouse as notices."""
    try:
        engine = warehouse_engine(WAREHOUSE_CONN_ID)
    except Exception:
        log.exception("connection %s is not usable for the delivery report", WAREHOUSE_CONN_ID)
        return _notice("The warehouse is not reachable",
                       f"The Airflow connection {WAREHOUSE_CONN_ID} is missing or is not a SQL connection; "
                       "the API server's log has the details.", 503)
    try:
        return _page(build(engine))
    except report.AuditMissing:
        return _notice("No delivery audit yet",
                       "The warehouse has no delivery audit tables (lead_event_deliveries and the rest) yet: "
                       "the first run of lead_events_sync creates them.", 404)
    except Exception:
        log.exception("the delivery report could not be read from %s", WAREHOUSE_CONN_ID)
        return _notice("The report could not be read",
                       f"Reading the delivery audit through {WAREHOUSE_CONN_ID} failed; "
                       "the API server's log has the details.", 503)
    finally:
        engine.dispose()


# Plain `def` routes: FastAPI runs them in its thread pool, so warehouse reads never block the API server.
@app.get("/", response_class=HTMLResponse)
def deliveries_report(request: Request) -> HTMLResponse:
    base_path = _base_path(request)
    return _render(lambda engine: report.render_html(report.load_report(engine), title=TITLE, base_path=base_path))


@app.get("/customer", response_class=HTMLResponse)
def customer_lookup(request: Request, customer_id: str = Query("", alias="id", max_length=256)):
    customer_id = customer_id.strip()
    if not customer_id:
        return RedirectResponse("./", status_code=303)
    base_path = _base_path(request)
    return _render(lambda engine: report.render_customer_html(
        customer_id, report.customer_events(engine, customer_id), title=TITLE, base_path=base_path))


class LeadDeliveriesPlugin(AirflowPlugin):
    name = "lead_deliveries"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": TITLE}]
    # In the UI's navigation; url_route shows the page inside the UI (under /plugin/lead-deliveries).
    external_views = [{
        "name": TITLE,
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "url_route": "lead-deliveries",
        "nav_top_level": True,
    }]
