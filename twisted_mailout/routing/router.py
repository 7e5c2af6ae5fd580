"""Routing: a recipient domain to an ordered list of next hops (RFC 5321 5.1).

L{MXRouter} asks DNS through C{twisted.names} only (never getaddrinfo), so
when the operator names a resolver, no query goes anywhere else.
L{RelayRouter} sends everything to one smarthost.
"""

from __future__ import annotations

import ipaddress
import random as _random
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from twisted_mailout.envelope import Reply
from twisted_mailout.errors import RoutingError
from twisted_mailout.routing.resolver import (
    Clock,
    TTLCache,
    follow_cnames,
    lookup_addresses,
    make_resolver,
    negative_ttl,
    normalise_name,
    parse_hostport,
    system_nameservers,
)

__all__ = [
    "IRouter",
    "MXRouter",
    "NextHop",
    "RelayRouter",
    "RouteError",
    "make_resolver",
    "parse_hostport",
    "parse_relay",
    "system_nameservers",
]

log = Logger()


@dataclass(frozen=True)
class NextHop:
    """A host to try for a destination.

    @ivar host: the host name (the MX exchange, the relay's name, or an IP
        address); used for TLS name checks and logs.
    @ivar port: TCP port.
    @ivar preference: the MX preference, or L{None} for a relay or implicit MX.
    @ivar implicit: the domain itself, used because it has no MX (RFC 5321 5.1).
    """

    host: str
    port: int
    preference: int | None = None
    implicit: bool = False


class RouteError(RoutingError):
    """No host can be tried for a destination.

    @ivar reply: a local reply; 5xx for permanent failures (NXDOMAIN, null MX),
        4xx for temporary ones (SERVFAIL, timeouts).
    """

    def __init__(self, reply: Reply):
        super().__init__(reply.one_line())
        self.reply = reply


def _temp(text: str) -> RouteError:
    return RouteError(Reply(451, text, local=True))


def _perm(code: int, text: str) -> RouteError:
    return RouteError(Reply(code, text, local=True))


def parse_relay(text: str) -> tuple[str, int, bool]:
    """Parse a C{--relay} value: C{HOST[:PORT]} or C{[HOST]:PORT} (STARTTLS,
    port 25 by default), C{smtp://HOST[:PORT]} (port 587 by default, RFC 6409),
    or C{smtps://HOST[:PORT]} (implicit TLS, port 465 by default, RFC 8314 3.3).

    @return: C{(host, port, implicit_tls)}.
    @raise ValueError: an unknown scheme, an empty host, a bad port, a path.
    """
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        host, port = parse_hostport(text, 25)
        return host, port, False
    scheme = scheme.lower()
    if scheme not in ("smtp", "smtps"):
        raise ValueError(f"unknown relay scheme {scheme!r} in {text!r} (smtp:// or smtps://)")
    rest = rest.rstrip("/")
    if "/" in rest or "?" in rest or "@" in rest:
        raise ValueError(f"a relay is smtp[s]://HOST[:PORT] only, not {text!r} "
                         "(credentials go in --auth-* options)")
    host, port = parse_hostport(rest, 465 if scheme == "smtps" else 587)
    return host, port, scheme == "smtps"


def _dns_error(f: Failure, what: str) -> RouteError:
    """Map a twisted.names failure to a RouteError."""
    if f.check(dnserror.DNSNameError):
        return _perm(550, f"5.1.2 {what}: host or domain name not found (NXDOMAIN)")
    if f.check(dnserror.DNSServerError):
        return _temp(f"4.4.3 {what}: DNS server failure (SERVFAIL), will retry")
    if f.check(dnserror.DNSQueryTimeoutError, defer.TimeoutError):
        return _temp(f"4.4.3 {what}: DNS query timed out, will retry")
    if f.check(dnserror.DNSQueryRefusedError):
        return _temp(f"4.4.3 {what}: DNS query refused, will retry")
    if f.check(dnserror.DomainError):
        return _temp(f"4.4.3 {what}: DNS error {f.value.__class__.__name__}, will retry")
    return _temp(f"4.4.3 {what}: DNS lookup failed: {f.getErrorMessage()}")


class IRouter(Interface):
    """Where the mail of a destination goes: its next hops, and their addresses.

    The delivery layer (L{twisted_mailout.delivery.connector.Connector})
    tries the hops in the order given, and each hop's addresses in order.

    The method declarations carry their types for readers; mypy, without a
    zope plugin, takes their first parameter for C{self}, so code holding a
    router types it as C{Any} (see
    L{twisted_mailout.delivery.connector.Connector}). Their bodies only satisfy
    mypy: zope.interface ignores them.
    """

    relay = Attribute("C{bool}: every destination goes to one smarthost; the TLS policy "
                      "is looked up under C{name}, DANE and MTA-STS do not apply, and "
                      "AUTH credentials may be sent.")
    implicit_tls = Attribute("C{bool}: the hops speak TLS from the first byte (smtps://, "
                             "RFC 8314 3.3) instead of STARTTLS.")
    name = Attribute("C{str} or L{None}: for a relay, the relay as the operator wrote it "
                     "(the TLS policy table's key); L{None} otherwise.")

    def route(domain: str) -> defer.Deferred[list[NextHop]]:
        """The hosts to try for C{domain}, in order.

        @param domain: an A-label domain (or any key, for a relay).
        @return: a Deferred firing with a non-empty C{list[NextHop]}, or
            failing with L{RouteError} (5xx permanent, 4xx temporary).
        """
        raise NotImplementedError

    def addresses(hop: NextHop) -> defer.Deferred[list[str]]:
        """The IP addresses to try for C{hop}, in order.

        @param hop: one of the hops L{route} gave.
        @return: a Deferred firing with a non-empty C{list[str]} of address
            literals, or failing with L{RouteError}.
        """
        raise NotImplementedError


@implementer(IRouter)
class MXRouter:
    """Routes a domain to its MX hosts (RFC 5321 5.1, RFC 7505 null MX).

    @param resolver: an C{IResolver} (from L{make_resolver}).
    @param clock: C{IReactorTime}, for the TTL cache.
    @param port: TCP port for every MX host (25; tests use others).
    @param rng: a C{random.Random} for shuffling equal preferences.
    @param max_ttl: cap on how long an answer is cached, in seconds.
    """

    relay = False
    implicit_tls = False
    name = None

    def __init__(self, resolver: Any, clock: Clock, port: int = 25,
                 rng: _random.Random | None = None, max_ttl: float = 3600) -> None:
        self.resolver = resolver
        self.clock = clock
        self.port = port
        self.rng = rng or _random.Random()
        self._mx_cache: TTLCache[str, list[tuple[int, str]]] = TTLCache(clock, max_ttl)
        self._addr_cache: TTLCache[str, list[str]] = TTLCache(clock, max_ttl)

    def route(self, domain: str) -> defer.Deferred:
        """The hosts to try for C{domain}, in order.

        MX records sorted by preference, equal preferences in random order;
        the domain itself when it has no MX record (implicit MX).

        @param domain: an A-label domain, or an address literal C{[1.2.3.4]}.
        @return: Deferred firing with a non-empty C{list[NextHop]}, or failing
            with L{RouteError}: 5xx for NXDOMAIN and null MX, 4xx for SERVFAIL,
            timeouts and other temporary DNS failures.
        """
        return defer.Deferred.fromCoroutine(self._route(domain.lower()))

    async def _route(self, domain: str) -> list[NextHop]:
        if domain.startswith("[") and domain.endswith("]"):
            lit = domain[1:-1]
            if lit.lower().startswith("ipv6:"):
                lit = lit[5:]
            return [NextHop(lit, self.port, None, True)]
        cached = self._mx_cache.get(domain)
        if cached is None:
            try:
                answers, authority, _ = await self.resolver.lookupMailExchange(domain)
            except Exception:  # noqa: BLE001 - every DNS failure maps to a reply
                raise _dns_error(Failure(), f"MX lookup for {domain}") from None
            chain = follow_cnames(answers, domain, dns.MX)
            mx = sorted({(rr.payload.preference, normalise_name(rr.payload.name))
                         for rr in chain.records})
            cached = mx
            self._mx_cache.put(domain, mx, chain.ttl if chain.records and chain.ttl is not None
                               else negative_ttl(authority))
        mx = cached
        if not mx:
            return [NextHop(domain, self.port, None, True)]
        if any(host in ("", ".") for _, host in mx):
            raise _perm(556, f"5.1.10 {domain} does not accept mail (null MX, RFC 7505)")
        by_pref: dict[int, list[str]] = {}
        for pref, host in mx:
            by_pref.setdefault(pref, []).append(host)
        hops: list[NextHop] = []
        for pref in sorted(by_pref):
            hosts = list(by_pref[pref])
            self.rng.shuffle(hosts)
            hops.extend(NextHop(h, self.port, pref) for h in hosts)
        return hops

    def forget(self, domain: str) -> list[str]:
        """Forget the cached MX answer of C{domain} and the cached addresses
        of its MX hosts (C{mailout queue requeue}): the next route looks them
        up again.

        @param domain: the destination domain (A-label form).
        @return: the host names whose answers were forgotten (the MX hosts
            and the domain itself).
        """
        d = domain.lower()
        hosts = [host for _, host in self._mx_cache.discard(d) or ()] + [d]
        for host in hosts:
            self._addr_cache.discard(host)
        return hosts

    def addresses(self, hop: NextHop) -> defer.Deferred:
        """The IP addresses of C{hop.host}: A records then AAAA records.

        @return: Deferred firing with a non-empty C{list[str]}, or failing with
            L{RouteError} (5xx when an implicit MX domain has no address,
            4xx otherwise: an MX host without address is a temporary
            misconfiguration).
        """
        return defer.Deferred.fromCoroutine(self._addresses(hop))

    async def _addresses(self, hop: NextHop) -> list[str]:
        try:
            ipaddress.ip_address(hop.host)
            return [hop.host]
        except ValueError:
            pass
        host = hop.host.lower()
        if host == "localhost" or host.endswith(".localhost"):
            return ["127.0.0.1", "::1"]  # RFC 6761 6.3: never asked of DNS
        cached = self._addr_cache.get(host)
        if cached is not None:
            return cached
        answer = await lookup_addresses(self.resolver, host)
        if answer.addresses:
            if answer.ttl is not None:
                self._addr_cache.put(host, answer.addresses, answer.ttl)
            return answer.addresses
        if answer.failures:
            err = _dns_error(answer.failures[0], f"address lookup for {host}")
            if hop.implicit or not err.reply.is_permanent:
                raise err
            raise _temp(f"4.4.4 MX host {host} does not exist (NXDOMAIN), will retry")
        if hop.implicit:
            raise _perm(550, f"5.1.2 {host} has no MX and no A/AAAA record")
        raise _temp(f"4.4.4 MX host {host} has no A/AAAA record, will retry")


@implementer(IRouter)
class RelayRouter:
    """Routes every domain to one smarthost.

    @param host: the relay's name or IP address.
    @param port: its port.
    @param resolver: an C{IResolver} used to find a named relay's addresses
        (from L{make_resolver}).
    @param clock: C{IReactorTime}.
    """

    relay = True

    def __init__(self, host: str, port: int, resolver: Any, clock: Clock,
                 implicit_tls: bool = False, name: str | None = None) -> None:
        self.hop = NextHop(host, port)
        self._mx = MXRouter(resolver, clock, port)
        #: the relay speaks TLS from the first byte (smtps://).
        self.implicit_tls = implicit_tls
        #: the relay as the operator wrote it (the TLS policy table's key).
        self.name = name or f"[{host}]:{port}"

    def route(self, domain: str) -> defer.Deferred:
        """@return: Deferred firing with C{[NextHop(relay)]}."""
        return defer.succeed([self.hop])

    def addresses(self, hop: NextHop) -> defer.Deferred:
        """The relay's addresses (see L{MXRouter.addresses}); a relay name
        without addresses is a temporary failure."""
        d = self._mx.addresses(hop)

        def temp(f: Failure) -> Failure:
            f.trap(RouteError)
            if f.value.reply.is_permanent:
                raise _temp(f"4.4.4 relay {hop.host}: {f.value.reply.text}")
            return f

        return d.addErrback(temp)
