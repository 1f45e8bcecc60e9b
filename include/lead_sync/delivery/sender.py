"""Delivery: send every open event once, in order, within the rate limit and the time budget.

How a send runs (`Sender.run`), with up to `max_in_flight` requests on the wire at once:

- the dispatcher (the calling thread, this module) takes rate-limit slots in blocks (one
  transaction for many), claims as many events in one statement, reads their bodies in one
  query and queues them for the workers; it claims only what the workers will send within
  moments (`pace`), so that every lease covers its request;
- worker threads (`inflight`) send one request each at a time and decide each answer (`policy`);
- a writer thread (`writer`) commits the answers, each attempt row with its event's new state
  and its slot's new stamp, in one transaction per flush, at least every FLUSH_SECONDS. While
  the warehouse refuses a flush, the writer keeps its answers and tries again, the dispatcher
  claims nothing new, and the requests on the wire go on;
- a progress thread logs a line every 30 s.

Event 2 of a deferred flow is claimed only once its event 1's delivery is committed. Retries
wait in the dispatcher's schedule (backoff with jitter, Retry-After), not in a worker. The
first request of a run goes alone: a refused token (401/403) stops the run after one request.
The deadline, the retry and rate-limit waits and the timestamps written are on the injected
`clock`, and the dispatcher sleeps (`sleep`) only when nothing is on the wire. With requests on
the wire it waits for their answers in real time, POLL_SECONDS at most at a time; the writer's
flushes and their retries are on real time too.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy.engine import Engine
from tenacity import Retrying

from lead_sync.delivery import claims
from lead_sync.delivery.client import CutMeShortClient
from lead_sync.delivery.inflight import POLL_SECONDS, Event, InFlight, Job
from lead_sync.delivery.policy import CredentialsRefused, SendReport
from lead_sync.delivery.ratelimit import Grant, SharedRateLimiter
from lead_sync.delivery.retry import CREDENTIALS, RetryPolicy, describe, retrying
from lead_sync.delivery.writer import Writer, first_line

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 30.0
# A full window frees its slots one by one: while requests are on the wire, the sender asks for
# more at most this often.
GRANT_GATHER_SECONDS = 0.01
# Waiting for the leases an earlier sender left, a sender looks again this often whether they are still there.
LEASE_LOOK_SECONDS = 2.0


class Sender:
    """Delivers open events for one run. Its state lives in the warehouse, not here."""

    def __init__(self, engine: Engine, client: CutMeShortClient, limiter: SharedRateLimiter,
                 policy: RetryPolicy, run_id: str, deadline: float, credentials_hint: str = "",
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time,
                 progress_every: float = PROGRESS_SECONDS,
                 ticks: Callable[[threading.Event, float], bool] | None = None,
                 max_events: int | None = None, max_in_flight: int | None = None) -> None:
        self.engine = engine
        self.client = client
        self.limiter = limiter
        self.policy = policy
        self.run_id = run_id
        self.deadline = deadline  # a clock() value
        self.credentials_hint = credentials_hint
        # Wall seconds and a way to wait on them: the deadline, retry and rate-limit waits, the
        # timestamps the sender writes, the progress rate. Tests step them; requests stay real.
        self.sleep = sleep
        self.clock = clock
        # A lease outlives any request the client can make (connect + read timeouts).
        self.lease_seconds = 2 * client.timeout_seconds + 10
        self.report = SendReport()
        self.progress_every = progress_every
        # How the progress log waits for its next line: a real wait, unless a test steps it.
        self._ticks = ticks or (lambda stopped, seconds: stopped.wait(seconds))
        self._started = clock()
        # A batch's share: it stops taking events after this many; the run's other batches take the rest.
        self.max_events = max_events
        self._taken = 0
        # Holds an event between its retries in this run (see claims.Settled), so that no other
        # sender, such as another batch of the same run, tries it meanwhile.
        self.token = uuid.uuid4().hex
        # None: sized from the rate limit and the latency measured so far (see `pace`).
        self.max_in_flight = max_in_flight
        self._writer: Writer | None = None  # made by `run`, with the workers
        self._wire: InFlight | None = None
        self._grants: list[Grant] = []  # granted, not used yet
        self._slot_at = 0.0  # no slot is free before then (the limiter said so)

    @property
    def peak_in_flight(self) -> int:
        """The most requests this sender had on the wire at once."""
        return self._wire.peak if self._wire is not None else 0

    def seconds_left(self) -> float:
        return self.deadline - self.clock()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), timezone.utc)

    def progress(self) -> str:
        """Events settled and left, the rate so far, and an ETA."""
        now = self.clock()
        done = self.report.delivered + self.report.rejected + self.report.failed
        left = claims.count_sendable(self.engine)
        rate = done / max(now - self._started, 1e-9)
        eta = f"{left / rate:,.0f}s" if rate > 0 else "unknown"
        return (f"progress: {done} event(s) settled ({self.report.requests} requests), {left} left, "
                f"{rate:.1f} events/s, ETA {eta}")

    def _log_progress(self, stopped: threading.Event) -> None:
        # A thread of its own: a line every `progress_every` seconds, also while the sender
        # waits for the rate limit or a Retry-After.
        while not self._ticks(stopped, self.progress_every):
            try:
                log.info(self.progress())
            except Exception:  # noqa: BLE001 - a progress line must never stop a send
                log.warning("progress: not available this time", exc_info=True)

    def run(self) -> SendReport:
        stopped = threading.Event()
        reporter = threading.Thread(target=self._log_progress, args=(stopped,), name="send-progress", daemon=True)
        reporter.start()
        try:
            self._writer = Writer(self.engine, self.run_id, self.limiter, self._wake)
            self._wire = InFlight(self.client, self._writer, self.limiter, self.policy, self._retrying(),
                                  self.lease_seconds, self.clock, self.report, self.max_in_flight)
            self._writer.start()
            try:
                self._run()
            except BaseException:
                self._shut_down(quiet=True)
                raise
            self._shut_down(quiet=False)
            if self._wire.refused is not None:
                raise CredentialsRefused(
                    f"the CutMeShort API refused the token ({describe(self._wire.refused)}); "
                    f"check the password of connection {self.credentials_hint or 'cutmeshort_default'}. "
                    "Open events stay pending."
                )
            return self.report
        finally:
            stopped.set()
            reporter.join()

    def _run(self) -> None:
        started = self._now()
        self.report.recovered_unknown += claims.recover_abandoned(self.engine, self.run_id, now=started)
        self._send_all(started)
        if self._wire.refused is not None:
            return
        # Events a stopped sender left leased can be taken once their leases run out (those taken
        # since this sender started are not for it to send: a sender beside it has them). It waits
        # for all of them when that fits in the time left, else for those that run out first,
        # looking again every LEASE_LOOK_SECONDS: leases of a sender that is still working (one
        # that started a little earlier) end with its answers, and then there is nothing to wait for.
        logged = False
        while not self.report.budget_exhausted and not self._share_done():
            first, last = claims.lease_expiries(self.engine, taken_before=started)
            if first is None:
                return
            now = self._now()
            wait = (last - now).total_seconds() + 0.5
            if wait >= self.seconds_left():
                wait = (first - now).total_seconds() + 0.5
                if wait >= self.seconds_left():
                    return
            if not logged:
                log.info("waiting up to %.1fs for in-flight leases of an earlier sender to expire", max(wait, 0))
                logged = True
            if wait > LEASE_LOOK_SECONDS:
                self._rest(LEASE_LOOK_SECONDS)
                continue
            self._rest(max(wait, 0))
            recovered = claims.recover_abandoned(self.engine, self.run_id, now=self._now())
            self.report.recovered_unknown += recovered
            self._send_all(started)
            if self._wire.refused is not None or not recovered:
                return

    def _share_done(self) -> bool:
        return self.max_events is not None and self._taken >= self.max_events

    # --- the dispatcher ---------------------------------------------------------------------------

    def _send_all(self, started: datetime) -> None:
        """Claim and queue events until none is left (or time, share or credentials run out), then
        wait for every answer and commit them."""
        try:
            self._dispatch(started)
        except BaseException:
            self._wire.stopping = True  # what is queued is not sent; `run` waits for what is on the wire
            raise
        self._drain()

    def _dispatch(self, started: datetime) -> None:
        firsts_left = True
        confirms_seen: int | None = None  # writer generation when event 2s last ran short
        wire = self._wire
        while True:
            wire.raise_failure()
            if wire.refused is not None:
                return
            if self._writer.stalled:
                # The warehouse refuses the answers: nothing new is claimed until they are in (or the
                # writer gives up); the requests on the wire go on, their answers kept.
                self._writer.wait_while_stalled(POLL_SECONDS)
                continue
            now = self.clock()
            outstanding, due, later, capacity = wire.take_stock(now)
            wire.spawn()
            firsts_unwritten, generation = self._writer.firsts()
            # The batch's share bounds what it takes; each deferred event 1 it delivered lets it take
            # one event 2 more (that event 2 may qualify only once the share is taken).
            firsts_room = room = None
            if self.max_events is not None:
                firsts_room = self.max_events - self._taken
                room = firsts_room + generation
            firsts = firsts_left and (firsts_room is None or firsts_room > 0)
            confirms = (confirms_seen is None or generation > confirms_seen) and (room is None or room > 0)
            new_possible = firsts or confirms
            if now >= self.deadline:
                if wire.has_retries() or (new_possible and self._has_work(started, firsts, confirms)):
                    self.report.budget_exhausted = True
                return
            if now < wire.pause_until:
                if not outstanding and self._nothing_left(started, firsts, confirms, firsts_unwritten):
                    return
                if not self._idle_until(wire.pause_until, outstanding):
                    return
                continue
            wanted_new = 0
            if new_possible:
                wanted_new = max(0, capacity - len(due))
                if room is not None:
                    wanted_new = min(wanted_new, room)
            retry = due[:max(capacity, 0)]
            if not retry and not wanted_new:
                if outstanding:
                    wire.wait_for_answers(later)
                    continue
                if firsts_unwritten:
                    self._writer.flush()  # their event 2s may go now
                    continue
                if later is not None:
                    if not self._idle_until(later, 0):
                        return
                    continue
                return
            threshold = max(1, wire.backlog() // 2)
            if outstanding and capacity < threshold:
                # Claim in blocks, not one event per answer: woken once that many are answered.
                wire.wait_for_answers(later, wake_at=outstanding - (threshold - capacity))
                continue
            if now < self._slot_at and not self._grants:
                grants, wait = [], self._slot_at - now  # no slot frees before then: no need to ask
            else:
                grants, wait = self._take_grants(len(retry) + wanted_new)
                if not grants:
                    # Ask again once the next slot frees, or a little later while requests are on
                    # the wire (to take several slots per transaction, not one per answer).
                    self._slot_at = now + max(wait, GRANT_GATHER_SECONDS if outstanding else 0.0)
            if not grants:
                if outstanding:
                    wire.wait_for_answers(now + wait)
                    continue
                if self._nothing_left(started, firsts, confirms, firsts_unwritten):
                    return  # no need to wait for a slot to find out
                if self.clock() + wait > self.deadline:
                    self.report.budget_exhausted = True
                    return
                self._rest(wait)
                continue
            retry = retry[:len(grants)]
            wanted_new = min(wanted_new, len(grants) - len(retry))
            taken = self._claim(started, retry, wanted_new, firsts, confirms, firsts_room)
            if taken.firsts_short:
                firsts_left = False
            if taken.confirms_short:
                confirms_seen = generation
            self._queue(taken, retry, grants)

    def _has_work(self, started: datetime, firsts: bool = True, confirms: bool = True) -> bool:
        """Whether an event of the kinds this sender may still take is there to take (a read)."""
        now = self._now()
        return any(claims.sendable_keys(self.engine, kind, started, 1, now)
                   for kind, wanted in ((False, firsts), (True, confirms)) if wanted)

    def _nothing_left(self, started: datetime, firsts: bool, confirms: bool, firsts_unwritten: int) -> bool:
        """Nothing on the wire: is anything left for this sender? (Its answers committed first:
        an event 1 delivered lets its event 2 go.)"""
        if self._wire.has_retries():
            return False
        if firsts_unwritten:
            self._writer.flush()
            generation = self._writer.firsts()[1]
            confirms = self.max_events is None or self.max_events + generation > self._taken
        return not self._has_work(started, firsts, confirms)

    def _idle_until(self, moment: float, outstanding: int) -> bool:
        """Nothing to send before `moment`: wait for it (for the answers first); False when it is past the deadline."""
        if outstanding:
            self._wire.wait_for_answers(moment)
            return True
        if moment >= self.deadline:
            self.report.budget_exhausted = True
            return False
        self._rest(max(moment - self.clock(), 0.0))
        return True

    def _rest(self, seconds: float) -> None:
        """Wait with nothing on the wire: the slots not used go back and every answer is committed first."""
        self._give_back_grants()
        self._writer.flush()
        self.sleep(seconds)

    def _wake(self) -> None:
        """The writer gave up: a dispatcher waiting for answers looks at once (and raises its error)."""
        if self._wire is not None:
            self._wire.wake()

    # --- slots and claims ---------------------------------------------------------------------------

    def _take_grants(self, count: int) -> tuple[list[Grant], float]:
        """Slots for `count` requests: those still fresh from the last block, then a new block."""
        fresh = self.limiter.clock() - self.limiter.margin_seconds
        stale = [g for g in self._grants if g.granted_at < fresh]
        if stale:
            self._give_back_grants(stale)
        grants = [g for g in self._grants if g.granted_at >= fresh]
        self._grants = []
        wait = 0.0
        if len(grants) < count:
            more, wait = self.limiter.try_acquire_many(count - len(grants))
            grants += more
        self._grants = grants[count:]
        return grants[:count], wait

    def _give_back_grants(self, grants: list[Grant] | None = None) -> None:
        """Slots taken and not used go back at once (another sender, or this one, may use them):
        those too old to use now, and all before a wait."""
        if grants is None:
            grants, self._grants = self._grants, []
        if grants:
            self.limiter.give_back([g.slot for g in grants])
            self._slot_at = 0.0  # a slot may be free now

    def _claim(self, started: datetime, retry: list[Event], new: int, firsts: bool,
               confirms: bool, firsts_limit: int | None) -> claims.Claimed:
        keys = [event.key for event in retry]
        if keys and self._writer.unwritten(keys):
            self._writer.flush()  # the earlier answer first: its commit ends the earlier claim
        taken = claims.claim_many(self.engine, self.run_id, self.lease_seconds, started, keys=keys, new=new,
                                  firsts=firsts, confirms=confirms, firsts_limit=firsts_limit, sender=self.token,
                                  now=self._now())
        self._wire.unschedule(retry)
        return taken

    def _queue(self, taken: claims.Claimed, retry: list[Event], grants: list[Grant]) -> None:
        by_key = {event.key: event for event in retry}
        now = self.clock()
        grants = list(grants)
        jobs = []
        for claim in taken.claims:
            event = by_key.get(claim.event_key)
            if event is None:
                self._taken += 1
                payload = taken.bodies.get(claim.event_key)
                if payload is None:  # its body went meanwhile (the event was closed): nothing to send
                    self._writer.unsent(claim.event_key, claim.attempt, None)
                    continue
                event = Event(claim.event_key, payload)
            event.tries += 1
            jobs.append(Job(event, claim, grants.pop(0), now))
        self._grants = grants + self._grants  # slots left over: the next block uses them first
        self._wire.queue(jobs)

    def _retrying(self) -> Retrying:
        return retrying(
            self.policy, self.deadline,
            should_retry=lambda o: o.status is None and o.outcome != CREDENTIALS,
            retry_after=lambda o: o.retry_after,
            sleep=self.sleep, clock=self.clock,
        )

    def _drain(self) -> None:
        """Wait until every queued request is answered (or given back), then commit the answers."""
        self._wire.drain()
        if self._writer.error is None:
            self._writer.flush()

    def _shut_down(self, quiet: bool) -> None:
        """Stop: what is queued goes back unsent, the answers of what is on the wire are committed."""
        self._wire.stopping = True
        try:
            self._drain()
        except BaseException:  # noqa: BLE001
            if not quiet:
                raise
        self._wire.stop()
        if self._grants:
            self._writer.give_back([g.slot for g in self._grants])
            self._grants = []
        try:
            self._writer.close()
            claims.let_go(self.engine, self.token)  # the retries this sender will not make now
        except BaseException as exc:  # noqa: BLE001
            if not quiet:
                raise
            log.warning("the last outcomes could not be written (%s); their events are recovered as unknown",
                        first_line(exc))
        if not quiet and self._wire.failure is not None:
            raise self._wire.failure
