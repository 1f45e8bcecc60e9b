"""Hooks: Airflow connections turned into the core's clients, configured as the connection says."""
from __future__ import annotations

import json

import airflow  # noqa: F401  (puts the plugins folder on sys.path)
import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from lead_sync.db.schema import ensure_schema, outbox
from lead_sync.delivery.client import InsecureEndpointError
from lead_sync_airflow.hooks import CutMeShortHook, warehouse_engine

from tests.support import TOKEN, cutmeshort_conn

BODY = json.dumps({"customerName": "Erika Mustermann", "customerEmail": "erika.mustermann@example.org"})


def test_a_failed_warehouse_write_never_prints_its_parameters(tmp_path, monkeypatch):
    # Before: SQLite (and any path but psycopg2's COPY) printed the bound outbox body, names and e-mails in it.
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT",
                       json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "warehouse.db")}))
    engine = warehouse_engine()
    ensure_schema(engine)
    with engine.begin() as conn:
        conn.execute(insert(outbox).values(event_key="k1", body=BODY))
    with pytest.raises(IntegrityError) as caught:
        with engine.begin() as conn:
            conn.execute(insert(outbox).values(event_key="k1", body=BODY))
    shown = f"{caught.value} {caught.value!r}"
    assert "Erika" not in shown and "erika.mustermann" not in shown
    assert "parameters hidden" in shown
    engine.dispose()


def test_a_postgres_connection_is_read_and_written_through_psycopg2_unless_it_names_a_driver(monkeypatch):
    # The core's bulk paths on PostgreSQL (COPY, server-side cursors) are psycopg2's; the provider
    # itself would pick psycopg 3, on which the core takes its slower generic paths.
    postgres = {"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "u", "schema": "w"}
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", json.dumps(postgres))
    assert warehouse_engine().dialect.driver == "psycopg2"
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT",
                       json.dumps({**postgres, "extra": {"sqlalchemy_scheme": "postgresql+psycopg"}}))
    assert warehouse_engine().dialect.driver == "psycopg"


def test_get_conn_is_the_client_the_connection_describes(sandbox, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_CUTMESHORT_DEFAULT", cutmeshort_conn(sandbox.url, timeout_seconds=3))
    hook = CutMeShortHook()
    with hook.get_conn() as client:
        assert client.base_url == sandbox.url and client.timeout_seconds == 3
        assert client.track_lead({"eventName": "signup_started", "customerExternalId": "1", "clickId": "c-1",
                                  "timestamp": "2026-11-27T08:00:00Z"}).http_status == 200
    assert [r["authorized"] for r in sandbox.requests()] == [True]


def test_get_conn_refuses_verify_false_to_a_remote_host_naming_the_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_CME", json.dumps({"conn_type": "http", "host": "https://api.cme.sh",
                                                        "password": TOKEN, "extra": {"verify": False}}))
    with pytest.raises(InsecureEndpointError, match="connection 'cme': verify: false"):
        CutMeShortHook("cme").get_conn()


def test_a_connection_port_out_of_range_is_refused_as_such(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_CME", json.dumps({"conn_type": "http", "host": "http://127.0.0.1",
                                                        "port": 99999, "password": TOKEN}))
    with pytest.raises(InsecureEndpointError, match="1 to 65,535"):
        CutMeShortHook("cme").get_conn()
