"""The one TLS client connection creator (twisted_mailout.tls.creators),
handshaking in memory (twisted.test.iosim) with a pyOpenSSL server: what
each level accepts and refuses, the reason a refused connection is lost
with, SNI, and the TLS 1.2 minimum."""

from __future__ import annotations

import datetime

import pytest
import trustme
from OpenSSL import SSL
from twisted.internet import protocol, ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from twisted_mailout.tls.creators import (
    ClientTLS,
    client_context,
    is_ip,
    load_trust_root,
    name_checking_tls,
    opportunistic_tls,
)
from twisted_mailout.tls.errors import (
    CertificateChainError,
    CertificateNameError,
    result_type_for,
)


class _Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.connected = False
        self.lost: Failure | None = None
        self.received = b""

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason


class Handshake:
    """One in-memory TLS connection: C{client} and C{server} are the
    application protocols (L{_Recorder}), C{server_tls} the server's TLS
    protocol (for SNI)."""

    def __init__(self, creator, server_cert: trustme.LeafCert,
                 server_max: int | None = None) -> None:
        server_options = ssl.PrivateCertificate.loadPEM(
            server_cert.private_key_and_cert_chain_pem.bytes()).options()
        extra = [ssl.Certificate.loadPEM(b.bytes()).original
                 for b in server_cert.cert_chain_pems[1:]]
        server_options.extraCertChain = extra
        server_ctx = server_options.getContext()
        if server_max is not None:
            server_ctx.set_max_proto_version(server_max)
        self.client = _Recorder()
        self.server = _Recorder()
        # TLSMemoryBIOProtocol aggregates writes with clock.callLater(0): the
        # pump advances this clock, so everything happens within flush().
        clock = Clock()
        client_factory = TLSMemoryBIOFactory(
            creator, True, protocol.Factory.forProtocol(lambda: self.client), clock=clock)
        server_factory = TLSMemoryBIOFactory(
            _FixedContext(server_ctx), False, protocol.Factory.forProtocol(lambda: self.server),
            clock=clock)
        self.client_tls, self.server_tls, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None), clock=clock)
        self.client_tls.write(b"hello")
        pump.flush()

    @property
    def sni(self) -> bytes | None:
        return self.server_tls.getHandle().get_servername()


@implementer(IOpenSSLServerConnectionCreator)
class _FixedContext:
    def __init__(self, ctx: SSL.Context) -> None:
        self._ctx = ctx

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._ctx, None)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def root(ca: trustme.CA):
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.cert_pem.bytes())])


def test_opportunistic_encrypts_whatever_the_certificate():
    h = Handshake(opportunistic_tls("mx.example.test"),
                  trustme.CA().issue_cert("somewhere.else.test"))
    assert h.server.received == b"hello"
    assert h.client.lost is None
    assert h.sni == b"mx.example.test"


def test_name_checking_accepts_a_good_chain_and_name(ca, root):
    h = Handshake(name_checking_tls("mx.example.test", ("mx.example.test",), root),
                  ca.issue_cert("mx.example.test"))
    assert h.server.received == b"hello"
    assert h.client.lost is None


def test_name_checking_follows_an_intermediate(ca, root):
    h = Handshake(name_checking_tls("mx.example.test", (".example.test",), root),
                  trustme.CA(parent_cert=ca).issue_cert("mx.example.test"))
    assert h.server.received == b"hello"


@pytest.mark.parametrize("case, error, result_type", [
    ("wrong name", CertificateNameError, "certificate-host-mismatch"),
    ("public-suffix wildcard", CertificateNameError, "certificate-host-mismatch"),
    ("expired", CertificateChainError, "certificate-expired"),
    ("not yet valid", CertificateChainError, "validation-failure"),
    ("unknown CA", CertificateChainError, "certificate-not-trusted"),
])
def test_name_checking_refuses_with_the_reason(ca, root, case, error, result_type):
    past = datetime.datetime(2020, 1, 1), datetime.datetime(2021, 1, 1)
    future = datetime.datetime(2100, 1, 1), datetime.datetime(2101, 1, 1)
    server = {
        "wrong name": lambda: ca.issue_cert("mx.other.test"),
        "public-suffix wildcard": lambda: ca.issue_cert("*.test"),
        "expired": lambda: ca.issue_cert("mx.example.test", not_before=past[0],
                                         not_after=past[1]),
        "not yet valid": lambda: ca.issue_cert("mx.example.test", not_before=future[0],
                                               not_after=future[1]),
        "unknown CA": lambda: trustme.CA().issue_cert("mx.example.test"),
    }[case]()
    h = Handshake(name_checking_tls("mx.example.test", ("example.test", ".example.test",
                                                        "mx.example.test"), root), server)
    assert h.server.received == b""  # nothing crossed before the check
    assert h.client.lost is not None and h.client.lost.check(error), h.client.lost
    assert result_type_for(h.client.lost) == result_type
    assert h.client.lost.value.result_type == result_type


def test_no_sni_for_an_address_literal(ca, root):
    assert not is_ip("mx.example.test") and is_ip("192.0.2.1") and is_ip("2001:db8::1")
    h = Handshake(name_checking_tls("127.0.0.1", ("127.0.0.1",), root),
                  ca.issue_cert("127.0.0.1"))
    assert h.server.received == b"hello"
    assert h.sni is None


def test_authenticate_hook_sees_the_chain_once_and_can_refuse(ca):
    seen = []

    def refuse(conn, chain):
        seen.append([c.to_cryptography().subject.rfc4514_string() for c in chain])
        raise SSL.Error([("test", "verify", "no thanks")])

    h = Handshake(ClientTLS(client_context(), "mx.example.test", authenticate=refuse),
                  ca.issue_cert("mx.example.test"))
    assert len(seen) == 1 and len(seen[0]) == 1
    assert h.client.lost.check(SSL.Error)
    assert h.server.received == b""


def test_tls_1_1_servers_are_refused(ca):
    h = Handshake(opportunistic_tls("mx.example.test"), ca.issue_cert("mx.example.test"),
                  server_max=SSL.TLS1_1_VERSION)
    assert h.server.received == b""
    assert h.client.lost is not None and h.client.lost.check(SSL.Error)


def test_load_trust_root(tmp_path, ca):
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"junk\n" + ca.cert_pem.bytes() + trustme.CA().cert_pem.bytes())
    root = load_trust_root(str(pem))
    h = Handshake(name_checking_tls("mx.example.test", ("mx.example.test",), root),
                  ca.issue_cert("mx.example.test"))
    assert h.server.received == b"hello"
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"no certificate here\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        load_trust_root(str(empty))
    with pytest.raises(OSError):
        load_trust_root(str(tmp_path / "missing.pem"))


def test_a_refusal_does_not_leak_into_the_next_connection_on_the_shared_context(ca):
    # Unverified contexts are shared (client_context() without a trust root);
    # a refusal goes to its own connection's failVerification only.
    assert client_context() is client_context()

    def refuse(conn, chain):
        raise SSL.Error([("test", "verify", "no thanks")])

    refused = Handshake(ClientTLS(client_context(), "mx.example.test", authenticate=refuse),
                        ca.issue_cert("mx.example.test"))
    assert refused.client.lost is not None
    after = Handshake(opportunistic_tls("mx.example.test"), ca.issue_cert("mx.example.test"))
    assert after.server.received == b"hello" and after.client.lost is None
