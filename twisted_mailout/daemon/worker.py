"""One worker process of C{twistd mailout --workers N}.

The parent (L{twisted_mailout.daemon.workers}) starts each worker with
C{spawnProcess} as C{python -m twisted_mailout.daemon.worker INDEX COUNT},
its L{Config} as JSON in the environment variable L{CONFIG_ENV}, and speaks
AMP with it over the worker's standard input and output. A worker:

  - runs a whole L{DeliveryService} on its share of the folder
    (L{twisted_mailout.queue.shard.ShardQueue}), with the connection limits
    shared through C{DIR/workers/limits};
  - serves its HTTP API only on C{DIR/workers/INDEX.sock} (mode 0600),
    through which the parent gathers metrics, status and queue actions;
  - sends its log events to the parent (L{Events}), which publishes them in
    its own log, so every observer there (the text log, C{--json-log}) sees
    every worker's events; tells the parent when its share is recovered
    and delivery runs (L{Ready});
  - stops cleanly on SIGTERM (in-flight transactions finish, up to
    C{--shutdown-timeout}) and when its standard input closes (the parent
    is gone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any, cast

from twisted.internet import defer, stdio
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEvent,
    globalLogBeginner,
    globalLogPublisher,
)
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mailout.daemon.config import Config
from twisted_mailout.queue.shard import workers_dir

__all__ = ["CONFIG_ENV", "Events", "QuietAMP", "Ready", "Reload", "config_from_json",
           "config_to_json",
           "decode_events", "main", "worker_socket"]

#: The environment variable carrying the worker's L{Config} (JSON).
CONFIG_ENV = "MAILOUT_WORKER_CONFIG"

#: Bytes of JSON events sent in one L{Events} call at most (an AMP value
#: holds at most 65,535 bytes).
BATCH_BYTES = 48 * 1024

#: Seconds events wait in the worker before they are sent.
BATCH_DELAY = 0.1


class Ready(amp.Command):
    """Worker to parent: its share is recovered and delivery runs."""

    arguments = []
    response = []


class Reload(amp.Command):
    """Parent to worker: reload the saved suspensions (worker 0 changed
    them for the operator)."""

    arguments = []
    response = [(b"count", amp.Integer())]


class Events(amp.Command):
    """Worker to parent: log events, one JSON object per line (see
    L{decode_events})."""

    arguments = [(b"lines", amp.Unicode())]
    response = []
    requiresAnswer = False


def worker_socket(queue_dir: str, index: int) -> str:
    """C{DIR/workers/INDEX.sock}: the worker's HTTP API."""
    return os.path.join(workers_dir(queue_dir), f"{index}.sock")


def config_to_json(config: Config) -> str:
    """The L{Config} as JSON (tuples become lists)."""
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> Config:
    """The L{Config} of L{config_to_json}.

    @raise ValueError: not such a JSON object.
    @raise twisted_mailout.daemon.config.ConfigError: invalid values.
    """
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("a worker's configuration must be a JSON object")
    hints = typing.get_type_hints(Config)
    kwargs = {}
    for f in dataclasses.fields(Config):
        if f.name not in raw:
            continue
        value = raw[f.name]
        if isinstance(value, list) and "tuple" in str(hints.get(f.name, "")):
            value = tuple(value)
        kwargs[f.name] = value
    return Config(**kwargs)


# -- log events to the parent ------------------------------------------------------

_SIMPLE = (str, int, float, bool, type(None))


def encode_event(event: dict[str, Any]) -> str:
    """One log event as a JSON line, for L{Events}.

    @param event: a twisted.logger event (C{dict}).
    @return: one line of JSON (C{str}, no newline): the event's text
        formatted here (with a failure's traceback) as C{log_text}, its
        level's name as C{log_level}, and every field whose value is a
        string, number, boolean or null (what C{--json-log} and the metrics
        read); other fields are dropped.
    """
    if event.get("log_format") == "{text}" and isinstance(event.get("text"), str):
        text = event["text"]  # the scheduler's lines: formatted already
    else:
        text = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text = f"{text}\n{failure.getTraceback()}"
    out: dict[str, Any] = {k: v for k, v in event.items()
                           if isinstance(v, _SIMPLE) and k not in ("log_format", "log_text")}
    level = event.get("log_level")
    out["log_level"] = getattr(level, "name", "info")  # a NamedConstant of LogLevel
    out["log_text"] = text
    return json.dumps(out, default=str)


def decode_events(lines: str, index: int) -> list[dict[str, Any]]:
    """The events of an L{Events} call, ready to publish in the parent.

    @param lines: the call's C{lines}: L{encode_event} lines joined by newlines.
    @param index: the worker that sent them.
    @return: a list of event C{dict}s with C{log_level} a L{LogLevel},
        C{log_format} C{"{log_text}"}, C{log_system} C{"worker-INDEX"} and
        C{log_worker} set; lines that are not JSON objects are skipped.
    """
    out = []
    for line in lines.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        try:
            event["log_level"] = LogLevel.levelWithName(str(event.get("log_level", "info")))
        except Exception:  # noqa: BLE001 - an unknown name: info
            event["log_level"] = LogLevel.info
        event["log_format"] = "{log_text}"
        event["log_system"] = f"worker-{index}"
        event["log_worker"] = index
        out.append(event)
    return out


@implementer(ILogObserver)
class _Forwarder:
    """Sends log events to the parent in batches; before the AMP connection
    is up (and after it is gone) they go to standard error."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.amp: amp.AMP | None = None
        self._lines: list[str] = []
        self._size = 0
        self._timer: Any = None
        self._stderr = FileLogObserver(sys.stderr, lambda e: formatEvent(e) + "\n")

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is LogLevel.debug:
            return
        if self.amp is None:
            self._stderr(event)
            return
        try:
            line = encode_event(event)
        except Exception:  # noqa: BLE001 - a log event must never break the caller
            return
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= BATCH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self.reactor.callLater(BATCH_DELAY, self.flush)

    def flush(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        lines, self._lines, self._size = self._lines, [], 0
        if not lines or self.amp is None:
            return
        batch: list[str] = []
        size = 0
        for whole in lines:
            # one huge event: cut, still sent
            line = whole if len(whole) <= BATCH_BYTES else whole[:BATCH_BYTES // 4]
            if size + len(line) > BATCH_BYTES and batch:
                self.amp.callRemote(Events, lines="\n".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line) + 1
        if batch:
            self.amp.callRemote(Events, lines="\n".join(batch))


class QuietAMP(amp.AMP):
    """AMP without its "connection established/lost" log lines (a worker's
    pipes are not a network peer worth a line each)."""

    def makeConnection(self, transport: Any) -> None:
        self._transportPeer = self._transportHost = None
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class _WorkerAMP(QuietAMP):
    """The worker's end of the AMP connection over its standard I/O."""

    def __init__(self, reactor: Any, forwarder: _Forwarder, service: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.forwarder = forwarder
        self.service = service

    @Reload.responder
    def reload(self) -> defer.Deferred[dict[str, int]]:
        return self.service.admin.reload_suspensions().addCallback(
            lambda n: {"count": int(n)})

    def connectionMade(self) -> None:
        super().connectionMade()
        self.forwarder.amp = self

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.forwarder.amp = None
        if self.reactor.running:
            # the parent is gone (or closed our input): stop cleanly
            self.reactor.stop()


def main(argv: Sequence[str] | None = None, reactor: Any = None) -> None:
    """Run worker C{INDEX} of C{COUNT} until stopped (the process's life).

    @param argv: C{[INDEX, COUNT]} (default: C{sys.argv[1:]}).
    @param reactor: the reactor (the global one by default).
    @raise SystemExit: bad arguments or configuration, or the worker could
        not start (its share is locked by another process, say).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        index, count = int(args[0]), int(args[1])
        text = os.environ.pop(CONFIG_ENV)
    except (IndexError, ValueError, KeyError):
        raise SystemExit(f"usage: {CONFIG_ENV}=JSON python -m twisted_mailout.daemon.worker "
                         "INDEX COUNT (started by twistd mailout --workers N)") from None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    forwarder = _Forwarder(reactor)
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, forwarder)], redirectStandardIO=False)
    from twisted_mailout.daemon.service import DeliveryService
    from twisted_mailout.errors import QueueError

    try:
        base = config_from_json(text)
        sock = worker_socket(base.queue, index)
        if os.path.exists(sock):
            os.unlink(sock)  # a dead predecessor's
        config = dataclasses.replace(
            base, workers=1, worker_index=index, worker_count=count,
            http=(f"unix:{sock}:mode=600",), http_default=False, http_token_file=None)
        service = DeliveryService(config, reactor, stop_reactor_on_failure=True)
    except (QueueError, ValueError, OSError) as e:
        raise SystemExit(f"mailout worker {index}: cannot start: {e}") from None
    protocol = _WorkerAMP(reactor, forwarder, service)
    stdio.StandardIO(protocol, reactor=reactor)

    def started(_: object) -> None:
        protocol.callRemote(Ready).addErrback(lambda _f: None)

    def start() -> None:
        service.startService()
        service.wait_delivering().addCallback(started)

    def stop() -> defer.Deferred[None]:
        d = service.stopService() if service.running else defer.succeed(None)
        return d.addBoth(lambda _: forwarder.flush())

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    globalLogPublisher.removeObserver(cast(ILogObserver, forwarder))


if __name__ == "__main__":
    main()
