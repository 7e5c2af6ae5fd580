"""DANE for SMTP (RFC 7672): DNSSEC-aware lookups, TLSA matching, a STARTTLS
connection creator that authenticates the server by its TLSA records.

The pieces, in the order a delivery uses them:

1. L{twisted_mailout.routing.dnssec.DNSSECResolver} asks a I{validating}
   resolver the operator declared (C{--dnssec-resolver}) and reports
   whether each answer came back authenticated (the AD bit, RFC 4035
   3.2.3); it and the TLSA record type live in the routing layer and are
   re-exported here.
2. L{host_policy} applies RFC 7672 2.2: with a secure MX RRset and secure
   address records for the MX host, it looks up C{_PORT._tcp.HOST} TLSA
   records and returns a L{DANEPolicy}: C{"dane"} (usable records: the server
   must match them), C{"encrypt"} (secure TLSA RRset whose records are all
   unusable: mandatory unauthenticated TLS, RFC 7672 2.2), or C{"none"}
   (DANE does not apply: use the configured TLS level). A TLSA lookup that
   fails (SERVFAIL, which is also how a validating resolver reports a
   I{bogus} answer, or a timeout) raises L{DNSSECLookupError}: that host must
   not be used (RFC 7672 2.1.1).
3. L{dane_tls} (or C{DANEPolicy.tls_creator}) is the STARTTLS connection creator
   for the SMTP session (with C{tls="encrypt"}, which makes STARTTLS
   mandatory), a L{twisted_mailout.tls.creators.ClientTLS}: the TLS
   handshake succeeds only when the server's chain matches a usable record
   (L{verify_chain}); otherwise it fails with L{DANEVerificationError}, an
   C{OpenSSL.SSL.Error} whose text says why. DANE-TA checks the server's
   name with the one name check, L{twisted_mailout.tls.names}.

Supported (RFC 7672 3.1): certificate usages DANE-TA(2) and DANE-EE(3);
selectors Cert(0) and SPKI(1); matching types Full(0), SHA2-256(1),
SHA2-512(2). PKIX-TA(0)/PKIX-EE(1) and unknown parameters are unusable.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
from OpenSSL import SSL, crypto
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mailout.errors import TLSError
from twisted_mailout.routing.dnssec import (
    TLSA,
    TLSA_TYPE,
    DNSSECLookupError,
    DNSSECResolver,
    Lookup,
    parse_tlsa,
    tlsa_name,
)
from twisted_mailout.routing.resolver import normalise_name
from twisted_mailout.tls import names as _names
from twisted_mailout.tls.creators import ClientTLS, client_context, opportunistic_tls

__all__ = [
    "DANE_EE",
    "DANE_TA",
    "TLSA",
    "TLSA_TYPE",
    "DANEMode",
    "DANEPolicy",
    "DANEVerificationError",
    "DNSSECLookupError",
    "DNSSECResolver",
    "Lookup",
    "Policy",
    "dane_tls",
    "host_policy",
    "matches",
    "parse_tlsa",
    "tlsa_name",
    "usable",
    "verify_chain",
]

log = Logger()

# RFC 6698 7.2-7.4 / RFC 7218 acronyms
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
SEL_CERT, SEL_SPKI = 0, 1
MATCH_FULL, MATCH_SHA256, MATCH_SHA512 = 0, 1, 2

_DIGEST_SIZE = {MATCH_SHA256: 32, MATCH_SHA512: 64}


# --------------------------------------------------------------------------- records


def usable(records: Iterable[TLSA]) -> list[TLSA]:
    """The records an SMTP client may use (RFC 7672 3.1, RFC 7671 4).

    Usages DANE-TA(2) and DANE-EE(3) only (PKIX-TA(0) and PKIX-EE(1) are not
    for SMTP, 3.1.3); selectors 0 and 1; matching types 0, 1, 2. A digest
    of the wrong length (not 32 octets for SHA-256, not 64 for SHA-512) or
    empty full data cannot match anything and is unusable too.

    @param records: L{TLSA} records (e.g. C{Lookup.records} of
        L{DNSSECResolver.tlsa}).
    @return: the usable ones, in their order. Empty while C{records} is
        not: every record is unusable, and the client must still use TLS,
        unauthenticated (RFC 7672 2.2).
    """
    out = []
    for r in records:
        if r.usage not in (DANE_TA, DANE_EE) or r.selector not in (SEL_CERT, SEL_SPKI):
            continue
        if r.mtype == MATCH_FULL:
            if r.data:
                out.append(r)
        elif r.mtype in _DIGEST_SIZE and len(r.data) == _DIGEST_SIZE[r.mtype]:
            out.append(r)
    return out


# --------------------------------------------------------------------------- matching


class DANEVerificationError(SSL.Error, TLSError):
    """The server's certificate chain matches none of the usable TLSA records
    (or, for DANE-TA, fails the checks that go with a match: chaining,
    validity, name; RFC 7672 3.1.2).

    An C{OpenSSL.SSL.Error} so that Twisted's TLS layer treats it as a failed
    handshake (the connection is closed with it as the reason); its
    C{args[0]} has the C{[(lib, func, reason)]} shape of pyOpenSSL errors.

    @ivar reason: why (str).
    """

    def __init__(self, reason: str):
        super().__init__([("DANE", "verify", reason)])
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def _der_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """One DER TLV at C{pos}: C{(tag, value_start, value_end)}.

    @raise ValueError: truncated, or a tag/length form DER does not allow here.
    """
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("high-tag-number DER not expected in a certificate")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def spki_der(cert_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a certificate, byte for byte as it is in
    the certificate (RFC 5280 4.1; what selector 1 hashes, RFC 6698 2.1.2).

    Re-encoding the public key (as C{public_bytes} does) could differ from
    the certificate's own encoding; this slices the original instead.

    @param cert_der: the certificate, DER.
    @return: the DER of its C{subjectPublicKeyInfo}.
    @raise ValueError: not a certificate's DER.
    """
    _, cert_start, _ = _der_tlv(cert_der, 0)
    tag, tbs_start, tbs_end = _der_tlv(cert_der, cert_start)
    if tag != 0x30:
        raise ValueError("no TBSCertificate")
    pos = tbs_start
    tag, _, end = _der_tlv(cert_der, pos)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = end
    # serialNumber, signature, issuer, validity, subject, then subjectPublicKeyInfo
    for _ in range(5):
        _, _, pos = _der_tlv(cert_der, pos)
    tag, _, end = _der_tlv(cert_der, pos)
    if tag != 0x30 or end > tbs_end:
        raise ValueError("no subjectPublicKeyInfo")
    return cert_der[pos:end]


def _to_crypto(cert: x509.Certificate | crypto.X509) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    to = getattr(cert, "to_cryptography", None)  # OpenSSL.crypto.X509
    if to is None:
        raise TypeError(f"not a certificate: {cert!r}")
    return to()


def _association(cert: x509.Certificate, selector: int) -> bytes:
    der = cert.public_bytes(Encoding.DER)
    return der if selector == SEL_CERT else spki_der(der)


def _record_matches(r: TLSA, cert: x509.Certificate) -> bool:
    data = _association(cert, r.selector)
    if r.mtype == MATCH_SHA256:
        data = hashlib.sha256(data).digest()
    elif r.mtype == MATCH_SHA512:
        data = hashlib.sha512(data).digest()
    return secrets.compare_digest(data, r.data)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def _signed_by_key(cert: x509.Certificate, key: object) -> bool:
    """Whether C{key} (a public key object) made C{cert}'s signature."""
    try:
        params = cert.signature_algorithm_parameters
        digest = cert.signature_hash_algorithm
        if isinstance(key, rsa.RSAPublicKey):
            if not isinstance(params, padding.PKCS1v15 | padding.PSS) or digest is None:
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, params, digest)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, params)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _valid_at(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def verify_chain(records: Iterable[TLSA], chain: Sequence, names: Sequence[str],
                 now: datetime.datetime | None = None) -> TLSA:
    """Authenticate a server's certificate chain with TLSA records (RFC 7672 3.1).

    - DANE-EE(3): the leaf (first) certificate, or its public key, matches;
      its names and validity dates are not checked (3.1.1).
    - DANE-TA(2): a certificate the server presented (below the leaf)
      matches, the leaf chains to it through presented certificates (each
      signature checked, each issuer below the trust anchor a CA, each
      certificate below the trust anchor within its validity dates), and
      the leaf's DNS subjectAltNames (or, with none, its CN) match one of
      C{names}, with C{*} as a whole left-most label (3.1.2, 3.2). A TA
      record giving the full SubjectPublicKeyInfo (2 1 0) also works when
      the server omits the trust anchor's certificate: the top presented
      certificate must then be signed by that key (RFC 7671 5.2.2).

    @param records: TLSA records; only L{usable} ones are considered.
    @param chain: the presented chain, leaf first: C{cryptography}
        C{x509.Certificate}s or C{OpenSSL.crypto.X509}s.
    @param names: reference identifiers for DANE-TA: the TLSA base domain
        (the MX host name), and any other names the caller accepts, such as
        the next-hop domain (3.2.2). A-labels.
    @param now: the time for validity checks (aware datetime; default now).
    @return: the record that matched.
    @raise DANEVerificationError: nothing matched; the message says what was
        tried.
    @raise TypeError: something in C{chain} is not a certificate.
    """
    recs = usable(records)
    if not recs:
        raise DANEVerificationError("no usable TLSA record (usages 2 and 3 only)")
    certs = [_to_crypto(c) for c in chain]
    if not certs:
        raise DANEVerificationError("the server presented no certificate")
    now = now or datetime.datetime.now(datetime.UTC)
    leaf = certs[0]
    for r in recs:
        if r.usage == DANE_EE and _record_matches(r, leaf):
            return r
    ta_records = [r for r in recs if r.usage == DANE_TA]
    ee_count = len(recs) - len(ta_records)
    if not ta_records:
        return _fail(f"the server certificate matches none of the {ee_count} DANE-EE "
                     "TLSA record(s)", leaf)
    ta_problem = _verify_ta(ta_records, certs, [normalise_name(n) for n in names], now)
    if isinstance(ta_problem, TLSA):
        return ta_problem
    parts = []
    if ee_count:
        parts.append(f"the server certificate matches none of the {ee_count} DANE-EE record(s)")
    parts.append(ta_problem)
    return _fail("; ".join(parts), leaf)


def _fail(text: str, leaf: x509.Certificate) -> NoReturn:
    digest = hashlib.sha256(spki_der(leaf.public_bytes(Encoding.DER))).hexdigest()
    raise DANEVerificationError(f"{text} (server key: 3 1 1 {digest})")


def _verify_ta(ta_records: list[TLSA], certs: list[x509.Certificate], names: list[str],
               now: datetime.datetime) -> TLSA | str:
    """The matching DANE-TA record, or a str saying why none could be used."""
    leaf = certs[0]
    path = [leaf]  # leaf, then each issuer, up to the trust anchor
    found: TLSA | None = None
    anchor_is_cert = True
    current = leaf
    while found is None:
        issuer = None
        for c in certs:
            if all(c is not p for p in path) and c.subject == current.issuer \
                    and _issued_by(current, c):
                issuer = c
                break
        if issuer is None:
            # The trust anchor may be a bare public key the server did not
            # send a certificate for (2 1 0): does it sign the top one?
            for r in ta_records:
                if r.selector == SEL_SPKI and r.mtype == MATCH_FULL:
                    try:
                        key = load_der_public_key(r.data)
                    except (ValueError, UnsupportedAlgorithm):
                        continue
                    if _signed_by_key(current, key):
                        found = r
                        anchor_is_cert = False
                        break
            if found is None:
                return (f"no DANE-TA record matches a certificate the leaf chains to "
                        f"({len(certs)} presented, {len(path)} linked by signatures)")
            break
        for r in ta_records:
            if _record_matches(r, issuer):
                found = r
                break
        if found is None and not _is_ca(issuer):
            return f"issuer {issuer.subject.rfc4514_string()} is not a CA"
        path.append(issuer)
        current = issuer
    # Everything below the trust anchor must be currently valid (the anchor
    # itself is trusted as it is, RFC 5280 6.1.1 (d)).
    below = path[:-1] if anchor_is_cert else path
    for c in below:
        if not _valid_at(c, now):
            return (f"certificate {c.subject.rfc4514_string()} is outside its validity "
                    f"period ({c.not_valid_before_utc:%Y-%m-%d} to "
                    f"{c.not_valid_after_utc:%Y-%m-%d}) under DANE-TA")
    if not _names.matches(leaf, names):
        return (f"the chain matches DANE-TA but the certificate names "
                f"{_names.presented_names(leaf)} match none of {names}")
    return found


def matches(records: Iterable[TLSA], chain: Sequence, names: Sequence[str],
            now: datetime.datetime | None = None) -> bool:
    """Whether L{verify_chain} accepts C{chain}.

    @return: C{True} when a usable record authenticates the chain.
    """
    try:
        verify_chain(records, chain, names, now)
        return True
    except DANEVerificationError:
        return False


# --------------------------------------------------------------------------- TLS


class _DANEAuthenticator:
    """The C{authenticate} hook of L{ClientTLS} for DANE: judges the chain
    with L{verify_chain} and remembers the record that matched."""

    def __init__(self, hostname: str, records: tuple[TLSA, ...], names: tuple[str, ...]):
        self.hostname = hostname
        self.records = records
        self.names = names
        self.matched: TLSA | None = None

    def __call__(self, conn: SSL.Connection, chain: list[crypto.X509]) -> None:
        # OpenSSL's own (PKIX) verdict is ignored: DANE-EE needs none, and
        # DANE-TA checks the chain itself up to the matching anchor.
        try:
            self.matched = verify_chain(self.records, chain, self.names)
        except DANEVerificationError as e:
            log.info("DANE: {host}: {reason}", host=self.hostname, reason=e.reason)
            raise DANEVerificationError(f"DANE authentication of {self.hostname} failed: "
                                        f"{e.reason}") from None


class _DANETLS(ClientTLS):
    """STARTTLS client connections authenticated by TLSA records."""

    def __init__(self, hostname: str, records: Sequence[TLSA], names: Sequence[str]):
        good = tuple(usable(records))
        if not good:
            raise ValueError("dane_tls needs at least one usable TLSA record")
        self.hostname = hostname
        self.records = good
        self.names = tuple(names) or (hostname,)
        self._check = _DANEAuthenticator(hostname, self.records, self.names)
        # RFC 7672 8.1: SNI is the TLSA base domain.
        super().__init__(client_context(), hostname, authenticate=self._check)

    @property
    def matched(self) -> TLSA | None:
        """The record that authenticated the server on the last successful
        handshake, or L{None}."""
        return self._check.matched


def dane_tls(hostname: str, records: Sequence[TLSA], names: Sequence[str] = ()) -> ClientTLS:
    """A STARTTLS connection creator that authenticates the server by DANE.

    TLS 1.2 or newer, SNI set to C{hostname} (RFC 7672 8.1). The handshake
    fails with L{DANEVerificationError} (its text says why, e.g. "DANE
    authentication of mx.example failed: the server certificate matches
    none of the 1 DANE-EE TLSA record(s) (server key: 3 1 1 ...)") unless
    L{verify_chain} accepts the presented chain.

    Use with C{ESMTPSession(tls="encrypt", tls_creator=lambda h:
    dane_tls(...))}: "encrypt" makes STARTTLS mandatory; this creator adds
    the authentication.

    @param hostname: the TLSA base domain (the MX host name, after secure
        CNAME expansion, RFC 7672 2.2.3).
    @param records: TLSA records; only L{usable} ones count.
    @param names: DANE-TA reference identifiers (3.2.2); default
        C{[hostname]}.
    @return: an C{IOpenSSLClientConnectionCreator}; one per connection.
        After a successful handshake its C{matched} attribute is the
        L{TLSA} record that authenticated the server (for logs).
    @raise ValueError: no usable record (use unauthenticated TLS then).
    """
    return _DANETLS(hostname, records, names)


# --------------------------------------------------------------------------- policy


class DANEMode(StrEnum):
    """What DANE says about one MX host (RFC 7672 2.2); compares equal to its
    string value."""

    #: Usable TLSA records: TLS required and the server must match them.
    DANE = "dane"
    #: Secure TLSA records, none usable: TLS required, not authenticated.
    ENCRYPT = "encrypt"
    #: DANE does not apply: the configured TLS level stands.
    NONE = "none"


@dataclass(frozen=True)
class DANEPolicy:
    """What DANE says about one MX host (RFC 7672 2.2).

    @ivar mode: a L{DANEMode}: C{"dane"}: TLS required and the server must match
        C{records}; C{"encrypt"}: secure TLSA records exist but none is
        usable: TLS required, no authentication; C{"none"}: DANE does not
        apply (insecure MX or address records, or no TLSA records): use the
        configured TLS level.
    @ivar host: the TLSA base domain (SNI, logs).
    @ivar records: the usable records (C{"dane"} only).
    @ivar names: DANE-TA reference identifiers.
    @ivar reason: why this mode, for logs.
    @ivar tlsa: every TLSA record found, usable or not (for logs).
    """

    mode: DANEMode
    host: str
    records: tuple[TLSA, ...] = ()
    names: tuple[str, ...] = ()
    reason: str = ""
    tlsa: tuple[TLSA, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", DANEMode(self.mode))  # a str is accepted too

    @property
    def tls_level(self) -> str | None:
        """The session TLS level this policy imposes (C{"encrypt"}: STARTTLS
        mandatory), or L{None} for C{"none"} (keep the configured level)."""
        return None if self.mode is DANEMode.NONE else "encrypt"

    def tls_creator(self, hostname: str | None = None) -> ClientTLS:
        """For C{ESMTPSession(tls_creator=...)}: L{dane_tls} for C{"dane"},
        unauthenticated TLS (L{twisted_mailout.tls.creators.opportunistic_tls})
        otherwise.

        @param hostname: ignored (the session passes its host name; the
            policy already knows the TLSA base domain).
        """
        if self.mode is DANEMode.DANE:
            return dane_tls(self.host, self.records, self.names)
        return opportunistic_tls(self.host)


#: The old name of L{DANEPolicy}, kept for one release (three classes were
#: called "Policy": this one, the MTA-STS policy and the TLS level policy).
Policy = DANEPolicy


def host_policy(resolver: DNSSECResolver, host: str, *, port: int = 25, mx_secure: bool,
                domain: str | None = None) -> defer.Deferred[DANEPolicy]:
    """The DANE policy for one MX host (RFC 7672 2.2).

    Steps: no DANE unless C{mx_secure}; no DANE unless the host's A and AAAA
    answers are secure (2.2.3); TLSA at the CNAME-expanded name, then (if
    it has none) at the original name (2.2.3); then by the TLSA answer:
    insecure or empty -> C{"none"}; only unusable records -> C{"encrypt"};
    usable records -> C{"dane"}.

    @param resolver: a L{DNSSECResolver}.
    @param host: the MX host name (A-label).
    @param port: the TCP port mail goes to (the C{_PORT._tcp} label).
    @param mx_secure: the domain's MX RRset was secure (C{Lookup.secure}
        of L{DNSSECResolver.mx}); for an implicit MX (no MX records), the
        secure denial of the MX RRset.
    @param domain: the next-hop domain, also accepted as a DANE-TA name
        (3.2.2); L{None} to accept only the host names.
    @return: a Deferred firing with a L{DANEPolicy}, or failing with
        L{DNSSECLookupError} when the address or TLSA lookups fail (SERVFAIL,
        bogus, timeout): the host must not be used now (2.1.1).
    """
    return defer.Deferred.fromCoroutine(
        _host_policy(resolver, host.rstrip(".").lower(), port, mx_secure, domain))


async def _host_policy(resolver: DNSSECResolver, host: str, port: int, mx_secure: bool,
                       domain: str | None) -> DANEPolicy:
    if not mx_secure:
        return DANEPolicy(DANEMode.NONE, host, reason="MX RRset not DNSSEC-secure")
    secure, canonical = await resolver.addresses_secure(host)
    if not secure:
        return DANEPolicy(DANEMode.NONE, host,
                          reason=f"address records of {host} not DNSSEC-secure")
    bases = [canonical, host] if canonical != host else [host]
    lookup = None
    base = host
    for base in bases:
        lookup = await resolver.tlsa(base, port)
        if not lookup.secure:
            return DANEPolicy(DANEMode.NONE, base, reason=f"TLSA RRset of {base} not DNSSEC-secure")
        if lookup.records:
            break
    assert lookup is not None
    if not lookup.records:
        return DANEPolicy(DANEMode.NONE, base,
                          reason=f"no TLSA records for {tlsa_name(base, port)}")
    good = usable(lookup.records)
    names = [base]
    if host != base:
        names.append(host)
    if domain:
        names.append(domain.rstrip(".").lower())
    if not good:
        return DANEPolicy(DANEMode.ENCRYPT, base, (), tuple(names),
                      reason=f"{len(lookup.records)} TLSA record(s) for {base}, none usable: "
                      "unauthenticated TLS (RFC 7672 2.2)", tlsa=lookup.records)
    return DANEPolicy(DANEMode.DANE, base, tuple(good), tuple(names),
                  reason=f"{len(good)} usable TLSA record(s) for {base}", tlsa=lookup.records)
