"""Every delivery against its real counterpart: a real queue folder, aiosmtpd
on loopback (direct SMTP), real files, Maildir and mbox read back with the
standard library's mailbox, Postfix's real sendmail(1) into a private
maildrop read back with postcat(1), and a fake sendmail for exit codes."""

from __future__ import annotations

import io
import mailbox
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest
from tests.support.peers import IN_CI, AiosmtpdSink
from twisted.internet import defer, threads
from twisted.trial import unittest

from twisted_mailout import AddressError, MessageError
from twisted_mailout.apps.deliveries import (
    ConsoleDelivery,
    DeliveryError,
    FileDelivery,
    MaildirDelivery,
    MboxDelivery,
    MemoryDelivery,
    NullDelivery,
    QueueDelivery,
    SendmailDelivery,
    SMTPDelivery,
    get_delivery,
    parse_url,
    sysexit_reply,
)
from twisted_mailout.queue.store import Queue

MSG = (b"From: a@origin.test\r\nTo: b@dest.test\r\nMessage-ID: <d@test>\r\n"
       b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nSubject: deliveries\r\n\r\n"
       b"From the start\r\n.dot line\r\nbody\r\n")


# -- configuration ------------------------------------------------------------

@pytest.mark.parametrize("url,cls,attrs", [
    ("queue:///PATH/q", QueueDelivery, {}),
    ("smtp://relay.example:587?tls=verify", SMTPDelivery,
     {"relay": "relay.example:587", "tls": "verify", "username": None}),
    ("smtp://relay.example", SMTPDelivery, {"relay": "relay.example:587", "tls": "may"}),
    ("smtp://[::1]:2525?tls=none&timeout=5", SMTPDelivery,
     {"relay": "[::1]:2525", "tls": "none", "timeout": 5.0}),
    ("smtps://relay.example", SMTPDelivery,
     {"relay": "smtps://relay.example:465", "tls": "verify", "scheme": "smtps"}),
    ("smtp://?resolver=127.0.0.1:5353&mx_port=2525", SMTPDelivery,
     {"relay": None, "resolver": "127.0.0.1:5353", "mx_port": 2525}),
    ("memory://", MemoryDelivery, {}),
    ("file:///PATH/f", FileDelivery, {}),
    ("console://", ConsoleDelivery, {"stream": None}),
    ("console://?stream=stderr", ConsoleDelivery, {"stream": sys.stderr}),
    ("null://", NullDelivery, {}),
    ("sendmail://", SendmailDelivery, {"command": "/usr/sbin/sendmail", "args": []}),
    ("sendmail:///opt/bin/sendmail?arg=-C&arg=/etc/pf&timeout=9", SendmailDelivery,
     {"command": "/opt/bin/sendmail", "args": ["-C", "/etc/pf"], "timeout": 9.0}),
    ("maildir:///PATH/Maildir", MaildirDelivery, {}),
    ("mbox:///PATH/mbox", MboxDelivery, {}),
])
def test_each_url_chooses_its_delivery(tmp_path, url, cls, attrs):
    d = get_delivery(url.replace("/PATH", str(tmp_path)))
    assert type(d) is cls
    for name, value in attrs.items():
        assert getattr(d, name) == value, name
    if "/PATH" in url:
        assert d.path == str(tmp_path) + url.split("/PATH", 1)[1]


def test_smtp_url_credentials_are_percent_decoded_and_never_shown():
    url = "smtp://us%40er:p%40ss%3Aw0rd%2F@relay.example:587?tls=verify&cafile=/ca.pem"
    kw = parse_url(url)
    assert kw["auth"] == ("us@er", "p@ss:w0rd/")
    assert kw["cafile"] == "/ca.pem"
    d = get_delivery(url)
    assert d.username == "us@er"
    for text in (repr(d), str(d), d.url(), repr(d.__dict__.get("relay"))):
        assert "p@ss" not in text and "p%40ss" not in text
    # errors name the URL without the password
    for bad in ("smtp://u:s3cret@relay.example?tls=bogus",
                "smtp://u:s3cret@relay.example?timeout=-1",
                "smtp://u:s3cret@relay.example?what=1",
                "smtp://u:s3cret@relay.example:99999"):
        with pytest.raises(ValueError) as e:
            get_delivery(bad)
        assert "s3cret" not in str(e.value) and "***" in str(e.value)


@pytest.mark.parametrize("bad,words", [
    ("queue://var/spool/mailout", "three slashes"),
    ("queue://", "absolute path"),
    ("ftp://x", "unknown delivery"),
    ("memory:///x", "no path"),
    ("file:///tmp/x?mode=1", "unknown parameter"),
    ("console://?stream=tty", "stdout or stderr"),
    ("smtps://", "needs a relay host"),
    ("sendmail://?timeout=abc", "number"),
    ("sendmail://?timeout=1&timeout=2", "2 times"),
    ("smtp://h#frag", "fragment"),
])
def test_bad_urls_are_refused_with_a_clear_error(bad, words):
    with pytest.raises(ValueError, match=words):
        get_delivery(bad)


def test_dict_configuration(tmp_path):
    d = get_delivery({"url": "sendmail://", "args": ["-C", "/x"], "timeout": 3})
    assert (d.args, d.timeout) == (["-C", "/x"], 3)
    d = get_delivery({"scheme": "file", "path": str(tmp_path)})
    assert isinstance(d, FileDelivery) and d.path == str(tmp_path)
    same = MemoryDelivery()
    assert get_delivery(same) is same
    with pytest.raises(ValueError, match="'url' or 'scheme'"):
        get_delivery({"path": "/x"})
    with pytest.raises(TypeError, match="file delivery"):
        get_delivery({"scheme": "file", "path": "/x", "colour": "red"})
    with pytest.raises(TypeError, match="URL, a dict or a Delivery"):
        get_delivery(42)
    with pytest.raises(ValueError, match="absolute path"):
        SendmailDelivery("sendmail")
    with pytest.raises(ValueError, match="tls must be one of"):
        SMTPDelivery("h:25", tls="maybe")
    with pytest.raises(ValueError, match="auth must be"):
        SMTPDelivery("h:25", auth="user:pw")


# -- queue -------------------------------------------------------------------

def test_queue_delivery_is_picked_up_by_the_daemon_queue(tmp_path):
    d = get_delivery(f"queue://{tmp_path}/q")
    qid = d.send("a@origin.test", ["b@dest.test", "c@dest.test"], MSG)
    q = Queue(str(tmp_path / "q"))
    assert q.incoming() == [f"new/{qid}"]
    entries, problems = q.pickup_all()
    assert problems == []
    [entry] = entries
    assert entry.qid == qid and entry.sender == "a@origin.test"
    assert [r.address for r in entry.recipients] == ["b@dest.test", "c@dest.test"]
    assert q.read_message(entry) == MSG


def test_queue_delivery_refuses_bad_input_and_writes_nothing(tmp_path):
    d = QueueDelivery(str(tmp_path))
    with pytest.raises(AddressError):
        d.send("a@origin.test", ["not an address"], MSG)
    with pytest.raises(AddressError):
        d.send("a@origin.test", [], MSG)
    with pytest.raises(MessageError):
        d.send("a@origin.test", ["b@dest.test"], b"  \r\n")
    assert os.listdir(tmp_path / "new") == [] and os.listdir(tmp_path / "tmp") == []


# -- memory, file, console, null ------------------------------------------

def test_memory_outbox_keeps_envelope_and_bytes():
    d = get_delivery("memory://")
    mid = d.send("a@origin.test", "b@dest.test", MSG)
    [m] = d.outbox
    assert (m.message_id, m.sender, m.recipients, m.data) == (mid, "a@origin.test",
                                                              ["b@dest.test"], MSG)
    assert m.message["Subject"] == "deliveries"
    d.clear()
    assert d.outbox == []


def test_file_delivery_writes_one_eml_per_message(tmp_path):
    d = get_delivery(f"file://{tmp_path}/out")
    ids = [d.send("a@origin.test", ["b@dest.test", "c@dest.test"], MSG) for _ in range(3)]
    assert len(set(ids)) == 3
    assert sorted(os.listdir(tmp_path / "out")) == sorted(i + ".eml" for i in ids)
    data = (tmp_path / "out" / (ids[0] + ".eml")).read_bytes()
    assert data == (b"Return-Path: <a@origin.test>\r\nX-Envelope-To: b@dest.test, "
                    b"c@dest.test\r\n" + MSG)
    assert d.paths() == [str(tmp_path / "out" / (i + ".eml")) for i in sorted(ids)]


def test_file_delivery_error_is_a_deferred_delivery_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    d = FileDelivery(str(blocker))
    with pytest.raises(DeliveryError) as e:
        d.send("a@origin.test", "b@dest.test", MSG)
    assert e.value.status == "deferred" and e.value.reply.code == 451
    assert e.value.recipients == ["b@dest.test"]


def test_console_delivery_writes_envelope_and_message():
    out = io.StringIO()
    mid = ConsoleDelivery(out).send("a@origin.test", ["b@dest.test"], MSG)
    text = out.getvalue()
    assert text.startswith(f"---------- {mid} from=<a@origin.test> to=b@dest.test\n")
    assert "Subject: deliveries\n\nFrom the start\n.dot line\nbody\n" in text
    assert text.endswith(f"---------- end of {mid}\n")


def test_null_delivery_validates_then_drops():
    d = NullDelivery()
    assert len(d.send("a@origin.test", ["b@dest.test"], MSG)) == 23
    with pytest.raises(AddressError):
        d.send("a@origin.test", ["b@"], MSG)


# -- Maildir and mbox, read back with the standard library ---------------------

def test_maildir_delivery_read_back_with_mailbox(tmp_path):
    path = str(tmp_path / "Maildir")
    d = get_delivery(f"maildir://{path}")
    d.send("a@origin.test", ["b@dest.test"], MSG)
    d.send("", ["b@dest.test"], MSG.replace(b"deliveries", b"second"))
    box = mailbox.Maildir(path, factory=None, create=False)
    msgs = sorted(box, key=lambda m: m["Subject"])
    assert [m["Subject"] for m in msgs] == ["deliveries", "second"]
    assert msgs[0]["Return-Path"] == "<a@origin.test>"
    assert msgs[1]["Return-Path"] == "<>"
    assert msgs[0].get_payload() == "From the start\n.dot line\nbody\n"
    assert stat.S_ISDIR(os.stat(os.path.join(path, "cur")).st_mode)


def test_mbox_delivery_read_back_with_mailbox(tmp_path):
    path = str(tmp_path / "mbox")
    d = get_delivery(f"mbox://{path}")
    d.send("a@origin.test", ["b@dest.test"], MSG)
    d.send("", ["b@dest.test"], MSG.replace(b"deliveries", b"second"))
    box = mailbox.mbox(path, create=False)
    msgs = list(box)
    assert [m["Subject"] for m in msgs] == ["deliveries", "second"]
    assert msgs[0].get_from().startswith("a@origin.test ")
    assert msgs[1].get_from().startswith("MAILER-DAEMON ")
    # a body line starting with "From " is quoted in the file, so the box
    # still has two messages; the envelope is in the header block
    raw = open(path, "rb").read()
    assert raw.count(b"\nFrom ") + raw.startswith(b"From ") == 2
    assert b"\n>From the start\n" in raw
    assert msgs[0]["X-Envelope-To"] == "b@dest.test"
    assert not os.path.exists(path + ".lock")  # the dot-lock was released


# -- sendmail(1) ---------------------------------------------------------------

@pytest.mark.parametrize("status,code,kind", [
    (0, 250, "delivered"), (64, 554, "bounced"), (65, 554, "bounced"),
    (67, 550, "bounced"), (68, 550, "bounced"), (77, 554, "bounced"),
    (69, 451, "deferred"), (70, 451, "deferred"), (71, 451, "deferred"),
    (74, 451, "deferred"), (75, 451, "deferred"), (78, 451, "deferred"),
    (1, 451, "deferred"), (-9, 451, "deferred"),
])
def test_sysexit_mapping(status, code, kind):
    reply = sysexit_reply(status, "sendmail: fatal: something\n")
    assert reply.code == code and reply.local
    got = "delivered" if reply.is_positive else ("bounced" if reply.is_permanent else "deferred")
    assert got == kind
    if status:
        assert reply.text.endswith(": sendmail: fatal: something")


FAKE = """\
#!{python}
import json, os, sys, time
data = sys.stdin.buffer.read()
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "data": data.decode("latin-1")}}) + "\\n")
status = int(os.environ.get("FAKE_STATUS", "0"))
if os.environ.get("FAKE_SLEEP"):
    time.sleep(float(os.environ["FAKE_SLEEP"]))
sys.stderr.write("fake: status %d\\n" % status)
sys.exit(status)
"""


@pytest.fixture
def fake_sendmail(tmp_path):
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "sendmail"
    script.write_text(FAKE.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)

    def calls():
        import json

        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return str(script), calls


def test_fake_sendmail_gets_argv_and_bytes(fake_sendmail):
    script, calls = fake_sendmail
    d = get_delivery(f"sendmail://{script}?arg=-Fbob")
    d.send("a@origin.test", ["b@dest.test", "-c@dest.test"], MSG)
    d.send("", ["b@dest.test"], MSG)
    first, second = calls()
    # recipients come after "--": one starting with "-" is not an option
    assert first["argv"] == ["-Fbob", "-oi", "-f", "a@origin.test", "--", "b@dest.test",
                             "-c@dest.test"]
    assert first["data"].encode("latin-1") == MSG
    assert second["argv"][:4] == ["-Fbob", "-oi", "-f", "<>"]


@pytest.mark.parametrize("status,kind,code", [
    (67, "bounced", 550), (65, "bounced", 554), (75, "deferred", 451), (70, "deferred", 451),
])
def test_fake_sendmail_exit_status_is_a_delivery_error(fake_sendmail, status, kind, code):
    script, _ = fake_sendmail
    d = SendmailDelivery(script, env={"FAKE_STATUS": str(status)})
    with pytest.raises(DeliveryError) as e:
        d.send("a@origin.test", ["b@dest.test"], MSG)
    assert (e.value.status, e.value.reply.code) == (kind, code)
    assert e.value.recipients == ["b@dest.test"]
    assert "fake: status" in e.value.reply.text


def test_sendmail_that_hangs_is_killed_and_deferred(fake_sendmail):
    script, _ = fake_sendmail
    d = SendmailDelivery(script, timeout=0.5, env={"FAKE_SLEEP": "30"})
    with pytest.raises(DeliveryError) as e:
        d.send("a@origin.test", ["b@dest.test"], MSG)
    assert e.value.status == "deferred" and "did not finish in 0.5 s" in str(e.value)


def test_missing_sendmail_command_is_deferred(tmp_path):
    d = SendmailDelivery(str(tmp_path / "nope"))
    with pytest.raises(DeliveryError, match="cannot run"):
        d.send("a@origin.test", ["b@dest.test"], MSG)


POSTFIX_SENDMAIL = "/usr/sbin/sendmail"
POSTCAT = "/usr/sbin/postcat"


def _require_postfix():
    import grp
    import pwd

    problems = []
    for tool in (POSTFIX_SENDMAIL, POSTCAT, "/usr/sbin/postdrop"):
        if not os.access(tool, os.X_OK):
            problems.append(f"{tool} missing")
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        problems.append("no postfix user or postdrop group")
    if os.geteuid() != 0:
        problems.append("not root (a private maildrop must be owned by postfix:postdrop)")
    if problems:
        msg = "Postfix's sendmail cannot be tested: " + "; ".join(problems)
        if IN_CI:
            pytest.fail(msg + " (CI=true: .ci/run installs postfix and runs as root)")
        pytest.skip(msg)


@pytest.fixture
def postfix_instance():
    """A private Postfix configuration whose queue is in a temporary folder:
    sendmail(1) runs postdrop(1), which writes the message into that
    queue's maildrop/; no Postfix daemon runs (the pickup service is absent,
    so the message stays there for postcat to read)."""
    _require_postfix()
    root = tempfile.mkdtemp(prefix="pfx-")
    conf, queue = os.path.join(root, "conf"), os.path.join(root, "queue")
    os.makedirs(conf)
    os.makedirs(os.path.join(queue, "maildrop"))
    with open(os.path.join(conf, "main.cf"), "w") as f:
        f.write(textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {queue}
            data_directory = {root}/data
            mail_owner = postfix
            setgid_group = postdrop
            myhostname = mailout.test
            mydomain = mailout.test
            inet_interfaces = loopback-only
            """))
    shutil.chown(os.path.join(queue, "maildrop"), "postfix", "postdrop")
    os.chmod(os.path.join(queue, "maildrop"), 0o1730)
    yield conf, os.path.join(queue, "maildrop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # a private Postfix instance
def test_postfix_sendmail_puts_the_message_in_maildrop(postfix_instance):
    conf, maildrop = postfix_instance
    d = get_delivery({"url": "sendmail:///usr/sbin/sendmail", "args": ["-C", conf],
                      "timeout": 30})
    d.send("a@origin.test", ["b@dest.test", "c@dest.test"], MSG)
    [qfile] = os.listdir(maildrop)
    out = subprocess.run([POSTCAT, "-c", conf, os.path.join(maildrop, qfile)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "sender: a@origin.test" in out
    assert "recipient: b@dest.test" in out and "recipient: c@dest.test" in out
    body = out.split("*** MESSAGE CONTENTS", 1)[1]
    assert "Subject: deliveries" in body
    assert "\n.dot line\nbody\n" in body  # -oi: a dot line does not end the message


@pytest.mark.slow  # Postfix's sendmail
def test_postfix_sendmail_with_a_broken_configuration_is_deferred(postfix_instance, tmp_path):
    d = SendmailDelivery(POSTFIX_SENDMAIL, args=["-C", str(tmp_path / "no-such-dir")],
                         timeout=30)
    with pytest.raises(DeliveryError) as e:
        d.send("a@origin.test", ["b@dest.test"], MSG)
    # Postfix exits with EX_TEMPFAIL (75) when it cannot read main.cf
    assert e.value.status == "deferred"
    assert "exited with 75 (EX_TEMPFAIL" in e.value.reply.text
    assert "main.cf" in e.value.reply.text


# -- direct SMTP, against aiosmtpd on loopback --------------------------------

class SMTPDeliveryTests(unittest.TestCase):
    timeout = 60

    def sink(self, **kw):
        s = AiosmtpdSink("127.0.0.1", **kw).start()
        self.addCleanup(lambda: threads.deferToThread(s.stop))
        return s

    @defer.inlineCallbacks
    def test_relay_url_delivers_and_reports_each_recipient(self):
        sink = self.sink(rcpt_reply=lambda r: "550 5.1.1 no such user"
                         if r.startswith("nobody@") else None)
        for tls in ("none", "may"):
            sink.clear()
            d = get_delivery(f"smtp://127.0.0.1:{sink.port}?tls={tls}&timeout=10")
            self.assertTrue(d.asynchronous)
            report = yield d.send("a@origin.test", ["b@dest.test", "nobody@dest.test"], MSG)
            self.assertEqual([(r.recipient, r.status, r.code) for r in report],
                             [("b@dest.test", "delivered", 250),
                              ("nobody@dest.test", "bounced", 550)])
            [m] = sink.messages
            self.assertEqual(m["data"], MSG)
            self.assertEqual(m["mail_from"], "a@origin.test")
            self.assertEqual(m["rcpt_tos"], ["b@dest.test"])

    @defer.inlineCallbacks
    def test_temporary_refusal_is_deferred(self):
        sink = self.sink(data_reply=lambda rec: "451 4.3.0 try later")
        d = SMTPDelivery(f"127.0.0.1:{sink.port}", tls="none", timeout=10)
        report = yield d.send("a@origin.test", ["b@dest.test"], MSG)
        self.assertEqual([(r.status, r.code) for r in report], [("deferred", 451)])
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_bad_input_fails_the_deferred(self):
        d = SMTPDelivery("127.0.0.1:1", tls="none", timeout=5)
        with self.assertRaises(AddressError):
            yield d.send("a@origin.test", ["not-an-address"], MSG)

    def test_send_blocking_refuses_the_reactor_thread(self):
        d = SMTPDelivery("127.0.0.1:1", tls="none", timeout=5)
        with self.assertRaises(RuntimeError) as e:
            d.send_blocking("a@origin.test", ["b@dest.test"], MSG)
        self.assertIn("reactor thread", str(e.exception))


# -- direct SMTP with AUTH over STARTTLS and smtps, configured by URL ------------

class SMTPAuthURLTests(unittest.TestCase):
    """The URL's user and password reach the relay (percent-decoded) over TLS,
    and the password is in no event, repr, report or log line."""

    timeout = 60
    relay_name = "smtp.relay.test"
    user = "app@relay.test"
    password = "p@ss:w/rd%20-never-logged"

    def setUp(self):
        from tests.support.tls_peers import TestPKI
        from twisted.internet import reactor
        from twisted.logger import globalLogPublisher

        from twisted_mailout.testing.loopback import start_dns_server

        self.tmp = tempfile.mkdtemp(prefix="deliveries-auth-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pki = TestPKI(self.tmp, rsa=False)
        udp, tcp, self.dns_port = start_dns_server(
            {"ttl": 300, "records": {self.relay_name: {"A": ["127.0.0.1"]}},
             "authoritative_for": ["test"]}, reactor)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def url(self, scheme, port):
        from urllib.parse import quote

        return (f"{scheme}://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
                f"@{self.relay_name}:{port}?tls=verify&cafile={self.pki.cafile}"
                f"&resolver=127.0.0.1:{self.dns_port}&timeout=10")

    @defer.inlineCallbacks
    def check(self, scheme, implicit):
        from tests.support.tls_peers import TlsSmtpServer
        from twisted.logger import formatEvent

        from twisted_mailout.apps.mailer import MailDelivered, Mailer

        server = TlsSmtpServer(self.pki.good(self.relay_name), implicit=implicit,
                               server_hostname=self.relay_name,
                               credentials={self.user: self.password}).start()
        self.addCleanup(lambda: threads.deferToThread(server.stop))
        events = []
        mailer = Mailer(self.url(scheme, server.port), observers=[events.append])
        report = yield mailer.send(MSG, recipients=["b@dest.test"])
        self.assertEqual([r.status for r in report], ["delivered"])
        [attempt] = server.auth_attempts
        self.assertEqual((attempt["user"], attempt["ok"]), (self.user, True))
        self.assertIsNotNone(attempt["tls"])
        [m] = server.messages
        self.assertTrue(m["authenticated"] and m["tls"])
        self.assertEqual(m["data"], MSG)
        self.assertEqual([type(e) for e in events], [MailDelivered])
        seen = (repr(mailer) + str(mailer.delivery) + repr(events) + repr(report)
                + "".join((formatEvent(e) or "") + repr(e) for e in self.logged))
        self.assertNotIn(self.password, seen)
        self.assertNotIn("never-logged", seen)

    def test_submission_with_starttls(self):
        return self.check("smtp", implicit=False)

    def test_smtps_implicit_tls(self):
        return self.check("smtps", implicit=True)


@pytest.mark.parametrize("url", ["memory://", "queue:///PATH/q"])
def test_generated_message_id_uses_the_a_label_of_an_idn_sender(tmp_path, url):
    d = get_delivery(url.replace("/PATH", str(tmp_path)))
    d.send("zoë@bücher.example", ["b@dest.test"], b"Subject: x\r\n\r\nbody\r\n")
    if isinstance(d, MemoryDelivery):
        data = d.outbox[0].data
    else:
        q = Queue(str(tmp_path / "q"))
        [entry], _ = q.pickup_all()
        assert entry.sender == "zoë@bücher.example"
        data = q.read_message(entry)
    assert data.split(b"\r\n\r\n")[0].isascii()
    assert b"@xn--bcher-kva.example>" in data
