"""An in-memory SMTP double for applications' unit tests (treq's C{StubTreq} style).

L{StubSMTP} runs the real client code, L{SMTPClient<twisted_mailout.api.SMTPClient>},
its L{Connector<twisted_mailout.delivery.connector.Connector>} and the ESMTP
session, against a scripted ESMTP server (the server side of
C{twisted.mail.smtp}, as in L{twisted_mailout.testing.loopback}), with no
socket, no DNS and no real time: the two ends are joined by
C{twisted.test.iosim} on a C{MemoryReactorClock}. What the client sends is the
very byte stream a real server would get (pipelining, dot-stuffing, RSET,
QUIT), and what it reports is what it would report against one::

    from twisted_mailout.testing.memory import StubSMTP

    def test_signup_mail():
        stub = StubSMTP(rcpt_replies={"gone@example.org": (550, "5.1.1 no such user")})
        d = stub.send("shop@example.com", ["zoe@example.org", "gone@example.org"],
                      b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
        report = stub.result(d)
        assert report["gone@example.org"].status == "bounced"
        [message] = stub.messages
        assert message["rcpt_tos"] == ["zoe@example.org"]

L{StubSMTP.send} pumps the bytes until nothing moves, so its Deferred has
fired when it returns. Code that starts a delivery by itself (a L{Mailer}
with L{StubSMTP.delivery}, an application's own Twisted code holding
L{StubSMTP.client}) is driven with L{StubSMTP.flush}. Time stands still
unless the test moves it with C{stub.reactor.advance(seconds)} (the
session's RFC 5321 timeouts then fire as they would).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from twisted_mailout.api import SMTPClient
from twisted_mailout.apps.deliveries import SMTPDelivery
from twisted_mailout.outcome import DeliveryReport
from twisted_mailout.testing.loopback import SMTPReceiver, ZoneResolver, _ReceiverFactory

__all__ = ["StubSMTP"]

#: The relay a L{StubSMTP} client sends to by default (an RFC 5737 address:
#: no name to look up; nothing ever connects to it).
STUB_RELAY = "192.0.2.25"


class _StubReactor(MemoryReactorClock):
    """A C{MemoryReactorClock} whose outgoing TCP connections are joined at
    once, in memory, to a new protocol of the stub's server."""

    def __init__(self, stub: StubSMTP) -> None:
        super().__init__()
        self._stub = stub

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> Any:
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)
        self._stub._connect(host, port, factory)
        return connector


class StubSMTP:
    """A scripted SMTP server in memory and a real L{SMTPClient} talking to it.

    @param rcpt_replies: replies to RCPT TO: C{{address: (code, text)}}, or a
        callable C{address -> (code, text) | None}; a 4xx or 5xx refuses that
        recipient (RFC 5321 4.2), every other recipient is accepted with 250.
        Every message is accepted at the end of DATA.
    @param name: the server's name (greeting and EHLO reply).
    @param zone: L{None} to send everything to one relay (C{relay}); or a
        zone description (see L{twisted_mailout.testing.loopback.Zone}) to
        route each recipient domain by its MX records as the daemon does:
        the addresses in it are where the client "connects"; every
        connection reaches the same scripted server.
    @param relay: the relay when C{zone} is L{None} (an address literal, or a
        name the zone gives addresses to).
    @param client_settings: more keyword arguments for L{SMTPClient}
        (C{helo}, C{auth}, C{auth_plaintext}, C{connections}, C{timeout} ...).
        The server offers no STARTTLS, so C{tls} levels above C{may} defer
        every recipient, as a real server without STARTTLS would make them.
    @ivar reactor: the C{MemoryReactorClock} both ends run on.
    @ivar client: the L{SMTPClient} (hand it to the code under test).
    @ivar receiver: the L{SMTPReceiver} recording what the server took.
    @ivar connections: C{[(host, port)]} the client connected to, in order.
    @ivar silent: while C{True}, no byte moves either way (a server that
        stalls): the client waits until its timeouts fire (advance
        C{reactor}). C{False} at first.
    """

    def __init__(self, rcpt_replies: Mapping[str, tuple[int, str]]
                 | Callable[[str], tuple[int, str] | None] | None = None, *,
                 name: str = "stub.smtp.test", zone: Mapping[str, Any] | None = None,
                 relay: str = STUB_RELAY, **client_settings: Any) -> None:
        self.reactor = _StubReactor(self)
        if rcpt_replies is None or callable(rcpt_replies):
            policy = rcpt_replies
        else:
            replies = {k.lower(): v for k, v in rcpt_replies.items()}

            def policy(address: str) -> tuple[int, str] | None:
                return replies.get(address.lower())

        self.receiver = SMTPReceiver(name=name, policy=policy)
        # the server's idle timeout runs on our clock
        self._server_factory = _ReceiverFactory(self.receiver, clock=self.reactor)
        self.connections: list[tuple[str, int]] = []
        self._pumps: list[iosim.IOPump] = []
        self.silent = False
        resolver = ZoneResolver(zone if zone is not None else {"records": {}})
        client_settings.setdefault("helo", "client.stub.test")
        self.client = SMTPClient(self.reactor, relay=None if zone is not None else relay,
                                 resolver=resolver, **client_settings)

    # -- what the server saw -------------------------------------------------

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The messages the server accepted, in order: C{{"mail_from": str,
        "rcpt_tos": [str], "data": bytes}} (C{data} unstuffed, CRLF line
        ends; C{mail_from} C{""} for the null sender)."""
        return self.receiver.messages

    @property
    def refused(self) -> list[dict[str, Any]]:
        """The RCPTs the script refused: C{{"rcpt", "code", "text"}}."""
        return self.receiver.refused

    # -- driving -------------------------------------------------------------

    def send(self, sender: str | None, recipients: str | Iterable[str],
             message: bytes | str | Any) -> defer.Deferred[DeliveryReport]:
        """L{SMTPClient.send}, then L{flush}: the Deferred has fired on return.

        @return: the Deferred of L{SMTPClient.send}.
        """
        d = self.client.send(sender, recipients, message)
        self.flush()
        return d

    #: L{send} under C{twisted.mail.smtp}'s name.
    sendmail = send

    def flush(self) -> None:
        """Move bytes both ways and run what is due now until nothing moves.
        Time does not pass (use C{reactor.advance} for that)."""
        for _ in range(10000):
            self.reactor.advance(0)
            moved = False
            for pump in [] if self.silent else list(self._pumps):
                moved = pump.flush() or moved
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.remove(pump)
            now = self.reactor.seconds()
            due = [c for c in self.reactor.getDelayedCalls()
                   if cast(Any, c).getTime() <= now]
            if not moved and not due:
                return
        raise AssertionError("StubSMTP.flush: the client and server never went quiet")

    def result(self, d: defer.Deferred[Any]) -> Any:
        """L{flush}, then the result C{d} has fired with (its exception raised).

        @raise AssertionError: C{d} has not fired (the client waits for
            something that needs time to pass).
        """
        self.flush()
        out: list[Any] = []
        d.addBoth(out.append)
        if not out:
            raise AssertionError(f"{d!r} has not fired: the client is still waiting "
                                 "(advance stub.reactor to let timeouts pass)")
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def delivery(self) -> SMTPDelivery:
        """An C{smtp://} delivery over this stub's client, for a
        L{Mailer<twisted_mailout.apps.mailer.Mailer>} under test
        (C{Mailer(stub.delivery())}); drive it with L{flush}."""
        return SMTPDelivery(client=self.client)

    def close(self) -> None:
        """Close the client's idle connections (QUIT), flushed."""
        self.client.close()
        self.flush()

    # -- the in-memory wire ----------------------------------------------------

    def _connect(self, host: str, port: int, factory: Any) -> None:
        self.connections.append((host, port))
        address = IPv6Address if ":" in host else IPv4Address
        server_address = address("TCP", host, port)
        client_address = address("TCP", "::1" if ":" in host else "127.0.0.1", 40000 + len(
            self.connections))
        server = self._server_factory.buildProtocol(client_address)
        client = factory.buildProtocol(server_address)
        server_transport = iosim.FakeTransport(server, isServer=True,
                                               hostAddress=server_address,
                                               peerAddress=client_address)
        client_transport = iosim.FakeTransport(client, isServer=False,
                                               hostAddress=client_address,
                                               peerAddress=server_address)
        self._pumps.append(iosim.connect(server, server_transport, client, client_transport,
                                         greet=False, clock=self.reactor))
