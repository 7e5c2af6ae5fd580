"""MTA-STS through the whole delivery path: sendmail() with a recipient
domain that publishes a policy (TXT from a loopback twisted.names server,
the policy over HTTPS from a loopback twisted.web server with a test CA),
delivering over STARTTLS to aiosmtpd (RFC 8461 4 and 5)."""

from __future__ import annotations

import tempfile

from tests.support.https_peer import PolicyServer, Reply, policy
from tests.support.tls_peers import TestPKI, TlsSmtpServer
from tests.support.trial import start_dns
from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

import twisted_mailout
from twisted_mailout.tls.mtasts import MTASTS
from twisted_mailout.routing.resolver import make_resolver
from twisted_mailout.tls.creators import load_trust_root

MSG = b"Subject: sts\r\n\r\nunder MTA-STS\r\n"


class MTASTSDeliveryTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.pki = TestPKI(tempfile.mkdtemp(prefix="sts-pki-"))
        self.https = PolicyServer(reactor, self.pki.ca.issue_cert("mta-sts.sts.test"))
        self.https.start()
        self.addCleanup(self.https.stop)
        self.events = []

        def observe(event):
            if "tlsrpt" in event:
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def smtp(self, cert, **kw):
        server = TlsSmtpServer(cert, **kw).start()
        self.addCleanup(lambda: threads.deferToThread(server.stop))
        return server

    def send(self, server, mx_host, mode="enforce", mx_patterns=("mx.sts.test",)):
        self.https.reply = Reply(body=policy(mode, list(mx_patterns)))
        port, _ = start_dns(self, {
            "_mta-sts.sts.test": {"TXT": ["v=STSv1; id=20261123;"]},
            "mta-sts.sts.test": {"A": ["127.0.0.1"]},
            "sts.test": {"MX": [[10, mx_host]]},
            mx_host: {"A": ["127.0.0.1"]},
        })
        resolver = f"127.0.0.1:{port}"
        sts = MTASTS(reactor, make_resolver([resolver], reactor, timeout=(1, 2)),
                     trust_root=load_trust_root(self.pki.cafile), https_port=self.https.port,
                     timeout=5)
        return twisted_mailout.sendmail(
            "a@origin.test", ["u@sts.test"], MSG, resolver=resolver, mx_port=server.port,
            cafile=self.pki.cafile, mta_sts=sts, timeout=10)

    def failures(self):
        return [e["result_type"] for e in self.events if e["tlsrpt"] == "failure"]

    @defer.inlineCallbacks
    def test_enforce_delivers_over_verified_tls_to_a_policy_mx(self):
        server = self.smtp(self.pki.good("mx.sts.test"))
        report = yield self.send(server, "mx.sts.test")
        self.assertEqual(report["u@sts.test"].status, "delivered")
        [m] = server.messages
        self.assertTrue(m["tls"])
        self.assertEqual(self.failures(), [])
        self.assertIn("success", [e["tlsrpt"] for e in self.events])

    @defer.inlineCallbacks
    def test_enforce_refuses_an_mx_outside_the_policy(self):
        # DNS says mx.attacker.test, whose certificate is valid for its own
        # name: verify alone would accept it; the policy does not list it.
        server = self.smtp(self.pki.good("mx.attacker.test"))
        report = yield self.send(server, "mx.attacker.test")
        r = report["u@sts.test"]
        self.assertEqual((r.status, r.code), ("deferred", 451))
        self.assertIn("MTA-STS", r.text)
        self.assertEqual(server.messages, [])
        self.assertEqual(server.connections, [])  # not even connected to
        self.assertIn("validation-failure", self.failures())

    @defer.inlineCallbacks
    def test_enforce_refuses_a_certificate_that_does_not_verify(self):
        server = self.smtp(self.pki.self_signed("mx.sts.test"))
        report = yield self.send(server, "mx.sts.test")
        self.assertEqual(report["u@sts.test"].status, "deferred")
        self.assertEqual(server.messages, [])
        self.assertIn("certificate-not-trusted", self.failures())

    @defer.inlineCallbacks
    def test_enforce_never_falls_back_to_plaintext(self):
        server = self.smtp(self.pki.good("mx.sts.test"), starttls="none")
        report = yield self.send(server, "mx.sts.test")
        self.assertEqual(report["u@sts.test"].status, "deferred")
        self.assertIn("STARTTLS", report["u@sts.test"].text)
        self.assertEqual(server.messages, [])
        self.assertIn("starttls-not-supported", self.failures())

    @defer.inlineCallbacks
    def test_testing_mode_delivers_and_reports_what_enforce_would_refuse(self):
        server = self.smtp(self.pki.self_signed("mx.sts.test"))
        report = yield self.send(server, "mx.sts.test", mode="testing")
        self.assertEqual(report["u@sts.test"].status, "delivered")
        self.assertTrue(server.messages[0]["tls"])
        self.assertEqual(self.failures(), ["certificate-not-trusted"])
