"""A loopback HTTPS server (twisted.web, in process) for MTA-STS tests.

``PolicyServer(reactor, leaf_cert)`` listens with TLS on a loopback address
and answers every GET with the current ``reply`` (a :class:`Reply`):
status, content type, body, extra headers, or a stall (headers never sent,
or the body never finished).  Requests are recorded as
``(path, host_header)``.  :meth:`PolicyServer.stop` aborts open connections
and waits until they and the listening port are closed, so trial finds a
clean reactor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.web import http, resource, server
from zope.interface import implementer

POLICY_PATH = "/.well-known/mta-sts.txt"


@dataclass
class Reply:
    """What the server sends.

    :param status: HTTP status code.
    :param content_type: Content-Type header value, or None for none.
    :param body: the body (bytes).
    :param headers: extra headers, name -> value.
    :param chunked: send the body with chunked encoding (no Content-Length).
    :param stall: ``"headers"`` never answers; ``"body"`` sends the headers
        and half the body, then nothing more; None answers at once.
    """

    status: int = 200
    content_type: str | None = "text/plain"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    stall: str | None = None


def policy(mode: str = "enforce", mx=("mx.example.test",), max_age: int = 86400,
           eol: str = "\r\n") -> bytes:
    """A policy body (bytes)."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {max_age}"]
    return (eol.join(lines) + eol).encode()


@implementer(IOpenSSLContextFactory)
class _ServerTLS:
    """The server side: a trustme leaf certificate and its key (TLS 1.2+)."""

    def __init__(self, cert):
        self._ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        pems = [blob.bytes() for blob in cert.cert_chain_pems]
        self._ctx.use_certificate(x509.load_pem_x509_certificate(pems[0]))
        for pem in pems[1:]:
            self._ctx.add_extra_chain_cert(x509.load_pem_x509_certificate(pem))
        self._ctx.use_privatekey(
            serialization.load_pem_private_key(cert.private_key_pem.bytes(), None))

    def getContext(self):
        return self._ctx


class _Handler(resource.Resource):
    isLeaf = True

    def __init__(self, owner: PolicyServer):
        super().__init__()
        self.owner = owner

    def render_GET(self, request):
        host = request.getHeader("host")
        self.owner.requests.append((request.path.decode(), host))
        reply = self.owner.reply
        if reply.stall == "headers":
            return server.NOT_DONE_YET
        request.setResponseCode(reply.status)
        if reply.content_type is not None:
            request.setHeader("content-type", reply.content_type)
        else:
            request.defaultContentType = None
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        if reply.stall == "body":
            request.setHeader("content-length", str(len(reply.body)))
            request.write(reply.body[: len(reply.body) // 2])
            return server.NOT_DONE_YET
        if reply.chunked:
            for i in range(0, len(reply.body), 4096):
                request.write(reply.body[i:i + 4096])
            request.finish()
            return server.NOT_DONE_YET
        return reply.body


class _Channel(http.HTTPChannel):
    def connectionMade(self):
        super().connectionMade()
        self.factory_owner.open.add(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        owner = self.factory_owner
        owner.open.discard(self)
        waiters, owner.closed_waiters = owner.closed_waiters, []
        if not owner.open:
            for d in waiters:
                d.callback(None)
        else:
            owner.closed_waiters = waiters


class PolicyServer:
    """twisted.web over TLS on a loopback address.

    :param reactor: the reactor (``IReactorSSL``).
    :param cert: a ``trustme.LeafCert`` (its key and chain are served).
    :param interface: ``"127.0.0.1"`` or ``"::1"``.
    """

    def __init__(self, reactor, cert, interface: str = "127.0.0.1"):
        self.reactor = reactor
        self.cert = cert
        self.interface = interface
        self.reply = Reply(body=policy())
        self.requests: list[tuple[str, str | None]] = []
        self.open: set = set()
        self.closed_waiters: list[defer.Deferred] = []
        self.port: int | None = None
        self._listening = None

    def start(self) -> int:
        """Listen on a free port; return it."""
        options = _ServerTLS(self.cert)
        site = server.Site(_Handler(self))
        owner = self

        class Channel(_Channel):
            factory_owner = owner

        site.protocol = Channel
        self._listening = self.reactor.listenSSL(0, site, options, interface=self.interface)
        self.port = self._listening.getHost().port
        return self.port

    def stop(self) -> defer.Deferred:
        """Abort open connections, stop listening; fires when all are closed."""
        waits = []
        if self._listening is not None:
            waits.append(defer.maybeDeferred(self._listening.stopListening))
            self._listening = None
        if self.open:
            d: defer.Deferred = defer.Deferred()
            self.closed_waiters.append(d)
            waits.append(d)
            for channel in list(self.open):
                channel.transport.abortConnection()
        return defer.gatherResults(waits)
