"""Wiring: the delivery service for twistd and .tac files."""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger
from twisted.python import filepath

from twisted_mailout.daemon.config import Config
from twisted_mailout.api import default_reactor
from twisted_mailout.delivery.build import build_connector as _build_connector
from twisted_mailout.delivery.connector import Connector, ConnectorSettings
from twisted_mailout.queue.store import Queue
from twisted_mailout.routing.router import make_resolver
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler, thread_io
from twisted_mailout.tls.creators import load_trust_root

__all__ = ["DeliveryService", "build_connector", "makeService"]

log = Logger(namespace="twisted_mailout")


def build_connector(config: Config, reactor, resolver=None, credentials=None,
                    policy=None, mta_sts=None) -> Connector:
    """The router and connector that C{config} describes (built by
    L{twisted_mailout.delivery.build.build_connector}).

    @param resolver: an C{IResolver}; made from C{config.resolvers} when
        L{None}.
    @param credentials: L{auth.Credentials} replacing C{config}'s AUTH options.
    @param policy: a L{tlspolicy.PolicyTable} replacing C{config}'s.
    @param mta_sts: an L{mtasts.MTASTS} to use instead of building one.
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
    )
    return _build_connector(
        reactor, resolver, settings, relay=config.relay, mx_port=config.mx_port,
        dnssec_resolvers=config.dnssec_resolvers, dns_timeout=config.dns_timeout,
        mta_sts=mta_sts if mta_sts is not None else config.mta_sts,
        mta_sts_cache=None if config.queue == "-" else os.path.join(config.queue, "mta-sts"),
        mta_sts_timeout=min(config.dns_timeout + config.connect_timeout, 60.0))


class DeliveryService(service.Service):
    """Delivers everything in one queue folder until stopped.

    Takes the queue's lock when constructed (so a second daemon fails at
    once, before twistd daemonizes), recovers the queue on start, picks up
    new mail on inotify events and every C{poll_interval} seconds, and on
    stop lets transactions in flight finish for up to C{shutdown_timeout}.

    @param config: the L{Config}.
    @param reactor: the reactor (IReactorTCP, IReactorTime, IReactorThreads).
    @param resolver: optional C{IResolver} replacing C{config.resolvers}.
    @param observers: callables receiving each L{scheduler.Outcome}.
    @raise QueueLocked: another daemon runs on the folder.
    @raise QueueError: the folder cannot be created.
    """

    name: str | None = "mailout"  # type: ignore[assignment]  # Service declares None

    def __init__(self, config: Config, reactor=None, resolver=None, observers=()):
        reactor = default_reactor(reactor)
        self.config = config
        self.reactor = reactor
        self.queue = Queue(config.queue)
        self.queue.lock()
        self.connector = build_connector(config, reactor, resolver)
        self.scheduler = Scheduler(
            self.queue,
            self.connector,
            reactor,
            io=thread_io(reactor),
            retry=RetryPolicy(base=config.retry_base, max=config.retry_max,
                              lifetime=config.max_queue_lifetime,
                              bounce_lifetime=config.bounce_lifetime,
                              jitter=config.retry_jitter),
            relay=bool(config.relay),
            max_inflight=max(50, config.max_connections * 10),
            reporting_mta=config.helo_name,
            observers=observers,
            delay_warning=config.delay_warning,
        )
        self._poller = None
        self._notifier = None
        self.started = None

    def startService(self):
        super().startService()
        # twistd builds the service (and takes the lock) before it daemonizes;
        # the lock, inherited across the fork, now names the process that runs.
        try:
            self.queue.write_pid()
        except OSError as e:
            log.warn("cannot write the pid into {queue}/lock: {err}", queue=self.queue.path,
                     err=e.strerror or e)
        log.info("mailout starting on {queue} ({mode})", queue=self.queue.path,
                 mode=f"relay {self.config.relay}" if self.config.relay else
                 f"MX routing, port {self.config.mx_port}")
        self.started = self.scheduler.start()
        self.started.addCallback(self._watch)
        self.started.addErrback(self._start_failed)

    def _start_failed(self, failure):
        """The queue could not be recovered: say so, and stop (release the
        lock) rather than keep "running" without delivering anything."""
        log.failure("mailout failed to start; the service stops", failure)
        if self.running:
            return self.stopService()
        return None

    def _watch(self, _):
        if not self.running:
            return
        self._poller = task.LoopingCall(self.scheduler.pickup)
        self._poller.clock = self.reactor
        self._poller.start(self.config.poll_interval, now=False)
        try:
            from twisted.internet import inotify

            n = inotify.INotify(reactor=self.reactor)
            n.startReading()
            mask = inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE
            for sub in ("new", "cur"):
                n.watch(filepath.FilePath(os.path.join(self.queue.path, sub)), mask,
                        callbacks=[self._notified])
            self._notifier = n
        except Exception as e:  # noqa: BLE001 - no inotify: polling alone is fine
            log.info("inotify unavailable ({err}); polling every {s}s", err=e,
                     s=self.config.poll_interval)

    def _notified(self, watch, path, mask):
        if self.running:
            self.scheduler.pickup()

    def stopService(self):
        super().stopService()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        d = self.scheduler.stop(self.config.shutdown_timeout)

        def done(_):
            self.queue.unlock()
            log.info("mailout stopped: {counts}", counts=self.scheduler.counts)

        return d.addBoth(done)


def makeService(config: Config, reactor=None) -> DeliveryService:
    """The service for twistd and .tac files (see L{DeliveryService}).

    @param config: a L{Config}.
    @return: a started-on-demand L{DeliveryService}.
    @raise QueueLocked: another daemon runs on C{config.queue}.
    """
    return DeliveryService(config, reactor)
