"""The routing layer: recipient domain to next hops (MX hosts or one relay) and host names to
addresses, all through C{twisted.names} (never C{getaddrinfo}).

  - L{router<twisted_mailout.routing.router>}: C{IRouter}, C{MXRouter}, C{RelayRouter};
  - L{resolver<twisted_mailout.routing.resolver>}: the resolver, the TTL cache, the
    one A+AAAA lookup and CNAME follower, the TCP endpoint for an address;
  - L{dnssec<twisted_mailout.routing.dnssec>}: the DNSSEC-aware stub resolver for DANE.

Imports only the core modules (envelope, errors).
"""
