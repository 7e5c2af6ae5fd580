"""Requeue's forgetting (Postfix postsuper -r): the pool drops a destination's
dead-destination memory and idle connections, the MX router its cached
answers, so the next delivery routes and connects afresh."""

from __future__ import annotations

from twisted.internet import task
from twisted.names import dns

from tests.support.fakes import FakeResolver, a, mx
from tests.unit.delivery.test_pool import Unreachable, failure, make, result
from twisted_mailout.delivery.pool import DestinationDown, PoolLimits
from twisted_mailout.routing.router import MXRouter


def test_pool_forget_clears_down_memory_and_idle_connections():
    clock, opener, pool = make(PoolLimits(max_connections=5, max_per_destination=2,
                                          failure_memory=60.0))
    d = pool.acquire("example.org")
    opener.fail(Unreachable())
    failure(d)
    assert isinstance(failure(pool.acquire("example.org")), DestinationDown)
    assert pool.forget("example.org") == 0
    d = pool.acquire("example.org")  # tried again at once, not refused from memory
    session = opener.succeed()
    lease = result(d)
    pool.release(lease, reusable=True)
    assert pool.idle_to("example.org") == 1
    assert pool.forget("example.org") == 1
    assert session.quits == 1 and pool.idle_to("example.org") == 0
    assert pool.open_connections == 0
    assert pool.forget("never.example") == 0


def test_mx_router_forget_asks_dns_again():
    clock = task.Clock()
    res = FakeResolver({("example.org", dns.MX): [mx("example.org", 10, "mx.example.org")],
                        ("mx.example.org", dns.A): [a("mx.example.org", "192.0.2.7")]})
    router = MXRouter(res, clock)
    hops = []
    router.route("example.org").addCallback(hops.append)
    router.route("example.org").addCallback(hops.append)
    assert [q for q in res.queries if q[1] == dns.MX] == [("example.org", dns.MX)]
    assert router.forget("example.org") == ["mx.example.org", "example.org"]
    router.route("example.org").addCallback(hops.append)
    assert len([q for q in res.queries if q[1] == dns.MX]) == 2
    assert len(hops) == 3
