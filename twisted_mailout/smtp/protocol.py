"""One ESMTP client connection: the Twisted driver over the sans-IO core.

The dialogue rules (which command may go now, what each reply code means,
which recipients a transaction delivered) live in L{twisted_mailout.smtp.state};
this module gives them a transport, the STARTTLS handshake, one timer per
awaited reply (RFC 5321 4.5.3.2, armed from
L{ClientConnection.awaiting<twisted_mailout.smtp.state.ClientConnection.awaiting>}),
the message body as an C{IPullProducer}, and Deferreds for its callers.

Why our own protocol rather than C{twisted.mail.smtp.ESMTPClient}: its
callback API delivers one message per connection, its dot-stuffing is wrong
at its 16 KiB chunk boundaries and it sends CRLF input as CR CR LF, it trusts
bytes read before the TLS handshake, it has no per-command timeouts, and it
cannot pipeline (RFC 2920). This protocol uses Twisted's transport, TLS
(C{startTLS} with pyOpenSSL connection creators) and clock; the SMTP state
machine is ours and is proven by tests against aiosmtpd and Postfix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from OpenSSL import SSL
from twisted.internet import defer, error, protocol
from twisted.internet.base import DelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mailout.envelope import Reply
from twisted_mailout.smtp import auth as _auth
from twisted_mailout.smtp import sasl
from twisted_mailout.smtp.dotstuff import DotStuffer, encode_data
from twisted_mailout.smtp.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    SessionError,
    Stage,
    UnexpectedReply,
)
from twisted_mailout.smtp.extensions import (
    mail_parameters,
    supports_chunking,
    supports_pipelining,
    supports_smtputf8,
    supports_starttls,
)
from twisted_mailout.smtp.producers import CHUNK, _BodyProducer, _ChunkProducer, local_reply
from twisted_mailout.smtp.replies import MAX_LINE, MAX_REPLY_LINES
from twisted_mailout.smtp.state import (
    Auth,
    AuthResponse,
    ClientConnection,
    Command,
    Ehlo,
    Helo,
    Quit,
    ReplyEvent,
    Rset,
    SendBody,
    StartTLS,
    Transaction,
    TransactionDone,
    Verb,
)
from twisted_mailout.smtp.timeouts import Timeouts
from twisted_mailout.tls.creators import opportunistic_tls
from twisted_mailout.tls.errors import CertificateVerifyError
from twisted_mailout.tls.levels import LEVELS, REQUIRED

__all__ = [
    "CHUNK",
    "MAX_LINE",
    "MAX_REPLY_LINES",
    "TLS_LEVELS",
    "DotStuffer",
    "ESMTPSession",
    "SessionError",
    "Stage",
    "Timeouts",
    "TransactionResult",
    "encode_data",
]

TLS_LEVELS = LEVELS  # the one list, twisted_mailout.tls.levels

#: The L{Stage} a failure while waiting for a reply to each command is reported under.
_STAGES: dict[Verb, Stage] = {
    Verb.GREETING: Stage.GREETING,
    Verb.EHLO: Stage.EHLO,
    Verb.HELO: Stage.EHLO,
    Verb.STARTTLS: Stage.STARTTLS,
    Verb.AUTH: Stage.AUTH,
    Verb.AUTH_CANCEL: Stage.AUTH,
    Verb.MAIL: Stage.MAIL,
    Verb.RCPT: Stage.RCPT,
    Verb.DATA: Stage.DATA,
    Verb.END_OF_DATA: Stage.END_OF_DATA,
    Verb.BDAT: Stage.DATA_BLOCK,
    Verb.BDAT_LAST: Stage.END_OF_DATA,
    Verb.RSET: Stage.RSET,
    Verb.QUIT: Stage.QUIT,
}

#: EHLO refusals after which HELO is tried (RFC 5321 4.1.4, 3.2).
_TRY_HELO = frozenset({500, 501, 502, 504, 550})


@dataclass
class TransactionResult:
    """The outcome of one mail transaction.

    @ivar replies: C{{recipient: Reply}} for every recipient given: the RCPT
        reply when it was refused, else the reply to the final dot (or a
        local reply when the connection failed).
    @ivar session_usable: whether the connection can carry another transaction.
    """

    replies: dict[str, Reply]
    session_usable: bool


_local = local_reply


class _Pending:
    """The transaction under way: its Deferred, command and message file
    (and, between BDAT chunks, the bytes already read ahead)."""

    __slots__ = ("ahead", "command", "d", "may_finish", "source")

    def __init__(self, d: defer.Deferred[TransactionResult], command: Transaction,
                 source: IO[bytes], may_finish: Callable[[], bool] | None = None):
        self.d = d
        self.command = command
        self.source = source
        self.may_finish = may_finish
        self.ahead: list[bytes] = []


class ESMTPSession(protocol.Protocol):
    """An ESMTP client session (RFC 5321), usable for many transactions.

    Create it through an endpoint; C{ready} fires with the session once the
    greeting, EHLO (or HELO) and STARTTLS per the TLS level are done, or
    fails with L{SessionError}. Then call L{transaction} once at a time, and
    L{quit} at the end. C{closed} fires (with L{None}) when the connection
    is gone, for whatever reason.

    @param helo: the name given in EHLO/HELO.
    @param clock: C{IReactorTime} for timeouts.
    @param tls: one of L{TLS_LEVELS}.
    @param tls_creator: C{callable(hostname) -> IOpenSSLClientConnectionCreator}
        for STARTTLS; chosen by the caller according to C{tls}.
    @param hostname: the peer's host name (for TLS and logs).
    @param timeouts: L{Timeouts}.
    @param pipelining: use PIPELINING (RFC 2920) when the server offers it.
    @param chunking: send messages with BDAT (RFC 3030 CHUNKING) instead of
        DATA when the server offers it: no dot-stuffing, no 354 round trip;
        a small message goes in one write with MAIL and RCPT (pipelined),
        a larger one in chunks of 256 KiB read, each after the replies owed
        (see L{_ChunkProducer<twisted_mailout.smtp.producers._ChunkProducer>}
        for why). BINARYMIME is never used: the message goes as it would
        with DATA (line ends made CRLF), and the server keeps the same bytes.
    @param implicit_tls: the transport is TLS from the first byte (RFC 8314
        submissions port 465): no STARTTLS, the session counts as encrypted.
    @param credentials: L{auth.Credentials<twisted_mailout.smtp.auth.Credentials>}
        for AUTH (RFC 4954) after EHLO, or L{None}. Credentials are only sent
        under TLS unless they allow plaintext; a server that offers no AUTH
        gets the mail without it.

    A TLS failure (handshake, certificate) fails C{ready} with a
    L{SessionError} whose C{stage} is L{Stage.TLS}. A server that breaks the
    protocol (a malformed reply, a reply out of step, a code that does not
    belong to the command, see L{EXPECTED<twisted_mailout.smtp.state.EXPECTED>})
    ends the session: the connection is aborted and the recipients get a
    local 421 (deferred).

    @ivar ready: a Deferred firing with the session, or failing with L{SessionError}.
    @ivar closed: a Deferred firing with L{None} once the connection is gone.
    @ivar usable: the session can carry another transaction (C{bool}).
    @ivar encrypted: the connection is under TLS (C{bool}).
    @ivar authenticated: AUTH succeeded (C{bool}).
    @ivar transactions: the number of transactions started (C{int}).
    @ivar created: when the session was made (C{clock.seconds()}).
    @ivar greeting: the server's greeting L{Reply}, once received.
    @ivar relay_label: a label for logs, the host name by default.
    @ivar peer: C{"host:port"} of the peer, once connected.
    """

    log = Logger()

    def __init__(self, helo: str, clock: Any, tls: str = "may",
                 tls_creator: Callable[[str | None], Any] | None = None,
                 hostname: str | None = None, timeouts: Timeouts | None = None,
                 pipelining: bool = True, implicit_tls: bool = False,
                 credentials: _auth.Credentials | None = None, chunking: bool = True):
        if tls not in TLS_LEVELS:
            raise ValueError(f"unknown TLS level {tls!r}; expected one of {TLS_LEVELS}")
        self.implicit_tls = implicit_tls
        self.credentials = credentials
        self.authenticated = False
        self.helo = helo
        self.clock = clock
        self.tls = tls
        self.tls_creator = tls_creator or opportunistic_tls
        self.hostname = hostname
        self.timeouts = timeouts or Timeouts()
        self.pipelining = pipelining
        self.chunking = chunking
        self.ready: defer.Deferred[ESMTPSession] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.relay_label = hostname or "?"
        self.encrypted = False
        self.usable = False
        self.transactions = 0
        self.created = clock.seconds()
        self.greeting: Reply | None = None
        self.peer = "?"
        self._conn = ClientConnection()
        self._waiter: defer.Deferred[Reply] | None = None  # the one awaited reply
        self._tx: _Pending | None = None
        self._timer: DelayedCall | None = None
        self._closed = False
        self._lost_reason: Failure | None = None
        self._producer: _BodyProducer | _ChunkProducer | None = None
        self._tls_pending = implicit_tls  # a handshake is under way

    @property
    def extensions(self) -> dict[str, str]:
        """The server's EHLO keywords, C{{KEYWORD: parameters}} (emptied by
        STARTTLS and HELO)."""
        return self._conn.extensions

    @property
    def _transport(self) -> Any:
        # ITransport as zope declares it (mypy cannot check its methods).
        return self.transport

    @property
    def _who(self) -> str:
        return self.hostname or self.peer

    # -- wire level ---------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        nodelay = getattr(transport, "setTcpNoDelay", None)
        if nodelay is not None:  # TCP: no Nagle delay for our small commands
            nodelay(True)
        p = self._transport.getPeer()
        self.peer = f"{getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"
        self._arm()
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(self._start_failed)

    def dataReceived(self, data: bytes) -> None:
        conn = self._conn
        conn.receive_data(data)
        while not self._closed:
            try:
                events = conn.next_events()
            except RemoteProtocolError as e:
                # The events before the fault are already in the state
                # machine's books (a refused recipient stays refused).
                self._protocol_error(e)
                return
            if not events:
                return
            self._handle(events)
            self._arm()

    def _handle(self, events: list[Any]) -> None:
        for ev in events:
            kind = type(ev)
            if kind is ReplyEvent:
                self._tls_pending = False  # a reply after the handshake: it is done
                reply = ev.reply
                if reply.code == 421:
                    self.usable = False  # the server is closing the channel
                verb = ev.verb
                if verb is None:
                    self.log.debug("unsolicited reply from {peer}: {reply}", peer=self.peer,
                                   reply=reply.one_line())
                elif verb is Verb.RSET and self._tx is not None:
                    self._rset_done(ev)
                elif self._waiter is not None:
                    d, self._waiter = self._waiter, None
                    d.callback(reply)
            elif kind is SendBody:
                if self._producer is None:  # (BDAT: else the chunks are going already)
                    self._send_body()
            elif kind is TransactionDone:
                if self._producer is not None:  # BDAT: no more chunks will go
                    self._producer.cancel()
                    self._producer = None
                self._finish(ev.replies, ev.usable)
        producer = self._producer
        if type(producer) is _ChunkProducer and not self._conn.body_wanted():
            producer.halt()  # a refused chunk, MAIL or every RCPT: no more chunks
        tx = self._tx
        if tx is not None and not tx.command.pipelined and not self._closed:
            command = self._conn.next_command()
            if command is not None:
                self._write(self._conn.send(command))

    def _write(self, data: bytes) -> None:
        self._transport.write(data)
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        """(Re)start the timeout of the reply now awaited (the first in
        L{ClientConnection.awaiting}); none while the body is being sent
        (the producer has its own) or when no reply is owed."""
        key = self._conn.timeout_key()
        timer = self._timer
        if key is not None and self._producer is None and not self._closed:
            timeout = self.timeouts.get(key)
            if timer is not None and timer.active():
                timer.reset(timeout)
            else:
                self._timer = self.clock.callLater(timeout, self._timed_out)
            return
        if timer is not None and timer.active():
            timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        awaited = self._conn.awaiting()
        if not awaited:
            return
        verb, key = awaited[0]
        self._abort()  # first: whoever is told may not send anything more
        self._fail(SessionError(
            _local(421, f"4.4.2 timeout after {self.timeouts.get(key):g}s waiting for the "
                   f"{verb.value} reply from {self._who}"), _STAGES[verb]))

    def _protocol_error(self, e: RemoteProtocolError) -> None:
        stage = Stage.PROTOCOL
        if isinstance(e, UnexpectedReply) and isinstance(e.verb, Verb):
            stage = _STAGES[e.verb]
        self._abort()  # first: whoever is told may not send anything more
        self._fail(SessionError(_local(421, f"4.5.0 protocol error from {self._who}: {e.why}"),
                                stage))

    def _abort(self) -> None:
        self.usable = False
        self._closed = True
        if self.transport is not None:
            self._transport.abortConnection()

    def _abort_later(self) -> None:
        self.usable = False
        if not self._closed and self.transport is not None:
            self._transport.loseConnection()

    def _lost_failure(self, verb: Verb | None) -> SessionError:
        what = verb.value if verb is not None else "greeting"
        stage = _STAGES.get(verb, Stage.GREETING) if verb is not None else Stage.GREETING
        reason = self._lost_reason
        detail = "connection closed"
        status = "4.4.2"
        if reason is not None:
            v = reason.value
            if isinstance(v, SSL.Error):
                detail, status, stage = f"TLS failure: {_ssl_text(v)}", "4.7.5", Stage.TLS
            elif isinstance(v, CertificateVerifyError):
                detail, status, stage = f"TLS failure: {v}", "4.7.5", Stage.TLS
            elif type(v).__name__ == "VerificationError":  # service_identity
                detail = f"TLS failure: certificate does not match {self.hostname}: {v}"
                status, stage = "4.7.5", Stage.TLS
            elif self._tls_pending:  # closed (cleanly or not) before the handshake ended
                detail, status, stage = ("connection closed during the TLS handshake", "4.7.5",
                                         Stage.TLS)
            elif not reason.check(error.ConnectionDone):
                detail = f"connection lost: {v}"
        waited = "TLS handshake" if stage is Stage.TLS else what + " reply"
        err = SessionError(_local(421, f"{status} {detail} while waiting for the {waited} "
                                  f"from {self._who}"), stage)
        err.tls_failure = getattr(reason.value, "result_type", None) if reason else None
        return err

    def _fail(self, exc: SessionError) -> None:
        """Fail whatever waits: the awaited reply of the session start or
        QUIT, and the transaction (undecided recipients get C{exc.reply})."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d, self._waiter = self._waiter, None
        if d is not None:
            d.errback(Failure(exc))
        if self._tx is not None:
            replies = self._conn.transaction_replies(exc.reply)
            for r in self._tx.command.recipients:  # also before MAIL went out (RSET)
                replies.setdefault(r, exc.reply)
            self.usable = False
            self._abort_later()
            self._finish(replies, False)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = True
        self.usable = False
        self._lost_reason = reason
        awaited = self._conn.awaiting()
        self._conn.connection_closed()
        if self._producer is not None:
            self._producer.stop()
        self._fail(self._lost_failure(awaited[0][0] if awaited else None))
        if not self.ready.called:
            self.ready.errback(Failure(self._lost_failure(Verb.GREETING)))
        self.closed.callback(None)

    def _command(self, command: Command, verb: Verb) -> defer.Deferred[Reply]:
        """Send C{command}; a Deferred for its reply (failing with
        L{SessionError} when the session fails first)."""
        if self._closed:
            return defer.fail(self._lost_failure(verb))
        data = self._conn.send(command)
        d: defer.Deferred[Reply] = defer.Deferred()
        self._waiter = d
        self._write(data)
        return d

    # -- session start ------------------------------------------------------

    def _start_failed(self, f: Failure) -> None:
        if not self.ready.called:
            self._abort()
            self.ready.errback(f)

    async def _start(self) -> None:
        waiter: defer.Deferred[Reply] = defer.Deferred()
        self._waiter = waiter
        greeting = await waiter
        self.greeting = greeting
        self.encrypted = self.implicit_tls
        if greeting.code != 220:  # a refusal (anything else is a protocol error)
            await self._quietly_quit()
            raise SessionError(greeting, Stage.GREETING)
        await self._ehlo()
        if not self.implicit_tls:
            required = self.tls in REQUIRED
            if supports_starttls(self.extensions) and self.tls != "none":
                before = self._conn.discarded
                reply = await self._command(StartTLS(), Verb.STARTTLS)
                if reply.code == 220:
                    if self._conn.discarded > before:
                        self.log.warn("discarding {n} bytes {peer} sent before the TLS "
                                      "handshake", n=self._conn.discarded - before,
                                      peer=self.peer)
                    self._tls_pending = True
                    self._transport.startTLS(self.tls_creator(self.hostname))
                    self.encrypted = True
                    await self._ehlo()
                elif required:
                    await self._quietly_quit()
                    raise SessionError(
                        _local(reply.code, f"4.7.5 TLS is required ({self.tls}) but STARTTLS "
                               f"was refused: {reply.one_line()}"), Stage.STARTTLS)
            elif required:
                await self._quietly_quit()
                raise SessionError(
                    _local(454, f"4.7.4 TLS is required ({self.tls}) but {self._who} does not "
                           "offer STARTTLS"), Stage.STARTTLS)
        if self.credentials is not None:
            await self._authenticate(self.credentials)
        self.usable = True
        self.ready.callback(self)

    async def _authenticate(self, creds: _auth.Credentials) -> None:
        """AUTH (RFC 4954) with the credentials; never sends a secret over
        plaintext unless the credentials allow it. Failures defer (4xx):
        a refused login is the operator's to fix, not the recipients'."""
        who = self._who
        offered = self.extensions.get("AUTH")
        if offered is None:
            self.log.info("{peer} offers no AUTH; sending without authenticating", peer=who)
            return
        if not self.encrypted and not creds.allow_plaintext:
            await self._quietly_quit()
            raise SessionError(_local(454, f"4.7.0 not sending AUTH credentials to {who} over "
                                      "an unencrypted connection (no TLS; allow it "
                                      "explicitly with --auth-plaintext)"), Stage.AUTH)
        mech = _auth.choose_mechanism(creds, offered, self.encrypted)
        if mech is None:
            await self._quietly_quit()
            raise SessionError(_local(454, f"4.7.0 no AUTH mechanism in common with {who}: it "
                                      f"offers {offered[:100]!r}, we allow "
                                      f"{' '.join(creds.mechanisms)}"), Stage.AUTH)
        if mech == "XOAUTH2":
            try:
                secret = await creds.token(self.clock)
            except _auth.AuthError as e:
                await self._quietly_quit()
                raise SessionError(_local(451, f"4.7.0 {e}"), Stage.AUTH) from None
        else:
            assert creds.password is not None
            secret = creds.password
        steps = sasl.mechanism_for(mech, creds.username, secret)
        reply = await self._command(Auth(steps.initial()), Verb.AUTH)
        while reply.code == 334:
            try:
                line = steps.respond(reply.text.split("\n")[0])
            except sasl.SASLError as e:
                await self._command(AuthResponse(sasl.CANCEL), Verb.AUTH_CANCEL)
                await self._quietly_quit()
                raise SessionError(_local(454, f"4.7.0 {e} ({who})"), Stage.AUTH) from None
            if line is None:  # still asking: we have nothing more to say
                reply = await self._command(AuthResponse(sasl.CANCEL), Verb.AUTH_CANCEL)
                break
            reply = await self._command(AuthResponse(line), Verb.AUTH)
        if reply.code == 235:
            self.authenticated = True
            return
        await self._quietly_quit()
        raise SessionError(_local(454 if reply.is_permanent else reply.code,
                                  f"4.7.8 authentication as {creds.username} failed at {who} "
                                  f"({mech}): {reply.one_line()[:200]}"), Stage.AUTH)

    async def _ehlo(self) -> None:
        reply = await self._command(Ehlo(self.helo), Verb.EHLO)
        if reply.code == 250:
            return
        if reply.code in _TRY_HELO and not self.encrypted:
            reply = await self._command(Helo(self.helo), Verb.HELO)
            if reply.code == 250:
                return
        await self._quietly_quit()
        raise SessionError(reply, Stage.EHLO)

    async def _quietly_quit(self) -> None:
        if self._closed:
            return
        try:
            await self._command(Quit(), Verb.QUIT)
        except (SessionError, LocalProtocolError):
            pass  # the session is over either way
        self._abort_later()

    # -- transactions -------------------------------------------------------

    def transaction(self, sender: str, recipients: list[str], source: IO[bytes],
                    size: int | None = None, smtputf8: bool = False,
                    eightbit: bool = False,
                    may_finish: Callable[[], bool] | None = None
                    ) -> defer.Deferred[TransactionResult]:
        """Run one mail transaction: MAIL, RCPT for each recipient, DATA
        (pipelined when the server offers PIPELINING, RFC 2920), or BDAT
        chunks instead of DATA when the server offers CHUNKING (RFC 3030)
        and the session was made with C{chunking}.

        @param sender: the MAIL FROM address, already validated, C{""} for
            the null sender.
        @param recipients: RCPT TO addresses, already validated.
        @param source: a binary file object positioned at the message start;
            read in chunks of L{CHUNK} bytes until EOF (not closed here).
        @param size: message size in bytes, for the SIZE parameter (RFC 1870).
        @param smtputf8: the envelope needs SMTPUTF8 (RFC 6531).
        @param eightbit: the message has 8-bit bytes: C{BODY=8BITMIME} is
            sent when the server offers it (RFC 6152). To a server that does
            not, the message goes as it is (no MIME conversion).
        @param may_finish: asked just before the final dot (or the BDAT LAST
            chunk) is written, or
            L{None}: when it answers C{False} (a shared queue's lease could
            not be renewed in time, so another daemon may be sending this
            message), the final dot is not sent and the connection is
            dropped, so the server never takes the message (RFC 5321 4.1.1.4:
            a transaction without its end of data is not delivered); every
            recipient gets a local 451 4.4.2.
        @return: a Deferred firing with a L{TransactionResult}; it never
            fails for server or network trouble (those are replies). It
            fails with C{ValueError} for CR, LF or NUL in an address.
            Cancelling it aborts the connection (the Deferred then fails
            with C{CancelledError}).
        """
        d: defer.Deferred[TransactionResult] = defer.Deferred(self._cancel)
        if self._closed:
            lost = self._lost_failure(Verb.RSET if self._conn.needs_rset else Verb.MAIL).reply
            d.callback(TransactionResult({r: lost for r in recipients}, False))
            return d
        extensions = self.extensions
        if smtputf8 and not supports_smtputf8(extensions):
            r = _local(553, "5.6.7 the address needs SMTPUTF8 and "
                       f"{self._who} does not offer it")
            d.callback(TransactionResult({rc: r for rc in recipients}, True))
            return d
        command = Transaction(sender, tuple(recipients),
                              mail_parameters(extensions, size, eightbit, smtputf8),
                              self.pipelining and supports_pipelining(extensions),
                              self.chunking and supports_chunking(extensions))
        for text in (sender, *recipients):
            if "\r" in text or "\n" in text or "\0" in text:
                return defer.fail(LocalProtocolError("CR, LF or NUL in an SMTP command"))
        if self._tx is not None:
            return defer.fail(LocalProtocolError("a transaction is already under way"))
        self._tx = _Pending(d, command, source, may_finish)
        try:
            if self._conn.needs_rset:
                self._write(self._conn.send(Rset()))
            else:
                self._begin()
        except LocalProtocolError as e:  # not ready (still starting, or quitting)
            self._tx = None
            return defer.fail(e)
        return d

    def _begin(self) -> None:
        tx = self._tx
        assert tx is not None
        self.transactions += 1
        data = self._conn.send(tx.command)
        if tx.command.chunking and tx.command.pipelined:
            self._send_body(data)  # MAIL, RCPT and the first chunk in one write
        else:
            self._write(data)

    def _rset_done(self, ev: ReplyEvent) -> None:
        if ev.ok:
            self._begin()
            return
        # Not the recipients' fault: defer them all, and give the session up.
        self._fail(SessionError(_local(451, f"4.3.0 {self._who} refused RSET: "
                                       f"{ev.reply.one_line()[:200]}"), Stage.RSET))

    def _finish(self, replies: dict[str, Reply], usable: bool) -> None:
        tx, self._tx = self._tx, None
        if tx is None:
            return
        tx.d.callback(TransactionResult(replies, usable and self.usable and not self._closed))

    def _cancel(self, d: defer.Deferred[TransactionResult]) -> None:
        """The caller gave up on the transaction: the dialogue cannot be
        resumed in step, so the connection is aborted; the Deferred then
        fails with C{CancelledError}."""
        if self._tx is None or self._tx.d is not d:
            return
        self._tx = None
        self._conn.transaction_replies(_local(421, "4.4.2 cancelled"))
        # debug: the delivery layer logs the one line an operator needs
        # (destination, relay, recipients); see delivery/connector.py.
        self.log.debug("transaction with {peer} cancelled: aborting the connection",
                       peer=self._who)
        if self._producer is not None:
            self._producer.cancel()
            self._producer = None
        self._abort()

    def _send_body(self, prefix: bytes = b"") -> None:
        tx = self._tx
        assert tx is not None
        if tx.command.chunking:
            chunks = _ChunkProducer(self, tx.source, tx, prefix)
            self._producer = chunks
            self._arm()  # no reply timer while chunks are written: the producer times them
            chunks.start()
            return
        producer = _BodyProducer(self, tx.source)
        self._producer = producer
        self._arm()  # no reply timer while the body is sent: the producer times blocks
        self._transport.registerProducer(producer, False)

    def _body_sent(self) -> None:
        self._producer = None
        self._arm()  # now the reply to the final dot is awaited

    def _body_failed(self, exc: SessionError) -> None:
        self._producer = None
        self._fail(exc)

    def when_closed(self) -> defer.Deferred[None]:
        """A new Deferred firing (with L{None}) once the connection is gone;
        one per caller, so callers' callbacks never feed each other."""
        return _chain(self.closed)

    def quit(self) -> defer.Deferred[None]:
        """Send QUIT and close the connection.

        @return: a Deferred firing (with L{None}) once the connection is
            closed; after the QUIT timeout (at most 10 s) the connection is
            aborted. It never fails.
        """
        self.usable = False
        if self._closed:
            return defer.succeed(None)
        limit = self.timeouts.quit
        try:
            d: defer.Deferred[Any] = self._command(Quit(), Verb.QUIT)
        except LocalProtocolError:  # mid-dialogue: no QUIT can be sent in step
            d = defer.succeed(None)

        def close(_: object) -> None:
            if not self._closed:
                self._transport.loseConnection()
                timer = self.clock.callLater(limit, self._abort)
                self.closed.addBoth(lambda _: timer.cancel() if timer.active() else None)

        d.addBoth(close)
        return d.addCallback(lambda _: _chain(self.closed))


def _chain(d: defer.Deferred[None]) -> defer.Deferred[None]:
    """A new Deferred firing (with L{None}) when C{d} fires, leaving C{d} as it is."""
    out: defer.Deferred[None] = defer.Deferred()

    def fire(r: object) -> object:
        out.callback(None)
        return r

    d.addBoth(fire)
    return out


def _ssl_text(e: SSL.Error) -> str:
    try:
        parts = []
        for item in e.args[0]:
            parts.append(item[-1] if isinstance(item, tuple) else str(item))
        return ", ".join(parts) or "handshake failed"
    except (TypeError, IndexError, AttributeError):
        return str(e) or "handshake failed"
