"""The routing layer: recipient domain to next hops (MX hosts or one relay) and host names to
addresses, all through C{twisted.names} (never C{getaddrinfo}).

Imports only the core modules (envelope, errors).
"""
