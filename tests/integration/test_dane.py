"""DANE for SMTP (RFC 7672): twisted_mailout.tls.dane against a real validating
resolver (Unbound, zones signed with ldns, see tests/dnssec.py) and a real
STARTTLS server (aiosmtpd) on loopback, through twisted_mailout.smtp.protocol.

Under CI (CI=true) missing unbound/ldns tools fail these tests instead of
skipping them.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import socket
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tests.support.dnssec import DNSSECHarness, Zone, require_tools
from tests.support.tls_peers import TlsSmtpServer, sni_server_context
from tests.support.trial import deferred_test
from twisted.internet import endpoints, protocol, reactor
from twisted.names import dns
from twisted.trial import unittest

from twisted_mailout.tls import dane
from twisted_mailout.tls.dane import TLSA
from twisted_mailout.smtp.protocol import ESMTPSession, SessionError, Timeouts

UTC = datetime.UTC
NOW = datetime.datetime.now(UTC)


# --------------------------------------------------------------------------- PKI


def self_signed(names: list[str], *, cn: str | None = None, days: tuple[int, int] = (-1, 30)):
    """A self-signed ECDSA certificate, the usual DANE-EE server certificate.

    :param names: DNS subjectAltNames (may be empty).
    :param days: (not_before, not_after) offsets from now, in days.
    :return: (cert, key) as cryptography objects.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn or names[0])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + datetime.timedelta(days=days[0]))
        .not_valid_after(NOW + datetime.timedelta(days=days[1]))
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(key, hashes.SHA256()), key


def issue(name: str, issuer: x509.Certificate | None, issuer_key, *, ca: bool):
    """A certificate for ``name`` signed by ``issuer_key`` (self-signed when
    ``issuer`` is None), with basicConstraints cA=``ca``; returns (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(issuer_key if issuer is not None else key, hashes.SHA256())
    )
    return cert, key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def rec(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> TLSA:
    """The TLSA record of those parameters for ``cert``."""
    data = der(cert) if selector == 0 else spki(cert)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TLSA(usage, selector, mtype, data)


def flipped(r: TLSA) -> TLSA:
    """The same record with one bit of its data changed."""
    data = bytearray(r.data)
    data[-1] ^= 1
    return TLSA(r.usage, r.selector, r.mtype, bytes(data))


def zone_line(owner: str, r: TLSA) -> str:
    return f"{owner} IN TLSA {r.usage} {r.selector} {r.mtype} {r.data.hex()}"


class PKI:
    """The certificates of these tests (made once per module)."""

    def __init__(self) -> None:
        # DANE-EE: self-signed leaves.
        self.ee, self.ee_key = self_signed(["mx.example.test"])
        self.ee_bad, self.ee_bad_key = self_signed(
            ["not-this-host.invalid"], days=(-60, -30)
        )  # wrong name AND expired
        # DANE-TA: root -> intermediate -> leaf (trustme).
        self.ca = trustme.CA()
        self.inter = self.ca.create_child_ca()
        self.ta_leaf = self.inter.issue_cert("ta.example.test", "*.wild.example.test")
        self.ta_wrong_name = self.inter.issue_cert("elsewhere.example.org")
        self.ta_expired = self.inter.issue_cert(
            "ta.example.test",
            not_before=NOW - datetime.timedelta(days=60),
            not_after=NOW - datetime.timedelta(days=30),
        )
        self.other_ca = trustme.CA()
        self.other_leaf = self.other_ca.issue_cert("ta.example.test")

    @staticmethod
    def load(pem: bytes) -> x509.Certificate:
        return x509.load_pem_x509_certificate(pem)

    def root(self) -> x509.Certificate:
        return self.load(self.ca.cert_pem.bytes())

    def inter_cert(self) -> x509.Certificate:
        return self.load(self.inter.cert_pem.bytes())

    def chain(self, leaf, with_root: bool = True) -> list[x509.Certificate]:
        """The chain a server presents for a trustme leaf: leaf, intermediates, root."""
        certs = [self.load(p.bytes()) for p in leaf.cert_chain_pems]
        if with_root and leaf is not self.other_leaf:
            certs.append(self.root())
        elif with_root:
            certs.append(self.load(self.other_ca.cert_pem.bytes()))
        return certs


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


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


# --------------------------------------------------------------------------- matching


class UsableTests(unittest.SynchronousTestCase):
    def test_filters(self):
        good = [TLSA(3, 1, 1, b"a" * 32), TLSA(2, 0, 2, b"b" * 64), TLSA(3, 0, 0, b"c")]
        bad = [
            TLSA(0, 0, 1, b"a" * 32),  # PKIX-TA: not for SMTP (RFC 7672 3.1.3)
            TLSA(1, 1, 1, b"a" * 32),  # PKIX-EE
            TLSA(4, 1, 1, b"a" * 32),  # unknown usage
            TLSA(3, 2, 1, b"a" * 32),  # unknown selector
            TLSA(3, 1, 3, b"a" * 32),  # unknown matching type
            TLSA(3, 1, 1, b"a" * 31),  # SHA-256 of the wrong length
            TLSA(3, 1, 2, b"a" * 32),  # SHA-512 of the wrong length
            TLSA(3, 1, 0, b""),  # empty
        ]
        self.assertEqual(dane.usable(bad + good + bad), good)
        self.assertEqual(dane.usable(bad), [])

    def test_parse_and_name(self):
        self.assertEqual(dane.parse_tlsa(bytes([3, 1, 1]) + b"xy"), TLSA(3, 1, 1, b"xy"))
        with self.assertRaises(ValueError):
            dane.parse_tlsa(b"\x03\x01\x01")
        self.assertEqual(dane.tlsa_name("MX.Example.TEST.", 2525), "_2525._tcp.mx.example.test")
        self.assertEqual(str(TLSA(3, 1, 1, b"\xab")), "3 1 1 ab")

    def test_dane_tls_needs_a_usable_record(self):
        with self.assertRaises(ValueError):
            dane.dane_tls("mx.example.test", [TLSA(1, 1, 1, b"a" * 32)])


class MatchTests(unittest.SynchronousTestCase):
    pki = None

    @pytest.fixture(autouse=True)
    def _inject(self, pki):
        type(self).pki = pki

    def test_spki_slice_is_the_encoded_key(self):
        for c in [self.pki.ee, self.pki.root(), *self.pki.chain(self.pki.ta_leaf)]:
            self.assertEqual(dane.spki_der(der(c)), spki(c))

    def test_dane_ee_every_selector_and_matching_type(self):
        chain = [self.pki.ee]
        for selector in (0, 1):
            for mtype in (0, 1, 2):
                r = rec(3, selector, mtype, self.pki.ee)
                self.assertIs(dane.verify_chain([r], chain, ["mx.example.test"]), r)
                self.assertFalse(dane.matches([flipped(r)], chain, ["mx.example.test"]),
                                 (selector, mtype))
                other = rec(3, selector, mtype, self.pki.ee_bad)
                self.assertFalse(dane.matches([other], chain, ["mx.example.test"]))

    def test_dane_ee_ignores_names_and_dates(self):
        chain = [self.pki.ee_bad]  # expired, and named not-this-host.invalid
        for selector in (0, 1):
            r = rec(3, selector, 1, self.pki.ee_bad)
            self.assertTrue(dane.matches([r], chain, ["mx.example.test"]))

    def test_dane_ee_matches_the_leaf_only(self):
        chain = self.pki.chain(self.pki.ta_leaf)
        self.assertFalse(dane.matches([rec(3, 1, 1, self.pki.root())], chain,
                                      ["ta.example.test"]))
        self.assertTrue(dane.matches([rec(3, 1, 1, chain[0])], chain, ["ta.example.test"]))

    def test_dane_ta_root_and_intermediate_every_parameter(self):
        chain = self.pki.chain(self.pki.ta_leaf)
        for anchor in (self.pki.root(), self.pki.inter_cert()):
            for selector in (0, 1):
                for mtype in (0, 1, 2):
                    r = rec(2, selector, mtype, anchor)
                    self.assertIs(dane.verify_chain([r], chain, ["ta.example.test"]), r)
                    self.assertFalse(dane.matches([flipped(r)], chain, ["ta.example.test"]))

    def test_dane_ta_names(self):
        chain = self.pki.chain(self.pki.ta_leaf)
        r = rec(2, 1, 1, self.pki.root())
        self.assertTrue(dane.matches([r], chain, ["TA.example.test."]))
        self.assertTrue(dane.matches([r], chain, ["mx.other.test", "ta.example.test"]))
        self.assertTrue(dane.matches([r], chain, ["mx.wild.example.test"]))  # *.wild
        self.assertFalse(dane.matches([r], chain, ["a.b.wild.example.test"]))
        self.assertFalse(dane.matches([r], chain, ["wild.example.test"]))
        with self.assertRaises(dane.DANEVerificationError) as cm:
            dane.verify_chain([r], self.pki.chain(self.pki.ta_wrong_name), ["ta.example.test"])
        self.assertIn("names", str(cm.exception))

    def test_dane_ta_checks_dates_below_the_anchor(self):
        r = rec(2, 0, 1, self.pki.root())
        with self.assertRaises(dane.DANEVerificationError) as cm:
            dane.verify_chain([r], self.pki.chain(self.pki.ta_expired), ["ta.example.test"])
        self.assertIn("validity", str(cm.exception))

    def test_dane_ta_needs_the_chain_to_link(self):
        r = rec(2, 0, 1, self.pki.root())
        # A chain from another CA, with our root appended: no signature links it.
        chain = [*self.pki.chain(self.pki.other_leaf, with_root=False), self.pki.root()]
        self.assertFalse(dane.matches([r], chain, ["ta.example.test"]))
        # The TA is not in the chain and is given as a digest: cannot be used.
        self.assertFalse(dane.matches(
            [r], self.pki.chain(self.pki.ta_leaf, with_root=False), ["ta.example.test"]))
        # A leaf matching a DANE-TA record is not a trust anchor.
        leaf = self.pki.chain(self.pki.ta_leaf)[0]
        self.assertFalse(dane.matches([rec(2, 0, 1, leaf)], [leaf], ["ta.example.test"]))

    def test_dane_ta_issuers_below_the_anchor_must_be_cas(self):
        root, root_key = issue("root.test", None, None, ca=True)
        not_ca, not_ca_key = issue("server.example.test", root, root_key, ca=False)
        leaf, _ = issue("ta.example.test", not_ca, not_ca_key, ca=False)
        r = rec(2, 0, 1, root)
        with self.assertRaises(dane.DANEVerificationError) as cm:
            dane.verify_chain([r], [leaf, not_ca, root], ["ta.example.test"])
        self.assertIn("not a CA", str(cm.exception))
        inter, inter_key = issue("inter.test", root, root_key, ca=True)
        leaf, _ = issue("ta.example.test", inter, inter_key, ca=False)
        self.assertTrue(dane.matches([r], [leaf, inter, root], ["ta.example.test"]))

    def test_dane_ta_bare_public_key(self):
        # 2 1 0: the full SPKI; the server need not send the anchor's certificate.
        r = rec(2, 1, 0, self.pki.root())
        chain = self.pki.chain(self.pki.ta_leaf, with_root=False)
        self.assertIs(dane.verify_chain([r], chain, ["ta.example.test"]), r)
        other = rec(2, 1, 0, self.pki.load(self.pki.other_ca.cert_pem.bytes()))
        self.assertFalse(dane.matches([other], chain, ["ta.example.test"]))

    def test_any_usable_record_may_match_and_pyopenssl_certs(self):
        from OpenSSL import crypto

        chain = [crypto.X509.from_cryptography(c) for c in self.pki.chain(self.pki.ta_leaf)]
        records = [flipped(rec(3, 1, 1, self.pki.ee)), TLSA(1, 1, 1, b"x" * 32),
                   rec(2, 1, 2, self.pki.inter_cert())]
        self.assertIs(dane.verify_chain(records, chain, ["ta.example.test"]), records[2])

    def test_failure_says_why(self):
        with self.assertRaises(dane.DANEVerificationError) as cm:
            dane.verify_chain([flipped(rec(3, 1, 1, self.pki.ee))], [self.pki.ee], ["x"])
        text = str(cm.exception)
        self.assertIn("DANE-EE", text)
        self.assertIn(hashlib.sha256(spki(self.pki.ee)).hexdigest(), text)
        with self.assertRaises(dane.DANEVerificationError):
            dane.verify_chain([TLSA(0, 0, 1, b"a" * 32)], [self.pki.ee], ["x"])
        with self.assertRaises(dane.DANEVerificationError):
            dane.verify_chain([rec(3, 1, 1, self.pki.ee)], [], ["x"])


# --------------------------------------------------------------------------- STARTTLS


def _pem_chain(certs) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _pem_key(key) -> bytes:
    return key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def arrived(server: TlsSmtpServer) -> list[tuple[str, bool]]:
    """(MAIL FROM, whether TLS protected it) of each message C{server} received."""
    return [(m["mail_from"], m["tls"] is not None) for m in server.messages]


def start_starttls_server(workdir, chains, default: str,
                          max_version: ssl.TLSVersion | None = None) -> TlsSmtpServer:
    """aiosmtpd with STARTTLS on 127.0.0.1, choosing its certificate chain by
    the SNI name the client sends (the TLSA base domain)."""
    context = sni_server_context(chains, default, workdir, max_version=max_version)
    return TlsSmtpServer(tls_context=context, server_hostname="dane.sink.test").start()


@pytest.fixture(scope="module")
def starttls_server(pki: PKI, tmp_path_factory):
    chains = {
        "mx.example.test": (_pem_chain([pki.ee]), _pem_key(pki.ee_key)),
        "mismatch.example.test": (_pem_chain([pki.ee]), _pem_key(pki.ee_key)),
        "unusable.example.test": (_pem_chain([pki.ee]), _pem_key(pki.ee_key)),
        "odd.example.test": (_pem_chain([pki.ee_bad]), _pem_key(pki.ee_bad_key)),
        "ta.example.test": (_pem_chain(pki.chain(pki.ta_leaf)),
                            pki.ta_leaf.private_key_pem.bytes()),
    }
    server = start_starttls_server(tmp_path_factory.mktemp("tls"), chains, "mx.example.test")
    tls12 = start_starttls_server(tmp_path_factory.mktemp("tls12"), chains, "mx.example.test",
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
        self.assertIn((sender, True), arrived(server))
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
