"""imap:// and imaps:// against a real Dovecot (Debian's dovecot-imapd, a
private instance on 127.0.0.1 started by tests/support/dovecot.py), every
message read back with the standard library's imaplib: its bytes, flags and
internal date, and the TLS each session used (Dovecot's log)."""

from __future__ import annotations

import datetime
import imaplib
import logging
import ssl

from twisted.internet import defer, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.support.dovecot import DovecotServer, require_dovecot
from tests.support.peers import free_port
from tests.support.trial import deferred_test
from tests.support.wait import wait_for
from twisted_mailout.apps.deliveries import get_delivery
from twisted_mailout.apps.imap import IMAPDelivery
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.outcome import RecipientResult

MSG = (b"From: Ann <ann@origin.test>\r\nTo: bob@dest.test\r\n"
       b"Message-ID: <imap-1@origin.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
       b"Subject: into the folder\r\n\r\nFrom the start\r\n.dot line\r\n\r\nend\r\n")

#: Users made at start: a fresh mailbox for each test.
USERS = {f"user{n}": f"pw-{n}-s3cret" for n in range(1, 40)}


class DovecotTests(unittest.TestCase):
    timeout = 60
    server: DovecotServer
    _next = 0

    @classmethod
    def setUpClass(cls) -> None:
        require_dovecot()
        cls.server = DovecotServer(USERS).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def user(self) -> tuple[str, str]:
        """A user no other test of this class uses."""
        DovecotTests._next += 1
        name = f"user{DovecotTests._next}"
        return name, USERS[name]

    def url(self, user: tuple[str, str], folder: str = "INBOX", *, imaps: bool = False,
            query: str = "") -> str:
        scheme, port = ("imaps", self.server.imaps_port) if imaps else ("imap",
                                                                        self.server.port)
        sep = "&" if query else ""
        return (f"{scheme}://{user[0]}:{user[1]}@127.0.0.1:{port}/{folder}"
                f"?cafile={self.server.cafile}{sep}{query}")

    # -- reading back with imaplib (in a thread: it blocks) --------------------

    def _fetch(self, user: tuple[str, str], folder: str) -> list[tuple[bytes, bytes, str]]:
        context = ssl.create_default_context(cafile=self.server.cafile)
        with imaplib.IMAP4_SSL("127.0.0.1", self.server.imaps_port,
                               ssl_context=context) as conn:
            conn.login(*user)
            status, count = conn.select(f'"{folder}"', readonly=True)
            assert status == "OK", (folder, status)
            if int(count[0]) == 0:
                return []
            _, data = conn.fetch("1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
            out = []
            for item in data:
                if isinstance(item, tuple):
                    head, body = item
                    # \Recent is the session's, not stored with the message
                    flags = b" ".join(f for f in imaplib.ParseFlags(head) if f != b"\\Recent")
                    date = head.split(b'INTERNALDATE "', 1)[1].split(b'"', 1)[0].decode()
                    out.append((body, flags, date))
            return out

    def fetch(self, user: tuple[str, str], folder: str = "INBOX") -> defer.Deferred:
        """Every message of the folder: (bytes, flags, internal date)."""
        return threads.deferToThread(self._fetch, user, folder)

    def _folders(self, user: tuple[str, str]) -> list[str]:
        with imaplib.IMAP4("127.0.0.1", self.server.port) as conn:
            conn.login(*user)
            _, data = conn.list()
            return sorted(line.decode().rsplit(' "/" ', 1)[1].strip('"') for line in data)

    def folders(self, user: tuple[str, str]) -> defer.Deferred:
        return threads.deferToThread(self._folders, user)

    def login_lines(self, user: str) -> list[str]:
        """Dovecot's login lines of a user so far (they say TLS or not)."""
        return [line for line in self.server.log().splitlines()
                if "Login: user=<" + user + ">" in line]

    def log_lines(self, *words: str, count: int = 1) -> defer.Deferred:
        """Wait (in a thread, at most 10 s) until Dovecot's log, which its log
        process writes a moment after the event, has C{count} lines with all
        C{words}; fires with those lines."""

        def lines() -> list[str]:
            found = [x for x in self.server.log().splitlines() if all(w in x for w in words)]
            return found if len(found) >= count else []

        return threads.deferToThread(wait_for, lines, 10.0, what=f"{count} log lines {words}",
                                     detail=self.server.log)

    # -- delivered -------------------------------------------------------------

    @deferred_test
    async def test_starttls_append_stores_the_bytes_flags_and_date(self):
        user = self.user()
        delivery = get_delivery(self.url(user, query="flags=%5CSeen"))
        assert isinstance(delivery, IMAPDelivery) and delivery.tls == "verify"
        report = await delivery.send("ann@origin.test", ["bob@dest.test", "cy@dest.test"], MSG)
        assert [(r.recipient, r.status, r.code) for r in report] == [
            ("bob@dest.test", "delivered", 250), ("cy@dest.test", "delivered", 250)]
        text = report["bob@dest.test"].text
        assert text.startswith(f"2.0.0 appended to INBOX at 127.0.0.1:{self.server.port} "
                               "(UIDVALIDITY ") and text.endswith(" UID 1)")
        [line] = await self.log_lines(f"Login: user=<{user[0]}>")
        assert ", TLS," in line and "method=PLAIN" in line
        [(body, flags, date)] = await self.fetch(user)
        assert body == MSG
        assert flags.split() == [b"\\Seen"]
        # the same instant (Dovecot's Maildir keeps it as the file's time, in UTC)
        assert datetime.datetime.strptime(date, "%d-%b-%Y %H:%M:%S %z") == datetime.datetime(
            2026, 11, 23, 9, 0, tzinfo=datetime.UTC)

    @deferred_test
    async def test_imaps_with_system_flags_and_a_keyword(self):
        user = self.user()
        delivery = get_delivery(self.url(user, imaps=True,
                                         query="flags=%5CFlagged,%5Canswered&flags=$Forwarded"))
        assert delivery.scheme == "imaps"
        report = await delivery.send("ann@origin.test", "bob@dest.test", MSG)
        assert report.all_delivered
        [(body, flags, _)] = await self.fetch(user)
        assert body == MSG
        assert set(flags.split()) == {b"\\Flagged", b"\\Answered", b"$Forwarded"}
        assert b"\\Seen" not in flags.split()

    @deferred_test
    async def test_lf_line_ends_are_stored_as_crlf_and_messages_accumulate(self):
        user = self.user()
        delivery = get_delivery(self.url(user))
        await delivery.send("ann@origin.test", "bob@dest.test", MSG.replace(b"\r\n", b"\n"))
        second = MSG.replace(b"imap-1@", b"imap-2@")
        await delivery.send("ann@origin.test", "bob@dest.test", second)
        stored = await self.fetch(user)
        assert [m[0] for m in stored] == [MSG, second]
        assert [m[1] for m in stored] == [b"", b""]  # no flags asked for

    @deferred_test
    async def test_missing_folder_is_bounced_and_not_created_by_default(self):
        user = self.user()
        e = await self.refused(self.url(user, "Sent"))
        assert (e.status, e.reply.code, e.reply.enhanced_status) == ("bounced", 550, "5.1.1")
        assert "TRYCREATE" in e.reply.text and "Sent" in e.reply.text
        assert (e.recipient, e.local, e.relay) == (
            "bob@dest.test", False, f"127.0.0.1:{self.server.port}")
        assert await self.folders(user) == ["INBOX"]

    @deferred_test
    async def test_create_yes_makes_nested_and_non_ascii_folders(self):
        user = self.user()
        for folder in ("Archive/2026", "Gel%C3%B6scht"):
            report = await get_delivery(self.url(user, folder, query="create=yes")).send(
                "ann@origin.test", "bob@dest.test", MSG)
            assert report.all_delivered
        assert await self.folders(user) == ["Archive", "Archive/2026", "Gel&APY-scht",
                                            "INBOX"]
        [(body, _, _)] = await self.fetch(user, "Archive/2026")
        assert body == MSG
        [(body, _, _)] = await self.fetch(user, "Gel&APY-scht")  # modified UTF-7 (RFC 3501)
        assert body == MSG
        # the folder exists now: no second CREATE needed
        report = await get_delivery(self.url(user, "Archive/2026", query="create=yes")).send(
            "ann@origin.test", "bob@dest.test", MSG)
        assert report["bob@dest.test"].text.endswith(" UID 2)")

    @deferred_test
    async def test_tls_none_logs_in_without_tls_and_encrypt_without_a_ca(self):
        user = self.user()
        url = f"imap://{user[0]}:{user[1]}@127.0.0.1:{self.server.port}/?tls=none"
        assert (await get_delivery(url).send("a@origin.test", "b@dest.test", MSG)).all_delivered
        [line] = await self.log_lines(f"Login: user=<{user[0]}>")
        assert ", TLS," not in line and "secured" in line  # loopback: plaintext allowed
        url = url.replace("tls=none", "tls=encrypt")  # TLS, certificate not checked
        assert (await get_delivery(url).send("a@origin.test", "b@dest.test", MSG)).all_delivered
        lines = await self.log_lines(f"Login: user=<{user[0]}>", count=2)
        assert ", TLS," in lines[1]
        assert len(await self.fetch(user)) == 2

    @deferred_test
    async def test_send_blocking_from_a_thread_and_a_mailer(self):
        user = self.user()
        delivery = get_delivery(self.url(user))
        report = await threads.deferToThread(delivery.send_blocking, "ann@origin.test",
                                             "bob@dest.test", MSG)
        assert report.all_delivered
        events: list = []
        mailer = Mailer(self.url(user), observers=[events.append])
        report = await mailer.send(MSG)
        assert report.all_delivered
        assert [(e.recipient, type(e).__name__) for e in events] == [
            ("bob@dest.test", "MailDelivered")]
        assert len(await self.fetch(user)) == 2
        # a failure is a result: the observers hear of it
        del events[:]
        report = await Mailer(self.url(user, "Nowhere"), observers=[events.append]).send(MSG)
        assert [(r.status, r.code) for r in report] == [("bounced", 550)]
        assert [(e.recipient, type(e).__name__, e.code) for e in events] == [
            ("bob@dest.test", "MailBounced", 550)]

    # -- refused -------------------------------------------------------------

    async def refused(self, url: str | IMAPDelivery) -> RecipientResult:
        """The result of a send that must not be delivered."""
        [result] = await get_delivery(url).send("ann@origin.test", "bob@dest.test", MSG)
        assert result.status != "delivered", result
        return result

    @deferred_test
    async def test_wrong_password_is_deferred_and_the_password_is_never_shown(self):
        user = (self.user()[0], "wr0ng-Passw0rd")
        seen: list[str] = []

        def observer(event: dict) -> None:
            seen.append(repr(event))

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record.getMessage())

        handler = Keep(logging.DEBUG)
        logging.getLogger().addHandler(handler)
        globalLogPublisher.addObserver(observer)
        try:
            url = self.url(user)
            e = await self.refused(url)
            e2 = await self.refused(url.replace("imap://", "imaps://").replace(
                f":{self.server.port}/", f":{self.server.imaps_port}/"))
        finally:
            globalLogPublisher.removeObserver(observer)
            logging.getLogger().removeHandler(handler)
        for error in (e, e2):
            assert (error.status, error.reply.code, error.reply.enhanced_status) == (
                "deferred", 454, "4.7.8")
            assert "AUTHENTICATIONFAILED" in error.reply.text
        delivery = get_delivery(url)
        for text in [str(e), repr(e), str(e2), e.reply.text, repr(delivery), str(delivery),
                     delivery.url(), *seen]:
            assert "wr0ng" not in text, text
        # Dovecot logged both failures (and, before them, no login)
        await self.log_lines("auth failed", f"user=<{user[0]}>", count=2)
        assert self.login_lines(user[0]) == []

    @deferred_test
    async def test_untrusted_certificate_is_deferred_and_nothing_is_sent(self):
        user = self.user()
        for url in (f"imap://{user[0]}:{user[1]}@127.0.0.1:{self.server.port}/",
                    f"imaps://{user[0]}:{user[1]}@127.0.0.1:{self.server.imaps_port}/"):
            e = await self.refused(url)  # the platform's CAs do not know the test CA
            assert (e.status, e.reply.code, e.reply.enhanced_status) == ("deferred", 454,
                                                                         "4.7.5"), url
            assert "certificate not verified" in e.reply.text
        assert await self.fetch(user) == []

    @deferred_test
    async def test_by_name_and_a_certificate_for_another_name(self):
        user = self.user()
        # by name: the certificate names localhost
        url = self.url(user).replace("@127.0.0.1:", "@localhost:")
        assert (await get_delivery(url).send("a@origin.test", "b@dest.test", MSG)).all_delivered
        other = DovecotServer(USERS, names=("imap.test",))
        await threads.deferToThread(other.start)
        self.addCleanup(threads.deferToThread, other.stop)
        for url in (f"imap://{user[0]}:{user[1]}@127.0.0.1:{other.port}/",
                    f"imaps://{user[0]}:{user[1]}@127.0.0.1:{other.imaps_port}/"):
            e = await self.refused(f"{url}?cafile={other.cafile}")
            assert (e.status, e.reply.enhanced_status) == ("deferred", "4.7.5")
            assert "imap.test" in e.reply.text and "127.0.0.1" in e.reply.text

    @deferred_test
    async def test_nothing_listening_is_deferred(self):
        e = await self.refused(f"imap://u:p@127.0.0.1:{free_port()}/?tls=none&timeout=5")
        assert (e.status, e.reply.enhanced_status) == ("deferred", "4.4.1")

    @deferred_test
    async def test_many_messages_at_once_each_arrives_once(self):
        user = self.user()
        delivery = get_delivery(self.url(user))
        bodies = [MSG.replace(b"imap-1@", f"many-{n}@".encode()) for n in range(12)]
        reports = await defer.gatherResults(
            [delivery.send("ann@origin.test", "bob@dest.test", b) for b in bodies],
            consumeErrors=True)
        assert all(r.all_delivered for r in reports)
        stored = sorted(m[0] for m in await self.fetch(user))
        assert stored == sorted(bodies)

