"""Streaming SMTP message encoding: DATA (RFC 5321 4.5.2 transparency, 2.3.8
line ends) and BDAT chunks (RFC 3030: line ends only, no dot-stuffing).

Why not a regular expression over the whole message (as aiosmtplib does) or
per-chunk stuffing (as C{twisted.mail.smtp}'s C{transformChunk} does, wrongly
at chunk boundaries): the message is streamed from the queue file in chunks,
and no chunking may change the bytes on the wire.
"""

from __future__ import annotations

__all__ = ["DotStuffer", "LineEnds", "encode_bdat", "encode_data"]


class LineEnds:
    """Incremental line-end normaliser for BDAT (RFC 3030 2, RFC 5321 2.3.8).

    Every line end (CRLF, bare LF or bare CR) becomes CRLF, whatever the
    chunking of the input, and nothing else changes (no dot-stuffing: BDAT
    counts octets, so no byte sequence in a message can end it early). The
    bytes are those a server keeps from L{DotStuffer}'s DATA encoding of the
    same message, once it removes the stuffed dots and the final dot: a
    message that does not end with a line end gets a CRLF (as DATA must add
    before its final dot).
    """

    __slots__ = ("_any", "_bol", "_cr")

    def __init__(self) -> None:
        self._cr = False  # the previous chunk ended with CR
        self._bol = True  # the output is at the beginning of a line
        self._any = False

    def feed(self, data: bytes) -> bytes:
        """Convert one chunk of the message.

        @param data: the next bytes of the message, any length.
        @return: the bytes to send (maybe empty: a trailing CR is held back
            until the next chunk shows whether an LF follows); when C{data}
            already has CRLF line ends only, C{data} itself (no copy).
        """
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if not data:
            return b""
        self._any = True
        n = data.count(b"\n")
        if data.count(b"\r") != n or data.count(b"\r\n") != n:  # a bare CR or LF
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        self._bol = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        """The end of the message.

        @return: a CRLF if the message did not end with a line end (or a
            CR was held back), else C{b""}.
        """
        if self._cr:
            self._cr = False
            self._bol = True
            return b"\r\n"
        if self._any and not self._bol:
            self._bol = True
            return b"\r\n"
        return b""


class DotStuffer(LineEnds):
    """Incremental SMTP data encoder (RFC 5321 4.5.2 and 2.3.8).

    Every line end (CRLF, bare LF or bare CR) becomes CRLF (L{LineEnds}) and
    every line starting with "." gets one more "." -- whatever the chunking
    of the input, so no byte sequence in a message can end DATA early (the
    SMTP-smuggling class of bugs, CVE-2023-51764).
    """

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        """Encode one chunk of the message.

        @param data: the next bytes of the message, any length.
        @return: the bytes to send (maybe empty: a trailing CR is held back
            until the next chunk shows whether an LF follows).
        """
        at_line_start = self._bol
        data = super().feed(data)
        if at_line_start and data.startswith(b"."):
            data = b"." + data
        return data.replace(b"\n.", b"\n..")

    def finish(self) -> bytes:
        """The end of the data.

        @return: a CRLF if the message did not end with a line end, then the
            terminating C{.CRLF}.
        """
        return super().finish() + b".\r\n"


def encode_data(message: bytes) -> bytes:
    """The whole DATA payload for C{message}, terminating dot included.

    @param message: the message bytes (any line ends).
    @return: the bytes to send after the 354 reply.
    """
    s = DotStuffer()
    return s.feed(message) + s.finish()


def encode_bdat(message: bytes) -> bytes:
    """The whole message as BDAT sends it (line ends made CRLF).

    @param message: the message bytes (any line ends).
    @return: the octets of the BDAT chunks, concatenated.
    """
    s = LineEnds()
    return s.feed(message) + s.finish()
