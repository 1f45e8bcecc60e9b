"""How much a sender keeps on the wire: the requests in flight it allows, and the events it claims
ahead of them, from what it measured of the answers so far."""
from __future__ import annotations

import math
import time
from collections import deque

# Requests in flight when `max_in_flight` is not set: enough to send a whole window's allowance
# (the rate limit) within BURST_SECONDS at the latency measured so far, at most DEFAULT_MAX_IN_FLIGHT.
# A sliding window gives slots back at the pace they were spent, so however long the first
# minute's requests take to go out, every later minute's take as long again: spending the
# allowance in a moment is what lets a backlog go out at the full limit.
DEFAULT_MAX_IN_FLIGHT = 128
BURST_SECONDS = 0.2
# Events claimed ahead of the workers: what they send in this long at the rate measured over the
# last second (so a lease never waits long for its request), at most BACKLOG_MAX.
BACKLOG_SECONDS = 0.5
BACKLOG_MAX = 256


class Pace:
    """The measurements of one send and what they allow. The workers report each answer
    (`answered`) under the sender's lock; `limit` and `backlog` are read by the dispatcher."""

    def __init__(self, per_minute: int | None, max_in_flight: int | None) -> None:
        self.per_minute = per_minute  # the rate limit, None without one
        self.max_in_flight = max_in_flight  # None: sized from the rate limit and the latency
        self.answers = 0
        self.limit = 1  # requests in flight allowed now: the first one goes alone
        self._latency: float | None = None  # seconds, moving average
        self._cpu: float | None = None  # CPU seconds this process spends per request, moving average
        self._fastest: float | None = None  # the shortest round trip so far, seconds
        self._recent: deque[float] = deque()  # time.monotonic() of the answers of the last second
        self._first_answer: float | None = None  # time.monotonic() of the first answer

    def answered(self, seconds: float, cpu: float) -> None:
        """Count an answer; size the requests in flight from what was measured: a request's time
        on the wire (`seconds`) and the CPU time this process spent on it."""
        self.answers += 1
        self._recent.append(time.monotonic())
        if self._first_answer is None:
            self._first_answer = self._recent[-1]
        self._latency = seconds if self._latency is None else 0.8 * self._latency + 0.2 * seconds
        self._cpu = cpu if self._cpu is None else 0.8 * self._cpu + 0.2 * cpu
        self._fastest = seconds if self._fastest is None else min(self._fastest, seconds)
        if self.max_in_flight is not None:
            most = self.max_in_flight
        else:
            sized = (DEFAULT_MAX_IN_FLIGHT if not self.per_minute
                     else math.ceil(self.per_minute * self._latency / BURST_SECONDS))
            # Beyond a round trip's time (the fastest seen: without queueing) over the CPU time this
            # process spends per request, more threads only wait for this process's CPU (a fast API
            # on the same network): they slow every request down, and the sender with it.
            busy = math.ceil(self._fastest / max(self._cpu, 1e-6)) + 1
            most = min(DEFAULT_MAX_IN_FLIGHT, max(1, min(sized, busy)))
        # One request first, then up to twice as many as were answered so far (connections open a
        # few at a time), up to `most`; never fewer than it was.
        self.limit = max(self.limit, min(most, 2 * self.answers))

    def backlog(self) -> int:
        """Events to claim beyond those on the wire: what the workers send in BACKLOG_SECONDS."""
        if not self.answers:
            return 0
        now = time.monotonic()
        while self._recent and self._recent[0] < now - 1.0:
            self._recent.popleft()
        # The rate over the last second, or over the time since the first answer when that is shorter
        # (in a run's first second, counting a whole second would claim in tiny blocks).
        seconds = min(1.0, max(now - self._first_answer, 0.05))
        return min(BACKLOG_MAX, int(len(self._recent) / seconds * BACKLOG_SECONDS))
