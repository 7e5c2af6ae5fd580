"""Message preparation at the edge: the header block, Message-ID and Date, Bcc.

Only the header block is looked at; the body is never parsed or re-encoded,
so the bytes a receiver gets are the bytes the application gave (RFC 5322).
MIME construction is left to the standard library's C{email} package.
"""

from __future__ import annotations

import email.utils
import re
import socket
from collections.abc import Iterable
from email.errors import HeaderParseError, InvalidHeaderDefect
from email.header import decode_header, make_header
from email.headerregistry import Address, HeaderRegistry

from twisted_mailout.errors import MessageError

__all__ = [
    "MessageError",
    "coerce_message",
    "control_character",
    "header_addresses",
    "header_values",
    "parse_address_list",
    "prepare_message",
    "recipients_from_headers",
    "remove_headers",
    "split_headers",
]


_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def coerce_message(message: object) -> bytes:
    """Turn what an application hands us into the bytes to queue.

    @param message: C{bytes} (or C{bytearray}, C{memoryview}); a C{str}
        (encoded as UTF-8); or an C{email.message.Message} or anything else
        with C{as_bytes()}, serialised with it. Any other type is refused
        here, at run time.
    @return: the message bytes.
    @raise MessageError: for an empty message or an unsupported type.
    """
    as_bytes = getattr(message, "as_bytes", None)
    data: bytes
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
    elif isinstance(message, str):
        data = message.encode("utf-8")
    elif callable(as_bytes):
        data = as_bytes()
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
    fields: list[tuple[str, str, int, int]] = []
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") and fields:
            name, value, first, _ = fields[-1]
            fields[-1] = (name, value + " " + line.strip().decode("utf-8", "replace"), first, i + 1)
        else:
            raw_name, _, raw_value = line.partition(b":")
            fields.append(
                (raw_name.decode("ascii").lower(), raw_value.strip().decode("utf-8", "replace"),
                 i, i + 1)
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


def remove_headers(data: bytes, names: Iterable[str]) -> bytes:
    """Remove every field named in C{names} (case-insensitive) from the
    header block, continuation lines included; the body is untouched.

    @param names: an iterable of field names.
    @return: the new message bytes.
    """
    wanted = {n.lower() for n in names}
    lines, rest = split_headers(data)
    drop: set[int] = set()
    for fname, _, first, last in _fields(lines):
        if fname in wanted:
            drop.update(range(first, last))
    if not drop:
        return data
    return b"".join(line for i, line in enumerate(lines) if i not in drop) + rest


_hostname: str | None = None


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


# Characters refused anywhere in an address field (RFC 5322 3.4 allows none of
# them; after unfolding only WSP may remain): C0 controls but TAB, DEL, C1
# controls, and the Unicode line and paragraph separators (str.splitlines
# breaks lines at them and at \x1c-\x1e and \x85).
_ADDRESS_FIELD_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_NAMES = {"\r": "CR", "\n": "LF", "\x00": "NUL"}
_registry = HeaderRegistry()


def control_character(text: str) -> str | None:
    """The first character of C{text} that may not appear in an address or
    a display name: a C0 control other than TAB (CR, LF, NUL, ...), DEL, a C1
    control, or U+2028/U+2029.

    @return: its name (C{"CR"}, C{"LF"}, C{"NUL"}, else C{"U+XXXX"}), or
        L{None} when there is none.
    """
    bad = _ADDRESS_FIELD_CONTROL.search(text)
    if bad is None:
        return None
    char = bad.group()
    return _CONTROL_NAMES.get(char, f"U+{ord(char):04X}")


def parse_address_list(value: str, field: str = "To") -> list[str]:
    """The addresses (addr-spec only) of one address-list field value, parsed
    strictly (RFC 5322 3.4, 3.6.2, 3.6.3).

    The value is refused, rather than guessed at, when it holds a control
    character (CR, LF, NUL, DEL, ...), when the standard library's RFC 5322
    parser (C{email.headerregistry}) finds it invalid, or when that parser and
    C{email.utils.getaddresses} disagree on how many addresses it holds: each
    of these is a way to smuggle an extra recipient past a reader (a bare CR
    read as a line end by an SMTP server, C{a@x.org<b@y.org>}, an unbalanced
    quote or bracket). Comments, display names (RFC 2047 encoded words
    included), groups and obsolete syntax such as a route are accepted.

    @param value: the field value, unfolded, with no RFC 2047 decoding done:
        an encoded word is never an address (RFC 2047 section 5).
    @param field: the field name, for the error message (e.g. C{"To"}).
    @return: the addr-specs (C{str}) in order, possibly empty (e.g. for
        C{"undisclosed-recipients:;"}); they are not validated as RFC 5321
        mailboxes here (L{twisted_mailout.envelope.parse_address} does that).
    @raise MessageError: for a refused value; the message names the field.
    """
    what = control_character(value)
    if what:
        raise MessageError(
            f"the {field} header field contains a control character ({what}) in "
            f"{value!r}: refused, an address may hold no CR or LF, NUL or other control "
            f"(RFC 5322 3.4)"
        )
    try:
        # Parsed as a To field whatever its name: the same grammar (address-list).
        parsed = _registry("To", value)
    except Exception as e:  # noqa: BLE001 - a parser failure is a value we cannot read
        raise MessageError(f"the {field} header field {value!r} cannot be parsed: {e}") from None
    invalid = [str(d) for d in parsed.defects if isinstance(d, InvalidHeaderDefect)]
    addresses: tuple[Address, ...] = parsed.addresses  # type: ignore[attr-defined]
    if invalid:
        raise MessageError(
            f"the {field} header field {value!r} is not a valid address list "
            f"(RFC 5322 3.4): {invalid[0]}"
        )
    found = [a.addr_spec for a in addresses]
    legacy = [a for _, a in email.utils.getaddresses([value]) if a]
    if len(found) != len(legacy) or any(a in ("", "<>") for a in found):
        raise MessageError(
            f"the {field} header field {value!r} is ambiguous: it may be read as "
            f"{found} or as {legacy}"
        )
    return found


def _raw_values(data: bytes, name: str) -> list[str]:
    """All values of field C{name} (case-insensitive), unfolded, with no
    RFC 2047 decoding."""
    lines, _ = split_headers(data)
    return [value for fname, value, _, _ in _fields(lines) if fname == name.lower()]


def header_addresses(data: bytes, names: Iterable[str]) -> list[str]:
    """The addresses in the header fields C{names} of a message, read with
    L{parse_address_list}.

    @param data: the message bytes.
    @param names: field names (C{str}) such as C{("To", "Cc", "Bcc")}, looked
        up case-insensitively, and named as given in errors.
    @return: the addr-specs (C{str}) in order of appearance, duplicates removed.
    @raise MessageError: when any of those fields holds a control character or
        is not a valid, unambiguous address list.
    """
    seen: list[str] = []
    for name in names:
        for value in _raw_values(data, name):
            for addr in parse_address_list(value, name):
                if addr not in seen:
                    seen.append(addr)
    return seen


def recipients_from_headers(data: bytes) -> list[str]:
    """Recipients for C{sendmail -t}: the addresses in To, Cc and Bcc
    (RFC 5322 3.6.3).

    @param data: the message bytes.
    @return: addresses (C{str}) in order of appearance, duplicates removed.
    @raise MessageError: a To, Cc or Bcc field holds a control character (a
        bare CR could add an SMTP command) or is not a valid, unambiguous
        address list; see L{parse_address_list}. Nothing is then to be queued.
    """
    return header_addresses(data, ("To", "Cc", "Bcc"))
