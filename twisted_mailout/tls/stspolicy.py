"""MTA-STS policies and TXT records as text (RFC 8461 3.1, 3.2): parsing,
checking and matching MX hosts; pure, no I/O.

L{parse_policy} turns a policy body into an L{STSPolicy} (or raises
L{PolicyError}); L{parse_txt} reads the policy id from the
C{_mta-sts.<domain>} TXT record; L{STSPolicy.matches} says whether an MX host
may be used under the policy (RFC 8461 4.1). Fetching and caching policies
is L{twisted_mailout.tls.mtasts}.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from twisted_mailout.errors import TLSError

__all__ = [
    "MAX_AGE_LIMIT",
    "MAX_POLICY_SIZE",
    "WELL_KNOWN_PATH",
    "Policy",
    "PolicyError",
    "STSMode",
    "STSPolicy",
    "parse_policy",
    "parse_txt",
    "policy_url",
]

#: Largest C{max_age} a policy may have, in seconds (about one year, RFC 8461 3.2).
MAX_AGE_LIMIT = 31557600
#: Largest policy body accepted, in bytes (the 64 KiB RFC 8461 3.3 suggests).
MAX_POLICY_SIZE = 65536
#: Where the policy is served (RFC 8461 3.3).
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"



class STSMode(StrEnum):
    """An MTA-STS policy mode (RFC 8461 5); compares equal to its string value."""

    #: Only MX hosts the policy lists, over verified TLS.
    ENFORCE = "enforce"
    #: Failures are reported (RFC 8460), delivery goes on as without a policy.
    TESTING = "testing"
    #: No policy.
    NONE = "none"


_MODES = tuple(m.value for m in STSMode)


class PolicyError(TLSError, ValueError):
    """A policy (RFC 8461 3.2) or a domain name that cannot be used."""


# A label: letters, digits, hyphens inside (RFC 5321 4.1.2 sub-domain, A-labels).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_TXT_EXT_VALUE_RE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")
# RFC 8461 3.2 sts-policy-ext-value: VCHAR or UTF-8, spaces only inside.
_POLICY_EXT_VALUE_RE = re.compile(r"[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?\Z")
_WSP = " \t"


def _domain(name: str, what: str = "domain") -> str:
    """Normalise a domain (lower case, no trailing dot, A-labels).

    @raise PolicyError: not a syntactically valid domain name.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be str, got {name!r}")
    text = name[:-1] if name.endswith(".") else name
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise PolicyError(f"{what} {name!r} is not a valid domain name") from None
    if len(text) > 253 or not _DOMAIN_RE.match(text):
        raise PolicyError(f"{what} {name!r} is not a valid domain name")
    return text.lower()


@dataclass(frozen=True)
class STSPolicy:
    """An MTA-STS policy (RFC 8461 3.2) and where and when it was fetched.

    @ivar domain: the policy domain (lower case, A-labels).
    @ivar id: the id of the TXT record it was fetched for (3.1).
    @ivar mode: an L{STSMode}: C{"enforce"}, C{"testing"} or C{"none"}.
    @ivar mx: the MX patterns, lower case, in policy order (C{"*.example.com"}
        or C{"mx.example.com"}); may be empty only in mode C{none}.
    @ivar max_age: how long it may be cached, in seconds (0..L{MAX_AGE_LIMIT}).
    @ivar fetched: when it was fetched, epoch seconds (the clock's).
    @ivar text: the policy body as served (decoded UTF-8).
    """

    domain: str
    id: str
    mode: STSMode
    mx: tuple[str, ...]
    max_age: int
    fetched: float
    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", STSMode(self.mode))  # a str is accepted too

    def matches(self, mx_host: str) -> bool:
        """Whether C{mx_host} is allowed by the policy's C{mx} patterns
        (RFC 8461 4.1): equal, ignoring case and a trailing dot, or, for
        C{"*.example.com"}, C{example.com} with exactly one more label in
        front (C{mx.example.com}, not C{example.com} nor C{a.b.example.com}).

        @param mx_host: an MX host name.
        @return: C{bool}; C{False} for an empty or malformed name.
        """
        try:
            host = _domain(mx_host, "mx_host")
        except (PolicyError, TypeError):
            return False
        parent = host.partition(".")[2]
        for pattern in self.mx:
            if pattern.startswith("*."):
                if parent and parent == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    @property
    def expires(self) -> float:
        """When the policy expires: C{fetched + max_age}, epoch seconds."""
        return self.fetched + self.max_age

    def expired(self, now: float) -> bool:
        """Whether the policy must no longer be used at C{now} (epoch seconds):
        C{now >= fetched + max_age} (RFC 8461 3.2, 5.1)."""
        return now >= self.expires

    def lines(self) -> list[str]:
        """The policy's lines without line ends: the C{policy-string} of an
        RFC 8460 report (4.4)."""
        return [line.rstrip("\r") for line in self.text.split("\n") if line.rstrip("\r")]

    def report_fields(self) -> dict[str, Any]:
        """The policy part of an RFC 8460 event: C{policy_type},
        C{policy_domain}, C{policy_string}, C{mx_host}; pass them on to
        L{twisted_mailout.tls.tlsrpt.log_failure} or C{log_success} as keywords."""
        return {"policy_type": "sts", "policy_domain": self.domain,
                "policy_string": self.lines(), "mx_host": list(self.mx)}


#: The old name of L{STSPolicy}, kept for one release (three classes were
#: called "Policy": this one, the DANE policy and the TLS level policy).
Policy = STSPolicy


def _mx_pattern(value: str) -> str:
    wild = value.startswith("*.")
    name = value[2:] if wild else value
    if not name.isascii() or len(name) > 253 or not _DOMAIN_RE.match(name):
        raise PolicyError(f"bad mx pattern {value!r} (A-label domain, optionally "
                          f"after '*.')")
    return ("*." if wild else "") + name.lower()


def parse_policy(text: str | bytes, *, domain: str = "", id: str = "",
                 fetched: float = 0.0) -> STSPolicy:
    """Parse a policy body strictly by the grammar of RFC 8461 3.2.

    One C{key: value} per line, lines ending in LF or CRLF (the last may
    lack it), no empty lines; C{version: STSv1}, C{mode} and C{max_age}
    required, C{mx} at least once unless the mode is C{none}.  A repeated
    key other than C{mx} keeps its first value; unknown keys (extensions)
    are ignored.  Keys and the fixed values are case-sensitive.

    @param text: the body, C{str} or UTF-8 C{bytes}.
    @param domain: stored in the L{STSPolicy} (the policy domain).
    @param id: stored in the L{STSPolicy} (the TXT id).
    @param fetched: stored in the L{STSPolicy}, epoch seconds.
    @return: a L{STSPolicy}.
    @raise PolicyError: the body breaks the grammar or a rule above.
    @raise TypeError: C{text} is neither C{str} nor C{bytes}.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PolicyError(f"policy is not UTF-8: {e}") from None
    if not isinstance(text, str):
        raise TypeError(f"policy text must be str or bytes, got {type(text).__name__}")
    if not text:
        raise PolicyError("empty policy")
    body = text[:-1] if text.endswith("\n") else text
    fields: dict[str, str] = {}
    mx: list[str] = []
    for n, raw in enumerate(body.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if "\r" in line:
            raise PolicyError(f"line {n}: bare CR")
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"line {n}: no ':' in {line!r}" if line else
                              f"line {n}: empty line")
        if not _KEY_RE.match(key):
            raise PolicyError(f"line {n}: bad key {key!r}")
        value = value.lstrip(_WSP).rstrip(_WSP)
        if key == "version":
            if value != "STSv1":
                raise PolicyError(f"line {n}: version must be STSv1, got {value!r}")
        elif key == "mode":
            if value not in _MODES:
                raise PolicyError(f"line {n}: mode must be one of {', '.join(_MODES)}, "
                                  f"got {value!r}")
        elif key == "max_age":
            if not (value.isascii() and value.isdigit() and len(value) <= 10):
                raise PolicyError(f"line {n}: max_age must be 1 to 10 digits, got {value!r}")
            if int(value) > MAX_AGE_LIMIT:
                raise PolicyError(f"line {n}: max_age {value} exceeds {MAX_AGE_LIMIT} seconds")
        elif key == "mx":
            mx.append(_mx_pattern(value))
            continue
        elif not _POLICY_EXT_VALUE_RE.match(value):
            raise PolicyError(f"line {n}: bad value for extension {key!r}: {value!r}")
        fields.setdefault(key, value)
    for required in ("version", "mode", "max_age"):
        if required not in fields:
            raise PolicyError(f"policy lacks {required!r}")
    mode = fields["mode"]
    if not mx and mode != "none":
        raise PolicyError(f"policy in mode {mode} lists no mx")
    return STSPolicy(domain=domain, id=id, mode=STSMode(mode), mx=tuple(dict.fromkeys(mx)),
                  max_age=int(fields["max_age"]), fetched=float(fetched), text=text)


def _txt_record_text(record: str | bytes | Iterable[str | bytes]) -> str | None:
    parts = [record] if isinstance(record, (bytes, str)) else list(record)
    out = []
    for part in parts:
        if isinstance(part, bytes):
            try:
                out.append(part.decode("ascii"))
            except UnicodeDecodeError:
                return None
        elif isinstance(part, str):
            out.append(part)
        else:
            raise TypeError(f"TXT strings must be str or bytes, got {part!r}")
    return "".join(out)


def _parse_sts_txt(text: str) -> str:
    """The id of one C{v=STSv1} record (RFC 8461 3.1).

    @raise PolicyError: the record breaks the grammar.
    """
    rest = text[len("v=STSv1"):]
    fields = []
    rest = rest.rstrip(_WSP)
    if rest.endswith(";"):
        rest = rest[:-1]
    for n, part in enumerate(rest.split(";")):
        if n == 0:
            if part.strip(_WSP):
                raise PolicyError(f"text after v=STSv1: {part!r}")
            continue
        fields.append(part.strip(_WSP))
    if not fields:
        raise PolicyError("no id field")
    ident = None
    for f in fields:
        key, eq, value = f.partition("=")
        if not eq or not _KEY_RE.match(key):
            raise PolicyError(f"bad field {f!r}")
        if key == "id":
            if not _ID_RE.match(value):
                raise PolicyError(f"bad id {value!r} (1 to 32 letters and digits)")
            if ident is None:
                ident = value
        elif not _TXT_EXT_VALUE_RE.match(value):
            raise PolicyError(f"bad value in {f!r}")
    if ident is None:
        raise PolicyError("no id field")
    return ident


def _txt_id(records: Iterable) -> tuple[str | None, str, bool]:
    """C{(id, why, invalid)}: the id, or L{None}, why there is no usable
    record, and whether C{v=STSv1} records were there but unusable."""
    sts = []
    for record in records:
        text = _txt_record_text(record)
        if text is not None and text.startswith("v=STSv1") and (
                len(text) == 7 or text[7] in ";" + _WSP):
            sts.append(text)
    if not sts:
        return None, "no v=STSv1 TXT record", False
    if len(sts) > 1:
        return None, f"{len(sts)} v=STSv1 TXT records (RFC 8461 3.1 wants one)", True
    try:
        return _parse_sts_txt(sts[0]), "", False
    except PolicyError as e:
        return None, f"invalid record {sts[0]!r}: {e}", True


def parse_txt(records: Iterable) -> str | None:
    """The policy id published in C{_mta-sts.<domain>} TXT records (RFC 8461 3.1).

    Records that do not start with C{v=STSv1} are discarded; if not exactly
    one remains, or it breaks the grammar (C{id=} 1 to 32 letters and
    digits, fields separated by C{;} with optional spaces, extensions
    C{name=value}), the domain has no usable policy.

    @param records: the TXT records; each a C{str}/C{bytes}, or a sequence
        of them (the character-strings of one record, concatenated).
    @return: the id (C{str}), or L{None}.
    @raise TypeError: a string is neither C{str} nor C{bytes}.
    """
    return _txt_id(records)[0]


def policy_url(domain: str, port: int = 443) -> str:
    """C{https://mta-sts.<domain>/.well-known/mta-sts.txt} (RFC 8461 3.3),
    with C{:port} when it is not 443.

    @raise PolicyError: a malformed domain.
    """
    host = "mta-sts." + _domain(domain)
    return f"https://{host}{'' if port == 443 else f':{port}'}{WELL_KNOWN_PATH}"
