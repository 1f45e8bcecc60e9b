"""Large partitions (contract section 9): memory does not grow with the partition, and a rerun of
a partition already on record writes nothing.

Not a duration test: the figures compared are peak memory of one size against four times that
size, and rows written, neither of which depends on how fast this machine is. The seconds and
megabytes of one million signups are what scripts/large_partition.py prints (a benchmark).
"""
from __future__ import annotations

import importlib.util

import pytest

from tests.support import ROOT

SMALL = 20_000  # signups; the large run has four times as many


def _script():
    spec = importlib.util.spec_from_file_location("large_partition", ROOT / "scripts" / "large_partition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs() -> dict[int, dict]:
    """A first run and a rerun of extract_and_map at SMALL and 4 x SMALL signups, each in a child
    process of its own (its peak RSS is its alone), each size in a fresh PostgreSQL database."""
    script = _script()
    return {rows: script.measure(rows) for rows in (SMALL, 4 * SMALL)}


@pytest.mark.postgres
@pytest.mark.parametrize("run", ["first", "rerun"])
def test_peak_memory_does_not_grow_with_the_partition(runs, run):
    small, large = runs[SMALL][run], runs[4 * SMALL][run]
    assert large["events"] > 3.9 * small["events"]
    # Four times the rows: about the same peak (the keys read are kept, some 10 MiB here; the rows
    # themselves are read, mapped and recorded a bounded batch at a time).
    assert large["peak_mib"] < 1.3 * small["peak_mib"] + 30, (small, large)


@pytest.mark.postgres
@pytest.mark.parametrize("rows", [SMALL, 4 * SMALL])
def test_a_rerun_of_a_recorded_partition_writes_nothing(runs, rows):
    first, rerun = runs[rows]["first"], runs[rows]["rerun"]
    events = first["result"]["new"]
    assert events == first["events"] and first["written"]["lead_event_deliveries.ins"] == events
    # Every event re-evaluated, none changed: not one audit or outbox row inserted, updated or deleted.
    assert rerun["result"]["reevaluated"] == events and "new" not in rerun["result"]
    assert rerun["written"] == {}, rerun["written"]
