"""The message body on the wire: the pull producers of
L{ESMTPSession<twisted_mailout.smtp.protocol.ESMTPSession>}.

Two ways to send a message, both streaming the message file in reads of
L{CHUNK} bytes (a message is never held whole in memory):

  - L{_BodyProducer}: after the 354 to DATA, the data dot-stuffed on the fly
    (RFC 5321 4.5.2), then the final dot;
  - L{_ChunkProducer}: with CHUNKING (RFC 3030), each read sent as one
    C{BDAT n} chunk (line ends made CRLF, no dot-stuffing), the last as
    C{BDAT n LAST}; pipelined (RFC 2920) when the transaction is, the first
    chunk then in the same write as MAIL and RCPT.

Both are C{IPullProducer}s registered on the session's transport, each
block written must be taken within C{data_block} seconds (RFC 5321
4.5.3.2.5), and both ask the transaction's C{may_finish} (the lease guard of
a shared queue) just before the end of the data goes out: when it says no,
the connection is dropped instead, so the server never takes the message.
The bytes themselves come from the sans-IO state machine
(L{ClientConnection.send_body<twisted_mailout.smtp.state.ClientConnection.send_body>},
L{ClientConnection.send_chunk<twisted_mailout.smtp.state.ClientConnection.send_chunk>}).
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.internet.base import DelayedCall
from zope.interface import implementer

from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.errors import SessionError, Stage

if TYPE_CHECKING:
    from twisted_mailout.smtp.protocol import ESMTPSession, _Pending

__all__ = ["CHUNK", "local_reply"]

CHUNK = 65536  # bytes read from the message file at a time (and the BDAT chunk size)


def local_reply(code: int, text: str) -> Reply:
    """A reply made here, not by the server.

    @param code: the reply code (a 4xx for network trouble).
    @param text: the reply text, starting with an enhanced status code.
    @return: a L{Reply} with C{local=True}.
    """
    return Reply(code, text, local=True)


class _Producer:
    """What both producers share: the data-block timer, the lease question
    before the end of the data, and how a failure reaches the session."""

    def __init__(self, session: ESMTPSession, source: IO[bytes]):
        self.session = session
        self.source = source
        self._conn = session._conn
        self._transport: Any = session.transport
        self._timer: DelayedCall | None = None
        self._done = False
        self._registered = True  # the session registers it on the transport

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()

    def _arm(self) -> None:
        t = self.session.timeouts.data_block
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(t)
        else:
            self._timer = self.session.clock.callLater(t, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        s = self.session
        t = s.timeouts.data_block
        s._abort()  # first: whoever is told may not send anything more
        self._finish(SessionError(local_reply(421, f"4.4.2 timeout after {t:g}s sending "
                                              f"message data to {s._who}"), Stage.DATA_BLOCK))

    def _refused_end(self, what: str) -> bool:
        """Whether the transaction's C{may_finish} forbids the end of the
        data (C{what}: "final dot", "BDAT LAST"); if so, the connection is
        dropped without it."""
        tx = self.session._tx
        if tx is None or tx.may_finish is None or tx.may_finish():
            return False
        s = self.session
        self._unregister()
        s._abort()  # first: nothing more may be written, and never the end
        self._finish(SessionError(local_reply(451, f"4.4.2 {what} not sent to {s._who}: the "
                                              "queue lease could not be renewed in time"),
                                  Stage.DATA_BLOCK))
        return True

    def _done_writing(self) -> None:
        self._unregister()
        self._stop_timer()
        self._done = True
        self.session._body_sent()

    def stopProducing(self) -> None:
        """C{IProducer}: the transport went away."""
        self.stop()

    def stop(self) -> None:
        """The connection went away while sending."""
        self._finish(SessionError(local_reply(421, "4.4.2 connection lost while sending "
                                              f"message data to {self.session._who}"),
                                  Stage.DATA_BLOCK))

    def cancel(self) -> None:
        """Write nothing more (the transaction was cancelled, or is over)."""
        self._stop_timer()
        if not self._done:
            self._done = True
            self._unregister()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(self, exc: SessionError) -> None:
        self._stop_timer()
        if self._done:
            return
        self._done = True
        self.session._body_failed(exc)


@implementer(interfaces.IPullProducer)
class _BodyProducer(_Producer):
    """Streams the message file to the transport after the 354 to DATA,
    dot-stuffed on the fly by the state machine
    (L{ClientConnection.send_body<twisted_mailout.smtp.state.ClientConnection.send_body>});
    the final dot goes in the same write as the end of the message."""

    def resumeProducing(self) -> None:
        """C{IPullProducer}: write the next block (or the end of the data)."""
        if self._done:
            return
        self._arm()
        conn = self._conn
        read = self.source.read
        write = self._transport.write
        chunk = read(CHUNK)
        while chunk:
            out = conn.send_body(chunk)
            if len(chunk) < CHUNK:  # probably the end: if so, the dot goes in the same write
                chunk = read(CHUNK)
                if not chunk:
                    if self._refused_end("final dot"):
                        return
                    write(out + conn.end_data())
                    self._done_writing()
                    return
                out += conn.send_body(chunk)
            if out:
                write(out)
                return
            chunk = read(CHUNK)
        if self._refused_end("final dot"):
            return
        write(conn.end_data())
        self._done_writing()


@implementer(interfaces.IPullProducer)
class _ChunkProducer(_Producer):
    """Streams the message file to the transport in BDAT chunks (RFC 3030
    2), one per read of L{CHUNK} bytes, each announced with the length of
    its bytes once their line ends are made CRLF
    (L{ClientConnection.send_chunk<twisted_mailout.smtp.state.ClientConnection.send_chunk>}).
    The read after each chunk tells whether it is the last (C{BDAT n LAST}),
    so a message of up to L{CHUNK} bytes goes in one chunk.

    L{start} writes the first chunk at once (after C{prefix}, the MAIL and
    RCPT commands of a pipelined transaction, in the same write). Pipelined,
    the producer is then registered on the transport for the next chunks,
    and stops early when the state machine says no more may go (a refused
    chunk, MAIL or every RCPT refused). Unpipelined, one chunk is written
    and the session makes a new producer after its 250 (the bytes read
    ahead are kept in the transaction, C{pending.ahead}).

    @param session: the L{ESMTPSession<twisted_mailout.smtp.protocol.ESMTPSession>}.
    @param source: the message file, positioned after what was read.
    @param pending: the session's transaction.
    @param prefix: bytes to write before the first chunk, in the same write.
    """

    def __init__(self, session: ESMTPSession, source: IO[bytes], pending: _Pending,
                 prefix: bytes = b""):
        super().__init__(session, source)
        self._pending = pending
        self._prefix = prefix
        self._registered = False

    def start(self) -> None:
        """Write the first chunk now; register for the next ones when they
        may follow at once (pipelined), else hand back to the session."""
        self._arm()
        more = self._step()
        if self._done:  # the lease guard refused BDAT LAST
            return
        if more:
            self._registered = True
            self._transport.registerProducer(self, False)
        else:
            self._done_writing()

    def halt(self) -> None:
        """No more chunks may go (a refusal came): stop, and let the
        session time the replies still owed."""
        if not self._done:
            self._done_writing()

    def resumeProducing(self) -> None:
        """C{IPullProducer}: write the next chunk (or stop: no more may go)."""
        if self._done:
            return
        self._arm()
        more = self._step()
        if not more and not self._done:
            self._done_writing()

    def _step(self) -> bool:
        """Write one chunk (reading on past chunks that convert to nothing).

        @return: whether another chunk may be written at once.
        """
        conn = self._conn
        if not conn.body_wanted():  # stopped meanwhile: only replies are owed
            return False
        pending = self._pending
        read = self.source.read
        chunk = pending.ahead
        if chunk is None:
            chunk = read(CHUNK)
        pending.ahead = None
        while True:
            ahead = read(CHUNK) if chunk else b""
            last = not ahead
            if last and self._refused_end("BDAT LAST"):
                return False
            out = conn.send_chunk(chunk, last)
            if out:
                if self._prefix:
                    out = self._prefix + out
                    self._prefix = b""
                self._transport.write(out)
                if last:
                    return False
                pending.ahead = ahead
                return conn.body_wanted()  # unpipelined: the 250 comes first
            chunk = ahead
