"""DANE for SMTP (RFC 7672): DNSSEC-aware lookups, TLSA matching, a STARTTLS
connection creator that authenticates the server by its TLSA records.

The pieces, in the order a delivery uses them:

1. L{DNSSECResolver} asks a I{validating} resolver the operator declared
   (C{--dnssec-resolver}) and reports whether each answer came back
   authenticated (the AD bit, RFC 4035 3.2.3, requested with the AD bit in
   the query, RFC 6840 5.7). DNS stays in C{twisted.names}: messages are
   C{twisted.names.dns.Message}s, sent over UDP (TCP when truncated).
2. L{host_policy} applies RFC 7672 2.2: with a secure MX RRset and secure
   address records for the MX host, it looks up C{_PORT._tcp.HOST} TLSA
   records and returns a L{Policy}: C{"dane"} (usable records: the server
   must match them), C{"encrypt"} (secure TLSA RRset whose records are all
   unusable: mandatory unauthenticated TLS, RFC 7672 2.2), or C{"none"}
   (DANE does not apply: use the configured TLS level). A TLSA lookup that
   fails (SERVFAIL, which is also how a validating resolver reports a
   I{bogus} answer, or a timeout) raises L{DNSLookupError}: that host must
   not be used (RFC 7672 2.1.1).
3. L{dane_tls} (or C{Policy.tls_creator}) is the STARTTLS connection creator
   for L{twisted_mailout.smtp.protocol.ESMTPSession} (with C{tls="encrypt"}, which
   makes STARTTLS mandatory): the TLS handshake succeeds only when the
   server's chain matches a usable record (L{verify_chain}); otherwise it
   fails with L{DANEVerificationError}, an C{OpenSSL.SSL.Error} whose text
   says why.

Supported (RFC 7672 3.1): certificate usages DANE-TA(2) and DANE-EE(3);
selectors Cert(0) and SPKI(1); matching types Full(0), SHA2-256(1),
SHA2-512(2). PKIX-TA(0)/PKIX-EE(1) and unknown parameters are unusable.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
from OpenSSL import SSL
from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.names import dns
from zope.interface import implementer

__all__ = [
    "DANE_EE",
    "DANE_TA",
    "DANEVerificationError",
    "DNSLookupError",
    "DNSSECResolver",
    "Lookup",
    "Policy",
    "TLSA",
    "dane_tls",
    "host_policy",
    "matches",
    "parse_tlsa",
    "tlsa_name",
    "usable",
    "verify_chain",
]

log = Logger()

TLSA_TYPE = 52  # RFC 6698 7.1; twisted.names has no Record_TLSA

# RFC 6698 7.2-7.4 / RFC 7218 acronyms
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
SEL_CERT, SEL_SPKI = 0, 1
MATCH_FULL, MATCH_SHA256, MATCH_SHA512 = 0, 1, 2

_DIGEST_SIZE = {MATCH_SHA256: 32, MATCH_SHA512: 64}

_RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TLSA:
    """One TLSA record's data (RFC 6698 2.1).

    @ivar usage: certificate usage (0-3; only 2 DANE-TA and 3 DANE-EE are
        usable for SMTP, RFC 7672 3.1).
    @ivar selector: 0 the full certificate, 1 its SubjectPublicKeyInfo.
    @ivar mtype: matching type: 0 exact, 1 SHA-256, 2 SHA-512.
    @ivar data: the certificate association data (bytes).
    """

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def parse_tlsa(rdata: bytes) -> TLSA:
    """Parse the RDATA of a TLSA record (RFC 6698 2.1: three octets then the data).

    @param rdata: the wire-format RDATA (e.g. C{dns.UnknownRecord.data}).
    @return: a L{TLSA}.
    @raise ValueError: fewer than 4 octets.
    """
    if len(rdata) < 4:
        raise ValueError(f"TLSA RDATA of {len(rdata)} octets is too short")
    return TLSA(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))


def tlsa_name(host: str, port: int = 25) -> str:
    """The TLSA owner name for C{host} and TCP C{port}: C{_25._tcp.host}
    (RFC 6698 3, RFC 7672 2.2.3).

    @param host: an A-label host name (a trailing dot is dropped).
    @param port: the TCP port mail is delivered to.
    @return: the name (str, no trailing dot, lower case).
    """
    return f"_{port}._tcp.{host.rstrip('.').lower()}"


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


# --------------------------------------------------------------------------- DNS


class DNSLookupError(Exception):
    """A DNSSEC-aware lookup failed: SERVFAIL (the resolver's answer for
    I{bogus} data, RFC 4035 5.5, as well as for unreachable servers),
    REFUSED, FORMERR, a timeout, or a malformed answer. Always temporary
    for mail: the host or domain concerned must not be used now
    (RFC 7672 2.1.1).

    @ivar name: the name asked (str).
    @ivar rrtype: the record type asked (int).
    @ivar rcode: the DNS response code, or L{None} for timeouts and
        transport errors.
    @ivar reason: a short description (str).
    """

    def __init__(self, name: str, rrtype: int, rcode: int | None, reason: str):
        tname = dns.QUERY_TYPES.get(rrtype, "TLSA" if rrtype == TLSA_TYPE else str(rrtype))
        super().__init__(f"{tname} lookup for {name} failed: {reason}")
        self.name = name
        self.rrtype = rrtype
        self.rcode = rcode
        self.reason = reason


@dataclass(frozen=True)
class Lookup:
    """The outcome of one DNSSEC-aware lookup.

    @ivar name: the name asked (lower case, no trailing dot).
    @ivar rrtype: the type asked.
    @ivar secure: the resolver set the AD bit: every RRset of the answer
        (and of the denial, for NXDOMAIN/NODATA) was validated (RFC 4035
        3.2.3). Meaningful only when the resolver is a trusted, validating
        one reached over a trusted path (loopback).
    @ivar records: the data of the C{rrtype} records at the end of the CNAME
        chain: L{TLSA} for TLSA, C{(preference, host)} for MX, address
        strings for A/AAAA, host strings for CNAME/NS/PTR, the
        C{twisted.names} payload otherwise. Empty for NXDOMAIN and NODATA.
    @ivar canonical: the name after following CNAMEs in the answer
        (equal to C{name} when there was none).
    @ivar nxdomain: the answer was NXDOMAIN.
    @ivar ttl: the smallest TTL of the records used (seconds), or L{None}.
    """

    name: str
    rrtype: int
    secure: bool
    records: tuple = ()
    canonical: str = ""
    nxdomain: bool = False
    ttl: int | None = None


def _name(n) -> str:
    if isinstance(n, bytes):
        n = n.decode("ascii", "replace")
    return str(n).rstrip(".").lower()


def _convert(rr) -> object:
    p = rr.payload
    if rr.type == TLSA_TYPE:
        return parse_tlsa(p.data)
    if rr.type == dns.MX:
        return (p.preference, _name(p.name))
    if rr.type == dns.A:
        return p.dottedQuad()
    if rr.type == dns.AAAA:
        return str(ipaddress.IPv6Address(p.address))
    if rr.type in (dns.CNAME, dns.NS, dns.PTR):
        return _name(p.name)
    return p


class _UDPExchange(protocol.DatagramProtocol):
    """Sends one query datagram; C{d} fires with the first matching reply."""

    def __init__(self, server: tuple[str, int], payload: bytes, check):
        self.server = server
        self.payload = payload
        self.check = check
        self.d: defer.Deferred = defer.Deferred()

    def startProtocol(self):
        self.transport.write(self.payload, self.server)

    def datagramReceived(self, data, addr):
        if self.d.called or (addr[0], addr[1]) != self.server:
            return  # late, or from someone else: ignored
        reply = self.check(data)
        if reply is not None:
            self.d.callback(reply)


class _TCPExchange(protocol.Protocol):
    """Sends one length-prefixed query over TCP (RFC 1035 4.2.2); C{lost}
    fires, once the connection is closed, with the reply (a C{dns.Message})
    or the reason there is none (an exception)."""

    def __init__(self, payload: bytes, check):
        self.payload = payload
        self.check = check
        self.buf = b""
        self.result: object = None
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        self.transport.write(struct.pack("!H", len(self.payload)) + self.payload)

    def dataReceived(self, data):
        if self.result is not None:
            return
        self.buf += data
        if len(self.buf) < 2:
            return
        (n,) = struct.unpack("!H", self.buf[:2])
        if len(self.buf) < 2 + n:
            return
        reply = self.check(self.buf[2 : 2 + n])
        self.result = reply if reply is not None else ValueError(
            "malformed or mismatched reply over TCP")
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost.callback(self.result if self.result is not None else reason.value)


def _source_for(server: str) -> str:
    """The local address to bind for queries to C{server}: loopback for a
    loopback server (nothing else can then answer), any otherwise."""
    ip = ipaddress.ip_address(server)
    if ip.is_loopback:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return "::" if ip.version == 6 else ""


class DNSSECResolver:
    """Asks validating resolvers, and reports whether answers were authenticated.

    Each query is a C{twisted.names.dns.Message} with RD and AD set (RFC 6840
    5.7: AD in a query asks for AD in the reply; DO is not needed, so no
    RRSIGs travel) and an EDNS0 OPT record advertising C{udp_size}; it goes
    over UDP from a random port with a random ID, and over TCP when the
    reply is truncated. Replies must come from the server asked, with the
    same ID and question.

    Only trust the AD bit of a resolver you run or reach over a trusted
    path (RFC 4035 4.9.3; RFC 7672 2.1.1): normally one on loopback.

    @param reactor: C{IReactorUDP}, C{IReactorTCP} and C{IReactorTime}.
    @param servers: C{[(ip, port), ...]}, IPv4 or IPv6 literals, asked in
        order: the next one after a timeout, SERVFAIL or REFUSED.
    @param timeout: seconds to wait for each server (UDP and a TCP retry
        together).
    @param udp_size: the EDNS0 UDP payload size to advertise (bytes), or
        L{None} for no EDNS0 (512-byte replies).
    @raise ValueError: no server, or one that is not an IP address literal.
    """

    def __init__(self, reactor, servers: Sequence[tuple[str, int]], timeout: float = 5.0,
                 udp_size: int | None = 1232):
        if not servers:
            raise ValueError("DNSSECResolver needs at least one server")
        for host, port in servers:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"DNSSEC resolver {host!r} must be an IP address") from None
            if not 0 < int(port) < 65536:
                raise ValueError(f"DNSSEC resolver port {port!r} out of range")
        self.reactor = reactor
        self.servers = [(h, int(p)) for h, p in servers]
        self.timeout = timeout
        self.udp_size = udp_size

    # -- public lookups -----------------------------------------------------

    def query(self, name: str, rrtype: int) -> defer.Deferred:
        """Look up C{name}/C{rrtype} (class IN).

        @param name: an A-label domain name (str; a trailing dot is fine).
        @param rrtype: the record type (e.g. C{dns.MX}, C{52} for TLSA).
        @return: a Deferred firing with a L{Lookup} for NOERROR (with or
            without records) and NXDOMAIN, or failing with
            L{DNSLookupError} for SERVFAIL (bogus data, or a resolver that
            cannot get an answer), REFUSED and other errors, and timeouts
            (after C{timeout} seconds for each server); failing with
            C{ValueError} for a name that is not ASCII (give A-labels).
        """
        return defer.Deferred.fromCoroutine(self._query(name, rrtype))

    def tlsa(self, host: str, port: int = 25) -> defer.Deferred:
        """The TLSA records of C{_PORT._tcp.HOST} (RFC 7672 2.2.3).

        @return: as L{query}; C{Lookup.records} holds L{TLSA} objects (all of
            them: filter with L{usable}). A record too short to parse fails
            the lookup (L{DNSLookupError}): a malformed RRset is not an
            absent one.
        """
        return self.query(tlsa_name(host, port), TLSA_TYPE)

    def mx(self, domain: str) -> defer.Deferred:
        """The MX records of C{domain}, so the router can tell whether the
        MX RRset is secure (RFC 7672 2.2.1).

        @return: as L{query}; C{Lookup.records} holds C{(preference, host)}.
        """
        return self.query(domain, dns.MX)

    def addresses_secure(self, host: str) -> defer.Deferred:
        """Whether C{host}'s address records are secure (RFC 7672 2.2.3):
        its A lookup and its AAAA lookup both came back with the AD bit
        (NODATA counts, when its denial is secure).

        @return: a Deferred firing with C{(secure: bool, canonical: str)},
            the canonical name after CNAMEs (from the A lookup), or failing
            with L{DNSLookupError}.
        """
        return defer.Deferred.fromCoroutine(self._addresses_secure(host))

    async def _addresses_secure(self, host):
        a = await self.query(host, dns.A)
        aaaa = await self.query(host, dns.AAAA)
        return a.secure and aaaa.secure, a.canonical

    # -- machinery ----------------------------------------------------------

    async def _query(self, name: str, rrtype: int) -> Lookup:
        qname = _name(name)
        try:
            wire_name = qname.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{name!r} is not an A-label domain name") from None
        error: DNSLookupError | None = None
        for server in self.servers:
            try:
                reply = await self._exchange(server, wire_name, rrtype)
            except (defer.TimeoutError, defer.CancelledError):
                error = DNSLookupError(qname, rrtype, None,
                                       f"no answer from {server[0]}:{server[1]} within "
                                       f"{self.timeout:g}s")
                continue
            except Exception as e:  # noqa: BLE001 - any transport failure: next server
                error = DNSLookupError(qname, rrtype, None,
                                       f"{server[0]}:{server[1]}: {e.__class__.__name__}: {e}")
                continue
            rcode = reply.rCode
            if rcode in (dns.OK, dns.ENAME):
                return self._lookup(qname, rrtype, reply)
            what = _RCODES.get(rcode, f"rcode {rcode}")
            if rcode == dns.ESERVER:
                what += " (the data may be DNSSEC-bogus, or unreachable)"
            error = DNSLookupError(qname, rrtype, rcode, f"{what} from {server[0]}:{server[1]}")
        assert error is not None
        raise error

    def _lookup(self, qname: str, rrtype: int, reply) -> Lookup:
        ttls = []
        seen = {qname}
        current = qname
        while True:  # follow the CNAME chain inside the answer (RFC 1034 3.6.2)
            target = None
            for rr in reply.answers:
                if rr.type == dns.CNAME and _name(rr.name) == current and rrtype != dns.CNAME:
                    target = _name(rr.payload.name)
                    ttls.append(rr.ttl)
                    break
            if target is None or target in seen:
                break
            seen.add(target)
            current = target
        try:
            rrs = [rr for rr in reply.answers if rr.type == rrtype and _name(rr.name) == current]
            records = tuple(_convert(rr) for rr in rrs)
        except (ValueError, AttributeError) as e:
            raise DNSLookupError(qname, rrtype, reply.rCode, f"malformed record: {e}") from None
        ttls.extend(rr.ttl for rr in rrs)
        return Lookup(
            name=qname,
            rrtype=rrtype,
            secure=bool(reply.authenticData),
            records=records,
            canonical=current,
            nxdomain=reply.rCode == dns.ENAME and not records,
            ttl=min(ttls) if ttls else None,
        )

    def _message(self, wire_name: bytes, rrtype: int) -> tuple[int, bytes]:
        msg_id = secrets.randbits(16)
        m = dns.Message(id=msg_id, recDes=1, authenticData=1)
        m.queries = [dns.Query(wire_name, rrtype, dns.IN)]
        if self.udp_size:
            # EDNS0 OPT pseudo-RR (RFC 6891 6.1.2): CLASS = UDP payload size,
            # TTL = extended RCODE, version 0, flags (DO clear).
            m.additional = [dns.RRHeader(name=b"", type=dns.OPT, cls=self.udp_size, ttl=0,
                                         payload=dns.UnknownRecord(b""))]
        return msg_id, m.toStr()

    async def _exchange(self, server, wire_name: bytes, rrtype: int):
        msg_id, payload = self._message(wire_name, rrtype)

        def check(data: bytes):
            reply = dns.Message()
            try:
                reply.fromStr(data)
            except Exception:  # noqa: BLE001 - garbage is ignored, like a lost datagram
                return None
            if not reply.answer or reply.id != msg_id or len(reply.queries) != 1:
                return None
            q = reply.queries[0]
            if q.type != rrtype or q.cls != dns.IN or _name(q.name.name) != _name(wire_name):
                return None
            return reply

        deadline = self.reactor.seconds() + self.timeout
        udp = _UDPExchange(server, payload, check)
        port = self.reactor.listenUDP(0, udp, interface=_source_for(server[0]))
        try:
            udp.d.addTimeout(self.timeout, self.reactor)
            reply = await udp.d
        finally:
            await defer.maybeDeferred(port.stopListening)
        if not reply.trunc:
            return reply
        # Truncated: ask again over TCP, within what is left of the time.
        from twisted.internet import endpoints

        left = max(deadline - self.reactor.seconds(), 0.1)
        endpoint_cls = (endpoints.TCP6ClientEndpoint if ":" in server[0]
                        else endpoints.TCP4ClientEndpoint)
        factory = protocol.Factory.forProtocol(lambda: _TCPExchange(payload, check))
        factory.noisy = False
        tcp = await endpoint_cls(self.reactor, server[0], server[1], timeout=left).connect(factory)
        timer = self.reactor.callLater(
            max(deadline - self.reactor.seconds(), 0.1), tcp.transport.abortConnection)
        try:
            outcome = await tcp.lost
        finally:
            if timer.active():
                timer.cancel()
        if isinstance(outcome, dns.Message):
            return outcome
        if isinstance(outcome, Exception):
            raise outcome
        raise ValueError(f"no reply over TCP: {outcome!r}")


# --------------------------------------------------------------------------- matching


class DANEVerificationError(SSL.Error):
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


def _to_crypto(cert) -> x509.Certificate:
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


def _signed_by_key(cert: x509.Certificate, key) -> bool:
    """Whether C{key} (a public key object) made C{cert}'s signature."""
    try:
        params = cert.signature_algorithm_parameters
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, params,
                       cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, params)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    except ValueError:  # malformed extension
        names = []
    if names:
        return [n.rstrip(".").lower() for n in names]
    # No DNS subjectAltName: the most specific CN (RFC 6125 6.4.4).
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return [str(cns[-1].value).rstrip(".").lower()] if cns else []


def _name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 6.4.1 and 6.4.3: exact (case-insensitive), or C{*} as the
    whole left-most label, matching exactly one label."""
    if pattern == name:
        return True
    if pattern.startswith("*.") and "*" not in pattern[2:]:
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:] and rest.count(".") >= 1
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
    ta_problem = _verify_ta(ta_records, certs, [_name(n) for n in names], now)
    if isinstance(ta_problem, TLSA):
        return ta_problem
    parts = []
    if ee_count:
        parts.append(f"the server certificate matches none of the {ee_count} DANE-EE record(s)")
    parts.append(ta_problem)
    return _fail("; ".join(parts), leaf)


def _fail(text: str, leaf: x509.Certificate):
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
    presented = _dns_names(leaf)
    if not any(_name_matches(p, n) for p in presented for n in names):
        return (f"the chain matches DANE-TA but the certificate names {presented} match "
                f"none of {names}")
    return found


def _matches_any(records: list[TLSA], cert: x509.Certificate) -> bool:
    return any(_record_matches(r, cert) for r in records)


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


@implementer(interfaces.IOpenSSLClientConnectionCreator)
class _DANETLS:
    """STARTTLS client connections authenticated by TLSA records."""

    def __init__(self, hostname: str, records: Sequence[TLSA], names: Sequence[str]):
        self.hostname = hostname
        self.records = tuple(usable(records))
        if not self.records:
            raise ValueError("dane_tls needs at least one usable TLSA record")
        self.names = tuple(names) or (hostname,)
        self.matched: TLSA | None = None
        # One context per creator: pyOpenSSL keeps the exceptions raised by a
        # verify callback on the context, so connections must not share one.
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION)
        ctx.set_cipher_list(b"DEFAULT:!aNULL:!eNULL")  # a certificate is a must
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._ctx = ctx
        self._sni = hostname.rstrip(".").encode("idna")

    def _verify(self, conn, cert, errno, depth, ok):
        # Called for each certificate OpenSSL looks at (with PKIX errors,
        # which DANE ignores), ending with depth 0: judge the whole chain
        # then. The peer chain is complete by the time OpenSSL verifies it.
        if depth != 0:
            return True
        chain = conn.get_peer_cert_chain() or [cert]
        try:
            self.matched = verify_chain(self.records, chain, self.names)
        except DANEVerificationError as e:
            log.info("DANE: {host}: {reason}", host=self.hostname, reason=e.reason)
            raise DANEVerificationError(f"DANE authentication of {self.hostname} failed: "
                                        f"{e.reason}") from None
        return True

    def clientConnectionForTLS(self, tlsProtocol):
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_tlsext_host_name(self._sni)  # RFC 7672 8.1: SNI is the TLSA base domain
        conn.set_connect_state()
        return conn


def dane_tls(hostname: str, records: Sequence[TLSA], names: Sequence[str] = ()):
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


@dataclass(frozen=True)
class Policy:
    """What DANE says about one MX host (RFC 7672 2.2).

    @ivar mode: C{"dane"}: TLS required and the server must match
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

    mode: str
    host: str
    records: tuple[TLSA, ...] = ()
    names: tuple[str, ...] = ()
    reason: str = ""
    tlsa: tuple[TLSA, ...] = field(default=(), repr=False)

    @property
    def tls_level(self) -> str | None:
        """The session TLS level this policy imposes (C{"encrypt"}: STARTTLS
        mandatory), or L{None} for C{"none"} (keep the configured level)."""
        return None if self.mode == "none" else "encrypt"

    def tls_creator(self, hostname: str | None = None):
        """For C{ESMTPSession(tls_creator=...)}: L{dane_tls} for C{"dane"},
        unauthenticated TLS (L{twisted_mailout.smtp.protocol.opportunistic_tls})
        otherwise.

        @param hostname: ignored (the session passes its host name; the
            policy already knows the TLSA base domain).
        """
        if self.mode == "dane":
            return dane_tls(self.host, self.records, self.names)
        from twisted_mailout.smtp.protocol import opportunistic_tls

        return opportunistic_tls(self.host)


def host_policy(resolver: DNSSECResolver, host: str, *, port: int = 25, mx_secure: bool,
                domain: str | None = None) -> defer.Deferred:
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
    @return: a Deferred firing with a L{Policy}, or failing with
        L{DNSLookupError} when the address or TLSA lookups fail (SERVFAIL,
        bogus, timeout): the host must not be used now (2.1.1).
    """
    return defer.Deferred.fromCoroutine(
        _host_policy(resolver, host.rstrip(".").lower(), port, mx_secure, domain))


async def _host_policy(resolver, host, port, mx_secure, domain) -> Policy:
    if not mx_secure:
        return Policy("none", host, reason="MX RRset not DNSSEC-secure")
    secure, canonical = await resolver.addresses_secure(host)
    if not secure:
        return Policy("none", host, reason=f"address records of {host} not DNSSEC-secure")
    bases = [canonical, host] if canonical != host else [host]
    lookup = None
    base = host
    for base in bases:
        lookup = await resolver.tlsa(base, port)
        if not lookup.secure:
            return Policy("none", base, reason=f"TLSA RRset of {base} not DNSSEC-secure")
        if lookup.records:
            break
    assert lookup is not None
    if not lookup.records:
        return Policy("none", base, reason=f"no TLSA records for {tlsa_name(base, port)}")
    good = usable(lookup.records)
    names = [base]
    if host != base:
        names.append(host)
    if domain:
        names.append(domain.rstrip(".").lower())
    if not good:
        return Policy("encrypt", base, (), tuple(names),
                      reason=f"{len(lookup.records)} TLSA record(s) for {base}, none usable: "
                      "unauthenticated TLS (RFC 7672 2.2)", tlsa=lookup.records)
    return Policy("dane", base, tuple(good), tuple(names),
                  reason=f"{len(good)} usable TLSA record(s) for {base}", tlsa=lookup.records)
