"""The errors of the SMTP layer.

Two kinds, as in h11:

  - L{RemoteProtocolError}: the server broke the protocol (a malformed or
    overlong reply, a reply code that does not belong where it came, a reply
    out of step with our commands). The pure state machine
    (L{twisted_mailout.smtp.state}) raises it; the session cannot go on, and
    the driver ends it and defers the recipients with a local 421.
  - L{LocalProtocolError}: our own code asked for something the protocol
    does not allow here (RCPT before MAIL, the final dot without a 354, a
    command holding CR or LF). A bug on our side; it is a C{ValueError}.

L{SessionError} is what the Twisted driver and the delivery layer raise when
a session cannot go on or never started; its L{Stage} says where.
"""

from __future__ import annotations

import enum
from typing import Any

from twisted_mailout.envelope import Reply
from twisted_mailout.errors import MailoutError, ProtocolError

__all__ = ["LocalProtocolError", "RemoteProtocolError", "SessionError", "Stage"]


class RemoteProtocolError(MailoutError):
    """The server broke the SMTP protocol; nothing it says can be trusted
    any more, so the session must end.

    @ivar why: what went wrong, for logs and the local reply text (never
        holds anything we sent).
    @ivar events: the events parsed from the same received bytes before the
        fault (filled in by
        L{ClientConnection.next_events<twisted_mailout.smtp.state.ClientConnection.next_events>}):
        they still count (a recipient refused before the fault stays refused).
    """

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why
        self.events: list[Any] = []


class MalformedReply(RemoteProtocolError):
    """Bytes that are not an SMTP reply (RFC 5321 4.2): a bad line, a line or
    reply over the size limits, a code that changes inside a multi-line reply."""


class OutOfStep(RemoteProtocolError):
    """A reply that began before the command it would answer was sent: an
    extra reply put the dialogue out of step."""


class UnexpectedReply(RemoteProtocolError):
    """A reply code that no server may give to the command (a 3xx to RCPT,
    a 2xx where 354 belongs, a 354 with no recipient accepted).

    @ivar reply: the reply.
    @ivar verb: the command it answered (a C{Verb}).
    """

    def __init__(self, why: str, reply: Reply, verb: object):
        super().__init__(why)
        self.reply = reply
        self.verb = verb


class LocalProtocolError(MailoutError, ValueError):
    """Our side asked for something the protocol does not allow now (a
    command in the wrong state, CR/LF/NUL inside a command line)."""


class Stage(enum.StrEnum):
    """Where a session failed (L{SessionError.stage}).

    A C{StrEnum}, so the values read well in logs; compare members, not
    strings.
    """

    CONNECT = "connect"  #: TCP connect (or implicit TLS set-up) failed
    GREETING = "greeting"  #: the 220 greeting (RFC 5321 4.3.1)
    EHLO = "EHLO"  #: EHLO and the HELO fall-back
    #: STARTTLS not offered where TLS is required, refused, or not answered
    #: (timeout or connection lost before its reply)
    STARTTLS = "starttls"
    TLS = "tls"  #: the TLS handshake or the certificate check
    AUTH = "AUTH"  #: SMTP AUTH (RFC 4954)
    RSET = "RSET"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DATA_BLOCK = "DATA block"  #: writing the message data
    END_OF_DATA = "end of DATA"  #: the reply to the final dot
    QUIT = "QUIT"
    PROTOCOL = "reply"  #: the server broke the protocol (RemoteProtocolError)
    REMEMBERED = "remembered"  #: the destination failed recently; not tried again yet
    SHUTDOWN = "shutdown"  #: the client is closing
    DANE = "dane"  #: a DANE (RFC 7672) requirement cannot be met
    MTA_STS = "mta-sts"  #: an MTA-STS (RFC 8461) requirement cannot be met


class SessionError(ProtocolError):
    """The session cannot go on (or never started).

    @ivar reply: what decides the outcome: a server reply (4xx or 5xx), or a
        local one (code 4xx for network trouble, timeouts, TLS failures,
        protocol errors).
    @ivar stage: the L{Stage} where it failed.
    @ivar tls_failure: for L{Stage.TLS}: the RFC 8460 result type when known.
    """

    tls_failure: str | None = None

    def __init__(self, reply: Reply, stage: Stage):
        super().__init__(f"{stage}: {reply.one_line()}")
        self.reply = reply
        self.stage = Stage(stage)
