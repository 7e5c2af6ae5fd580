"""The status page's memory: what happened over the last hour, kept in the
daemon's memory (issue 11, item 3, the page at C{/}).

L{History} is fed with the scheduler's outcome events (the contract namespace
C{twisted_mailout.outcome}, docs/design.md "Logging"; one event per recipient
outcome with the fields of
L{RecipientResult.log_fields<twisted_mailout.outcome.RecipientResult.log_fields>}
plus C{destination} from C{Scheduler._emit}) through L{History.log_observer},
and samples the queue's depth every few seconds through a callable. It keeps:

  - per minute over the last hour: recipients delivered, deferred and bounced
    (an expired recipient was bounced: the event's C{event} field already
    says C{bounced} for it);
  - the queue's depth, sampled every C{sample_interval} seconds over the last
    hour (in total and per queue name: incoming, active, deferred, hold);
  - the last 50 bounces (time, queue id, recipient, destination, reply);
  - per destination, the deferrals over the last hour and the last deferral's
    reply, for at most C{max_destinations} destinations (the busiest kept:
    memory is bounded whatever the number of domains).

Everything is in memory and bounded: 60 minute buckets, one hour of depth
samples, 50 bounces and a fixed number of destinations, so neither memory nor
the cost of L{History.snapshot} grows with the mail or the domains seen. It is
pure: no I/O, no thread, and the clock is injected (the reactor in the daemon,
a C{task.Clock} in tests); it runs in the reactor thread, as the log events of
the scheduler are emitted there.

Wiring (the daemon)::

    history = History(reactor, depth=live.queue_counts)
    globalLogPublisher.addObserver(history.log_observer)
    history.start()           # samples the depth every 5 s
    ...
    history.stop()
    globalLogPublisher.removeObserver(history.log_observer)

L{twisted_mailout.daemon.status.status_data} turns a snapshot into the JSON of
C{GET /api/v1/status}.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from twisted.internet import task
from twisted.logger import Logger

__all__ = ["OUTCOME_NAMESPACE", "QUEUE_NAMES", "STATUSES", "Clock", "DepthSource",
           "History"]

log = Logger()

#: The log namespace of the scheduler's outcome events (a contract).
OUTCOME_NAMESPACE = "twisted_mailout.outcome"

#: The three per-minute series, in the order of the page's chart.
STATUSES = ("delivered", "deferred", "bounced")

#: The queue names of C{postqueue -j} (L{twisted_mailout.admin.views.queue_name}).
QUEUE_NAMES = ("incoming", "active", "deferred", "hold")

#: What the depth callable returns: messages per queue name, or a total.
DepthSource = Callable[[], "Mapping[str, int] | int"]


class Clock(Protocol):
    """What L{History} needs of a clock: the reactor's C{IReactorTime}
    (C{seconds()} in seconds since the epoch, and C{callLater} for the
    sampling loop)."""

    def seconds(self) -> float:
        """Now, in seconds since the epoch."""

    def callLater(self, delay: float, callable: Callable[..., object],
                  *args: object, **kw: object) -> Any:
        """Call C{callable} in C{delay} seconds; return an C{IDelayedCall}."""


@dataclass
class _Destination:
    """One destination's deferrals over the window: C{buckets} maps a bucket
    number (epoch seconds // bucket) to deferrals in it; C{total} is their
    sum."""

    name: str
    buckets: dict[int, int] = field(default_factory=dict)
    total: int = 0
    last_reply: str | None = None
    last_code: int | None = None
    last_time: float = 0.0
    last_delivered: float | None = None

    def prune(self, first: int) -> None:
        """Forget the buckets before bucket number C{first}."""
        if not self.buckets or min(self.buckets) >= first:
            return
        for b in [b for b in self.buckets if b < first]:
            self.total -= self.buckets.pop(b)


class History:
    """The last hour of outcomes and queue depth, in memory.

    @param clock: the reactor (or a C{task.Clock}): C{seconds()} is the
        time of each event recorded through L{log_observer}, and the
        sampling loop of L{start} runs on it.
    @param depth: called every C{sample_interval} seconds from L{start}
        (and by L{sample}) in the reactor thread; returns the queue's
        messages per queue name (C{{"incoming": int, "active": int,
        "deferred": int, "hold": int}}, the names of C{postqueue -j}), or
        one int (the total). It must be cheap and must not block (counts
        the scheduler keeps, not a walk of the queue folder). L{None}: no
        depth samples (L{sample} takes the counts as an argument).
    @param sample_interval: seconds between two depth samples, more than 0.
    @param window: seconds of history kept (3600: one hour), a multiple of
        C{bucket}.
    @param bucket: seconds per bucket of the outcome series (60).
    @param max_bounces: recent bounces kept (50).
    @param max_destinations: destinations reported by L{snapshot} (20);
        up to C{4 * max_destinations} are tracked, and when a new one comes
        the one with the fewest deferrals in the window (the oldest on a tie)
        is forgotten.
    @raise ValueError: a non-positive interval, window or bucket, or a
        window that is not a whole number of buckets.
    """

    def __init__(self, clock: Clock, depth: DepthSource | None = None,
                 sample_interval: float = 5.0, window: int = 3600, bucket: int = 60,
                 max_bounces: int = 50, max_destinations: int = 20) -> None:
        if sample_interval <= 0 or window <= 0 or bucket <= 0:
            raise ValueError("sample_interval, window and bucket must be positive")
        if window % bucket:
            raise ValueError(f"window {window} is not a whole number of {bucket} s buckets")
        self.clock = clock
        self.depth = depth
        self.sample_interval = float(sample_interval)
        self.window = int(window)
        self.bucket = int(bucket)
        self.buckets = self.window // self.bucket
        self.max_destinations = max_destinations
        self._capacity = 4 * max_destinations
        #: bucket number (epoch seconds // bucket) -> [delivered, deferred, bounced]
        self._counts: dict[int, list[int]] = {}
        self._newest_bucket: int | None = None
        self._bounces: deque[dict[str, Any]] = deque(maxlen=max_bounces)
        self._destinations: dict[str, _Destination] = {}
        samples = math.ceil(self.window / self.sample_interval) + 2
        self._depth: deque[tuple[float, dict[str, int]]] = deque(maxlen=samples)
        #: recipients per status since this History was made
        self.since_start: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self._loop: task.LoopingCall | None = None

    # -- feeding -------------------------------------------------------------

    def log_observer(self, event: Mapping[str, Any]) -> None:
        """A C{twisted.logger} observer: records the events of namespace
        C{twisted_mailout.outcome} (L{record}) and ignores every other event.
        Never raises (a raising observer is removed by C{twisted.logger}).

        @param event: a log event; the fields read are C{event} (the
            status category: C{delivered}, C{deferred}, C{bounced}; events
            of another category, such as C{queued}, are ignored), C{outcome}
            (C{expired} is noted on the bounce), C{qid}, C{recipient},
            C{destination} (the recipient's domain when absent), C{reply}
            (the reply on one line) and C{code}.
        """
        if event.get("log_namespace") == "twisted_mailout.admin":
            self._admin_bounce(event)
            return
        if event.get("log_namespace") != OUTCOME_NAMESPACE:
            return
        try:
            self.record(str(event.get("event") or event.get("outcome") or ""),
                        qid=event.get("qid"), recipient=str(event.get("recipient") or ""),
                        destination=event.get("destination"), reply=event.get("reply"),
                        code=event.get("code"), outcome=event.get("outcome"))
        except Exception:  # noqa: BLE001 - a log observer must never raise
            log.failure("status history: outcome event not recorded")

    def _admin_bounce(self, event: Mapping[str, Any]) -> None:
        """An operator's bounce (C{twisted_mailout.admin}, action
        C{bounce}): one bounce per recipient it returned, with the
        operator's reply. Never raises."""
        if event.get("action") != "bounce":
            return
        try:
            for rcpt in event.get("recipients") or ():
                self.record("bounced", qid=event.get("qid"), recipient=str(rcpt),
                            reply=event.get("reply"), code=550, outcome="admin-bounce")
        except Exception:  # noqa: BLE001 - a log observer must never raise
            log.failure("status history: admin bounce not recorded")

    def record(self, status: str, *, qid: str | None = None, recipient: str = "",
               destination: str | None = None, reply: str | None = None,
               code: int | None = None, outcome: str | None = None,
               when: float | None = None) -> bool:
        """Record one recipient outcome.

        @param status: C{"delivered"}, C{"deferred"} or C{"bounced"}
            (C{"expired"} is taken as C{"bounced"}); another word is ignored.
        @param qid: the queue id.
        @param recipient: the envelope recipient.
        @param destination: the next-hop destination (the recipient domain,
            or the relay's key); L{None}: the recipient's domain.
        @param reply: the reply on one line (C{"451 4.3.0 try later"}).
        @param code: the reply code.
        @param outcome: the finer status (C{"expired"} for an expired
            bounce); L{None}: C{status}.
        @param when: seconds since the epoch; L{None}: C{clock.seconds()}.
        @return: C{True} when recorded, C{False} when ignored.
        """
        if status == "expired":
            status = "bounced"
        if status not in STATUSES:
            return False
        dest = (destination or recipient.rpartition("@")[2]).lower()
        now = self.clock.seconds() if when is None else float(when)
        b = int(now // self.bucket)
        if self._newest_bucket is not None and b <= self._newest_bucket - self.buckets:
            return False  # older than the window
        self._bucket(b)[STATUSES.index(status)] += 1
        self.since_start[status] += 1
        if status == "bounced":
            self._bounces.append({
                "time": now, "queue_id": qid, "recipient": recipient,
                "destination": dest, "reply": reply, "code": code,
                "outcome": outcome or status})
        elif status == "deferred":
            self._deferred(dest, b, now, reply, code)
        elif dest in self._destinations:
            self._destinations[dest].last_delivered = now
        return True

    def _bucket(self, b: int) -> list[int]:
        counts = self._counts.get(b)
        if counts is None:
            counts = self._counts[b] = [0, 0, 0]
            if self._newest_bucket is None or b > self._newest_bucket:
                self._newest_bucket = b
                first = b - self.buckets + 1
                for old in [k for k in self._counts if k < first]:
                    del self._counts[old]
        return counts

    def _deferred(self, name: str, b: int, now: float, reply: str | None,
                  code: int | None) -> None:
        first = b - self.buckets + 1
        d = self._destinations.get(name)
        if d is None:
            if len(self._destinations) >= self._capacity:
                for other in self._destinations.values():
                    other.prune(first)
                victim = min(self._destinations.values(),
                             key=lambda d: (d.total, d.last_time))
                del self._destinations[victim.name]
            d = self._destinations[name] = _Destination(name)
        if b not in d.buckets:
            d.prune(first)
            d.buckets[b] = 0
        d.buckets[b] += 1
        d.total += 1
        if now >= d.last_time:
            d.last_time, d.last_reply, d.last_code = now, reply, code

    def sample(self, counts: Mapping[str, int] | int | None = None) -> dict[str, int] | None:
        """Take one sample of the queue's depth, now.

        @param counts: messages per queue name, or a total; L{None}: ask
            the C{depth} callable.
        @return: the sample recorded (C{{queue name: int, ..., "total":
            int}}), or L{None} when there is no callable or it raised (the
            error is logged; sampling goes on).
        """
        if counts is None:
            if self.depth is None:
                return None
            try:
                counts = self.depth()
            except Exception:  # noqa: BLE001 - a broken gauge must not stop the loop
                log.failure("status history: the queue depth could not be read")
                return None
        if isinstance(counts, Mapping):
            sample = {name: int(counts.get(name, 0)) for name in QUEUE_NAMES}
            sample.update({str(k): int(v) for k, v in counts.items() if k != "total"})
            sample["total"] = sum(v for k, v in sample.items() if k != "total")
        else:
            sample = {"total": int(counts)}
        self._depth.append((self.clock.seconds(), sample))
        return sample

    def start(self) -> None:
        """Sample the depth now and every C{sample_interval} seconds on the
        clock, until L{stop}. Does nothing without a C{depth} callable or when
        already started."""
        if self.depth is None or self._loop is not None:
            return
        loop = task.LoopingCall(self.sample)
        loop.clock = cast(Any, self.clock)
        self._loop = loop
        loop.start(self.sample_interval, now=True)

    def stop(self) -> None:
        """Stop the sampling loop (the history is kept)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    # -- reading -------------------------------------------------------------

    def latest_depth(self) -> dict[str, int] | None:
        """The last depth sample (C{{queue name: int, "total": int}}), or
        L{None} before the first."""
        return dict(self._depth[-1][1]) if self._depth else None

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The history as JSON-ready data (the C{history}, C{destinations} and
        C{bounces} parts of C{GET /api/v1/status}).

        @param now: seconds since the epoch; L{None}: C{clock.seconds()}.
        @return: C{{
            "window": int seconds, "bucket": int seconds,
            "outcomes": {"time": [int epoch seconds at the start of each
                bucket, oldest first, the last one the bucket of C{now}
                (still filling)], "delivered": [int], "deferred": [int],
                "bounced": [int]} (lists of C{window / bucket} items),
            "totals": {"delivered": int, "deferred": int, "bounced": int}
                (over the window), "since_start": the same since this
                History was made,
            "depth": {"interval": float seconds, "time": [float epoch
                seconds], "total": [int], "incoming": [int], "active": [int],
                "deferred": [int], "hold": [int]} (samples of the last
                C{window} seconds, oldest first; a name a sample lacks is 0),
            "destinations": [{"destination": str, "deferred": int (over the
                last C{window} seconds), "last_reply": str or None,
                "last_code": int or None, "last_time": float epoch seconds,
                "last_delivered": float epoch seconds or None}] (at most
                C{max_destinations}, most deferrals first; only destinations
                with deferrals in the window),
            "bounces": [{"time": float, "queue_id": str or None,
                "recipient": str, "destination": str, "reply": str or None,
                "code": int or None, "outcome": "bounced" or "expired"}]
                (newest first, at most C{max_bounces})}}
        """
        now = self.clock.seconds() if now is None else float(now)
        last = int(now // self.bucket)
        first = last - self.buckets + 1
        series: dict[str, list[int]] = {s: [] for s in STATUSES}
        times = []
        for b in range(first, last + 1):
            times.append(b * self.bucket)
            counts = self._counts.get(b, (0, 0, 0))
            for i, s in enumerate(STATUSES):
                series[s].append(counts[i])
        outcomes: dict[str, Any] = {"time": times, **series}
        totals = {s: sum(series[s]) for s in STATUSES}

        since = now - self.window
        samples = [(t, c) for t, c in self._depth if since < t <= now]
        names = list(QUEUE_NAMES)
        for _, c in samples:
            names.extend(k for k in c if k not in names and k != "total")
        depth: dict[str, Any] = {"interval": self.sample_interval,
                                 "time": [t for t, _ in samples],
                                 "total": [c["total"] for _, c in samples]}
        for name in names:
            depth[name] = [c.get(name, 0) for _, c in samples]

        rows = []
        for d in self._destinations.values():
            d.prune(first)
            n = sum(v for k, v in d.buckets.items() if k <= last)
            if n:
                rows.append((n, d))
        rows.sort(key=lambda x: (-x[0], -x[1].last_time, x[1].name))
        destinations = [
            {"destination": d.name, "deferred": n, "last_reply": d.last_reply,
             "last_code": d.last_code, "last_time": d.last_time,
             "last_delivered": d.last_delivered}
            for n, d in rows[:self.max_destinations]]
        return {"window": self.window, "bucket": self.bucket, "outcomes": outcomes,
                "totals": totals, "since_start": dict(self.since_start), "depth": depth,
                "destinations": destinations,
                "bounces": [dict(b) for b in reversed(self._bounces)]}
