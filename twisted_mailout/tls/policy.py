"""TLS security levels and the per-destination policy table.

The levels are Postfix's (U{https://www.postfix.org/TLS_README.html}):

  - C{none}: never STARTTLS.
  - C{may}: STARTTLS when offered, any certificate; when the handshake
    fails the same host is retried in plaintext, and remembered for a while.
  - C{encrypt}: TLS required, the certificate is not checked.
  - C{verify}: TLS required, the chain must verify (C{--cafile} or the
    system store) and the certificate must match the MX (or relay) host name.
  - C{secure}: as C{verify}, but the certificate must match the recipient
    domain (or one of its subdomains), or a name listed with C{match=}; the
    MX host name from DNS is not trusted, so a forged MX cannot redirect us.
  - C{dane}: DANE (RFC 7672) when the MX RRset and TLSA records are
    DNSSEC-validated; otherwise as C{may} (as C{encrypt} when TLSA records
    exist but none is usable).
  - C{dane-only}: DANE is required; hosts without usable TLSA records are
    not used.

A required level that cannot be met gives a 4xx reply: the mail is
deferred with the reason, never sent in plaintext, never bounced at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted_mailout.errors import ConfigError
from twisted_mailout.tls.levels import LEVELS, REQUIRED

__all__ = [
    "LEVELS",
    "REQUIRED",
    "PolicyFileError",
    "PolicyTable",
    "TLSPolicy",
]


class PolicyFileError(ConfigError):
    """A policy file that cannot be used; the text names the file and line."""


@dataclass(frozen=True)
class TLSPolicy:
    """The TLS level for one destination.

    @ivar level: one of L{LEVELS}.
    @ivar match: names the certificate may match (C{verify}, C{secure});
        a name starting with a dot matches any subdomain of it. Empty: the
        level's default (the MX/relay host name for C{verify}; the
        recipient domain and its subdomains for C{secure}, Postfix's
        C{nexthop, dot-nexthop}).
    @ivar source: where the policy came from (C{"--tls"},
        C{"FILE:LINE"}, C{"mta-sts"}, C{"dane"}), for log lines.
    """

    level: str = "may"
    match: tuple[str, ...] = ()
    source: str = "--tls"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown TLS level {self.level!r}; expected one of "
                             f"{', '.join(LEVELS)}")

    @property
    def required(self) -> bool:
        """A host without working TLS must not be used."""
        return self.level in REQUIRED

    def names_for(self, domain: str | None, mx_host: str) -> tuple[str, ...]:
        """The names a certificate must match under this policy.

        @param domain: the recipient domain (L{None} for a relay).
        @param mx_host: the host name connected to (MX or relay).
        @return: names, lower case; C{".example.com"} means any subdomain.
        """
        if self.match:
            out = []
            for m in self.match:
                if m == "nexthop":
                    out.append(domain or mx_host)
                elif m == "dot-nexthop":
                    out.append("." + (domain or mx_host))
                elif m == "hostname":
                    out.append(mx_host)
                else:
                    out.append(m)
            return tuple(n.lower().rstrip(".") for n in out)
        if self.level == "secure" and domain:
            return (domain.lower(), "." + domain.lower())
        return (mx_host.lower().rstrip("."),)


class PolicyTable:
    """Per-destination TLS policies, with a default for the rest.

    The file has one entry per line: C{DESTINATION LEVEL [match=NAME:NAME...]};
    C{#} starts a comment. DESTINATION is a recipient domain
    (C{example.com}), every subdomain of one (C{.example.com}), or a relay
    as given to C{--relay} (C{[relay.example.net]:587} or
    C{relay.example.net}). A domain entry wins over a subdomain entry, the
    longest subdomain entry over shorter ones.

    @param default: the L{TLSPolicy} for destinations not listed.
    @param entries: C{{destination: TLSPolicy}}, keys lower case.
    """

    def __init__(self, default: TLSPolicy | None = None, entries: dict | None = None):
        self.default = default or TLSPolicy()
        self.entries = dict(entries or {})

    @classmethod
    def from_file(cls, path: str, default: TLSPolicy | None = None) -> PolicyTable:
        """Read a policy file.

        @raise PolicyFileError: unreadable file, unknown level or option,
            an entry given twice (the message names the line).
        """
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise PolicyFileError(f"cannot read TLS policy file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise PolicyFileError(f"TLS policy file {path} is not UTF-8") from None
        entries: dict[str, TLSPolicy] = {}
        for n, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{path}:{n}"
            fields = line.split()
            if len(fields) < 2:
                raise PolicyFileError(f"{where}: expected 'DESTINATION LEVEL [match=...]'")
            dest, level, *options = fields
            if level not in LEVELS:
                raise PolicyFileError(f"{where}: unknown TLS level {level!r}; expected one of "
                                      f"{', '.join(LEVELS)}")
            match: tuple[str, ...] = ()
            for opt in options:
                key, eq, value = opt.partition("=")
                if key != "match" or not eq or not value:
                    raise PolicyFileError(f"{where}: unknown option {opt!r} (only match=NAMES)")
                if level not in ("verify", "secure"):
                    raise PolicyFileError(f"{where}: match= applies only to verify and secure")
                match = tuple(v for v in value.split(":") if v)
            key = _normalise_destination(dest)
            if key in entries:
                raise PolicyFileError(f"{where}: {dest} is listed twice")
            entries[key] = TLSPolicy(level, match, where)
        return cls(default, entries)

    def lookup(self, destination: str) -> TLSPolicy:
        """The policy for a recipient domain or a relay.

        @param destination: an A-label domain, or the relay as given to
            C{--relay} (C{host}, C{host:port}, C{[host]:port}, with or
            without an C{smtp://}/C{smtps://} scheme).
        @return: a L{TLSPolicy} (the default when nothing matches).
        """
        key = _normalise_destination(destination)
        if key in self.entries:
            return self.entries[key]
        host = key
        if host.startswith("["):
            host = host[1:].split("]", 1)[0]
            if host in self.entries:
                return self.entries[host]
        labels = host.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self.entries:
                return self.entries[parent]
        return self.default

    def __len__(self) -> int:
        return len(self.entries)


def _normalise_destination(dest: str) -> str:
    d = dest.strip().lower()
    for scheme in ("smtp://", "smtps://"):
        if d.startswith(scheme):
            d = d[len(scheme):]
    if d.startswith("[") and d.endswith("]"):
        return d[1:-1].rstrip(".")
    if d.startswith("["):
        return d
    if d.count(":") == 1:  # host:port written without brackets
        host, port = d.split(":")
        return f"[{host.rstrip('.')}]:{port}"
    return d.rstrip(".")
