"""Reruns of the seeded partition (tests.delivery.test_sender's seed), as the extract task makes them."""
from __future__ import annotations

from datetime import timedelta

from lead_sync import stages
from lead_sync.db.stores import ensure_stores
from lead_sync.read.config import load_config
from lead_sync.read.partition import Partition

from tests.delivery.test_sender import PARTITION, new_run_id, outbox_body, row

NEXT_DAY = Partition(PARTITION.day + timedelta(days=1), PARTITION.zone)  # its run re-reads PARTITION as open


def rerun(wh, day=PARTITION) -> dict:
    """stages.extract_and_map of `day` (the seeded partition, or a later one that re-reads it as open)."""
    ensure_stores(wh.engine)  # as each task does before its stage
    return stages.extract_and_map(wh.engine, load_config(), day, new_run_id())


def rename(wh, note: str) -> None:
    """Every signup's source row changes (its name, so its payload): a rerun wants to rewrite each open event."""
    wh.execute(f"UPDATE signups SET customer_name = 'Name {note} ' || customer_external_id")


def row_and_body(wh, cid: int) -> tuple[dict, dict | None]:
    found = row(wh, cid)
    return found, outbox_body(wh, found["event_key"])
