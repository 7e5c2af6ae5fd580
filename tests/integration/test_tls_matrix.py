"""Transport security: every TLS level against every kind of server, for real.

The servers are aiosmtpd (and a private Postfix) on loopback with certificates
from a test CA made here (``tls_peers.TestPKI``). Each delivery goes through a
recording TCP proxy, so every test proves *on the wire and at the server* what
the level promises: a TLS-protected delivery is seen by the server on a TLS
connection and the message text never crosses the wire in the clear; a
plaintext delivery is seen in the clear; a level that cannot be met defers
(4xx, with the reason) and nothing of the transaction goes out in plaintext.

Levels are Postfix's: ``none``, ``may``, ``encrypt``, ``verify``, ``secure``.
"""

from __future__ import annotations

import shutil
import tempfile

from tests.support.tls_peers import (
    SERVER_CASES,
    PostfixServer,
    RecordingProxy,
    TestPKI,
    TlsSmtpServer,
    require_postfix,
)
from tests.support.trial import start_dns
from twisted.internet import defer, threads
from twisted.trial import unittest

import twisted_mailout

MARK = b"tls-matrix-body-7f3a91"  # appears in the message text only
MSG = (b"Message-ID: <tls-matrix@origin.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
       b"Subject: transport security\r\n\r\n" + MARK + b"\r\n.dot line\r\n")
RELAY = "smtp.relay.test"
LEVELS = ("none", "may", "encrypt", "verify", "secure")
CERT_CASES = ("good", "self-signed", "expired", "wrong-name")

#: What each level promises for each server case (see tls_peers.SERVER_CASES):
#: "tls" delivered over TLS, "plain" delivered in plaintext, "plain-retry"
#: delivered in plaintext on a new connection after the TLS handshake failed,
#: "deferred" 4xx and nothing sent in plaintext.
EXPECTED = {
    "none": dict.fromkeys(SERVER_CASES, "plain"),
    "may": {**dict.fromkeys(CERT_CASES, "tls"), "no-starttls": "plain",
            "starttls-454": "plain", "handshake-fails": "plain-retry"},
    "encrypt": {**dict.fromkeys(CERT_CASES, "tls"), "no-starttls": "deferred",
                "starttls-454": "deferred", "handshake-fails": "deferred"},
    "verify": {**dict.fromkeys(SERVER_CASES, "deferred"), "good": "tls"},
    "secure": {**dict.fromkeys(SERVER_CASES, "deferred"), "good": "tls"},
}


class _TLSTestBase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        tmp = tempfile.mkdtemp(prefix="tls-matrix-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.pki = TestPKI(tmp, rsa=False)
        self.dns_port = None

    def dns(self, records):
        """Serve ``records`` (loopback.Zone format) in this reactor; return the port."""
        self.dns_port, _ = start_dns(self, records)
        return self.dns_port

    def serve(self, server: TlsSmtpServer):
        """Start ``server`` and a recording proxy in front of it; both are
        stopped at cleanup. Returns ``(server, proxy)``."""
        server.start()
        self.addCleanup(lambda: threads.deferToThread(server.stop))
        proxy = RecordingProxy("127.0.0.1", server.port).start()
        self.addCleanup(lambda: threads.deferToThread(proxy.stop))
        return server, proxy

    def send(self, tls, relay=None, rcpt="b@dest.test", **kw):
        if tls in ("verify", "secure"):
            kw.setdefault("cafile", self.pki.cafile)
        if relay is not None:
            kw["relay"] = relay
        return twisted_mailout.sendmail("a@origin.test", [rcpt], MSG,
                                        resolver=f"127.0.0.1:{self.dns_port}", tls=tls,
                                        timeout=10, **kw)

    # -- the proofs ---------------------------------------------------------

    def assertDeliveredOverTLS(self, result, server, proxy):
        self.assertEqual((result.status, result.code), ("delivered", 250), result)
        [m] = server.messages
        self.assertEqual(m["data"], MSG)
        self.assertIsNotNone(m["tls"], "the server received the message in plaintext")
        self.assertTrue(m["tls"].startswith("TLSv1."), m["tls"])
        wire = proxy.client_bytes()
        self.assertNotIn(MARK, wire, "the message text crossed the wire in the clear")
        self.assertNotIn(b"MAIL FROM", wire.upper())
        self.assertNotIn(b"RCPT TO", wire.upper())

    def assertDeliveredInPlaintext(self, result, server, proxy):
        self.assertEqual((result.status, result.code), ("delivered", 250), result)
        [m] = server.messages
        self.assertEqual(m["data"], MSG)
        self.assertIsNone(m["tls"])
        self.assertIn(MARK, proxy.client_bytes())  # the capture does see cleartext

    def assertDeferredNothingSent(self, result, server, proxy, *reason_words):
        self.assertEqual(result.status, "deferred", result)
        self.assertTrue(400 <= result.code < 500, result)
        for word in reason_words:
            self.assertIn(word.lower(), result.text.lower(), result)
        self.assertEqual(server.messages, [])
        for conn in server.connections:
            self.assertNotIn("MAIL", conn.commands, "a transaction began")
            self.assertNotIn("RCPT", conn.commands)
            self.assertNotIn("DATA", conn.commands)
        wire = proxy.client_bytes()
        self.assertNotIn(MARK, wire)
        self.assertNotIn(b"MAIL FROM", wire.upper())
        self.assertNotIn(b"RCPT TO", wire.upper())


class LevelMatrixTests(_TLSTestBase):
    """Every level × every server case, through a relay known by name
    (``smtp.relay.test``, resolved by the loopback DNS server); certificates
    are for that name except in the wrong-name case."""

    def setUp(self):
        super().setUp()
        self.dns({RELAY: {"A": ["127.0.0.1"]}})

    @defer.inlineCallbacks
    def check(self, level, case):
        server, proxy = self.serve(TlsSmtpServer.for_case(self.pki, case, RELAY))
        report = yield self.send(level, relay=f"{RELAY}:{proxy.port}")
        [r] = list(report)
        expected = EXPECTED[level][case]
        starttls_sent = [c for c in server.connections if "STARTTLS" in c.commands]
        if expected == "tls":
            self.assertDeliveredOverTLS(r, server, proxy)
            self.assertEqual(r.relay, f"{RELAY}[127.0.0.1]:{proxy.port}")
        elif expected == "plain":
            self.assertDeliveredInPlaintext(r, server, proxy)
            if level == "none" or case == "no-starttls":
                self.assertEqual(starttls_sent, [], "STARTTLS was sent")
                self.assertNotIn(b"STARTTLS", proxy.client_bytes().upper())
            if level == "none":
                self.assertEqual(len(server.connections), 1)
        elif expected == "plain-retry":
            self.assertDeliveredInPlaintext(r, server, proxy)
            self.assertGreaterEqual(len(server.connections), 2, "no retry")
            first, last = server.connections[0], server.connections[-1]
            self.assertIn("STARTTLS", first.commands)
            self.assertNotIn("MAIL", first.commands)
            self.assertNotIn("STARTTLS", last.commands, "the retry tried TLS again")
            self.assertIn("MAIL", last.commands)
        else:
            words = {"no-starttls": ("STARTTLS",), "starttls-454": ("STARTTLS",),
                     "handshake-fails": ("TLS",)}.get(case, ("TLS", "certificate"))
            self.assertDeferredNothingSent(r, server, proxy, *words)
            if case in CERT_CASES or case == "handshake-fails":
                self.assertTrue(starttls_sent, "deferred without even trying STARTTLS")


_PROMISE = {
    "tls": "is delivered over TLS (the server sees a TLS connection, the text never "
           "crosses the wire in the clear)",
    "plain": "is delivered in plaintext",
    "plain-retry": "is delivered in plaintext on a retry of the same host after the "
                   "TLS handshake failed",
    "deferred": "is deferred with a 4xx naming the reason, and nothing of the "
                "transaction is sent in plaintext",
}


def _make_matrix_test(level, case):
    def test(self):
        return self.check(level, case)

    test.__name__ = f"test_{level}_{case.replace('-', '_')}"
    test.__doc__ = (f"tls={level!r}, server {case}: the mail "
                    f"{_PROMISE[EXPECTED[level][case]]}.")
    return test


for _level in LEVELS:
    for _case in SERVER_CASES:
        _t = _make_matrix_test(_level, _case)
        setattr(LevelMatrixTests, _t.__name__, _t)
del _level, _case, _t


class OtherHandshakeFailureTests(_TLSTestBase):
    def setUp(self):
        super().setUp()
        self.dns({RELAY: {"A": ["127.0.0.1"]}})

    @defer.inlineCallbacks
    def test_may_retries_in_plaintext_when_the_server_closes_after_220(self):
        """tls='may': a server that accepts STARTTLS and then drops the
        connection still gets the mail, in plaintext, on a second connection."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.good(RELAY), starttls="close"))
        report = yield self.send("may", relay=f"{RELAY}:{proxy.port}")
        [r] = list(report)
        self.assertDeliveredInPlaintext(r, server, proxy)
        self.assertGreaterEqual(len(server.connections), 2)
        self.assertNotIn("STARTTLS", server.connections[-1].commands)

    @defer.inlineCallbacks
    def test_encrypt_defers_when_the_server_closes_after_220(self):
        """tls='encrypt': a broken handshake defers the mail; no plaintext retry."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.good(RELAY), starttls="close"))
        report = yield self.send("encrypt", relay=f"{RELAY}:{proxy.port}")
        [r] = list(report)
        self.assertDeferredNothingSent(r, server, proxy, "TLS")


class ImplicitTLSRelayTests(_TLSTestBase):
    """Relays on implicit TLS (``smtps://host:465``, RFC 8314) and the
    explicit ``smtp://`` scheme."""

    def setUp(self):
        super().setUp()
        self.dns({RELAY: {"A": ["127.0.0.1"]}})

    def assertAllTLS(self, proxy):
        for conn in proxy.connections:
            # a TLS handshake record from the first byte: nothing in the clear
            self.assertEqual(bytes(conn.to_server[:1]), b"\x16")
            self.assertEqual(bytes(conn.to_client[:1]), b"\x16")

    @defer.inlineCallbacks
    def test_smtps_verify_good_certificate_delivers_over_tls_from_the_first_byte(self):
        """relay='smtps://...' with tls='verify': TLS from the first byte, the
        certificate checked, the mail delivered; no STARTTLS dialogue at all."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.good(RELAY), implicit=True))
        report = yield self.send("verify", relay=f"smtps://{RELAY}:{proxy.port}")
        [r] = list(report)
        self.assertDeliveredOverTLS(r, server, proxy)
        self.assertAllTLS(proxy)
        self.assertNotIn("STARTTLS", server.connections[0].commands)

    @defer.inlineCallbacks
    def test_smtps_verify_self_signed_is_deferred(self):
        """relay='smtps://...' with tls='verify' and a self-signed certificate:
        deferred, 4xx, and nothing in plaintext."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.self_signed(RELAY), implicit=True))
        report = yield self.send("verify", relay=f"smtps://{RELAY}:{proxy.port}")
        [r] = list(report)
        self.assertDeferredNothingSent(r, server, proxy, "certificate")
        self.assertAllTLS(proxy)

    @defer.inlineCallbacks
    def test_smtps_encrypt_accepts_any_certificate(self):
        """relay='smtps://...' with tls='encrypt': an unchecked certificate is
        fine, the mail goes encrypted."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.expired(RELAY), implicit=True))
        report = yield self.send("encrypt", relay=f"smtps://{RELAY}:{proxy.port}")
        [r] = list(report)
        self.assertDeliveredOverTLS(r, server, proxy)
        self.assertAllTLS(proxy)

    @defer.inlineCallbacks
    def test_smtps_may_still_never_sends_plaintext(self):
        """relay='smtps://...' means TLS on connect whatever the level: with
        tls='may' and a self-signed certificate the mail goes encrypted."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.self_signed(RELAY), implicit=True))
        report = yield self.send("may", relay=f"smtps://{RELAY}:{proxy.port}")
        [r] = list(report)
        self.assertDeliveredOverTLS(r, server, proxy)
        self.assertAllTLS(proxy)

    @defer.inlineCallbacks
    def test_smtp_scheme_uses_starttls(self):
        """relay='smtp://host:port' is the plain SMTP port with STARTTLS."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.good(RELAY)))
        report = yield self.send("verify", relay=f"smtp://{RELAY}:{proxy.port}")
        [r] = list(report)
        self.assertDeliveredOverTLS(r, server, proxy)
        self.assertIn("STARTTLS", server.connections[0].commands)


class SecureLevelTests(_TLSTestBase):
    """tls='secure': the certificate must match the recipient domain (or a
    subdomain of it), or a name in tls_match, not merely the MX host name
    DNS gave us; so a forged MX record cannot send the mail elsewhere."""

    ZONE = {
        "example.test": {"MX": [[10, "mx.example.test"]]},
        "mx.example.test": {"A": ["127.0.0.1"]},
        "victim.test": {"MX": [[10, "mx.attacker.test"]]},
        "mx.attacker.test": {"A": ["127.0.0.1"]},
        "other.test": {"MX": [[10, "mail.other.test"]]},
        "mail.other.test": {"A": ["127.0.0.1"]},
        RELAY: {"A": ["127.0.0.1"]},
    }

    def setUp(self):
        super().setUp()
        self.dns(self.ZONE)

    def mx(self, cert):
        return self.serve(TlsSmtpServer(cert, server_hostname=cert.names[0]))

    @defer.inlineCallbacks
    def test_secure_mx_certificate_in_the_recipient_domain_is_accepted(self):
        """MX mx.example.test for example.test with a certificate for
        mx.example.test: it matches "dot-nexthop", so secure delivers over TLS."""
        server, proxy = self.mx(self.pki.good("mx.example.test"))
        report = yield self.send("secure", rcpt="b@example.test", mx_port=proxy.port)
        self.assertDeliveredOverTLS(report["b@example.test"], server, proxy)

    @defer.inlineCallbacks
    def test_verify_accepts_a_redirected_mx_with_a_valid_certificate(self):
        """verify checks the certificate against the MX host name DNS gave:
        mx.attacker.test with a valid certificate for itself passes verify
        (that is what secure is for)."""
        server, proxy = self.mx(self.pki.good("mx.attacker.test"))
        report = yield self.send("verify", rcpt="b@victim.test", mx_port=proxy.port)
        self.assertDeliveredOverTLS(report["b@victim.test"], server, proxy)

    @defer.inlineCallbacks
    def test_secure_refuses_a_redirected_mx_with_a_valid_certificate(self):
        """secure: an MX outside the recipient domain (mx.attacker.test for
        victim.test), even with a valid certificate for its own name, gets
        nothing; the mail is deferred with a 4xx."""
        server, proxy = self.mx(self.pki.good("mx.attacker.test"))
        report = yield self.send("secure", rcpt="b@victim.test", mx_port=proxy.port)
        self.assertDeferredNothingSent(report["b@victim.test"], server, proxy, "certificate")

    @defer.inlineCallbacks
    def test_secure_certificate_for_the_domain_itself_is_accepted(self):
        """secure: a certificate for the recipient domain itself ("nexthop")
        on its MX mx.example.test is accepted."""
        server, proxy = self.mx(self.pki.good("example.test"))
        report = yield self.send("secure", rcpt="b@example.test", mx_port=proxy.port)
        self.assertDeliveredOverTLS(report["b@example.test"], server, proxy)

    @defer.inlineCallbacks
    def test_verify_certificate_for_the_domain_but_not_the_mx_is_refused(self):
        """verify checks the MX host name: a certificate naming only
        example.test on mx.example.test is refused (deferred)."""
        server, proxy = self.mx(self.pki.good("example.test"))
        report = yield self.send("verify", rcpt="b@example.test", mx_port=proxy.port)
        self.assertDeferredNothingSent(report["b@example.test"], server, proxy)

    @defer.inlineCallbacks
    def test_secure_tls_match_names_the_accepted_certificate(self):
        """secure with tls_match=("mx.attacker.test",): the operator vouches
        for that name, so its certificate is accepted."""
        server, proxy = self.mx(self.pki.good("mx.attacker.test"))
        report = yield self.send("secure", rcpt="b@victim.test", mx_port=proxy.port,
                                 tls_match=("mx.attacker.test",))
        self.assertDeliveredOverTLS(report["b@victim.test"], server, proxy)

    @defer.inlineCallbacks
    def test_secure_tls_match_replaces_the_default_names(self):
        """secure with tls_match naming something else: even a certificate
        for the recipient domain's own MX is refused."""
        server, proxy = self.mx(self.pki.good("mx.example.test"))
        report = yield self.send("secure", rcpt="b@example.test", mx_port=proxy.port,
                                 tls_match=("mx.elsewhere.test",))
        self.assertDeferredNothingSent(report["b@example.test"], server, proxy)

    @defer.inlineCallbacks
    def test_secure_untrusted_ca_is_refused_even_for_the_right_name(self):
        """secure still checks the chain: a self-signed certificate for
        mx.example.test is refused."""
        server, proxy = self.mx(self.pki.self_signed("mx.example.test"))
        report = yield self.send("secure", rcpt="b@example.test", mx_port=proxy.port)
        self.assertDeferredNothingSent(report["b@example.test"], server, proxy, "certificate")

    @defer.inlineCallbacks
    def test_secure_relay_matches_the_relay_name_by_default(self):
        """secure to a relay: by default the certificate must name the relay
        host; one for another name is refused."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.good("mail.provider.test")))
        report = yield self.send("secure", relay=f"{RELAY}:{proxy.port}")
        self.assertDeferredNothingSent(report["b@dest.test"], server, proxy, "certificate")

    @defer.inlineCallbacks
    def test_secure_relay_with_tls_match(self):
        """secure to a relay with tls_match=("mail.provider.test",): the
        provider's certificate is accepted although the relay is known by
        another name."""
        server, proxy = self.serve(TlsSmtpServer(self.pki.good("mail.provider.test")))
        report = yield self.send("secure", relay=f"{RELAY}:{proxy.port}",
                                 tls_match=("mail.provider.test",))
        self.assertDeliveredOverTLS(report["b@dest.test"], server, proxy)


class PostfixStartTLSTests(_TLSTestBase):
    """Against a real Postfix smtpd with STARTTLS (a private instance relaying
    to smtp-sink). The proof of TLS is Postfix's own Received header:
    "(using TLSv1.x with cipher ...)" and "with ESMTPS"."""

    timeout = 120
    PF = "postfix.relay.test"

    def setUp(self):
        super().setUp()
        require_postfix(self)
        from tests.support.peers import SmtpSink

        self.pki_rsa = TestPKI(tempfile.mkdtemp(prefix="tls-pf-", dir=self.pki.dir), rsa=True)
        self.sink = SmtpSink().start()
        self.addCleanup(self.sink.stop)
        self.postfix = PostfixServer(self.pki_rsa.good(self.PF), ("127.0.0.1", self.sink.port),
                                     myhostname=self.PF)
        self.postfix.start()
        self.addCleanup(self.postfix.stop)
        self.proxy = RecordingProxy("127.0.0.1", self.postfix.port).start()
        self.addCleanup(lambda: threads.deferToThread(self.proxy.stop))
        self.dns({self.PF: {"A": ["127.0.0.1"]}})

    def sent(self, tls, **kw):
        kw.setdefault("cafile", self.pki_rsa.cafile)
        if tls not in ("verify", "secure"):
            kw.pop("cafile")
        return twisted_mailout.sendmail("a@origin.test", ["b@dest.test"], MSG,
                                        relay=f"{self.PF}:{self.proxy.port}",
                                        resolver=f"127.0.0.1:{self.dns_port}", tls=tls,
                                        timeout=10, **kw)

    @defer.inlineCallbacks
    def arrived(self):
        [m] = yield threads.deferToThread(self.sink.wait_for_messages, 1, 30)
        data = m["data"]
        head, _, _ = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"Received: from "), head[:200])
        received = head.split(b"\r\n")
        postfix_received = [received[0]]
        for line in received[1:]:
            if not line[:1].isspace():
                break
            postfix_received.append(line)
        self.assertIn(MARK, data)
        return b"\r\n".join(postfix_received), self.postfix.log()

    @defer.inlineCallbacks
    def check_tls(self, level):
        report = yield self.sent(level)
        r = report["b@dest.test"]
        self.assertEqual((r.status, r.code), ("delivered", 250), (r, self.postfix.log()))
        received, _ = yield self.arrived()
        self.assertIn(b"(using TLSv1.", received)
        self.assertIn(b"with ESMTPS", received)
        self.assertNotIn(MARK, self.proxy.client_bytes())

    def test_may_delivers_over_tls(self):
        """tls='may' to Postfix with STARTTLS: Postfix records the mail as
        received over TLS."""
        return self.check_tls("may")

    def test_encrypt_delivers_over_tls(self):
        """tls='encrypt' to Postfix: received over TLS."""
        return self.check_tls("encrypt")

    def test_verify_delivers_over_tls(self):
        """tls='verify' with the test CA to Postfix: received over TLS."""
        return self.check_tls("verify")

    def test_secure_delivers_over_tls(self):
        """tls='secure' to a relay whose certificate names it: received over TLS."""
        return self.check_tls("secure")

    @defer.inlineCallbacks
    def test_none_delivers_in_plaintext(self):
        """tls='none' to Postfix: plaintext, no STARTTLS, and Postfix's
        Received header says so ("with ESMTP", no TLS note)."""
        report = yield self.sent("none")
        self.assertEqual(report["b@dest.test"].status, "delivered")
        received, _ = yield self.arrived()
        self.assertNotIn(b"using TLS", received)
        self.assertIn(b"with ESMTP id", received)
        self.assertIn(MARK, self.proxy.client_bytes())
        self.assertNotIn(b"STARTTLS", self.proxy.client_bytes().upper())

    @defer.inlineCallbacks
    def test_verify_with_an_unknown_ca_is_deferred(self):
        """tls='verify' against the system store (the test CA unknown to it):
        deferred with a 4xx, Postfix gets no mail, nothing in plaintext."""
        report = yield self.sent("verify", cafile=None)
        r = report["b@dest.test"]
        self.assertEqual(r.status, "deferred", r)
        self.assertTrue(400 <= r.code < 500, r)
        wire = self.proxy.client_bytes()
        self.assertNotIn(MARK, wire)
        self.assertNotIn(b"MAIL FROM", wire.upper())
        self.assertNotIn("from=<a@origin.test>", self.postfix.log())
        self.assertEqual(self.sink.messages(), [])
