"""`make report`: the delivery report, one self-contained HTML file, from a warehouse's audit tables.

    python scripts/report.py [--warehouse URL] [--out PATH] [--days N]

Defaults: the demo warehouse (.demo/warehouse.db) and .demo/report.html.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from lead_sync.audit.report import AuditMissing, load_report, render_html

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WAREHOUSE = "sqlite:///.demo/warehouse.db"
DEFAULT_OUT = ".demo/report.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the lead delivery report (one HTML file).")
    parser.add_argument("--warehouse", default=DEFAULT_WAREHOUSE, help=f"SQLAlchemy URL (default {DEFAULT_WAREHOUSE})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"HTML file to write (default {DEFAULT_OUT})")
    parser.add_argument("--days", type=int, default=30, help="partition days the report covers (default 30)")
    args = parser.parse_args(argv)

    try:
        url = make_url(args.warehouse)
    except ArgumentError:
        print(f"report: not a SQLAlchemy URL: {args.warehouse!r}", file=sys.stderr)
        return 2
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not url.database.startswith("file:") and not Path(url.database).exists():
        # connecting would create an empty file
        print(f"report: no audit tables in {shown}: the database file does not exist "
              "(run the pipeline first, e.g. make demo)", file=sys.stderr)
        return 1
    engine = create_engine(url)
    try:
        data = load_report(engine, days=args.days)
    except AuditMissing:
        print(f"report: no audit tables in {shown} (lead_event_deliveries is missing; "
              "run the pipeline first, e.g. make demo)", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"report: cannot read {shown}: {first}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
