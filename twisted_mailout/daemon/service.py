"""Wiring: the delivery service for twistd and .tac files."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python import filepath
from twisted.python.failure import Failure

from twisted.web.resource import Resource

from twisted_mailout.admin import QueueAdmin
from twisted_mailout.daemon import http
from twisted_mailout.daemon.config import Config, read_token_file
from twisted_mailout.api import default_reactor
from twisted_mailout.delivery.build import build_connector as _build_connector
from twisted_mailout.delivery.connector import Connector, ConnectorSettings
from twisted_mailout.outcome import RecipientResult
from twisted_mailout.queue import QueueError
from twisted_mailout.queue.store import Queue
from twisted_mailout.routing.router import make_resolver
from twisted_mailout.smtp.auth import Credentials
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler, thread_io
from twisted_mailout.delivery.throttle import ThrottleRules
from twisted_mailout.tls.creators import load_trust_root
from twisted_mailout.tls.mtasts import MTASTS
from twisted_mailout.tls.policy import PolicyTable

__all__ = ["DeliveryService", "build_connector", "makeService"]

log = Logger()


def build_connector(config: Config, reactor: Any, resolver: Any = None,
                    credentials: Credentials | None = None, policy: PolicyTable | None = None,
                    mta_sts: MTASTS | None = None) -> Connector:
    """The router and connector that C{config} describes (built by
    L{twisted_mailout.delivery.build.build_connector}).

    @param config: the daemon's L{Config}.
    @param reactor: the reactor (C{IReactorTCP}, C{IReactorUDP},
        C{IReactorTime}; Twisted's reactor is untyped).
    @param resolver: an C{IResolver} (a zope interface, which mypy cannot
        check); made from C{config.resolvers} when L{None}.
    @param credentials: L{Credentials} replacing C{config}'s AUTH options.
    @param policy: a L{PolicyTable} replacing C{config}'s.
    @param mta_sts: an L{MTASTS} to use instead of building one.
    @return: a L{Connector}.
    @raise ValueError: a bad resolver, relay or TLS policy file, unusable
        AUTH credentials (L{auth.AuthError}); OSError: unreadable cafile.
    """
    if resolver is None:
        resolver = make_resolver(list(config.resolvers), reactor, config.dns_tries)
    trust_root = load_trust_root(config.cafile)
    settings = ConnectorSettings(
        helo=config.helo_name,
        tls=config.tls,
        policy=policy if policy is not None else config.policy_table(),
        credentials=credentials if credentials is not None else config.credentials(),
        tls_fallback_memory=config.tls_fallback_memory,
        trust_root=trust_root,
        timeouts=config.timeouts,
        max_connections=config.max_connections,
        max_per_destination=config.max_per_destination,
        idle_timeout=config.connection_idle,
        max_age=config.connection_max_age,
        max_messages=config.max_messages_per_connection,
        failure_memory=min(config.destination_failure_memory, config.retry_base),
        source_addresses=config.source_addresses,
        chunking=config.chunking,
    )
    return _build_connector(
        reactor, resolver, settings, relay=config.relay, mx_port=config.mx_port,
        dnssec_resolvers=config.dnssec_resolvers, dns_timeout=config.dns_timeout,
        mta_sts=mta_sts if mta_sts is not None else config.mta_sts,
        mta_sts_cache=(None if config.queue == "-" or config.shared_queue
                       else os.path.join(config.queue, "mta-sts")),
        mta_sts_timeout=min(config.dns_timeout + config.connect_timeout, 60.0),
        shaping=config.shaping_config())


class DeliveryService(service.MultiService):
    """Delivers everything in one queue folder until stopped.

    A C{MultiService} of three children, started in this order and stopped
    in the reverse one:

      1. C{"scheduler"}: loads the saved destination suspensions (the
         L{QueueAdmin}'s start), then recovers the queue and runs the
         L{Scheduler}; on stop, lets transactions in flight finish for up to
         C{config.shutdown_timeout} seconds (mail still in flight then stays
         queued);
      2. C{"pickup"}: once the queue is recovered, picks up new mail on
         inotify events and every C{config.poll_interval} seconds; stopped
         before the scheduler, so nothing new is picked up while it winds
         down;
      3. C{"http"} (unless there is no endpoint): the HTTP API and health
         endpoints (L{http.HTTPService}) on the default Unix socket
         C{DIR/control.sock} and every C{config.http} endpoint, advertised in
         C{DIR/control.json}; stopped first, so no operator action starts
         while the rest stops. Its API waits for the queue's recovery.

    The queue's lock is taken when the service is constructed (so a second
    daemon fails at once, before twistd daemonizes), the pid written into it
    when the service starts (after the fork), and the lock released when
    both children have stopped.

    @param config: the L{Config}.
    @param reactor: the reactor (IReactorTCP, IReactorTime, IReactorThreads);
        the global one when L{None}.
    @param resolver: optional C{IResolver} replacing C{config.resolvers}.
    @param stop_reactor_on_failure: when the queue cannot be recovered at
        start, stop the reactor as well as the service (twistd's daemon, so
        the process exits and its supervisor sees it), instead of leaving an
        application that embeds the service running without it.
    @param observers: callables receiving each outcome
        (L{twisted_mailout.outcome.RecipientResult}).
    @param extra_resources: more children of the HTTP server's root,
        C{{name: resource}} (C{b"metrics"}, the status page at C{b""} and
        C{b"static"}); see L{http.build_root}. Also settable through
        L{http_resources} before the service starts.
    @param status: makes the data of C{GET /api/v1/status} (a dict or a
        Deferred of one); L{None}: a short built-in summary.
    @raise QueueLocked: another daemon runs on the folder.
    @raise QueueError: the folder cannot be created.
    @raise ConfigError: the API's token file became unusable.
    @ivar queue: the L{Queue} (the store).
    @ivar connector: the L{Connector}.
    @ivar scheduler: the L{Scheduler}.
    @ivar admin: the L{QueueAdmin} of the HTTP API (over the scheduler).
    @ivar http_resources: the extra children of the HTTP root (a dict to
        add to before L{startService}).
    @ivar http_status: the C{status} callable (settable before the start).
    @ivar watch: the L{http.ReactorWatch} behind C{/readyz}.
    @ivar delivering: C{True} once the queue is recovered and delivery runs.
    @ivar started: after C{startService}, a Deferred firing when the queue
        has been recovered and delivery has begun (L{None} before).
    """

    name: str | None = "mailout"  # type: ignore[assignment]  # Service declares None

    def __init__(self, config: Config, reactor: Any = None, resolver: Any = None,
                 observers: Iterable[Callable[[RecipientResult], object]] = (),
                 stop_reactor_on_failure: bool = False,
                 extra_resources: Mapping[bytes, Resource] | None = None,
                 status: Callable[[], Any] | None = None) -> None:
        super().__init__()
        reactor = default_reactor(reactor)
        self.config = config
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.reactor = reactor
        self.queue: Any
        if config.shared_queue:
            from twisted_mailout.queue.postgres import PostgresStore

            # shared: no lock; every entry is claimed under a lease instead
            self.queue = PostgresStore(config.queue, owner=config.owner,
                                       lease_duration=config.lease_duration,
                                       password=config.queue_password())
        elif config.worker_index is not None:
            from twisted_mailout.queue.shard import ShardQueue

            # one worker of several (--workers): its share of the folder,
            # under its own lock (the parent holds DIR/lock)
            self.queue = ShardQueue(config.queue, config.worker_index, config.worker_count)
            self.queue.lock()
        else:
            self.queue = Queue(config.queue)
            self.queue.lock()
        self.locked = True
        self.connector = build_connector(config, reactor, resolver)
        if config.worker_index is not None:
            from twisted_mailout.delivery.limits import SharedLimits
            from twisted_mailout.queue.shard import workers_dir

            # the limits hold across the workers (the parent made the table)
            self.connector.pool.shared = SharedLimits(
                os.path.join(workers_dir(config.queue), "limits"), config.worker_index)
        self.scheduler = Scheduler(
            self.queue,
            self.connector,
            reactor,
            run_blocking=thread_io(reactor),
            retry=RetryPolicy(base=config.retry_base, max=config.retry_max,
                              lifetime=config.max_queue_lifetime,
                              bounce_lifetime=config.bounce_lifetime,
                              jitter=config.retry_jitter),
            relay=bool(config.relay),
            max_inflight=max(50, config.max_connections * 10),
            reporting_mta=config.helo_name,
            observers=observers,
            delay_warning=config.delay_warning,
            signer=config.signer(),
        )
        self.admin = QueueAdmin(self.queue, reactor, run_blocking=thread_io(reactor),
                                scheduler=self.scheduler, reporting_mta=config.helo_name,
                                connector=self.connector, source="api")
        shaper = self.connector.shaper
        if shaper is not None and shaper.config.rules:
            # the throttling rules of the shaping file; their suspensions are
            # saved like the operator's, so they outlive a restart
            self.scheduler.throttle = ThrottleRules(
                shaper.config.rules, self.scheduler.suspensions, reactor, shaper=shaper,
                on_suspend=lambda _s: self.admin.save_suspensions())
        self.token = (read_token_file(config.http_token_file)
                      if config.http_token_file is not None else None)
        from twisted_mailout.daemon.live import Observability

        #: the metrics, history and status page (L{Observability})
        self.observability = Observability(reactor, config, self.scheduler, self.connector,
                                           self.admin)
        self.http_resources: dict[bytes, Resource] = {
            **self.observability.resources(), **dict(extra_resources or {})}
        self.http_status = status if status is not None else self.observability.status
        self.started_at: float | None = None
        self.watch = http.ReactorWatch(reactor)
        self.started: defer.Deferred[Any] | None = None
        self.delivering = False
        self._waiting: list[defer.Deferred[None]] = []
        _SchedulerService(self).setServiceParent(self)
        _PickupService(self).setServiceParent(self)
        _HTTPChild(self).setServiceParent(self)

    def start_delivery(self) -> defer.Deferred[Any]:
        """Load the saved suspensions (so they apply from the first
        attempt), then start the scheduler (recovery, first pickup).

        @return: a Deferred firing with the number of messages recovered,
            or failing as either step failed.
        """
        d = self.admin.start()
        d.addCallback(lambda _: self.scheduler.start())

        def running(result: object) -> object:
            self.delivering = True
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.callback(None)
            return result

        return d.addCallback(running)

    def wait_delivering(self) -> defer.Deferred[None]:
        """A Deferred firing once delivery runs (at once if it does); it
        fails when the start failed (L{QueueError})."""
        if self.delivering:
            return defer.succeed(None)
        if self.started is not None and self.started.called and not self.running:
            return defer.fail(QueueError("mailout could not start; see its log"))
        w: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(w)
        return w

    async def give_back_requested(self) -> int:
        """Carry out the operators' requests to this daemon on a shared
        queue (C{mailout queue ACTION --queue postgresql://...}): take the
        messages out of the schedule (work in flight on them finishes and its
        outcome is saved first), hand their leases to the command that asked,
        and mark each request done, so the command can claim them and act.

        @return: how many messages were given back.
        """
        run = thread_io(self.reactor)
        sched, store = self.scheduler, self.queue
        given = 0
        for rid, qids in await run(store.pending_requests):
            taken = await sched.take(qids)
            # handed to the command (an outcome still being written stays ours)
            await run(store.finish_request, rid, taken)
            for qid in taken:
                sched.give_back(qid, None)
                sched.on_hold.discard(qid)
            log.info("gave {n} of {asked} messages back to an operator (request {rid})",
                     n=len(taken), asked=len(qids), rid=rid)
            given += len(taken)
        return given

    def not_ready(self) -> list[str]:
        """Why the daemon is not ready (C{/readyz}); empty when it is: the
        queue is recovered, its lock held, and the reactor not stalled.

        @return: the reasons, for people.
        """
        reasons = []
        if not self.running:
            reasons.append("the service is not running")
        if not self.locked:
            reasons.append("the queue's lock is not held")
        if not self.delivering:
            reasons.append("the queue is not open yet (recovery is running)")
        stalled = self.watch.stalled()
        if stalled:
            reasons.append(stalled)
        return reasons

    def http_endpoints(self) -> tuple[list[str], frozenset[str]]:
        """The endpoints the HTTP server listens on: the default Unix socket
        (unless C{http_default} is off, or its path is too long) and
        C{config.http}.

        @return: C{(descriptions, the optional ones)}: an optional endpoint
            that cannot listen is only logged; any other stops the daemon.
        """
        out = list(self.config.http)
        optional: set[str] = set()
        if (self.config.http_default and not self.config.shared_queue
                and self.config.worker_index is None):
            default = http.default_endpoint(self.queue.path)
            if default is not None and default not in out:
                out.insert(0, default)
                optional.add(default)
        return out, frozenset(optional)

    def startService(self) -> None:
        """Write this process's pid into the lock, log the start, and start
        the children (the scheduler recovers the queue; pickup follows)."""
        # twistd builds the service (and takes the lock) before it daemonizes;
        # the lock, inherited across the fork, now names the process that runs.
        try:
            if not self.config.shared_queue:
                self.queue.write_pid()
        except OSError as e:
            log.warn("cannot write the pid into {queue}/lock: {err}", queue=self.queue.path,
                     err=e.strerror or e)
        self.started_at = self.reactor.seconds()
        self.observability.start()
        log.info("mailout starting on {queue} ({mode})", queue=self.queue.location,
                 mode=f"relay {self.config.relay}" if self.config.relay else
                 f"MX routing, port {self.config.mx_port}")
        super().startService()

    def _start_failed(self, failure: Failure) -> defer.Deferred[None] | None:
        """The queue could not be recovered (or a required HTTP endpoint
        could not listen): say so, and stop (release the lock) rather than
        keep "running" without delivering anything; with
        C{stop_reactor_on_failure} (the twistd daemon), stop the reactor too,
        so the process ends instead of idling."""
        log.failure("mailout failed to start; the service stops", failure)
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.errback(QueueError("mailout could not start; see its log"))
        d: defer.Deferred[None] = (self.stopService() if self.running
                                   else defer.succeed(None))
        if self.stop_reactor_on_failure:
            def stop_reactor(result: object) -> object:
                log.error("mailout: stopping the process: the queue could not be recovered")
                self.reactor.stop()
                return result

            d.addBoth(stop_reactor)
        return d

    def stopService(self) -> defer.Deferred[None]:
        """Stop pickup, then the scheduler (see L{Scheduler.stop}), then
        release the queue's lock.

        @return: a Deferred firing with L{None} when all that is done; it
            never fails.
        """
        d = super().stopService()  # pickup first, then the scheduler

        def done(_: object) -> None:
            self.observability.stop()
            if not self.config.shared_queue:
                self.queue.unlock()
            self.locked = False
            log.info("mailout stopped: {counts}", counts=self.scheduler.counts)

        return d.addBoth(done)


class _SchedulerService(service.Service):
    """The C{"scheduler"} child of L{DeliveryService}: recovers the queue and
    runs the scheduler; its stop waits for work in flight (bounded)."""

    name: str | None = "scheduler"  # type: ignore[assignment]

    def __init__(self, owner: DeliveryService) -> None:
        self._owner = owner

    def startService(self) -> None:
        super().startService()
        started = self._owner.start_delivery()
        started.addErrback(self._owner._start_failed)
        self._owner.started = started

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        return self._owner.scheduler.stop(self._owner.config.shutdown_timeout)


class _PickupService(service.Service):
    """The C{"pickup"} child of L{DeliveryService}: asks the scheduler to pick
    up new mail on inotify events on C{new/} and C{cur/} and every
    C{poll_interval} seconds, once the queue has been recovered."""

    name: str | None = "pickup"  # type: ignore[assignment]

    def __init__(self, owner: DeliveryService) -> None:
        self._owner = owner
        self._poller: task.LoopingCall | None = None
        self._notifier: Any = None
        self._stop_listening: threading.Event | None = None
        self._listener: threading.Thread | None = None
        self._wake_pending = False

    def startService(self) -> None:
        super().startService()
        assert self._owner.started is not None  # the scheduler child started first
        self._owner.started.addCallback(self._watch)

    def _watch(self, result: object) -> object:
        if not (self.running and self._owner.running):  # stopped, or the start failed
            return result
        owner = self._owner
        self._poller = task.LoopingCall(owner.scheduler.pickup)
        self._poller.clock = owner.reactor
        self._poller.start(owner.config.poll_interval, now=False)
        if owner.config.shared_queue:
            # LISTEN/NOTIFY wake-ups in a thread of their own (polling stays:
            # a lost notification, or a pooler in transaction mode, then
            # costs only latency)
            self._stop_listening = threading.Event()
            self._wake_pending = False
            listener = threading.Thread(
                target=owner.queue.listen, args=(self._notified_in_thread,
                                                 self._stop_listening),
                kwargs={"on_admin": self._admin_in_thread},
                name="mailout-listen", daemon=True)
            listener.start()
            self._listener = listener
            return result
        try:
            from twisted.internet import inotify  # Linux only; polling alone elsewhere

            n = inotify.INotify(reactor=owner.reactor)
            n.startReading()
            mask = inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE
            for sub in ("new", "cur"):
                n.watch(filepath.FilePath(os.path.join(owner.queue.path, sub)), mask,
                        callbacks=[self._notified])
            self._notifier = n
        except Exception as e:  # noqa: BLE001 - no inotify: polling alone is fine
            log.info("inotify unavailable ({err}); polling every {s}s", err=e,
                     s=owner.config.poll_interval)
        return result

    def _notified(self, watch: object, path: object, mask: int) -> None:
        if self.running:
            self._owner.scheduler.pickup()

    def _notified_in_thread(self) -> None:
        """A NOTIFY arrived (listener thread): one pickup, coalesced."""
        if self._wake_pending:
            return
        self._wake_pending = True
        self._owner.reactor.callFromThread(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        if self.running:
            self._owner.scheduler.pickup()

    def _admin_in_thread(self, what: str) -> None:
        """An operator asked this daemon for messages, or changed the
        suspensions (listener thread)."""
        self._owner.reactor.callFromThread(self._serve_admin, what)

    def _serve_admin(self, what: str) -> None:
        if not self.running:
            return
        d: defer.Deferred[Any]
        if what == "suspensions":
            d = self._owner.admin.reload_suspensions()
        else:
            d = defer.Deferred.fromCoroutine(self._owner.give_back_requested())
        d.addErrback(lambda f: log.failure("an operator's request failed", f))

    def stopService(self) -> None:
        super().stopService()
        if self._stop_listening is not None:
            self._stop_listening.set()  # the thread ends within a second
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None


class _HTTPChild(service.Service):
    """The C{"http"} child of L{DeliveryService}: builds the site (the API
    over the service's L{QueueAdmin}, C{/healthz}, C{/readyz}, the extra
    resources) when it starts, and runs an L{http.HTTPService} on the
    endpoints; nothing when there are none."""

    name: str | None = "http"  # type: ignore[assignment]

    def __init__(self, owner: DeliveryService) -> None:
        self._owner = owner
        self.server: http.HTTPService | None = None
        self.api: http.ControlAPI | None = None

    def startService(self) -> None:
        super().startService()
        owner = self._owner
        if not owner.running:  # the start failed before this child's turn
            return
        descriptions, optional = owner.http_endpoints()
        if not descriptions:
            log.info("no HTTP API (--no-http and no --http)")
            return
        self.api = http.ControlAPI(owner.admin, owner.reactor, token=owner.token,
                                   status=owner.http_status,
                                   wait_started=owner.wait_delivering)
        root = http.build_root(self.api, owner.not_ready, owner.http_resources)
        site = http.ControlSite(root, reactor=owner.reactor)
        self.server = http.HTTPService(
            owner.reactor, site, descriptions,
            None if owner.config.shared_queue or owner.config.worker_index is not None
            else owner.queue.path, self.api,
            token_file=owner.config.http_token_file, optional=optional,
            on_failure=owner._start_failed, watch=owner.watch)
        self.server.startService()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        server, self.server = self.server, None
        if server is not None and server.running:
            return server.stopService()
        return None


def makeService(config: Config, reactor: Any = None,
                stop_reactor_on_failure: bool = True) -> DeliveryService:
    """The service for twistd and .tac files (see L{DeliveryService}): the
    whole process, so a start that cannot recover the queue stops the
    reactor and the process ends.

    @param config: a L{Config}.
    @param reactor: the reactor (untyped in Twisted); the global one when
        L{None}.
    @param stop_reactor_on_failure: see L{DeliveryService}.
    @return: a started-on-demand L{DeliveryService}.
    @raise QueueLocked: another daemon runs on C{config.queue}.
    """
    return DeliveryService(config, reactor, stop_reactor_on_failure=stop_reactor_on_failure)
