"""Fault campaign: send a partition through every transient fault the sandbox can inject, then count.

    .venv/bin/python scripts/fault_campaign.py [--events 200] [--rate 100] [--postgres URL]

Prints faults injected per kind, events delivered, lost (must be 0), delivered twice and the
busiest 60 s window the API saw against the limit. Runs the core pipeline (the same code the
DAG's operators call) against the sandbox as a separate process, in passes like nightly runs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import create_engine, func, select, update

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import seed  # noqa: E402
from cutmeshort_sandbox.process import SandboxProcess
from lead_sync import stages
from lead_sync.db.schema import deliveries
from lead_sync.db.stores import ensure_stores
from lead_sync.read.config import load_config
from lead_sync.read.partition import Partition
from lead_sync.delivery.settings import ApiSettings, ApiTarget

FAULTS = {"burst_429": {"count": 5, "retry_after": 2}, "error_rate": 0.1, "error_status": 503,
          "slow_rate": 0.04, "slow_ms": 1500, "reset_rate": 0.04, "seed": 11}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200, help="signups (a quarter also verified)")
    parser.add_argument("--rate", type=int, default=100, help="rate_limit_per_minute, for us and the sandbox")
    parser.add_argument("--postgres", help="SQLAlchemy URL of an empty PostgreSQL database (default: SQLite)")
    args = parser.parse_args()
    engine = create_engine(args.postgres or f"sqlite:///{tempfile.mkdtemp()}/campaign.db")
    seed(engine, args.events)
    ensure_stores(engine)  # as each task does before its stage
    config = load_config()
    partition = Partition(date(2026, 11, 27), ZoneInfo("UTC"))
    started = time.monotonic()
    with SandboxProcess(token="campaign", rate_limit_per_minute=args.rate, faults=FAULTS) as sandbox:
        api = ApiTarget(sandbox.url, "campaign", ApiSettings(
            rate_limit_per_minute=args.rate, timeout_seconds=1.0, max_attempts=4, backoff_base_seconds=0.2,
            backoff_max_seconds=2))
        for run in range(1, 6):  # like successive runs: what one leaves open, the next retries
            run_id = f"campaign-{run}"
            stages.extract_and_map(engine, config, partition, run_id)
            stages.send(engine, api, run_id, 3600)
            with engine.begin() as conn:
                open_left = conn.execute(select(func.count()).where(deliveries.c.status == "pending")).scalar()
                # As if the wait before the next run's retry (next_attempt_at) had passed.
                conn.execute(update(deliveries).values(next_attempt_at=None))
            if not open_left:
                break
        requests, stats = sandbox.requests(), sandbox.stats()
    with engine.connect() as conn:
        audit = dict(conn.execute(select(deliveries.c.status, func.count()).group_by(deliveries.c.status)).all())
        expected = conn.execute(select(func.count()).select_from(deliveries)).scalar()
    accepted = Counter((r["body"]["customerExternalId"], r["body"]["eventName"]) for r in requests if r["status"] == 200)
    seen = Counter((r["body"]["customerExternalId"], r["body"]["eventName"]) for r in requests
                   if r["status"] in (200, 409))
    print(f"warehouse            {engine.dialect.name}, {run} run(s), {time.monotonic() - started:.0f}s")
    print(f"events               {expected} (audit: {audit})")
    print(f"requests             {stats['requests']}  by status {stats['by_status']}  resets {stats['resets']}")
    print(f"faults injected      {dict(Counter(r['fault'] for r in requests if r['fault']))}")
    print(f"delivered            {len(accepted)}")
    print(f"lost                 {expected - len(accepted)}")
    print(f"accepted twice       {sum(1 for n in accepted.values() if n > 1)}")
    print(f"reached API twice    {sum(1 for n in seen.values() if n > 1)} (a 409 after an unanswered attempt)")
    print(f"max requests in 60s  {stats['max_requests_in_any_60s']} (limit {args.rate})")


if __name__ == "__main__":
    main()
