"""Contract section 2: `airflow dags test` with only the named environment (no PYTHONPATH, pools, variables)."""
from __future__ import annotations

import pytest

from tests.support.dagrun import airflow_cli
from tests.support import TOKEN
from tests.support.seeding import seed_basic


@pytest.mark.postgres
def test_dags_test_syncs_the_inferred_day_then_the_conf_day(airflow_db, pg_warehouse, sandbox):
    seed_basic(pg_warehouse)
    done = airflow_cli(airflow_db, pg_warehouse, sandbox.url, "2026-11-28")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {l["customerExternalId"] for l in sandbox.leads()} == {"1", "2"}  # partition 2026-11-27 only

    done = airflow_cli(airflow_db, pg_warehouse, sandbox.url, "2026-11-28", "-c", '{"partition_date": "2026-11-28"}')
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [l["customerExternalId"] for l in sandbox.leads()][-1] == "4"
    assert {r["partition_date"].isoformat() for r in pg_warehouse.runs()} == {"2026-11-27", "2026-11-28"}


@pytest.mark.postgres
def test_refused_token_fails_the_run_names_the_connection_and_hides_the_token(airflow_db, pg_warehouse, sandbox):
    seed_basic(pg_warehouse)
    sandbox.set_faults({"revoked": True})
    done = airflow_cli(airflow_db, pg_warehouse, sandbox.url, "2026-11-28")
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert "cutmeshort_default" in output
    assert TOKEN not in output
    assert len(sandbox.requests()) == 1  # stopped at the first refusal
    assert pg_warehouse.status_counts().get("rejected", 0) == 0
    assert pg_warehouse.deliveries()[("1", "signup_started")]["status"] == "pending"
