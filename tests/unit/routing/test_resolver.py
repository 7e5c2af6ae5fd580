"""DNS helpers shared by routing, MTA-STS and DANE (twisted_mailout.routing.resolver):
the CNAME follower, the A+AAAA lookup, the TTL cache, name normalisation,
resolver construction and the TCP endpoint choice. No network: answers are
built as twisted.names records."""

from __future__ import annotations

import pytest
from twisted.internet import defer, endpoints
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.names import client, dns, resolve
from twisted.names import error as dnserror
from twisted.python.failure import Failure

from twisted_mailout.routing import resolver as r
from twisted_mailout.routing.dnssec import DNSSECLookupError
from twisted_mailout.routing.resolver import (
    TTLCache,
    follow_cnames,
    lookup_addresses,
    make_resolver,
    negative_ttl,
    normalise_name,
    system_nameservers,
    tcp_endpoint,
)


def rr(name: str, payload, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name=name, type=payload.TYPE, ttl=ttl, payload=payload)


def cname(name: str, target: str, ttl: int = 300) -> dns.RRHeader:
    return rr(name, dns.Record_CNAME(target), ttl)


def a(name: str, address: str, ttl: int = 300) -> dns.RRHeader:
    return rr(name, dns.Record_A(address), ttl)


def soa(minimum: int, ttl: int) -> dns.RRHeader:
    return rr("example.test", dns.Record_SOA(minimum=minimum), ttl)


def test_normalise_name():
    assert normalise_name("MX.Example.TEST.") == "mx.example.test"
    assert normalise_name(b"mx.example.test.") == "mx.example.test"
    assert normalise_name(dns.Name(b"MX.example.test")) == "mx.example.test"


def test_follow_cnames_to_the_records_at_the_end_of_the_chain():
    answers = [cname("www.example.test", "Web.Example.TEST.", ttl=600),
               cname("web.example.test", "host.example.test", ttl=50),
               a("host.example.test", "192.0.2.1", ttl=300),
               a("other.example.test", "192.0.2.9")]
    chain = follow_cnames(answers, "WWW.example.test.", dns.A)
    assert [x.payload.dottedQuad() for x in chain.records] == ["192.0.2.1"]
    assert chain.canonical == "host.example.test"
    assert chain.ttl == 50  # the smallest TTL on the way


def test_follow_cnames_without_a_chain_and_with_a_loop():
    chain = follow_cnames([a("mx.example.test", "192.0.2.1", ttl=30)], "mx.example.test", dns.A)
    assert chain.canonical == "mx.example.test" and chain.ttl == 30 and len(chain.records) == 1
    loop = [cname("a.test", "b.test"), cname("b.test", "a.test")]
    chain = follow_cnames(loop, "a.test", dns.A)
    assert chain.records == [] and chain.canonical == "b.test"
    empty = follow_cnames([], "a.test", dns.MX)
    assert (empty.records, empty.ttl, empty.canonical) == ([], None, "a.test")
    # asking for the CNAME itself follows nothing
    assert len(follow_cnames(loop, "a.test", dns.CNAME).records) == 1


def test_negative_ttl_is_the_soa_minimum_capped_by_its_ttl():
    assert negative_ttl([soa(minimum=120, ttl=3600)]) == 120
    assert negative_ttl([soa(minimum=3600, ttl=90)]) == 90
    assert negative_ttl([]) == r.DEFAULT_NEGATIVE_TTL


class FakeResolver:
    def __init__(self, a_answer, aaaa_answer):
        self.answers = {dns.A: a_answer, dns.AAAA: aaaa_answer}
        self.asked: list[tuple[str, int]] = []

    def _answer(self, name, rrtype):
        self.asked.append((name, rrtype))
        result = self.answers[rrtype]
        if isinstance(result, Exception):
            return defer.fail(result)
        return defer.succeed(result)

    def lookupAddress(self, name):
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name):
        return self._answer(name, dns.AAAA)


def _result(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_lookup_addresses_asks_a_and_aaaa_and_follows_cnames():
    fake = FakeResolver(
        ([cname("mx.example.test", "host.example.test", ttl=100),
          a("host.example.test", "192.0.2.1", ttl=300)], [], []),
        ([rr("mx.example.test", dns.Record_AAAA("2001:db8::1"), ttl=200)], [], []))
    answer = _result(lookup_addresses(fake, "MX.example.test."))
    assert answer.addresses == ["192.0.2.1", "2001:db8::1"]
    assert answer.ttl == 100
    assert answer.failures == []
    assert sorted(fake.asked) == [("mx.example.test", dns.A), ("mx.example.test", dns.AAAA)]


def test_lookup_addresses_reports_failures_and_negative_ttls():
    fake = FakeResolver(dnserror.DNSServerError("SERVFAIL"), ([], [soa(45, 3600)], []))
    answer = _result(lookup_addresses(fake, "mx.example.test"))
    assert answer.addresses == []
    assert answer.ttl == 45  # from the AAAA lookup's SOA
    assert len(answer.failures) == 1 and answer.failures[0].check(dnserror.DNSServerError)
    assert "SERVFAIL" in answer.describe_failures()
    both = _result(lookup_addresses(FakeResolver(dnserror.DNSNameError(),
                                                 dnserror.DNSNameError()), "x.test"))
    assert both.ttl is None and len(both.failures) == 2


def test_ttl_cache_expires_by_the_clock_and_stays_bounded():
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache(clock, max_ttl=100, max_entries=2)
    cache.put("a", 1, ttl=10)
    cache.put("b", 2, ttl=1000)  # capped at 100
    cache.put("ignored", 3, ttl=0)
    assert cache.get("a") == 1 and cache.get("ignored") is None
    clock.advance(10)
    assert cache.get("a") is None
    assert cache.get("b") == 2
    cache.put("c", 3, ttl=50)
    cache.put("d", 4, ttl=50)  # full: the oldest entry goes
    assert len(cache) == 2 and cache.get("d") == 4
    clock.advance(100)
    assert cache.get("b") is None and cache.get("c") is None


def test_system_nameservers(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"
                    "nameserver bogus\nsearch example.test\nnameserver 198.51.100.1\n")
    assert system_nameservers(str(conf)) == [("192.0.2.53", 53), ("198.51.100.1", 53)]
    assert system_nameservers(str(tmp_path / "missing")) == [("127.0.0.1", 53)]


def test_make_resolver(tmp_path):
    clock = Clock()
    named = make_resolver(["127.0.0.1:5353", "192.0.2.1"], clock, timeout=(1, 2))
    assert isinstance(named, client.Resolver)
    assert named.servers == [("127.0.0.1", 5353), ("192.0.2.1", 53)]
    assert named.timeout == (1, 2)
    with pytest.raises(ValueError, match="must be an IPv4 address"):
        make_resolver(["dns.example.test"], clock)
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.7 relay.example.test\n")
    chain = make_resolver(None, clock, resolv_conf=str(conf), hosts_file=str(hosts))
    assert isinstance(chain, resolve.ResolverChain)
    assert chain.resolvers[1].servers == [("192.0.2.53", 53)]
    # the hosts file is asked first, without any query on the wire
    result = _result(chain.lookupAddress("relay.example.test"))
    assert result[0][0].payload.dottedQuad() == "192.0.2.7"


def test_tcp_endpoint_by_address_family():
    clock = Clock()
    assert isinstance(tcp_endpoint(clock, "192.0.2.1", 25), endpoints.TCP4ClientEndpoint)
    assert isinstance(tcp_endpoint(clock, "2001:db8::1", 25), endpoints.TCP6ClientEndpoint)
    assert isinstance(tcp_endpoint(clock, "::ffff:192.0.2.1", 25), endpoints.TCP6ClientEndpoint)


def test_dnssec_lookup_error_does_not_shadow_twisteds():
    e = DNSSECLookupError("_25._tcp.mx.example.test", 52, 2, "SERVFAIL")
    assert not isinstance(e, DNSLookupError)
    assert str(e) == "TLSA lookup for _25._tcp.mx.example.test failed: SERVFAIL"
