"""imap:// and imaps:// without Dovecot: the URL, the flags, and the mapping
of a server's replies (NO with RFC 5530 codes, BAD, BYE, silence, a missing
STARTTLS) to deferred and bounced results, against a scripted IMAP server on loopback in
this reactor. The real server is tests/integration/test_imap_dovecot.py."""

from __future__ import annotations

import re

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.protocols import basic
from twisted.trial import unittest

from tests.support.peers import free_port
from tests.support.trial import deferred_test
from twisted_mailout.apps.deliveries import get_delivery, parse_url
from twisted_mailout.apps.imap import IMAPDelivery, _internal_date, parse_flags
from twisted_mailout.outcome import RecipientResult

MSG = (b"From: a@origin.test\r\nTo: b@dest.test\r\nMessage-ID: <imap-unit@test>\r\n"
       b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nSubject: unit\r\n\r\nbody\r\n")


# -- the URL --------------------------------------------------------------------


def test_imap_url_arguments():
    kw = parse_url("imap://us%40er:p%40ss%3Aw@mail.example/Archive/2026"
                   "?flags=%5CSeen+%5Cflagged&flags=$Forwarded&tls=encrypt&timeout=5&create=yes")
    assert kw == {"scheme": "imap", "host": "mail.example", "port": None,
                  "implicit_tls": False, "folder": "Archive/2026",
                  "auth": ("us@er", "p@ss:w"),
                  "flags": ("\\Seen", "\\Flagged", "$Forwarded"), "tls": "encrypt",
                  "timeout": 5.0, "create": True}
    d = get_delivery("imap://u:s3cret@mail.example/Archive/2026?flags=%5CSeen&create=yes")
    assert isinstance(d, IMAPDelivery)
    assert (d.host, d.port, d.folder, d.tls, d.flags, d.username) == (
        "mail.example", 143, "Archive/2026", "verify", ("\\Seen",), "u")
    assert d.url() == ("imap://u:***@mail.example:143/Archive/2026?tls=verify"
                       "&flags=%5CSeen&create=yes")
    for text in (repr(d), str(d), d.url(), repr(vars(d).get("host"))):
        assert "s3cret" not in text


def test_imaps_url_defaults():
    d = get_delivery("imaps://u:pw@[::1]")
    assert (d.scheme, d.host, d.port, d.folder, d.tls, d.implicit_tls) == (
        "imaps", "::1", 993, "INBOX", "verify", True)
    assert d.url() == "imaps://u:***@[::1]:993/INBOX?tls=verify"
    assert get_delivery("imap://h/%E2%9C%93").folder == "\u2713"


def test_a_user_without_password_needs_one_from_the_configuration():
    with pytest.raises(ValueError, match="password"):
        get_delivery("imap://user@h/")
    d = get_delivery({"url": "imap://user@h/", "auth": ("user", "pw")})
    assert d.username == "user"


@pytest.mark.parametrize("url,words", [
    ("imap:///INBOX", "needs a host"),
    ("imap://u:s3cret@h/?tls=dane", "tls must be one of"),
    ("imaps://u:s3cret@h/?tls=may", "tls must be one of"),
    ("imap://u:s3cret@h/?flags=%5CRecent", "unknown IMAP system flag"),
    ("imap://u:s3cret@h/?flags=a(b", "not an IMAP keyword"),
    ("imap://u:s3cret@h/?timeout=0", "positive"),
    ("imap://u:s3cret@h/?timeout=x", "positive"),
    ("imap://u:s3cret@h/?create=maybe", "yes or no"),
    ("imap://u:s3cret@h/?cafile=", "needs a path"),
    ("imap://u:s3cret@h/?tls=none&tls=may", "2 times"),
    ("imap://u:s3cret@h/?folder=x", "unknown parameter"),
    ("imap://u:s3cret@h:99999/", "Port out of range"),
    ("imap://u:s3cret@h/#x", "fragment"),
])
def test_bad_imap_urls(url, words):
    with pytest.raises(ValueError, match=words) as info:
        get_delivery(url)
    assert "s3cret" not in str(info.value)


def test_constructor_checks():
    with pytest.raises(ValueError, match="auth must be"):
        IMAPDelivery("h", auth="u:p")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="imaps:// is TLS"):
        IMAPDelivery("h", implicit_tls=True, tls="none")
    with pytest.raises(ValueError, match="port"):
        IMAPDelivery("h", port=0)
    with pytest.raises(ValueError, match="folder"):
        IMAPDelivery("h", folder="a\r\nb")
    with pytest.raises(OSError):
        IMAPDelivery("h", cafile="/nonexistent/ca.pem")


def test_flags_and_internal_date():
    assert parse_flags(["\\SEEN,\\draft", " $Label1  \\Seen"]) == ("\\Seen", "\\Draft",
                                                                  "$Label1")
    with pytest.raises(ValueError):
        parse_flags("caf\u00e9")
    assert _internal_date(MSG) == "23-Nov-2026 10:00:00 +0100"
    assert _internal_date(b"Subject: x\r\n\r\n") is None
    assert _internal_date(b"Date: garbage\r\n\r\n") is None


# -- a scripted server ----------------------------------------------------------


class Scripted(basic.LineReceiver):
    """An IMAP server that says what its factory's script says.

    script keys: greeting (line), login (tagged reply text after the tag),
    append (list of replies, one per APPEND), create (reply), silent (say
    nothing at all)."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.factory.connected.callback(self)
        script = self.factory.script
        self.appended: list[bytes] = []
        if not script.get("silent"):
            self.sendLine(script.get("greeting",
                                     b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready"))

    def lineReceived(self, line: bytes) -> None:
        script = self.factory.script
        self.factory.lines.append(line)
        tag, _, rest = line.partition(b" ")
        command = rest.split(b" ", 1)[0].upper()
        if command == script.get("hang"):
            self.factory.heard.callback(line)  # and no answer
        elif command == b"CAPABILITY":
            self.sendLine(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN")
            self.sendLine(tag + b" OK done")
        elif command == b"AUTHENTICATE":
            self.pending = tag
            self.sendLine(b"+ ")
        elif command == b"LOGIN":
            self.sendLine(tag + b" " + script.get("login", b"OK logged in"))
        elif command == b"APPEND":
            size = int(re.search(rb"\{(\d+)\}$", rest).group(1))
            self.pending, self.size = tag, size
            self.sendLine(b"+ go on")
            self.setRawMode()
        elif command == b"CREATE":
            self.sendLine(tag + b" " + script.get("create", b"OK created"))
        elif command == b"LOGOUT":
            self.sendLine(b"* BYE bye")
            self.sendLine(tag + b" OK bye")
            self.transport.loseConnection()
        elif getattr(self, "pending", None) is not None:  # the AUTHENTICATE response
            tag, self.pending = self.pending, None
            self.sendLine(tag + b" " + script.get("login", b"OK logged in"))
        else:
            self.sendLine(tag + b" BAD what?")

    def rawDataReceived(self, data: bytes) -> None:
        self.buffer = getattr(self, "buffer", b"") + data
        if len(self.buffer) >= self.size + 2:
            body, rest = self.buffer[:self.size], self.buffer[self.size + 2:]
            self.buffer = b""
            self.appended.append(body)
            replies = self.factory.script.get("append", [b"OK [APPENDUID 7 42] done"])
            reply = replies[min(len(self.factory.appends), len(replies) - 1)]
            self.factory.appends.append(body)
            self.sendLine(self.pending + b" " + reply)
            self.setLineMode(rest)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.lost.append(reason)
        waiters, self.factory.waiters = self.factory.waiters, []
        for d in waiters:
            d.callback(None)


class ScriptedFactory(protocol.Factory):
    protocol = Scripted

    def __init__(self, script: dict) -> None:
        self.script = script
        self.connections: list[Scripted] = []
        self.lines: list[bytes] = []
        self.appends: list[bytes] = []
        self.lost: list[object] = []
        self.waiters: list[defer.Deferred] = []
        self.connected: defer.Deferred = defer.Deferred()  # fires at the first connection
        self.heard: defer.Deferred = defer.Deferred()  # fires with the line of "hang"

    def closed(self) -> defer.Deferred:
        """Fires when the next connection is lost (at once if one was)."""
        if self.lost:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self.waiters.append(d)
        return d


class ScriptedServerTests(unittest.TestCase):
    timeout = 30

    def serve(self, **script: object) -> tuple[ScriptedFactory, int]:
        factory = ScriptedFactory(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    def delivery(self, port: int, query: str = "tls=none", user: str = "u:pw@") -> IMAPDelivery:
        return get_delivery(f"imap://{user}127.0.0.1:{port}/Box?{query}")

    async def refused(self, delivery: IMAPDelivery) -> RecipientResult:
        """The one result every recipient got; it must not be delivered."""
        report = await delivery.send("a@origin.test", ["b@dest.test", "c@dest.test"], MSG)
        assert [r.recipient for r in report] == ["b@dest.test", "c@dest.test"]
        first = report.results[0]
        assert first.status != "delivered", first
        assert all((r.status, r.code, r.text, r.local, r.relay) == (
            first.status, first.code, first.text, first.local, first.relay) for r in report)
        return first

    @deferred_test
    async def test_append_with_flags_date_and_uid(self):
        factory, port = self.serve()
        report = await self.delivery(port, "tls=none&flags=%5CSeen+$Sent").send(
            "a@origin.test", ["b@dest.test", "c@dest.test"], MSG.replace(b"\r\n", b"\n"))
        assert [(r.recipient, r.status, r.code) for r in report] == [
            ("b@dest.test", "delivered", 250), ("c@dest.test", "delivered", 250)]
        assert report["b@dest.test"].text == (
            f"2.0.0 appended to Box at 127.0.0.1:{port} (UIDVALIDITY 7 UID 42)")
        assert factory.appends == [MSG]  # LF made CRLF
        [append] = [x for x in factory.lines if b" APPEND " in x]
        assert append.split(b" ", 1)[1] == (
            b'APPEND Box (\\Seen $Sent) "23-Nov-2026 10:00:00 +0100" {%d}' % len(MSG))
        assert any(b"AUTHENTICATE PLAIN" in x for x in factory.lines)
        assert any(x.endswith(b" LOGOUT") for x in factory.lines)
        await factory.closed()

    @deferred_test
    async def test_login_when_plain_is_not_offered_and_quoting(self):
        factory, port = self.serve(greeting=b"* OK [CAPABILITY IMAP4rev1] hi")
        factory.script["login"] = b"OK in"

        delivery = get_delivery({"url": f"imap://127.0.0.1:{port}/?tls=none",
                                 "auth": ('us"er', "p\\w")})
        await delivery.send("a@origin.test", "b@dest.test", MSG)
        [login] = [x for x in factory.lines if b" LOGIN " in x]
        assert login.split(b" ", 1)[1] == b'LOGIN "us\\"er" "p\\\\w"'

    @deferred_test
    async def test_authentication_refused_is_deferred_and_hides_the_password(self):
        factory, port = self.serve(login=b"NO [AUTHENTICATIONFAILED] Authentication failed.")
        e = await self.refused(self.delivery(port, user="us:s3cret@"))
        assert (e.status, e.reply.code) == ("deferred", 454)
        assert e.reply.text.startswith("4.7.8 IMAP authentication as us failed")
        assert (e.local, e.relay) == (False, f"127.0.0.1:{port}")  # the server said it
        assert "s3cret" not in str(e) and "s3cret" not in repr(e)
        assert factory.appends == []

    @deferred_test
    async def test_login_disabled_without_plain(self):
        _, port = self.serve(greeting=b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] hi")
        e = await self.refused(self.delivery(port))
        assert (e.status, e.reply.code) == ("deferred", 454)
        assert "LOGINDISABLED" not in e.reply.text and "disables LOGIN" in e.reply.text

    @deferred_test
    async def test_append_replies_map_to_statuses(self):
        cases = [
            (b"NO [TRYCREATE] Mailbox doesn't exist: Box", "bounced", 550, "5.1.1"),
            (b"NO [OVERQUOTA] Quota exceeded", "deferred", 452, "4.2.2"),
            (b"NO [TOOBIG] too big", "bounced", 552, "5.3.4"),
            (b"NO [LIMIT] too many", "bounced", 552, "5.3.4"),
            (b"NO [NOPERM] not yours", "bounced", 550, "5.7.1"),
            (b"NO [CANNOT] no", "bounced", 554, "5.6.0"),
            (b"NO [PARSE] bad message", "bounced", 554, "5.6.0"),
            (b"NO [UNAVAILABLE] later", "deferred", 451, "4.3.0"),
            (b"NO something broke", "deferred", 451, "4.3.0"),
            (b"BAD Error in IMAP command APPEND", "bounced", 554, "5.5.2"),
        ]
        for reply, status, code, enhanced in cases:
            factory, port = self.serve(append=[reply])
            e = await self.refused(self.delivery(port))
            assert (e.status, e.reply.code, e.reply.enhanced_status) == (status, code,
                                                                         enhanced), reply
            assert reply.decode().split(" ", 1)[1] in e.reply.text
            await factory.closed()

    @deferred_test
    async def test_create_yes_creates_then_appends_again(self):
        factory, port = self.serve(append=[b"NO [TRYCREATE] no Box", b"OK done"])
        report = await self.delivery(port, "tls=none&create=yes").send(
            "a@origin.test", "b@dest.test", MSG)
        assert report.all_delivered
        assert report["b@dest.test"].text == f"2.0.0 appended to Box at 127.0.0.1:{port}"
        assert [x.split(b" ", 1)[1] for x in factory.lines if b" CREATE " in x] == [
            b"CREATE Box"]
        assert len(factory.appends) == 2

    @deferred_test
    async def test_create_refused_is_bounced_and_a_second_trycreate_too(self):
        _, port = self.serve(append=[b"NO [TRYCREATE] no Box"], create=b"NO [NOPERM] no")
        e = await self.refused(self.delivery(port, "tls=none&create=yes"))
        assert (e.status, e.reply.code, e.reply.enhanced_status) == ("bounced", 550, "5.2.0")
        _, port = self.serve(append=[b"NO [TRYCREATE] no Box"],
                             create=b"NO [ALREADYEXISTS] there")
        e = await self.refused(self.delivery(port, "tls=none&create=yes"))
        assert (e.status, e.reply.enhanced_status) == ("bounced", "5.1.1")

    @deferred_test
    async def test_starttls_required_but_not_offered(self):
        factory, port = self.serve()
        e = await self.refused(self.delivery(port, "tls=encrypt"))
        assert (e.status, e.reply.code, e.reply.enhanced_status) == ("deferred", 454, "4.7.0")
        assert "does not offer STARTTLS" in e.reply.text
        assert not any(b"AUTHENTICATE" in x or b"LOGIN" in x for x in factory.lines)
        await factory.closed()

    @deferred_test
    async def test_may_goes_on_without_starttls(self):
        factory, port = self.serve()
        report = await self.delivery(port, "tls=may").send("a@origin.test", "b@dest.test", MSG)
        assert report.all_delivered

    @deferred_test
    async def test_bye_greeting(self):
        _, port = self.serve(greeting=b"* BYE too many connections")
        e = await self.refused(self.delivery(port))
        assert (e.status, e.reply.code) == ("deferred", 421)
        assert "too many connections" in e.reply.text

    @deferred_test
    async def test_silent_server_times_out(self):
        factory, port = self.serve(silent=True)
        e = await self.refused(self.delivery(port, "tls=none&timeout=0.3"))
        assert (e.status, e.reply.code, e.reply.enhanced_status) == ("deferred", 451, "4.4.2")
        assert "did not answer" in e.reply.text
        assert (e.local, e.relay) == (True, None)
        await factory.closed()

    @deferred_test
    async def test_connection_refused(self):
        e = await self.refused(self.delivery(free_port()))
        assert (e.status, e.reply.enhanced_status) == ("deferred", "4.4.1")

    @deferred_test
    async def test_cancel_aborts_the_connection(self):
        factory, port = self.serve(hang=b"APPEND")
        d = self.delivery(port).send("a@origin.test", "b@dest.test", MSG)
        await factory.heard
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await factory.closed()

    @deferred_test
    async def test_bad_input_fails_the_deferred(self):
        from twisted_mailout import AddressError

        with pytest.raises(AddressError):
            await self.delivery(free_port()).send("a@origin.test", [], MSG)

