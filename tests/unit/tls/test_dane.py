"""DANE matching (RFC 7672 3.1, twisted_mailout.tls.dane): usable records and
verify_chain on real certificate chains, no DNS and no network. The DNSSEC
lookups and STARTTLS are in tests/integration/test_dane.py."""

from __future__ import annotations

import hashlib

import pytest
from tests.support.dane_pki import der, flipped, issue, rec, spki
from twisted.trial import unittest

from twisted_mailout.tls import dane
from twisted_mailout.tls.dane import TLSA


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
