"""A clock a test moves by hand, for the product's `clock` and `sleep` parameters.

The sender, the rate limiter and the sandbox take `clock` (a `time.time` or `time.monotonic`
stand-in: seconds as a float) and the sender `sleep` (a `time.sleep` stand-in). A FakeClock is
both: calling it reads its time, `sleep` moves it at once and records the wait, `advance` moves it
without a wait. Requests, threads and databases stay real; only waiting costs nothing.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable


class FakeClock:
    """Seconds that stand still until moved: by `sleep` (a wait, recorded in `sleeps`), by `advance`,
    or by setting `now`. `on_sleep` runs a function at the n-th wait (1 = the first), e.g. to change
    the sandbox's faults. `longest_sleep` and `allow_zero_sleep` bound the waits a test accepts (a
    wait of nothing is a busy loop)."""

    latest = 0.0  # where any clock started from the real time got to: a later one never starts before

    def __init__(self, start: float | None = None, *, on_sleep: dict[int, Callable[[], object]] | None = None,
                 longest_sleep: float = math.inf, allow_zero_sleep: bool = True) -> None:
        # Without a start: the real time, on a quarter second (exact in binary, like the waits tests
        # add: a minute and a quarter), and after every earlier such clock, so that what it writes
        # comes after what they wrote.
        self._shared = start is None
        if start is None:
            start = math.ceil(max(time.time(), FakeClock.latest + 0.001) * 4) / 4
        self.start = self.now = start
        self.sleeps: list[float] = []
        self._on_sleep = dict(on_sleep or {})
        self._longest_sleep = longest_sleep
        self._allow_zero_sleep = allow_zero_sleep
        self._lock = threading.Lock()
        self._moved()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0 or (seconds == 0 and self._allow_zero_sleep), seconds
        assert seconds <= self._longest_sleep, seconds
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds
            self._moved()
            action = self._on_sleep.get(len(self.sleeps))
        if action:
            action()

    def advance(self, seconds: float) -> None:
        """Time passes without anyone waiting for it."""
        assert seconds >= 0, seconds
        with self._lock:
            self.now += seconds
            self._moved()

    @property
    def elapsed(self) -> float:
        return self.now - self.start

    def _moved(self) -> None:
        if self._shared:
            FakeClock.latest = max(FakeClock.latest, self.now)
