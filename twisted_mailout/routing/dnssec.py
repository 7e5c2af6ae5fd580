"""DNSSEC-aware DNS lookups for DANE (RFC 7672 2.1, 2.2): a stub resolver
that asks a I{validating} resolver and reports whether each answer was
authenticated (the AD bit, RFC 4035 3.2.3).

Why not C{twisted.names.client.Resolver}: its lookups return only
C{(answers, authority, additional)}, so the AD bit of the reply is lost
(C{Resolver.filterAnswers}), and C{DNSMixin._query} builds every query as
C{Message(id, recDes=1)}, so the AD bit cannot be set in the query to ask
for it (RFC 6840 5.7). This module therefore does its own exchange: a
C{twisted.names.dns.Message} over UDP from a random port with a random ID,
retried over TCP when the reply is truncated (RFC 1035 4.2.2), on Twisted's
UDP and TCP transports. The records stay C{twisted.names} objects.

Only trust the AD bit of a resolver you run or reach over a trusted path
(RFC 4035 4.9.3; RFC 7672 2.1.1): normally one on loopback.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, protocol
from twisted.names import dns

from twisted_mailout.errors import RoutingError
from twisted_mailout.routing.resolver import follow_cnames, normalise_name, tcp_endpoint

__all__ = [
    "TLSA",
    "TLSA_TYPE",
    "DNSSECLookupError",
    "DNSSECResolver",
    "Lookup",
    "parse_tlsa",
    "tlsa_name",
]

TLSA_TYPE = 52  # RFC 6698 7.1; twisted.names has no Record_TLSA

#: Checks a reply's bytes: the C{dns.Message} when it answers the query, else L{None}.
_Check = Callable[[bytes], "dns.Message | None"]

_RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


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


class DNSSECLookupError(RoutingError):
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


def _convert(rr: dns.RRHeader) -> object:
    p: Any = rr.payload
    if rr.type == TLSA_TYPE:
        return parse_tlsa(p.data)
    if rr.type == dns.MX:
        return (p.preference, normalise_name(p.name))
    if rr.type == dns.A:
        return p.dottedQuad()
    if rr.type == dns.AAAA:
        return str(ipaddress.IPv6Address(p.address))
    if rr.type in (dns.CNAME, dns.NS, dns.PTR):
        return normalise_name(p.name)
    return p


class _UDPExchange(protocol.DatagramProtocol):
    """Sends one query datagram; C{d} fires with the first matching reply."""

    transport: Any  # an IUDPTransport (mypy does not see zope.interface declarations)

    def __init__(self, server: tuple[str, int], payload: bytes, check: _Check) -> None:
        self.server = server
        self.payload = payload
        self.check = check
        self.d: defer.Deferred = defer.Deferred()

    def startProtocol(self) -> None:
        self.transport.write(self.payload, self.server)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.d.called or (addr[0], addr[1]) != self.server:
            return  # late, or from someone else: ignored
        reply = self.check(data)
        if reply is not None:
            self.d.callback(reply)


class _TCPExchange(protocol.Protocol):
    """Sends one length-prefixed query over TCP (RFC 1035 4.2.2); C{lost}
    fires, once the connection is closed, with the reply (a C{dns.Message})
    or the reason there is none (an exception)."""

    transport: Any  # an ITCPTransport

    def __init__(self, payload: bytes, check: _Check) -> None:
        self.payload = payload
        self.check = check
        self.buf = b""
        self.result: object = None
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(struct.pack("!H", len(self.payload)) + self.payload)

    def dataReceived(self, data: bytes) -> None:
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

    def connectionLost(self, reason: Any = None) -> None:
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

    def __init__(self, reactor: Any, servers: Sequence[tuple[str, int]], timeout: float = 5.0,
                 udp_size: int | None = 1232) -> None:
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

    def query(self, name: str, rrtype: int) -> defer.Deferred[Lookup]:
        """Look up C{name}/C{rrtype} (class IN).

        @param name: an A-label domain name (str; a trailing dot is fine).
        @param rrtype: the record type (e.g. C{dns.MX}, C{52} for TLSA).
        @return: a Deferred firing with a L{Lookup} for NOERROR (with or
            without records) and NXDOMAIN, or failing with
            L{DNSSECLookupError} for SERVFAIL (bogus data, or a resolver that
            cannot get an answer), REFUSED and other errors, and timeouts
            (after C{timeout} seconds for each server); failing with
            C{ValueError} for a name that is not ASCII (give A-labels).
        """
        return defer.Deferred.fromCoroutine(self._query(name, rrtype))

    def tlsa(self, host: str, port: int = 25) -> defer.Deferred[Lookup]:
        """The TLSA records of C{_PORT._tcp.HOST} (RFC 7672 2.2.3).

        @return: as L{query}; C{Lookup.records} holds L{TLSA} objects (all of
            them: filter with C{twisted_mailout.tls.dane.usable}). A record too short to parse fails
            the lookup (L{DNSSECLookupError}): a malformed RRset is not an
            absent one.
        """
        return self.query(tlsa_name(host, port), TLSA_TYPE)

    def mx(self, domain: str) -> defer.Deferred[Lookup]:
        """The MX records of C{domain}, so the router can tell whether the
        MX RRset is secure (RFC 7672 2.2.1).

        @return: as L{query}; C{Lookup.records} holds C{(preference, host)}.
        """
        return self.query(domain, dns.MX)

    def addresses_secure(self, host: str) -> defer.Deferred[tuple[bool, str]]:
        """Whether C{host}'s address records are secure (RFC 7672 2.2.3):
        its A lookup and its AAAA lookup both came back with the AD bit
        (NODATA counts, when its denial is secure).

        @return: a Deferred firing with C{(secure: bool, canonical: str)},
            the canonical name after CNAMEs (from the A lookup), or failing
            with L{DNSSECLookupError}.
        """
        return defer.Deferred.fromCoroutine(self._addresses_secure(host))

    async def _addresses_secure(self, host: str) -> tuple[bool, str]:
        a = await self.query(host, dns.A)
        aaaa = await self.query(host, dns.AAAA)
        return a.secure and aaaa.secure, a.canonical

    # -- machinery ----------------------------------------------------------

    async def _query(self, name: str, rrtype: int) -> Lookup:
        qname = normalise_name(name)
        try:
            wire_name = qname.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{name!r} is not an A-label domain name") from None
        error: DNSSECLookupError | None = None
        for server in self.servers:
            try:
                reply = await self._exchange(server, wire_name, rrtype)
            except (defer.TimeoutError, defer.CancelledError):
                error = DNSSECLookupError(qname, rrtype, None,
                                       f"no answer from {server[0]}:{server[1]} within "
                                       f"{self.timeout:g}s")
                continue
            except Exception as e:  # noqa: BLE001 - any transport failure: next server
                error = DNSSECLookupError(qname, rrtype, None,
                                       f"{server[0]}:{server[1]}: {e.__class__.__name__}: {e}")
                continue
            rcode = reply.rCode
            if rcode in (dns.OK, dns.ENAME):
                return self._lookup(qname, rrtype, reply)
            what = _RCODES.get(rcode, f"rcode {rcode}")
            if rcode == dns.ESERVER:
                what += " (the data may be DNSSEC-bogus, or unreachable)"
            error = DNSSECLookupError(qname, rrtype, rcode, f"{what} from {server[0]}:{server[1]}")
        assert error is not None
        raise error

    def _lookup(self, qname: str, rrtype: int, reply: dns.Message) -> Lookup:
        chain = follow_cnames(reply.answers, qname, rrtype)
        try:
            records = tuple(_convert(rr) for rr in chain.records)
        except (ValueError, AttributeError) as e:
            raise DNSSECLookupError(qname, rrtype, reply.rCode, f"malformed record: {e}") from None
        return Lookup(
            name=qname,
            rrtype=rrtype,
            secure=bool(reply.authenticData),
            records=records,
            canonical=chain.canonical,
            nxdomain=reply.rCode == dns.ENAME and not records,
            ttl=chain.ttl,
        )

    def _message(self, wire_name: bytes, rrtype: int) -> tuple[int, bytes]:
        msg_id = secrets.randbits(16)
        m = dns.Message(id=msg_id, recDes=1, authenticData=1)
        m.queries = [dns.Query(wire_name, rrtype, dns.IN)]
        if self.udp_size:
            # EDNS0 OPT pseudo-RR (RFC 6891 6.1.2): CLASS = UDP payload size,
            # TTL = extended RCODE, version 0, flags (DO clear).
            m.additional = [dns.RRHeader(name=b"", type=dns.OPT, cls=self.udp_size, ttl=0,
                                         payload=cast(Any, dns.UnknownRecord(b"")))]
        return msg_id, m.toStr()

    async def _exchange(self, server: tuple[str, int], wire_name: bytes,
                        rrtype: int) -> dns.Message:
        msg_id, payload = self._message(wire_name, rrtype)

        def check(data: bytes) -> dns.Message | None:
            reply = dns.Message()
            try:
                reply.fromStr(data)
            except Exception:  # noqa: BLE001 - garbage is ignored, like a lost datagram
                return None
            if not reply.answer or reply.id != msg_id or len(reply.queries) != 1:
                return None
            q = reply.queries[0]
            if (q.type != rrtype or q.cls != dns.IN
                    or normalise_name(q.name) != normalise_name(wire_name)):
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
        left = max(deadline - self.reactor.seconds(), 0.1)
        factory = protocol.Factory.forProtocol(lambda: _TCPExchange(payload, check))
        factory.noisy = False
        endpoint = tcp_endpoint(self.reactor, server[0], server[1], timeout=left)
        tcp = await endpoint.connect(cast(Any, factory))
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


