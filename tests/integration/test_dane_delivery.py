"""DANE through the whole delivery path: sendmail() routes by MX through a
real validating resolver (Unbound, zones signed with ldns), looks up TLSA
records with the AD bit, and delivers over STARTTLS to aiosmtpd only when
the certificate matches (RFC 7672). Under CI, missing tools fail the tests.
"""

from __future__ import annotations

import pytest
from tests.support.dnssec import DNSSECHarness, Zone, require_tools
from tests.support.dane_pki import PKI, flipped, pem_chain, pem_key, rec, zone_line
from tests.support.tls_peers import arrivals, start_sni_server
from twisted.internet import defer
from twisted.trial import unittest

import twisted_mailout

MSG = b"Subject: dane\r\n\r\nthrough DANE\r\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A STARTTLS server presenting a self-signed certificate (as DANE-EE
    servers do), and signed zones whose TLSA records name its port."""
    require_tools()
    pki = PKI()
    chains = {"mx.example.test": (pem_chain([pki.ee]), pem_key(pki.ee_key))}
    server = start_sni_server(tmp_path_factory.mktemp("tls"), chains, "mx.example.test")
    port = server.port
    good = rec(3, 1, 1, pki.ee)
    example = Zone("example.test", [
        "mx IN A 127.0.0.1",
        zone_line(f"_{port}._tcp.mx", good),
        "mismatch IN A 127.0.0.1",
        zone_line(f"_{port}._tcp.mismatch", flipped(good)),
        "unusable IN A 127.0.0.1",
        zone_line(f"_{port}._tcp.unusable", rec(1, 1, 1, pki.ee)),  # PKIX-EE: unusable
        "notlsa IN A 127.0.0.1",
        "bogus IN A 127.0.0.1",
        zone_line(f"_{port}._tcp.bogus", good),
        "good IN MX 10 mx",
        "bad IN MX 10 mismatch",
        "weak IN MX 10 unusable",
        "none IN MX 10 notlsa",
        "broken IN MX 10 bogus",
        "fallback IN MX 10 mismatch",
        "fallback IN MX 20 mx",
    ], corrupt=[(f"_{port}._tcp.bogus.example.test", "TLSA")])
    insecure = Zone("insecure.test", ["@ IN MX 10 mx", "mx IN A 127.0.0.1"], signed=False)
    h = DNSSECHarness([Zone("test"), example, insecure], workdir=tmp_path_factory.mktemp("dns"))
    h.start()
    yield server, h
    h.stop()
    server.stop()


class DANEDeliveryTests(unittest.TestCase):
    timeout = 60

    @pytest.fixture(autouse=True)
    def _world(self, world):
        type(self).server, type(self).h = world

    def send(self, rcpt, tls="may", dnssec=True):
        resolver = f"127.0.0.1:{self.h.port}"
        return twisted_mailout.sendmail(
            "a@origin.test", [rcpt], MSG, resolver=resolver, mx_port=self.server.port,
            tls=tls, dnssec_resolver=resolver if dnssec else None, timeout=10)

    def arrived(self):
        return arrivals(self.server)

    @defer.inlineCallbacks
    def test_matching_dane_ee_record_delivers_over_tls_despite_a_self_signed_certificate(self):
        before = len(self.arrived())
        report = yield self.send("u@good.example.test")
        self.assertEqual(report["u@good.example.test"].status, "delivered")
        self.assertEqual(self.arrived()[before:], [("a@origin.test", True)])

    @defer.inlineCallbacks
    def test_mismatching_record_defers_and_never_sends_in_plaintext(self):
        before = len(self.arrived())
        report = yield self.send("u@bad.example.test")
        r = report["u@bad.example.test"]
        self.assertEqual(r.status, "deferred")
        self.assertIn("DANE", r.text)
        self.assertEqual(self.arrived()[before:], [])

    @defer.inlineCallbacks
    def test_a_mismatching_mx_is_skipped_for_the_next_one(self):
        before = len(self.arrived())
        report = yield self.send("u@fallback.example.test")
        self.assertEqual(report["u@fallback.example.test"].status, "delivered")
        self.assertEqual(self.arrived()[before:], [("a@origin.test", True)])

    @defer.inlineCallbacks
    def test_unusable_records_mean_tls_without_authentication(self):
        before = len(self.arrived())
        report = yield self.send("u@weak.example.test")
        self.assertEqual(report["u@weak.example.test"].status, "delivered")
        self.assertEqual(self.arrived()[before:], [("a@origin.test", True)])

    @defer.inlineCallbacks
    def test_bogus_tlsa_answer_means_the_host_is_not_used(self):
        before = len(self.arrived())
        report = yield self.send("u@broken.example.test")
        r = report["u@broken.example.test"]
        self.assertEqual(r.status, "deferred")
        self.assertIn("DNSSEC", r.text)
        self.assertEqual(self.arrived()[before:], [])

    @defer.inlineCallbacks
    def test_without_tlsa_records_may_applies(self):
        report = yield self.send("u@none.example.test")
        self.assertEqual(report["u@none.example.test"].status, "delivered")
        report = yield self.send("u@insecure.test")
        self.assertEqual(report["u@insecure.test"].status, "delivered")

    @defer.inlineCallbacks
    def test_dane_only_defers_an_unsigned_domain_and_a_host_without_records(self):
        before = len(self.arrived())
        report = yield self.send("u@insecure.test", tls="dane-only")
        self.assertEqual(report["u@insecure.test"].status, "deferred")
        self.assertIn("not DNSSEC-signed", report["u@insecure.test"].text)
        report = yield self.send("u@none.example.test", tls="dane-only")
        self.assertEqual(report["u@none.example.test"].status, "deferred")
        self.assertIn("no usable DANE", report["u@none.example.test"].text)
        report = yield self.send("u@good.example.test", tls="dane-only")
        self.assertEqual(report["u@good.example.test"].status, "delivered")
        self.assertEqual(self.arrived()[before:], [("a@origin.test", True)])

    @defer.inlineCallbacks
    def test_without_a_declared_validating_resolver_dane_is_not_used(self):
        before = len(self.arrived())
        report = yield self.send("u@bad.example.test", dnssec=False)
        # the mismatching TLSA record is not consulted: plain opportunistic TLS
        self.assertEqual(report["u@bad.example.test"].status, "delivered")
        self.assertEqual(self.arrived()[before:], [("a@origin.test", True)])
        report = yield self.send("u@good.example.test", tls="dane-only", dnssec=False)
        self.assertIn("--dnssec-resolver", report["u@good.example.test"].text)
