"""Timing inside a process that runs the extraction (scripts/large_partition.py --profile puts this
folder on PYTHONPATH of the task it starts; without its variables it does nothing).

LEAD_SYNC_PHASES=FILE: the wall seconds and calls of the functions named in TARGETS, per thread
(main, the read-ahead thread, the writer thread), and when the process started, when
extract_and_map began and ended and when the process exited, written to FILE as JSON. Only the
functions are wrapped, once their module is imported: nothing of what they do changes.
LEAD_SYNC_CPROFILE=FILE: also cProfile of extract_and_map (its thread only), written to FILE.
A name the code no longer has is listed under "missing" instead of failing the run.
"""
from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import time
from collections import defaultdict

STARTED = time.time()
PHASES = os.environ.get("LEAD_SYNC_PHASES")
CPROFILE = os.environ.get("LEAD_SYNC_CPROFILE")

# module -> functions (a "Class.method" for a method); generators are timed per item they yield.
TARGETS = {
    "lead_sync.stages": ("extract_and_map", "plan_read", "read_source_rows", "map_rows", "account_reads",
                         "publish_audit"),
    "lead_sync.db.stores": ("ensure_stores",),
    "lead_sync.audit.runs": ("start_run",),
    "lead_sync.state.recording": ("record_mapped", "refresh_statistics", "record_reads", "first_per_key",
                                  "_close_missing"),
    "lead_sync.state.on_record": ("recorded_keys", "rows_on_record"),
    "lead_sync.state.spool": ("MappedEvents.add_days", "MappedEvents._read"),
    "lead_sync.state.judge": ("first_events_by_customer",),
    "lead_sync.state.decide": ("decide",),
    "lead_sync.state.writes": ("Writes.__call__", "_update_rows", "_touch_rows"),
    "lead_sync.state.outbox": ("add_bodies", "put_bodies", "drop_bodies"),
    "lead_sync.db.bulk": ("insert_rows",),
}
GENERATORS = {"read_source_rows"}

_seconds: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_marks: dict[str, float] = {"process_started": STARTED}
_missing: list[str] = []
_drivers: set[str] = set()


def _thread() -> str:
    name = threading.current_thread().name
    if threading.current_thread() is threading.main_thread():
        return "main"
    return name.rsplit("_", 1)[0] if name.startswith("lead-sync-read") else name


def _timed(name: str, function, generator: bool):
    if generator:
        @functools.wraps(function)
        def timed_generator(*args, **kwargs):
            key = f"{_thread()}:{name}"
            _calls[key] += 1
            started = time.perf_counter()
            items = function(*args, **kwargs)
            try:
                while True:
                    try:
                        item = next(items)
                    except StopIteration:
                        return
                    finally:
                        _seconds[key] += time.perf_counter() - started
                    yield item
                    started = time.perf_counter()
            finally:
                items.close()
        return timed_generator

    @functools.wraps(function)
    def timed(*args, **kwargs):
        key = f"{_thread()}:{name}"
        _calls[key] += 1
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _seconds[key] += time.perf_counter() - started
    return timed


def _write() -> None:
    report = {"marks": _marks, "missing": _missing, "drivers": sorted(_drivers),
              "seconds": {k: round(v, 3) for k, v in sorted(_seconds.items(), key=lambda kv: -kv[1])},
              "calls": dict(_calls)}
    with open(PHASES, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=1)


def _outermost(function):
    """extract_and_map: its start and end, the drivers of the engines it got, and cProfile of it."""
    @functools.wraps(function)
    def run(stores, *args, **kwargs):
        for engine in (getattr(stores, "warehouse", stores), getattr(stores, "state", stores)):
            dialect = getattr(engine, "dialect", None)
            if dialect is not None:
                _drivers.add(f"{dialect.name}+{dialect.driver}")
        _marks["extract_started"] = time.time()
        profile = None
        if CPROFILE:
            import cProfile
            profile = cProfile.Profile()
            profile.enable()
        try:
            return function(stores, *args, **kwargs)
        finally:
            if profile is not None:
                profile.disable()
                profile.dump_stats(CPROFILE)
            _marks["extract_ended"] = time.time()
            _write()
    return run


def _wrap(module) -> None:
    for path in TARGETS[module.__name__]:
        owner, _, attribute = path.rpartition(".")
        holder = getattr(module, owner, None) if owner else module
        function = getattr(holder, attribute, None) if holder is not None else None
        if function is None:
            _missing.append(f"{module.__name__}.{path}")
            continue
        wrapped = _timed(path, function, attribute in GENERATORS)
        if path == "extract_and_map":
            wrapped = _outermost(wrapped)
        setattr(holder, attribute, wrapped)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the TARGETS of a module as soon as it has been executed."""

    def find_spec(self, name, path=None, target=None):
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _wrap(module)
        spec.loader.exec_module = exec_module
        return spec


def _at_exit() -> None:
    _marks["process_exited"] = time.time()
    _write()


if PHASES:
    sys.meta_path.insert(0, _AfterImport())
    atexit.register(_at_exit)
