"""What the look-back costs: a nightly run that re-reads 3 days of 100,000 signups each.

    .venv/bin/python scripts/lookback_cost.py [--rows 100000] [--days 3] [--postgres URL]

Seeds `--days` earlier days of `--rows` signups each, records them and marks them delivered
(as earlier nightly runs would have), then adds a few late rows to those days and runs the
nightly extraction of the next day twice over the same state: once with `lookback_days: 0`
and once with `--days`. Prints seconds, peak memory, late rows found, and what the warehouse
did (PostgreSQL's own statistics: transactions committed, rows updated in the audit).
Source rows are read in chunks of 50,000, so memory does not grow with the look-back.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from datetime import date, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text, update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import new_pg_database, pg_url, signups, source_metadata, write_sources  # noqa: E402

from lead_sync import stages
from lead_sync.db.schema import deliveries, outbox  # noqa: E402
from lead_sync.db.stores import ensure_stores  # noqa: E402
from lead_sync.read.config import load_config  # noqa: E402
from lead_sync.read.partition import Partition  # noqa: E402

HOME = date(2026, 11, 27)


def copy_signups(engine, day: date, rows: int, first_id: int) -> None:
    """Bulk-load one day of signups (PostgreSQL COPY; executemany elsewhere)."""
    start = datetime.combine(day, datetime.min.time())
    step = 86_000 / rows
    values = [(first_id + i, f"clk{first_id + i}", f"Name {i}", f"u{first_id + i}@example.com", None,
               start + timedelta(seconds=i * step), False) for i in range(rows)]
    if engine.dialect.name == "postgresql":
        buf = io.StringIO("".join(f"{a}\t{b}\t{c}\t{d}\t\\N\t{f.isoformat(' ')}\t{'t' if g else 'f'}\n"
                                  for a, b, c, d, _, f, g in values))
        raw = engine.raw_connection()
        try:
            raw.cursor().copy_expert("COPY signups (customer_external_id, click_id, customer_name, customer_email, "
                                     "customer_avatar, signed_up_at, requires_verification) FROM STDIN", buf)
            raw.commit()
        finally:
            raw.close()
    else:
        keys = ("customer_external_id", "click_id", "customer_name", "customer_email", "customer_avatar",
                "signed_up_at", "requires_verification")
        with engine.begin() as conn:
            conn.execute(signups.insert(), [dict(zip(keys, v)) for v in values])


def pg_counters(engine) -> tuple[int, int]:
    if engine.dialect.name != "postgresql":
        return 0, 0
    with engine.connect() as conn:
        commits = conn.execute(text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")).scalar()
        updated = conn.execute(text("SELECT coalesce(n_tup_upd, 0) FROM pg_stat_user_tables "
                                    "WHERE relname = 'lead_event_deliveries'")).scalar() or 0
    return int(commits), int(updated)


def settle_stats(engine) -> None:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:  # statistics are flushed by the backends that made them
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
        time.sleep(1.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000, help="signups per look-back day")
    parser.add_argument("--days", type=int, default=3, help="look-back days")
    parser.add_argument("--late", type=int, default=10, help="late rows added to the look-back days")
    parser.add_argument("--postgres", help="SQLAlchemy URL of an empty PostgreSQL database (default: a new one)")
    parser.add_argument("--sqlite", action="store_true", help="use a SQLite file instead of PostgreSQL")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lookback-"))
    url = f"sqlite:///{folder}/bench.db" if args.sqlite else (args.postgres or pg_url(new_pg_database()))
    engine = create_engine(url)
    source_metadata.create_all(engine)
    ensure_stores(engine)
    behind = [HOME - timedelta(days=n) for n in range(args.days, 0, -1)]
    print(f"seeding {args.days} x {args.rows:,} signups ({engine.dialect.name}) ...", flush=True)
    for n, day in enumerate(behind):
        copy_signups(engine, day, args.rows, first_id=(n + 1) * 10_000_000)
    copy_signups(engine, HOME, 1_000, first_id=90_000_000)
    quiet = load_config(write_sources(folder, lookback_days=0))
    for day in behind:  # the earlier nightly runs, then their deliveries
        stages.extract_and_map(engine, quiet, Partition(day, quiet.zone), f"earlier_{day}")
    with engine.begin() as conn:
        conn.execute(update(deliveries).values(status="delivered", attempts=1, http_status=200))
        conn.execute(outbox.delete())
    for n, day in enumerate(behind):  # loaded after their day's run
        copy_signups(engine, day, args.late // len(behind) + (n < args.late % len(behind)), first_id=80_000_000 + n * 1000)
    with engine.connect() as conn:
        conn.execute(text("ANALYZE")) if engine.dialect.name == "postgresql" else None

    rows = []
    for label, settings in (("lookback_days: 0", dict(lookback_days=0)),
                            (f"lookback_days: {args.days}", dict(lookback_days=args.days))):
        config = load_config(write_sources(folder, **settings))
        with engine.begin() as conn:  # the same starting state for both: the home day's events not on record
            conn.execute(deliveries.delete().where(deliveries.c.partition_date == HOME))
            conn.execute(deliveries.delete().where(deliveries.c.status == "pending"))
        settle_stats(engine)
        commits0, updated0 = pg_counters(engine)
        started = time.perf_counter()
        result = stages.extract_and_map(engine, config, Partition(HOME, config.zone), f"run_{label}")
        seconds = time.perf_counter() - started
        settle_stats(engine)
        commits1, updated1 = pg_counters(engine)
        rows.append((label, seconds, result.get("late_rows", 0), result.get("lookback_known", 0),
                     commits1 - commits0, updated1 - updated0))
    print(f"\nnightly extraction of {HOME} (1,000 signups), {args.days} earlier days of {args.rows:,} delivered "
          f"signups, {args.late} late rows among them; warehouse {engine.dialect.name}")
    print(f"{'':<18} {'seconds':>8} {'late rows':>10} {'passed over':>12} {'commits':>8} {'audit rows updated':>19}")
    for label, seconds, late, known, commits, updated in rows:
        print(f"{label:<18} {seconds:>8.2f} {late:>10} {known:>12,} {commits:>8} {updated:>19}")
    print(f"look-back cost: {rows[1][1] - rows[0][1]:.2f} s for {args.days * args.rows:,} rows re-read")


if __name__ == "__main__":
    main()
