"""TLS client connections: the one context builder and the one
C{IOpenSSLClientConnectionCreator} for every TLS level.

Every TLS connection the agent opens (STARTTLS and implicit TLS to MX hosts
and relays, DANE, the MTA-STS policy fetch) comes from L{ClientTLS}, whose
context comes from L{client_context}: Twisted's C{CertificateOptions}
(its cipher list, no compression), TLS 1.2 or newer, SNI set to the host
name (never to an address literal, RFC 6066 3). What differs between the
levels is only how the server is authenticated:

  - L{opportunistic_tls} (C{may}, C{encrypt}, MTA-STS C{testing}, DANE
    with only unusable records): no check at all;
  - L{name_checking_tls} (C{verify}, C{secure}, MTA-STS C{enforce} and
    the policy fetch): the chain must verify against the trust root
    (L{load_trust_root}), expiry included, and the server's certificate
    must name one of the wanted names (L{twisted_mailout.tls.names});
  - C{twisted_mailout.tls.dane.dane_tls}: the chain is judged by TLSA
    records (RFC 7672), through the C{authenticate} hook of L{ClientTLS}.

A failed check aborts the handshake through the TLS protocol's
C{failVerification}: the connection is lost with the
L{twisted_mailout.tls.errors.CertificateVerifyError} (or the DANE
C{SSL.Error}) as its reason, which carries the RFC 8460 result type.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import interfaces, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mailout.tls.errors import CertificateChainError
from twisted_mailout.tls.names import check_names

__all__ = [
    "ClientTLS",
    "client_context",
    "is_ip",
    "load_trust_root",
    "name_checking_tls",
    "opportunistic_tls",
]

#: An C{IOpenSSLTrustRoot} (Twisted exports the interface from a private
#: module only, so it is not named in annotations).
TrustRoot = Any

#: C{authenticate(connection, chain)}: judge the server's chain (leaf first,
#: pyOpenSSL C{X509}s) once OpenSSL has looked at it; raise to refuse it.
Authenticator = Callable[[SSL.Connection, list[crypto.X509]], None]


def is_ip(host: str) -> bool:
    """Whether C{host} is an IP address literal (no SNI is sent for one,
    RFC 6066 3).

    @param host: a host name or address, without brackets.
    """
    return isIPAddress(host) or isIPv6Address(host)


def load_trust_root(cafile: str | None) -> TrustRoot:
    """The trust root for the verifying levels: the certificates in C{cafile}
    (PEM, one or more), or the platform's store when L{None}.

    Reads the file: call it at start-up or in a thread, not per connection.

    @param cafile: the path of a PEM file, or L{None}.
    @return: an C{IOpenSSLTrustRoot}.
    @raise ValueError: C{cafile} holds no certificate.
    @raise OSError: C{cafile} cannot be read.
    """
    if cafile is None:
        return ssl.platformTrust()
    with open(cafile, "rb") as f:
        pem = f.read()
    certs = []
    marker = b"-----END CERTIFICATE-----"
    for part in pem.split(marker):
        if b"-----BEGIN CERTIFICATE-----" in part:
            certs.append(ssl.Certificate.loadPEM(part[part.index(b"-----BEGIN"):] + marker + b"\n"))
    if not certs:
        raise ValueError(f"{cafile} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certs)


def client_context(trust_root: TrustRoot | None = None) -> SSL.Context:
    """The one TLS client context builder.

    @param trust_root: the CA certificates the chain is verified against
        (L{load_trust_root}), or L{None} for a context that verifies
        nothing by itself.
    @return: an C{OpenSSL.SSL.Context}: TLS 1.2 or newer, Twisted's cipher
        list and options (no compression, no anonymous ciphers). The
        connection creator sets the verification per connection. Without a
        trust root the same context is returned every time: it holds no
        per-connection state (L{ClientTLS} sets each connection's verify
        callback on the connection), and building one costs about half a
        millisecond of CPU per connection.
    """
    if trust_root is None:
        return _shared_context()
    options = ssl.CertificateOptions(trustRoot=trust_root,
                                     raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    return options.getContext()


@functools.cache
def _shared_context() -> SSL.Context:
    return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext()


@implementer(interfaces.IOpenSSLClientConnectionCreator)
class ClientTLS:
    """The one C{clientConnectionForTLS}: a TLS client connection with SNI
    and the server authentication chosen at construction.

    One creator serves any number of connections; each connection gets its
    own verify callback (failures are handed to that connection's
    C{failVerification}, never stored on the shared context).

    @ivar sni: the name sent as SNI (bytes, IDNA), or L{None}.
    @ivar pkix: the chain must verify against the context's trust root.
    @ivar authenticate: called once per connection with the connection and
        the server's chain (leaf first) after OpenSSL looked at the chain;
        raising refuses the server (the exception becomes the reason the
        connection was lost). L{None}: no further check.
    """

    def __init__(self, context: SSL.Context, sni: str | None, *, pkix: bool = False,
                 authenticate: Authenticator | None = None) -> None:
        """
        @param context: from L{client_context} (with a trust root when
            C{pkix}).
        @param sni: the host name to send as SNI; L{None} or an address
            literal sends none.
        @param pkix: refuse a chain OpenSSL does not verify (with
            L{CertificateChainError}).
        @param authenticate: see the class docstring.
        """
        self._ctx = context
        host = sni.rstrip(".") if sni else None
        self.sni: bytes | None = host.encode("idna") if host and not is_ip(host) else None
        self.pkix = pkix
        self.authenticate = authenticate

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """See C{IOpenSSLClientConnectionCreator}.

        @param tlsProtocol: the C{TLSMemoryBIOProtocol} the connection is for.
        @return: an C{OpenSSL.SSL.Connection} in client mode.
        """
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        if self.sni:
            conn.set_tlsext_host_name(self.sni)
        if self.pkix or self.authenticate is not None:
            conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                            self._verifier(tlsProtocol))
        conn.set_connect_state()
        return conn

    def _verifier(self, tlsProtocol: Any) -> Callable[..., bool]:
        decided: list[bool] = []  # set once: later calls repeat the verdict

        def refuse(exc: BaseException) -> bool:
            decided.append(False)
            tlsProtocol.failVerification(Failure(exc))
            return False

        def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                   ok: int) -> bool:
            if decided:
                return decided[0]
            if not ok and self.pkix:
                return refuse(CertificateChainError(errno, depth))
            if depth != 0:
                return True
            if self.authenticate is not None:
                chain = conn.get_peer_cert_chain() or [cert]
                try:
                    self.authenticate(conn, chain)
                except Exception as e:  # noqa: BLE001 - any refusal aborts the handshake
                    return refuse(e)
            decided.append(True)
            return True

        return verify


def opportunistic_tls(hostname: str | None) -> ClientTLS:
    """A connection creator that encrypts but checks no certificate
    (C{may}, C{encrypt}).

    @param hostname: sent as SNI when it is a name.
    @return: an C{IOpenSSLClientConnectionCreator}.
    """
    return ClientTLS(client_context(), hostname)


def name_checking_tls(sni: str | None, wanted: Sequence[str],
                      trust_root: TrustRoot | None) -> ClientTLS:
    """A connection creator for C{verify}, C{secure} and MTA-STS: the chain
    must verify against C{trust_root} (expiry included) and the server's
    certificate must name one of C{wanted} (L{twisted_mailout.tls.names}).

    @param sni: the name sent as SNI (the MX or relay host name).
    @param wanted: reference names, e.g. from
        L{twisted_mailout.tls.policy.TLSPolicy.names_for}: host names,
        address literals, C{.domain} for any host below C{domain}.
    @param trust_root: from L{load_trust_root}; L{None} for the platform's.
    @return: an C{IOpenSSLClientConnectionCreator}; a failed check aborts
        the handshake with L{CertificateChainError} (expired, self-signed,
        unknown CA, ...) or L{twisted_mailout.tls.errors.CertificateNameError}.
    """
    wanted = tuple(wanted)

    def names(conn: SSL.Connection, chain: list[crypto.X509]) -> None:
        check_names(chain[0], wanted)

    root = trust_root if trust_root is not None else ssl.platformTrust()
    return ClientTLS(client_context(root), sni, pkix=True, authenticate=names)
