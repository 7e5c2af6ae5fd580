"""The scheduler's side that the operator and the observers see: taking
messages out of the schedule for an action and giving them back
(L{twisted_mailout.admin}), and the views of what is queued, in flight and
when each message is due (the status page, the metrics).

A mixin of L{twisted_mailout.delivery.scheduler.Scheduler}, kept apart so
that each module stays readable; it works on the scheduler's own state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer


if TYPE_CHECKING:
    from twisted_mailout.delivery.pool import Clock
    from twisted_mailout.delivery.retry import RetryPolicy
    from twisted_mailout.queue.model import QueueEntry

__all__ = ["OperatorHands"]


class OperatorHands:
    """L{take}, L{give_back}, L{shape}, L{in_flight} and L{due_time} of a
    L{Scheduler<twisted_mailout.delivery.scheduler.Scheduler>} (this class is
    only ever one of its bases; the state below is the scheduler's)."""

    clock: Clock
    retry: RetryPolicy
    on_hold: set[str]
    _heap: list[tuple[float, int, str]]
    _queued: dict[str, int]
    _taken: set[str]
    _finished: dict[str, list[defer.Deferred[None]]]
    _shape: tuple[float, dict[str, Any]] | None
    _inflight: dict[str, Any]
    _parked: dict[str, Any]
    _parked_at: dict[str, str]
    _preloaded: dict[str, QueueEntry]
    _unsaved: set[str]
    _stopping: bool

    def _schedule(self, qid: str, due: float, dispatch: bool = True) -> None:
        raise NotImplementedError  # the scheduler's


    def take(self, qids: Iterable[str]) -> defer.Deferred[list[str]]:
        """Take messages out of the schedule for an operator's action: they
        are not dispatched until L{give_back}; work in flight on any of them
        is waited for (not cancelled), so its outcome is saved first.

        @param qids: queue ids (unknown ones are taken too: a held message is
            in no schedule).
        @return: Deferred firing with the queue ids taken, once none of them
            is in flight; an id whose outcome is known but not yet written
            (a disk error) is left out, and stays scheduled.
        """
        taken: list[str] = []
        waits: list[defer.Deferred[None]] = []
        for qid in qids:
            if qid in self._taken or (qid in self._unsaved and qid not in self._inflight):
                # (an attempt writing its outcome is waited for below; only
                # an outcome whose write failed and is being retried is busy)
                continue
            self._taken.add(qid)
            self._queued.pop(qid, None)  # its heap item is now stale
            self._parked_at.pop(qid, None)  # (and its place in a destination's line)
            self._preloaded.pop(qid, None)
            taken.append(qid)
            if qid in self._inflight:
                w: defer.Deferred[None] = defer.Deferred()
                self._finished.setdefault(qid, []).append(w)
                waits.append(w)
        if not waits:
            return defer.succeed(taken)

        def settled(_: object) -> list[str]:
            out = []
            for q in taken:
                if q in self._unsaved:  # the write is being retried: keep its
                    # schedule and its outcome in memory (_preloaded)
                    self._taken.discard(q)
                    self._schedule(q, self.clock.seconds() + min(30.0, self.retry.base))
                else:
                    out.append(q)
            return out

        return defer.gatherResults(waits).addCallback(settled)

    def give_back(self, qid: str, due: float | None) -> None:
        """End the operator's hold on C{qid} (see L{take}) and schedule it at
        C{due} (seconds since the epoch), or not at all for L{None} (deleted,
        bounced, held or finished). Always returns L{None}."""
        self._taken.discard(qid)
        self._preloaded.pop(qid, None)
        if due is not None and not self._stopping:
            self._schedule(qid, due)

    def shape(self, now: float, max_age: float = 1.0) -> dict[str, Any]:
        """The queue as the scheduler sees it, for metrics and the status
        page, without touching the store: C{{"active": in flight or due now,
        "deferred": scheduled later, "hold": on hold, "oldest_arrival":
        seconds since the epoch of the oldest message it holds (from the
        queue ids, which start with the arrival time; L{None} when empty)}}.

        One pass over the schedule (about 10 ms per 100,000 messages); the
        answer is reused for C{max_age} seconds.

        @param now: seconds since the epoch.
        @param max_age: seconds a computed answer is reused.
        """
        if self._shape is not None and 0 <= now - self._shape[0] < max_age:
            return self._shape[1]
        flying = [q for q in self._inflight if q not in self._taken]
        due_now = later = 0
        oldest = None
        live = self._queued
        for due, seq, qid in self._heap:
            if live.get(qid) != seq:
                continue
            if due <= now:
                due_now += 1
            else:
                later += 1
        due_now += len(self._parked_at)  # due, waiting for their destination's share
        for ids in (live, flying, self._parked_at, self.on_hold):
            for qid in ids:
                if len(qid) == 23 and qid[0] != "F" and (oldest is None or qid < oldest):
                    oldest = qid
        arrival = None
        if oldest is not None:
            try:
                arrival = int(oldest[:13], 16) / 1e6
            except ValueError:
                arrival = None
        out = {"active": len(flying) + due_now, "deferred": later,
               "hold": len(self.on_hold), "oldest_arrival": arrival}
        self._shape = (now, out)
        return out

    def in_flight(self) -> frozenset[str]:
        """The queue ids being delivered now (Postfix's active queue proper)."""
        return frozenset(q for q in self._inflight if q not in self._taken)

    def due_time(self, qid: str) -> float | None:
        """When C{qid} is scheduled next (seconds since the epoch), or L{None}
        when it is not in the schedule (in flight, held, taken, unknown).
        Walks the heap: for one message at a time (C{show})."""
        dest = self._parked_at.get(qid)
        if dest is not None:
            return next(due for due, q in self._parked[dest] if q == qid)
        seq = self._queued.get(qid)
        if seq is None:
            return None
        for due, s, q in self._heap:
            if s == seq and q == qid:
                return due
        return None

