"""Stopping the daemon while a transaction is in flight.

The real L{DeliveryService} (scheduler, connector, session) delivers over
loopback to a server that accepts the message data and then never answers
the final dot. The service is stopped: after its C{shutdown_timeout} the
session is aborted (the server sees the connection drop), its slot is freed,
the stop says so in one warning and the connector in one line per
connection, nothing is logged as an internal error, and the message is still
queued, unchanged, for the next start.
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.support.wait import wait_for_reactor
from twisted_mailout.daemon.config import Config
from twisted_mailout.daemon.service import DeliveryService
from twisted_mailout.queue import Queue, enqueue


class _StallAtTheDot(protocol.Protocol):
    """An ESMTP server that never answers the end of DATA."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""
        self.in_data = False
        self.transport.write(b"220 stall.test ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.in_data:
                if line == b".":
                    self.factory.dots += 1  # received whole; no reply, ever
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-stall.test\r\n250 PIPELINING\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                self.transport.write(b"250 ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.transport.write(b"354 go on\r\n")
            else:
                self.transport.write(b"502 no\r\n")

    def connectionLost(self, reason: object) -> None:
        self.factory.lost += 1


class StopInFlightTests(unittest.TestCase):
    def setUp(self) -> None:
        self.factory = protocol.Factory.forProtocol(_StallAtTheDot)
        self.factory.connections = self.factory.dots = self.factory.lost = 0
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self, level: LogLevel = LogLevel.info) -> list[str]:
        order = list(LogLevel.iterconstants())
        return [formatEvent(e) for e in self.events
                if order.index(e.get("log_level", LogLevel.info)) >= order.index(level)]

    @defer.inlineCallbacks
    def test_stop_aborts_the_session_frees_the_slot_and_keeps_the_mail(self):
        queue_dir = f"{self.folder}/q"
        qid = enqueue(queue_dir, "me@origin.test", ["you@dest.test"],
                      b"Subject: held\r\n\r\nbody\r\n")
        config = Config(queue=queue_dir, relay=f"127.0.0.1:{self.port.getHost().port}",
                        tls="none", resolvers=("127.0.0.1:53",), shutdown_timeout=0.5,
                        max_connections=1, max_per_destination=1)
        service = DeliveryService(config, reactor)
        service.startService()
        # the positive signal: the server has the whole message, the client
        # waits for the reply to the final dot
        yield defer.ensureDeferred(wait_for_reactor(
            reactor, lambda: self.factory.dots == 1, 20, what="the message data at the server"))
        pool = service.connector.pool
        self.assertEqual(pool.open_connections, 1)
        yield service.stopService()
        yield defer.ensureDeferred(wait_for_reactor(
            reactor, lambda: self.factory.lost == 1, 10,
            what="the server to see the connection dropped"))
        self.assertEqual(pool.open_connections, 0)  # the slot is free
        infos = self.texts()
        [warning] = [t for t in infos if "still in flight" in t]
        self.assertIn("1 messages still in flight after 0.5s; their connections are aborted",
                      warning)
        [aborted] = [t for t in infos if "delivery cancelled" in t]
        self.assertIn("connection to 127.0.0.1", aborted)
        self.assertEqual([t for t in infos if "internal error" in t or "Unhandled" in t], [])
        self.assertEqual([t for t in self.texts() if " status=" in t], [])  # no outcome
        # still queued, unchanged: the next start tries it again
        store = Queue(queue_dir)
        [listed] = store.list_entries()
        self.assertEqual(listed.entry.qid, qid)
        self.assertEqual([r.attempts for r in listed.entry.recipients], [0])
        self.assertEqual(self.factory.connections, 1)
