"""A sandbox of the sandbox's own tests (its token, no rate limit), and the clock its rate windows run on."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from cutmeshort_sandbox.server import SandboxServer

from tests.support.clock import FakeClock
from tests.support.sandbox_http import TOKEN


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(port=0, token=TOKEN, rate_limit_per_minute=None) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    """The sandbox's monotonic clock, moved by hand, so 60-second windows cost no time."""
    return FakeClock(1000.0)
