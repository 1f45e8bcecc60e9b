"""Throughput figures: extract-and-map and delivery against the sandbox, on SQLite or PostgreSQL.

    .venv/bin/python scripts/benchmark.py [--rows 5000] [--postgres postgresql+psycopg2://...]

Prints rows/s for extract-and-map and events/s for sending (the rate limit lifted, so the
figure is the pipeline's own ceiling; at the API's default limit delivery is 1 event/s).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import create_engine, insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import signups, source_metadata, verifications  # noqa: E402

from cutmeshort_sandbox import SandboxServer  # noqa: E402
from lead_sync import stages
from lead_sync.db.schema import drop_schema  # noqa: E402
from lead_sync.db.stores import ensure_stores  # noqa: E402
from lead_sync.read.config import load_config  # noqa: E402
from lead_sync.read.partition import Partition  # noqa: E402
from lead_sync.delivery.settings import ApiSettings, ApiTarget  # noqa: E402

DAY = date(2026, 11, 27)


def seed(engine, rows: int) -> None:
    source_metadata.drop_all(engine)
    drop_schema(engine)
    source_metadata.create_all(engine)
    start = datetime(2026, 11, 27)
    step = 86_000 / rows
    people = [dict(customer_external_id=i, click_id=f"clk{i}", customer_name=f"Name {i}",
                   customer_email=f"u{i}@example.com", customer_avatar=None,
                   signed_up_at=start + timedelta(seconds=i * step), requires_verification=i % 4 == 0)
              for i in range(rows)]
    checks = [dict(customer_external_id=str(p["customer_external_id"]), event_name="email_verified",
                   verified_at=p["signed_up_at"].replace(tzinfo=timezone.utc)) for p in people if p["requires_verification"]]
    with engine.begin() as conn:
        conn.execute(insert(signups), people)
        conn.execute(insert(verifications), checks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--postgres", help="SQLAlchemy URL of an empty PostgreSQL database to use instead of SQLite")
    args = parser.parse_args()
    url = args.postgres or f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    engine = create_engine(url)
    seed(engine, args.rows)
    config = load_config()
    partition = Partition(DAY, ZoneInfo("UTC"))

    started = time.perf_counter()
    ensure_stores(engine)  # as the extract task does before its stage
    extracted = stages.extract_and_map(engine, config, partition, "bench")
    mapped_s = time.perf_counter() - started
    events = extracted["new"]

    with SandboxServer(port=0, token="bench", rate_limit_per_minute=0) as sandbox:
        api = ApiTarget(sandbox.url, "bench", ApiSettings(rate_limit_per_minute=10_000_000))
        started = time.perf_counter()
        report = stages.send(engine, api, "bench", 3600)
        send_s = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"warehouse      {engine.dialect.name}")
    print(f"source rows    {args.rows} signups + {events - args.rows} verifications")
    print(f"extract+map    {mapped_s:.2f}s  ({events / mapped_s:,.0f} events/s)")
    print(f"send           {report.requests} requests, {report.delivered} delivered in {send_s:.2f}s "
          f"({report.delivered / send_s:,.0f} events/s, rate limit lifted)")
    print(f"peak RSS       {peak_mb:,.0f} MiB")


if __name__ == "__main__":
    main()
