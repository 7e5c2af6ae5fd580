"""Envelope value objects: addresses, SMTP replies and recipient states.

Everything that enters the queue or reaches an SMTP command is validated here,
once, at the edge (RFC 5321 section 4.1.2 syntax, RFC 6531 for SMTPUTF8).
"""

from __future__ import annotations

import functools

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

import idna

from twisted_mailout.errors import AddressError, MailoutError

__all__ = [
    "FINAL_STATES",
    "Address",
    "AddressError",
    "InvalidTransition",
    "RecipientState",
    "Reply",
    "check_transition",
    "parse_address",
    "parse_sender",
    "validate_envelope",
]


# RFC 5321 4.1.2: atext of RFC 5322 3.2.3; RFC 6531 3.3 adds UTF8-non-ascii.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED_STRING = re.compile(
    r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")

MAX_LOCAL_PART = 64  # octets, RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 4.5.3.1.2
MAX_PATH = 256  # octets, RFC 5321 4.5.3.1.3


def _ascii_domain(domain: str) -> str:
    """Return the A-label (IDNA 2008) form of C{domain}, lower-cased.

    @raise AddressError: when the domain is not a valid host name.
    """
    if not domain:
        raise AddressError("empty domain")
    if domain.endswith("."):
        raise AddressError(f"domain {domain!r} ends with a dot")
    if domain.isascii():
        ascii_form = domain.lower()
    else:
        try:
            ascii_form = idna.encode(domain, uts46=True).decode("ascii").lower()
        except idna.IDNAError as e:
            raise AddressError(f"domain {domain!r} is not a valid internationalised name: {e}")
    labels = ascii_form.split(".")
    for label in labels:
        if not _LDH_LABEL.match(label):
            raise AddressError(f"domain {domain!r} has an invalid label {label!r}")
    if len(ascii_form) > MAX_DOMAIN:
        raise AddressError(f"domain {domain!r} is longer than {MAX_DOMAIN} octets")
    return ascii_form


@dataclass(frozen=True, slots=True)
class Address:
    """A validated RFC 5321 mailbox C{local@domain}.

    @ivar local: the local part as given (case preserved: RFC 5321 2.4).
    @ivar domain: the domain as given, or an address literal such as C{[192.0.2.1]}.
    @ivar ascii_domain: the domain in A-label form, lower-cased: the key used for
        routing (MX lookup) and in the RCPT TO command.
    """

    local: str
    domain: str
    ascii_domain: str

    @property
    def needs_smtputf8(self) -> bool:
        """C{True} when the local part is not ASCII (RFC 6531 requires SMTPUTF8)."""
        return not self.local.isascii()

    @property
    def is_literal(self) -> bool:
        """C{True} for an address literal domain such as C{[127.0.0.1]}."""
        return self.domain.startswith("[")

    def smtp_form(self) -> str:
        """The mailbox as written inside C{<...>} of MAIL FROM or RCPT TO.

        The domain is sent in A-label form, so only a non-ASCII local part
        needs the SMTPUTF8 extension.
        """
        return f"{self.local}@{self.ascii_domain}"

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_address(text: str) -> Address:
    """Validate a mailbox (RFC 5321 4.1.2 C{Mailbox}, RFC 6531 when not ASCII).

    Surrounding angle brackets are accepted and removed; no display names, no
    comments, no source routes.

    @param text: the address, e.g. C{"user@example.com"} or C{"<user@example.com>"}.
    @return: the validated L{Address}.
    @raise AddressError: for CR, LF, NUL or other control characters, a missing
        or invalid local part or domain, or lengths over RFC 5321 4.5.3.1 limits.
    """
    if not isinstance(text, str):
        raise AddressError(f"address must be a str, not {type(text).__name__}")
    return _parse_address(text)


@functools.lru_cache(maxsize=8192)
def _parse_address(text: str) -> Address:
    # Cached: the scheduler parses each queued address at every attempt, and
    # an Address is immutable; errors are not cached (lru_cache skips them).
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise AddressError(f"address {text!r} contains a control character (CR, LF, NUL, ...)")
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text:
        raise AddressError("empty address")
    at = text.rfind("@")
    if at <= 0:
        raise AddressError(f"address {text!r} has no local part and domain (local@domain)")
    local, domain = text[:at], text[at + 1 :]
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        raise AddressError(f"address {text!r} has an invalid local part {local!r}")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError(f"address {text!r}: local part longer than {MAX_LOCAL_PART} octets")
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if _IPV4.match(literal):
            ascii_domain = domain
        elif literal.lower().startswith("ipv6:"):
            import ipaddress

            try:
                ipaddress.IPv6Address(literal[5:])
            except ValueError:
                raise AddressError(f"address {text!r} has an invalid IPv6 literal")
            ascii_domain = domain
        else:
            raise AddressError(f"address {text!r} has an unsupported address literal")
    else:
        ascii_domain = _ascii_domain(domain)
        if "." not in ascii_domain:
            raise AddressError(f"address {text!r}: domain {domain!r} is not fully qualified")
    if len(local.encode("utf-8")) + 1 + len(ascii_domain) > MAX_PATH - 2:
        raise AddressError(f"address {text!r} is longer than {MAX_PATH} octets")
    return Address(local, domain, ascii_domain)


def parse_sender(text: str | None) -> Address | None:
    """Validate an envelope sender (MAIL FROM reverse-path).

    @param text: a mailbox, or C{""}, C{"<>"} or L{None} for the null sender
        used by bounces (RFC 5321 4.5.5).
    @return: the L{Address}, or L{None} for the null sender.
    @raise AddressError: as L{parse_address}.
    """
    if text is None or text in ("", "<>"):
        return None
    return parse_address(text)


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply (RFC 5321 4.2), or a locally made one for network/DNS failures.

    @ivar code: three-digit reply code, e.g. C{250}.
    @ivar text: the reply text, lines joined by C{"\\n"}; without the codes.
    @ivar local: C{True} when no server said it (connection refused, timeout,
        DNS failure); the text then explains what happened.
    """

    code: int
    text: str
    local: bool = False

    @property
    def enhanced_status(self) -> str:
        """The RFC 3463 enhanced status code: taken from the reply text when
        the server gave one (RFC 2034), else derived from the reply code."""
        m = _ENHANCED.match(self.text)
        if m and m.group(1) == str(self.code)[0]:
            return m.group(0)
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    @property
    def is_positive(self) -> bool:
        """2xx."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3xx: the command goes on (354 send the data, 334 a SASL challenge);
        never an outcome."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx only: try again later (RFC 5321 4.2.1). A 1xx or 3xx is
        neither transient nor permanent: where it does not belong it is a
        protocol error (L{twisted_mailout.smtp.state.EXPECTED})."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx."""
        return 500 <= self.code < 600

    def one_line(self) -> str:
        """C{"550 5.1.1 no such user"}: code and text on one line, for logs."""
        return f"{self.code} {' '.join(self.text.splitlines())}".rstrip()

    def to_json(self) -> dict:
        """A JSON-ready dict: C{{"code": int, "text": str, "local": bool}}."""
        return {"code": self.code, "text": self.text, "local": self.local}

    @classmethod
    def from_json(cls, d: dict | None) -> Reply | None:
        """Inverse of L{to_json}; L{None} passes through.

        @raise ValueError: for a malformed dict.
        """
        if d is None:
            return None
        code = d["code"]
        if not isinstance(code, int) or not 100 <= code <= 599:
            raise ValueError(f"bad reply code {code!r}")
        return cls(code, str(d["text"]), bool(d.get("local", False)))


class RecipientState(enum.Enum):
    """The states of one recipient of one queued message.

    ::

        pending ──▶ delivered
           │  ╲──▶ bounced
           ▼
        deferred ──▶ delivered | bounced | deferred (next attempt)

    C{delivered} and C{bounced} are final.
    """

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


FINAL_STATES = frozenset({RecipientState.DELIVERED, RecipientState.BOUNCED})

_ALLOWED = {
    RecipientState.PENDING: {
        RecipientState.DELIVERED,
        RecipientState.BOUNCED,
        RecipientState.DEFERRED,
    },
    RecipientState.DEFERRED: {
        RecipientState.DELIVERED,
        RecipientState.BOUNCED,
        RecipientState.DEFERRED,
    },
    RecipientState.DELIVERED: set(),
    RecipientState.BOUNCED: set(),
}


class InvalidTransition(MailoutError):
    """A recipient state change the state machine does not allow."""


def check_transition(old: RecipientState, new: RecipientState) -> None:
    """Check that a recipient may move from C{old} to C{new}.

    @raise InvalidTransition: when it may not (a final state never changes).
    """
    if new not in _ALLOWED[old]:
        raise InvalidTransition(f"recipient cannot go from {old.value} to {new.value}")


def validate_envelope(sender: str | None,
                      recipients: str | Iterable[str]) -> tuple[str, list[str]]:
    """Validate an envelope as enqueue does (RFC 5321 4.1.2 syntax, no
    control characters).

    @param sender: a mailbox, or C{""}/C{"<>"}/L{None} for the null sender.
    @param recipients: an iterable of mailboxes (a C{str} is one recipient).
    @return: C{(sender, recipients)} normalised: C{""} for the null sender,
        duplicates removed, order kept.
    @raise AddressError: bad sender or recipient, or no recipients.
    """
    if isinstance(recipients, str):
        recipients = [recipients]
    recipients = list(recipients)
    if not recipients:
        raise AddressError("no recipients")
    snd = parse_sender(sender)
    rcpts: list[str] = []
    for r in recipients:
        s = str(parse_address(r))
        if s not in rcpts:
            rcpts.append(s)
    return ("" if snd is None else str(snd)), rcpts
