"""MTA-STS (RFC 8461): the parsers, MX matching, and MTASTS.policy_for against
real peers on loopback: a twisted.names zone server for the TXT and A/AAAA
records and a twisted.web HTTPS server with a trustme CA for the policy."""

from __future__ import annotations

import datetime
import json
import os
import stat
import tempfile

import pytest
import trustme
from tests.support.https_peer import POLICY_PATH, PolicyServer, Reply, policy
from tests.support.peers import DnsServerProcess
from tests.support.noresolve import forbid_system_resolver
from twisted.internet import defer, reactor, ssl, task, threads
from twisted.logger import globalLogPublisher
from twisted.python import threadable
from twisted.trial import unittest

from twisted_mailout.testing.loopback import Zone, start_dns_server
from twisted_mailout.tls.mtasts import (
    MAX_AGE_LIMIT,
    MTASTS,
    FetchError,
    Policy,
    PolicyError,
    parse_policy,
    parse_txt,
    policy_url,
)
from twisted_mailout.routing.resolver import make_resolver

ENFORCE = ("version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.mx.example.com\n"
           "max_age: 604800\n")

# Every policy domain the network tests use; one certificate names them all.
DOMAINS = ("ok.test", "t.test", "n.test", "six.test", "alias.test", "noaddr.test", "slow.test")


class ParsePolicyTests(unittest.SynchronousTestCase):
    def test_enforce_with_lf(self):
        p = parse_policy(ENFORCE, domain="example.com", id="abc", fetched=5.0)
        self.assertEqual((p.domain, p.id, p.mode, p.mx, p.max_age, p.fetched),
                         ("example.com", "abc", "enforce",
                          ("mx1.example.com", "*.mx.example.com"), 604800, 5.0))
        self.assertEqual(p.text, ENFORCE)
        self.assertEqual(p.lines(), ENFORCE.splitlines())

    def test_crlf_bytes_and_no_final_line_end(self):
        body = b"version: STSv1\r\nmode: testing\r\nmx: MX.Example.COM\r\nmax_age: 0"
        p = parse_policy(body)
        self.assertEqual((p.mode, p.mx, p.max_age), ("testing", ("mx.example.com",), 0))

    def test_none_needs_no_mx(self):
        p = parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
        self.assertEqual((p.mode, p.mx), ("none", ()))

    def test_field_order_free_spaces_and_tabs_around_values(self):
        p = parse_policy("max_age:\t86400  \nmx:   mx.example.com\nmode: enforce\n"
                         "version:STSv1\n")
        self.assertEqual((p.mode, p.max_age, p.mx), ("enforce", 86400, ("mx.example.com",)))

    def test_unknown_keys_ignored_and_first_duplicate_wins(self):
        p = parse_policy("version: STSv1\nmode: testing\nmode: enforce\nmx: a.example\n"
                         "max_age: 10\nmax_age: 20\nx-ext.v_2: some value here\n"
                         "x-utf8: caf\u00e9\n")
        self.assertEqual((p.mode, p.max_age), ("testing", 10))

    def test_max_age_limit(self):
        p = parse_policy(f"version: STSv1\nmode: none\nmax_age: {MAX_AGE_LIMIT}\n")
        self.assertEqual(p.max_age, MAX_AGE_LIMIT)
        with self.assertRaisesRegex(PolicyError, "exceeds"):
            parse_policy(f"version: STSv1\nmode: none\nmax_age: {MAX_AGE_LIMIT + 1}\n")

    def test_errors(self):
        base = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"
        bad = {
            "": "empty",
            base.replace("STSv1", "STSv2"): "version must be STSv1",
            base.replace("version: STSv1\n", ""): "lacks 'version'",
            base.replace("mode: enforce\n", ""): "lacks 'mode'",
            base.replace("max_age: 86400\n", ""): "lacks 'max_age'",
            base.replace("mx: mx.example.com\n", ""): "lists no mx",
            base.replace("enforce", "Enforce"): "mode must be",
            base.replace("enforce", "report"): "mode must be",
            base.replace("86400", "-1"): "max_age",
            base.replace("86400", "12345678901"): "max_age",
            base.replace("86400", "1e5"): "max_age",
            base.replace("86400", ""): "max_age",
            base + "\n": "empty line",
            base.replace("\nmode", "\n\nmode"): "empty line",
            base + "garbage\n": "no ':'",
            base + "bad key: x\n": "bad key",
            base + "_x: y\n": "bad key",
            base.replace("\n", "\r", 1): "bare CR",
            base.replace("mx.example.com", "*.*.example.com"): "bad mx",
            base.replace("mx.example.com", "*example.com"): "bad mx",
            base.replace("mx.example.com", "mx..example.com"): "bad mx",
            base.replace("mx.example.com", "mx.example.com."): "bad mx",
            base.replace("mx.example.com", "-mx.example.com"): "bad mx",
            base.replace("mx.example.com", "m\u00fcx.example.com"): "bad mx",
            base.replace("mx.example.com", ""): "bad mx",
            base + "ext: \n": "bad value",
        }
        for text, why in bad.items():
            with self.assertRaisesRegex(PolicyError, why, msg=repr(text)):
                parse_policy(text)
        with self.assertRaisesRegex(PolicyError, "not UTF-8"):
            parse_policy(base.encode() + b"x-e: \xff\n")
        with self.assertRaises(TypeError):
            parse_policy(None)
        self.assertTrue(issubclass(PolicyError, ValueError))


class ParseTxtTests(unittest.SynchronousTestCase):
    def test_valid_records(self):
        cases = {
            "v=STSv1; id=20160831085700Z;": "20160831085700Z",
            "v=STSv1;id=abc": "abc",
            "v=STSv1 ;\tid=abc ; ": "abc",
            "v=STSv1; id=abc; ext-1=val; x.y_z=12": "abc",
            "v=STSv1; id=" + "a" * 32: "a" * 32,
        }
        for text, ident in cases.items():
            self.assertEqual(parse_txt([text]), ident, text)
            self.assertEqual(parse_txt([text.encode()]), ident, text)

    def test_character_strings_of_one_record_are_joined(self):
        self.assertEqual(parse_txt([[b"v=STSv1; ", b"id=abc;"]]), "abc")

    def test_other_records_are_discarded(self):
        self.assertEqual(parse_txt(["v=spf1 -all", "v=STSv1; id=abc;", b"\xff\xfe"]), "abc")
        self.assertEqual(parse_txt(["v=STSv10; id=abc", "v=STSv1; id=def"]), "def")

    def test_no_usable_record(self):
        cases = [
            [], ["v=spf1 -all"], ["v=STSv1; id=abc;", "v=STSv1; id=def;"],
            ["v=STSv1"], ["v=STSv1;"], ["v=STSv1; id="], ["v=STSv1; id=has-dash"],
            ["v=STSv1; id=" + "a" * 33], ["v=STSv1; ext=1"], ["v=STSv1; id=abc; bad"],
            ["v=STSv1; id=abc; e=a=b"], ["v=STSv1; id=abc;;"], ["v=STSv1 junk; id=abc"],
            ["V=STSv1; id=abc"], [" v=STSv1; id=abc"], ["v=stsv1; id=abc"],
        ]
        for records in cases:
            self.assertIsNone(parse_txt(records), records)

    def test_type_errors(self):
        with self.assertRaises(TypeError):
            parse_txt([[1]])


class PolicyTests(unittest.SynchronousTestCase):
    def test_exact_match_ignores_case_and_trailing_dot(self):
        p = parse_policy(ENFORCE)
        for host in ("mx1.example.com", "MX1.Example.Com", "mx1.example.com."):
            self.assertTrue(p.matches(host), host)
        for host in ("mx2.example.com", "example.com", "x.mx1.example.com", "", "mx1..example",
                     "mx1.example.com.."):
            self.assertFalse(p.matches(host), host)

    def test_wildcard_matches_exactly_one_leftmost_label(self):
        p = parse_policy(ENFORCE)
        self.assertTrue(p.matches("a.mx.example.com"))
        self.assertTrue(p.matches("A-1.MX.example.com."))
        self.assertFalse(p.matches("mx.example.com"))  # the bare parent
        self.assertFalse(p.matches("a.b.mx.example.com"))  # two labels
        self.assertFalse(p.matches("amx.example.com"))
        self.assertFalse(p.matches("*.mx.example.com"))
        self.assertFalse(p.matches(None))

    def test_expiry(self):
        p = parse_policy(ENFORCE, fetched=1000.0)
        self.assertEqual(p.expires, 1000.0 + 604800)
        self.assertFalse(p.expired(1000.0 + 604799.9))
        self.assertTrue(p.expired(1000.0 + 604800))
        zero = parse_policy("version: STSv1\nmode: none\nmax_age: 0\n", fetched=5)
        self.assertTrue(zero.expired(5))

    def test_report_fields(self):
        p = parse_policy(ENFORCE, domain="example.com")
        self.assertEqual(p.report_fields(), {
            "policy_type": "sts", "policy_domain": "example.com",
            "policy_string": ENFORCE.splitlines(),
            "mx_host": ["mx1.example.com", "*.mx.example.com"]})

    def test_policy_url(self):
        self.assertEqual(policy_url("Example.COM."),
                         "https://mta-sts.example.com/.well-known/mta-sts.txt")
        self.assertEqual(policy_url("example.com", 8443),
                         "https://mta-sts.example.com:8443/.well-known/mta-sts.txt")
        for bad in ("", "a..b", "-a.com", "a/b.com", "[192.0.2.1]"):
            with self.assertRaises(PolicyError, msg=bad):
                policy_url(bad)

    def test_constructor_errors(self):
        with self.assertRaises(ValueError):
            MTASTS(reactor, None, timeout=0)
        with self.assertRaises(ValueError):
            MTASTS(reactor, None, https_port=0)


def trust_root(ca: trustme.CA):
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.cert_pem.bytes())])


def zone(**txt):
    """A zone: ``_mta-sts.<domain>`` TXT per keyword (``ok_test="v=..."``) and
    ``mta-sts.<domain>`` A 127.0.0.1 for every domain of DOMAINS but six.test
    (AAAA ::1 only) and noaddr.test (none)."""
    records = {}
    for key, value in txt.items():
        records["_mta-sts." + key.replace("_", ".")] = value
    for d in DOMAINS:
        if d == "six.test":
            records["mta-sts.six.test"] = {"AAAA": ["::1"]}
        elif d != "noaddr.test":
            records["mta-sts." + d] = {"A": ["127.0.0.1"]}
    return {"ttl": 300, "authoritative_for": ["test"], "records": records}


def txt(ident):
    return {"TXT": [f"v=STSv1; id={ident};"]}


class PolicyForTests(unittest.TestCase):
    """MTASTS.policy_for against a loopback DNS server and HTTPS server."""

    timeout = 60

    def setUp(self):
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(*("mta-sts." + d for d in DOMAINS))
        self.server = self.https(self.cert)
        self.events = []

        def observe(event):
            if "tlsrpt" in event:
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def https(self, cert, interface="127.0.0.1"):
        server = PolicyServer(reactor, cert, interface)
        server.start()
        self.addCleanup(server.stop)
        return server

    def dns(self, description):
        udp, tcp, port = start_dns_server(description, reactor)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.dns_factory = tcp.factory
        return port

    def set_zone(self, description):
        self.dns_factory.zone_resolver.zone = Zone(description)

    def client(self, description=None, port=None, server=None, **kw):
        if port is None:
            port = self.dns(description)
        resolver = make_resolver([f"127.0.0.1:{port}"], reactor, timeout=(1, 2))
        kw.setdefault("timeout", 5)
        kw.setdefault("trust_root", trust_root(self.ca))
        return MTASTS(reactor, resolver, https_port=(server or self.server).port, **kw)

    def results(self):
        return [e["result_type"] for e in self.events if e["tlsrpt"] == "failure"]

    @defer.inlineCallbacks
    def test_enforce_policy_through_the_given_resolver_only(self):
        m = self.client(zone(ok_test=txt("id1")))
        self.server.reply = Reply(body=policy("enforce", ["mx.ok.test", "*.mx.ok.test"], 3600))
        leaks = forbid_system_resolver(self, reactor)
        p = yield m.policy_for("OK.test.")
        self.assertEqual(leaks, [])
        self.assertIsInstance(p, Policy)
        self.assertEqual((p.domain, p.id, p.mode, p.mx, p.max_age),
                         ("ok.test", "id1", "enforce", ("mx.ok.test", "*.mx.ok.test"), 3600))
        self.assertTrue(p.matches("a.mx.ok.test"))
        self.assertFalse(p.matches("mx.evil.test"))
        self.assertEqual(self.server.requests,
                         [(POLICY_PATH, f"mta-sts.ok.test:{self.server.port}")])
        asked = set(self.dns_factory.queries)
        self.assertIn(("_mta-sts.ok.test", 16), asked)
        self.assertIn(("mta-sts.ok.test", 1), asked)
        self.assertIn(("mta-sts.ok.test", 28), asked)
        self.assertEqual(self.results(), [])

    @defer.inlineCallbacks
    def test_testing_and_none_modes(self):
        m = self.client(zone(t_test=txt("t1"), n_test=txt("n1")))
        self.server.reply = Reply(body=policy("testing", ["mx.t.test"]))
        t = yield m.policy_for("t.test")
        self.assertEqual((t.mode, t.mx), ("testing", ("mx.t.test",)))
        self.server.reply = Reply(body=b"version: STSv1\nmode: none\nmax_age: 600\n",
                                  content_type="text/plain; charset=utf-8")
        n = yield m.policy_for("n.test")
        self.assertEqual((n.mode, n.mx, n.max_age), ("none", (), 600))

    @defer.inlineCallbacks
    def test_ipv6_only_policy_host(self):
        six = self.https(self.cert, "::1")
        m = self.client(zone(six_test=txt("v6")), server=six)
        p = yield m.policy_for("six.test")
        self.assertEqual(p.id, "v6")
        self.assertEqual(len(six.requests), 1)

    @defer.inlineCallbacks
    def test_txt_behind_a_cname(self):
        m = self.client(zone(alias_test={"CNAME": "_mta-sts.ok.test"}, ok_test=txt("c1")))
        p = yield m.policy_for("alias.test")
        self.assertEqual((p.domain, p.id), ("alias.test", "c1"))
        # the policy comes from the alias domain's own policy host
        self.assertEqual(self.server.requests,
                         [(POLICY_PATH, f"mta-sts.alias.test:{self.server.port}")])

    @defer.inlineCallbacks
    def test_no_txt_record_means_no_policy_and_no_fetch(self):
        m = self.client(zone(ok_test={"A": ["127.0.0.9"]}))
        self.assertIsNone((yield m.policy_for("ok.test")))  # NODATA
        self.assertIsNone((yield m.policy_for("nothere.test")))  # NXDOMAIN
        self.assertEqual(self.server.requests, [])
        self.assertEqual(self.results(), [])

    @defer.inlineCallbacks
    def test_bad_txt_records_mean_no_policy_and_no_fetch(self):
        for records in (["v=STSv1; id=has-dash;"], ["v=STSv1; id=a;", "v=STSv1; id=b;"],
                        ["v=STSv2; id=abc;"], ["v=STSv1;"]):
            m = self.client(zone(ok_test={"TXT": records}))
            self.assertIsNone((yield m.policy_for("ok.test")), records)
        self.assertEqual(self.server.requests, [])
        # reported to the domain (RFC 8460 4.3.2.2), except the v=STSv2 record,
        # which is not an MTA-STS record at all
        self.assertEqual(self.results(), ["sts-policy-invalid"] * 3)
        self.assertIn("has-dash", self.events[0]["failure_reason_code"])

    @defer.inlineCallbacks
    def test_txt_lookup_failure_means_no_policy(self):
        m = self.client(zone(ok_test={"SERVFAIL": True}))
        self.assertIsNone((yield m.policy_for("ok.test")))
        self.assertEqual(self.server.requests, [])
        self.assertEqual(self.results(), ["sts-policy-fetch-error"])
        self.assertIn("_mta-sts.ok.test TXT: lookup failed",
                      self.events[0]["failure_reason_code"])

    @defer.inlineCallbacks
    def test_literal_and_malformed_domains_have_no_policy(self):
        m = self.client(zone())
        for d in ("[127.0.0.1]", "[IPv6:::1]", "", "a..test", "-x.test", "x" * 300 + ".test"):
            self.assertIsNone((yield m.policy_for(d)), d)
        self.assertEqual(self.dns_factory.queries, [])
        self.assertRaises(TypeError, m.policy_for, None)

    @defer.inlineCallbacks
    def test_http_failures_mean_no_policy_and_are_logged(self):
        port = self.dns(zone(ok_test=txt("h1")))
        good = policy()
        cases = [
            (Reply(status=404, body=b"not found"), "sts-policy-fetch-error", "404"),
            (Reply(status=500, body=good), "sts-policy-fetch-error", "500"),
            (Reply(status=301, headers={"location": POLICY_PATH}, body=good),
             "sts-policy-fetch-error", "redirect"),
            (Reply(status=302, headers={"location": "https://mta-sts.ok.test/x"}, body=good),
             "sts-policy-fetch-error", "redirect"),
            (Reply(content_type="text/html", body=good), "sts-policy-fetch-error", "text/html"),
            (Reply(content_type=None, body=good), "sts-policy-fetch-error", "media type"),
            (Reply(content_type="text/plainx", body=good), "sts-policy-fetch-error", "media"),
            (Reply(body=good + b"x-pad: " + b"p" * 70000 + b"\n"), "sts-policy-fetch-error",
             "bytes exceeds 65536"),  # refused by its Content-Length, before reading
            (Reply(body=b"x" * 65537, chunked=True), "sts-policy-fetch-error",
             "policy exceeds 65536"),  # no Content-Length: counted while reading
            (Reply(body=b"version: STSv1\nmode: enforce\nmax_age: 1\n"), "sts-policy-invalid",
             "no mx"),
            (Reply(body=b"<html>hello</html>"), "sts-policy-invalid", "no ':'"),
        ]
        for reply, result, why in cases:
            self.server.reply = reply
            self.server.requests.clear()
            self.events.clear()
            m = self.client(port=port)
            self.assertIsNone((yield m.policy_for("ok.test")), reply)
            self.assertEqual(len(self.server.requests), 1, reply)  # no redirect followed
            [event] = self.events
            self.assertEqual((event["result_type"], event["policy_type"],
                              event["policy_domain"]), (result, "sts", "ok.test"))
            self.assertIn(why, event["failure_reason_code"])
        # the largest allowed body is accepted
        body = policy()
        self.server.reply = Reply(body=body + b"x-pad: " + b"p" * (65536 - len(body) - 8) + b"\n")
        self.assertEqual(len(self.server.reply.body), 65536)
        p = yield self.client(port=port).policy_for("ok.test")
        self.assertEqual(p.mode, "enforce")

    @defer.inlineCallbacks
    def test_certificate_failures_mean_no_policy(self):
        port = self.dns(zone(ok_test=txt("c1")))
        past = datetime.datetime(2020, 1, 1), datetime.datetime(2021, 1, 1)
        cases = [
            (self.ca.issue_cert("mta-sts.other.test"), "certificate-host-mismatch"),
            (self.ca.issue_cert("ok.test"), "certificate-host-mismatch"),
            (trustme.CA().issue_cert("mta-sts.ok.test"), "certificate-not-trusted"),
            (self.ca.issue_cert("mta-sts.ok.test", not_before=past[0], not_after=past[1]),
             "certificate-expired"),
        ]
        for cert, kind in cases:
            server = self.https(cert)
            self.events.clear()
            m = self.client(port=port, server=server)
            self.assertIsNone((yield m.policy_for("ok.test")), kind)
            self.assertEqual(server.requests, [])  # nothing sent before verification
            [event] = self.events
            self.assertEqual(event["result_type"], "sts-webpki-invalid")
            self.assertIn(kind, event["failure_reason_code"])
        # and the platform store does not know the test CA
        m = self.client(port=port, trust_root=None)
        self.assertIsNone((yield m.policy_for("ok.test")))

    @defer.inlineCallbacks
    def test_a_stalled_server_is_bounded_by_the_timeout(self):
        port = self.dns(zone(ok_test=txt("s1")))
        for stall in ("headers", "body"):
            self.server.reply = Reply(body=policy(), stall=stall)
            self.events.clear()
            m = self.client(port=port, timeout=1)
            start = reactor.seconds()
            self.assertIsNone((yield m.policy_for("ok.test")))
            self.assertLess(reactor.seconds() - start, 5)
            self.assertEqual(self.results(), ["sts-policy-fetch-error"])
            self.assertIn("within 1 s", self.events[0]["failure_reason_code"])
        # the client aborted its connections: the server sees them close
        for _ in range(50):
            if not self.server.open:
                break
            yield task.deferLater(reactor, 0.05)
        self.assertEqual(self.server.open, set())

    @defer.inlineCallbacks
    def test_no_address_for_the_policy_host(self):
        m = self.client(zone(noaddr_test=txt("a1")))
        self.assertIsNone((yield m.policy_for("noaddr.test")))
        self.assertEqual(self.results(), ["sts-policy-fetch-error"])
        self.assertIn("mta-sts.noaddr.test", self.events[0]["failure_reason_code"])

    @defer.inlineCallbacks
    def test_connection_refused(self):
        server = PolicyServer(reactor, self.cert)
        server.start()
        yield server.stop()
        m = self.client(zone(ok_test=txt("r1")), server=server)
        self.assertIsNone((yield m.policy_for("ok.test")))
        self.assertEqual(self.results(), ["sts-policy-fetch-error"])

    @defer.inlineCallbacks
    def test_same_id_is_not_refetched_a_new_id_is(self):
        m = self.client(zone(ok_test=txt("one")), max_txt_ttl=0)
        self.server.reply = Reply(body=policy("testing"))
        p1 = yield m.policy_for("ok.test")
        p2 = yield m.policy_for("ok.test")
        self.assertIs(p1, p2)
        self.assertEqual(len(self.server.requests), 1)
        self.set_zone(zone(ok_test=txt("two")))
        self.server.reply = Reply(body=policy("enforce"))
        p3 = yield m.policy_for("ok.test")
        self.assertEqual((p3.id, p3.mode), ("two", "enforce"))
        self.assertEqual(len(self.server.requests), 2)
        self.assertEqual(m.cached("ok.test"), p3)

    @defer.inlineCallbacks
    def test_txt_answer_is_reused_for_its_ttl(self):
        clock = task.Clock()
        clock.advance(1000)
        m = self.client(zone(ok_test=txt("one")), clock=clock, max_txt_ttl=300)
        yield m.policy_for("ok.test")
        self.set_zone(zone(ok_test=txt("two")))
        self.assertEqual((yield m.policy_for("ok.test")).id, "one")
        txt_queries = [q for q in self.dns_factory.queries if q[1] == 16]
        self.assertEqual(len(txt_queries), 1)
        clock.advance(300)
        self.assertEqual((yield m.policy_for("ok.test")).id, "two")

    @defer.inlineCallbacks
    def test_cached_policy_is_used_when_the_new_one_cannot_be_fetched(self):
        m = self.client(zone(ok_test=txt("one")), max_txt_ttl=0)
        p1 = yield m.policy_for("ok.test")
        self.set_zone(zone(ok_test=txt("two")))
        self.server.reply = Reply(status=404)
        self.assertIs((yield m.policy_for("ok.test")), p1)
        [event] = self.events
        self.assertEqual(event["result_type"], "sts-policy-fetch-error")
        self.assertEqual(event["policy_string"], p1.lines())  # the policy applied
        self.assertEqual(event["mx_host"], list(p1.mx))
        # TXT lookup failing, or the record removed (RFC 8461 5.1, 8.3): still the cache
        self.set_zone(zone(ok_test={"SERVFAIL": True}))
        self.assertIs((yield m.policy_for("ok.test")), p1)
        self.set_zone(zone())
        self.assertIs((yield m.policy_for("ok.test")), p1)

    @defer.inlineCallbacks
    def test_max_age_expiry_refetches_and_an_expired_policy_is_never_used(self):
        clock = task.Clock()
        clock.advance(1_000_000)
        m = self.client(zone(ok_test=txt("one")), clock=clock, max_txt_ttl=0,
                        fetch_backoff=0)
        self.server.reply = Reply(body=policy(max_age=100))
        p1 = yield m.policy_for("ok.test")
        self.assertEqual(p1.fetched, 1_000_000)
        clock.advance(99)
        self.assertIs((yield m.policy_for("ok.test")), p1)
        self.assertEqual(len(self.server.requests), 1)
        clock.advance(1)
        p2 = yield m.policy_for("ok.test")  # same id, but expired: fetched again
        self.assertEqual(len(self.server.requests), 2)
        self.assertEqual(p2.fetched, 1_000_100)
        clock.advance(100)
        self.server.reply = Reply(status=503)
        self.assertIsNone((yield m.policy_for("ok.test")))
        self.assertIsNone(m.cached("ok.test"))

    @defer.inlineCallbacks
    def test_failed_fetch_backs_off_for_the_same_id(self):
        clock = task.Clock()
        m = self.client(zone(ok_test=txt("one")), clock=clock, max_txt_ttl=0,
                        fetch_backoff=300)
        self.server.reply = Reply(status=404)
        self.assertIsNone((yield m.policy_for("ok.test")))
        self.assertIsNone((yield m.policy_for("ok.test")))
        self.assertEqual(len(self.server.requests), 1)
        self.set_zone(zone(ok_test=txt("two")))  # a new id is tried at once
        self.server.reply = Reply(body=policy())
        self.assertEqual((yield m.policy_for("ok.test")).id, "two")
        self.assertEqual(len(self.server.requests), 2)
        self.set_zone(zone(ok_test=txt("three")))
        self.server.reply = Reply(status=404)
        yield m.policy_for("ok.test")
        self.server.reply = Reply(body=policy("testing"))
        self.assertEqual((yield m.policy_for("ok.test")).id, "two")
        clock.advance(300)
        self.assertEqual((yield m.policy_for("ok.test")).id, "three")
        self.assertEqual(len(self.server.requests), 4)

    @defer.inlineCallbacks
    def test_concurrent_calls_share_one_fetch(self):
        m = self.client(zone(ok_test=txt("one")))
        results = yield defer.gatherResults([m.policy_for("ok.test") for _ in range(5)])
        self.assertEqual(len({id(p) for p in results}), 1)
        self.assertEqual(results[0].id, "one")
        self.assertEqual(len(self.server.requests), 1)

    @defer.inlineCallbacks
    def test_cache_is_persisted_and_survives_a_restart(self):
        tmp = tempfile.mkdtemp(prefix="mtasts-")
        self.addCleanup(lambda: __import__("shutil").rmtree(tmp, ignore_errors=True))
        cache = os.path.join(tmp, "queue", "mta-sts")
        port = self.dns(zone(ok_test=txt("one")))
        first = self.client(port=port, cache_dir=cache)
        self.assertEqual(stat.S_IMODE(os.stat(cache).st_mode), 0o700)
        p1 = yield first.policy_for("ok.test")
        path = os.path.join(cache, "ok.test.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(cache), ["ok.test.json"])  # no temporary file left
        with open(path) as f:
            saved = json.load(f)
        self.assertEqual((saved["domain"], saved["id"], saved["text"]),
                         ("ok.test", "one", p1.text))
        # a new instance (a restart) with the same id: no fetch
        second = self.client(port=port, cache_dir=cache)
        self.assertEqual((yield second.policy_for("ok.test")), p1)
        self.assertEqual(len(self.server.requests), 1)
        # DNS failing and HTTPS down after a restart: the persisted policy applies
        self.set_zone(zone(ok_test={"SERVFAIL": True}))
        self.server.reply = Reply(status=500)
        third = self.client(port=port, cache_dir=cache)
        self.assertEqual((yield third.policy_for("ok.test")), p1)
        self.assertEqual(len(self.server.requests), 1)
        # a new id after a restart is fetched and replaces the file
        self.set_zone(zone(ok_test=txt("two")))
        self.server.reply = Reply(body=policy("testing"))
        fourth = self.client(port=port, cache_dir=cache)
        p4 = yield fourth.policy_for("ok.test")
        self.assertEqual((p4.id, p4.mode), ("two", "testing"))
        with open(path) as f:
            self.assertEqual(json.load(f)["id"], "two")

    @defer.inlineCallbacks
    def test_expired_or_corrupt_cache_files_are_not_used(self):
        cache = tempfile.mkdtemp(prefix="mtasts-")
        self.addCleanup(lambda: __import__("shutil").rmtree(cache, ignore_errors=True))
        port = self.dns(zone(ok_test={"SERVFAIL": True}, t_test={"SERVFAIL": True},
                             n_test={"SERVFAIL": True}))
        clock = task.Clock()
        clock.advance(10_000)
        with open(os.path.join(cache, "ok.test.json"), "w") as f:
            json.dump({"format": 1, "domain": "ok.test", "id": "x", "fetched": 100,
                       "text": policy(max_age=5000).decode()}, f)  # expired at 5100
        with open(os.path.join(cache, "t.test.json"), "w") as f:
            f.write('{"format": 1, "domain": "t.test", "id": "x", "fetch')
        with open(os.path.join(cache, "n.test.json"), "w") as f:
            json.dump({"format": 1, "domain": "other.test", "id": "x", "fetched": 9000,
                       "text": policy().decode()}, f)
        # the expired file is used by a clock that says it is still valid
        clock2 = task.Clock()
        clock2.advance(5000)
        m2 = self.client(port=port, cache_dir=cache, clock=clock2)
        self.assertEqual((yield m2.policy_for("ok.test")).id, "x")
        open(os.path.join(cache, ".tmp-abc.json"), "w").close()  # as a crash leaves it
        m = self.client(port=port, cache_dir=cache, clock=clock)
        self.assertNotIn(".tmp-abc.json", os.listdir(cache))
        for d in ("ok.test", "t.test", "n.test"):
            self.assertIsNone((yield m.policy_for(d)), d)
        self.assertNotIn("ok.test.json", os.listdir(cache))  # expired: removed

    @defer.inlineCallbacks
    def test_cache_files_are_read_and_written_off_the_reactor_thread(self):
        cache = tempfile.mkdtemp(prefix="mtasts-")
        self.addCleanup(lambda: __import__("shutil").rmtree(cache, ignore_errors=True))
        ran = []

        def run_blocking(f):
            def call():
                ran.append(threadable.isInIOThread())
                return f()
            return threads.deferToThread(call)

        m = self.client(zone(ok_test=txt("one")), cache_dir=cache, run_blocking=run_blocking)
        p = yield m.policy_for("ok.test")
        self.assertEqual(ran, [False, False])  # the file read (none yet), then written
        self.assertEqual(os.listdir(cache), ["ok.test.json"])
        self.assertEqual((yield m.policy_for("ok.test")), p)
        self.assertEqual(len(ran), 2)  # known now: no more file access
        # a restart reads the file, in the thread too
        again = self.client(port=self.dns(zone(ok_test=txt("one"))), cache_dir=cache,
                            run_blocking=run_blocking)
        self.assertEqual((yield again.policy_for("ok.test")), p)
        self.assertEqual(ran, [False, False, False])

    @defer.inlineCallbacks
    def test_unwritable_cache_is_logged_not_fatal(self):
        cache = tempfile.mkdtemp(prefix="mtasts-")
        self.addCleanup(lambda: __import__("shutil").rmtree(cache, ignore_errors=True))
        m = self.client(zone(ok_test=txt("one")), cache_dir=cache)
        os.chmod(cache, 0o500)
        self.addCleanup(os.chmod, cache, 0o700)
        if os.access(cache, os.W_OK):  # root ignores the mode
            m.cache_dir = os.path.join(cache, "missing", "dir")
        p = yield m.policy_for("ok.test")
        self.assertEqual(p.id, "one")
        self.assertEqual(m.cached("ok.test"), p)

    @defer.inlineCallbacks
    def test_fetch_policy_errors(self):
        m = self.client(zone())
        self.server.reply = Reply(status=404)
        f = yield self.assertFailure(m.fetch_policy("ok.test", "z"), FetchError)
        self.assertEqual(f.result_type, "sts-policy-fetch-error")
        yield self.assertFailure(m.fetch_policy("bad..name"), PolicyError)
        self.server.reply = Reply(body=policy())
        p = yield m.fetch_policy("ok.test", "z")
        self.assertEqual((p.id, p.domain), ("z", "ok.test"))


@pytest.mark.slow  # a DNS server in its own process
class SubprocessDNSTests(unittest.TestCase):
    """The same lookup against the loopback DNS server in its own process
    (``peers.DnsServerProcess``, as the ``dns_server`` fixture runs it)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_policy_through_a_dns_server_process(self):
        ca = trustme.CA()
        server = PolicyServer(reactor, ca.issue_cert("mta-sts.ok.test"))
        server.start()
        self.addCleanup(server.stop)
        server.reply = Reply(body=policy("enforce", ["*.ok.test"]))
        dns = DnsServerProcess(zone(ok_test=txt("proc1")))
        port = yield threads.deferToThread(dns.start, 10.0)
        self.addCleanup(threads.deferToThread, dns.stop)
        m = MTASTS(reactor, make_resolver([f"127.0.0.1:{port}"], reactor, timeout=(1, 2)),
                   trust_root=trust_root(ca), https_port=server.port, timeout=5)
        p = yield m.policy_for("ok.test")
        self.assertEqual((p.id, p.mx), ("proc1", ("*.ok.test",)))
        self.assertTrue(p.matches("mx1.ok.test"))

