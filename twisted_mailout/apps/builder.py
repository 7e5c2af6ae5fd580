"""Build messages with the standard library's C{email} package.

L{build_message} returns an C{email.message.EmailMessage}: plain text, HTML
with a text alternative, attachments (from paths or bytes, type guessed),
inline images referenced by Content-ID (C{multipart/related}, RFC 2387,
RFC 2392), Reply-To, Cc, Bcc, custom header fields, non-ASCII display names
and subjects (RFC 2047), internationalised domains (A-labels, RFC 5890), and
a generated Message-ID and Date (RFC 5322 3.6). The MIME structure, encodings
and folding are the standard library's; this module only adds what it lacks:
A-label domains in address fields and the choice of structure.
"""

from __future__ import annotations

import email.policy
import email.utils
import mimetypes
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any, cast

from twisted_mailout.envelope import AddressError, parse_address
from twisted_mailout.message import MessageError, control_character, parse_address_list

__all__ = [
    "Attachment",
    "build_message",
    "format_address",
    "parse_display_address",
]


#: One address as the builder takes it: C{"Name <local@domain>"} or
#: C{"local@domain"}, a C{(display name, address)} pair, or an
#: C{email.headerregistry.Address}.
AddressInput = str | tuple[str, str] | Address
#: One address or a list of them.
Addresses = AddressInput | Iterable[AddressInput]

@dataclass(frozen=True)
class Attachment:
    """An attachment or inline part.

    @ivar filename: the file name offered to the reader (RFC 2183).
    @ivar data: the content (C{bytes}).
    @ivar content_type: C{"maintype/subtype"}; guessed from C{filename} when
        L{None} (C{application/octet-stream} when unknown).
    @ivar cid: the Content-ID of an inline part, without angle brackets; the
        HTML refers to it as C{cid:...} (RFC 2392).
    """

    filename: str
    data: bytes
    content_type: str | None = None
    cid: str | None = None

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], content_type: str | None = None,
                  filename: str | None = None, cid: str | None = None) -> Attachment:
        """Read C{path}. @raise OSError: unreadable."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        return cls(filename or os.path.basename(path), data, content_type, cid)

    def mime_type(self) -> tuple[str, str]:
        """C{(maintype, subtype)}. @raise MessageError: a malformed type."""
        ctype = self.content_type or mimetypes.guess_type(self.filename)[0] \
            or "application/octet-stream"
        maintype, sep, subtype = ctype.partition("/")
        if not (sep and maintype and subtype) or any(c in ctype for c in " \r\n;"):
            raise MessageError(f"bad content type {ctype!r} for {self.filename!r}")
        return maintype.lower(), subtype.lower()


def parse_display_address(value: AddressInput) -> tuple[str, str]:
    """C{(display_name, addr_spec)} of C{"Name <a@b>"}, C{"a@b"},
    a C{(name, addr)} pair or an C{email.headerregistry.Address}.

    @raise AddressError: not exactly one valid address (RFC 5321 4.1.2), a
        control character (CR, LF, NUL, ...) anywhere, or an address list
        that could be read as more than one address (RFC 5322 3.4).
    """
    if isinstance(value, Address):
        name, addr = value.display_name, value.addr_spec
    elif isinstance(value, tuple) and len(value) == 2:
        name, addr = value
    elif isinstance(value, str):
        try:
            found = parse_address_list(value, "address")  # controls, smuggled addresses
        except MessageError as e:
            raise AddressError(str(e).replace("the address header field", "address")) from None
        pairs = email.utils.getaddresses([value])
        if len(found) != 1 or len(pairs) != 1 or not pairs[0][1]:
            raise AddressError(f"{value!r} is not one address")
        name, addr = pairs[0]
    else:
        raise AddressError(f"an address must be a str, a (name, address) pair or an "
                           f"email.headerregistry.Address, not {type(value).__name__}")
    for part in (name or "", addr or ""):
        what = control_character(part) if isinstance(part, str) else None
        if what:
            raise AddressError(f"{part!r} in {value!r} contains a control character ({what})")
    try:
        parse_address(addr)
    except AddressError as e:
        raise AddressError(f"{value!r} is not a valid address: {e}") from None
    return name or "", addr


def _address(value: AddressInput, smtputf8: bool) -> Address:
    name, addr = parse_display_address(value)
    a = parse_address(addr)
    if not smtputf8 and not a.local.isascii():
        raise AddressError(f"{addr!r} has a non-ASCII local part: it needs SMTPUTF8 "
                           "(build_message(..., smtputf8=True)) and a server offering it")
    domain = a.domain if smtputf8 else a.ascii_domain
    local = a.local
    if local.startswith('"') and local.endswith('"'):
        local = local[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return Address(display_name=name, username=local, domain=domain)


def format_address(value: AddressInput, smtputf8: bool = False) -> str:
    """An address field value: C{"Name <local@a-label.domain>"}, the domain in
    its A-label (IDNA) form unless C{smtputf8}.

    @raise AddressError: see L{parse_display_address}.
    """
    return str(_address(value, smtputf8))


def _addresses(values: AddressInput | Iterable[AddressInput] | None,
               smtputf8: bool) -> tuple[Address, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, Address)) or (
            isinstance(values, tuple) and len(values) == 2 and isinstance(values[1], str)
            and "@" in values[1] and not isinstance(values[0], (Address, tuple))
            and "@" not in (values[0] or "")):
        values = [cast(AddressInput, values)]
    return tuple(_address(v, smtputf8) for v in values)


def _as_attachment(item: Any, inline: bool) -> Attachment:
    if isinstance(item, Attachment):
        return item
    if isinstance(item, (str, os.PathLike)):
        return Attachment.from_path(item)
    if isinstance(item, tuple) and 2 <= len(item) <= 3:
        first, data = item[0], item[1]
        ctype = item[2] if len(item) == 3 else None
        if isinstance(data, (bytes, bytearray, memoryview)):
            if inline:  # (cid, bytes[, type]): the file name is the cid
                return Attachment(str(first), bytes(data), ctype, cid=str(first))
            return Attachment(str(first), bytes(data), ctype)
        if inline and isinstance(data, (str, os.PathLike)):  # (cid, path[, type])
            return Attachment.from_path(data, ctype, cid=str(first))
    kind = "an inline part" if inline else "an attachment"
    raise MessageError(f"{kind} must be a path, an Attachment or a (name, bytes[, type]) "
                       f"tuple, not {item!r:.60}")


def _list_unsubscribe(msg: EmailMessage, url: str | None, mailto: str | None) -> None:
    """Add C{List-Unsubscribe} (RFC 2369 3.2) and, for an HTTPS URL,
    C{List-Unsubscribe-Post} (RFC 8058 3.1).

    @raise MessageError: a URL that is not C{https://}, or a value with
        spaces, controls or angle brackets.
    """
    uris = []
    if url is not None:
        if not url.lower().startswith("https://") or len(url) <= len("https://"):
            raise MessageError(f"unsubscribe_url must be an https:// URL (RFC 8058 3.1), "
                               f"not {url!r}")
        uris.append(url)
    if mailto is not None:
        uri = mailto if mailto.lower().startswith("mailto:") else "mailto:" + mailto
        if "@" not in uri:
            raise MessageError(f"unsubscribe_mailto must be an address, not {mailto!r}")
        uris.append(uri)
    for uri in uris:
        if not uri.isascii() or any(c.isspace() or ord(c) < 32 or c in "<>\"" for c in uri):
            raise MessageError(f"not usable in List-Unsubscribe: {uri!r} (spaces, controls, "
                               "quotes and angle brackets must be percent-encoded)")
    if uris:
        msg["List-Unsubscribe"] = ", ".join(f"<{u}>" for u in uris)
    if url is not None:
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"


def build_message(*, sender: AddressInput, to: Addresses = (), subject: str = "",
                  text: str | None = None, html: str | None = None, cc: Addresses = (),
                  bcc: Addresses = (), reply_to: Addresses | None = None,
                  attachments: Iterable[Any] = (), inline: Iterable[Any] = (),
                  headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
                  message_id: str | bool = True, date: bool | datetime.datetime = True,
                  smtputf8: bool = False, unsubscribe_url: str | None = None,
                  unsubscribe_mailto: str | None = None) -> EmailMessage:
    """Build a message.

    @param sender: the From field: C{"Name <addr>"}, C{"addr"}, a C{(name,
        addr)} pair or an C{email.headerregistry.Address}.
    @param to: one address (as C{sender}) or a list of them; likewise
        C{cc}, C{bcc} and C{reply_to}. Bcc is a field of the returned message:
        L{twisted_mailout.apps.mailer.Mailer.send} puts its addresses in the envelope
        and removes it from the bytes.
    @param subject: the Subject (any Unicode; RFC 2047 encoded as needed).
    @param text: the plain-text body.
    @param html: the HTML body; with C{text}, a C{multipart/alternative}
        (RFC 2046 5.1.4) of both.
    @param attachments: paths, L{Attachment}s or C{(filename, bytes[,
        content_type])} tuples; the type is guessed from the file name.
    @param inline: parts the HTML shows by Content-ID: L{Attachment}s with
        C{cid}, or C{(cid, bytes_or_path[, content_type])} tuples; the HTML
        refers to C{cid:CID}. They make the HTML part C{multipart/related}.
    @param headers: more fields: a dict or a list of C{(name, value)} pairs.
    @param message_id: C{True} to generate a Message-ID with the sender's
        domain, a string to use, C{False} for none (the queue adds one).
    @param date: C{True} for now, a C{datetime}, or C{False} for none.
    @param smtputf8: allow non-ASCII local parts and keep U-label domains
        (RFC 6532; serialise with C{email.policy.SMTPUTF8}, deliver to servers
        offering SMTPUTF8).
    @param unsubscribe_url: an C{https://} URL that unsubscribes the
        recipient when POSTed to: written into C{List-Unsubscribe} (RFC 2369)
        with C{List-Unsubscribe-Post: List-Unsubscribe=One-Click} (RFC 8058
        one-click unsubscribe, which Gmail and Yahoo ask of bulk senders).
        Both fields are signed when the daemon signs with DKIM.
    @param unsubscribe_mailto: an address (or C{mailto:} URI) that
        unsubscribes by mail, also listed in C{List-Unsubscribe}.
    @return: an C{email.message.EmailMessage} with C{email.policy.SMTP}
        (7-bit transfer encodings: the bytes are ASCII) or C{SMTPUTF8}:
        C{as_bytes()} gives CRLF line ends.
    @raise AddressError: a bad address. @raise MessageError: no body, a bad
        attachment or inline part, an inline part without HTML.
    @raise ValueError: a header field with CR or LF (header injection).
    @raise OSError: an attachment path cannot be read.
    """
    if text is None and html is None:
        raise MessageError("a message needs text=, html= or both")
    # 7bit: non-ASCII bodies are quoted-printable or base64, so the message
    # passes servers without 8BITMIME (RFC 6152) unchanged.
    policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP.clone(cte_type="7bit")
    msg = EmailMessage(policy=policy)
    from_addr = _address(sender, smtputf8)
    msg["From"] = from_addr
    for name, values in (("To", to), ("Cc", cc), ("Bcc", bcc), ("Reply-To", reply_to)):
        addrs = _addresses(values, smtputf8)
        if addrs:
            msg[name] = addrs
    if subject:
        msg["Subject"] = subject
    if date is True:
        msg["Date"] = email.utils.formatdate(localtime=True)
    elif date:
        msg["Date"] = email.utils.format_datetime(date)
    if message_id is True:
        msg["Message-ID"] = email.utils.make_msgid(
            domain=parse_address(from_addr.addr_spec).ascii_domain)
    elif message_id:
        msg["Message-ID"] = message_id
    _list_unsubscribe(msg, unsubscribe_url, unsubscribe_mailto)
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
    for name, value in items:
        if not isinstance(name, str) or not name.isascii() or ":" in name or not name.strip():
            raise ValueError(f"bad header field name {name!r}")
        msg[name] = value
    inline_parts = [_as_attachment(i, True) for i in inline]
    if inline_parts and html is None:
        raise MessageError("inline parts are shown by the HTML: give html=")
    for part in inline_parts:
        if not part.cid:
            raise MessageError(f"inline part {part.filename!r} has no Content-ID (cid)")
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
            # the text/html alternative just added (a multipart's payload is its parts)
            parts = msg.get_payload()
            html_part: EmailMessage | None = cast(EmailMessage, parts[-1])  # type: ignore[index]
        else:
            html_part = None
    else:
        msg.set_content(html, subtype="html")
        html_part = msg
    for part in inline_parts:
        assert html_part is not None  # inline parts need html= (checked above)
        maintype, subtype = part.mime_type()
        html_part.add_related(part.data, maintype=maintype, subtype=subtype,
                              cid=f"<{part.cid}>", filename=part.filename,
                              disposition="inline")
    for item in attachments:
        att = _as_attachment(item, False)
        maintype, subtype = att.mime_type()
        msg.add_attachment(att.data, maintype=maintype, subtype=subtype,
                           filename=att.filename)
    return msg
