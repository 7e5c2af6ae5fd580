"""Certificates and TLSA records for the DANE tests (RFC 7672): self-signed
DANE-EE leaves, a trustme root -> intermediate -> leaf chain for DANE-TA, and
helpers that make the TLSA record of given parameters for a certificate.
Shared by tests/unit/tls/test_dane.py (matching, fast lane) and
tests/integration/test_dane.py (Unbound, STARTTLS)."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from twisted_mailout.tls.dane import TLSA

__all__ = ["NOW", "PKI", "der", "flipped", "issue", "pem_chain", "pem_key", "pki", "rec",
           "self_signed", "spki", "zone_line"]

NOW = datetime.datetime.now(datetime.UTC)


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


def pem_chain(certs: list[x509.Certificate]) -> bytes:
    """The certificates C{certs} as concatenated PEM (bytes), in order."""
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def pem_key(key) -> bytes:
    """The private key C{key} as unencrypted PKCS#8 PEM (bytes)."""
    return key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


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
