"""MX routing (RFC 5321 5.1, RFC 7505) driven by a scripted resolver and a Clock."""

import random

from twisted.internet import task
from twisted.names import dns
from twisted.trial import unittest

from tests.support.fakes import NXDOMAIN, SERVFAIL, TIMEOUT, FakeResolver, a, aaaa, cname, mx
from twisted_mailout.routing.router import (
    MXRouter,
    NextHop,
    RelayRouter,
    RouteError,
    parse_hostport,
)


def router(table, rng=None, port=25):
    clock = task.Clock()
    res = FakeResolver(table)
    return MXRouter(res, clock, port=port, rng=rng or random.Random(1)), res, clock


class RouteTests(unittest.TestCase):
    def hosts(self, d):
        return [h.host for h in self.successResultOf(d)]

    def test_mx_sorted_by_preference(self):
        r, _, _ = router({("example.test", dns.MX): [
            mx("example.test", 30, "c.example.test"),
            mx("example.test", 10, "a.example.test"),
            mx("example.test", 20, "b.example.test")]}, port=2525)
        hops = self.successResultOf(r.route("example.test"))
        self.assertEqual([h.host for h in hops], ["a.example.test", "b.example.test",
                                                   "c.example.test"])
        self.assertEqual([h.port for h in hops], [2525] * 3)
        self.assertEqual([h.preference for h in hops], [10, 20, 30])

    def test_equal_preferences_all_kept_in_random_order(self):
        # Twisted's MXCalculator.getMX raises TypeError on equal preferences
        # and returns one host; we return all of them, shuffled.
        table = {("example.test", dns.MX): [
            mx("example.test", 10, "a.example.test"),
            mx("example.test", 10, "b.example.test"),
            mx("example.test", 10, "c.example.test"),
            mx("example.test", 20, "z.example.test")]}
        orders = set()
        for seed in range(30):
            r, _, _ = router(table, rng=random.Random(seed))
            hosts = self.hosts(r.route("example.test"))
            self.assertEqual(sorted(hosts[:3]), ["a.example.test", "b.example.test",
                                                 "c.example.test"])
            self.assertEqual(hosts[3], "z.example.test")
            orders.add(tuple(hosts[:3]))
        self.assertGreater(len(orders), 1, "equal preferences must be shuffled")

    def test_implicit_mx_when_no_mx_record(self):
        r, _, _ = router({("plain.test", dns.A): [a("plain.test", "127.0.0.7")]})
        hops = self.successResultOf(r.route("plain.test"))
        self.assertEqual(hops, [NextHop("plain.test", 25, None, True)])
        self.assertEqual(self.successResultOf(r.addresses(hops[0])), ["127.0.0.7"])

    def test_implicit_mx_without_address_is_permanent(self):
        r, _, _ = router({})
        hops = self.successResultOf(r.route("empty.test"))
        f = self.failureResultOf(r.addresses(hops[0]), RouteError)
        self.assertEqual(f.value.reply.code // 100, 5)

    def test_null_mx_is_permanent(self):
        r, _, _ = router({("nullmx.test", dns.MX): [mx("nullmx.test", 0, "")]})
        f = self.failureResultOf(r.route("nullmx.test"), RouteError)
        self.assertEqual(f.value.reply.code, 556)
        self.assertEqual(f.value.reply.enhanced_status, "5.1.10")

    def test_nxdomain_is_permanent(self):
        r, _, _ = router({("gone.test", dns.MX): NXDOMAIN})
        f = self.failureResultOf(r.route("gone.test"), RouteError)
        self.assertTrue(f.value.reply.is_permanent)
        self.assertIn("NXDOMAIN", f.value.reply.text)

    def test_servfail_and_timeout_are_temporary(self):
        for err, word in ((SERVFAIL, "SERVFAIL"), (TIMEOUT, "timed out")):
            r, _, _ = router({("flaky.test", dns.MX): err})
            f = self.failureResultOf(r.route("flaky.test"), RouteError)
            self.assertTrue(f.value.reply.is_transient, err)
            self.assertIn(word, f.value.reply.text)

    def test_mx_answers_cached_for_their_ttl(self):
        r, res, clock = router({("example.test", dns.MX): [
            mx("example.test", 10, "a.example.test", ttl=100)]})
        self.successResultOf(r.route("example.test"))
        self.successResultOf(r.route("example.test"))
        self.assertEqual(len(res.queries), 1)
        clock.advance(99)
        self.successResultOf(r.route("example.test"))
        self.assertEqual(len(res.queries), 1)
        clock.advance(2)
        self.successResultOf(r.route("example.test"))
        self.assertEqual(len(res.queries), 2)

    def test_failures_are_not_cached(self):
        r, res, _ = router({("flaky.test", dns.MX): SERVFAIL})
        self.failureResultOf(r.route("flaky.test"), RouteError)
        self.failureResultOf(r.route("flaky.test"), RouteError)
        self.assertEqual(len(res.queries), 2)

    def test_cname_followed_in_answers(self):
        r, _, _ = router({
            ("alias.test", dns.MX): [cname("alias.test", "real.test"),
                                     mx("real.test", 5, "mx.real.test")],
            ("mx.real.test", dns.A): [cname("mx.real.test", "box.real.test"),
                                      a("box.real.test", "127.0.0.8")],
        })
        hops = self.successResultOf(r.route("alias.test"))
        self.assertEqual([h.host for h in hops], ["mx.real.test"])
        self.assertEqual(self.successResultOf(r.addresses(hops[0])), ["127.0.0.8"])

    def test_ipv4_and_ipv6_addresses(self):
        r, _, _ = router({
            ("mx.dual.test", dns.A): [a("mx.dual.test", "127.0.0.2")],
            ("mx.dual.test", dns.AAAA): [aaaa("mx.dual.test", "::1")],
            ("mx.six.test", dns.AAAA): [aaaa("mx.six.test", "::1")],
        })
        self.assertEqual(self.successResultOf(r.addresses(NextHop("mx.dual.test", 25))),
                         ["127.0.0.2", "::1"])
        self.assertEqual(self.successResultOf(r.addresses(NextHop("mx.six.test", 25))), ["::1"])

    def test_mx_host_without_address_is_temporary(self):
        r, _, _ = router({("mx.none.test", dns.A): NXDOMAIN,
                          ("mx.none.test", dns.AAAA): NXDOMAIN})
        f = self.failureResultOf(r.addresses(NextHop("mx.none.test", 25, 10)), RouteError)
        self.assertTrue(f.value.reply.is_transient)

    def test_address_literal_routes_directly(self):
        r, res, _ = router({})
        hops = self.successResultOf(r.route("[127.0.0.9]"))
        self.assertEqual(self.successResultOf(r.addresses(hops[0])), ["127.0.0.9"])
        self.assertEqual(res.queries, [])

    def test_relay_router_sends_every_domain_to_the_relay(self):
        res = FakeResolver({("relay.test", dns.A): [a("relay.test", "127.0.0.3")]})
        rr = RelayRouter("relay.test", 587, res, task.Clock())
        for dom in ("a.test", "b.test"):
            self.assertEqual(self.successResultOf(rr.route(dom)), [NextHop("relay.test", 587)])
        self.assertEqual(self.successResultOf(rr.addresses(NextHop("relay.test", 587))),
                         ["127.0.0.3"])
        self.assertEqual([q[0] for q in res.queries], ["relay.test", "relay.test"])


def test_parse_hostport():
    assert parse_hostport("mx.test", 25) == ("mx.test", 25)
    assert parse_hostport("mx.test:2525", 25) == ("mx.test", 2525)
    assert parse_hostport("[::1]:2525", 25) == ("::1", 2525)
    assert parse_hostport("::1", 25) == ("::1", 25)
    for bad in ("", ":25", "mx.test:0", "mx.test:x", "mx.test:70000"):
        try:
            parse_hostport(bad, 25)
        except ValueError:
            continue
        raise AssertionError(bad)
