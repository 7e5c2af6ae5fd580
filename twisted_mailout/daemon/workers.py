"""C{twistd mailout --workers N}: N delivery processes on one queue folder.

The parent process (L{WorkerSupervisor}) delivers nothing itself. It:

  1. takes the queue's lock (C{DIR/lock}), as a single daemon does, so
     C{enqueue()}, C{mailout queue} and a second daemon see one daemon;
  2. repairs what a crash left in the whole folder (L{Queue.recover}: stale
     C{tmp/} files, orphaned state files), then makes the shared connection
     table C{DIR/workers/limits} afresh
     (L{twisted_mailout.delivery.limits.SharedLimits});
  3. starts N workers (L{twisted_mailout.daemon.worker}) with
     C{spawnProcess}, and speaks AMP with each over its standard input and
     output: a worker sends its log events (published here, so the log file
     and C{--json-log} have every worker's lines) and says when it is ready;
  4. restarts a worker that dies (after zeroing its column of the shared
     table), with a delay that grows while it keeps dying at once (1 s
     doubling to 30 s);
  5. serves the HTTP API, health and metrics for all of them
     (L{twisted_mailout.daemon.workerapi});
  6. on SIGTERM stops every worker (each lets its transactions in flight
     finish, up to C{--shutdown-timeout}), kills one that has not stopped
     10 s after that, then releases the lock.

Each message belongs to one worker (L{twisted_mailout.queue.shard}), so no
message is ever delivered by two workers; if the parent is killed, the
workers see their standard input close and stop, and the next parent
recovers the folder before it starts new ones.

Why processes over AMP and a shared table: AMP over the pipes that
C{spawnProcess} makes needs no port and no file, ends when either side dies
(which is how a worker learns its parent is gone), and carries the few
messages the two sides exchange (log batches, readiness, reload); the
connection limits, which must be checked synchronously before each
connection, live in a shared memory table instead (see
L{twisted_mailout.delivery.limits}).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol, threads
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from twisted_mailout.daemon import http
from twisted_mailout.daemon.config import MAX_WORKERS, Config, read_token_file
from twisted_mailout.daemon.worker import (
    CONFIG_ENV,
    Events,
    QuietAMP,
    Ready,
    Reload,
    config_to_json,
    decode_events,
    worker_socket,
)
from twisted_mailout.daemon.workerapi import MergedMetrics, WorkerClient, WorkersAPI
from twisted_mailout.delivery.limits import SharedLimits
from twisted_mailout.queue.shard import workers_dir
from twisted_mailout.queue.store import Queue

__all__ = ["WorkerSupervisor", "default_workers"]

log = Logger(namespace="mailout.workers")

#: Seconds before a dead worker is started again: the first delay, and the
#: most it grows to while the worker keeps dying within L{STABLE} seconds.
RESTART_DELAY, RESTART_MAX, STABLE = 1.0, 30.0, 10.0


def default_workers(cap: int = 8) -> int:
    """The workers C{--workers auto} starts.

    @param cap: the most (C{--max-workers}).
    @return: one per core this process may use (its CPU affinity), at least
        1 and at most C{cap}.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, cap))


class _ParentAMP(QuietAMP):
    """The parent's end of one worker's AMP connection."""

    def __init__(self, worker: _Worker) -> None:
        super().__init__()
        self.worker = worker

    @Ready.responder
    def ready(self) -> dict[str, Any]:
        self.worker.ready = True
        log.info("worker {index} (pid {pid}) is delivering", index=self.worker.index,
                 pid=self.worker.pid)
        return {}

    @Events.responder
    def events(self, lines: str) -> dict[str, Any]:
        for event in decode_events(lines, self.worker.index):
            globalLogPublisher(event)
        return {}


class _ChildTransport:
    """What AMP writes to goes to the worker's standard input."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self.process.writeToChild(0, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.process.writeToChild(0, b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self.process.closeChildFD(0)

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.amp = _ParentAMP(worker)
        self._err = b""

    def connectionMade(self) -> None:
        self.amp.makeConnection(_ChildTransport(self.transport))

    def outReceived(self, data: bytes) -> None:
        self.amp.dataReceived(data)

    def errReceived(self, data: bytes) -> None:
        # what a worker writes before its log is connected (or a crash's trace)
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                log.warn("worker {index}: {line}", index=self.worker.index,
                         line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        if self._err.strip():
            self.errReceived(b"\n")
        self.amp.connectionLost(reason)
        self.worker.ended(reason)


class _Worker:
    """One worker slot: its process, restarted while the supervisor runs."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.process: Any = None
        self.protocol: _WorkerProcess | None = None
        self.pid: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.delay = RESTART_DELAY
        self.restarts = 0
        self._timer: Any = None
        self._ended: list[defer.Deferred[None]] = []

    def spawn(self) -> None:
        sup = self.supervisor
        self._timer = None
        env = dict(os.environ)
        env[CONFIG_ENV] = sup.config_json
        self.protocol = _WorkerProcess(self)
        self.ready = False
        self.started_at = sup.reactor.seconds()
        args = [sup.python, "-m", "twisted_mailout.daemon.worker", str(self.index),
                str(sup.count)]
        self.process = sup.reactor.spawnProcess(
            self.protocol, sup.python, args, env=env, childFDs={0: "w", 1: "r", 2: "r"})
        self.pid = self.process.pid
        log.info("started worker {index} of {count} (pid {pid})", index=self.index,
                 count=sup.count, pid=self.pid)

    def ended(self, reason: Failure) -> None:
        sup = self.supervisor
        self.process, self.ready = None, False
        waiting, self._ended = self._ended, []
        for d in waiting:
            d.callback(None)
        try:
            SharedLimits.reset(sup.limits_path, self.index)  # its sockets are gone
        except Exception as e:  # noqa: BLE001 - logged; the restart still happens
            log.error("cannot reset worker {index}'s connection counts: {err}",
                      index=self.index, err=e)
        if sup.stopping:
            log.info("worker {index} (pid {pid}) stopped: {why}", index=self.index,
                     pid=self.pid, why=reason.getErrorMessage())
            return
        lived = sup.reactor.seconds() - self.started_at
        self.delay = RESTART_DELAY if lived >= STABLE else min(self.delay * 2, RESTART_MAX)
        self.restarts += 1
        log.error("worker {index} (pid {pid}) died after {lived:.1f} s ({why}); starting it "
                  "again in {delay:.0f} s", index=self.index, pid=self.pid, lived=lived,
                  why=reason.getErrorMessage(), delay=self.delay)
        self._timer = sup.reactor.callLater(self.delay, self.spawn)

    def stop(self) -> defer.Deferred[None]:
        """SIGTERM the worker; fires when it has exited (killed if it has
        not after the shutdown timeout and 10 s more)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.process is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ended.append(d)
        try:
            self.process.signalProcess("TERM")
        except error.ProcessExitedAlready:
            pass
        reactor = self.supervisor.reactor
        killer = reactor.callLater(self.supervisor.config.shutdown_timeout + 10.0, self.kill)
        d.addBoth(lambda r: (killer.cancel() if killer.active() else None, r)[1])
        return d

    def kill(self) -> None:
        if self.process is not None:
            log.warn("worker {index} (pid {pid}) did not stop: killing it", index=self.index,
                     pid=self.pid)
            try:
                self.process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

    def reload(self) -> defer.Deferred[Any]:
        if self.protocol is None or self.process is None:
            return defer.succeed(None)
        return self.protocol.amp.callRemote(Reload).addErrback(
            lambda f: log.warn("worker {index} did not reload the suspensions: {err}",
                               index=self.index, err=f.getErrorMessage()))


class WorkerSupervisor(service.MultiService):
    """The parent of C{--workers N} (see the module docstring).

    @param config: the daemon's L{Config} (C{config.workers} workers).
    @param reactor: the reactor (C{IReactorProcess}, C{IReactorTime},
        C{IReactorUNIX}).
    @param python: the interpreter the workers run (this one by default).
    @raise QueueLocked: another daemon runs on the folder.
    @raise QueueError: the folder cannot be used.
    @raise ValueError: C{config.workers} out of range, or a shared queue.
    """

    name: str | None = "mailout"  # type: ignore[assignment]

    def __init__(self, config: Config, reactor: Any = None, python: str | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        if config.shared_queue or not 1 <= config.workers <= MAX_WORKERS:
            raise ValueError("workers: a queue folder and 1 to 64 workers")
        self.config = config
        self.reactor = reactor
        self.python = python or sys.executable
        self.count = config.workers
        self.config_json = config_to_json(config)
        self.queue = Queue(config.queue)
        self.queue.lock()
        self.locked = True
        os.makedirs(workers_dir(self.queue.path), mode=0o700, exist_ok=True)
        self.limits_path = os.path.join(workers_dir(self.queue.path), "limits")
        self.workers = [_Worker(self, i) for i in range(self.count)]
        self.stopping = False
        self.started_at: float | None = None
        self.token = (read_token_file(config.http_token_file)
                      if config.http_token_file is not None else None)
        clients = [WorkerClient(reactor, worker_socket(self.queue.path, i))
                   for i in range(self.count)]
        self.api = WorkersAPI(reactor, clients, self._reload, token=self.token)
        self.metrics = MergedMetrics(clients)
        self.server: http.HTTPService | None = None

    # -- start and stop ------------------------------------------------------------

    def startService(self) -> None:
        """Recover the folder (in a thread), make the shared table, start
        the workers and the HTTP server."""
        super().startService()
        try:
            self.queue.write_pid()
        except OSError as e:
            log.warn("cannot write the pid into {queue}/lock: {err}", queue=self.queue.path,
                     err=e.strerror or e)
        self.started_at = self.reactor.seconds()
        log.info("mailout starting {n} workers on {queue}", n=self.count, queue=self.queue.path)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self._prepare)
        d.addCallback(self._spawn_all)
        d.addErrback(self._start_failed)

    def _prepare(self) -> int:
        recovery = self.queue.recover()
        for p in recovery.problems:
            log.warn("recovery: {problem}", problem=p)
        SharedLimits.create(self.limits_path, max_workers=MAX_WORKERS,
                            slots=max(4096, 4 * self.config.max_connections))
        return len(recovery.due) + len(recovery.on_hold)

    def _spawn_all(self, queued: int) -> None:
        log.info("{n} messages queued; starting the workers", n=queued)
        if self.stopping:
            return
        for w in self.workers:
            w.spawn()
        self._start_http()

    def _start_failed(self, failure: Failure) -> None:
        log.failure("mailout failed to start its workers; stopping", failure)
        if self.running:
            self.stopService()
        self.reactor.stop()

    def _start_http(self) -> None:
        descriptions = list(self.config.http)
        optional: set[str] = set()
        if self.config.http_default:
            default = http.default_endpoint(self.queue.path)
            if default is not None and default not in descriptions:
                descriptions.insert(0, default)
                optional.add(default)
        if not descriptions:
            return
        from twisted_mailout.daemon.status import StatusPage

        page = StatusPage()  # it polls /api/v1/status: the workers' merged
        root = http.build_root(self.api, self.not_ready, {b"metrics": self.metrics,
                                                          b"": page, b"static": page.static})
        site = http.ControlSite(root, reactor=self.reactor)
        self.server = http.HTTPService(
            self.reactor, site, descriptions, self.queue.path, self.api,
            token_file=self.config.http_token_file, optional=frozenset(optional),
            on_failure=self._start_failed)
        self.server.startService()

    def not_ready(self) -> list[str]:
        """Why C{/readyz} answers 503: workers not (yet) delivering."""
        out = [f"worker {w.index} is not delivering yet" for w in self.workers if not w.ready]
        if not self.locked:
            out.append("the queue's lock is not held")
        return out

    def stopService(self) -> defer.Deferred[None]:
        """Stop the HTTP server, then every worker (in parallel), then
        release the lock. @return: a Deferred that never fails."""
        self.stopping = True
        super().stopService()
        server, self.server = self.server, None
        first = server.stopService() if server is not None and server.running else None
        d = defer.maybeDeferred(lambda: first)

        def stop_workers(_: object) -> defer.Deferred[Any]:
            return defer.DeferredList([w.stop() for w in self.workers], consumeErrors=True)

        def done(_: object) -> None:
            self.queue.unlock()
            self.locked = False
            log.info("mailout stopped: {n} workers", n=self.count)

        return d.addBoth(stop_workers).addBoth(done)

    def _reload(self, indexes: list[int]) -> defer.Deferred[Any]:
        return defer.DeferredList([self.workers[i].reload() for i in indexes],
                                  consumeErrors=True)
