"""Hooks: turn Airflow connections into the core's clients."""
from __future__ import annotations

from urllib.parse import urlsplit

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from sqlalchemy.engine import Engine

from lead_sync.delivery.client import CutMeShortClient
from lead_sync.delivery.settings import ApiSettings, ApiTarget, parse_api_settings
from lead_sync.db.engines import prepare_engine
from lead_sync.db.stores import Stores, open_stores

STATE_CONN_ID = "lead_sync_state"
# The core's bulk paths on PostgreSQL (COPY, server-side cursors) are psycopg2's. The postgres
# provider builds psycopg 3 engines when that is installed, on which the core takes its generic
# paths instead (SQLAlchemy's INSERTs, a join per batch of keys): about twice the CPU for a large partition.
POSTGRES_SCHEME = "postgresql+psycopg2"


def warehouse_engine(conn_id: str = "warehouse_default") -> Engine:
    """Any SQL connection whose provider hook builds a SQLAlchemy engine (common-sql)."""
    return prepare_engine(_sql_engine(BaseHook.get_connection(conn_id), conn_id))


def _sql_engine(conn, conn_id: str) -> Engine:
    hook_params = None
    if conn.conn_type == "postgres" and not conn.extra_dejson.get("sqlalchemy_scheme"):
        hook_params = {"sqlalchemy_scheme": POSTGRES_SCHEME}  # one that names a driver keeps it
    hook = conn.get_hook(hook_params=hook_params)
    if not hasattr(hook, "get_sqlalchemy_engine"):
        raise ValueError(f"connection {conn_id!r} is not a SQL connection with a SQLAlchemy engine")
    # SQL errors never print their bound parameters: outbox bodies hold names and e-mails.
    return hook.get_sqlalchemy_engine(engine_kwargs={"hide_parameters": True})


def stores(warehouse_conn_id: str = "warehouse_default", state_conn_id: str = STATE_CONN_ID) -> Stores:
    """The warehouse, and the state store when connection `lead_sync_state` exists (else the
    warehouse keeps the delivery state)."""
    warehouse = warehouse_engine(warehouse_conn_id)
    try:
        conn = BaseHook.get_connection(state_conn_id)
    except AirflowNotFoundException:
        return open_stores(warehouse, None)
    return open_stores(warehouse, _sql_engine(conn, state_conn_id), state_conn_id)


class CutMeShortHook(BaseHook):
    """`cutmeshort_default`: conn type http, host = base URL, password = API token (sent as a bearer token).

    The stock HttpHook would send the password as basic auth; this hook never does.
    """

    conn_name_attr = "cutmeshort_conn_id"
    default_conn_name = "cutmeshort_default"
    conn_type = "http"
    hook_name = "CutMeShort"

    def __init__(self, cutmeshort_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.cutmeshort_conn_id = cutmeshort_conn_id
        self._conn = self.get_connection(cutmeshort_conn_id)

    @property
    def base_url(self) -> str:
        host = (self._conn.host or "").strip()
        if not host:
            raise ValueError(f"connection {self.cutmeshort_conn_id!r} has no host (the API base URL)")
        if "://" not in host:
            host = f"{self._conn.schema or 'https'}://{host}"
        if self._conn.port and not urlsplit(host).port:
            host = f"{host.rstrip('/')}:{self._conn.port}"
        return host

    @property
    def settings(self) -> ApiSettings:
        return parse_api_settings(self._conn.extra_dejson, self.cutmeshort_conn_id)

    def _token(self) -> str:
        token = self._conn.password
        if not token:
            raise ValueError(f"connection {self.cutmeshort_conn_id!r} has no password (the API token)")
        return token

    def get_conn(self) -> CutMeShortClient:
        """The API client configured from the connection (as the HTTP provider's hook makes its
        session): base URL, bearer token, timeouts, `verify`, `cert`; proxies and the CA bundle
        from the environment, as requests reads them."""
        return self.target().client()

    def target(self) -> ApiTarget:
        """What the core's send stage needs besides the client (`lead_sync.stages.send`)."""
        return ApiTarget(self.base_url, self._token(), self.settings, self.cutmeshort_conn_id)
