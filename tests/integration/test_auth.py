"""SMTP AUTH to a relay, against aiosmtpd with real TLS on loopback.

What the user relies on: each mechanism (PLAIN, LOGIN, CRAM-MD5, XOAUTH2)
logs in over STARTTLS and over implicit TLS (smtps); a refused login never
delivers and is reported with the server's reply; credentials are never sent
over a connection that is not encrypted unless ``auth_plaintext=True`` says
so -- the capture of the session holds neither the password nor any base64
form of it -- and the password appears in no log line, report text or repr.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile

from tests.support.tls_peers import RecordingProxy, TestPKI, TlsSmtpServer
from tests.support.trial import start_dns
from twisted.internet import defer, reactor, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

import twisted_mailout
from twisted_mailout.smtp.auth import Credentials

RELAY = "smtp.relay.test"
USER = "mailout-user@relay.test"
PASSWORD = "S3cret-pa55word-never-logged-4242"
TOKEN = "ya29.a0Af-token-never-logged-0123456789"
MARK = b"auth-test-body-5c1e"
MSG = (b"Message-ID: <auth@origin.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
       b"Subject: auth\r\n\r\n" + MARK + b"\r\n")
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")


def secret_forms(secret: str, user: str = USER) -> list[bytes]:
    """The secret as it could leak: itself, and the base64 of every SASL
    message carrying it, plus the parts of base64(secret) that do not depend
    on what precedes it (for each of the three alignments)."""
    s = secret.encode()
    u = user.encode()
    forms = [s, base64.b64encode(s),
             base64.b64encode(b"\0" + u + b"\0" + s),  # PLAIN
             base64.b64encode(u + b"\0" + u + b"\0" + s),  # PLAIN with authzid
             base64.b64encode(b"user=" + u + b"\x01auth=Bearer " + s + b"\x01\x01")]  # XOAUTH2
    for k in (1, 2):
        enc = base64.b64encode(b"\0" * k + s)
        forms.append(enc[4:-4])  # groups made of secret bytes only
    return forms


class _AuthTestBase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="auth-tests-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = TestPKI(self.tmp, rsa=False)
        self.dns_port, _ = start_dns(self, {RELAY: {"A": ["127.0.0.1"]}})
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def serve(self, mechanism=None, **kw):
        kw.setdefault("credentials", {USER: TOKEN if mechanism == "XOAUTH2" else PASSWORD})
        if mechanism is not None:
            kw["mechanisms"] = (mechanism,)
        server = TlsSmtpServer(self.pki.good(RELAY), server_hostname=RELAY, **kw).start()
        self.addCleanup(lambda: threads.deferToThread(server.stop))
        proxy = RecordingProxy("127.0.0.1", server.port).start()
        self.addCleanup(lambda: threads.deferToThread(proxy.stop))
        return server, proxy

    def credentials(self, mechanism, password=PASSWORD, **kw):
        """``auth=`` for a mechanism: (user, password), or for XOAUTH2 the
        token in a file (Credentials(token_file=...))."""
        if mechanism == "XOAUTH2":
            from twisted_mailout.smtp.auth import Credentials

            path = os.path.join(self.tmp, "token")
            with open(path, "w") as f:
                f.write(TOKEN if password == PASSWORD else password)
            return Credentials(USER, token_file=path, **kw)
        return (USER, password)

    def send(self, relay, auth, tls="verify", **kw):
        if tls in ("verify", "secure"):
            kw.setdefault("cafile", self.pki.cafile)
        return twisted_mailout.sendmail("a@origin.test", ["b@dest.test"], MSG, relay=relay,
                                        resolver=f"127.0.0.1:{self.dns_port}", tls=tls,
                                        auth=auth, timeout=10, **kw)

    def log_text(self) -> str:
        out = []
        for e in self.events:
            out.append(formatEvent(e) or "")
            out.append(repr(e))
            f = e.get("log_failure")
            if f is not None:
                out.append(f.getTraceback())
        return "\n".join(out)

    def assertNoSecretAnywhere(self, report, proxy=None, secret=PASSWORD, wire=True):
        """The secret is in no log line (text, event repr, traceback), no
        report text or repr; and with ``wire``, in no byte of the capture."""
        text = self.log_text() + repr(report) + str(report)
        for r in report:
            text += r.text + repr(r) + str(r)
        for form in secret_forms(secret):
            self.assertNotIn(form.decode(), text, f"secret form {form!r} leaked")
        if proxy is not None and wire:
            captured = proxy.client_bytes() + proxy.server_bytes()
            for form in secret_forms(secret):
                self.assertNotIn(form, captured, f"secret form {form!r} on the wire")


def _tls_proof(test, server, proxy, mechanism):
    [attempt] = server.auth_attempts
    test.assertEqual((attempt["mechanism"], attempt["user"], attempt["ok"]),
                     (mechanism, USER, True))
    test.assertIsNotNone(attempt["tls"], "AUTH went over plaintext")
    [m] = server.messages
    test.assertTrue(m["authenticated"])
    test.assertEqual(m["login"], USER)
    test.assertIsNotNone(m["tls"])
    test.assertEqual(m["data"], MSG)
    test.assertNotIn(MARK, proxy.client_bytes())


class MechanismTests(_AuthTestBase):
    """Each mechanism, over STARTTLS (smtp:// on the submission port) and
    over implicit TLS (smtps://). The server offers only that mechanism."""

    @defer.inlineCallbacks
    def check(self, mechanism, implicit):
        server, proxy = self.serve(mechanism, implicit=implicit)
        scheme = "smtps" if implicit else "smtp"
        report = yield self.send(f"{scheme}://{RELAY}:{proxy.port}", self.credentials(mechanism))
        r = report["b@dest.test"]
        self.assertEqual((r.status, r.code), ("delivered", 250), r)
        _tls_proof(self, server, proxy, mechanism)
        commands = server.connections[0].commands
        if implicit:
            self.assertNotIn("STARTTLS", commands)
        else:
            # AUTH after STARTTLS, never before it
            self.assertLess(commands.index("STARTTLS"), commands.index("AUTH"))
        self.assertNoSecretAnywhere(report, proxy,
                                    TOKEN if mechanism == "XOAUTH2" else PASSWORD)


def _make_mech_test(mechanism, implicit):
    def test(self):
        return self.check(mechanism, implicit)

    how = "smtps (implicit TLS)" if implicit else "STARTTLS"
    test.__name__ = (f"test_{mechanism.replace('-', '_').lower()}_over_"
                     f"{'smtps' if implicit else 'starttls'}")
    test.__doc__ = (f"AUTH {mechanism} over {how} logs in and the mail is delivered on "
                    f"the authenticated, encrypted connection; the secret is nowhere "
                    f"in logs, report or capture.")
    return test


for _mech in MECHANISMS:
    for _implicit in (False, True):
        _t = _make_mech_test(_mech, _implicit)
        setattr(MechanismTests, _t.__name__, _t)
del _mech, _implicit, _t


class RefusedLoginTests(_AuthTestBase):
    @defer.inlineCallbacks
    def test_wrong_password_535_is_not_delivered_and_reports_the_server_reply(self):
        """A wrong password (535 5.7.8): nothing delivered, the recipient is
        not delivered and carries the server's 535 reply; the wrong password
        does not leak either."""
        server, proxy = self.serve("PLAIN")
        wrong = "Wr0ng-pa55word-also-secret-9876"
        report = yield self.send(f"smtp://{RELAY}:{proxy.port}", self.credentials("PLAIN", wrong))
        r = report["b@dest.test"]
        self.assertIn(r.status, ("bounced", "deferred"), r)
        if r.status == "bounced":
            self.assertEqual(r.code, 535, r)
        else:
            self.assertTrue(400 <= r.code < 500, r)
            self.assertIn("535", r.text, r)
        self.assertIn("5.7.8", r.text, r)
        self.assertEqual(server.messages, [])
        self.assertEqual([a["ok"] for a in server.auth_attempts], [False])
        self.assertNoSecretAnywhere(report, proxy, wrong)

    @defer.inlineCallbacks
    def test_temporary_auth_failure_454_is_deferred(self):
        """A temporary AUTH failure (454 4.7.0) defers the mail with that reply."""
        server, proxy = self.serve("LOGIN",
                                   auth_failure="454 4.7.0 Temporary authentication failure")
        report = yield self.send(f"smtp://{RELAY}:{proxy.port}",
                                 self.credentials("LOGIN", "Wr0ng-but-temporary-5555"))
        r = report["b@dest.test"]
        self.assertEqual(r.status, "deferred", r)
        self.assertTrue(400 <= r.code < 500, r)
        self.assertIn("4.7.0", r.text, r)
        self.assertEqual(server.messages, [])

    @defer.inlineCallbacks
    def test_wrong_xoauth2_token_is_not_delivered(self):
        """A refused XOAUTH2 token (334 JSON error, then 535): nothing
        delivered, and the token leaks nowhere."""
        server, proxy = self.serve("XOAUTH2", implicit=True)
        bad = "ya29.expired-token-also-secret-000111"
        report = yield self.send(f"smtps://{RELAY}:{proxy.port}",
                                 self.credentials("XOAUTH2", bad))
        r = report["b@dest.test"]
        self.assertIn(r.status, ("bounced", "deferred"), r)
        self.assertEqual(server.messages, [])
        self.assertEqual([a["ok"] for a in server.auth_attempts], [False])
        self.assertNoSecretAnywhere(report, proxy, bad)


class PlaintextAuthTests(_AuthTestBase):
    """A relay that offers AUTH on a connection that is not encrypted."""

    @defer.inlineCallbacks
    def check_refused(self, tls, **server_kw):
        server, proxy = self.serve(auth_require_tls=False, **server_kw)
        report = yield self.send(f"{RELAY}:{proxy.port}", (USER, PASSWORD), tls=tls)
        r = report["b@dest.test"]
        self.assertEqual(r.status, "deferred", r)
        self.assertTrue(400 <= r.code < 500, r)
        self.assertIn("AUTH", r.text.upper(), r)
        self.assertEqual(server.auth_attempts, [])
        self.assertEqual(server.messages, [])
        wire = proxy.client_bytes()
        self.assertNotIn(b"AUTH ", wire.upper())
        self.assertNotIn(MARK, wire)
        self.assertNoSecretAnywhere(report, proxy)
        return server, proxy

    def test_no_starttls_offered_no_auth_sent(self):
        """tls='may', the relay offers AUTH PLAIN/LOGIN/CRAM-MD5/XOAUTH2 but no
        STARTTLS: no AUTH is attempted, the mail is deferred, and the capture
        holds neither the password nor any base64 form of it."""
        return self.check_refused("may", starttls="none")

    def test_tls_none_no_auth_sent(self):
        """tls='none' with credentials: no AUTH over the plaintext channel."""
        return self.check_refused("none")

    @defer.inlineCallbacks
    def test_starttls_refused_454_no_auth_sent(self):
        """tls='may', STARTTLS answered 454: the session goes on in plaintext,
        so AUTH must not be sent."""
        server, _ = yield self.check_refused("may", starttls="454")
        self.assertIn("STARTTLS", server.connections[0].commands)

    @defer.inlineCallbacks
    def test_tls_handshake_failure_no_auth_sent_in_plaintext_retry(self):
        """tls='may', STARTTLS accepted but the handshake fails: the plaintext
        retry must not carry AUTH."""
        yield self.check_refused("may", starttls="garbage")

    @defer.inlineCallbacks
    def test_auth_plaintext_true_allows_it(self):
        """auth_plaintext=True: the operator allows AUTH in the clear; it is
        sent (PLAIN, in the capture: the control proving the capture check
        would see a leak), the mail is delivered; logs and report stay clean."""
        server, proxy = self.serve("PLAIN", auth_require_tls=False, starttls="none")
        report = yield self.send(f"{RELAY}:{proxy.port}", (USER, PASSWORD), tls="may",
                                 auth_plaintext=True)
        r = report["b@dest.test"]
        self.assertEqual((r.status, r.code), ("delivered", 250), r)
        [attempt] = server.auth_attempts
        self.assertEqual((attempt["mechanism"], attempt["ok"], attempt["tls"]),
                         ("PLAIN", True, None))
        wire = proxy.client_bytes()
        self.assertTrue(any(f in wire for f in secret_forms(PASSWORD)),
                        "AUTH PLAIN in the clear should be visible in the capture")
        self.assertNoSecretAnywhere(report, proxy, wire=False)

    @defer.inlineCallbacks
    def test_auth_plaintext_prefers_cram_md5(self):
        """auth_plaintext=True with CRAM-MD5 offered: the challenge-response
        mechanism is used, so even then the password never crosses the wire."""
        server, proxy = self.serve(auth_require_tls=False, starttls="none")
        report = yield self.send(f"{RELAY}:{proxy.port}", (USER, PASSWORD), tls="may",
                                 auth_plaintext=True)
        self.assertEqual(report["b@dest.test"].status, "delivered")
        self.assertEqual([a["mechanism"] for a in server.auth_attempts], ["CRAM-MD5"])
        self.assertNoSecretAnywhere(report, proxy)


class SecretReprTests(unittest.SynchronousTestCase):
    def test_credentials_repr_and_str_hide_the_secret(self):
        """The objects holding credentials never show the secret in repr/str."""
        from twisted_mailout.smtp.auth import Credentials

        c = Credentials(USER, PASSWORD)
        for text in (repr(c), str(c), repr(c.password), str(c.password)):
            self.assertNotIn(PASSWORD, text)

    def test_bad_arguments_do_not_echo_the_password(self):
        """A bad auth= argument fails without the password in the error."""
        d = twisted_mailout.sendmail("a@origin.test", ["b@dest.test"], MSG,
                                     auth=(USER, PASSWORD))  # no relay: refused
        f = self.failureResultOf(d)
        self.assertNotIn(PASSWORD, str(f.value) + repr(f.value) + f.getTraceback())


class TokenCommandTests(unittest.TestCase):
    """The XOAUTH2 token command runs through the reactor it is given, as a child
    process, and its failures are AuthErrors naming the command."""

    @defer.inlineCallbacks
    def test_token_command_output_is_the_token(self):
        import sys

        creds = Credentials(USER, token_command=[sys.executable, "-c", "print('tok-123')"])
        token = yield creds.token(reactor)
        self.assertEqual(token.reveal(), "tok-123")

    @defer.inlineCallbacks
    def test_failing_token_command_is_an_auth_error(self):
        import sys

        from twisted_mailout.smtp.auth import AuthError

        creds = Credentials(USER, token_command=[sys.executable, "-c", "raise SystemExit(3)"])
        with self.assertRaisesRegex(AuthError, "exited with status 3"):
            yield creds.token(reactor)

    @defer.inlineCallbacks
    def test_token_file_is_read_in_the_thread_pool(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "token")
        with open(path, "w") as f:
            f.write("file-token\n")
        seen = []
        real = threads.deferToThreadPool

        def spy(*args, **kwargs):
            seen.append(args[2])
            return real(*args, **kwargs)

        self.patch(threads, "deferToThreadPool", spy)
        token = yield Credentials(USER, token_file=path).token(reactor)
        self.assertEqual(token.reveal(), "file-token")
        self.assertEqual([f.__name__ for f in seen], ["_read_token_file"])
