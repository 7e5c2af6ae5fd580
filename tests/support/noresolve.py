"""A guard proving that mail routing never asks the system resolver."""

from __future__ import annotations

import socket
from typing import Any

from twisted.names import client
from twisted.trial import unittest


def forbid_system_resolver(case: unittest.TestCase, reactor: Any) -> list[tuple[Any, ...]]:
    """For the rest of C{case}, make every way to the system resolver fail:
    C{getaddrinfo} (except numeric hosts, which Twisted parses with
    C{AI_NUMERICHOST}: no query is made), C{gethostbyname},
    C{reactor.resolve} and twisted.names' C{createResolver}/C{getResolver}.

    @return: the list the arguments of each attempt are appended to; a test
        asserts it stays empty (the attempt also raises C{AssertionError}).
    """
    leaks: list[tuple[Any, ...]] = []
    real_getaddrinfo = socket.getaddrinfo

    def no_system_resolver(*a: Any, **kw: Any) -> Any:
        leaks.append(a)
        raise AssertionError("the system resolver must not be used")

    def numeric_only(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                     flags: int = 0) -> Any:
        if not flags & socket.AI_NUMERICHOST:
            return no_system_resolver(host, port)
        return real_getaddrinfo(host, port, family, type, proto, flags)

    case.patch(socket, "getaddrinfo", numeric_only)
    case.patch(socket, "gethostbyname", no_system_resolver)
    case.patch(reactor, "resolve", no_system_resolver)
    case.patch(client, "createResolver", no_system_resolver)
    case.patch(client, "getResolver", no_system_resolver)
    return leaks
