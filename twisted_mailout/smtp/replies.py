"""SMTP reply parsing and encoding (RFC 5321 4.2, 4.5.3.1.5), without I/O.

L{ReplyParser} turns the bytes a server sends into L{Reply} values, one
complete (possibly multi-line) reply at a time, and keeps the byte offset in
the stream where each reply began: the state machine compares it with the
offset at which the command it would answer was sent (the reply-before-command
check). L{encode_reply} is the inverse, shared by the tests and test servers.
"""

from __future__ import annotations

from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.errors import MalformedReply

__all__ = ["MAX_LINE", "MAX_REPLY_LINES", "ReplyParser", "encode_reply"]

MAX_LINE = 4096  # bytes in one reply line (RFC 5321 4.5.3.1.5 says 512; be lenient)
MAX_REPLY_LINES = 200  # lines in one multi-line reply


class ReplyParser:
    """Bytes in, replies out.

    Lines end with CRLF or a bare LF. A line is a three-digit code whose
    first digit is 2 to 5, then a space (last line), a hyphen (more lines
    follow) or nothing (RFC 5321 4.2.1); every line of one reply has the same
    code. Limits: L{MAX_LINE} bytes per line (without its line end) and
    L{MAX_REPLY_LINES} lines per reply.

    @ivar received: the number of bytes fed so far (C{int}).
    """

    __slots__ = ("_buffer", "_consumed", "_lines", "_max_line", "_max_lines", "_start",
                 "received")

    def __init__(self, max_line: int = MAX_LINE, max_lines: int = MAX_REPLY_LINES):
        """
        @param max_line: the longest reply line accepted, in bytes.
        @param max_lines: the most lines in one reply.
        """
        self._max_line = max_line
        self._max_lines = max_lines
        self._buffer = b""
        self._lines: list[bytes] = []
        self._consumed = 0  # stream offset of _buffer's first byte
        self._start = 0  # stream offset of the current reply's first line
        self.received = 0

    def feed(self, data: bytes) -> None:
        """Add received bytes; parse them with L{next_reply}.

        @param data: the bytes as received, any chunking.
        """
        self.received += len(data)
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a returned reply (the buffer
        and any partial multi-line reply), in bytes."""
        return len(self._buffer) + sum(len(ln) + 1 for ln in self._lines)

    def next_reply(self) -> tuple[Reply, int] | None:
        """Parse the next complete reply.

        @return: C{(reply, start)} where C{start} is the stream offset (in
            bytes from the first byte ever fed) of the reply's first line; or
            L{None} when more bytes are needed.
        @raise MalformedReply: the bytes are not a valid reply, or break a
            limit. The parser is then unusable.
        """
        while True:
            buf = self._buffer
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > self._max_line + 1:  # + 1: its CR may come before the LF
                    raise MalformedReply(f"reply line longer than {self._max_line} bytes")
                return None
            line = buf[:i]
            self._buffer = buf[i + 1 :]
            if not self._lines:
                self._start = self._consumed
            self._consumed += i + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max_line:
                raise MalformedReply(f"reply line longer than {self._max_line} bytes")
            if (len(line) < 3 or not line[:3].isdigit() or line[:1] not in b"2345"
                    or (len(line) > 3 and line[3:4] not in b" -")):
                raise MalformedReply(f"malformed reply line {line[:80]!r}")
            lines = self._lines
            if lines and line[:3] != lines[0][:3]:
                raise MalformedReply("reply code changed inside a multi-line reply")
            lines.append(line)
            if len(lines) > self._max_lines:
                raise MalformedReply(f"multi-line reply longer than {self._max_lines} lines")
            if line[3:4] == b"-":
                continue
            self._lines = []
            if len(lines) == 1:
                text = line[4:].decode("utf-8", "replace")
            else:
                text = "\n".join(ln[4:].decode("utf-8", "replace") for ln in lines)
            return Reply(int(line[:3]), text), self._start

    def discard(self) -> int:
        """Drop every byte received but not yet returned as a reply (the
        STARTTLS buffer guard, CVE-2011-0411: what a server sends after its
        220 and before the handshake can only be an injection).

        @return: the number of bytes dropped.
        """
        n = self.pending
        self._consumed += len(self._buffer)
        self._buffer = b""
        self._lines = []
        return n


def encode_reply(code: int | Reply, text: str = "") -> bytes:
    """The wire form of a reply: one line per line of C{text}, the code on
    each, hyphens on all but the last (RFC 5321 4.2.1).

    @param code: a reply code (100 to 599), or a L{Reply} (then C{text} is
        ignored).
    @param text: the text, lines separated by C{"\\n"}; may be empty.
    @return: the bytes, CRLF line ends.
    @raise ValueError: a code outside 100-599, or CR in the text.
    """
    if isinstance(code, Reply):
        number, text = code.code, code.text
    else:
        number = code
    if not 100 <= number <= 599:
        raise ValueError(f"bad reply code {number!r}")
    if "\r" in text:
        raise ValueError("CR in reply text")
    lines = text.split("\n")
    out = []
    for i, ln in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{number}{sep}{ln}" if ln or sep == "-" else f"{number}")
    return "".join(ln + "\r\n" for ln in out).encode("utf-8")
