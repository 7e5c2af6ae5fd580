"""Message preparation at the edge: the header block, Message-ID and Date, Bcc.

Only the header block is looked at; the body is never parsed or re-encoded,
so the bytes a receiver gets are the bytes the application gave (RFC 5322).
MIME construction is left to the standard library's C{email} package.
"""

from __future__ import annotations

import email.utils
import re
import socket
from email.errors import HeaderParseError
from email.header import decode_header, make_header

__all__ = [
    "MessageError",
    "coerce_message",
    "header_values",
    "prepare_message",
    "recipients_from_headers",
    "remove_headers",
    "split_headers",
]


class MessageError(ValueError):
    """A message that cannot be queued (empty, not bytes, ...)."""


_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def coerce_message(message) -> bytes:
    """Turn what an application hands us into the bytes to queue.

    @param message: C{bytes}; a C{str} (encoded as UTF-8); or an
        C{email.message.Message} (serialised with C{as_bytes()}).
    @return: the message bytes.
    @raise MessageError: for an empty message or an unsupported type.
    """
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
    elif isinstance(message, str):
        data = message.encode("utf-8")
    elif hasattr(message, "as_bytes"):
        data = message.as_bytes()
    else:
        raise MessageError(
            f"message must be bytes, str or email.message.Message, not {type(message).__name__}"
        )
    if not data.strip():
        raise MessageError("the message is empty")
    return data


def split_headers(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a message into its header lines and the rest.

    @param data: the message bytes, with CRLF or LF line ends.
    @return: C{(lines, rest)} where C{lines} are the raw header lines, each
        with its line end, continuation lines kept separate and in order; and
        C{rest} is everything after them (the empty separator line and the
        body). A message whose first line is not a header field has no header
        lines: C{([], data)}.
    """
    lines: list[bytes] = []
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\n", pos)
        end = n if end < 0 else end + 1
        line = data[pos:end]
        if line in (b"\r\n", b"\n"):
            break
        if (line[:1] in (b" ", b"\t") and lines) or _FIELD_NAME.match(line):
            lines.append(line)
        else:
            break
        pos = end
    return lines, data[pos:]


def _fields(lines: list[bytes]) -> list[tuple[str, str, int, int]]:
    """Group header lines into fields: C{(name_lower, unfolded_value, first, last+1)}."""
    fields = []
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") and fields:
            name, value, first, _ = fields[-1]
            fields[-1] = (name, value + " " + line.strip().decode("utf-8", "replace"), first, i + 1)
        else:
            name, _, value = line.partition(b":")
            fields.append(
                (name.decode("ascii").lower(), value.strip().decode("utf-8", "replace"), i, i + 1)
            )
    return fields


def header_values(data: bytes, name: str) -> list[str]:
    """All values of header field C{name} (case-insensitive), unfolded and
    with RFC 2047 encoded words decoded.

    @return: a list of C{str}, possibly empty.
    """
    lines, _ = split_headers(data)
    out = []
    for fname, value, _, _ in _fields(lines):
        if fname == name.lower():
            try:
                out.append(str(make_header(decode_header(value))))
            except (ValueError, LookupError, UnicodeError, HeaderParseError):
                out.append(value)  # undecodable encoded words: keep them as they are
    return out


def remove_headers(data: bytes, names) -> bytes:
    """Remove every field named in C{names} (case-insensitive) from the
    header block, continuation lines included; the body is untouched.

    @param names: an iterable of field names.
    @return: the new message bytes.
    """
    wanted = {n.lower() for n in names}
    lines, rest = split_headers(data)
    drop = set()
    for fname, _, first, last in _fields(lines):
        if fname in wanted:
            drop.update(range(first, last))
    if not drop:
        return data
    return b"".join(line for i, line in enumerate(lines) if i not in drop) + rest


_hostname = None


def _default_domain() -> str:
    global _hostname
    if _hostname is None:
        # gethostname() asks no DNS server (getfqdn() could block).
        _hostname = socket.gethostname() or "localhost"
    return _hostname


def prepare_message(data: bytes, sender_domain: str | None = None) -> bytes:
    """Add Message-ID and Date header fields when missing (RFC 5322 3.6).

    New fields are put first, with the line ending the message already uses.
    A message with no header block gets one.

    @param data: the message bytes.
    @param sender_domain: the domain for a generated Message-ID; this host's
        name when L{None}.
    @return: the message bytes, unchanged when both fields are present.
    """
    lines, _ = split_headers(data)
    names = {f[0] for f in _fields(lines)}
    first_line = lines[0] if lines else data[: data.find(b"\n") + 1]
    eol = b"\r\n" if first_line.endswith(b"\r\n") else b"\n"
    add = []
    if "message-id" not in names:
        msgid = email.utils.make_msgid(domain=sender_domain or _default_domain())
        add.append(b"Message-ID: " + msgid.encode("ascii") + eol)
    if "date" not in names:
        add.append(b"Date: " + email.utils.formatdate(localtime=True).encode("ascii") + eol)
    if not add:
        return data
    if not lines:
        if data.startswith((b"\r\n", b"\n")):
            # An empty header section: the separator line is already there.
            return b"".join(add) + data
        # No header block at all: the whole message is body.
        return b"".join(add) + eol + data
    return b"".join(add) + data


def recipients_from_headers(data: bytes) -> list[str]:
    """Recipients for C{sendmail -t}: the addresses in To, Cc and Bcc.

    @return: addresses in order of appearance, duplicates removed.
    """
    values = []
    for name in ("to", "cc", "bcc"):
        values.extend(header_values(data, name))
    seen = []
    for _, addr in email.utils.getaddresses(values):
        if addr and addr not in seen:
            seen.append(addr)
    return seen
