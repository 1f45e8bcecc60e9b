"""Reading sources (sources.py): rows a bounded chunk at a time, values as the driver returns
them, and the shipped SQL's window end to end with the mapping."""
from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine

from lead_sync.mapping.days import map_rows
from lead_sync.read.config import load_config
from lead_sync.read.partition import Partition, days_window
from lead_sync.read.sources import read_source_rows

SOURCES_DIR = Path(__file__).resolve().parents[2] / "include" / "sources"
DAY = date(2026, 11, 27)


def _config(tmp_path: Path, sql: str):
    (tmp_path / "q.sql").write_text(sql, encoding="utf-8")
    (tmp_path / "sources.yaml").write_text(
        "sources:\n  - {name: signups, kind: signup, event_name: signup_started, sql: q.sql}\n", encoding="utf-8")
    return load_config(tmp_path / "sources.yaml")


# --- chunks and values ------------------------------------------------------------------

def test_rows_come_a_bounded_chunk_at_a_time_with_lowercased_names(tmp_path):
    config = _config(tmp_path, "SELECT n AS Customer_External_ID, v AS \"CLICK_ID\" FROM t "
                               "WHERE :window_start <= :window_end ORDER BY n")
    engine = create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (n, v)")
            conn.exec_driver_sql("INSERT INTO t VALUES (?, ?)", [(i, f"c{i}") for i in range(5)])
        chunks = list(read_source_rows(engine, config, config.sources[0], days_window(DAY, DAY), chunk_rows=2))
    finally:
        engine.dispose()
    assert [names for names, _ in chunks] == [["customer_external_id", "click_id"]] * 3
    assert [rows for _, rows in chunks] == [[(0, "c0"), (1, "c1")], [(2, "c2"), (3, "c3")], [(4, "c4")]]


def test_sqlite_values_are_kept_as_stored(tmp_path):
    # An untyped SQLite column keeps each value's own type: the mapping decides what it is.
    config = _config(tmp_path, "SELECT v FROM t WHERE :window_start <= :window_end ORDER BY i")
    engine = create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    stored = [42, 42.5, "42", b"42", None, 2**63 - 1]
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (i, v)")
            conn.exec_driver_sql("INSERT INTO t VALUES (?, ?)", list(enumerate(stored)))
        (names, rows), = read_source_rows(engine, config, config.sources[0], days_window(DAY, DAY))
    finally:
        engine.dispose()
    assert [row[0] for row in rows] == stored
    assert [type(row[0]) for row in rows] == [type(v) for v in stored]


def test_postgres_values_are_the_drivers_own_python_values(pg_warehouse, tmp_path):
    # What the mapping meets from psycopg2 (the server-side cursor): plain Python values, never
    # numpy scalars, NULL as None and a NaN as a NaN.
    config = _config(tmp_path, "SELECT 42::bigint AS a, 42.50::numeric AS b, 'NaN'::numeric AS c, "
                               "'NaN'::float8 AS d, true AS e, 'x'::text AS f, "
                               "TIMESTAMP '2026-11-27 08:00' AS g, TIMESTAMPTZ '2026-11-27 08:00Z' AS h, "
                               "DATE '2026-11-27' AS i, NULL::int AS j, '\\x00'::bytea AS k "
                               "WHERE CAST(:window_start AS date) < CAST(:window_end AS date)")
    (names, rows), = read_source_rows(pg_warehouse.engine, config, config.sources[0], days_window(DAY, DAY))
    assert names == list("abcdefghijk")
    values = dict(zip(names, rows[0]))
    assert {n: type(v).__name__ for n, v in values.items()} == {
        "a": "int", "b": "Decimal", "c": "Decimal", "d": "float", "e": "bool", "f": "str", "g": "datetime",
        "h": "datetime", "i": "date", "j": "NoneType", "k": "memoryview"}
    assert values["g"] == datetime(2026, 11, 27, 8) and values["h"] == datetime(2026, 11, 27, 8, tzinfo=timezone.utc)


def test_reading_and_mapping_import_neither_pandas_nor_numpy():
    code = ("import pkgutil, importlib, sys\n"
            "import lead_sync.read.sources, lead_sync.mapping.days\n"
            "assert not {'pandas', 'numpy'} & set(sys.modules), sorted({'pandas', 'numpy'} & set(sys.modules))\n"
            "import lead_sync\n"
            "for module in pkgutil.walk_packages(lead_sync.__path__, 'lead_sync.'):\n"
            "    importlib.import_module(module.name)\n"
            "assert 'pandas' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


# --- the shipped SQL and the window, end to end -----------------------------------------

def _rows_returned(zone: str, stamps: list[str]) -> list[str]:
    """Text timestamps (as SQLite stores them) that the shipped signups SQL returns for 2026-11-27
    and the mapping keeps for that partition."""
    config = load_config(SOURCES_DIR / "lead_sources.yaml")
    source = config.sources[0]
    part = Partition(DAY, ZoneInfo(zone))
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE signups (customer_external_id, click_id, customer_name, customer_email, "
                                 "customer_avatar, requires_verification, signed_up_at)")
            conn.exec_driver_sql("INSERT INTO signups VALUES (?, 'c', NULL, NULL, NULL, NULL, ?)",
                                 [(i, s) for i, s in enumerate(stamps)])
        kept = []
        for names, rows in read_source_rows(engine, config, source, part.sql_window()):
            events, _ = map_rows(source, names, rows, {part.day: part}, part, {}, {})
            kept += [stamps[int(e.customer_external_id)] for e in events.get(part.day, [])]
        return kept
    finally:
        engine.dispose()


def _edge_stamps(zone: str) -> list[str]:
    """The first and last instant of the partition, written with the extreme real-world offsets."""
    part = Partition(DAY, ZoneInfo(zone))
    stamps = []
    for instant in (part.start, part.end - timedelta(microseconds=1)):
        for hours in (-12, 0, 14):
            stamps.append(instant.astimezone(timezone(timedelta(hours=hours))).isoformat(sep=" "))
    return stamps


@pytest.mark.parametrize("zone", [
    "UTC", "America/New_York", "Asia/Tokyo", "Asia/Kathmandu", "Australia/Sydney",
    "Pacific/Kiritimati", "Pacific/Auckland", "Pacific/Pago_Pago",
])
def test_shipped_sql_returns_every_row_of_the_partition_whatever_its_offset(zone):
    stamps = _edge_stamps(zone)
    assert _rows_returned(zone, stamps) == stamps


def test_shipped_sql_and_mapping_drop_rows_just_outside():
    part = Partition(DAY, ZoneInfo("Asia/Tokyo"))
    before = (part.start - timedelta(microseconds=1)).astimezone(timezone(timedelta(hours=-5))).isoformat(sep=" ")
    after = part.end.astimezone(timezone(timedelta(hours=9))).isoformat(sep=" ")
    assert _rows_returned("Asia/Tokyo", [before, after]) == []
