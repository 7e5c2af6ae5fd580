"""One ESMTP client connection: greeting, EHLO, STARTTLS, transactions, QUIT.

Why our own protocol rather than C{twisted.mail.smtp.ESMTPClient}: its
callback API delivers one message per connection, its dot-stuffing is wrong
at its 16 KiB chunk boundaries and it sends CRLF input as CR CR LF, it trusts
bytes read before the TLS handshake, it has no per-command timeouts, and it
cannot pipeline (RFC 2920). This protocol uses Twisted's transport, TLS
(C{startTLS} with pyOpenSSL connection creators) and clock; the SMTP state
machine is ours and is proven by tests against aiosmtpd and Postfix.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from OpenSSL import SSL
from twisted.internet import defer, error, interfaces, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mailout.smtp import auth as _auth
from twisted_mailout.envelope import Reply
from twisted_mailout.tls.creators import opportunistic_tls
from twisted_mailout.tls.errors import CertificateVerifyError
from twisted_mailout.tls.levels import LEVELS, REQUIRED

__all__ = [
    "TLS_LEVELS",
    "DotStuffer",
    "ESMTPSession",
    "SessionError",
    "Timeouts",
    "TransactionResult",
]

TLS_LEVELS = LEVELS  # the one list, twisted_mailout.tls.levels

MAX_LINE = 4096  # bytes in one reply line (RFC 5321 4.5.3.1.5 says 512; be lenient)
MAX_REPLY_LINES = 200  # lines in one multi-line reply
CHUNK = 65536  # bytes read from the message file at a time


@dataclass(frozen=True)
class Timeouts:
    """Per-command timeouts in seconds (RFC 5321 4.5.3.2 minimums by default).

    @ivar connect: TCP connect.
    @ivar greeting: initial 220 message (4.5.3.2.1: 5 minutes).
    @ivar helo: EHLO/HELO, STARTTLS, RSET, QUIT.
    @ivar mail: MAIL command (4.5.3.2.2: 5 minutes).
    @ivar rcpt: each RCPT command (4.5.3.2.3: 5 minutes).
    @ivar data: DATA initiation (4.5.3.2.4: 2 minutes).
    @ivar data_block: each block of message data written (4.5.3.2.5: 3 minutes).
    @ivar data_done: reply to the final dot (4.5.3.2.6: 10 minutes).
    """

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0

    @classmethod
    def scaled(cls, limit: float) -> Timeouts:
        """Every timeout capped at C{limit} seconds (for tests and impatient
        programmatic callers)."""
        d = cls()
        return cls(**{k: min(getattr(d, k), limit) for k in d.__dataclass_fields__})


class SessionError(Exception):
    """The session cannot go on (or never started).

    @ivar reply: what decides the outcome: a server reply, or a local one
        (code 4xx for network trouble, timeouts, TLS failures).
    @ivar stage: C{"connect"}, C{"greeting"}, C{"ehlo"}, C{"starttls"},
        C{"tls"} (handshake or certificate failure), C{"AUTH"}, ...
    @ivar tls_failure: for C{"tls"}: the RFC 8460 result type when known.
    """

    tls_failure: str | None = None

    def __init__(self, reply: Reply, stage: str):
        super().__init__(f"{stage}: {reply.one_line()}")
        self.reply = reply
        self.stage = stage


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


class DotStuffer:
    """Incremental SMTP data encoder (RFC 5321 4.5.2 and 2.3.8).

    Every line end (CRLF, bare LF or bare CR) becomes CRLF and every line
    starting with "." gets one more "." -- whatever the chunking of the
    input, so no byte sequence in a message can end DATA early (the
    SMTP-smuggling class of bugs, CVE-2023-51764).
    """

    def __init__(self):
        self._cr = False  # the previous chunk ended with CR
        self._bol = True  # the output is at the beginning of a line
        self._any = False

    def feed(self, data: bytes) -> bytes:
        """Encode one chunk; returns the bytes to send (maybe empty)."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if not data:
            return b""
        self._any = True
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._bol and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\n.", b"\n..")
        self._bol = data.endswith(b"\n")
        return data.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """The end of the data: a CRLF if the message did not end with a
        line end, then the terminating C{.CRLF}."""
        out = b""
        if self._cr:
            out = b"\r\n"
            self._cr = False
            self._bol = True
        elif self._any and not self._bol:
            out = b"\r\n"
        return out + b".\r\n"


def encode_data(message: bytes) -> bytes:
    """The whole DATA payload for C{message}, terminating dot included."""
    s = DotStuffer()
    return s.feed(message) + s.finish()


def _local(code: int, text: str) -> Reply:
    return Reply(code, text, local=True)


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
    @param implicit_tls: the transport is TLS from the first byte (RFC 8314
        submissions port 465): no STARTTLS, the session counts as encrypted.
    @param credentials: L{auth.Credentials} for AUTH (RFC 4954) after EHLO,
        or L{None}. Credentials are only sent under TLS unless they allow
        plaintext; a server that offers no AUTH gets the mail without it.

    A TLS failure (handshake, certificate) fails C{ready} with a
    L{SessionError} whose C{stage} is C{"tls"}.
    """

    log = Logger()

    def __init__(self, helo: str, clock, tls: str = "may", tls_creator=None,
                 hostname: str | None = None, timeouts: Timeouts | None = None,
                 pipelining: bool = True, implicit_tls: bool = False,
                 credentials=None):
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
        self.ready = defer.Deferred()
        self.closed = defer.Deferred()
        self.relay_label = hostname or "?"
        self.extensions: dict[str, str] = {}
        self.encrypted = False
        self.usable = False
        self.transactions = 0
        self.created = clock.seconds()
        self.greeting: Reply | None = None
        self._buffer = b""
        self._rx_total = 0  # bytes received so far
        self._consumed = 0  # offset of _buffer's first byte in the stream
        self._reply_start = 0  # offset of the current reply's first line
        self._lines: list[bytes] = []
        self._reply_bytes = 0
        self._waiting: deque = deque()
        self._timer = None
        self._closed = False
        self._lost_reason: Failure | None = None
        self._needs_rset = False
        self._producer = None
        self._tls_pending = implicit_tls  # a handshake is under way
        self.peer = "?"

    # -- wire level ---------------------------------------------------------

    def connectionMade(self):
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:  # TCP: no Nagle delay for our small commands
            nodelay(True)
        p = self.transport.getPeer()
        self.peer = f"{getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"
        d = self._expect(self.timeouts.greeting, "greeting")
        defer.Deferred.fromCoroutine(self._start(d)).addErrback(self._start_failed)

    def dataReceived(self, data: bytes):
        self._rx_total += len(data)
        self._buffer += data
        while True:
            i = self._buffer.find(b"\n")
            if i < 0:
                if len(self._buffer) > MAX_LINE + 1:  # + 1: its CR may come before the LF
                    self._protocol_error(f"reply line longer than {MAX_LINE} bytes")
                return
            line, self._buffer = self._buffer[:i], self._buffer[i + 1 :]
            if not self._lines:
                self._reply_start = self._consumed
            self._consumed += i + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_LINE:
                self._protocol_error(f"reply line longer than {MAX_LINE} bytes")
                return
            if not self._line_received(line):
                return

    def _line_received(self, line: bytes) -> bool:
        if (len(line) < 3 or not line[:3].isdigit() or line[:1] not in b"2345"
                or (len(line) > 3 and line[3:4] not in b" -")):
            self._protocol_error(f"malformed reply line {line[:80]!r}")
            return False
        if self._lines and line[:3] != self._lines[0][:3]:
            self._protocol_error("reply code changed inside a multi-line reply")
            return False
        self._lines.append(line)
        if len(self._lines) > MAX_REPLY_LINES:
            self._protocol_error(f"multi-line reply longer than {MAX_REPLY_LINES} lines")
            return False
        if line[3:4] == b"-":
            return True
        code = int(line[:3])
        text = "\n".join(ln[4:].decode("utf-8", "replace") for ln in self._lines)
        self._lines = []
        self._reply(Reply(code, text))
        return not self._closed

    def _reply(self, reply: Reply):
        self._tls_pending = False  # a reply after the handshake: it is done
        if not self._waiting:
            self.log.debug("unsolicited reply from {peer}: {reply}", peer=self.peer,
                           reply=reply.one_line())
            if reply.code == 421:
                self.usable = False
            return
        if reply.code == 421:
            self.usable = False  # the server is closing the channel
        if self._reply_start < self._waiting[0][3]:
            # It began before we sent the command it would answer: an extra
            # reply put the dialogue out of step; nothing after it is trusted.
            self._protocol_error(f"reply {reply.one_line()[:80]!r} arrived before the "
                                 f"{self._waiting[0][2]} command it would answer")
            return
        d, _, _, _ = self._waiting.popleft()
        self._arm()
        d.callback(reply)

    def _expect(self, timeout: float, what: str) -> defer.Deferred:
        d = defer.Deferred()
        if self._closed:
            d.errback(self._lost_failure(what))
            return d
        self._waiting.append((d, timeout, what, self._rx_total))
        if len(self._waiting) == 1:
            self._arm()
        return d

    def _expect_group(self, steps: list[tuple[float, str]]) -> _ReplyGroup:
        """Expect one reply per C{(timeout, what)} step, in order, as for a
        pipelined group (RFC 2920): each is timed like a single command, but
        the caller is woken once, when the last has arrived (or the session
        failed), instead of once per reply."""
        group = _ReplyGroup()
        last = len(steps) - 1
        for i, (timeout, what) in enumerate(steps):
            self._expect_slot(_GroupSlot(group, i == last), timeout, what)
        return group

    def _expect_slot(self, slot, timeout: float, what: str):
        if self._closed:
            slot.errback(Failure(self._lost_failure(what)))
            return
        self._waiting.append((slot, timeout, what, self._rx_total))
        if len(self._waiting) == 1:
            self._arm()

    def _arm(self):
        """(Re)start the timeout of the reply now awaited; moving a live
        timer is cheaper than cancelling it and making a new one."""
        timer = self._timer
        if self._waiting and self._producer is None:
            _, timeout, what, _ = self._waiting[0]
            if timer is not None and timer.active():
                timer.args = (what, timeout)
                timer.reset(timeout)
            else:
                self._timer = self.clock.callLater(timeout, self._timed_out, what, timeout)
            return
        if timer is not None and timer.active():
            timer.cancel()
        self._timer = None

    def _timed_out(self, what: str, timeout: float):
        self._timer = None
        self._fail_all(SessionError(
            _local(421, f"4.4.2 timeout after {timeout:g}s waiting for the {what} reply "
                   f"from {self.hostname or self.peer}"), what))
        self._abort()

    def _protocol_error(self, why: str):
        self._fail_all(SessionError(_local(421, f"4.5.0 protocol error from "
                                           f"{self.hostname or self.peer}: {why}"), "reply"))
        self._abort()

    def _abort(self):
        self.usable = False
        self._closed = True
        if self.transport is not None:
            self.transport.abortConnection()

    def _lost_failure(self, what: str) -> SessionError:
        reason = self._lost_reason
        detail = "connection closed"
        status = "4.4.2"
        if reason is not None:
            v = reason.value
            if isinstance(v, SSL.Error):
                detail, status, what = f"TLS failure: {_ssl_text(v)}", "4.7.5", "tls"
            elif isinstance(v, CertificateVerifyError):
                detail, status, what = f"TLS failure: {v}", "4.7.5", "tls"
            elif type(v).__name__ == "VerificationError":  # service_identity
                detail = f"TLS failure: certificate does not match {self.hostname}: {v}"
                status, what = "4.7.5", "tls"
            elif self._tls_pending:  # closed (cleanly or not) before the handshake ended
                detail, status, what = "connection closed during the TLS handshake", "4.7.5", "tls"
            elif not reason.check(error.ConnectionDone):
                detail = f"connection lost: {v}"
        err = SessionError(_local(421, f"{status} {detail} while waiting for the "
                                  f"{'TLS handshake' if what == 'tls' else what + ' reply'} "
                                  f"from {self.hostname or self.peer}"), what)
        err.tls_failure = getattr(reason.value, "result_type", None) if reason else None
        return err

    def _fail_all(self, exc: Exception):
        waiting, self._waiting = self._waiting, deque()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for d, _, _, _ in waiting:
            d.errback(Failure(exc))

    def connectionLost(self, reason=protocol.connectionDone):
        self._closed = True
        self.usable = False
        self._lost_reason = reason
        if self._producer is not None:
            self._producer.stop()
        waiting = list(self._waiting)
        self._waiting = deque()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for d, _, what, _ in waiting:
            d.errback(Failure(self._lost_failure(what)))
        if not self.ready.called:
            self.ready.errback(Failure(self._lost_failure("greeting")))
        self.closed.callback(None)

    def _send(self, line: str | bytes, timeout: float, what: str) -> defer.Deferred:
        if isinstance(line, str):
            line = line.encode("utf-8")
        if b"\r" in line or b"\n" in line or b"\0" in line:
            raise ValueError("CR, LF or NUL in an SMTP command")
        d = self._expect(timeout, what)
        if not self._closed:
            self.transport.write(line + b"\r\n")
        return d

    # -- session start ------------------------------------------------------

    def _start_failed(self, f: Failure):
        if not self.ready.called:
            self._abort()
            self.ready.errback(f)

    async def _start(self, greeting_d):
        greeting = await greeting_d
        self.greeting = greeting
        self.encrypted = self.implicit_tls
        if greeting.code != 220:
            await self._quietly_quit()
            raise SessionError(greeting, "greeting")
        await self._ehlo()
        required = self.tls in REQUIRED
        if self.implicit_tls:
            pass
        elif "STARTTLS" in self.extensions and self.tls != "none":
            reply = await self._send("STARTTLS", self.timeouts.helo, "STARTTLS")
            if reply.code == 220:
                if self._buffer or self._lines:
                    # Bytes sent after the 220 but before the handshake could
                    # only be an injection attempt (CVE-2011-0411): discard.
                    self.log.warn("discarding {n} bytes {peer} sent before the TLS handshake",
                               n=len(self._buffer), peer=self.peer)
                    self._consumed += len(self._buffer)
                    self._buffer = b""
                    self._lines = []
                self._tls_pending = True
                self.transport.startTLS(self.tls_creator(self.hostname))
                self.encrypted = True
                self.extensions = {}
                await self._ehlo()
            elif required:
                await self._quietly_quit()
                raise SessionError(
                    _local(reply.code if reply.code >= 400 else 454,
                           f"4.7.5 TLS is required ({self.tls}) but STARTTLS was refused: "
                           f"{reply.one_line()}"), "starttls")
        elif required:
            await self._quietly_quit()
            raise SessionError(
                _local(454, f"4.7.4 TLS is required ({self.tls}) but "
                       f"{self.hostname or self.peer} does not offer STARTTLS"), "starttls")
        if self.credentials is not None:
            await self._authenticate()
        self.usable = True
        self.ready.callback(self)

    async def _authenticate(self):
        """AUTH (RFC 4954) with the credentials; never sends a secret over
        plaintext unless the credentials allow it. Failures defer (4xx):
        a refused login is the operator's to fix, not the recipients'."""
        creds = self.credentials
        who = self.hostname or self.peer
        offered = self.extensions.get("AUTH")
        if offered is None:
            self.log.info("{peer} offers no AUTH; sending without authenticating", peer=who)
            return
        if not self.encrypted and not creds.allow_plaintext:
            await self._quietly_quit()
            raise SessionError(_local(454, f"4.7.0 not sending AUTH credentials to {who} over "
                                      "an unencrypted connection (no TLS; allow it "
                                      "explicitly with --auth-plaintext)"), "AUTH")
        mech = _auth.choose_mechanism(creds, offered, self.encrypted)
        if mech is None:
            await self._quietly_quit()
            raise SessionError(_local(454, f"4.7.0 no AUTH mechanism in common with {who}: it "
                                      f"offers {offered[:100]!r}, we allow "
                                      f"{' '.join(creds.mechanisms)}"), "AUTH")
        t = self.timeouts.helo
        if mech == "PLAIN":
            reply = await self._send(f"AUTH PLAIN {_auth.plain_response(creds)}", t, "AUTH")
            if reply.code == 334:  # a server that wants the response on its own line
                reply = await self._send(_auth.plain_response(creds), t, "AUTH")
        elif mech == "LOGIN":
            reply = await self._send("AUTH LOGIN", t, "AUTH")
            if reply.code == 334:
                reply = await self._send(_auth.b64(creds.username.encode()), t, "AUTH")
                if reply.code == 334:
                    reply = await self._send(_auth.b64(creds.password.reveal().encode()), t,
                                             "AUTH")
        elif mech == "CRAM-MD5":
            reply = await self._send("AUTH CRAM-MD5", t, "AUTH")
            if reply.code == 334:
                try:
                    answer = _auth.cram_md5_response(creds, reply.text.split("\n")[0])
                except _auth.AuthError as e:
                    await self._send("*", t, "AUTH")  # cancel the exchange (RFC 4954 4)
                    await self._quietly_quit()
                    raise SessionError(_local(454, f"4.7.0 {e} ({who})"), "AUTH") from None
                reply = await self._send(answer, t, "AUTH")
        else:  # XOAUTH2
            try:
                token = await creds.token(self.clock)
            except _auth.AuthError as e:
                await self._quietly_quit()
                raise SessionError(_local(451, f"4.7.0 {e}"), "AUTH") from None
            initial = _auth.xoauth2_response(creds.username, token)
            reply = await self._send(f"AUTH XOAUTH2 {initial}", t, "AUTH")
            if reply.code == 334:  # an error report in base64; an empty line ends it
                reply = await self._send("", t, "AUTH")
        if reply.code == 235:
            self.authenticated = True
            return
        if reply.code == 334:  # still asking: we have nothing more to say
            reply = await self._send("*", t, "AUTH")
        await self._quietly_quit()
        if not (reply.is_transient or reply.is_permanent):
            raise self._unexpected(reply, "AUTH")
        raise SessionError(_local(454 if reply.is_permanent else reply.code,
                                  f"4.7.8 authentication as {creds.username} failed at {who} "
                                  f"({mech}): {reply.one_line()[:200]}"), "AUTH")

    async def _ehlo(self):
        reply = await self._send(f"EHLO {self.helo}", self.timeouts.helo, "EHLO")
        if reply.code == 250:
            self.extensions = {}
            for ln in reply.text.split("\n")[1:]:
                kw, _, arg = ln.strip().partition(" ")
                if kw:
                    self.extensions[kw.upper()] = arg
            return
        if reply.code in (500, 501, 502, 504, 550) and not self.encrypted:
            reply = await self._send(f"HELO {self.helo}", self.timeouts.helo, "HELO")
            if reply.code == 250:
                self.extensions = {}
                return
        await self._quietly_quit()
        raise SessionError(reply, "EHLO")

    async def _quietly_quit(self):
        if self._closed:
            return
        try:
            await self._send("QUIT", min(self.timeouts.helo, 10), "QUIT")
        except SessionError:
            pass  # the session is over either way
        self._abort_later()

    def _abort_later(self):
        self.usable = False
        if not self._closed and self.transport is not None:
            self.transport.loseConnection()

    # -- transactions -------------------------------------------------------

    def transaction(self, sender: str, recipients: list[str], source, size: int | None = None,
                    smtputf8: bool = False, eightbit: bool = False) -> defer.Deferred:
        """Run one mail transaction: MAIL, RCPT for each recipient, DATA.

        @param sender: the MAIL FROM address, already validated, C{""} for
            the null sender.
        @param recipients: RCPT TO addresses, already validated.
        @param source: a binary file object positioned at the message start;
            read in chunks until EOF (not closed here).
        @param size: message size in bytes, for the SIZE parameter (RFC 1870).
        @param smtputf8: the envelope needs SMTPUTF8 (RFC 6531).
        @param eightbit: the message has 8-bit bytes: C{BODY=8BITMIME} is
            sent when the server offers it (RFC 6152). To a server that does
            not, the message goes as it is (no MIME conversion).
        @return: a Deferred firing with a L{TransactionResult}; it never
            fails for server or network trouble (those are replies).
        """
        return defer.Deferred.fromCoroutine(
            self._transaction(sender, recipients, source, size, smtputf8, eightbit))

    def _unexpected(self, reply: Reply, what: str) -> SessionError:
        """A reply that no server may give here (a 2xx where 354 belongs, a
        3xx to RCPT...): the dialogue is out of step, so nothing the server
        says can be trusted any more. Never taken as a recipient's outcome."""
        self._abort()
        return SessionError(_local(421, f"4.5.0 protocol error from "
                                   f"{self.hostname or self.peer}: unexpected reply to {what}: "
                                   f"{reply.one_line()[:200]}"), what)

    async def _transaction(self, sender, recipients, source, size, smtputf8, eightbit=False):
        replies: dict[str, Reply] = {}  # final replies, recorded as soon as known
        accepted: list[str] = []
        try:
            if self._needs_rset:
                reply = await self._send("RSET", self.timeouts.helo, "RSET")
                if reply.code != 250:
                    raise SessionError(reply, "RSET")
                self._needs_rset = False
            if smtputf8 and "SMTPUTF8" not in self.extensions:
                r = _local(553, "5.6.7 the address needs SMTPUTF8 and "
                           f"{self.hostname or self.peer} does not offer it")
                return TransactionResult({rc: r for rc in recipients}, True)
            params = ""
            if size is not None and "SIZE" in self.extensions:
                params += f" SIZE={size}"
            if (eightbit or smtputf8) and "8BITMIME" in self.extensions:
                params += " BODY=8BITMIME"
            if smtputf8:
                params += " SMTPUTF8"
            commands = [f"MAIL FROM:<{sender}>{params}", *(f"RCPT TO:<{r}>" for r in recipients),
                        "DATA"]
            for c in commands:
                if "\r" in c or "\n" in c or "\0" in c:
                    raise ValueError("CR, LF or NUL in an SMTP command")
            self.transactions += 1
            pipelined = self.pipelining and "PIPELINING" in self.extensions
            if pipelined:
                group = self._expect_group(
                    [(self.timeouts.mail, "MAIL"),
                     *((self.timeouts.rcpt, "RCPT") for _ in recipients),
                     (self.timeouts.data, "DATA")])
                self.transport.write(b"".join(c.encode("utf-8") + b"\r\n" for c in commands))
                taken = [0]

                async def next_reply(command, timeout, what):
                    # Replies that arrived before a failure still count
                    # (a refused RCPT stays refused); the failure is raised
                    # where the first missing reply would be.
                    if taken[0] >= len(group.replies) and group.failure is None:
                        await group.wait()
                    if taken[0] < len(group.replies):
                        taken[0] += 1
                        return group.replies[taken[0] - 1]
                    group.failure.raiseException()
            else:
                async def next_reply(command, timeout, what):
                    return await self._send(command, timeout, what)
            mail_reply = await next_reply(commands[0], self.timeouts.mail, "MAIL")
            if mail_reply.code != 250:
                if not (mail_reply.is_transient or mail_reply.is_permanent):
                    raise self._unexpected(mail_reply, "MAIL")
                replies.update((r, mail_reply) for r in recipients)
            if not pipelined and replies:
                self._needs_rset = True
                return TransactionResult(replies, self._still_usable())
            for r, command in zip(recipients, commands[1:-1], strict=True):
                reply = await next_reply(command, self.timeouts.rcpt, "RCPT")
                if r in replies:
                    continue  # MAIL was refused: pipelined RCPT replies mean nothing
                if reply.is_positive:
                    accepted.append(r)
                elif reply.is_transient or reply.is_permanent:
                    replies[r] = reply
                else:
                    raise self._unexpected(reply, "RCPT")
            if not pipelined and not accepted:
                self._needs_rset = True
                return TransactionResult(replies, self._still_usable())
            data_reply = await next_reply("DATA", self.timeouts.data, "DATA")
            if not accepted:
                self._needs_rset = True
                if data_reply.code == 354:
                    # A broken pipelining server opened DATA with nothing to
                    # send: never end it with a dot (an empty message would be
                    # accepted); drop the connection instead.
                    self._abort()
                return TransactionResult(replies, self._still_usable())
            if data_reply.code != 354:
                if not (data_reply.is_transient or data_reply.is_permanent):
                    raise self._unexpected(data_reply, "DATA")
                self._needs_rset = True
                replies.update((r, data_reply) for r in accepted)
                return TransactionResult(replies, self._still_usable())
            final = await self._send_body(source)
            if not (final.is_positive or final.is_transient or final.is_permanent):
                raise self._unexpected(final, "end of DATA")
            replies.update((r, final) for r in accepted)
            return TransactionResult(replies, self._still_usable())
        except SessionError as e:
            for r in recipients:
                replies.setdefault(r, e.reply)
            self.usable = False
            self._abort_later()
            return TransactionResult(replies, False)

    def _still_usable(self) -> bool:
        return self.usable and not self._closed

    async def _send_empty_data(self):
        d = self._expect(self.timeouts.data_done, "end of DATA")
        self.transport.write(b".\r\n")
        await d

    async def _send_body(self, source) -> Reply:
        producer = _BodyProducer(self, source)
        self._producer = producer
        self._arm()
        done = producer.start()
        try:
            await done
        finally:
            self._producer = None
        return await self._expect(self.timeouts.data_done, "end of DATA")

    def quit(self) -> defer.Deferred:
        """Send QUIT and close the connection.

        @return: a Deferred firing (with L{None}) once the connection is
            closed; after the QUIT timeout (at most 10 s) the connection is
            aborted. It never fails.
        """
        self.usable = False
        if self._closed:
            return defer.succeed(None)
        limit = min(self.timeouts.helo, 10)
        d = self._send("QUIT", limit, "QUIT")

        def close(_):
            if not self._closed:
                self.transport.loseConnection()
                timer = self.clock.callLater(limit, self._abort)
                self.closed.addBoth(lambda _: timer.cancel() if timer.active() else None)

        d.addBoth(close)
        return d.addCallback(lambda _: _chain(self.closed))


class _ReplyGroup:
    """The replies of one pipelined group, and how it ended."""

    __slots__ = ("_d", "failure", "replies")

    def __init__(self):
        self.replies: list[Reply] = []
        self.failure: Failure | None = None
        self._d: defer.Deferred | None = None

    def wait(self) -> defer.Deferred:
        """A Deferred firing when every reply arrived or the group failed."""
        self._d = defer.Deferred()
        return self._d

    def _wake(self):
        d, self._d = self._d, None
        if d is not None:
            d.callback(None)


class _GroupSlot:
    """Stands in the session's queue of awaited replies for one command of
    a L{_ReplyGroup}, with a Deferred's C{callback}/C{errback}."""

    __slots__ = ("group", "last")

    def __init__(self, group: _ReplyGroup, last: bool):
        self.group = group
        self.last = last

    def callback(self, reply: Reply):
        self.group.replies.append(reply)
        if self.last:
            self.group._wake()

    def errback(self, failure: Failure):
        if self.group.failure is None:
            self.group.failure = failure
            self.group._wake()


def _chain(d: defer.Deferred) -> defer.Deferred:
    """A new Deferred firing (with L{None}) when C{d} fires, leaving C{d} as it is."""
    out = defer.Deferred()
    d.addBoth(lambda r: (out.callback(None), r)[1])
    return out


def _ssl_text(e: SSL.Error) -> str:
    try:
        parts = []
        for item in e.args[0]:
            parts.append(item[-1] if isinstance(item, tuple) else str(item))
        return ", ".join(parts) or "handshake failed"
    except (TypeError, IndexError, AttributeError):
        return str(e) or "handshake failed"


@implementer(interfaces.IPullProducer)
class _BodyProducer:
    """Streams the message file to the transport, dot-stuffed on the fly."""

    def __init__(self, session: ESMTPSession, source):
        self.session = session
        self.source = source
        self.stuffer = DotStuffer()
        self.done = defer.Deferred()
        self._timer = None

    def start(self) -> defer.Deferred:
        self.session.transport.registerProducer(self, False)
        return self.done

    def _arm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        t = self.session.timeouts.data_block
        self._timer = self.session.clock.callLater(t, self._timed_out, t)

    def _timed_out(self, t):
        self._timer = None
        self._finish(SessionError(_local(421, f"4.4.2 timeout after {t:g}s sending message "
                                         f"data to {self.session.hostname or self.session.peer}"),
                                  "DATA block"))
        self.session._abort()

    def resumeProducing(self):
        if self.done.called:
            return
        self._arm()
        chunk = self.source.read(CHUNK)
        while chunk:
            out = self.stuffer.feed(chunk)
            if len(chunk) < CHUNK:  # probably the end: if so, the dot goes in the same write
                chunk = self.source.read(CHUNK)
                if not chunk:
                    self.session.transport.write(out + self.stuffer.finish())
                    self._done_writing()
                    return
                out += self.stuffer.feed(chunk)
            if out:
                self.session.transport.write(out)
                return
            chunk = self.source.read(CHUNK)
        self.session.transport.write(self.stuffer.finish())
        self._done_writing()

    def _done_writing(self):
        self.session.transport.unregisterProducer()
        self._finish(None)

    def stopProducing(self):
        self.stop()

    def stop(self):
        self._finish(SessionError(_local(421, "4.4.2 connection lost while sending message data "
                                         f"to {self.session.hostname or self.session.peer}"),
                                  "DATA block"))

    def _finish(self, exc):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.done.called:
            return
        if exc is None:
            self.done.callback(None)
        else:
            self.done.errback(Failure(exc))
