"""DNS through C{twisted.names}: the resolver, a TTL cache, the one A+AAAA
lookup, the one CNAME follower, name normalisation, and the TCP endpoint
for an address.

Everything the agent resolves (MX hosts and relays for delivery, the
MTA-STS TXT record and policy host) goes through the C{IResolver} made by
L{make_resolver}; nothing calls C{getaddrinfo}, so when the operator names
a resolver no query goes anywhere else. DNSSEC-aware lookups for DANE are
in L{twisted_mailout.routing.dnssec}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet import defer, endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.names import client, dns, hosts, resolve
from twisted.python.failure import Failure

__all__ = [
    "AddressAnswer",
    "TTLCache",
    "follow_cnames",
    "lookup_addresses",
    "make_resolver",
    "negative_ttl",
    "normalise_name",
    "parse_hostport",
    "system_nameservers",
    "tcp_endpoint",
]

#: How long a negative answer without an SOA record is cached, in seconds.
DEFAULT_NEGATIVE_TTL = 60

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Clock(Protocol):
    """What the cache needs of C{IReactorTime}."""

    def seconds(self) -> float:
        """The current time, in seconds."""


def normalise_name(name: str | bytes | dns.Name) -> str:
    """A DNS name as the agent compares names: text, lower case, no trailing dot.

    @param name: C{str}, C{bytes} (ASCII; other bytes are replaced) or a
        C{twisted.names.dns.Name}.
    @return: C{str}.
    """
    if isinstance(name, dns.Name):
        name = name.name
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return str(name).rstrip(".").lower()


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """Parse C{"HOST"}, C{"HOST:PORT"}, C{"[v6]:PORT"} or a bare IPv6 address.

    @param text: the text to parse.
    @param default_port: the port when C{text} gives none.
    @return: C{(host, port)}.
    @raise ValueError: empty host or a port outside 1..65535.
    """
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    try:
        p = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 < p < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, p


def system_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The IPv4 C{nameserver} entries of resolv.conf(5).

    Reads the file: call it at start-up, not from the reactor per query.

    @param path: the file to read.
    @return: C{[(address, 53), ...]}; C{[("127.0.0.1", 53)]} when there are
        none or the file is unreadable (the resolver library's own default).
    """
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        ipaddress.IPv4Address(parts[1])
                    except ValueError:
                        continue
                    out.append((parts[1], 53))
    except OSError:
        pass
    return out or [("127.0.0.1", 53)]


def make_resolver(servers: Sequence[str] | None, reactor: Any,
                  timeout: Sequence[float] = (1, 3, 11),
                  resolv_conf: str = "/etc/resolv.conf",
                  hosts_file: str = "/etc/hosts") -> Any:
    """A C{twisted.names} resolver.

    @param servers: C{["HOST[:PORT]", ...]} (IPv4 addresses): only these are
        asked; neither resolv.conf nor the hosts file is read. L{None} or
        empty: the hosts file, then the IPv4 name servers of resolv.conf,
        read once now (127.0.0.1 when it names none).
    @param reactor: C{IReactorUDP}, C{IReactorTCP} and C{IReactorTime}.
    @param timeout: per-try timeouts in seconds; a query fails after their sum.
    @param resolv_conf: the resolv.conf(5) to read when C{servers} is empty.
    @param hosts_file: the hosts(5) file asked first when C{servers} is empty.
    @return: an C{IResolver}.
    @raise ValueError: a malformed server.
    """
    if servers:
        parsed = []
        for s in servers:
            host, port = parse_hostport(s, 53)
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"resolver {s!r} must be an IPv4 address") from None
            parsed.append((host, port))
        return client.Resolver(servers=parsed, reactor=reactor, timeout=tuple(timeout))
    return resolve.ResolverChain([
        hosts.Resolver(hosts_file.encode()),
        client.Resolver(servers=system_nameservers(resolv_conf), reactor=reactor,
                        timeout=tuple(timeout)),
    ])


class TTLCache(Generic[K, V]):
    """C{key -> value} entries that expire by the clock.

    @param clock: C{IReactorTime}.
    @param max_ttl: cap on any entry's lifetime, in seconds.
    @param max_entries: size bound; when full, expired entries are dropped,
        then the oldest one.
    """

    def __init__(self, clock: Clock, max_ttl: float,
                 max_entries: int = 10000) -> None:
        self.clock = clock
        self.max_ttl = max_ttl
        self.max_entries = max_entries
        self._d: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        """The live value for C{key}, or L{None} (absent or expired)."""
        hit = self._d.get(key)
        if hit is None:
            return None
        expires, value = hit
        if self.clock.seconds() >= expires:
            del self._d[key]
            return None
        return value

    def put(self, key: K, value: V, ttl: float) -> None:
        """Keep C{value} for C{min(ttl, max_ttl)} seconds (not at all when
        C{ttl <= 0})."""
        if ttl <= 0:
            return
        if len(self._d) >= self.max_entries:
            now = self.clock.seconds()
            for k in [k for k, (e, _) in self._d.items() if e <= now]:
                del self._d[k]
            if len(self._d) >= self.max_entries:
                self._d.pop(next(iter(self._d)))
        self._d[key] = (self.clock.seconds() + min(ttl, self.max_ttl), value)

    def discard(self, key: K) -> V | None:
        """Forget C{key}. @return: its value when it was cached and live."""
        hit = self._d.pop(key, None)
        if hit is None or self.clock.seconds() >= hit[0]:
            return None
        return hit[1]

    def __len__(self) -> int:
        return len(self._d)


@dataclass(frozen=True)
class CNAMEChain:
    """What L{follow_cnames} found.

    @ivar records: the C{RRHeader}s of the type asked, owned by C{canonical}.
    @ivar ttl: the smallest TTL of those records and of the CNAMEs followed
        (seconds), or L{None} when there was neither.
    @ivar canonical: the name at the end of the CNAME chain (the name asked
        when there was none), normalised.
    """

    records: list[Any]
    ttl: int | None
    canonical: str


def follow_cnames(answers: Iterable[Any], qname: str | bytes | dns.Name,
                  rrtype: int, limit: int = 16) -> CNAMEChain:
    """The records of C{rrtype} for C{qname} in an answer section, following
    the CNAME chain inside it (RFC 1034 3.6.2).

    A chain that loops or is longer than C{limit} ends where the loop starts.
    Asking for CNAME records themselves follows nothing.

    @param answers: C{twisted.names.dns.RRHeader}s (the answer section).
    @param qname: the name asked.
    @param rrtype: the record type asked (C{dns.A}, C{dns.MX}, ...).
    @param limit: at most this many CNAMEs are followed.
    @return: a L{CNAMEChain}.
    """
    rrs = list(answers)
    current = normalise_name(qname)
    seen = {current}
    ttls: list[int] = []
    if rrtype != dns.CNAME:
        for _ in range(limit):
            target = None
            for rr in rrs:
                if rr.type == dns.CNAME and normalise_name(rr.name) == current:
                    target = normalise_name(rr.payload.name)
                    ttls.append(rr.ttl)
                    break
            if target is None or target in seen:
                break
            seen.add(target)
            current = target
    records = [rr for rr in rrs if rr.type == rrtype and normalise_name(rr.name) == current]
    ttls.extend(rr.ttl for rr in records)
    return CNAMEChain(records, min(ttls) if ttls else None, current)


def negative_ttl(authority: Iterable[Any]) -> int:
    """How long to cache a negative answer (RFC 2308 5): the SOA record's
    TTL capped by its MINIMUM field, or L{DEFAULT_NEGATIVE_TTL} seconds."""
    for rr in authority:
        if rr.type == dns.SOA:
            return int(min(rr.ttl, rr.payload.minimum))
    return DEFAULT_NEGATIVE_TTL


@dataclass
class AddressAnswer:
    """What L{lookup_addresses} found.

    @ivar addresses: IPv4 then IPv6 address strings (possibly empty).
    @ivar ttl: how long the answer may be cached, in seconds: the smallest
        TTL of the records (or of the negative answers) of the lookups that
        succeeded; L{None} when both failed.
    @ivar failures: the C{Failure}s of the lookups that failed (A first).
    """

    addresses: list[str] = field(default_factory=list)
    ttl: int | None = None
    failures: list[Failure] = field(default_factory=list)

    def describe_failures(self) -> str:
        """The failures as one line of text (C{""} when none)."""
        return "; ".join(f.getErrorMessage() or f.type.__name__ for f in self.failures)


def lookup_addresses(resolver: Any, host: str) -> defer.Deferred[AddressAnswer]:
    """The A and AAAA records of C{host}, asked at the same time, with the
    CNAME chain inside each answer followed.

    @param resolver: a C{twisted.names} C{IResolver}.
    @param host: an A-label host name (not an address literal).
    @return: a Deferred that never fails, firing with an L{AddressAnswer};
        the caller decides what failures and empty answers mean.
    """
    return defer.Deferred.fromCoroutine(_lookup_addresses(resolver, normalise_name(host)))


async def _lookup_addresses(resolver: Any, host: str) -> AddressAnswer:
    results = await defer.DeferredList(
        [resolver.lookupAddress(host), resolver.lookupIPV6Address(host)],
        consumeErrors=True)
    out = AddressAnswer()
    ttls = []
    for (ok, res), rrtype in zip(results, (dns.A, dns.AAAA), strict=True):
        if not ok:
            out.failures.append(res)
            continue
        answers, authority, _ = res
        chain = follow_cnames(answers, host, rrtype)
        ttls.append(chain.ttl if chain.records and chain.ttl is not None
                    else negative_ttl(authority))
        for rr in chain.records:
            if rrtype == dns.A:
                out.addresses.append(rr.payload.dottedQuad())
            else:
                out.addresses.append(str(ipaddress.IPv6Address(rr.payload.address)))
    out.ttl = min(ttls) if ttls else None
    return out


def tcp_endpoint(reactor: Any, address: str, port: int, timeout: float = 30,
                 source: str | None = None,
                 ) -> endpoints.TCP4ClientEndpoint | endpoints.TCP6ClientEndpoint:
    """The TCP client endpoint for an address literal: C{TCP6ClientEndpoint}
    for IPv6, C{TCP4ClientEndpoint} otherwise (connections go to addresses
    the agent resolved itself, never through C{getaddrinfo}).

    @param reactor: C{IReactorTCP}.
    @param address: an IPv4 or IPv6 address literal (no brackets).
    @param port: the TCP port.
    @param timeout: the connect timeout, in seconds.
    @param source: the local address to connect from (of the same family
        as C{address}), or L{None} for the system's choice.
    @return: an C{IStreamClientEndpoint}.
    """
    bind = (source, 0) if source else None
    if isIPv6Address(address):
        return endpoints.TCP6ClientEndpoint(reactor, address, port, timeout=timeout,
                                            bindAddress=bind)
    return endpoints.TCP4ClientEndpoint(reactor, address, port, timeout=timeout,
                                        bindAddress=bind)
