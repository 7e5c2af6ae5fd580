"""Building a connector from plain settings: the router (a relay or MX
routing), DANE's validating resolver, MTA-STS, and the L{Connector}.

Both the daemon (L{twisted_mailout.daemon.service}, from its C{Config}) and
the client (L{twisted_mailout.api.SMTPClient}, from its keyword arguments)
build their connector here, so neither depends on the other and the client
needs nothing from the daemon layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

from twisted_mailout.delivery.connector import Connector, ConnectorSettings
from twisted_mailout.routing.dnssec import DNSSECResolver
from twisted_mailout.routing.router import (
    IRouter,
    MXRouter,
    RelayRouter,
    parse_hostport,
    parse_relay,
)
from twisted_mailout.delivery.shaping import Shaper, ShapingConfig
from twisted_mailout.tls.mtasts import MTASTS

__all__ = ["build_connector", "build_router"]


def build_router(reactor: Any, resolver: Any, relay: str | None = None,
                 mx_port: int = 25) -> IRouter:
    """The router for C{relay}, or MX routing when it is L{None}.

    @param reactor: C{IReactorTime}.
    @param resolver: a C{twisted.names} C{IResolver} (relay names and MX
        lookups).
    @param relay: C{"HOST[:PORT]"} (port 25), C{"smtp://HOST[:PORT]"} (587)
        or C{"smtps://HOST[:PORT]"} (465, implicit TLS, RFC 8314 3.3), or
        L{None} to route each domain to its MX hosts (RFC 5321 5.1).
    @param mx_port: the TCP port of MX hosts.
    @raise ValueError: a malformed relay.
    """
    if relay:
        host, port, implicit = parse_relay(relay)
        return cast(IRouter, RelayRouter(host, port, resolver, reactor, implicit_tls=implicit,
                                         name=relay))
    return cast(IRouter, MXRouter(resolver, reactor, port=mx_port))


def build_connector(reactor: Any, resolver: Any, settings: ConnectorSettings, *,
                    relay: str | None = None, mx_port: int = 25,
                    dnssec_resolvers: Sequence[str] = (), dns_timeout: float = 15.0,
                    mta_sts: bool | MTASTS = False, mta_sts_cache: str | None = None,
                    mta_sts_timeout: float = 45.0, mta_sts_port: int = 443,
                    shaping: ShapingConfig | None = None) -> Connector:
    """The connector delivering through C{relay} or by MX.

    Builds nothing that reads files except what C{settings} already holds
    (its C{trust_root} is loaded by the caller with
    L{load_trust_root<twisted_mailout.tls.creators.load_trust_root>}).

    @param reactor: C{IReactorTCP} and C{IReactorTime}.
    @param resolver: a C{twisted.names} C{IResolver}.
    @param settings: the L{ConnectorSettings}; its C{dane} and C{mta_sts}
        are filled in here from the arguments below when they are L{None}.
    @param relay: see L{build_router}.
    @param mx_port: see L{build_router}.
    @param dnssec_resolvers: C{["HOST[:PORT]", ...]} validating resolvers
        trusted to set the AD bit: DANE (RFC 7672) then applies to MX
        delivery at the C{may}, C{dane} and C{dane-only} levels.
    @param dns_timeout: seconds a DNSSEC query may take.
    @param mta_sts: C{True} to apply recipient domains' MTA-STS policies
        (RFC 8461) to MX delivery, or an L{MTASTS} to use; ignored with a relay.
    @param mta_sts_cache: a folder where MTA-STS policies are kept between
        runs, or L{None} for memory only.
    @param mta_sts_timeout: seconds a policy fetch may take in all.
    @param mta_sts_port: the HTTPS port policies are fetched from (tests).
    @param shaping: a loaded shaping file (L{ShapingConfig}): the connector
        gets a L{Shaper} over it and the router; L{None}: no shaping.
    @return: a L{Connector}.
    @raise ValueError: a malformed relay or resolver.
    @raise OSError: C{mta_sts_cache} cannot be created.
    """
    router = build_router(reactor, resolver, relay, mx_port)
    dane = settings.dane
    if dane is None and dnssec_resolvers:
        dane = DNSSECResolver(reactor, [parse_hostport(r, 53) for r in dnssec_resolvers],
                              timeout=dns_timeout)
    sts = settings.mta_sts
    if sts is None and not relay:
        if isinstance(mta_sts, MTASTS):
            sts = mta_sts
        elif mta_sts:
            sts = MTASTS(reactor, resolver, mta_sts_cache, trust_root=settings.trust_root,
                         timeout=mta_sts_timeout, https_port=mta_sts_port)
    settings = dataclasses.replace(settings, dane=dane, mta_sts=sts)
    shaper = Shaper(shaping, router, reactor) if shaping is not None else None
    return Connector(reactor, router, settings, shaper)
