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

from OpenSSL import SSL
from twisted.internet import interfaces, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "LEVELS",
    "REQUIRED",
    "CertificateError",
    "CertificateNameError",
    "PolicyFileError",
    "PolicyTable",
    "TLSPolicy",
    "name_checking_tls",
]

LEVELS = ("none", "may", "encrypt", "verify", "secure", "dane", "dane-only")
#: Levels under which a host without working TLS is not used.
REQUIRED = frozenset({"encrypt", "verify", "secure", "dane-only"})


class PolicyFileError(ValueError):
    """A policy file that cannot be used; the text names the file and line."""


class CertificateError(Exception):
    """A server certificate refused by a verifying level.

    @ivar result_type: the RFC 8460 4.3 result type naming the failure
        (C{"certificate-expired"}, C{"certificate-not-trusted"},
        C{"certificate-host-mismatch"}, C{"validation-failure"}).
    """

    result_type = "validation-failure"

    def __init__(self, text: str, result_type: str | None = None):
        super().__init__(text)
        if result_type is not None:
            self.result_type = result_type


class CertificateNameError(CertificateError):
    """The server's certificate verified but names none of the expected
    hosts (C{verify}/C{secure}); the text lists what it names and what was
    expected."""

    result_type = "certificate-host-mismatch"


#: OpenSSL X509_V_ERR_* codes worth naming, with their RFC 8460 result type.
_VERIFY_ERRORS = {
    9: ("certificate is not yet valid", "certificate-expired"),
    10: ("certificate has expired", "certificate-expired"),
    18: ("self-signed certificate", "certificate-not-trusted"),
    19: ("self-signed certificate in the chain", "certificate-not-trusted"),
    20: ("unable to get the issuer certificate (unknown CA)", "certificate-not-trusted"),
    21: ("unable to verify the first certificate (unknown CA)", "certificate-not-trusted"),
    2: ("unable to get the issuer certificate (unknown CA)", "certificate-not-trusted"),
    7: ("certificate signature failure", "validation-failure"),
    23: ("certificate revoked", "certificate-not-trusted"),
    24: ("invalid CA certificate", "certificate-not-trusted"),
}


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

    def __post_init__(self):
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


def _cert_names(cert) -> list[str]:
    """DNS names a certificate is for: its subjectAltName DNS entries, or its
    subject CN when it has none (RFC 6125 6.4.4), lower case."""
    from cryptography import x509

    c = cert.to_cryptography()
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return [n.lower().rstrip(".") for n in names]
        return []
    except x509.ExtensionNotFound:
        pass
    return [a.value.lower().rstrip(".") for a in
            c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            if isinstance(a.value, str)]


def name_matches(cert_names: list[str], wanted: tuple[str, ...]) -> bool:
    """Whether a certificate naming C{cert_names} fits C{wanted}.

    C{"host.example.com"} is matched by the same name or by a leftmost
    wildcard C{"*.example.com"} (one label only, RFC 6125 6.4.3);
    C{".example.com"} (any subdomain) by any name or wildcard under it.
    """
    for want in wanted:
        if want.startswith("."):
            for n in cert_names:
                bare = n[2:] if n.startswith("*.") else n
                if n.endswith(want) or ("." + bare).endswith(want):
                    return True
            continue
        for n in cert_names:
            if n == want:
                return True
            if n.startswith("*.") and "." in want:
                head, rest = want.split(".", 1)
                if head and rest == n[2:]:
                    return True
    return False


@implementer(interfaces.IOpenSSLClientConnectionCreator)
class _NameCheckingTLS:
    def __init__(self, sni: str | None, wanted: tuple[str, ...], trust_root):
        options = ssl.CertificateOptions(trustRoot=trust_root,
                                         raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        self._ctx = options.getContext()
        self._sni = sni.encode("idna") if sni and not _is_ip(sni) else None
        self._wanted = wanted

    def clientConnectionForTLS(self, tlsProtocol):
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        if self._sni:
            conn.set_tlsext_host_name(self._sni)
        wanted = self._wanted
        proto = [tlsProtocol]

        def verify(conn, cert, err, depth, ok):
            if not proto:
                return ok
            if not ok:
                p = proto.pop()
                text, kind = _VERIFY_ERRORS.get(err, (f"certificate verify error {err}",
                                                      "validation-failure"))
                p.failVerification(Failure(CertificateError(
                    f"certificate verify failed: {text} (depth {depth})", kind)))
                return False
            if depth != 0:
                return True
            p = proto.pop()
            try:
                names = _cert_names(cert)
            except Exception:  # noqa: BLE001 - an unreadable certificate fails
                names = []
            if name_matches(names, wanted):
                return True
            shown = ", ".join(names[:5]) or "no DNS name"
            p.failVerification(Failure(CertificateNameError(
                f"certificate names {shown}; expected {' or '.join(wanted)}")))
            return False

        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        conn.set_connect_state()
        return conn


def _is_ip(host: str) -> bool:
    """An IP address literal (no SNI is sent for one, RFC 6066 3)."""
    return isIPAddress(host) or isIPv6Address(host)


def name_checking_tls(sni: str | None, wanted: tuple[str, ...], trust_root):
    """A TLS connection creator for C{verify} and C{secure}: the chain must
    verify against C{trust_root} (expiry included) and the leaf must name one
    of C{wanted} (see L{name_matches}); TLS 1.2 or newer.

    @param sni: the name sent as SNI (the MX or relay host name).
    @param wanted: names from L{TLSPolicy.names_for}.
    @param trust_root: from L{session.load_trust_root}.
    @return: an C{IOpenSSLClientConnectionCreator}; a failed check aborts
        the handshake with L{CertificateNameError} or an C{SSL.Error}
        (certificate verify failed: expired, self-signed, unknown CA).
    """
    return _NameCheckingTLS(sni, wanted, trust_root)
