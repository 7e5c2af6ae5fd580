"""DANE for SMTP (RFC 7672): twisted_mailout.tls.dane against a real validating
resolver (Unbound, zones signed with ldns, see tests/dnssec.py) and a real
STARTTLS server (aiosmtpd) on loopback, through twisted_mailout.smtp.protocol.

Under CI (CI=true) missing unbound/ldns tools fail these tests instead of
skipping them.
"""

from __future__ import annotations

import io
import socket
import ssl

import pytest
from tests.support.dane_pki import PKI, flipped, pem_chain, pem_key, rec, zone_line
from tests.support.dnssec import DNSSECHarness, Zone, require_tools
from tests.support.tls_peers import TlsSmtpServer, arrivals, start_sni_server
from tests.support.trial import deferred_test
from twisted.internet import endpoints, protocol, reactor
from twisted.names import dns
from twisted.trial import unittest

from twisted_mailout.tls import dane
from twisted_mailout.tls.dane import TLSA
from twisted_mailout.smtp.protocol import ESMTPSession, SessionError, Timeouts

# The certificates and TLSA helpers are in tests/support/dane_pki.py; the
# matching tests that need no DNS in tests/unit/tls/test_dane.py.


# --------------------------------------------------------------------------- DNS


@pytest.fixture(scope="module")
def harness(pki: PKI, tmp_path_factory: pytest.TempPathFactory):
    """The signed zones (see the module docstring of tests/dnssec.py) and
    the validating resolver; yields the started DNSSECHarness."""
    require_tools()
    ee311 = rec(3, 1, 1, pki.ee)
    big = [rec(3, 0, 0, c) for c in pki.chain(pki.ta_leaf)]  # > 512 octets: TCP
    assert sum(len(r.data) for r in big) > 600
    example = Zone(
        "example.test",
        [
            "@ IN MX 10 mx",
            "mx IN A 127.0.0.1",
            zone_line("_25._tcp.mx", ee311),
            "ee512 IN A 127.0.0.1",
            zone_line("_25._tcp.ee512", rec(3, 0, 2, pki.ee)),
            "ta IN A 127.0.0.1",
            zone_line("_25._tcp.ta", rec(2, 0, 1, pki.root())),
            "unusable IN A 127.0.0.1",
            zone_line("_25._tcp.unusable", rec(0, 0, 1, pki.root())),
            zone_line("_25._tcp.unusable", rec(1, 1, 1, pki.ee)),
            zone_line("_25._tcp.unusable", TLSA(3, 1, 9, b"\x01" * 32)),
            "mismatch IN A 127.0.0.1",
            zone_line("_25._tcp.mismatch", flipped(ee311)),
            "notlsa IN A 127.0.0.1",
            "alias IN CNAME mx",
            "big IN A 127.0.0.1",
            *(zone_line("_25._tcp.big", r) for r in big),
            "bogus IN A 127.0.0.1",
            zone_line("_25._tcp.bogus", ee311),
            "bogusmx IN MX 10 mx",
        ],
        corrupt=[("_25._tcp.bogus.example.test", "TLSA"), ("bogusmx.example.test", "MX")],
    )
    insecure = Zone(
        "insecure.test",
        ["@ IN MX 10 mx", "mx IN A 127.0.0.1", zone_line("_25._tcp.mx", ee311)],
        signed=False,
    )
    h = DNSSECHarness([Zone("test"), example, insecure],
                      workdir=tmp_path_factory.mktemp("dnssec"))
    h.start()
    yield h
    h.stop()


class HarnessCase(unittest.TestCase):
    """A trial TestCase with ``self.h`` (the harness) and ``self.pki``."""

    timeout = 60

    @pytest.fixture(autouse=True)
    def _inject(self, harness, pki):
        type(self).h = harness
        type(self).pki = pki

    def resolver(self, **kw) -> dane.DNSSECResolver:
        return dane.DNSSECResolver(reactor, [("127.0.0.1", self.h.port)], timeout=5.0, **kw)


class ResolverTests(HarnessCase):
    """DNSSECResolver against the validating Unbound."""

    @deferred_test
    async def test_signed_tlsa_secure(self):
        lookup = await self.resolver().tlsa("mx.example.test")
        self.assertTrue(lookup.secure)
        self.assertEqual(lookup.name, "_25._tcp.mx.example.test")
        self.assertEqual(lookup.records, (rec(3, 1, 1, self.pki.ee),))

    @deferred_test
    async def test_insecure_delegation_no_ad(self):
        lookup = await self.resolver().tlsa("mx.insecure.test")
        self.assertFalse(lookup.secure)
        self.assertEqual(lookup.records, (rec(3, 1, 1, self.pki.ee),))
        mx = await self.resolver().mx("insecure.test")
        self.assertFalse(mx.secure)
        self.assertEqual(mx.records, ((10, "mx.insecure.test"),))

    @deferred_test
    async def test_secure_mx(self):
        mx = await self.resolver().mx("example.test")
        self.assertTrue(mx.secure)
        self.assertEqual(mx.records, ((10, "mx.example.test"),))

    @deferred_test
    async def test_bogus_is_an_error(self):
        calls = (lambda r: r.tlsa("bogus.example.test"), lambda r: r.mx("bogusmx.example.test"))
        for call in calls:
            with self.assertRaises(dane.DNSSECLookupError) as cm:
                await call(self.resolver())
            self.assertEqual(cm.exception.rcode, dns.ESERVER)
            self.assertIn("SERVFAIL", str(cm.exception))
        # The same names, unsigned data aside, resolve: it is the signature.
        ok = await self.resolver().query("bogus.example.test", dns.A)
        self.assertTrue(ok.secure)

    @deferred_test
    async def test_nodata_and_nxdomain_are_secure_and_empty(self):
        no_tlsa = await self.resolver().tlsa("notlsa.example.test")
        self.assertEqual((no_tlsa.secure, no_tlsa.records, no_tlsa.nxdomain), (True, (), True))
        nodata = await self.resolver().query("mx.example.test", dns.AAAA)
        self.assertEqual((nodata.secure, nodata.records, nodata.nxdomain), (True, (), False))
        nx = await self.resolver().query("nothing.example.test", dns.A)
        self.assertEqual((nx.secure, nx.records, nx.nxdomain), (True, (), True))
        insecure_nx = await self.resolver().query("nothing.insecure.test", dns.A)
        self.assertEqual((insecure_nx.secure, insecure_nx.nxdomain), (False, True))

    @deferred_test
    async def test_cname_followed(self):
        a = await self.resolver().query("alias.example.test", dns.A)
        self.assertEqual((a.secure, a.canonical, a.records), (True, "mx.example.test",
                                                              ("127.0.0.1",)))

    @deferred_test
    async def test_truncated_udp_retried_over_tcp(self):
        # No EDNS0: replies over 512 octets come back truncated over UDP.
        lookup = await self.resolver(udp_size=None).tlsa("big.example.test")
        self.assertTrue(lookup.secure)
        self.assertEqual(set(lookup.records),
                         {rec(3, 0, 0, c) for c in self.pki.chain(self.pki.ta_leaf)})
        self.assertGreater(sum(len(r.data) + 16 for r in lookup.records), 512)

    @deferred_test
    async def test_timeout_then_next_server(self):
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        dead = ("127.0.0.1", silent.getsockname()[1])
        start = reactor.seconds()
        with self.assertRaises(dane.DNSSECLookupError) as cm:
            await dane.DNSSECResolver(reactor, [dead], timeout=0.3).tlsa("mx.example.test")
        self.assertIsNone(cm.exception.rcode)
        self.assertIn("no answer", str(cm.exception))
        self.assertLess(reactor.seconds() - start, 5)
        both = dane.DNSSECResolver(reactor, [dead, ("127.0.0.1", self.h.port)], timeout=0.3)
        lookup = await both.tlsa("mx.example.test")
        self.assertTrue(lookup.secure)

    @deferred_test
    async def test_nothing_leaves_loopback(self):
        # Names outside the test zones: the root stub refuses, Unbound SERVFAILs.
        with self.assertRaises(dane.DNSSECLookupError) as cm:
            await self.resolver().query("www.example.com", dns.A)
        self.assertEqual(cm.exception.rcode, dns.ESERVER)

    def test_bad_servers_rejected(self):
        with self.assertRaises(ValueError):
            dane.DNSSECResolver(reactor, [])
        with self.assertRaises(ValueError):
            dane.DNSSECResolver(reactor, [("localhost", 53)])


class PolicyTests(HarnessCase):
    """host_policy: RFC 7672 2.2 decisions from real lookups."""

    def policy(self, host, mx_secure=True, domain="example.test"):
        return dane.host_policy(self.resolver(), host, mx_secure=mx_secure, domain=domain)

    @deferred_test
    async def test_usable_records_mean_dane(self):
        p = await self.policy("mx.example.test")
        self.assertEqual(p.mode, "dane")
        self.assertEqual(p.records, (rec(3, 1, 1, self.pki.ee),))
        self.assertEqual(p.names, ("mx.example.test", "example.test"))
        self.assertEqual(p.tls_level, "encrypt")

    @deferred_test
    async def test_only_unusable_records_mean_unauthenticated_tls(self):
        p = await self.policy("unusable.example.test")
        self.assertEqual((p.mode, p.records, p.tls_level), ("encrypt", (), "encrypt"))
        self.assertEqual(len(p.tlsa), 3)

    @deferred_test
    async def test_no_dane_cases(self):
        for host, mx_secure, why in [
            ("notlsa.example.test", True, "no TLSA"),
            ("mx.example.test", False, "MX RRset"),
            ("mx.insecure.test", True, "address records"),
        ]:
            p = await self.policy(host, mx_secure)
            self.assertEqual((p.mode, p.tls_level), ("none", None), host)
            self.assertIn(why, p.reason)

    @deferred_test
    async def test_cname_host_uses_expanded_name(self):
        p = await self.policy("alias.example.test")
        self.assertEqual((p.mode, p.host), ("dane", "mx.example.test"))
        self.assertEqual(p.names, ("mx.example.test", "alias.example.test", "example.test"))

    @deferred_test
    async def test_bogus_tlsa_fails_the_host(self):
        with self.assertRaises(dane.DNSSECLookupError):
            await self.policy("bogus.example.test")


# --------------------------------------------------------------------------- STARTTLS


@pytest.fixture(scope="module")
def starttls_server(pki: PKI, tmp_path_factory):
    chains = {
        "mx.example.test": (pem_chain([pki.ee]), pem_key(pki.ee_key)),
        "mismatch.example.test": (pem_chain([pki.ee]), pem_key(pki.ee_key)),
        "unusable.example.test": (pem_chain([pki.ee]), pem_key(pki.ee_key)),
        "odd.example.test": (pem_chain([pki.ee_bad]), pem_key(pki.ee_bad_key)),
        "ta.example.test": (pem_chain(pki.chain(pki.ta_leaf)),
                            pki.ta_leaf.private_key_pem.bytes()),
    }
    server = start_sni_server(tmp_path_factory.mktemp("tls"), chains, "mx.example.test")
    tls12 = start_sni_server(tmp_path_factory.mktemp("tls12"), chains, "mx.example.test",
                                  max_version=ssl.TLSVersion.TLSv1_2)
    server.tls12 = tls12
    yield server
    server.stop()
    tls12.stop()


class StartTLSTests(HarnessCase):
    """The real path: ESMTPSession STARTTLS with the DANE creator, to aiosmtpd."""

    @pytest.fixture(autouse=True)
    def _server(self, starttls_server):
        type(self).server = starttls_server

    async def deliver(self, hostname: str, creator, tls: str = "encrypt",
                      server: TlsSmtpServer | None = None) -> ESMTPSession:
        server = server or self.server
        session = ESMTPSession("client.test", reactor, tls=tls, tls_creator=creator,
                               hostname=hostname, timeouts=Timeouts.scaled(10))
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", server.port, timeout=10)
        await ep.connect(protocol.Factory.forProtocol(lambda: session))
        try:
            await session.ready
        except SessionError:
            await session.closed
            raise
        sender = f"dane-{hostname}@client.test"
        body = b"Subject: dane\r\n\r\nhello\r\n"
        result = await session.transaction(sender, ["rcpt@example.test"], io.BytesIO(body),
                                           len(body))
        self.assertEqual(result.replies["rcpt@example.test"].code, 250)
        self.assertTrue(session.encrypted)
        await session.quit()
        self.assertIn((sender, True), arrivals(server))
        return session

    async def refused(self, hostname: str, creator, server=None) -> SessionError:
        server = server or self.server
        before = len(server.messages)
        with self.assertRaises(SessionError) as cm:
            await self.deliver(hostname, creator, server=server)
        self.assertEqual(len(server.messages), before)
        self.assertEqual(cm.exception.reply.code, 421)
        return cm.exception

    def policy(self, host):
        return dane.host_policy(self.resolver(), host, mx_secure=True, domain="example.test")

    @deferred_test
    async def test_dane_ee_from_dns(self):
        p = await self.policy("mx.example.test")
        self.assertEqual(p.mode, "dane")
        creators = []

        def creator(h):
            creators.append(p.tls_creator(h))
            return creators[-1]

        await self.deliver("mx.example.test", creator)
        self.assertEqual(creators[0].matched, rec(3, 1, 1, self.pki.ee))

    @deferred_test
    async def test_dane_ee_sha512_full_certificate_from_dns(self):
        p = await dane.host_policy(self.resolver(), "ee512.example.test", mx_secure=True)
        # ee512's records are for the mx certificate, which the server sends by default.
        await self.deliver("ee512.example.test", p.tls_creator)

    @deferred_test
    async def test_dane_ta_from_dns(self):
        p = await self.policy("ta.example.test")
        self.assertEqual(p.records, (rec(2, 0, 1, self.pki.root()),))
        await self.deliver("ta.example.test", p.tls_creator)

    @deferred_test
    async def test_dane_ee_expired_wrong_name_certificate_accepted(self):
        r = rec(3, 1, 1, self.pki.ee_bad)
        await self.deliver("odd.example.test", lambda h: dane.dane_tls(h, [r]))

    @deferred_test
    async def test_mismatch_refused_with_reason(self):
        p = await self.policy("mismatch.example.test")
        self.assertEqual(p.mode, "dane")
        e = await self.refused("mismatch.example.test", p.tls_creator)
        self.assertIn("DANE authentication of mismatch.example.test failed", e.reply.text)
        self.assertIn("DANE-EE", e.reply.text)
        self.assertEqual(e.reply.code, 421)

    @deferred_test
    async def test_dane_ta_wrong_name_refused(self):
        r = rec(2, 0, 1, self.pki.root())
        e = await self.refused("ta.example.test",
                               lambda h: dane.dane_tls(h, [r], names=["other.example.test"]))
        self.assertIn("names", e.reply.text)

    @deferred_test
    async def test_dane_ta_other_anchor_refused(self):
        r = rec(2, 0, 1, self.pki.load(self.pki.other_ca.cert_pem.bytes()))
        e = await self.refused("ta.example.test", lambda h: dane.dane_tls(h, [r]))
        self.assertIn("DANE authentication of ta.example.test failed", e.reply.text)

    @deferred_test
    async def test_unusable_records_fall_back_to_unauthenticated_tls(self):
        p = await self.policy("unusable.example.test")
        self.assertEqual(p.mode, "encrypt")
        await self.deliver("unusable.example.test", p.tls_creator, tls=p.tls_level)

    @deferred_test
    async def test_tls12_match_and_mismatch(self):
        good = rec(3, 1, 1, self.pki.ee)
        session = await self.deliver("mx.example.test", lambda h: dane.dane_tls(h, [good]),
                                     server=self.server.tls12)
        self.assertEqual(session.transport.getHandle().get_protocol_version_name(), "TLSv1.2")
        e = await self.refused("mx.example.test", lambda h: dane.dane_tls(h, [flipped(good)]),
                               server=self.server.tls12)
        self.assertIn("DANE authentication of mx.example.test failed", e.reply.text)


class RequireToolsTests(unittest.SynchronousTestCase):
    """Missing unbound/ldns tools: skip locally, fail under CI."""

    def test_skip_or_fail(self):
        from tests.support import dnssec
        real = dnssec.missing_tools
        self.addCleanup(setattr, dnssec, "missing_tools", real)
        self.addCleanup(setattr, dnssec, "IN_CI", dnssec.IN_CI)
        dnssec.missing_tools = lambda: [dnssec.UNBOUND]
        dnssec.IN_CI = True
        with self.assertRaises(pytest.fail.Exception) as cm:
            dnssec.require_tools()
        self.assertIn("apt-get install unbound", str(cm.exception))
        dnssec.IN_CI = False
        with self.assertRaises(pytest.skip.Exception):
            dnssec.require_tools()
