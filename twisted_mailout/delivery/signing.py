"""Signing queued mail once, before its first attempt (DKIM, RFC 6376).

The scheduler asks its signer for the signature of a message the first time
the message is due, keeps the returned header fields in the message's state
(L{QueueEntry.dkim}, saved durably before the attempt), and sends them in
front of the stored bytes on every attempt: every retry and every destination
gets the same signed bytes, and the message file itself is never rewritten.

The signer is any object with C{sign(message: bytes, sender: str) -> bytes}
(L{twisted_mailout.dkim.Signer}); it raises an error carrying the reason when
the message cannot be signed, and the scheduler defers the message with that
reason rather than send it unsigned.
"""

from __future__ import annotations

from typing import IO, Protocol

from twisted_mailout.queue.interface import IQueueStore
from twisted_mailout.queue.model import QueueEntry

__all__ = ["MessageSigner", "PrefixedBody", "signature_for"]


class MessageSigner(Protocol):
    """What the scheduler needs of a signer."""

    def sign(self, message: bytes, sender: str | None = None) -> bytes:
        """The header fields to put in front of C{message} (CRLF line ends),
        C{b""} when none applies.

        @param message: the message as queued (LF or CRLF line ends).
        @param sender: the envelope sender (C{""} for the null sender).
        @raise Exception: the message cannot be signed (its text is the
            reason given in the deferral).
        """


def signature_for(store: IQueueStore, entry: QueueEntry, signer: MessageSigner) -> str:
    """Blocking: read the message of C{entry} and sign it.

    @param store: the queue store holding it.
    @param entry: the queued message.
    @param signer: the L{MessageSigner}.
    @return: the signature header fields as text (C{""} when no key
        applies), for L{QueueEntry.dkim}.
    @raise OSError: the message cannot be read.
    @raise Exception: whatever the signer raises (it cannot be signed).
    """
    with store.open_body(entry) as f:
        data = f.read()
    return signer.sign(data, entry.sender).decode("ascii")


class PrefixedBody:
    """A message stream with header fields in front (the signature): what
    the SMTP session's body producer reads (C{read}, C{close}).

    @param prefix: bytes sent first.
    @param body: the stored message, positioned at its first byte; closed
        with this stream.
    """

    def __init__(self, prefix: bytes, body: IO[bytes]) -> None:
        self._prefix = prefix
        self._body = body

    def read(self, n: int = -1) -> bytes:
        """Up to C{n} bytes (all that is left for a negative C{n})."""
        if self._prefix:
            if n < 0:
                out, self._prefix = self._prefix + self._body.read(), b""
                return out
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return self._body.read(n)

    def close(self) -> None:
        """Close the stored message."""
        self._body.close()

    def __enter__(self) -> PrefixedBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
