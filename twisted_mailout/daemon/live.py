"""What the running daemon shows of itself: metrics, the status page's history.

L{Observability} bundles, for one daemon (C{DeliveryService}):

- a L{Metrics} (C{/metrics}) whose live gauges read a L{LiveView};
- a L{History} (the status page's last hour), sampling the queue's depth
  from the same view every 5 seconds;
- the L{StatusPage} (C{/} and C{/static/}) and the data of C{/api/v1/status}.

Both the metrics and the history learn outcomes as log observers (the
C{twisted_mailout.outcome} events and the others L{Metrics} reads); they are
added to the global log publisher when the service starts and removed when
it stops, so two services in one process (tests) each count their own
lifetime only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from twisted.web.resource import Resource

from twisted_mailout.admin import QueueAdmin
from twisted_mailout.daemon.config import Config
from twisted_mailout.daemon.history import History
from twisted_mailout.daemon.metrics import Metrics
from twisted_mailout.daemon.status import StatusPage, status_data
from twisted_mailout.delivery.connector import Connector
from twisted_mailout.delivery.scheduler import Scheduler

__all__ = ["LiveView", "Observability"]


class LiveView:
    """The L{LiveState<twisted_mailout.daemon.metrics.LiveState>} of a running
    daemon: numbers the scheduler, the store and the pool keep in memory (no
    I/O; one pass over the schedule at most once a second).

    @param scheduler: the L{Scheduler}.
    @param connector: the L{Connector} (its pool's counts).
    @param admin: the L{QueueAdmin} (its suspensions).
    @param clock: has C{seconds()} (the reactor).
    """

    def __init__(self, scheduler: Scheduler, connector: Connector, admin: QueueAdmin,
                 clock: Any) -> None:
        self.scheduler = scheduler
        self.connector = connector
        self.admin = admin
        self.clock = clock

    def queue_counts(self) -> Mapping[str, int]:
        """C{{"incoming", "active", "deferred", "hold"}}: messages per queue
        name (incoming: listed by the store and not yet picked up)."""
        shape = self.scheduler.shape(self.clock.seconds())
        backlog = getattr(self.scheduler.queue, "backlog", None)
        return {"incoming": int(backlog()) if backlog is not None else 0,
                "active": shape["active"], "deferred": shape["deferred"],
                "hold": shape["hold"]}

    def shared_counts(self) -> Mapping[str, int] | None:
        """The whole queue that several daemons share (a PostgreSQL queue):
        C{{"incoming", "claimed", "hold", "owners"}} as of the last pickup;
        L{None} for a queue this daemon holds alone."""
        counts = getattr(self.scheduler.queue, "shared_counts", None)
        return counts() if counts is not None else None

    def oldest_arrival(self) -> float | None:
        """Arrival (epoch seconds) of the oldest message the scheduler holds."""
        value = self.scheduler.shape(self.clock.seconds())["oldest_arrival"]
        return None if value is None else float(value)

    def connections(self) -> tuple[int, int]:
        """C{(active, idle)} SMTP connections of the pool."""
        pool = self.connector.pool
        idle = pool.idle_connections()
        return max(0, pool.open_connections - idle), idle

    def suspended(self) -> int:
        """Destinations suspended now."""
        return len(self.admin.suspensions.active(self.clock.seconds()))

    def throttled(self) -> tuple[int, int]:
        """C{(suspended, slowed)}: destinations or providers the throttling
        rules hold suspended, and those whose message rate they lowered."""
        throttle = getattr(self.scheduler, "throttle", None)
        if throttle is None:
            return 0, 0
        held = throttle.in_force(self.clock.seconds())
        return (sum(1 for t in held if t["kind"] == "suspend"),
                sum(1 for t in held if t["kind"] == "rate"))


class Observability:
    """The metrics, history and status page of one daemon.

    @param reactor: the reactor (C{IReactorTime}, C{IReactorThreads}).
    @param config: the daemon's L{Config} (shown redacted on the page).
    @param scheduler: the L{Scheduler}.
    @param connector: the L{Connector}.
    @param admin: the daemon's L{QueueAdmin}.
    @param publisher: the log publisher to observe (the global one).
    @ivar live: the L{LiveView}.
    @ivar metrics: the L{Metrics}.
    @ivar history: the L{History}.
    @ivar page: the L{StatusPage} (reads the package's files when made).
    """

    def __init__(self, reactor: Any, config: Config, scheduler: Scheduler,
                 connector: Connector, admin: QueueAdmin,
                 publisher: LogPublisher | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.admin = admin
        self.publisher = publisher if publisher is not None else globalLogPublisher
        self.live = LiveView(scheduler, connector, admin, reactor)
        self.metrics = Metrics(self.live, seconds=reactor.seconds)
        self.history = History(reactor, depth=self.live.queue_counts)
        self.page = StatusPage()
        self.started_at: float | None = None
        self._observing = False

    def resources(self) -> dict[bytes, Resource]:
        """The HTTP children: C{metrics}, the page at C{""} and C{static}."""
        return {b"metrics": self.metrics.resource(self.reactor), b"": self.page,
                b"static": self.page.static}

    def status(self) -> dict[str, Any]:
        """The data of C{GET /api/v1/status} (L{status_data}), now."""
        now = self.reactor.seconds()
        throttle = getattr(self.live.scheduler, "throttle", None)
        return status_data(self.history, admin=self.admin, config=self.config,
                           queue_counts=self.live.queue_counts(), started=self.started_at,
                           now=now, throttles=throttle.in_force(now) if throttle else None,
                           shared_queue=self.live.shared_counts())

    def start(self) -> None:
        """Observe the log and start sampling (when the service starts)."""
        if self._observing:
            return
        self.started_at = self.reactor.seconds()
        # plain callables are ILogObserver providers (twisted.logger says so)
        self.publisher.addObserver(_observer(self.metrics.log_observer))
        self.publisher.addObserver(_observer(self.history.log_observer))
        self.history.start()
        self._observing = True

    def stop(self) -> None:
        """Stop observing and sampling (after the service stopped)."""
        if not self._observing:
            return
        self.history.stop()
        self.publisher.removeObserver(_observer(self.metrics.log_observer))
        self.publisher.removeObserver(_observer(self.history.log_observer))
        self._observing = False


def _observer(f: Any) -> ILogObserver:
    return cast(ILogObserver, f)
