"""Real TLS peers on loopback for the transport-security tests.

Everything listens on 127.0.0.1 only, every wait is bounded, and every peer has
a ``stop()`` that ends its threads or processes (the tests register it as a
cleanup).

* :class:`TestPKI` -- a test CA made with ``trustme`` and the certificates the
  matrix needs: good, self-signed, expired, wrong name (PEM files in a folder);
* :class:`TlsSmtpServer` -- an aiosmtpd server in its own thread: STARTTLS
  offered / not offered / answered 454 / accepted then broken, or implicit TLS
  (RFC 8314); optional AUTH (PLAIN, LOGIN built in; CRAM-MD5 and XOAUTH2 added
  here). Each message and each connection records, *server side*, whether TLS
  protected it; with :func:`sni_server_context`, the certificate is chosen by
  the SNI name the client sends (the DANE tests);
* :class:`RecordingProxy` -- a TCP proxy that records both directions to bytes,
  so a test can prove what crossed the wire in the clear;
* :class:`PostfixServer` -- a private Postfix instance (own config and queue
  folders under a temporary folder, smtpd on a free loopback port, STARTTLS
  with a test certificate) relaying everything to a :class:`peers.SmtpSink`;
  :func:`require_postfix` skips a test where it cannot run (fails under CI).
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.peers import IN_CI, free_port, start_controller, stop_controller
from tests.support.wait import wait_for

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"

_STOP_TIMEOUT = 10.0


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class CertFiles:
    """One server certificate on disk.

    @ivar pem: key + certificate chain in one PEM file (aiosmtpd, Twisted).
    @ivar cert: certificate chain only (Postfix ``smtpd_tls_cert_file``).
    @ivar key: private key only (Postfix ``smtpd_tls_key_file``).
    @ivar names: the names the certificate is for.
    @ivar kind: ``"good"``, ``"self-signed"``, ``"expired"`` or ``"wrong-name"``.
    """

    pem: str
    cert: str
    key: str
    names: tuple[str, ...]
    kind: str

    def server_context(self) -> ssl.SSLContext:
        """A server-side ``ssl.SSLContext`` with this certificate (TLS 1.2+)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


class TestPKI:
    """A throw-away certificate authority and server certificates, as PEM files.

    @param directory: where the files go (the caller removes it).
    @param rsa: RSA keys instead of ECDSA (Postfix is happiest with RSA).

    ``cafile`` is the CA certificate to pass as ``cafile=``.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: str | os.PathLike[str], *, rsa: bool = True) -> None:
        import trustme

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key_type = trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA
        self.ca = trustme.CA(organization_name="twisted_mailout test CA",
                             key_type=self._key_type)
        self.cafile = str(self.dir / "ca.pem")
        self.ca.cert_pem.write_to_path(self.cafile)
        self._n = 0

    def _write(self, key_pem: bytes, chain_pem: bytes, names, kind) -> CertFiles:
        self._n += 1
        base = self.dir / f"{self._n:02d}-{kind}-{names[0]}"
        (Path(f"{base}.key")).write_bytes(key_pem)
        (Path(f"{base}.crt")).write_bytes(chain_pem)
        (Path(f"{base}.pem")).write_bytes(key_pem + chain_pem)
        for suffix in (".key", ".crt", ".pem"):
            os.chmod(f"{base}{suffix}", 0o644)  # Postfix daemons read them too
        return CertFiles(f"{base}.pem", f"{base}.crt", f"{base}.key", tuple(names), kind)

    def _issue(self, names, kind, **kw) -> CertFiles:
        leaf = self.ca.issue_cert(*names, key_type=self._key_type, **kw)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return self._write(leaf.private_key_pem.bytes(), chain, names, kind)

    def good(self, *names: str) -> CertFiles:
        """A certificate for ``names`` signed by the test CA, valid now."""
        return self._issue(names, "good")

    def wrong_name(self, *names: str) -> CertFiles:
        """A valid certificate signed by the test CA, but for other ``names``
        (use names that are not the server's)."""
        return self._issue(names, "wrong-name")

    def expired(self, *names: str) -> CertFiles:
        """A certificate for ``names`` signed by the test CA that expired yesterday."""
        now = datetime.datetime.now(datetime.UTC)
        return self._issue(names, "expired", not_before=now - datetime.timedelta(days=30),
                           not_after=now - datetime.timedelta(days=1))

    def self_signed(self, *names: str) -> CertFiles:
        """A certificate for ``names`` signed by its own key (not by the CA)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        return self._write(key_pem, cert.public_bytes(serialization.Encoding.PEM), names,
                           "self-signed")

    def for_case(self, case: str, name: str) -> CertFiles | None:
        """The certificate of a matrix server case for a server called ``name``:
        ``good``, ``self-signed``, ``expired``, ``wrong-name`` (a CA-signed
        certificate for ``wrong.invalid.test``); None for the other cases
        (which use a good certificate where one is needed: see
        L{TlsSmtpServer.for_case})."""
        if case == "self-signed":
            return self.self_signed(name)
        if case == "expired":
            return self.expired(name)
        if case == "wrong-name":
            return self.wrong_name("wrong.invalid.test")
        return self.good(name)


# ---------------------------------------------------------------------- aiosmtpd


#: STARTTLS behaviours of L{TlsSmtpServer}.
STARTTLS_MODES = ("offer", "none", "454", "garbage", "close")

#: The matrix's server cases, in order.
SERVER_CASES = ("good", "self-signed", "expired", "wrong-name", "no-starttls", "starttls-454",
                "handshake-fails")


@dataclass
class ConnectionRecord:
    """What the server saw on one connection.

    @ivar peer: the client's address.
    @ivar commands: the command verbs received, in order (``"EHLO"``,
        ``"STARTTLS"``, ``"AUTH"``, ``"MAIL"``...; no arguments, so no secrets).
    @ivar tls: the TLS version protecting the connection when the last
        command was read (``"TLSv1.3"``), or None for plaintext.
    """

    peer: Any
    commands: list[str] = field(default_factory=list)
    tls: str | None = None


def _tls_of(transport) -> tuple[str | None, str | None]:
    """(version, cipher) of the TLS layer under an asyncio transport, or (None, None)."""
    if transport is None:
        return None, None
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return None, None
    cipher = obj.cipher()
    return obj.version(), cipher[0] if cipher else None


@functools.cache
def _make_tls_classes():
    """aiosmtpd subclasses, built lazily (importing this module needs no aiosmtpd)."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult

    class RecordingSMTP(SMTP):
        def __init__(self, *args: Any, peer_server: TlsSmtpServer, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._srv = peer_server
            self._record: ConnectionRecord | None = None

        def connection_made(self, transport):
            first = self._record is None
            super().connection_made(transport)
            if first:
                self._record = ConnectionRecord(peer=transport.get_extra_info("peername"))
                self._srv._add_connection(self._record)

        def _note(self, verb: str) -> None:
            if self._record is not None:
                self._record.commands.append(verb)
                self._record.tls = _tls_of(self.transport)[0]

        async def smtp_EHLO(self, arg):
            self._note("EHLO")
            await super().smtp_EHLO(arg)

        async def smtp_HELO(self, arg):
            self._note("HELO")
            await super().smtp_HELO(arg)

        async def smtp_MAIL(self, arg):
            self._note("MAIL")
            await super().smtp_MAIL(arg)

        async def smtp_RCPT(self, arg):
            self._note("RCPT")
            await super().smtp_RCPT(arg)

        async def smtp_DATA(self, arg):
            self._note("DATA")
            await super().smtp_DATA(arg)

        async def smtp_AUTH(self, arg):
            self._note("AUTH")
            await super().smtp_AUTH(arg)

        async def smtp_QUIT(self, arg):
            self._note("QUIT")
            await super().smtp_QUIT(arg)

        async def smtp_STARTTLS(self, arg):
            self._note("STARTTLS")
            mode = self._srv.starttls
            if mode == "454":
                await self.push("454 4.7.0 TLS not available due to local problem")
                return
            if mode in ("garbage", "close"):
                await self.push("220 2.0.0 Ready to start TLS")
                try:  # wait for the ClientHello, so the garbage answers it
                    await _wait_async(self._reader.read(4096), 5.0)
                except Exception:
                    pass
                if mode == "garbage":
                    self.transport.write(b"this is not a TLS record, sorry\r\n" * 4)
                self.transport.close()
                return
            await super().smtp_STARTTLS(arg)

    class TlsController(Controller):
        def __init__(self, handler: Any, *, peer_server: TlsSmtpServer, **kwargs: Any):
            super().__init__(handler, **kwargs)
            self._srv = peer_server

        def factory(self):
            return RecordingSMTP(self.handler, peer_server=self._srv, **self.SMTP_kwargs)

    return TlsController, AuthResult


def _wait_async(aw, timeout):
    import asyncio

    return asyncio.wait_for(aw, timeout)


def _login_of(session) -> str | None:
    login = getattr(session.auth_data, "login", None)
    return login.decode("utf-8", "replace") if isinstance(login, bytes) else login


class _TlsHandler:
    def __init__(self, srv: TlsSmtpServer) -> None:
        self.srv = srv

    async def handle_DATA(self, server, session, envelope):
        version, cipher = _tls_of(server.transport)
        record = {
            "mail_from": "" if envelope.mail_from == "<>" else envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data": envelope.original_content,
            "tls": version,
            "cipher": cipher,
            "authenticated": bool(session.authenticated),
            "login": _login_of(session),
            "peer": session.peer,
        }
        with self.srv._lock:
            self.srv._messages.append(record)
        return "250 2.0.0 Message accepted for delivery"

    # CRAM-MD5 (RFC 2195) and XOAUTH2 are not built into aiosmtpd: aiosmtpd
    # finds handler methods named auth_<MECH> ("__" stands for "-").
    async def auth_CRAM__MD5(self, server, args):
        _, AuthResult = _make_tls_classes()
        if len(args) != 1:
            await server.push("501 5.5.4 CRAM-MD5 takes no initial response")
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.token_hex(8)}.{int(time.time())}@tls-peer.test>".encode()
        answer = await server.challenge_auth(challenge)
        if not isinstance(answer, bytes):
            return AuthResult(success=False, handled=True)
        user, _, digest = answer.decode("utf-8", "replace").rpartition(" ")
        password = self.srv.credentials.get(user)
        ok = password is not None and hmac.compare_digest(
            digest, hmac.new(password.encode(), challenge, hashlib.md5).hexdigest())
        return self.srv._auth_outcome("CRAM-MD5", user, ok, server)

    async def auth_XOAUTH2(self, server, args):
        _, AuthResult = _make_tls_classes()
        if len(args) == 2:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except ValueError:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            blob = await server.challenge_auth(b"", encode_to_b64=False)
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        fields = dict(p.split("=", 1) for p in blob.decode("utf-8", "replace").split("\x01")
                      if "=" in p)
        user = fields.get("user", "")
        token = fields.get("auth", "")
        expected = self.srv.credentials.get(user)
        ok = expected is not None and token == f"Bearer {expected}"
        result = self.srv._auth_outcome("XOAUTH2", user, ok, server)
        if not ok and result.message is None:
            # RFC 7628 / Google's XOAUTH2: a 334 with a JSON error, the client
            # answers with an empty line, then the final failure reply.
            err = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}).encode())
            await server.challenge_auth(err, encode_to_b64=False)
        return result


def sni_server_context(chains: dict[str, tuple[bytes, bytes]], default: str,
                       workdir: str | os.PathLike[str],
                       max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A server-side TLS context that presents a certificate chosen by the
    SNI name the client sends (for DANE, the TLSA base domain).

    @param chains: C{{server_name: (chain_pem, key_pem)}}, PEM bytes; the
        chain is the server certificate first.
    @param default: the name in C{chains} whose chain is presented when the
        client sends no SNI name, or one not in C{chains}.
    @param workdir: a folder for the key and chain files the C{ssl} module
        loads them from (the caller removes it).
    @param max_version: the highest TLS version offered (None: the default).
    @return: the context of C{default}, with an SNI callback switching to
        the others.
    """
    contexts = {}
    for name, (chain_pem, key_pem) in chains.items():
        path = os.path.join(workdir, f"{name}.pem")
        with open(path, "wb") as f:
            f.write(key_pem + chain_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(path)
        if max_version is not None:
            ctx.maximum_version = max_version
        contexts[name] = ctx

    def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if server_name in contexts:
            sslobj.context = contexts[server_name]

    base = contexts[default]
    base.sni_callback = pick
    return base


class TlsSmtpServer:
    """An aiosmtpd server on 127.0.0.1 for the TLS and AUTH tests.

    @param cert: L{CertFiles} for STARTTLS or implicit TLS (None: no TLS at all).
    @param starttls: ``"offer"`` (normal STARTTLS), ``"none"`` (not offered),
        ``"454"`` (offered, answered ``454 4.7.0``), ``"garbage"`` (answered
        220, then plaintext garbage in reply to the ClientHello and close),
        ``"close"`` (answered 220, then the connection closed).
        With ``"garbage"``/``"close"`` the server still accepts mail in
        plaintext on a connection that does not use STARTTLS.
    @param implicit: TLS from the first byte (``smtps``, RFC 8314); ``cert``
        needed; ``starttls`` ignored.
    @param credentials: ``{user: password_or_token}``; when given, AUTH is
        offered with ``PLAIN``, ``LOGIN``, ``CRAM-MD5`` and ``XOAUTH2``
        (bearer token = the password) unless ``mechanisms`` narrows them.
    @param auth_require_tls: aiosmtpd's: AUTH only offered and accepted
        after TLS (with False it is offered in plaintext too).
    @param auth_failure: the reply to a wrong password (default
        ``535 5.7.8 ...``; e.g. ``"454 4.7.0 Temporary authentication failure"``).
    @param server_hostname: the name in the greeting.
    @param tls_context: a ready server-side C{ssl.SSLContext} to use instead
        of C{cert}'s (for example one from L{sni_server_context}, which picks
        the certificate by the name the client asks for).

    ``messages``: dicts with ``mail_from``, ``rcpt_tos``, ``data`` (bytes as
    received), ``tls`` (e.g. ``"TLSv1.3"``, or None when it came in
    plaintext), ``cipher``, ``authenticated``, ``login``. ``connections``:
    L{ConnectionRecord} per client connection. ``auth_attempts``: dicts with
    ``mechanism``, ``user``, ``ok`` and ``tls`` (the TLS version at the time).
    """

    def __init__(self, cert: CertFiles | None = None, *, starttls: str = "offer",
                 implicit: bool = False, credentials: dict[str, str] | None = None,
                 auth_require_tls: bool = True, mechanisms: tuple[str, ...] | None = None,
                 auth_failure: str | None = None,
                 server_hostname: str = "tls-peer.test",
                 tls_context: ssl.SSLContext | None = None) -> None:
        if starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {STARTTLS_MODES}")
        if cert is None and tls_context is None and (implicit or starttls != "none"):
            raise ValueError("a certificate is needed to offer STARTTLS or implicit TLS")
        self.cert = cert
        self.tls_context = tls_context
        self.starttls = starttls
        self.implicit = implicit
        self.credentials = dict(credentials or {})
        self.auth_require_tls = auth_require_tls
        self.mechanisms = mechanisms
        self.auth_failure = auth_failure
        self.server_hostname = server_hostname
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._lock = threading.Lock()
        self._messages: list[dict[str, Any]] = []
        self._connections: list[ConnectionRecord] = []
        self._auth: list[dict[str, Any]] = []
        self._controller: Any = None

    @classmethod
    def for_case(cls, pki: TestPKI, case: str, name: str, **kw: Any) -> TlsSmtpServer:
        """The server of one matrix case (see L{SERVER_CASES}), for clients
        that know it as ``name``; not started."""
        if case not in SERVER_CASES:
            raise ValueError(case)
        starttls = {"no-starttls": "none", "starttls-454": "454",
                    "handshake-fails": "garbage"}.get(case, "offer")
        cert = pki.for_case(case, name)
        return cls(cert, starttls=starttls, server_hostname=name, **kw)

    # -- records ------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> list[ConnectionRecord]:
        """Client connections (not counting the controller's own start-up probe,
        which sends no command)."""
        with self._lock:
            return [c for c in self._connections if c.commands]

    @property
    def auth_attempts(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._auth)

    def _add_connection(self, record: ConnectionRecord) -> None:
        with self._lock:
            self._connections.append(record)

    def _auth_outcome(self, mechanism: str, user: str, ok: bool, server):
        _, AuthResult = _make_tls_classes()
        with self._lock:
            self._auth.append({"mechanism": mechanism, "user": user, "ok": ok,
                               "tls": _tls_of(server.transport)[0]})
        if ok:
            from aiosmtpd.smtp import LoginPassword

            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        if self.auth_failure:
            return AuthResult(success=False, handled=False, message=self.auth_failure)
        return AuthResult(success=False, handled=False)

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import LoginPassword

        assert isinstance(auth_data, LoginPassword)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = self.credentials.get(user) == password and user in self.credentials
        return self._auth_outcome(mechanism, user, ok, server)

    # -- life ---------------------------------------------------------------

    def _server_context(self) -> ssl.SSLContext:
        if self.tls_context is not None:
            return self.tls_context
        assert self.cert is not None
        return self.cert.server_context()

    def start(self, attempts: int = 5) -> TlsSmtpServer:
        """Listen on a free loopback port; return self."""
        controller_cls, _ = _make_tls_classes()
        kwargs: dict[str, Any] = {"server_hostname": self.server_hostname}
        if not self.implicit and self.starttls != "none":
            kwargs["tls_context"] = self._server_context()
            kwargs["require_starttls"] = False
        if self.credentials:
            kwargs["authenticator"] = self._authenticator
            # aiosmtpd only counts STARTTLS as TLS: over implicit TLS, its
            # auth_require_tls would hide AUTH although the line is encrypted.
            kwargs["auth_require_tls"] = self.auth_require_tls and not self.implicit
            all_mechs = {"PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"}
            keep = set(self.mechanisms or all_mechs)
            kwargs["auth_exclude_mechanism"] = sorted(all_mechs - keep)
        else:
            # offer no AUTH at all
            kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]
        handler: Any = _TlsHandler(self)

        def make(port: int) -> Any:
            return controller_cls(
                handler, peer_server=self, hostname=self.host, port=port, ready_timeout=10.0,
                ssl_context=self._server_context() if self.implicit else None,
                **kwargs)

        self._controller, self.port = start_controller(make, self.host, None, attempts)
        return self

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server thread, waiting at most ``timeout`` seconds."""
        controller, self._controller = self._controller, None
        stop_controller(controller, timeout, f"TLS SMTP server on port {self.port}")

    def __enter__(self) -> TlsSmtpServer:
        return self.start() if self._controller is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_sni_server(workdir: str | os.PathLike[str], chains: dict[str, tuple[bytes, bytes]],
                     default: str, max_version: ssl.TLSVersion | None = None) -> TlsSmtpServer:
    """A started L{TlsSmtpServer} offering STARTTLS with the certificate
    chain chosen by the SNI name the client sends (the TLSA base domain, for
    DANE); see L{sni_server_context} for the arguments. The caller stops it.
    """
    context = sni_server_context(chains, default, workdir, max_version=max_version)
    return TlsSmtpServer(tls_context=context, server_hostname="dane.sink.test").start()


def arrivals(server: TlsSmtpServer) -> list[tuple[str, bool]]:
    """C{(MAIL FROM, whether TLS protected it)} of each message C{server} received."""
    return [(m["mail_from"], m["tls"] is not None) for m in server.messages]


# --------------------------------------------------------------- recording proxy


@dataclass
class ProxiedConnection:
    """One proxied connection: ``to_server`` and ``to_client`` are the bytes
    that crossed the wire in each direction (whatever their encryption)."""

    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 to ``target``, recording both directions.

    One thread runs a selector loop over every socket; :meth:`stop` closes
    everything and joins it. ``port`` is where clients connect;
    ``connections`` lists L{ProxiedConnection} in accept order.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._lock = threading.Lock()
        self._conns: list[ProxiedConnection] = []
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()

    @property
    def connections(self) -> list[ProxiedConnection]:
        with self._lock:
            return [ProxiedConnection(bytearray(c.to_server), bytearray(c.to_client))
                    for c in self._conns]

    def client_bytes(self) -> bytes:
        """Everything every client sent, concatenated."""
        return b"".join(bytes(c.to_server) for c in self.connections)

    def server_bytes(self) -> bytes:
        """Everything the server sent, concatenated."""
        return b"".join(bytes(c.to_client) for c in self.connections)

    def start(self) -> RecordingProxy:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.host, 0))
        lsock.listen(16)
        lsock.setblocking(False)
        self._listener = lsock
        self.port = lsock.getsockname()[1]
        self._sel.register(lsock, selectors.EVENT_READ, ("accept", None, None))
        self._sel.register(self._stop_r, selectors.EVENT_READ, ("stop", None, None))
        self._thread = threading.Thread(target=self._run, name="recording-proxy", daemon=True)
        self._thread.start()
        return self

    def _close_pair(self, pair: dict) -> None:
        for s in (pair["client"], pair["upstream"]):
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            self._open.discard(s)
            s.close()

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select(timeout=1.0):
                kind, pair, direction = key.data
                if kind == "stop":
                    return
                if kind == "accept":
                    self._accept(key.fileobj)
                    continue
                sock = key.fileobj
                peer = pair["upstream"] if direction == "to_server" else pair["client"]
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    self._close_pair(pair)
                    continue
                if not data:  # EOF: pass it on; close both once both sides ended
                    pair["eof"].add(direction)
                    try:
                        self._sel.unregister(sock)
                    except (KeyError, ValueError):
                        pass
                    try:
                        peer.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    if len(pair["eof"]) == 2:
                        self._close_pair(pair)
                    continue
                with self._lock:
                    getattr(pair["record"], direction).extend(data)
                try:
                    peer.settimeout(5)
                    peer.sendall(data)
                    peer.setblocking(False)
                except OSError:
                    self._close_pair(pair)

    def _accept(self, lsock: socket.socket) -> None:
        try:
            client, _ = lsock.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        rec = ProxiedConnection()
        with self._lock:
            self._conns.append(rec)
        pair = {"client": client, "upstream": upstream, "record": rec, "eof": set()}
        for s in (client, upstream):
            s.setblocking(False)
            self._open.add(s)
        self._sel.register(client, selectors.EVENT_READ, ("data", pair, "to_server"))
        self._sel.register(upstream, selectors.EVENT_READ, ("data", pair, "to_client"))

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Close the listener and every proxied connection; join the thread."""
        if self._thread is None:
            return
        self._stop_w.send(b"x")
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        self._thread = None
        for s in list(self._open):
            s.close()
        self._open.clear()
        if self._listener is not None:
            self._listener.close()
        self._sel.close()
        self._stop_r.close()
        self._stop_w.close()
        if alive:
            raise TimeoutError("recording proxy thread did not stop")


# ----------------------------------------------------------------------- Postfix


def postfix_available() -> bool:
    return os.access(POSTFIX, os.X_OK) and os.access(POSTCONF, os.X_OK)


def postfix_usable() -> str | None:
    """Why a private Postfix instance cannot run here, or None when it can."""
    if not postfix_available():
        return f"{POSTFIX} not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user"
    return None


_MASTER_CF = """\
{port} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class PostfixServer:
    """A private Postfix instance: smtpd with STARTTLS on 127.0.0.1:``port``,
    relaying everything it accepts to ``relay_to`` (an smtp-sink).

    Its config_directory, queue_directory and data_directory are under a new
    temporary folder, so it shares nothing with a system Postfix (which must
    not run). Postfix adds its ``Received:`` header with the TLS note
    (``smtpd_tls_received_header = yes``): "(using TLSv1.3 with cipher ...)"
    and "with ESMTPS" when the client used STARTTLS.

    @param cert: L{CertFiles} for ``smtpd_tls_cert_file``/``key_file``.
    @param relay_to: ``(host, port)`` of the next hop (smtp-sink).
    @param myhostname: Postfix's name.
    """

    def __init__(self, cert: CertFiles, relay_to: tuple[str, int], *,
                 myhostname: str = "postfix.relay.test") -> None:
        self.cert = cert
        self.relay_to = relay_to
        self.myhostname = myhostname
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.base: Path | None = None
        self._started = False

    @property
    def config_dir(self) -> Path:
        assert self.base is not None
        return self.base / "etc"

    def log(self) -> str:
        """Postfix's log (maillog_file) so far."""
        if self.base is None:
            return ""
        try:
            return (self.base / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def _postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def _master_pid(self) -> int | None:
        if self.base is None:
            return None
        try:
            text = (self.base / "spool" / "pid" / "master.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def start(self, timeout: float = 30.0) -> PostfixServer:
        """Write the configuration, ``postfix -c DIR start``, wait until
        smtpd answers with a 220 greeting; return self.

        @raise RuntimeError: Postfix would not start (its output and log in
            the message).
        """
        why = postfix_usable()
        if why:
            raise RuntimeError(why)
        self.base = Path(tempfile.mkdtemp(prefix="pf-"))
        self.base.chmod(0o755)
        conf = self.config_dir
        conf.mkdir()
        spool = self.base / "spool"
        spool.mkdir()
        data = self.base / "data"
        data.mkdir()
        import pwd

        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        (self.base / "maillog").touch()
        self.port = free_port(self.host)
        relay_host, relay_port = self.relay_to
        main_cf = f"""\
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.myhostname}
mydomain = relay.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:no local delivery
alias_maps =
alias_database =
relay_domains =
relayhost = [{relay_host}]:{relay_port}
inet_interfaces = {self.host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtp_dns_support_level = disabled
smtpd_tls_cert_file = {self.cert.cert}
smtpd_tls_key_file = {self.cert.key}
smtpd_tls_security_level = may
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_sasl_auth_enable = no
maillog_file = {self.base / "maillog"}
maillog_file_prefixes = {self.base}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
biff = no
smtputf8_enable = no
master_service_disable =
"""
        (conf / "main.cf").write_text(main_cf)
        (conf / "master.cf").write_text(_MASTER_CF.format(port=f"{self.host}:{self.port}"))
        try:
            done = self._postfix("start", timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"postfix start failed ({done.returncode}):\n"
                                   f"{done.stdout}{done.stderr}\n{self.log()}")
            self._started = True

            def greets() -> bool:
                try:
                    with socket.create_connection((self.host, self.port), timeout=2) as s:
                        s.settimeout(5)
                        return s.recv(512).startswith(b"220")
                except OSError:
                    return False

            try:
                wait_for(greets, timeout, interval=0.2,
                         what=f"postfix smtpd to greet on port {self.port}")
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}\n{self.log()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """``postfix stop`` (then SIGKILL our master if it lingers) and remove
        the folder."""
        if self.base is None:
            return
        pid = self._master_pid()
        if self._started:
            try:
                self._postfix("stop", timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            self._started = False
        if pid is not None:
            try:
                wait_for(lambda: not _alive(pid), timeout, what=f"postfix master {pid} to exit")
            except TimeoutError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def require_postfix(testcase) -> None:
    """Skip the calling trial test when a private Postfix cannot run here;
    fail it instead under CI (env CI=true)."""
    from twisted.trial.unittest import SkipTest

    why = postfix_usable()
    if why:
        if IN_CI:
            testcase.fail(f"{why}, but CI=true")
        raise SkipTest(why)
