"""How many requests a sender keeps in flight and how many events it claims ahead (contract
section 9), from the answers it measured. No warehouse, no HTTP: the answers are reported here."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from lead_sync.delivery import pace
from lead_sync.delivery.pace import BACKLOG_MAX, BACKLOG_SECONDS, BURST_SECONDS, DEFAULT_MAX_IN_FLIGHT, Pace


@pytest.fixture
def monotonic(monkeypatch):
    """The pace's own monotonic clock, moved by hand: `now[0]` seconds."""
    now = [1_000.0]
    monkeypatch.setattr(pace, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def limits(p: Pace, answers: int, seconds: float = 0.1, cpu: float = 0.0001) -> list[int]:
    """The limit after each of `answers` answers that took `seconds` on the wire and `cpu` CPU seconds."""
    seen = []
    for _ in range(answers):
        p.answered(seconds, cpu)
        seen.append(p.limit)
    return seen


def test_the_first_request_goes_alone_and_nothing_is_claimed_ahead_before_an_answer():
    p = Pace(per_minute=600, max_in_flight=None)
    assert (p.limit, p.backlog()) == (1, 0)


def test_requests_in_flight_grow_at_most_twice_the_answers_up_to_max_in_flight_never_shrinking():
    p = Pace(per_minute=None, max_in_flight=8)
    seen = limits(p, 10)
    assert seen == [min(8, 2 * n) for n in range(1, 11)]
    limits(p, 5, seconds=5.0, cpu=1.0)  # a slower API and a busier CPU afterwards
    assert p.limit == 8


def test_without_max_in_flight_or_a_rate_limit_a_slow_api_gets_the_default_at_most():
    p = Pace(per_minute=None, max_in_flight=None)
    limits(p, 200, seconds=0.5)
    assert p.limit == DEFAULT_MAX_IN_FLIGHT


@pytest.mark.parametrize("per_minute, latency", [(61, 0.1), (90, 0.13), (3000, 0.05)])
def test_with_a_rate_limit_enough_are_in_flight_to_send_a_windows_allowance_in_a_burst(per_minute, latency):
    p = Pace(per_minute=per_minute, max_in_flight=None)
    limits(p, 200, seconds=latency)
    assert p.limit == min(DEFAULT_MAX_IN_FLIGHT, math.ceil(per_minute * latency / BURST_SECONDS))


def test_no_more_in_flight_than_a_round_trip_over_the_cpu_time_of_a_request():
    # A fast API on the same network: each request costs this process a third of its round trip.
    p = Pace(per_minute=None, max_in_flight=None)
    limits(p, 50, seconds=0.01, cpu=0.003)
    assert p.limit == math.ceil(0.01 / 0.003) + 1


def test_the_backlog_is_what_the_last_seconds_rate_sends_in_backlog_seconds(monotonic):
    p = Pace(per_minute=None, max_in_flight=None)
    for _ in range(40):  # 40 answers over a second
        monotonic[0] += 1 / 40
        p.answered(0.1, 0.0001)
    assert p.backlog() == pytest.approx(40 * BACKLOG_SECONDS, abs=1)
    monotonic[0] += 0.5  # half of them are over a second old now
    assert p.backlog() == pytest.approx(20 * BACKLOG_SECONDS, abs=1)
    monotonic[0] += 5
    assert p.backlog() == 0


def test_the_backlog_in_a_runs_first_moments_counts_from_the_first_answer_and_is_bounded(monotonic):
    p = Pace(per_minute=None, max_in_flight=None)
    for _ in range(10):  # 10 answers in the run's first fifth of a second
        monotonic[0] += 0.02
        p.answered(0.1, 0.0001)
    assert p.backlog() == pytest.approx(10 / 0.18 * BACKLOG_SECONDS, abs=1)
    for _ in range(10_000):
        p.answered(0.1, 0.0001)
    assert p.backlog() == BACKLOG_MAX
