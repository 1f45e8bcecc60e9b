"""Senders against the sandbox on a FakeClock, and what the sandbox received from them."""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine

from cutmeshort_sandbox import SandboxServer
from lead_sync.db.engines import prepare_engine
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.delivery.policy import SendReport
from lead_sync.delivery.ratelimit import SharedRateLimiter
from lead_sync.delivery.retry import RetryPolicy
from lead_sync.delivery.sender import Sender

from tests.support import TOKEN, Warehouse
from tests.support.clock import FakeClock
from tests.support.seeding import new_run_id


@contextmanager
def sending(wh: Warehouse, sandbox: SandboxServer, run_id: str | None = None, *, max_attempts: int = 4,
            base: float = 0.05, cap: float = 0.5, timeout: float = 2.0, per_minute: int | None = 60,
            bucket: str = "test-bucket", budget: float = 30.0, clock: FakeClock | None = None, token: str = TOKEN,
            max_in_flight: int | None = None) -> Iterator[Sender]:
    """A Sender on a FakeClock (its `clock`), shared with its limiter."""
    prepare_engine(wh.engine)
    clock = clock or FakeClock()
    with CutMeShortClient(sandbox.url, token, timeout_seconds=timeout) as client:
        limiter = SharedRateLimiter(wh.engine, bucket, per_minute, clock=clock)
        yield Sender(wh.engine, client, limiter, RetryPolicy(max_attempts, base, cap), run_id or new_run_id(),
                     clock() + budget, credentials_hint="cutmeshort_default", sleep=clock.sleep, clock=clock,
                     max_in_flight=max_in_flight)


def run_senders_at_once(wh: Warehouse, sandbox: SandboxServer, count: int, per_minute: int | None, budget: float,
                        clock: FakeClock | None = None, max_in_flight: int | None = None) -> list[SendReport]:
    """Senders in threads, each with its own engine and client, as separate send tasks would be,
    on one FakeClock (shared by their limiters)."""
    reports, errors, engines = [None] * count, [], []
    clock = clock or FakeClock()

    def one(n: int) -> None:
        engine = prepare_engine(create_engine(wh.url))
        engines.append(engine)
        try:
            with CutMeShortClient(sandbox.url, TOKEN, timeout_seconds=2.0) as client:
                limiter = SharedRateLimiter(engine, "shared-bucket", per_minute, clock=clock)
                # A short budget also keeps a sender from waiting out the other's leases.
                sender = Sender(engine, client, limiter, RetryPolicy(3, 0.05, 0.5), f"manual__concurrent_{n}",
                                clock() + budget, clock=clock, sleep=clock.sleep, max_in_flight=max_in_flight)
                reports[n] = sender.run()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for engine in engines:
        engine.dispose()
    assert not errors and not any(t.is_alive() for t in threads), errors
    return reports


def sent(sandbox: SandboxServer) -> list[tuple[str, str, int | None]]:
    """(customer, event, HTTP status) of every request, in order."""
    return [(r["body"]["customerExternalId"], r["body"]["eventName"], r["status"]) for r in sandbox.requests()]


def lead_counts(sandbox: SandboxServer) -> Counter:
    """How many times the API took each (customer, event)."""
    return Counter((l["customerExternalId"], l["eventName"]) for l in sandbox.leads())
