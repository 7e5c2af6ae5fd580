"""The message body on the wire: the pull producers of
L{ESMTPSession<twisted_mailout.smtp.protocol.ESMTPSession>}.

Two ways to send a message, both streaming the message file in reads of
L{CHUNK} bytes (a message is never held whole in memory):

  - L{_BodyProducer}: after the 354 to DATA, the data dot-stuffed on the fly
    (RFC 5321 4.5.2), then the final dot;
  - L{_ChunkProducer}: with CHUNKING (RFC 3030), chunks of up to
    L{BDAT_CHUNK} bytes read, each sent as one C{BDAT n} (line ends made
    CRLF, no dot-stuffing), the last as C{BDAT n LAST}; a small message in the same
    write as MAIL and RCPT when they are pipelined (RFC 2920).

The DATA producer is an C{IPullProducer} registered on the session's
transport; the BDAT one writes one chunk each time it is started. Each block
written must be taken within C{data_block} seconds (RFC 5321 4.5.3.2.5),
and both ask the transaction's C{may_finish} (the lease guard of
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

__all__ = ["BDAT_CHUNK", "CHUNK", "INLINE", "local_reply"]

CHUNK = 65536  # bytes read from the message file at a time (and the BDAT chunk size)

#: The bytes of one BDAT chunk at most (in reads of L{CHUNK}; the line
#: ends made CRLF may add to it): each chunk waits for the reply to the one
#: before (see L{_ChunkProducer}).
BDAT_CHUNK = 4 * CHUNK

#: The largest write (MAIL, RCPT, C{BDAT n LAST} and the message) sent
#: without waiting for the replies to MAIL and RCPT: one a server reads in
#: one go (Postfix's smtpd reads 4 KiB at a time). See L{_ChunkProducer}.
INLINE = 3840


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
    """Sends the message file in BDAT chunks (RFC 3030 2) of L{BDAT_CHUNK}
    bytes read (in reads of L{CHUNK}), each announced with the length once
    their line ends are made CRLF
    (L{ClientConnection.send_chunk<twisted_mailout.smtp.state.ClientConnection.send_chunk>}).
    The read after each chunk tells whether it is the last (C{BDAT n LAST}),
    so a message of up to L{BDAT_CHUNK} bytes goes in one chunk.

    A chunk goes only once every reply owed is in, except that the whole
    transaction goes in one write (MAIL, RCPT and C{BDAT n LAST}, pipelined)
    when it is at most L{INLINE} bytes. The reason is Nagle's algorithm at
    the server: a server that answers part of the pipeline while the data
    is still coming (Postfix's smtpd flushes its replies whenever it has
    read all it was sent) holds each later reply until the earlier ones are
    acknowledged, and a client with nothing more to send acknowledges only
    when its delayed-ACK timer fires (40 ms on Linux). Measured against
    Postfix: 44 ms a transaction instead of 1 to 3 for messages of 4 KB and
    more sent in one pipelined write, and for messages of several chunks
    sent back to back. Data written after each reply carries its
    acknowledgement, as DATA's body does after the 354. The cost is one
    round trip per chunk, hence chunks larger than the reads of DATA.

    One chunk is written per L{start} (the session makes a new producer on
    each L{SendBody<twisted_mailout.smtp.state.SendBody>}); a chunk is at
    most L{BDAT_CHUNK} bytes read, so the memory held is bounded. Between
    producers the blocks read ahead wait in C{pending.ahead}.

    @param session: the L{ESMTPSession<twisted_mailout.smtp.protocol.ESMTPSession>}.
    @param source: the message file, positioned after what was read.
    @param pending: the session's transaction.
    @param prefix: MAIL and RCPT of a pipelined transaction, written first
        (with the message when it fits in L{INLINE} bytes).
    """

    def __init__(self, session: ESMTPSession, source: IO[bytes], pending: _Pending,
                 prefix: bytes = b""):
        super().__init__(session, source)
        self._pending = pending
        self._prefix = prefix
        self._registered = False

    def start(self) -> None:
        """Write the next chunk now (or, pipelined and over L{INLINE}, MAIL
        and RCPT alone), then hand back to the session to await the reply."""
        self._arm()
        self._step()
        if not self._done:  # else the lease guard refused BDAT LAST
            self._done_writing()

    def halt(self) -> None:
        """No more chunks may go (a refusal came): stop, and let the
        session time the replies still owed."""
        if not self._done:
            self._done_writing()

    def resumeProducing(self) -> None:
        """C{IPullProducer} (never registered: one chunk per L{start})."""

    def _step(self) -> None:
        """Write one chunk (reading on past chunks that convert to nothing)."""
        conn = self._conn
        if not conn.body_wanted() or (conn.awaiting() and not self._prefix):
            return
        held = self._pending.ahead
        read = self.source.read
        while True:
            # Reads of CHUNK bytes up to BDAT_CHUNK, and one more to see
            # whether the message goes on (large reads cost an mmap each).
            parts = []
            size = 0
            block = held.pop(0) if held else read(CHUNK)
            while block and size < BDAT_CHUNK:
                parts.append(block)
                size += len(block)
                block = held.pop(0) if held else read(CHUNK)
            last = not block
            chunk = parts[0] if len(parts) == 1 else b"".join(parts)
            if self._prefix and not (last and self._inline(chunk)):
                # MAIL and RCPT alone; the chunk after their replies
                self._transport.write(self._prefix)
                self._prefix = b""
                held[:0] = [*parts, block] if block else parts
                return
            if last and self._refused_end("BDAT LAST"):
                return
            out = conn.send_chunk(chunk, last)
            if out:
                if self._prefix:
                    out = self._prefix + out
                    self._prefix = b""
                self._transport.write(out)
                if not last:
                    held.insert(0, block)
                return
            if last:  # (send_chunk returns bytes for LAST: not reached)
                return
            held.insert(0, block)

    def _inline(self, chunk: bytes) -> bool:
        """Whether C{chunk}, the whole message, goes in the first write
        with MAIL and RCPT (at most L{INLINE} bytes in all)."""
        crlf = chunk.count(b"\r\n")
        # the converted size at most: bare CR and LF doubled, a final CRLF
        size = len(chunk) + chunk.count(b"\r") + chunk.count(b"\n") - 2 * crlf + 2
        return len(self._prefix) + size + 24 <= INLINE
