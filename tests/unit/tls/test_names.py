"""The one certificate-name check (twisted_mailout.tls.names): RFC 6125 with
service_identity's wildcard rules, the policy file's .domain names, IP
addresses and the CN fallback."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from twisted_mailout.tls.errors import CertificateNameError, CertificateVerifyError
from twisted_mailout.tls.names import (
    SubdomainID,
    check_names,
    matches,
    presented_names,
    reference_id,
)

_KEY = ec.generate_private_key(ec.SECP256R1())


def cert(*dns: str, ips: tuple[str, ...] = (), cn: tuple[str, ...] = ("leaf",),
         san: bool = True) -> x509.Certificate:
    """A self-signed certificate naming exactly C{dns} and C{ips} (no
    sanity checks: certificates in the wild name odd things)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, c) for c in cn])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(_KEY.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if san:
        entries: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        entries += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    return builder.sign(_KEY, hashes.SHA256())


@pytest.mark.parametrize("names, wanted, ok", [
    (["mx.example.com"], ("mx.example.com",), True),
    (["MX.Example.COM"], ("mx.example.com.",), True),  # case and a trailing dot
    (["*.example.com"], ("mx.example.com",), True),
    (["*.example.com"], ("a.mx.example.com",), False),  # one label only (RFC 6125 6.4.3)
    (["*.example.com"], ("example.com",), False),
    (["mx.example.com"], ("example.com", ".example.com"), True),
    (["*.example.com"], ("example.com", ".example.com"), True),
    (["example.com.evil.test"], ("example.com", ".example.com"), False),
    (["mx.attacker.test"], ("example.com", ".example.com"), False),
    (["badexample.com"], (".example.com",), False),
    ([], ("mx.example.com",), False),
    (["mx.example.com"], (), False),  # nothing wanted: nothing matches
])
def test_certificate_name_matching(names, wanted, ok):
    c = cert(*names)
    assert matches(c, wanted) is ok
    assert matches(crypto.X509.from_cryptography(c), wanted) is ok  # pyOpenSSL too


def test_wildcard_on_a_public_suffix_never_matches():
    # The hand-written matcher this replaces accepted *.com for example.com.
    assert not matches(cert("*.com"), ("example.com",))
    assert not matches(cert("*.com"), (".com",))
    # the bad entry is skipped, the good one still counts
    assert matches(cert("*.com", "mx.example.com"), ("mx.example.com",))
    assert not matches(cert("*.com", "mx.example.com"), ("other.com",))


@pytest.mark.parametrize("pattern, host", [
    ("f*.example.com", "foo.example.com"),  # partial-label wildcards are not honoured
    ("*.*.example.com", "a.b.example.com"),  # two wildcards
    ("mx.*.example.com", "mx.a.example.com"),  # not the left-most label
    ("*.example.com", "xn--bcher-kva.example.com"),  # never over an A-label
    ("*..example.com", "a..example.com"),  # empty label
])
def test_wildcards_service_identity_refuses(pattern, host):
    assert not matches(cert(pattern), (host,))


def test_subdomain_reference_identity():
    below = SubdomainID("example.com")
    assert matches(cert("a.b.example.com"), (".example.com",))
    assert matches(cert("*.sub.example.com"), (".example.com",))
    assert not matches(cert("example.com"), (".example.com",))  # below it only
    assert not matches(cert("f*.example.com"), (".example.com",))
    assert repr(below) == "SubdomainID('.example.com')"
    assert isinstance(reference_id(".Example.COM."), SubdomainID)


def test_ip_addresses_match_ip_subject_alt_names_only():
    c = cert("mx.example.com", ips=("192.0.2.1", "2001:db8::1"))
    assert matches(c, ("192.0.2.1",))
    assert matches(c, ("[2001:db8::1]",))
    assert not matches(c, ("192.0.2.2",))
    # an address written as a DNS name is not an IP identity
    assert not matches(cert("192.0.2.1"), ("192.0.2.1",))


def test_common_name_counts_only_without_dns_subject_alt_names():
    # RFC 6125 6.4.4: the most specific (last) CN, when there is no DNS-ID
    assert matches(cert(san=False, cn=("Example Inc", "mx.example.com")), ("mx.example.com",))
    assert not matches(cert(san=False, cn=("mx.example.com", "other")), ("mx.example.com",))
    assert not matches(cert("other.example.com", cn=("mx.example.com",)), ("mx.example.com",))
    assert presented_names(cert(san=False, cn=("mx.example.com",))) == ["mx.example.com"]


def test_unicode_names_are_compared_as_a_labels():
    assert matches(cert("xn--bcher-kva.example"), ("bücher.example",))


def test_mismatch_says_what_the_certificate_names_and_what_was_wanted():
    with pytest.raises(CertificateNameError) as info:
        check_names(cert("mx.attacker.test", "*.attacker.test"), ("example.com", ".example.com"))
    text = str(info.value)
    assert "mx.attacker.test, *.attacker.test" in text
    assert "example.com or .example.com" in text
    assert info.value.result_type == "certificate-host-mismatch"
    assert isinstance(info.value, CertificateVerifyError)
    with pytest.raises(CertificateNameError, match="no DNS name"):
        check_names(cert(san=False, cn=()), ("mx.example.com",))
    with pytest.raises(CertificateNameError, match="cannot check"):
        check_names(cert("mx.example.com"), ("bad name!",))
    with pytest.raises(TypeError):
        check_names(b"not a certificate", ("mx.example.com",))  # type: ignore[arg-type]
