"""C{sendgrid://}: SendGrid's v3 Mail Send API (C{POST /v3/mail/send}).

SendGrid takes a structured JSON document, not a MIME message, and builds
the MIME message itself, so the message is converted (L{sendgrid_payload},
in the reactor's thread pool):

- C{personalizations}: the envelope recipients. Those the C{To} header names
  go in C{to}, those C{Cc} names in C{cc}, with the header's display names;
  every other envelope recipient (a Bcc) goes in C{bcc}. When no envelope
  recipient is in C{To}, each recipient gets a personalization of its own
  with C{to} set to itself (SendGrid needs a C{to}), so no address is shown
  to another recipient.
- C{from}: the first address of C{From} (with its display name); the
  envelope sender when there is no C{From}.
- C{reply_to} (one address) or C{reply_to_list} (several), from C{Reply-To}.
- C{subject}: the decoded C{Subject}; left out when the message has none
  (SendGrid then refuses it: bounced).
- C{content}: the first C{text/plain} and the first C{text/html} part that
  are not attachments, decoded to text (C{text/plain} first, as SendGrid
  requires); a message with neither gets a C{text/plain} body of one space.
- C{attachments}: every other leaf part (and every attached
  C{message/rfc822} as a whole), base64, with its type, file name (C{partN.EXT}
  when it has none), disposition (C{inline} when it says so or has a
  C{Content-ID}) and C{content_id}; empty parts are left out.
- C{headers}: the other header fields, decoded and unfolded, the first of
  each name, except those SendGrid sets or refuses (C{To}, C{Cc}, C{Bcc},
  C{From}, C{Subject}, C{Reply-To}, C{Content-*}, C{MIME-Version},
  C{Received}, C{DKIM-Signature}, C{X-SG-ID}, C{X-SG-EID}) and C{Date},
  C{Sender}, C{Return-Path}.

What does not survive: the MIME structure and encodings (SendGrid rebuilds
them, in UTF-8), header order, repeated fields of one name, C{Date},
C{Sender}, C{Return-Path} and the envelope sender (SendGrid's bounce address
is used), DKIM signatures (SendGrid signs), text parts after the first of
each type (sent as attachments), the preamble and epilogue, and C{To}/C{Cc}
as written when they name addresses that are not envelope recipients.

The API key comes from C{api_key=}, the first line of C{api_key_file=} or
the C{SENDGRID_API_KEY} environment variable; it is never in a URL, C{repr},
error or log.

| SendGrid answer | status | reply |
| --- | --- | --- |
| 202 | delivered | C{250 2.0.0 Ok X-MESSAGE-ID} |
| 400 (its error list in the text) | bounced | 554 5.6.0 |
| 403 (e.g. a sender identity not verified) | bounced | 550 5.7.1 |
| 413 | bounced | 552 5.3.4 |
| 401 (the key) | deferred | 451 4.7.0 |
| 429 | deferred | 451 4.7.0 |
| 5xx | deferred | 451 4.3.0 |
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import json
import mimetypes
import os
from collections.abc import Iterator
from email.utils import getaddresses
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from twisted_mailout.apps.base import Envelope
from twisted_mailout.apps.httpapi import (
    HTTPAnswer,
    HTTPAPIDelivery,
    HTTPRequest,
    by_status,
    one_line,
)
from twisted_mailout.envelope import Reply
from twisted_mailout.errors import ConfigError
from twisted_mailout.message import MessageError

__all__ = ["DEFAULT_ENDPOINT", "SendGridDelivery", "sendgrid_payload"]

#: SendGrid's API (C{https://api.eu.sendgrid.com} for EU subusers).
DEFAULT_ENDPOINT = "https://api.sendgrid.com"
#: The path of Mail Send.
SEND_PATH = "/v3/mail/send"
#: The environment variable holding the API key.
KEY_VARIABLE = "SENDGRID_API_KEY"

#: Header fields not passed in C{headers} (lower case): SendGrid sets or
#: refuses them, or the conversion carries them elsewhere.
NOT_PASSED = frozenset({
    "to", "cc", "bcc", "from", "subject", "reply-to", "content-type",
    "content-transfer-encoding", "content-disposition", "content-id",
    "content-description", "mime-version", "received", "dkim-signature", "x-sg-id",
    "x-sg-eid", "date", "sender", "return-path",
})


def _addresses(msg: email.message.Message, name: str) -> list[tuple[str, str]]:
    """C{(display name, address)} pairs of every C{name} field."""
    values = [str(v) for v in msg.get_all(name, [])]
    return [(n, a) for n, a in getaddresses(values) if a]


def _person(name: str, address: str) -> dict[str, str]:
    return {"email": address, "name": name} if name else {"email": address}


def _text(part: email.message.Message) -> str:
    """A text part's content, decoded (a charset Python does not know is
    read as UTF-8, with replacement characters)."""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, UnicodeError, KeyError):
        raw = part.get_payload(decode=True)
        content = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    return content.replace("\r\n", "\n") if isinstance(content, str) else ""


def _leaves(part: email.message.Message) -> Iterator[email.message.Message]:
    """The parts that carry content, in order; an attached message
    (C{message/*}) is one leaf, not walked into."""
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for sub in part.get_payload():
            if isinstance(sub, email.message.Message):
                yield from _leaves(sub)
    else:
        yield part


def _attachment(part: email.message.Message, number: int) -> dict[str, str] | None:
    """One C{attachments} item, or L{None} for an empty part."""
    ctype = part.get_content_type()
    data = b""
    inner = part.get_payload()
    if (part.get_content_maintype() == "message" and isinstance(inner, list) and inner
            and isinstance(inner[0], email.message.Message)):
        data = inner[0].as_bytes()
    else:
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            data = payload
    if not data:
        return None
    filename = part.get_filename()
    if not filename:
        filename = f"part{number}{mimetypes.guess_extension(ctype) or '.bin'}"
    cid = (part.get("Content-ID") or "").strip().strip("<>")
    disposition = part.get_content_disposition()
    item = {"content": base64.b64encode(data).decode("ascii"), "type": ctype,
            "filename": one_line(str(filename), 255),
            "disposition": "inline" if disposition == "inline" or (cid and disposition is None)
            else "attachment"}
    if cid:
        item["content_id"] = cid
    return item


def sendgrid_payload(sender: str, recipients: list[str], data: bytes) -> dict[str, Any]:
    """Convert a message into a Mail Send request body (see the module
    docstring for what goes where and what is lost).

    @param sender: the envelope sender, C{""} for the null sender (used for
        C{from} only when the message has no C{From}).
    @param recipients: the envelope recipients, at most 1,000, no duplicates.
    @param data: the message (RFC 5322 bytes).
    @return: the JSON-ready request body.
    @raise MessageError: neither a C{From} address nor an envelope sender.
    """
    msg = email.message_from_bytes(data, policy=email.policy.default)
    senders = _addresses(msg, "from")
    if senders:
        from_ = _person(*senders[0])
    elif sender:
        from_ = {"email": sender}
    else:
        raise MessageError("sendgrid:// needs a From address or an envelope sender")
    names: dict[str, str] = {}
    in_to: set[str] = set()
    in_cc: set[str] = set()
    for field, seen in (("to", in_to), ("cc", in_cc)):
        for name, address in _addresses(msg, field):
            seen.add(address.lower())
            if name:
                names.setdefault(address.lower(), name)
    to: list[dict[str, str]] = []
    cc: list[dict[str, str]] = []
    bcc: list[dict[str, str]] = []
    taken: set[str] = set()
    for rcpt in recipients:
        key = rcpt.lower()
        if key in taken:  # SendGrid wants each address once per personalization
            continue
        taken.add(key)
        person = _person(names.get(key, ""), rcpt)
        (to if key in in_to else cc if key in in_cc else bcc).append(person)
    personalizations: list[dict[str, Any]]
    if to:
        one: dict[str, Any] = {"to": to}
        if cc:
            one["cc"] = cc
        if bcc:
            one["bcc"] = bcc
        personalizations = [one]
    else:
        personalizations = [{"to": [p]} for p in cc + bcc]
    body: dict[str, Any] = {"personalizations": personalizations, "from": from_}
    replies = _addresses(msg, "reply-to")
    if len(replies) == 1:
        body["reply_to"] = _person(*replies[0])
    elif replies:
        unique = {a.lower(): _person(n, a) for n, a in reversed(replies)}
        body["reply_to_list"] = list(reversed(unique.values()))
    subject = one_line(str(msg.get("subject", "")), 10_000)
    if subject:
        body["subject"] = subject
    text: str | None = None
    html: str | None = None
    attachments: list[dict[str, str]] = []
    for number, part in enumerate(_leaves(msg), 1):
        ctype = part.get_content_type()
        if (ctype in ("text/plain", "text/html") and part.get_content_disposition() != "attachment"
                and not part.get_filename()):
            if ctype == "text/plain" and text is None:
                text = _text(part)
                continue
            if ctype == "text/html" and html is None:
                html = _text(part)
                continue
        item = _attachment(part, number)
        if item is not None:
            attachments.append(item)
    content = [{"type": t, "value": v} for t, v in (("text/plain", text), ("text/html", html))
               if v]
    body["content"] = content or [{"type": "text/plain", "value": " "}]
    if attachments:
        body["attachments"] = attachments
    headers: dict[str, str] = {}
    passed: set[str] = set()
    for name, value in msg.items():
        key = name.lower()
        if key in NOT_PASSED or key in passed:
            continue
        passed.add(key)
        headers[name] = one_line(str(value), 10_000)
    if headers:
        body["headers"] = headers
    return body


class SendGridDelivery(HTTPAPIDelivery):
    """SendGrid's v3 Mail Send (see the module docstring).

    @param endpoint: the API's base URL; L{DEFAULT_ENDPOINT} when L{None}.
    @param api_key: the API key, or L{None} to read it from C{api_key_file}
        or the C{SENDGRID_API_KEY} environment variable.
    @param api_key_file: a file whose first line is the key (read now).
    @param timeout: seconds for one request.
    @param reactor: the reactor; the global one when L{None}.
    @param http_client: see L{HTTPAPIDelivery}.
    @raise ConfigError: no key, an empty one, or a key file that cannot be
        read (a C{ValueError}; the message never holds the key).
    @raise ValueError: a bad endpoint or timeout.
    """

    scheme = "sendgrid"
    provider = "SendGrid"
    batch_size = 1000

    def __init__(self, *, endpoint: str | None = None, api_key: str | None = None,
                 api_key_file: str | None = None, timeout: float = 60.0, reactor: Any = None,
                 http_client: Any = None) -> None:
        if api_key is None and api_key_file is not None:
            try:
                with open(api_key_file, encoding="utf-8") as f:
                    api_key = f.readline().strip()
            except OSError as e:
                raise ConfigError(f"sendgrid://: cannot read the API key file "
                                  f"{api_key_file}: {e.strerror}") from None
            if not api_key:
                raise ConfigError(f"sendgrid://: the API key file {api_key_file} is empty")
        if api_key is None:
            api_key = os.environ.get(KEY_VARIABLE, "").strip()
            if not api_key:
                raise ConfigError(f"sendgrid:// needs an API key: set {KEY_VARIABLE} or give "
                                  "api_key_file=PATH")
        if not api_key or any(c in api_key for c in "\r\n\0"):
            raise ConfigError("sendgrid://: the API key is empty or has a line break")
        self._api_key = api_key
        self.api_key_file = api_key_file
        self._given_endpoint = endpoint
        super().__init__(endpoint=endpoint or DEFAULT_ENDPOINT, timeout=timeout,
                         reactor=reactor, http_client=http_client)

    @classmethod
    def url_arguments(cls, url: str) -> dict[str, Any]:
        """The constructor's keyword arguments for C{url}.

        @param url: C{sendgrid://?endpoint=URL&api_key_file=PATH&timeout=SECONDS}.
        @return: a dict for L{SendGridDelivery}.
        @raise ValueError: a host, user, password or path (the key is never
            taken from a URL), an unknown or repeated parameter, a bad number.
        """
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise ValueError("sendgrid:// takes no host, key, path or fragment "
                             "(sendgrid://?endpoint=...&api_key_file=...); the API key comes "
                             f"from {KEY_VARIABLE} or api_key_file, never from the URL")
        out: dict[str, Any] = {}
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            if len(values) != 1:
                raise ValueError(f"sendgrid://: {name} given {len(values)} times")
            value = values[0]
            if name in ("endpoint", "api_key_file"):
                out[name] = value
            elif name == "timeout":
                try:
                    out["timeout"] = float(value)
                except ValueError:
                    raise ValueError(f"sendgrid://: timeout must be a number, "
                                     f"not {value!r}") from None
            else:
                raise ValueError(f"sendgrid://: unknown parameter {name!r} (endpoint, "
                                 "api_key_file, timeout)")
        return out

    def url(self) -> str:
        query = [f"{k}={quote(v, safe='/:')}" for k, v in (
            ("endpoint", self._given_endpoint), ("api_key_file", self.api_key_file)) if v]
        return "sendgrid://" + ("?" + "&".join(query) if query else "")

    def build_request(self, env: Envelope, recipients: list[str]) -> HTTPRequest:
        """The Mail Send request (in the thread pool: the conversion parses
        and base64-encodes the message).

        @raise MessageError: see L{sendgrid_payload}.
        """
        body = json.dumps(sendgrid_payload(env.sender, recipients, env.data)).encode("utf-8")
        headers = {"Authorization": f"Bearer {self._api_key}",
                   "Content-Type": "application/json"}
        return HTTPRequest("POST", self.endpoint + SEND_PATH, headers, body)

    def interpret(self, answer: HTTPAnswer) -> Reply:
        """The reply a SendGrid answer gives (see the module docstring); on
        success C{250 2.0.0 Ok X-MESSAGE-ID}, the errors' fields and messages
        in the text otherwise."""
        if 200 <= answer.code < 300:
            mid = answer.header("x-message-id")
            if mid:
                return Reply(250, f"2.0.0 Ok {one_line(mid, 200)}")
            return by_status(self.provider, answer.code, "(no X-Message-Id)")
        what = _errors(answer.body)
        if answer.code == 403:
            return Reply(550, one_line(f"5.7.1 refused: SendGrid HTTP 403 {what}"))
        return by_status(self.provider, answer.code, what)


def _errors(body: bytes) -> str:
    """SendGrid's error list (C{{"errors": [{"message", "field"}]}}) on one line."""
    try:
        document = json.loads(body or b"null")
    except ValueError:
        return one_line(body[:300].decode("utf-8", "replace"))
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return ""
    texts = []
    for e in errors:
        if not isinstance(e, dict):
            continue
        field, message = e.get("field"), e.get("message") or ""
        texts.append(f"{field}: {message}" if field and field != "null" else str(message))
    return one_line("; ".join(texts))
