"""The one certificate-name check (RFC 6125), built on C{service_identity}.

Every path that checks the name in a server certificate uses L{check_names}:
the C{verify} and C{secure} levels (the MX or relay host name, the
recipient domain and its subdomains, or the policy file's C{match=} names),
MTA-STS C{enforce} and the diagnosis of C{testing} (the MX host name,
RFC 8461 4.2), the MTA-STS policy fetch (C{mta-sts.DOMAIN}) and DANE-TA
(the TLSA base domain and the next-hop domain, RFC 7672 3.2.3).

Reference identities (what we expect), one per wanted name:

  - C{"mx.example.com"}: a C{service_identity} C{DNS_ID};
  - C{"192.0.2.1"} or C{"2001:db8::1"}: an C{IPAddress_ID} (an IP
    subjectAltName must match; a relay given as an address literal);
  - C{".example.com"}: a L{SubdomainID}, our own reference identity for the
    policy file's C{.domain} names and C{secure}'s default (Postfix's
    C{dot-nexthop}): any name I{below} C{example.com} (not C{example.com}
    itself), including a wildcard C{*.example.com} or C{*.sub.example.com}.

Presented identities (what the certificate names): its subjectAltName DNS
and IP entries, each parsed by C{service_identity}, which enforces the
wildcard rules: C{*} only as the whole left-most label (C{f*.example.com}
matches nothing), at least three labels (C{*.com} is refused), one label
only (C{*.example.com} does not match C{a.b.example.com} nor
C{example.com}), never an A-label (C{*.example.com} does not match
C{xn--bcher-kva.example.com}). A malformed entry is skipped, not fatal: the
other names still count. A certificate with no DNS subjectAltName is
matched by its most specific (last) subject CN (RFC 6125 6.4.4; mail
servers still present such certificates, and Postfix accepts them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from cryptography import x509
from OpenSSL import crypto
from service_identity.exceptions import CertificateError as PatternError
from service_identity.exceptions import DNSMismatch, Mismatch
from service_identity.hazmat import (
    DNS_ID,
    CertificatePattern,
    DNSPattern,
    IPAddress_ID,
    IPAddressPattern,
    ServiceID,
)

from twisted_mailout.tls.errors import CertificateNameError

__all__ = [
    "SubdomainID",
    "check_names",
    "matches",
    "presented_names",
    "presented_patterns",
    "reference_id",
]


class SubdomainID:
    """A reference identity for "any host below a domain" (C{.example.com}),
    implementing C{service_identity.hazmat.ServiceID}.

    Matches a presented DNS name or wildcard with at least one label in
    front of the domain: C{mx.example.com}, C{a.b.example.com},
    C{*.example.com}; not C{example.com}, C{badexample.com}, or a partial
    wildcard (C{f*.example.com}).

    @ivar domain: the parent domain, lower case A-labels (bytes).
    @raise ValueError: C{domain} is not a valid DNS name.
    """

    pattern_class = DNSPattern
    error_on_mismatch: type[Mismatch] = DNSMismatch

    def __init__(self, domain: str) -> None:
        self.domain: bytes = DNS_ID(domain.strip().rstrip(".")).hostname

    def verify(self, pattern: CertificatePattern) -> bool:
        """Whether C{pattern} names a host below L{domain}.

        @param pattern: a presented identity (from L{presented_patterns}).
        @return: C{bool}.
        """
        if not isinstance(pattern, DNSPattern):
            return False
        suffix = b"." + self.domain
        name = pattern.pattern
        if not name.endswith(suffix):
            return False
        head = name[: -len(suffix)]
        if not head:
            return False
        first, _, rest = head.partition(b".")
        return b"*" not in rest and (first == b"*" or b"*" not in first)

    def __repr__(self) -> str:
        return f"SubdomainID({'.' + self.domain.decode('ascii')!r})"


def reference_id(name: str) -> ServiceID:
    """The reference identity for one wanted name.

    @param name: a host name (U-labels are encoded to A-labels), an IP
        address literal (C{[...]} brackets allowed), or C{.domain} for any
        host below C{domain}. A trailing dot is ignored.
    @return: a C{service_identity} C{DNS_ID} or C{IPAddress_ID}, or a
        L{SubdomainID}.
    @raise ValueError: an empty or malformed name.
    """
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return IPAddress_ID(text)
    except ValueError:
        pass
    text = text.rstrip(".").lower()
    try:
        if text.startswith("."):
            return SubdomainID(text[1:])
        return DNS_ID(text)
    except UnicodeError as e:  # idna refuses the U-labels
        raise ValueError(f"{name!r} is not a valid host name: {e}") from None


def _to_crypto(cert: x509.Certificate | crypto.X509) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, crypto.X509):
        return cert.to_cryptography()
    raise TypeError(f"not a certificate: {cert!r}")


def _dns_san(cert: x509.Certificate) -> tuple[list[str], list[ipaddress.IPv4Address
                                                           | ipaddress.IPv6Address]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):  # absent, or malformed
        return [], []
    ips = [ip for ip in san.get_values_for_type(x509.IPAddress)
           if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)]  # not networks
    return san.get_values_for_type(x509.DNSName), ips


def presented_names(cert: x509.Certificate | crypto.X509) -> list[str]:
    """The names a certificate is for, as written in it (lower case, no
    trailing dot): its DNS and IP subjectAltNames, or its last subject CN
    when it has no DNS subjectAltName. For log and error messages.

    @param cert: a C{cryptography} certificate or a pyOpenSSL C{X509}.
    @return: C{list[str]}, possibly empty.
    @raise TypeError: C{cert} is not a certificate.
    """
    c = _to_crypto(cert)
    dns_names, ips = _dns_san(c)
    out = [n.rstrip(".").lower() for n in dns_names]
    if not out:
        cns = c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if cns and isinstance(cns[-1].value, str):
            out.append(cns[-1].value.rstrip(".").lower())
    out.extend(str(ip) for ip in ips)
    return out


def presented_patterns(cert: x509.Certificate | crypto.X509) -> list[CertificatePattern]:
    """The presented identities of a certificate, parsed by C{service_identity}.

    @param cert: a C{cryptography} certificate or a pyOpenSSL C{X509}.
    @return: C{DNSPattern}s and C{IPAddressPattern}s; entries that
        C{service_identity} refuses (C{*.com}, two wildcards, an empty
        label, an address written as a DNS name) are left out.
    @raise TypeError: C{cert} is not a certificate.
    """
    c = _to_crypto(cert)
    dns_names, ips = _dns_san(c)
    if not dns_names:
        cns = c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if cns and isinstance(cns[-1].value, str):
            dns_names = [cns[-1].value]
    patterns: list[CertificatePattern] = []
    for n in dns_names:
        try:
            patterns.append(DNSPattern.from_bytes(n.rstrip(".").encode("utf-8")))
        except (PatternError, TypeError, UnicodeError):
            continue
    patterns.extend(IPAddressPattern(ip) for ip in ips)
    return patterns


def matches(cert: x509.Certificate | crypto.X509, wanted: Sequence[str]) -> bool:
    """Whether C{cert} names at least one of C{wanted} (see L{check_names}).

    @return: C{bool}; C{False} when a wanted name is malformed or C{wanted}
        is empty.
    """
    try:
        check_names(cert, wanted)
    except CertificateNameError:
        return False
    return True


def check_names(cert: x509.Certificate | crypto.X509, wanted: Sequence[str]) -> None:
    """Check that the certificate names at least one of C{wanted}
    (RFC 6125 6.4 with C{service_identity}'s rules; see the module docstring).

    Only the name is checked: the chain's trust and dates are the TLS
    layer's job (L{twisted_mailout.tls.creators}).

    @param cert: the server's certificate: C{cryptography} or pyOpenSSL.
    @param wanted: reference names (see L{reference_id}).
    @raise CertificateNameError: no wanted name matches (or C{wanted} is
        empty, or a wanted name is malformed); the message lists the first
        five names the certificate has and what was expected.
    @raise TypeError: C{cert} is not a certificate.
    """
    try:
        ids = [reference_id(w) for w in wanted]
    except ValueError as e:
        raise CertificateNameError(f"cannot check the certificate name: {e} "
                                   f"(expected {' or '.join(wanted)})") from None
    patterns = presented_patterns(cert)
    if any(i.verify(p) for i in ids for p in patterns):
        return
    shown = ", ".join(presented_names(cert)[:5]) or "no DNS name"
    raise CertificateNameError(
        f"certificate names {shown}; expected {' or '.join(wanted) or 'a name'}")
