"""twisted_mailout.sendmail(): deliver now through the router and session,
against real peers on loopback (a twisted.names DNS server, aiosmtpd,
Twisted's own ESMTP server with a real TLS certificate)."""

from __future__ import annotations

import os
import tempfile

import trustme
from tests.support.peers import PemContextFactory
from tests.support.trial import start_dns, start_sink
from tests.support.noresolve import forbid_system_resolver
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

import twisted_mailout
from twisted_mailout.testing.loopback import start_smtp_receiver

MSG = (b"Message-ID: <api@test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
       b"Subject: api\r\n\r\n.dot line\r\nbody\r\n")


class SendmailTests(unittest.TestCase):
    timeout = 60



    @defer.inlineCallbacks
    def test_relay_delivers_bytes_unchanged_and_reports_each_recipient(self):
        sink = start_sink(self, rcpt_reply=lambda r: "550 5.1.1 no such user"
                          if r.startswith("nobody@") else None)
        report = yield twisted_mailout.sendmail(
            "a@origin.test", ["b@dest.test", "nobody@dest.test", "c@other.test"], MSG,
            relay=f"127.0.0.1:{sink.port}", timeout=10)
        self.assertEqual([(r.recipient, r.status, r.code) for r in report], [
            ("b@dest.test", "delivered", 250), ("nobody@dest.test", "bounced", 550),
            ("c@other.test", "delivered", 250)])
        self.assertEqual(report["nobody@dest.test"].text, "5.1.1 no such user")
        self.assertEqual(report["b@dest.test"].relay, f"127.0.0.1[127.0.0.1]:{sink.port}")
        [m] = sink.messages  # one transaction for the relay
        self.assertEqual(m["data"], MSG)
        self.assertEqual(m["rcpt_tos"], ["b@dest.test", "c@other.test"])

    @defer.inlineCallbacks
    def test_every_size_arrives_byte_for_byte(self):
        # Twisted's client breaks dot-stuffing at its 16 KiB chunk boundaries
        # and sends CRLF as CR CR LF; our session must not.
        sink = start_sink(self)
        sizes = [40, 41, 16383, 16384, 16385, 16386, 65535, 65536, 65537, 131073]
        sent = []
        for n in sizes:
            head = b"Message-ID: <s%d@test>\r\nDate: x\r\n\r\n" % n
            body = b".x\r\n" * ((n - len(head) - 2) // 4)
            body += b"y" * (n - len(head) - len(body) - 2) + b"\r\n"
            data = head + body
            self.assertEqual(len(data), n)
            sent.append(data)
            report = yield twisted_mailout.sendmail("a@origin.test", "b@dest.test", data,
                                                    relay=f"127.0.0.1:{sink.port}", timeout=10)
            self.assertTrue(report.all_delivered)
        self.assertEqual([m["data"] for m in sink.messages], sent)

    @defer.inlineCallbacks
    def test_mx_routing_asks_only_the_given_resolver(self):
        sink = start_sink(self, "127.0.0.2")
        six = start_sink(self, "::1", port=sink.port)
        port, server = start_dns(self, {
            "dest.test": {"MX": [[10, "mx.dest.test"], [10, "mx2.dest.test"]]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "mx2.dest.test": {"A": ["127.0.0.2"]},
            "six.test": {"MX": [[10, "mx.six.test"]]},
            "mx.six.test": {"AAAA": ["::1"]},
        })
        leaks = forbid_system_resolver(self, reactor)
        report = yield twisted_mailout.sendmail(
            "a@origin.test", ["b@dest.test", "c@six.test"], MSG, resolver=f"127.0.0.1:{port}",
            mx_port=sink.port, timeout=10)
        self.assertTrue(report.all_delivered, list(report))
        self.assertEqual(leaks, [])
        asked = {(n, t) for n, t in server.queries}
        self.assertIn(("dest.test", 15), asked)
        self.assertIn(("six.test", 15), asked)
        self.assertIn(("mx.six.test", 28), asked)
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(len(six.messages), 1)
        self.assertEqual(report["c@six.test"].relay, f"mx.six.test[::1]:{sink.port}")

    @defer.inlineCallbacks
    def test_dns_failures_are_results_not_errors(self):
        port, _ = start_dns(self, {"nullmx.test": {"MX": [[0, "."]]},
                            "broken.test": {"SERVFAIL": True}})
        report = yield twisted_mailout.sendmail(
            "a@origin.test", ["x@nullmx.test", "y@nowhere.test", "z@broken.test"], MSG,
            resolver=f"127.0.0.1:{port}", timeout=5)
        self.assertEqual([(r.status, r.code, r.local) for r in report], [
            ("bounced", 556, True), ("bounced", 550, True), ("deferred", 451, True)])

    @defer.inlineCallbacks
    def test_a_server_that_never_answers_cannot_hang_sendmail(self):
        # twisted.mail.smtp.sendmail() has no timeout; ours always fires.
        silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                                   interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        start = reactor.seconds()
        report = yield twisted_mailout.sendmail(
            "a@origin.test", "b@dest.test", MSG, relay=f"127.0.0.1:{silent.getHost().port}",
            timeout=1)
        r = report["b@dest.test"]
        self.assertEqual((r.status, r.local), ("deferred", True))
        self.assertIn("timeout", r.text)
        self.assertLess(reactor.seconds() - start, 10)

    @defer.inlineCallbacks
    def test_tls_may_accepts_a_self_signed_certificate_verify_does_not(self):
        # twisted.mail.smtp.sendmail() fails here even though TLS is optional.
        ca = trustme.CA()
        cert = ca.issue_cert("mx.dest.test")
        tmp = tempfile.mkdtemp(prefix="mailout-tls-")
        pem = os.path.join(tmp, "mx.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(pem)
        capem = os.path.join(tmp, "ca.pem")
        ca.cert_pem.write_to_path(capem)
        lp, receiver = start_smtp_receiver(reactor, "127.0.0.1", 0, "mx.dest.test",
                                           tls_context_factory=PemContextFactory(pem))
        self.addCleanup(lp.stopListening)
        relay = f"127.0.0.1:{lp.getHost().port}"
        may = yield twisted_mailout.sendmail("a@origin.test", "b@dest.test", MSG, relay=relay,
                                             tls="may", timeout=10)
        self.assertEqual(may["b@dest.test"].status, "delivered")
        # verify against the system store: the test CA is unknown -> deferred, not sent
        verify = yield twisted_mailout.sendmail("a@origin.test", "b@dest.test", MSG,
                                                relay=relay, tls="verify", timeout=10)
        self.assertEqual(verify["b@dest.test"].status, "deferred")
        self.assertIn("TLS", verify["b@dest.test"].text)
        # verify with the right CA but the wrong name (relay given as an IP) -> deferred
        wrong = yield twisted_mailout.sendmail("a@origin.test", "b@dest.test", MSG,
                                               relay=relay, tls="verify", cafile=capem,
                                               timeout=10)
        self.assertEqual(wrong["b@dest.test"].status, "deferred")
        self.assertEqual(len(receiver.messages), 1)
        self.assertEqual(receiver.messages[0]["data"], MSG)

    def test_bad_arguments_fail_the_deferred(self):
        for args in [("a@origin.test", [], MSG), ("a@origin.test", ["b@x\r\n.test"], MSG),
                     ("bad sender", ["b@dest.test"], MSG), ("a@origin.test", ["b@dest.test"],
                                                           b"")]:
            f = self.failureResultOf(twisted_mailout.sendmail(*args, relay="127.0.0.1:1"))
            self.assertIsInstance(f.value, ValueError)
        f = self.failureResultOf(twisted_mailout.sendmail("a@origin.test", "b@dest.test", MSG,
                                                          tls="bogus"))
        self.assertIsInstance(f.value, ValueError)


class TooManyRecipientsTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_452_after_two_recipients_sends_the_rest_in_new_transactions(self):
        # aiosmtpd answers 452 to every RCPT past the second of a transaction
        counts = {}

        def rcpt_reply(rcpt):
            n = counts.get("n", 0) + 1
            counts["n"] = n
            return "452 4.5.3 too many recipients" if n > 2 else None

        sink = start_sink(self, rcpt_reply=rcpt_reply, data_reply=lambda rec: counts.clear())
        rcpts = [f"r{i}@dest.test" for i in range(5)]
        report = yield twisted_mailout.sendmail("a@origin.test", rcpts, MSG,
                                                relay=f"127.0.0.1:{sink.port}", timeout=10)
        self.assertEqual([r.status for r in report], ["delivered"] * 5)
        self.assertEqual([m["rcpt_tos"] for m in sink.messages],
                         [rcpts[:2], rcpts[2:4], rcpts[4:]])
        self.assertEqual(len({m["peer"] for m in sink.messages}), 1, "one connection")


class SharedConnectionTests(unittest.TestCase):
    """sendmail() calls made close together share connections to the same relay."""

    timeout = 60


    @defer.inlineCallbacks
    def test_calls_in_flight_together_share_a_few_connections(self):
        sink = start_sink(self)
        reports = yield defer.gatherResults([
            twisted_mailout.sendmail("a@origin.test", [f"r{i}@dest.test"], MSG,
                                     relay=f"127.0.0.1:{sink.port}", timeout=10, connections=2)
            for i in range(20)])
        self.assertTrue(all(r.all_delivered for r in reports))
        self.assertEqual(len(sink.messages), 20)
        peers = {tuple(m["peer"]) for m in sink.messages}
        self.assertLessEqual(len(peers), 2)  # 20 messages over at most 2 connections
        # linger=0: no client is kept once none is in flight
        self.assertEqual(len(twisted_mailout.api.default_clients), 0)

    @defer.inlineCallbacks
    def test_linger_keeps_the_connection_for_the_next_call(self):
        sink = start_sink(self)
        for i in range(3):
            report = yield twisted_mailout.sendmail(
                "a@origin.test", [f"r{i}@dest.test"], MSG, relay=f"127.0.0.1:{sink.port}",
                timeout=10, linger=30)
            self.assertTrue(report.all_delivered)
        self.assertEqual(len({tuple(m["peer"]) for m in sink.messages}), 1)
        self.assertEqual(len(twisted_mailout.api.default_clients), 1)
        yield twisted_mailout.api.close_connections()
        self.assertEqual(len(twisted_mailout.api.default_clients), 0)
