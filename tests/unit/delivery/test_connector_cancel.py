"""Cancelling a delivery: the session is aborted, its connection slot is
free for the next delivery at once, the peer sees the connection closed,
one line is logged and nothing is logged as an error.

Cancelling the Deferred of C{twisted_mailout.sendmail()} cancels the
C{Connector.deliver()} Deferreds behind it, so these are its guarantees too.
The peer is a small scripted SMTP server on loopback, in this process.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest
from zope.interface import implementer

from twisted_mailout.delivery.connector import Connector, ConnectorSettings
from twisted_mailout.routing.router import IRouter, NextHop

MSG = b"Subject: cancel\r\n\r\nbody\r\n"


class Peer(LineReceiver):
    """An SMTP server that can stall at one point of the dialogue."""

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.number = len(self.factory.connections)
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.in_data = False
        if self._stall("greeting"):
            return
        self.sendLine(b"220 peer.test ESMTP")

    def _stall(self, point: str) -> bool:
        if self.factory.stall.get(self.number) != point:
            return False
        self.factory.stalled.callback(self)
        return True

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                if not self._stall("dot"):
                    self.factory.messages.append(self.number)
                    self.sendLine(b"250 2.0.0 queued")
            return
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            if not self._stall("ehlo"):
                self.sendLine(b"250 peer.test")
        elif verb == b"DATA":
            self.in_data = True
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        elif verb == b"MAIL":
            self.rcpts = 0
            self.sendLine(b"250 ok")
        elif verb == b"RCPT":
            self.rcpts += 1
            limit = self.factory.rcpt_limit
            if limit is not None and self.rcpts > limit:
                self.sendLine(b"452 4.5.3 too many recipients")
            else:
                self.factory.recipients.append((self.number, line[8:].decode()))
                self.sendLine(b"250 ok")
        else:  # RSET
            self.sendLine(b"250 ok")

    def answer_dot(self) -> None:
        """End a stall at the final dot: accept the message."""
        self.factory.messages.append(self.number)
        self.sendLine(b"250 2.0.0 queued")

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class PeerFactory(protocol.ServerFactory):
    protocol = Peer
    noisy = False

    def __init__(self, stall: dict[int, str]):
        #: {connection number (from 1): "greeting", "ehlo" or "dot"}
        self.stall = stall
        self.stalled: defer.Deferred[Peer] = defer.Deferred()
        self.connections: list[Peer] = []
        self.messages: list[int] = []  # connection numbers that delivered
        #: RCPT replies past this many in one transaction are 452 (None: no limit)
        self.rcpt_limit: int | None = None
        self.recipients: list[tuple[int, str]] = []  # (connection number, "<rcpt>")


@implementer(IRouter)
class LoopbackRouter:
    """Every destination goes to one loopback port."""

    relay = False
    implicit_tls = False
    name = None

    def __init__(self, port: int):
        self.port = port

    def route(self, domain: str) -> defer.Deferred[list[NextHop]]:
        return defer.succeed([NextHop("peer.test", self.port, 10)])

    def addresses(self, hop: NextHop) -> defer.Deferred[list[str]]:
        return defer.succeed(["127.0.0.1"])


class PeerTestCase(unittest.TestCase):
    """Log capture, clean-up and a connector to a scripted peer."""

    timeout = 20

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, stall: dict[int, str]) -> tuple[PeerFactory, Connector]:
        factory = PeerFactory(stall)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        settings = ConnectorSettings(helo="client.test", tls="none", max_connections=1,
                                     max_per_destination=1, idle_timeout=60)
        connector = Connector(reactor, LoopbackRouter(port.getHost().port), settings)
        self.addCleanup(self.close_all, connector, factory)
        return factory, connector

    @defer.inlineCallbacks
    def close_all(self, connector: Connector, factory: PeerFactory) -> Any:
        yield connector.close()
        for peer in factory.connections:
            peer.transport.abortConnection()
            yield peer.closed

    def deliver(self, connector: Connector, rcpt: str = "u@a.test") -> defer.Deferred[Any]:
        return connector.deliver("a.test", "s@origin.test", [rcpt],
                                 lambda: io.BytesIO(MSG), len(MSG))

    def check_logs(self, expected_line: str) -> None:
        """Exactly one line (info or above, from any layer) tells of the
        cancellation, and it is C{expected_line}; none is an error."""
        told = [e.get("log_format", "") for e in self.events
                if "cancel" in e.get("log_format", "").lower()
                and e.get("log_level", LogLevel.info) >= LogLevel.info]
        self.assertEqual(len(told), 1, told)
        self.assertIn(expected_line, told[0])
        self.assertEqual([e for e in self.events
                          if e.get("log_level") in (LogLevel.error, LogLevel.critical)
                          or "log_failure" in e], [])



class CancelTests(PeerTestCase):
    """Cancelling C{Connector.deliver()}."""

    @defer.inlineCallbacks
    def test_cancelling_a_transaction_aborts_it_and_frees_the_slot(self) -> Any:
        factory, connector = self.start({1: "dot"})
        first = self.deliver(connector)
        peer = yield factory.stalled  # the whole message is sent; no reply yet
        first.cancel()
        yield self.assertFailure(first, defer.CancelledError)
        self.assertEqual(connector.pool.open_connections, 0)  # free at once
        yield peer.closed  # the peer sees the connection dropped
        attempt = yield self.deliver(connector, "v@a.test")
        self.assertEqual(attempt.replies["v@a.test"].code, 250)
        self.assertEqual(factory.messages, [2])  # only the second delivery went through
        self.check_logs("delivery cancelled; connection to")

    @defer.inlineCallbacks
    def test_cancelling_a_delivery_waiting_for_the_slot_removes_it(self) -> Any:
        factory, connector = self.start({1: "dot"})
        first = self.deliver(connector)
        peer = yield factory.stalled
        second = self.deliver(connector, "v@a.test")
        self.assertEqual(connector.pool.waiting_for("a.test"), 1)
        second.cancel()
        yield self.assertFailure(second, defer.CancelledError)
        self.assertEqual(connector.pool.waiting_for("a.test"), 0)
        peer.answer_dot()
        attempt = yield first
        self.assertEqual(attempt.replies["u@a.test"].code, 250)
        # The slot went idle instead of to the withdrawn caller, and no
        # connection was opened for it.
        self.assertEqual(connector.pool.idle_to("a.test"), 1)
        self.assertEqual(len(factory.connections), 1)
        self.check_logs("delivery cancelled before a connection was ready")

    @defer.inlineCallbacks
    def test_cancelling_while_the_session_starts_aborts_it(self) -> Any:
        factory, connector = self.start({1: "ehlo"})
        first = self.deliver(connector)
        peer = yield factory.stalled  # greeted; the EHLO reply never comes
        first.cancel()
        yield self.assertFailure(first, defer.CancelledError)
        yield peer.closed
        self.assertEqual(connector.pool.open_connections, 0)
        attempt = yield self.deliver(connector, "v@a.test")
        self.assertEqual(attempt.replies["v@a.test"].code, 250)
        self.assertEqual(factory.messages, [2])
        self.check_logs("delivery cancelled before a connection was ready")

    @defer.inlineCallbacks
    def test_cancelling_before_the_greeting_closes_the_connection(self) -> Any:
        factory, connector = self.start({1: "greeting"})
        first = self.deliver(connector)
        peer = yield factory.stalled  # accepted; no greeting sent
        first.cancel()
        yield self.assertFailure(first, defer.CancelledError)
        yield peer.closed
        self.assertEqual(connector.pool.open_connections, 0)
        attempt = yield self.deliver(connector, "v@a.test")
        self.assertEqual(attempt.replies["v@a.test"].code, 250)
        self.check_logs("delivery cancelled before a connection was ready")


class SendCancelTests(PeerTestCase):
    """The same guarantees through the public API: cancelling the Deferred of
    C{SMTPClient.send()} (what C{twisted_mailout.sendmail()} returns)."""

    def client_for(self, factory: PeerFactory) -> Any:
        from twisted_mailout.api import SMTPClient

        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = SMTPClient(reactor, relay=f"127.0.0.1:{port.getHost().port}", tls="none",
                            connections=1, idle_timeout=60, helo="client.test")
        self.addCleanup(self.close_all, client.connector, factory)
        return client

    @defer.inlineCallbacks
    def test_cancelling_send_aborts_the_transaction_and_frees_the_slot(self) -> Any:
        factory = PeerFactory({1: "dot"})
        client = self.client_for(factory)
        first = client.send("s@origin.test", ["u@a.test", "w@b.test"], MSG)
        peer = yield factory.stalled
        first.cancel()
        yield self.assertFailure(first, defer.CancelledError)
        yield peer.closed
        report = yield client.send("s@origin.test", "v@a.test", MSG)
        self.assertEqual([r.code for r in report], [250])
        self.assertEqual(factory.messages, [2])
        self.check_logs("delivery cancelled; connection to")
