"""Build messages with the standard library's C{email} package.

L{build_message} returns an C{email.message.EmailMessage}: plain text, HTML
with a text alternative, attachments (from paths or bytes, type guessed),
inline images referenced by Content-ID (C{multipart/related}, RFC 2387,
RFC 2392), Reply-To, Cc, Bcc, custom header fields, non-ASCII display names
and subjects (RFC 2047), internationalised domains (A-labels, RFC 5890), and
a generated Message-ID and Date (RFC 5322 3.6). The MIME structure, encodings
and folding are the standard library's; this module only adds what it lacks:
A-label domains in address fields and the choice of structure.

It also has marrow.mailer's message features, so that its users can move over:

  - bodies given as callables (templates), called each time the message is
    serialised for sending (L{BuiltMessage.render}), not when it is built;
    L{jinja2_body} makes one from a Jinja2 template (the C{templates} extra);
  - C{notify}: C{Disposition-Notification-To} (RFC 8098 2.1);
  - C{priority}: C{X-Priority} (1 highest to 5 lowest; not a standard field);
  - C{organization}: C{Organization} (RFC 1036 2.2.8, registered for mail
    by RFC 4021);
  - C{retries}: how many more times the L{Mailer<twisted_mailout.apps.mailer.Mailer>}
    tries a delivery that failed for now (L{send_sync_with_retries},
    L{send_async_with_retries}).
"""

from __future__ import annotations

import dataclasses
import datetime
import email.policy
import email.utils
import mimetypes
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.headerregistry import Address, AddressHeader, HeaderRegistry
from email.message import EmailMessage
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger

from twisted_mailout.envelope import AddressError, parse_address
from twisted_mailout.errors import DeliveryError
from twisted_mailout.message import MessageError, control_character, parse_address_list
from twisted_mailout.outcome import DeliveryReport, RecipientResult, Status

__all__ = [
    "PRIORITIES",
    "Attachment",
    "Body",
    "BuiltMessage",
    "TemplateBody",
    "build_message",
    "format_address",
    "jinja2_body",
    "message_retries",
    "parse_display_address",
    "send_async_with_retries",
    "send_sync_with_retries",
]

log = Logger()


#: One address as the builder takes it: C{"Name <local@domain>"} or
#: C{"local@domain"}, a C{(display name, address)} pair, or an
#: C{email.headerregistry.Address}.
AddressInput = str | tuple[str, str] | Address
#: One address or a list of them.
Addresses = AddressInput | Iterable[AddressInput]
#: A body: its text, or a callable returning it (a template rendered each
#: time the message is serialised for sending, as marrow.mailer's bodies).
Body = str | Callable[[], str]

#: The standard library's header field types, and Disposition-Notification-To
#: (RFC 8098 2.1) as an address list, which the library does not know (it
#: would be folded as unstructured text). A registry of our own: the
#: policies' shared one is left as it is.
_HEADERS = HeaderRegistry()
_HEADERS.map_to_type("disposition-notification-to", cast(Any, AddressHeader))

#: C{X-Priority} values (not a standard field; the de facto scale of mail
#: clients): the number written for each name L{build_message} accepts.
PRIORITIES = {"highest": 1, "urgent": 1, "high": 2, "normal": 3, "low": 4, "lowest": 5,
              "non-urgent": 5}

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


class BuiltMessage(EmailMessage):
    """What L{build_message} returns: an C{email.message.EmailMessage} that
    also carries marrow.mailer's per-message C{retries} and, when a body was
    given as a callable, renders it when the message is serialised.

    A message with a callable body holds only its header fields until then:
    C{as_bytes()} and C{as_string()} (which L{Mailer.send} and every delivery
    use) call L{render} and serialise its result, so each send calls the
    callables again (in the thread that sends: with a threaded manager they
    must be thread-safe, as marrow.mailer warns). To look at the parts, call
    L{render}.

    @ivar retries: how many more times a delivery that failed for now is
        tried (L{send_sync_with_retries}); L{None} when not given (the
        mailer then tries once).
    """

    retries: int | None = None
    _bodies: _Bodies | None = None

    @property
    def lazy(self) -> bool:
        """Whether a body is a callable, rendered by L{render}."""
        return self._bodies is not None

    def render(self) -> EmailMessage:
        """The complete message: for a lazy one a new L{BuiltMessage} with
        the same header fields (Message-ID and Date included) and the bodies
        the callables return now; otherwise this message.

        @return: an C{EmailMessage} (a L{BuiltMessage}, not lazy).
        @raise MessageError: a callable returned something other than a
            C{str}. Whatever a callable raises (a template error) passes through.
        """
        bodies = self._bodies
        if bodies is None:
            return self
        out = BuiltMessage(policy=self.policy)
        for name, value in self.items():
            out[name] = value
        out.retries = self.retries
        _set_bodies(out, _call(bodies.text, "text"), _call(bodies.html, "html"),
                    bodies.inline, bodies.attachments)
        return out

    def as_bytes(self, unixfrom: bool = False, policy: Any = None) -> bytes:
        """C{EmailMessage.as_bytes} of L{render}'s message."""
        if self._bodies is not None:
            return self.render().as_bytes(unixfrom, policy)
        return super().as_bytes(unixfrom, policy)

    def as_string(self, unixfrom: bool = False, maxheaderlen: int | None = None,
                  policy: Any = None) -> str:
        """C{EmailMessage.as_string} of L{render}'s message."""
        if self._bodies is not None:
            return self.render().as_string(unixfrom, maxheaderlen, policy)
        return super().as_string(unixfrom, maxheaderlen, policy)


@dataclass(frozen=True)
class _Bodies:
    text: Body | None
    html: Body | None
    inline: list[Attachment]
    attachments: list[Attachment]


def _call(body: Body | None, what: str) -> str | None:
    if body is None or isinstance(body, str):
        return body
    value = body()
    if not isinstance(value, str):
        raise MessageError(f"the {what} body callable {body!r:.60} returned "
                           f"{type(value).__name__}, not str")
    return value


def _set_bodies(msg: EmailMessage, text: str | None, html: str | None,
                inline_parts: list[Attachment], attachments: list[Attachment]) -> None:
    """Give C{msg} (header fields only) its text, HTML, inline parts and
    attachments, in the structure L{build_message} documents."""
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
        assert html_part is not None  # inline parts need html= (checked by build_message)
        maintype, subtype = part.mime_type()
        html_part.add_related(part.data, maintype=maintype, subtype=subtype,
                              cid=f"<{part.cid}>", filename=part.filename,
                              disposition="inline")
    for att in attachments:
        maintype, subtype = att.mime_type()
        msg.add_attachment(att.data, maintype=maintype, subtype=subtype,
                           filename=att.filename)


def _priority(value: int | str) -> str:
    """The C{X-Priority} value for C{value}.

    @param value: 1 (highest) to 5 (lowest) as an C{int} or a digit string,
        a string starting with that digit (C{"1 (Highest)"}, as some clients
        write it, kept as given), or a name of L{PRIORITIES}.
    @raise ValueError: anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5:
        return str(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in PRIORITIES:
            return str(PRIORITIES[word])
        if (word[:1] in "12345" and word[:1] and (len(word) == 1 or word[1] == " ")
                and value.isprintable() and not control_character(value)):
            return value.strip()
    raise ValueError(f"priority must be 1 (highest) to 5 (lowest) or one of "
                     f"{', '.join(PRIORITIES)}, not {value!r}")


class TemplateBody:
    """A body callable rendering a Jinja2 template with a context (see
    L{jinja2_body}). Each call renders it again.

    @ivar template: the C{jinja2.Template}, or a template name looked up in
        C{environment} at each call.
    @ivar environment: the C{jinja2.Environment} for a name, or L{None}.
    @ivar context: the variables, a C{dict} (read at each call, so changes
        made before the message is sent show).
    """

    def __init__(self, template: Any, environment: Any, context: dict[str, Any]) -> None:
        self.template = template
        self.environment = environment
        self.context = context

    def __call__(self) -> str:
        """Render the template.

        @return: the text.
        @raise jinja2.TemplateError: whatever Jinja2 raises (a missing
            template, a syntax error, an undefined variable with
            C{StrictUndefined}).
        """
        template = self.template
        if isinstance(template, str):
            template = self.environment.get_template(template)
        return cast(str, template.render(**self.context))

    def __repr__(self) -> str:
        name = self.template if isinstance(self.template, str) else \
            getattr(self.template, "name", None) or "<string>"
        return f"<TemplateBody {name!r}>"


def jinja2_body(template: Any, context: dict[str, Any] | None = None, *,
                environment: Any = None, autoescape: bool = False) -> TemplateBody:
    """A body callable rendering a Jinja2 template when the message is sent
    (the C{templates} extra: C{pip install twisted_mailout[templates]}).

    @param template: a C{jinja2.Template}; or, with C{environment}, a
        template name (looked up at each render, so the environment's
        loader and cache decide); or else the template's source text.
    @param context: the template variables.
    @param environment: a C{jinja2.Environment} (its loader, filters,
        autoescaping); for source text without one, a plain environment.
    @param autoescape: for source text without C{environment}: escape the
        variables for HTML (use it for C{html=} bodies).
    @return: a L{TemplateBody}, to give as C{text=} or C{html=}.
    @raise ImportError: Jinja2 is not installed.
    @raise jinja2.TemplateSyntaxError: source text that does not parse
        (raised here, at build time).
    """
    import jinja2  # the templates extra

    if isinstance(template, str) and environment is None:
        template = jinja2.Environment(autoescape=autoescape).from_string(template)
    return TemplateBody(template, environment, context if context is not None else {})


def message_retries(message: object) -> int:
    """How many more times a mailer tries a delivery of C{message} that
    failed for now: its C{retries} attribute (L{build_message}'s C{retries},
    or any message object with one, as marrow.mailer's C{Message}), else 0.

    @raise ValueError: a C{retries} that is not an C{int} from 0.
    """
    retries = getattr(message, "retries", None)
    if retries is None:
        return 0
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int from 0, not {retries!r}")
    return retries


def send_sync_with_retries(delivery: Any, sender: str, recipients: list[str], data: bytes, *,
                           message_id: str, retries: int) -> tuple[str, int]:
    """Hand a message to a synchronous delivery, trying again at once when
    it fails for now, up to C{retries} more times (marrow.mailer's managers
    try a message again while its C{retries} last; a permanent failure is
    never tried again).

    @param delivery: a synchronous L{Delivery<twisted_mailout.apps.base.Delivery>}.
    @param message_id: the id for every attempt.
    @param retries: more attempts allowed after the first (0: one attempt).
    @return: C{(message id, attempts made)}.
    @raise DeliveryError: the last failure, with C{attempts} (an C{int}) set.
    @raise AddressError, MessageError, QueueError: as the delivery's
        C{send}, at once (not tried again).
    """
    attempt = 1
    while True:
        try:
            mid = cast(str, delivery.send(sender, recipients, data, message_id=message_id))
            return mid, attempt
        except DeliveryError as e:
            e.attempts = attempt  # type: ignore[attr-defined]
            if e.status != Status.DEFERRED or attempt > retries:
                raise
            log.info("{qid}: {delivery}: {error}; trying again (attempt {attempt} of {total})",
                     qid=message_id, delivery=delivery.url(), error=str(e),
                     attempt=attempt + 1, total=retries + 1)
        attempt += 1


async def send_async_with_retries(delivery: Any, sender: str, recipients: list[str],
                                  data: bytes, *, message_id: str,
                                  retries: int) -> DeliveryReport:
    """Hand a message to an asynchronous (direct) delivery; send again to
    the recipients it reports deferred, at once, up to C{retries} more
    times. Bounced and delivered recipients are never sent to again.

    @param delivery: an asynchronous delivery (C{send} returns a Deferred
        of a L{DeliveryReport}).
    @param retries: more attempts allowed after the first.
    @return: one L{RecipientResult} per recipient in the first report's
        order: its last result, with C{attempts} the number of attempts
        made for it.
    @raise AddressError, MessageError: as the delivery's C{send}.
    """
    order: list[str] = []
    final: dict[str, RecipientResult] = {}
    pending = list(recipients)
    for attempt in range(1, retries + 2):
        report: DeliveryReport = await cast(
            "defer.Deferred[DeliveryReport]",
            delivery.send(sender, pending, data, message_id=message_id))
        again = []
        for r in report:
            if r.recipient not in final:
                order.append(r.recipient)
            final[r.recipient] = dataclasses.replace(r, attempts=attempt)
            if r.status is Status.DEFERRED:
                again.append(r.recipient)
        if not again or attempt > retries:
            break
        log.info("{qid}: {delivery}: {count} recipient(s) deferred; trying again "
                 "(attempt {attempt} of {total})", qid=message_id, delivery=delivery.url(),
                 count=len(again), attempt=attempt + 1, total=retries + 1)
        pending = again
    return DeliveryReport([final[r] for r in order])


def build_message(*, sender: AddressInput, to: Addresses = (), subject: str = "",
                  text: Body | None = None, html: Body | None = None, cc: Addresses = (),
                  bcc: Addresses = (), reply_to: Addresses | None = None,
                  attachments: Iterable[Any] = (), inline: Iterable[Any] = (),
                  headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
                  message_id: str | bool = True, date: bool | datetime.datetime = True,
                  smtputf8: bool = False, unsubscribe_url: str | None = None,
                  unsubscribe_mailto: str | None = None, notify: Addresses | None = None,
                  priority: int | str | None = None, organization: str | None = None,
                  retries: int | None = None) -> BuiltMessage:
    """Build a message.

    @param sender: the From field: C{"Name <addr>"}, C{"addr"}, a C{(name,
        addr)} pair or an C{email.headerregistry.Address}.
    @param to: one address (as C{sender}) or a list of them; likewise
        C{cc}, C{bcc} and C{reply_to}. Bcc is a field of the returned message:
        L{twisted_mailout.apps.mailer.Mailer.send} puts its addresses in the envelope
        and removes it from the bytes.
    @param subject: the Subject (any Unicode; RFC 2047 encoded as needed).
    @param text: the plain-text body: a C{str}, or a callable returning one
        (a template, e.g. L{jinja2_body} or C{functools.partial(render,
        ...)}), called each time the message is serialised for sending.
    @param html: the HTML body, likewise; with C{text}, a
        C{multipart/alternative} (RFC 2046 5.1.4) of both.
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
    @param notify: where the reader's client sends a read receipt (a
        message disposition notification): one address or a list, written
        into C{Disposition-Notification-To} (RFC 8098 2.1; marrow.mailer's
        C{notify}).
    @param priority: C{X-Priority} (marrow.mailer's C{priority}): 1
        (highest) to 5 (lowest) as an C{int} or digit string, a string
        starting with the digit (C{"1 (Highest)"}, kept as given), or a name
        of L{PRIORITIES} (C{"high"}, C{"normal"}, ...). Not a standard
        field: clients show it, filters may weigh it.
    @param organization: the C{Organization} field (RFC 1036 2.2.8,
        registered for mail by RFC 4021; marrow.mailer's C{organization}).
    @param retries: how many more times L{Mailer<twisted_mailout.apps.mailer.Mailer>}
        tries a delivery of this message that fails for now (marrow.mailer's
        C{retries}; its default is 3, ours is one attempt). Kept in
        L{BuiltMessage.retries}, never in the bytes. Not for C{queue://}
        (the daemon retries queued mail on its own schedule).
    @return: a L{BuiltMessage} (an C{email.message.EmailMessage}) with
        C{email.policy.SMTP} (7-bit transfer encodings: the bytes are ASCII)
        or C{SMTPUTF8}: C{as_bytes()} gives CRLF line ends.
    @raise AddressError: a bad address. @raise MessageError: no body, a bad
        attachment or inline part, an inline part without HTML.
    @raise ValueError: a header field with CR or LF (header injection), a
        bad C{priority}, a C{retries} that is not an C{int} from 0, a body
        that is neither a C{str} nor callable.
    @raise OSError: an attachment path cannot be read.
    """
    if text is None and html is None:
        raise MessageError("a message needs text=, html= or both")
    for what, body in (("text", text), ("html", html)):
        if body is not None and not isinstance(body, str) and not callable(body):
            raise ValueError(f"{what}= must be a str or a callable returning one, "
                             f"not {type(body).__name__}")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                or retries < 0):
        raise ValueError(f"retries must be an int from 0, not {retries!r}")
    # 7bit: non-ASCII bodies are quoted-printable or base64, so the message
    # passes servers without 8BITMIME (RFC 6152) unchanged.
    policy = (email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP.clone(cte_type="7bit"))
    msg = BuiltMessage(policy=policy.clone(header_factory=_HEADERS))
    msg.retries = retries
    from_addr = _address(sender, smtputf8)
    msg["From"] = from_addr
    for name, values in (("To", to), ("Cc", cc), ("Bcc", bcc), ("Reply-To", reply_to),
                         ("Disposition-Notification-To", notify)):
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
    if organization:
        msg["Organization"] = organization
    if priority is not None:
        msg["X-Priority"] = _priority(priority)
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
    attached = [_as_attachment(item, False) for item in attachments]
    for att in attached:
        att.mime_type()  # a bad type fails now, not at send time
    if callable(text) or callable(html):
        msg._bodies = _Bodies(text, html, inline_parts, attached)
    else:
        _set_bodies(msg, text, html, inline_parts, attached)
    return msg
