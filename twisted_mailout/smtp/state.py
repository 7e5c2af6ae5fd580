"""The ESMTP client dialogue as a pure state machine (RFC 5321, 2920, 3030, 3207, 4954).

Sans-IO in the style of h11: bytes in (L{ClientConnection.receive_data}),
events out (L{ClientConnection.next_event}, L{ClientConnection.next_events});
commands in (L{ClientConnection.send}), bytes out. No transport, no timers,
no Deferreds, no reactor: the Twisted driver
(L{twisted_mailout.smtp.protocol.ESMTPSession}) writes the bytes, arms one
timer from L{ClientConnection.awaiting}, starts TLS and streams the body.

Rule 1 (h11's): everything that decides what the client may send next, and
what a reply means, lives here:

  - L{EXPECTED}: the one table of the reply codes each command expects. Any
    4xx or 5xx is a refusal, which the caller acts on (a recipient deferred or
    bounced, a session that cannot start). Every other code not in the table
    for that command (a 1xx anywhere, a 3xx to RCPT or to the final dot, a 2xx
    where 354 belongs) is a L{RemoteProtocolError}: the dialogue is out of
    step, nothing the server says can be trusted any more, and the session
    ends; it is never taken as a recipient's outcome.
  - L{ALLOWED}: the commands each L{State} allows.
  - The transaction bookkeeping: which recipients were accepted, the reply
    that decides each one, whether the next transaction needs RSET.

A recipient is reported delivered (a 2xx in L{TransactionDone.replies}) only
after a 2xx to its RCPT and a 2xx to the final dot; the final dot is emitted
only after a 354 to DATA with at least one recipient accepted.

With CHUNKING (RFC 3030, L{Transaction.chunking}) the message goes in BDAT
chunks instead of DATA: no 354 and no dot-stuffing, each chunk announced
with its exact length (line ends made CRLF first, L{LineEnds}). Pipelined,
the chunks follow MAIL and RCPT without waiting for their replies (the
server reads and discards a chunk whatever it thinks of the transaction, so
the dialogue stays in step; the driver still sends each chunk only once
the replies owed are in, but for a small message sent whole with MAIL and
RCPT, and L{SendBody} tells it when); unpipelined, each chunk waits for the
250 to the one before, and the first for an accepted RCPT. A recipient is then
reported delivered only after a 2xx to its RCPT, a 250 to every chunk and a
2xx to C{BDAT LAST}. No chunk is sent after a refused one, after a refused
MAIL or once every RCPT was refused (RFC 3030 2); the transaction then
ends once the replies owed for the chunks already sent are in, and RSET
goes before the next one.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.dotstuff import DotStuffer, LineEnds
from twisted_mailout.smtp.errors import (
    LocalProtocolError,
    OutOfStep,
    RemoteProtocolError,
    UnexpectedReply,
)
from twisted_mailout.smtp.extensions import parse_ehlo
from twisted_mailout.smtp.replies import ReplyParser
from twisted_mailout.smtp.sasl import CANCEL

__all__ = [
    "ALLOWED",
    "EXPECTED",
    "NEED_DATA",
    "TIMEOUT_KEYS",
    "Auth",
    "AuthResponse",
    "ClientConnection",
    "Command",
    "Data",
    "Ehlo",
    "Event",
    "Helo",
    "Quit",
    "Rcpt",
    "ReplyEvent",
    "Rset",
    "SendBody",
    "StartTLS",
    "State",
    "Transaction",
    "TransactionDone",
    "Verb",
]


class Verb(enum.Enum):
    """What a reply answers: the greeting, or one of our commands."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"  # AUTH and each answer to a 334 challenge
    AUTH_CANCEL = "AUTH cancel"  # the "*" that cancels an exchange (RFC 4954 4)
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    END_OF_DATA = "end of DATA"
    BDAT = "BDAT"  # a chunk other than the last (RFC 3030)
    BDAT_LAST = "BDAT LAST"  # the last chunk: the end of the data
    RSET = "RSET"
    QUIT = "QUIT"

    # Members are singletons: hash them as objects (C speed; Enum's own
    # __hash__ is Python code, and the tables below are read per reply).
    __hash__ = object.__hash__


class State(enum.Enum):
    """The client's state."""

    GREETING = "greeting"  #: connected, waiting for the 220
    REJECTED = "rejected"  #: the greeting was a refusal: only QUIT
    GREETED = "greeted"  #: EHLO (or HELO) to send, or again after a refusal
    EHLO_SENT = "EHLO sent"
    TLS_PENDING = "TLS pending"  #: 220 to STARTTLS: the handshake, then EHLO
    READY = "ready"  #: between transactions: STARTTLS, AUTH, a transaction, RSET, QUIT
    AUTH_SENT = "AUTH sent"
    AUTH_CHALLENGED = "AUTH challenged"  #: a 334 came: an answer (or "*") to send
    IN_TRANSACTION = "in transaction"  #: MAIL sent; RCPT/DATA replies owed or to send
    #: 354 came: message data, then the final dot; or (CHUNKING) BDAT
    #: chunks may be sent (L{ClientConnection.body_wanted} says when)
    BODY = "body"
    DOT_SENT = "dot sent"  #: the final dot (or BDAT LAST) sent; its reply owed
    #: CHUNKING: no more chunks will be sent (one was refused, or MAIL, or
    #: every RCPT); the replies to those sent are owed
    BDAT_STOPPED = "BDAT stopped"
    RSET_SENT = "RSET sent"
    QUIT_SENT = "QUIT sent"
    CLOSED = "closed"  #: the connection is gone
    ERROR = "error"  #: the server broke the protocol; nothing more

    __hash__ = object.__hash__


_2XX = frozenset(range(200, 300))
_NONE: frozenset[int] = frozenset()

#: The one table of expected replies: C{verb: (success codes, intermediate
#: codes)}. An intermediate code continues the command (334: a SASL
#: challenge; 354: send the data). Every 4xx and 5xx is a refusal; any other
#: code is a protocol error. RFC 5321 4.3.2 lists the codes per command; a
#: RCPT or the final dot may be answered with any 2xx (251 "will forward").
EXPECTED: dict[Verb, tuple[frozenset[int], frozenset[int]]] = {
    Verb.GREETING: (frozenset({220}), _NONE),
    Verb.EHLO: (frozenset({250}), _NONE),
    Verb.HELO: (frozenset({250}), _NONE),
    Verb.STARTTLS: (frozenset({220}), _NONE),
    Verb.AUTH: (frozenset({235}), frozenset({334})),
    Verb.AUTH_CANCEL: (_NONE, _NONE),  # only a refusal (501) can answer "*"
    Verb.MAIL: (frozenset({250}), _NONE),
    Verb.RCPT: (_2XX, _NONE),
    Verb.DATA: (_NONE, frozenset({354})),
    Verb.END_OF_DATA: (_2XX, _NONE),
    Verb.BDAT: (frozenset({250}), _NONE),  # RFC 3030 2: 250 to each chunk
    Verb.BDAT_LAST: (_2XX, _NONE),
    Verb.RSET: (frozenset({250}), _NONE),
    Verb.QUIT: (_2XX, _NONE),
}

#: The L{Timeouts<twisted_mailout.smtp.timeouts.Timeouts>} field that bounds
#: the wait for each reply (RFC 5321 4.5.3.2).
TIMEOUT_KEYS: dict[Verb, str] = {
    Verb.GREETING: "greeting",
    Verb.EHLO: "helo",
    Verb.HELO: "helo",
    Verb.STARTTLS: "helo",
    Verb.AUTH: "helo",
    Verb.AUTH_CANCEL: "helo",
    Verb.MAIL: "mail",
    Verb.RCPT: "rcpt",
    Verb.DATA: "data",
    Verb.END_OF_DATA: "data_done",
    Verb.BDAT: "data_block",  # a chunk taken: as a data block (RFC 5321 4.5.3.2.5)
    Verb.BDAT_LAST: "data_done",  # as the final dot (4.5.3.2.6)
    Verb.RSET: "helo",
    Verb.QUIT: "quit",
}


# -- commands ---------------------------------------------------------------


class Command:
    """A command for L{ClientConnection.send}."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Ehlo(Command):
    """C{EHLO name} (RFC 5321 4.1.1.1)."""

    name: str


@dataclass(frozen=True, slots=True)
class Helo(Command):
    """C{HELO name}, for a server that refuses EHLO."""

    name: str


@dataclass(frozen=True, slots=True)
class StartTLS(Command):
    """C{STARTTLS} (RFC 3207)."""


@dataclass(frozen=True, slots=True)
class Auth(Command):
    """The AUTH command line (RFC 4954 4), from
    L{Mechanism.initial<twisted_mailout.smtp.sasl.Mechanism.initial>}.
    Never shown by C{repr}: it may hold a secret."""

    line: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthResponse(Command):
    """The answer to a 334 challenge, or L{CANCEL<twisted_mailout.smtp.sasl.CANCEL>}.
    Never shown by C{repr}."""

    line: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Transaction(Command):
    """A mail transaction: C{MAIL FROM}, then a C{RCPT TO} per recipient,
    then C{DATA}.

    @ivar sender: the MAIL FROM address, C{""} for the null sender.
    @ivar recipients: the RCPT TO addresses, at least one.
    @ivar parameters: MAIL parameters, each with a leading space
        (L{mail_parameters<twisted_mailout.smtp.extensions.mail_parameters>}).
    @ivar pipelined: send MAIL, every RCPT and DATA in one write (RFC 2920;
        only when the server offers PIPELINING); else MAIL alone, and
        L{ClientConnection.next_command} gives each next command.
    @ivar chunking: send the message in BDAT chunks instead of DATA (RFC
        3030; only when the server offers CHUNKING): no DATA command; with
        C{pipelined}, the state is L{State.BODY} at once (the chunks may
        follow MAIL and RCPT in the same write), else a L{SendBody} comes
        after the RCPT replies when one was accepted.
    """

    sender: str
    recipients: tuple[str, ...]
    parameters: str = ""
    pipelined: bool = False
    chunking: bool = False


@dataclass(frozen=True, slots=True)
class Rcpt(Command):
    """C{RCPT TO} for the next recipient of an unpipelined transaction."""

    recipient: str


@dataclass(frozen=True, slots=True)
class Data(Command):
    """C{DATA}, in an unpipelined transaction with a recipient accepted."""


@dataclass(frozen=True, slots=True)
class Rset(Command):
    """C{RSET}."""


@dataclass(frozen=True, slots=True)
class Quit(Command):
    """C{QUIT}."""


# -- events -----------------------------------------------------------------


class Event:
    """What L{ClientConnection.next_event} returns."""

    __slots__ = ()


class _NeedData(Event):
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: More bytes are needed before the next event.
NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class ReplyEvent(Event):
    """A reply, checked against L{EXPECTED}.

    @ivar verb: what it answers; L{None} for an unsolicited reply (nothing
        was owed: logged and otherwise ignored; a 421 still marks the
        session as closing).
    @ivar reply: the reply.
    @ivar ok: a success or intermediate code for C{verb} (not a refusal).
    @ivar recipient: for L{Verb.RCPT}, the recipient it answers.
    """

    verb: Verb | None
    reply: Reply
    ok: bool
    recipient: str | None = None


@dataclass(frozen=True, slots=True)
class SendBody(Event):
    """DATA was answered 354 with at least one recipient accepted: stream
    the message with L{ClientConnection.send_body}, then
    L{ClientConnection.end_data}. In a CHUNKING transaction: the RCPT
    replies are in with one accepted, or a chunk was answered 250, and (when
    unpipelined, or pipelined and nothing is owed any more) the next chunk
    may go (L{ClientConnection.send_chunk}); a pipelined driver that waits
    for every reply before BDAT LAST goes on from here."""


@dataclass(frozen=True, slots=True)
class TransactionDone(Event):
    """A transaction is over.

    @ivar replies: C{{recipient: Reply}} for every recipient: the refusal of
        MAIL, of its RCPT or of DATA, else the reply to the final dot.
    @ivar usable: the connection can carry another transaction (no 421 was
        seen).
    """

    replies: dict[str, Reply]
    usable: bool


# -- the state machine -----------------------------------------------------

#: The commands each state allows (L{Quit} is also allowed in every state
#: with no reply owed except L{State.BODY}, L{State.CLOSED}, L{State.ERROR}).
ALLOWED: dict[State, frozenset[type[Command]]] = {
    State.GREETING: frozenset(),
    State.REJECTED: frozenset(),
    State.GREETED: frozenset({Ehlo, Helo}),
    State.EHLO_SENT: frozenset(),
    State.TLS_PENDING: frozenset({Ehlo}),
    State.READY: frozenset({StartTLS, Auth, Transaction, Rset}),
    State.AUTH_SENT: frozenset(),
    State.AUTH_CHALLENGED: frozenset({AuthResponse}),
    State.IN_TRANSACTION: frozenset({Rcpt, Data}),
    State.BODY: frozenset(),
    State.DOT_SENT: frozenset(),
    State.BDAT_STOPPED: frozenset(),
    State.RSET_SENT: frozenset(),
    State.QUIT_SENT: frozenset(),
    State.CLOSED: frozenset(),
    State.ERROR: frozenset(),
}

_NO_QUIT = frozenset({State.BODY, State.CLOSED, State.ERROR})


class _Transaction:
    """The bookkeeping of the open transaction."""

    __slots__ = ("accepted", "chunk_refused", "chunking", "mail_refused", "next_rcpt",
                 "pipelined", "rcpt_replies", "recipients", "replies")

    def __init__(self, command: Transaction):
        self.recipients = command.recipients
        self.pipelined = command.pipelined
        self.chunking = command.chunking
        self.chunk_refused = False  # a BDAT chunk was refused (RFC 3030 2)
        self.replies: dict[str, Reply] = {}  # final replies, recorded as soon as known
        self.accepted: list[str] = []
        self.mail_refused = False
        self.next_rcpt = 0  # index of the recipient whose RCPT is sent next
        self.rcpt_replies = 0  # RCPT replies received


class ClientConnection:
    """The client side of one SMTP connection.

    Use: feed every received chunk to L{receive_data}, then take events with
    L{next_events} (or L{next_event}) until it returns nothing, acting on
    each batch (sending what it calls for) before asking for the next: a
    batch ends when no reply is owed, so that an extra reply in the same
    bytes is seen as out of step with the command sent next.

    @ivar state: the L{State}.
    @ivar extensions: the EHLO keywords, C{{KEYWORD: parameters}}
        (L{parse_ehlo<twisted_mailout.smtp.extensions.parse_ehlo>}); emptied
        by STARTTLS and HELO.
    @ivar greeting: the greeting L{Reply}, once received.
    @ivar closing: the server said 421 (it is closing the channel).
    @ivar needs_rset: the last transaction ended early: RSET before the next.
    @ivar discarded: bytes dropped by the STARTTLS buffer guard.
    """

    def __init__(self) -> None:
        self.state = State.GREETING
        self.extensions: dict[str, str] = {}
        self.greeting: Reply | None = None
        self.closing = False
        self.needs_rset = False
        self.discarded = 0
        self._parser = ReplyParser()
        # Owed replies, oldest first: (verb, stream offset when its command was sent).
        self._owed: deque[tuple[Verb, int]] = deque([(Verb.GREETING, 0)])
        self._events: deque[Event] = deque()
        self._tx: _Transaction | None = None
        self._stuffer: DotStuffer | None = None
        self._lineends: LineEnds | None = None

    # -- input --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the server (any chunking); no parsing yet.

        @raise LocalProtocolError: the connection is closed.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("data received after the connection closed")
        self._parser.feed(data)

    def next_event(self) -> Event:
        """The next event: a L{ReplyEvent} (then, when it decides something,
        a L{SendBody} or L{TransactionDone}), or L{NEED_DATA}.

        @raise RemoteProtocolError: the server broke the protocol (malformed
            reply, L{OutOfStep<twisted_mailout.smtp.errors.OutOfStep>},
            L{UnexpectedReply<twisted_mailout.smtp.errors.UnexpectedReply>});
            the state becomes L{State.ERROR} and every later call raises too.
        """
        if self._events:
            return self._events.popleft()
        if self.state is State.ERROR:
            raise RemoteProtocolError("the session already failed")
        if self.state is State.CLOSED:
            return NEED_DATA
        try:
            parsed = self._parser.next_reply()
            if parsed is None:
                return NEED_DATA
            self._on_reply(*parsed)
        except RemoteProtocolError:
            self.state = State.ERROR
            self._owed.clear()
            raise
        return self._events.popleft()

    def next_events(self) -> list[Event]:
        """Every event available now, up to the moment no reply is owed.

        A pipelined group thus comes as one batch (the driver wakes once per
        group); L{NEED_DATA} is never in the list.

        @return: the events, in order; empty when more bytes are needed (or
            nothing can happen before the caller sends something).
        @raise RemoteProtocolError: as L{next_event}; its C{events} holds the
            events parsed before the fault, which still count.
        """
        out: list[Event] = []
        try:
            while True:
                ev = self.next_event()
                if ev is NEED_DATA:
                    return out
                out.append(ev)
                if not self._owed and not self._events:
                    return out
        except RemoteProtocolError as e:
            e.events = out
            raise

    # -- output -------------------------------------------------------------

    def send(self, command: Command) -> bytes:
        """The bytes for C{command}, which must be allowed now (L{ALLOWED}).

        @return: the bytes to write (CRLF line ends).
        @raise LocalProtocolError: the command is not allowed in this state,
            a reply is still owed (except inside a pipelined group), or a line
            holds CR, LF or NUL.
        """
        state = self.state
        kind = type(command)
        if kind is Quit:
            if state in _NO_QUIT or self._owed:
                raise LocalProtocolError(f"QUIT cannot be sent in state {state.value}")
            self.state = State.QUIT_SENT
            return self._line("QUIT", Verb.QUIT)
        if kind not in ALLOWED[state] or self._owed:
            raise LocalProtocolError(f"{kind.__name__} cannot be sent in state {state.value}"
                                     + (" while a reply is owed" if self._owed else ""))
        if isinstance(command, Ehlo):
            self.state = State.EHLO_SENT
            return self._line(f"EHLO {command.name}", Verb.EHLO)
        if isinstance(command, Helo):
            self.state = State.EHLO_SENT
            return self._line(f"HELO {command.name}", Verb.HELO)
        if kind is StartTLS:
            return self._line("STARTTLS", Verb.STARTTLS)
        if isinstance(command, Auth):
            self.state = State.AUTH_SENT
            return self._line(command.line, Verb.AUTH)
        if isinstance(command, AuthResponse):
            self.state = State.AUTH_SENT
            return self._line(command.line,
                              Verb.AUTH_CANCEL if command.line == CANCEL else Verb.AUTH)
        if kind is Rset:
            self.state = State.RSET_SENT
            return self._line("RSET", Verb.RSET)
        if isinstance(command, Transaction):
            return self._begin(command)
        if isinstance(command, Rcpt):
            tx = self._tx
            assert tx is not None
            if tx.pipelined or tx.next_rcpt >= len(tx.recipients) or \
                    command.recipient != tx.recipients[tx.next_rcpt]:
                raise LocalProtocolError("RCPT out of order")
            tx.next_rcpt += 1
            return self._line(f"RCPT TO:<{command.recipient}>", Verb.RCPT)
        # Data
        tx = self._tx
        assert tx is not None
        if tx.chunking:
            raise LocalProtocolError("DATA in a CHUNKING transaction (RFC 3030 2)")
        if tx.pipelined or tx.rcpt_replies < len(tx.recipients) or not tx.accepted:
            raise LocalProtocolError("DATA without an accepted recipient")
        return self._line("DATA", Verb.DATA)

    def next_command(self) -> Command | None:
        """What an unpipelined transaction needs sent now: the next L{Rcpt},
        or L{Data}; L{None} when a reply is owed or nothing is to be sent."""
        tx = self._tx
        if tx is None or tx.pipelined or self._owed or self.state is not State.IN_TRANSACTION:
            return None
        if tx.next_rcpt < len(tx.recipients):
            return Rcpt(tx.recipients[tx.next_rcpt])
        return None if tx.chunking else Data()

    def send_body(self, data: bytes) -> bytes:
        """Message data, dot-stuffed (RFC 5321 4.5.2), after L{SendBody}.

        @param data: the next chunk of the message, any length.
        @return: the bytes to write (maybe empty).
        @raise LocalProtocolError: DATA was not answered 354.
        """
        stuffer = self._stuffer
        if stuffer is None or self.state is not State.BODY:
            raise LocalProtocolError("message data without a 354 reply to DATA")
        return stuffer.feed(data)

    def end_data(self) -> bytes:
        """The end of the message: a CRLF when needed, and the final dot.

        @return: the bytes to write.
        @raise LocalProtocolError: DATA was not answered 354.
        """
        stuffer = self._stuffer
        if stuffer is None or self.state is not State.BODY:
            raise LocalProtocolError("the final dot without a 354 reply to DATA")
        self._stuffer = None
        self.state = State.DOT_SENT
        self._owed.append((Verb.END_OF_DATA, self._parser.received))
        return stuffer.finish()

    def body_wanted(self) -> bool:
        """Whether message data may be sent now: after L{SendBody} in a DATA
        transaction (until L{end_data}); in a CHUNKING one, while chunks may
        go (L{State.BODY}) and, unpipelined, no reply to a chunk is owed."""
        if self.state is not State.BODY:
            return False
        tx = self._tx
        return tx is not None and (not tx.chunking or tx.pipelined or not self._owed)

    def send_chunk(self, data: bytes, last: bool = False) -> bytes:
        """One BDAT chunk of the message (RFC 3030 2), in a CHUNKING
        transaction while L{body_wanted}.

        @param data: the next bytes of the message, any length, any line
            ends (made CRLF here, L{LineEnds}; the length announced is that
            of the converted bytes).
        @param last: this is the end of the message: C{BDAT n LAST}, after
            which the state is L{State.DOT_SENT}.
        @return: C{BDAT n[ LAST]} CRLF and the n octets; C{b""} when C{data}
            converts to nothing and is not the last (a trailing CR is held
            back until the next chunk): no command, no reply owed.
        @raise LocalProtocolError: no CHUNKING transaction is sending (see
            L{body_wanted}).
        """
        tx = self._tx
        conv = self._lineends
        if conv is None or tx is None or not self.body_wanted():
            raise LocalProtocolError("BDAT chunk outside a CHUNKING transaction ready for one")
        out = conv.feed(data)
        if last:
            out += conv.finish()
            self._lineends = None
            self.state = State.DOT_SENT
            self._owed.append((Verb.BDAT_LAST, self._parser.received))
            return b"BDAT %d LAST\r\n%b" % (len(out), out)
        if not out:
            return b""
        self._owed.append((Verb.BDAT, self._parser.received))
        return b"BDAT %d\r\n%b" % (len(out), out)

    def awaiting(self) -> tuple[tuple[Verb, str], ...]:
        """The replies owed, oldest first, each as C{(verb, timeout key)}:
        the driver arms the timeout of the first (a
        L{Timeouts<twisted_mailout.smtp.timeouts.Timeouts>} field name, see
        L{TIMEOUT_KEYS})."""
        return tuple((v, TIMEOUT_KEYS[v]) for v, _ in self._owed)

    def timeout_key(self) -> str | None:
        """The timeout key of the first reply owed (see L{awaiting}), or
        L{None} when none is owed."""
        owed = self._owed
        return TIMEOUT_KEYS[owed[0][0]] if owed else None

    def transaction_replies(self, default: Reply) -> dict[str, Reply]:
        """End the open transaction early (a timeout, a lost connection, a
        protocol error): the replies known so far, every other recipient
        given C{default}.

        @param default: the (local, 4xx) reply for undecided recipients.
        @return: C{{recipient: Reply}}; empty when no transaction is open.
        """
        tx, self._tx = self._tx, None
        self._stuffer = None
        self._lineends = None
        if tx is None:
            return {}
        replies = dict(tx.replies)
        for r in tx.recipients:
            replies.setdefault(r, default)
        return replies

    def connection_closed(self) -> None:
        """The connection is gone: nothing more is owed or can be sent."""
        self.state = State.CLOSED
        self._owed.clear()

    def start_tls_discard(self) -> int:
        """Drop bytes buffered but not parsed (the STARTTLS guard); done
        automatically on the 220 to STARTTLS. @return: bytes dropped."""
        n = self._parser.discard()
        self.discarded += n
        return n

    # -- internals ----------------------------------------------------------

    def _line(self, line: str, verb: Verb) -> bytes:
        if "\r" in line or "\n" in line or "\0" in line:
            raise LocalProtocolError("CR, LF or NUL in an SMTP command")
        self._owed.append((verb, self._parser.received))
        return line.encode("utf-8") + b"\r\n"

    def _begin(self, command: Transaction) -> bytes:
        if self.needs_rset:
            raise LocalProtocolError("RSET first: the last transaction ended early")
        if not command.recipients:
            raise LocalProtocolError("a transaction needs a recipient")
        tx = _Transaction(command)
        lines = [f"MAIL FROM:<{command.sender}>{command.parameters}"]
        if command.pipelined:
            lines.extend(f"RCPT TO:<{r}>" for r in command.recipients)
            if not command.chunking:
                lines.append("DATA")
        for text in (command.sender, command.parameters, *command.recipients):
            if "\r" in text or "\n" in text or "\0" in text:
                raise LocalProtocolError("CR, LF or NUL in an SMTP command")
        received = self._parser.received
        owed = self._owed
        owed.append((Verb.MAIL, received))
        self._tx = tx
        self.state = State.IN_TRANSACTION
        if command.pipelined:
            owed.extend((Verb.RCPT, received) for _ in command.recipients)
            tx.next_rcpt = len(command.recipients)
            if command.chunking:  # the chunks may follow at once (RFC 3030 2)
                self._lineends = LineEnds()
                self.state = State.BODY
            else:
                owed.append((Verb.DATA, received))
        return b"".join(ln.encode("utf-8") + b"\r\n" for ln in lines)

    def _on_reply(self, reply: Reply, start: int) -> None:
        if reply.code == 421:
            self.closing = True  # the server is closing the channel
        if not self._owed:
            self._events.append(ReplyEvent(None, reply, False))
            return
        verb, sent_at = self._owed[0]
        if start < sent_at:
            # It began before we sent the command it would answer: an extra
            # reply put the dialogue out of step; nothing after it is trusted.
            raise OutOfStep(f"reply {reply.one_line()[:80]!r} arrived before the "
                            f"{verb.value} command it would answer")
        self._owed.popleft()
        success, intermediate = EXPECTED[verb]
        code = reply.code
        if code in success or code in intermediate:
            ok = True
        elif 400 <= code < 600:
            ok = False
        else:
            raise UnexpectedReply(f"unexpected reply to {verb.value}: {reply.one_line()[:200]}",
                                  reply, verb)
        tx = self._tx
        if tx is not None and verb in _TX_VERBS:
            self._on_transaction_reply(tx, verb, reply, ok)
            return
        self._events.append(ReplyEvent(verb, reply, ok))
        if verb is Verb.GREETING:
            self.greeting = reply
            self.state = State.GREETED if ok else State.REJECTED
        elif verb is Verb.EHLO:
            if ok:
                self.extensions = parse_ehlo(reply.text)
                self.state = State.READY
            else:
                self.state = State.GREETED
        elif verb is Verb.HELO:
            if ok:
                self.extensions = {}
                self.state = State.READY
            else:
                self.state = State.GREETED
        elif verb is Verb.STARTTLS:
            if ok:
                # Bytes sent after the 220 but before the handshake could
                # only be an injection attempt (CVE-2011-0411): discard.
                self.start_tls_discard()
                self.extensions = {}
                self.state = State.TLS_PENDING
        elif verb is Verb.AUTH:
            self.state = State.AUTH_CHALLENGED if code == 334 else State.READY
        elif verb is Verb.RSET:
            if ok:
                self.needs_rset = False
            self.state = State.READY
        elif verb is Verb.AUTH_CANCEL:
            self.state = State.READY
        # QUIT: the state stays QUIT_SENT; nothing more may be sent.

    def _on_transaction_reply(self, tx: _Transaction, verb: Verb, reply: Reply,
                              ok: bool) -> None:
        events = self._events
        if verb is Verb.MAIL:
            events.append(ReplyEvent(verb, reply, ok))
            if not ok:
                tx.mail_refused = True
                for r in tx.recipients:
                    tx.replies[r] = reply
                if not tx.pipelined:
                    self._done(tx, rset=True)
                elif tx.chunking:
                    self._stop_chunks(tx)
            return
        if verb is Verb.RCPT:
            r = tx.recipients[tx.rcpt_replies]
            tx.rcpt_replies += 1
            events.append(ReplyEvent(verb, reply, ok, r))
            if not tx.mail_refused:  # else the RCPT replies mean nothing
                if ok:
                    tx.accepted.append(r)
                else:
                    tx.replies[r] = reply
            if tx.rcpt_replies == len(tx.recipients):
                if not tx.accepted:
                    if not tx.pipelined:
                        self._done(tx, rset=True)
                    elif tx.chunking:
                        self._stop_chunks(tx)  # nothing to send the message for
                elif tx.chunking and not tx.pipelined:
                    self._lineends = LineEnds()
                    self.state = State.BODY
                    events.append(SendBody())
                elif self.state is State.BODY and not self._owed:
                    events.append(SendBody())  # pipelined: nothing owed any more
            return
        if verb is Verb.BDAT or verb is Verb.BDAT_LAST:
            self._on_chunk_reply(tx, verb, reply, ok)
            return
        if verb is Verb.DATA:
            if ok:  # 354
                if not tx.accepted:
                    # A broken pipelining server opened DATA with nothing to
                    # send: never end it with a dot (an empty message would
                    # be accepted).
                    raise UnexpectedReply("354 to DATA with no recipient accepted", reply, verb)
                events.append(ReplyEvent(verb, reply, ok))
                self._stuffer = DotStuffer()
                self.state = State.BODY
                events.append(SendBody())
                return
            events.append(ReplyEvent(verb, reply, ok))
            for r in tx.accepted:
                tx.replies[r] = reply
            self._done(tx, rset=True)
            return
        # END_OF_DATA
        events.append(ReplyEvent(verb, reply, ok))
        for r in tx.accepted:
            tx.replies[r] = reply
        self._done(tx, rset=False)

    def _on_chunk_reply(self, tx: _Transaction, verb: Verb, reply: Reply, ok: bool) -> None:
        events = self._events
        events.append(ReplyEvent(verb, reply, ok))
        if not ok and not tx.chunk_refused:
            # RFC 3030 2: the transaction failed; no more chunks. The
            # accepted recipients get this refusal, whatever comes later.
            tx.chunk_refused = True
            for r in tx.accepted:
                tx.replies[r] = reply
            self._lineends = None
            if self.state is State.BODY:
                self.state = State.BDAT_STOPPED
        if verb is Verb.BDAT_LAST:
            if not tx.chunk_refused:
                for r in tx.accepted:
                    tx.replies[r] = reply
            self._done(tx, rset=tx.chunk_refused or tx.mail_refused or not tx.accepted)
            return
        state = self.state
        if state is State.BODY:
            if not tx.pipelined or not self._owed:
                events.append(SendBody())  # the next chunk may go; nothing is owed
        elif state is State.BDAT_STOPPED and not self._owed:
            self._done(tx, rset=True)  # every chunk sent is answered
        # else DOT_SENT: the reply to BDAT LAST is still owed

    def _stop_chunks(self, tx: _Transaction) -> None:
        """No more BDAT chunks for C{tx}; it ends once the replies owed are in."""
        self._lineends = None
        if self.state is State.BODY:
            self.state = State.BDAT_STOPPED
        if not self._owed and self.state is State.BDAT_STOPPED:
            self._done(tx, rset=True)

    def _done(self, tx: _Transaction, rset: bool) -> None:
        self._tx = None
        self._lineends = None
        self.needs_rset = rset
        self.state = State.READY
        self._events.append(TransactionDone(tx.replies, not self.closing))


_TX_VERBS = frozenset({Verb.MAIL, Verb.RCPT, Verb.DATA, Verb.END_OF_DATA, Verb.BDAT,
                       Verb.BDAT_LAST})
