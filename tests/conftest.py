"""Shared fixtures. Airflow is configured here, before anything imports it."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_HOME = Path(tempfile.mkdtemp(prefix="lead-sync-airflow-"))
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME / 'airflow.db'}",
}
os.environ.update(AIRFLOW_ENV)
os.environ.pop("LEAD_SYNC_SOURCES", None)

import pytest  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402

from cutmeshort_sandbox import SandboxServer  # noqa: E402

from tests.support import TOKEN, Warehouse, drop_pg_database, new_pg_database, pg_database, pg_url  # noqa: E402
from tests.support.clock import FakeClock  # noqa: E402
from tests.support.vendor import assert_vendor_schema  # noqa: E402

# Fixtures of their own modules, for tests in several folders: headless Chromium, mail and webhook servers.
pytest_plugins = ["tests.support.browser", "tests.support.inboxes"]


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (once per session)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    return _HOME


@pytest.fixture
def metadata_db() -> str:
    """An Airflow metadata database for a deployment as processes: PostgreSQL, since several
    processes write it at once (SQLite would lock up)."""
    name = new_pg_database()
    yield pg_url(name).render_as_string(hide_password=False)
    drop_pg_database(name)


@pytest.fixture
def pg_warehouse():
    with pg_database() as (name, engine):
        yield Warehouse("postgres", pg_url(name), engine)


@pytest.fixture
def sqlite_warehouse(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    yield Warehouse("sqlite", engine.url, engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", "pg"], ids=["sqlite", "postgres"])
def warehouse(request):
    """Each test using it runs against SQLite and against real PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_warehouse")


@pytest.fixture(params=["sqlite", pytest.param("psycopg2", marks=pytest.mark.postgres),
                        pytest.param("psycopg", marks=pytest.mark.postgres)],
                ids=["sqlite", "postgres", "postgres-psycopg"])
def engine(request):
    """An engine per way of writing: SQLite, PostgreSQL with COPY (psycopg2) and without (psycopg)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_warehouse").engine
        return
    warehouse = request.getfixturevalue("pg_warehouse")
    if request.param == "psycopg2":
        yield warehouse.engine
        return
    other = create_engine(warehouse.url.set(drivername="postgresql+psycopg"))
    yield other
    other.dispose()


@pytest.fixture(autouse=True)
def fake_time_starts_now():
    """Each test's FakeClocks start from the real time (a test's waits move only its own time)."""
    FakeClock.latest = 0.0
    yield


@pytest.fixture
def sandbox():
    """The API sandbox; afterwards, every body the pipeline sent is checked against the vendor's model."""
    with SandboxServer(host="127.0.0.1", port=0, token=TOKEN, rate_limit_per_minute=60) as server:
        yield server
        assert_vendor_schema([r["body"] for r in server.requests() if r["authorized"]])


def pytest_collection_modifyitems(items) -> None:
    """Mark what needs PostgreSQL or Airflow, so that `make test-fast` can leave it out."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if names & {"pg_warehouse", "metadata_db"} or params.get("warehouse") == "pg":
            item.add_marker(pytest.mark.postgres)
        if names & {"airflow_db", "metadata_db"}:
            item.add_marker(pytest.mark.airflow)
        if "metadata_db" in names:  # a deployment of Airflow processes: it needs the machine to itself
            item.add_marker(pytest.mark.serial)
