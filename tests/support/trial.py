"""Helpers for trial-style test cases (C{twisted.trial.unittest.TestCase}) that
run loopback peers in the test's own reactor or in a thread.

* L{deferred_test} -- run an C{async def} test method as a Deferred;
* L{start_sink} -- an L{AiosmtpdSink} stopped at the test's cleanup;
* L{start_dns} -- the package's loopback DNS server in this reactor, stopped
  at the test's cleanup.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.support.peers import AiosmtpdSink, zone
from twisted_mailout.testing.loopback import start_dns_server

C = TypeVar("C", bound=unittest.TestCase)


def deferred_test(
    f: Callable[..., Coroutine[Any, Any, Any]],
) -> Callable[..., defer.Deferred[Any]]:
    """Decorate an C{async def} test method so trial waits for it.

    @param f: the coroutine function (a test method).
    @return: a method returning C{Deferred.fromCoroutine(f(...))}; trial
        runs the reactor until it fires and fails the test on its failure.
    """

    @functools.wraps(f)
    def wrapper(self: unittest.TestCase, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(f(self, *args, **kwargs))

    return wrapper


def start_sink(case: unittest.TestCase, hostname: str = "127.0.0.1", **kwargs: Any) -> AiosmtpdSink:
    """Start an aiosmtpd sink for the length of one test.

    @param case: the running test; the sink is stopped at its cleanup, in a
        thread so the reactor keeps running meanwhile.
    @param hostname: loopback address to listen on (C{"127.0.0.1"} or C{"::1"}).
    @param kwargs: the other keyword arguments of L{AiosmtpdSink}
        (C{rcpt_reply}, C{data_reply}, C{greeting_reply}, ...).
    @return: the started sink; its C{port} is the TCP port number.
    """
    sink = AiosmtpdSink(hostname, **kwargs).start()
    case.addCleanup(lambda: threads.deferToThread(sink.stop))
    return sink


def start_dns(case: unittest.TestCase, records: dict[str, Any],
              interface: str = "127.0.0.1") -> tuple[int, Any]:
    """Serve C{records} with L{twisted_mailout.testing.loopback.start_dns_server}
    in the global reactor for the length of one test (UDP and TCP).

    @param case: the running test; both ports stop listening at its cleanup.
    @param records: C{{name: {type: [values]}}}, see L{tests.support.peers.zone}
        (TTL 300 s, authoritative for C{test}).
    @param interface: loopback address to listen on.
    @return: C{(port, tcp_factory)}: the port number (the same for UDP and
        TCP) and the TCP server factory (its query log).
    """
    udp, tcp, port = start_dns_server(zone(records), reactor, interface=interface)
    case.addCleanup(udp.stopListening)
    case.addCleanup(tcp.stopListening)
    return port, tcp.factory
