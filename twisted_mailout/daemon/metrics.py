"""Prometheus metrics for the daemon (issue 11, C{/metrics}).

L{Metrics} owns one C{prometheus_client.CollectorRegistry} (never the
process-global one, so two daemons or two tests in one process never share
counts) and fills it from two sources:

  - B{log events}, through L{Metrics.log_observer}, a C{twisted.logger}
    observer to add to C{globalLogPublisher}. It reads the event streams that
    are a contract (docs/design.md, "Logging"):

      - C{twisted_mailout.outcome}: one event per recipient outcome, with the
        fields of L{RecipientResult.log_fields} plus the scheduler's
        C{sender}, C{destination} and C{tls};
      - the scheduler's pickup line (namespace
        C{twisted_mailout.delivery.scheduler}, fields C{qid}, C{sender},
        C{n}, C{origin}): one per message taken into the active queue;
      - C{twisted_mailout.tlsrpt}: RFC 8460 results
        (L{twisted_mailout.tls.tlsrpt}), for sessions under a DANE or
        MTA-STS policy;
      - C{twisted_mailout.session}: one event per connection's TLS outcome,
        and C{twisted_mailout.dns}: one event per failed DNS lookup (both
        from L{twisted_mailout.delivery.connector}, which documents the
        fields).

  - B{live state}, read at scrape time from a L{LiveState} (queue sizes, the
    oldest message, connections, suspensions) by a custom collector.

Why an observer of log events rather than explicit hooks in the scheduler and
the connector: the events already exist, carry every field needed, and are a
documented contract that the JSON logs and the status page read too; an
observer needs no reference from the delivery layers up to the daemon (which
the layer contract forbids anyway), costs nothing when metrics are off, and
sees every emitter in the process (the queue's scheduler and a programmatic
C{SMTPClient}) the same way. The price is that a field rename breaks the
metrics silently; the unit tests feed events made by the real emitters
(L{RecipientResult.log_fields}, L{twisted_mailout.tls.tlsrpt}, a real
connector) so such a rename fails them. L{Metrics.observe_outcome} is the
explicit form for code that holds a L{RecipientResult}.

Cardinality is bounded: every label takes values from a fixed set, except
C{destination} on C{mailout_destination_recipients_total}, which
L{BoundedLabels} limits to N destinations (20 by default) plus C{other}.

Threads: events arrive on the reactor thread (a few from the thread pool);
prometheus_client's metrics lock their values. The text is produced in the
reactor's thread pool (L{Metrics.resource} is C{prometheus_client}'s WSGI
app under C{twisted.web.wsgi}, as C{prometheus_client.twisted.MetricsResource}
does), but the L{LiveState} is read on the reactor thread, just before, so
its implementation needs no locks.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.address import IPv4Address
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.wsgi import WSGIResource

from twisted_mailout.delivery import scheduler as _scheduler
from twisted_mailout.delivery.connector import (
    DNS_FAILURE_KINDS,
    DNS_NAMESPACE,
    SESSION_NAMESPACE,
)
from twisted_mailout.outcome import RecipientResult
from twisted_mailout.tls import tlsrpt
from twisted_mailout.tls.levels import LEVELS

__all__ = [
    "DELAY_BUCKETS",
    "QUEUE_NAMES",
    "BoundedLabels",
    "LiveSnapshot",
    "LiveState",
    "Metrics",
]

log = Logger()

#: The namespaces L{Metrics.log_observer} reads (taken from the emitters'
#: loggers, so a moved module keeps them in step).
OUTCOME_NAMESPACE: str = _scheduler.outcome_log.namespace
PICKUP_NAMESPACE: str = _scheduler.log.namespace
TLSRPT_NAMESPACE: str = tlsrpt.log.namespace

#: The queue names of C{mailout_queue_messages} (Postfix's, as
#: C{postqueue -j} prints them); each is always exposed, 0 when absent.
QUEUE_NAMES: tuple[str, ...] = ("incoming", "active", "deferred", "hold")

#: Upper bounds (seconds) of C{mailout_delivery_delay_seconds}: from one
#: second to the default five-day queue lifetime.
DELAY_BUCKETS: tuple[float, ...] = (
    1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600,
    86400, 2 * 86400, 5 * 86400, math.inf)

_STATUSES = ("delivered", "deferred", "bounced", "expired")
_FINAL = ("delivered", "bounced", "expired")
_ADMIN_ACTIONS = ("hold", "release", "delete", "bounce", "flush", "requeue", "suspend",
                  "cancel-suspension")
#: The operators' actions (twisted_mailout.admin.operations).
ADMIN_NAMESPACE = "twisted_mailout.admin"
_CODE_CLASSES = ("2xx", "4xx", "5xx", "local")
_TLS_RESULTS = frozenset({"tls", "plaintext", *tlsrpt.RESULT_TYPES})
_TLS_LEVELS = frozenset(LEVELS)
_DNS_KINDS = frozenset(DNS_FAILURE_KINDS)


class LiveState(Protocol):
    """What the running daemon knows now, read at every scrape.

    Every method is called on the reactor thread, must be cheap (no I/O, no
    lock held for long: a scrape may come every second) and must not block.
    The daemon's wiring implements it over the scheduler, the connection
    pool and the suspensions.
    """

    def queue_counts(self) -> Mapping[str, int]:
        """Messages per queue name.

        @return: C{{queue_name: messages}}, names from L{QUEUE_NAMES}
            (C{incoming}, C{active}, C{deferred}, C{hold}); a name left out
            counts 0.
        """

    def oldest_arrival(self) -> float | None:
        """When the oldest queued message arrived.

        @return: epoch seconds, or L{None} when the queue is empty.
        """

    def connections(self) -> tuple[int, int]:
        """Open SMTP connections.

        @return: C{(active, idle)}: connections being opened or carrying a
            transaction, and idle ones kept for reuse
            (L{ConnectionPool.idle_connections<twisted_mailout.delivery.pool.ConnectionPool.idle_connections>}).
        """

    def suspended(self) -> int:
        """Destinations suspended by an operator now.

        @return: a count.
        """

    def throttled(self) -> tuple[int, int]:
        """Destinations held by the throttling rules now.

        @return: C{(suspended, slowed)}: counts.
        """


@dataclass(frozen=True)
class LiveSnapshot:
    """The L{LiveState} as read at one moment.

    @ivar queue: C{{queue_name: messages}}.
    @ivar oldest_age: seconds since the oldest message arrived (0 when the
        queue is empty).
    @ivar active: active connections.
    @ivar idle: idle connections.
    @ivar suspended: suspended destinations.
    @ivar throttled: C{(suspended, slowed)} by the throttling rules.
    @ivar shared: the whole shared queue (L{LiveView.shared_counts}), or
        L{None} for a queue held alone.
    """

    queue: Mapping[str, int]
    oldest_age: float
    active: int
    idle: int
    suspended: int
    throttled: tuple[int, int] = (0, 0)
    shared: Mapping[str, int] | None = None


class BoundedLabels:
    """Label values for an unbounded set (destinations), at most C{limit}
    of them plus C{other}.

    A value gets its own label once it has been seen about C{admit_after}
    times while fewer than C{limit} values have one; it keeps that label
    for the life of the object, so every series stays monotonic (a value's
    earlier counts stay in C{other}). The counts are a Misra-Gries summary of
    C{candidates} entries: memory is bounded, a value is never over-counted,
    and a stream of values seen once each (one-off domains) cannot take the
    slots; the busiest values get them first.

    Thread-safe.

    @param limit: values with their own label at most (N, 20 by default).
    @param admit_after: how many sightings earn a label (at least 1; 1 gives
        the first C{limit} values seen).
    @param candidates: values counted at most (the summary's size).
    @param other: the label of every other value.
    @raise ValueError: C{limit} < 0, C{admit_after} < 1 or C{candidates} < 1.
    """

    def __init__(self, limit: int = 20, admit_after: int = 10, candidates: int = 1000,
                 other: str = "other") -> None:
        if limit < 0 or admit_after < 1 or candidates < 1:
            raise ValueError("limit must be >= 0, admit_after and candidates >= 1")
        self.limit = limit
        self.admit_after = admit_after
        self.candidates = candidates
        self.other = other
        self._labelled: set[str] = set()
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def labelled(self) -> frozenset[str]:
        """The values that have their own label (C{frozenset[str]})."""
        with self._lock:
            return frozenset(self._labelled)

    def label(self, value: str) -> str:
        """Count one sighting of C{value} and give its label.

        @param value: e.g. a destination domain.
        @return: C{value} when it has its own label (now or before), else
            C{other}.
        """
        with self._lock:
            if value in self._labelled:
                return value
            if len(self._labelled) >= self.limit or value == self.other:
                return self.other
            counts = self._counts
            n = counts.get(value)
            if n is not None:
                n += 1
            elif len(counts) < self.candidates:
                n = 1
            else:
                # Misra-Gries: no room; every candidate loses one sighting.
                for key in list(counts):
                    if counts[key] <= 1:
                        del counts[key]
                    else:
                        counts[key] -= 1
                return self.other
            if n >= self.admit_after:
                counts.pop(value, None)
                self._labelled.add(value)
                if len(self._labelled) >= self.limit:
                    counts.clear()  # no more labels to give: stop counting
                return value
            counts[value] = n
            return self.other


class _LiveCollector(Collector):
    """The gauges read from the last L{LiveSnapshot} (see L{Metrics.refresh_live})."""

    def __init__(self, owner: Metrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (for the registry's name check)."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        """The families with the last snapshot's values; none before the
        first snapshot or without a L{LiveState}."""
        snap = self._owner.snapshot
        return list(self._families(snap)) if snap is not None else []

    @staticmethod
    def _families(snap: LiveSnapshot | None) -> Iterator[Metric]:
        queue = GaugeMetricFamily("mailout_queue_messages",
                                  "Messages in the queue, by queue name (incoming, active, "
                                  "deferred, hold)", labels=["queue_name"])
        oldest = GaugeMetricFamily("mailout_queue_oldest_age_seconds",
                                   "Seconds since the oldest queued message arrived "
                                   "(0 when the queue is empty)")
        conns = GaugeMetricFamily("mailout_connections",
                                  "Open SMTP connections, by state (active: opening or "
                                  "carrying a transaction; idle: kept for reuse)",
                                  labels=["state"])
        suspended = GaugeMetricFamily("mailout_suspended_destinations",
                                      "Destinations suspended by an operator")
        shared = GaugeMetricFamily("mailout_shared_queue_messages",
                                   "The whole queue several daemons share (PostgreSQL), by "
                                   "state (incoming: unclaimed; claimed; hold), as of this "
                                   "daemon's last pickup", labels=["state"])
        owners = GaugeMetricFamily("mailout_shared_queue_daemons",
                                   "Daemons holding live leases on the shared queue")
        throttled = GaugeMetricFamily("mailout_throttled_destinations",
                                      "Destinations (or providers) the throttling rules of "
                                      "the shaping file hold now, by action (suspend: "
                                      "suspended; rate: message rate lowered)",
                                      labels=["action"])
        if snap is not None:
            names = list(QUEUE_NAMES) + sorted(set(snap.queue) - set(QUEUE_NAMES))
            for name in names:
                queue.add_metric([name], snap.queue.get(name, 0))
            oldest.add_metric([], snap.oldest_age)
            conns.add_metric(["active"], snap.active)
            conns.add_metric(["idle"], snap.idle)
            suspended.add_metric([], snap.suspended)
            throttled.add_metric(["suspend"], snap.throttled[0])
            throttled.add_metric(["rate"], snap.throttled[1])
            if snap.shared is not None:
                for state in ("incoming", "claimed", "hold"):
                    shared.add_metric([state], snap.shared.get(state, 0))
                owners.add_metric([], snap.shared.get("owners", 0))
        yield from (queue, oldest, conns, suspended, throttled)
        if snap is not None and snap.shared is not None:
            yield from (shared, owners)


class _MetricsPage(Resource):
    """C{/metrics}: reads the live state on the reactor thread, then lets
    prometheus_client's WSGI app (in the thread pool) write the text,
    negotiated by C{Accept} (Prometheus text 0.0.4 or OpenMetrics) and
    gzipped when asked."""

    isLeaf = True

    def __init__(self, metrics: Metrics, reactor: Any) -> None:
        super().__init__()
        self._metrics = metrics
        self._wsgi = WSGIResource(reactor, reactor.getThreadPool(),
                                  make_wsgi_app(metrics.registry))

    def render(self, request: Request) -> Any:
        """Refresh the live snapshot and hand the request to the WSGI app.

        @return: C{NOT_DONE_YET} (the app finishes the request).
        """
        self._metrics.refresh_live()
        if not hasattr(request.getClientAddress(), "host"):
            # a Unix socket's peer has no address; twisted.web's WSGI
            # container needs one for REMOTE_ADDR (it failed with a 500)
            local = IPv4Address("TCP", "127.0.0.1", 0)
            request.getClientAddress = lambda: local  # type: ignore[method-assign]
            request.getHost = lambda: local  # type: ignore[method-assign]
        return self._wsgi.render(request)


class Metrics:
    """The daemon's Prometheus metrics, in a registry of their own.

    Exposed (names as they appear in the text; counters end in C{_total}):

      - C{mailout_recipients_total{status}}: recipient outcomes, C{status}
        one of delivered, deferred, bounced, expired;
      - C{mailout_destination_recipients_total{destination,status}}: the
        same by destination, for at most C{destinations} destinations
        (L{BoundedLabels}), the rest under C{other};
      - C{mailout_messages_enqueued_total}, C{mailout_recipients_enqueued_total}:
        messages (and their recipients) picked up into the active queue;
      - C{mailout_delivery_delay_seconds{status}}: histogram of the time
        from arrival to the final outcome (delivered, bounced, expired);
      - C{mailout_smtp_replies_total{code_class}}: the replies recipient
        outcomes rest on: C{2xx}, C{4xx}, C{5xx} when a server gave them,
        C{local} when none did (DNS, connection, timeout);
      - C{mailout_tls_sessions_total{level,result}}: connections by TLS level
        (L{twisted_mailout.tls.levels.LEVELS}) and result (C{tls},
        C{plaintext}, or an RFC 8460 failure type);
      - C{mailout_tlsrpt_sessions_total{policy_type,result}}: RFC 8460 session
        results under DANE (C{tlsa}) or MTA-STS (C{sts}) policies, C{result}
        C{success} or the RFC 8460 result type;
      - C{mailout_dns_failures_total{kind}}: failed lookups, C{kind} one of
        L{DNS_FAILURE_KINDS<twisted_mailout.delivery.connector.DNS_FAILURE_KINDS>};
      - C{mailout_metrics_errors_total{source}}: events that could not be
        read (C{event}) and failed reads of the live state (C{live});
      - from the L{LiveState}: C{mailout_queue_messages{queue_name}},
        C{mailout_queue_oldest_age_seconds}, C{mailout_connections{state}}
        (active, idle), C{mailout_suspended_destinations};
      - C{process_*} and C{python_info} (prometheus_client's process and
        platform collectors) when C{process} is true.

    @param live: the L{LiveState}, or L{None} until the daemon sets
        L{live}; without one the live gauges are left out.
    @param destinations: destinations with their own label at most (N).
    @param admit_after: outcomes a destination needs to get its label
        (L{BoundedLabels}).
    @param seconds: the clock, C{() -> float} epoch seconds (the queue's
        arrival times are epoch seconds).
    @param process: add the process and platform collectors.
    @ivar registry: the C{CollectorRegistry}.
    @ivar live: the L{LiveState} (settable).
    @ivar destination_labels: the L{BoundedLabels} of destinations.
    @ivar snapshot: the last L{LiveSnapshot}, or L{None}.
    """

    def __init__(self, live: LiveState | None = None, *, destinations: int = 20,
                 admit_after: int = 10, seconds: Callable[[], float] = time.time,
                 process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.live = live
        self.seconds = seconds
        self.snapshot: LiveSnapshot | None = None
        self.destination_labels = BoundedLabels(destinations, admit_after)
        r = self.registry
        self._recipients = Counter(
            "mailout_recipients", "Recipient outcomes, by status", ["status"], registry=r)
        self._dest_recipients = Counter(
            "mailout_destination_recipients",
            f"Recipient outcomes by destination (at most {destinations} destinations, "
            "the others as 'other') and status", ["destination", "status"], registry=r)
        self._enqueued = Counter(
            "mailout_messages_enqueued", "Messages picked up into the active queue",
            registry=r)
        self._enqueued_rcpts = Counter(
            "mailout_recipients_enqueued",
            "Recipients of the messages picked up into the active queue", registry=r)
        self._delay = Histogram(
            "mailout_delivery_delay_seconds",
            "Seconds from a message's arrival to a recipient's final outcome, by status "
            "(delivered, bounced, expired)", ["status"], buckets=DELAY_BUCKETS, registry=r)
        self._replies = Counter(
            "mailout_smtp_replies",
            "Replies of recipient outcomes by class: 2xx, 4xx, 5xx from a server, "
            "local when no server gave one", ["code_class"], registry=r)
        self._tls = Counter(
            "mailout_tls_sessions",
            "SMTP connections by TLS level and result (tls, plaintext, or an RFC 8460 "
            "failure type)", ["level", "result"], registry=r)
        self._tlsrpt = Counter(
            "mailout_tlsrpt_sessions",
            "RFC 8460 TLS session results under DANE (tlsa) or MTA-STS (sts) policies",
            ["policy_type", "result"], registry=r)
        self._dns = Counter(
            "mailout_dns_failures", "Failed DNS lookups (MX or address), by kind",
            ["kind"], registry=r)
        self._admin = Counter(
            "mailout_admin_actions",
            "Messages changed by an operator's action (hold, release, delete, bounce, flush, "
            "requeue), and suspensions made or cancelled", ["action"], registry=r)
        self._errors = Counter(
            "mailout_metrics_errors",
            "Log events the metrics could not read (event), failed reads of the live "
            "state (live)", ["source"], registry=r)
        for status in _STATUSES:
            self._recipients.labels(status)
        for status in _FINAL:
            self._delay.labels(status)
        for cls in _CODE_CLASSES:
            self._replies.labels(cls)
        for kind in DNS_FAILURE_KINDS:
            self._dns.labels(kind)
        for source in ("event", "live"):
            self._errors.labels(source)
        self._live_collector = _LiveCollector(self)
        r.register(self._live_collector)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            OUTCOME_NAMESPACE: self._on_outcome,
            PICKUP_NAMESPACE: self._on_pickup,
            TLSRPT_NAMESPACE: self._on_tlsrpt,
            SESSION_NAMESPACE: self._on_session,
            DNS_NAMESPACE: self._on_dns,
            ADMIN_NAMESPACE: self._on_admin,
        }

    # -- events ---------------------------------------------------------------

    def log_observer(self, event: Mapping[str, Any]) -> None:
        """A C{twisted.logger} observer (C{ILogObserver}): counts the events
        of the namespaces in the module docstring, ignores all others.
        Cheap for the others (one dictionary lookup); never raises (an
        event it cannot read counts in C{mailout_metrics_errors_total{source="event"}}).

        Add it with C{globalLogPublisher.addObserver(metrics.log_observer)}.

        @param event: a log event (C{dict}).
        """
        handler = self._handlers.get(event.get("log_namespace"))  # type: ignore[arg-type]
        if handler is None:
            return
        try:
            handler(event)
        except Exception:  # noqa: BLE001 - an observer must never raise
            self._errors.labels("event").inc()

    def observe_outcome(self, result: RecipientResult, *, destination: str | None = None,
                        tls: str | None = None) -> None:
        """Count one recipient outcome given as a value rather than a log
        event (the same as its C{twisted_mailout.outcome} event).

        @param result: the L{RecipientResult}.
        @param destination: its next-hop destination (recipient domain or
            relay key), or L{None} to leave it out of the per-destination
            counts.
        @param tls: how the session was protected (unused by the metrics,
            accepted as the event carries it).
        """
        fields = result.log_fields()
        fields.update(destination=destination, tls=tls)
        self._on_outcome(fields)

    def _on_outcome(self, event: Mapping[str, Any]) -> None:
        status = event.get("outcome")
        if status not in _STATUSES:
            return  # "queued" (applications) or unknown: not a delivery outcome
        self._recipients.labels(status).inc()
        code = event.get("code")
        if event.get("local"):
            cls = "local"
        else:
            cls = f"{code // 100}xx" if isinstance(code, int) else "local"
            if cls not in _CODE_CLASSES:
                cls = "local"  # not a reply a server may end a recipient with
        self._replies.labels(cls).inc()
        if status in _FINAL:
            delay = event.get("delay")
            if isinstance(delay, (int, float)) and not isinstance(delay, bool) and delay >= 0:
                self._delay.labels(status).observe(delay)
        destination = event.get("destination")
        if isinstance(destination, str) and destination:
            label = self.destination_labels.label(destination)
            self._dest_recipients.labels(label, status).inc()

    def _on_admin(self, event: Mapping[str, Any]) -> None:
        """An operator's action (namespace C{twisted_mailout.admin}): counted
        by action; the recipients of an admin bounce count as bounced."""
        action = event.get("action")
        if action not in _ADMIN_ACTIONS:
            return
        self._admin.labels(action).inc()
        if action == "bounce":
            recipients = event.get("recipients")
            if isinstance(recipients, list) and recipients:
                self._recipients.labels("bounced").inc(len(recipients))

    def _on_pickup(self, event: Mapping[str, Any]) -> None:
        if "origin" not in event or "qid" not in event:
            return  # another line of the scheduler
        self._enqueued.inc()
        n = event.get("n")
        if isinstance(n, int) and n > 0:
            self._enqueued_rcpts.inc(n)

    def _on_tlsrpt(self, event: Mapping[str, Any]) -> None:
        kind = event.get("tlsrpt")
        policy_type = event.get("policy_type")
        if policy_type not in tlsrpt.POLICY_TYPES:
            return
        if kind == tlsrpt.SUCCESS:
            self._tlsrpt.labels(policy_type, "success").inc(
                _count(event.get("successful_session_count")))
        elif kind == tlsrpt.FAILURE:
            result = event.get("result_type")
            if result not in tlsrpt.RESULT_TYPES:
                result = "validation-failure"
            self._tlsrpt.labels(policy_type, result).inc(
                _count(event.get("failed_session_count")))

    def _on_session(self, event: Mapping[str, Any]) -> None:
        level = event.get("tls_level")
        result = event.get("result")
        if result not in _TLS_RESULTS:
            return
        if level not in _TLS_LEVELS:
            level = "other"
        self._tls.labels(level, result).inc()

    def _on_dns(self, event: Mapping[str, Any]) -> None:
        kind = event.get("kind")
        self._dns.labels(kind if kind in _DNS_KINDS else "other").inc()

    # -- live state and exposition -------------------------------------------

    def refresh_live(self) -> LiveSnapshot | None:
        """Read the L{LiveState} now (call on the reactor thread) and keep
        it as L{snapshot}, which the live gauges expose until the next
        refresh. A L{LiveState} that raises is logged and counted
        (C{mailout_metrics_errors_total{source="live"}}), and the live
        gauges are left out of that scrape.

        @return: the new L{LiveSnapshot}, or L{None} (no L{LiveState}, or it
            failed).
        """
        live = self.live
        if live is None:
            self.snapshot = None
            return None
        try:
            oldest = live.oldest_arrival()
            active, idle = live.connections()
            snap = LiveSnapshot(
                queue={str(k): int(v) for k, v in live.queue_counts().items()},
                oldest_age=max(0.0, self.seconds() - oldest) if oldest is not None else 0.0,
                active=int(active), idle=int(idle), suspended=int(live.suspended()),
                throttled=_throttled(live),
                shared=getattr(live, "shared_counts", lambda: None)())
        except Exception:  # noqa: BLE001 - a scrape must answer anyway
            log.failure("metrics: reading the live state failed")
            self._errors.labels("live").inc()
            snap = None
        self.snapshot = snap
        return snap

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (version 0.0.4), with
        the live state read now: call on the reactor thread.

        @return: UTF-8 text (C{bytes}).
        """
        self.refresh_live()
        return generate_latest(self.registry)

    def resource(self, reactor: Any = None) -> Resource:
        """A C{twisted.web} resource serving the metrics (mount it at
        C{/metrics}). It is C{prometheus_client.twisted.MetricsResource}
        (prometheus_client's WSGI app on the reactor's thread pool) over
        this registry, with the given reactor rather than the global one,
        and reading the L{LiveState} on the reactor thread before each
        scrape.

        @param reactor: provides C{IReactorThreads}; the global reactor when
            L{None}.
        @return: a leaf C{Resource} answering every method and sub-path.
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        return _MetricsPage(self, reactor)

    def sample_names(self) -> frozenset[str]:
        """Every sample name this registry can expose (C{mailout_recipients_total},
        C{mailout_delivery_delay_seconds_bucket}, ..., the live gauges), with
        or without values yet: for checking dashboards and alert rules.

        @return: C{frozenset[str]}.
        """
        suffixes = {"counter": ("_total", "_created"),
                    "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("", "_sum", "_count", "_created"),
                    "info": ("_info",)}
        names: set[str] = set()
        for family in [*self.registry.collect(), *self._live_collector.describe()]:
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
        return frozenset(names)


def _count(value: Any) -> int:
    """A session count from a TLS-RPT event (1 when missing or bad)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _throttled(live: object) -> tuple[int, int]:
    """C{live.throttled()}, or C{(0, 0)} for a live state without it."""
    throttled = getattr(live, "throttled", None)
    if throttled is None:
        return 0, 0
    held, slowed = throttled()
    return int(held), int(slowed)
