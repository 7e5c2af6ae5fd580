"""Tests proving the loopback peers and the test helpers work."""

from __future__ import annotations

import os
import smtplib
import socket
import ssl as stdlib_ssl
import tempfile
import time

import pytest
from tests.support.peers import (
    AiosmtpdSink,
    DnsServerProcess,
    free_port,
    parse_smtp_sink_dump,
    PemContextFactory,
)
from twisted.internet import defer, reactor, task, threads
from twisted.names import client, dns, error
from twisted.trial import unittest

from tests.support.wait import wait_for
from twisted_mailout.testing import loopback

ZONE = {
    "ttl": 60,
    "authoritative_for": ["test"],
    "records": {
        "example.test": {
            "MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]],
            "A": ["127.0.0.1"],
        },
        "same.test": {"MX": [[10, "a.same.test"], [10, "b.same.test"]]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"], "ttl": 7},
        "alias.test": {"CNAME": "example.test"},
        "Chain.Test.": {"CNAME": "alias.test"},
        "nullmx.test": {"MX": [[0, "."]]},
        "broken.test": {"SERVFAIL": True},
        "slow.test": {"TIMEOUT": True},
        "deep.nonterminal.test": {"A": ["127.0.0.9"]},
        "txt.test": {"TXT": ["v=spf1 -all", ["two", "strings"]]},
    },
}

MESSAGE = (
    b"From: sender@example.org\r\n"
    b"To: rcpt@example.test\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b"first line\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"
    b"8-bit: \xc3\xa9\r\n"
    b"last line\r\n"
)


def _smtplib_send(
    host: str,
    port: int,
    mail_from: str,
    rcpts: list[str],
    data: bytes,
    *,
    mail_options: tuple[str, ...] = ("BODY=8BITMIME",),
) -> dict:
    with smtplib.SMTP(host, port, local_hostname="client.example.org", timeout=10) as conn:
        return conn.sendmail(mail_from, rcpts, data, mail_options=list(mail_options))


# ------------------------------------------------------------------------------ DNS


class _DNSClientTests:
    """Query the loopback DNS server with twisted.names' client resolver."""

    timeout = 30
    port: int

    def resolver(self) -> client.Resolver:
        return client.Resolver(servers=[(self.interface, self.port)], reactor=reactor)

    interface = "127.0.0.1"
    factory: loopback.LoopbackDNSServerFactory | None = None

    @defer.inlineCallbacks
    def test_mx_ordered_records(self):
        answers, authority, additional = yield self.resolver().lookupMailExchange(
            "example.test", timeout=(2,)
        )
        got = [(a.payload.preference, str(a.payload.name), a.ttl) for a in answers]
        self.assertEqual(got, [(10, "mx1.example.test", 60), (20, "mx2.example.test", 60)])
        self.assertEqual((authority, additional), ([], []))

    @defer.inlineCallbacks
    def test_mx_two_records_same_preference(self):
        answers, _, _ = yield self.resolver().lookupMailExchange("same.test", timeout=(2,))
        got = sorted((a.payload.preference, str(a.payload.name)) for a in answers)
        self.assertEqual(got, [(10, "a.same.test"), (10, "b.same.test")])

    @defer.inlineCallbacks
    def test_nxdomain(self):
        with self.assertRaises(error.DNSNameError):
            yield self.resolver().lookupMailExchange("missing.test", timeout=(2,))

    @defer.inlineCallbacks
    def test_nodata(self):
        result = yield self.resolver().lookupIPV6Address("example.test", timeout=(2,))
        self.assertEqual(result, ([], [], []))

    @defer.inlineCallbacks
    def test_empty_non_terminal_is_nodata(self):
        result = yield self.resolver().lookupAddress("nonterminal.test", timeout=(2,))
        self.assertEqual(result, ([], [], []))

    @defer.inlineCallbacks
    def test_servfail(self):
        with self.assertRaises(error.DNSServerError):
            yield self.resolver().lookupMailExchange("broken.test", timeout=(2,))

    @defer.inlineCallbacks
    def test_refused_outside_authority(self):
        with self.assertRaises(error.DNSQueryRefusedError):
            yield self.resolver().lookupAddress("example.org", timeout=(2,))

    @defer.inlineCallbacks
    def test_timeout(self):
        started = time.monotonic()
        # client.Resolver reports an unanswered query as defer.TimeoutError.
        with self.assertRaises((defer.TimeoutError, error.DNSQueryTimeoutError)):
            yield self.resolver().lookupMailExchange("slow.test", timeout=(0.3,))
        self.assertLess(time.monotonic() - started, 5)

    @defer.inlineCallbacks
    def test_cname_followed(self):
        answers, _, _ = yield self.resolver().lookupMailExchange("alias.test", timeout=(2,))
        self.assertEqual(answers[0].type, dns.CNAME)
        self.assertEqual(str(answers[0].name), "alias.test")
        self.assertEqual(str(answers[0].payload.name), "example.test")
        mx = [(str(a.name), a.payload.preference, str(a.payload.name)) for a in answers[1:]]
        self.assertEqual(
            mx,
            [("example.test", 10, "mx1.example.test"), ("example.test", 20, "mx2.example.test")],
        )

    @defer.inlineCallbacks
    def test_cname_chain_and_cname_query(self):
        answers, _, _ = yield self.resolver().lookupAddress("chain.test", timeout=(2,))
        self.assertEqual([a.type for a in answers], [dns.CNAME, dns.CNAME, dns.A])
        self.assertEqual(answers[-1].payload.dottedQuad(), "127.0.0.1")
        answers, _, _ = yield self.resolver().lookupCanonicalName("alias.test", timeout=(2,))
        self.assertEqual([(a.type, str(a.payload.name)) for a in answers], [(5, "example.test")])

    @defer.inlineCallbacks
    def test_null_mx(self):
        answers, _, _ = yield self.resolver().lookupMailExchange("nullmx.test", timeout=(2,))
        self.assertEqual(len(answers), 1)
        self.assertEqual(answers[0].payload.preference, 0)
        self.assertEqual(answers[0].payload.name.name, b"")

    @defer.inlineCallbacks
    def test_aaaa_a_case_insensitive_and_ttl_override(self):
        answers, _, _ = yield self.resolver().lookupIPV6Address("MX1.Example.TEST", timeout=(2,))
        self.assertEqual([(a.payload._address, a.ttl) for a in answers], [("::1", 7)])
        answers, _, _ = yield self.resolver().lookupAddress("mx1.example.test", timeout=(2,))
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["127.0.0.2"])

    @defer.inlineCallbacks
    def test_txt(self):
        answers, _, _ = yield self.resolver().lookupText("txt.test", timeout=(2,))
        self.assertEqual(
            [a.payload.data for a in answers], [[b"v=spf1 -all"], [b"two", b"strings"]]
        )

    @defer.inlineCallbacks
    def test_tcp(self):
        resolver = self.resolver()
        try:
            message = yield resolver.queryTCP([dns.Query(b"example.test", dns.MX)], timeout=5)
        finally:
            # client.Resolver keeps its TCP connection open: close it, bounded wait.
            for proto in list(resolver.connections):
                proto.transport.loseConnection()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (
                resolver.connections or (self.factory is not None and self.factory.connections)
            ):
                yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(message.rCode, dns.OK)
        self.assertTrue(message.auth)
        self.assertEqual(sorted(a.payload.preference for a in message.answers), [10, 20])


class InProcessDNSServerTests(_DNSClientTests, unittest.TestCase):
    """The server started with loopback.start_dns_server in this process's reactor."""

    def setUp(self):
        udp, tcp, self.port = loopback.start_dns_server(ZONE, reactor)
        self.factory = tcp.factory
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)

    @defer.inlineCallbacks
    def test_query_log_and_dropped(self):
        with self.assertRaises(defer.TimeoutError):
            yield self.resolver().lookupAddress("slow.test", timeout=(0.2,))
        self.assertEqual(self.factory.queries, [("slow.test", dns.A)])
        self.assertEqual(self.factory.dropped, 1)


class InProcessIPv6DNSServerTests(_DNSClientTests, unittest.TestCase):
    """The in-process server listening on ::1."""

    interface = "::1"

    def setUp(self):
        try:
            udp, tcp, self.port = loopback.start_dns_server(ZONE, reactor, interface="::1")
        except Exception as exc:  # pragma: no cover - hosts without IPv6 loopback
            raise unittest.SkipTest(f"cannot listen on ::1: {exc}") from exc
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)


class SubprocessDNSServerTests(_DNSClientTests, unittest.TestCase):
    """The server run as ``python -m twisted_mailout.testing.loopback dns``
    (peers.DnsServerProcess)."""

    def setUp(self):
        self.server = DnsServerProcess(ZONE)
        self.port = self.server.start(timeout=10)
        self.addCleanup(self.server.stop)


class ZoneValidationTests(unittest.SynchronousTestCase):
    def test_bad_zones(self):
        for bad in (
            {"records": {"x.test": {"BOGUS": ["1"]}}},
            {"records": {"x.test": {"A": ["not-an-ip"]}}},
            {"records": {"x.test": {"AAAA": ["127.0.0.1"]}}},
            {"records": {"x.test": {"CNAME": "y.test", "A": ["127.0.0.1"]}}},
            {"records": {"x.test": {"MX": [["10", "mx.test"]]}}},
            {"records": {"x.test": {"A": ["127.0.0.1"]}, "X.TEST": {}}},
            {"ttl": -1},
            {"recods": {}},
        ):
            with self.assertRaises(ValueError, msg=repr(bad)):
                loopback.Zone(bad)

    def test_no_authority_means_nxdomain_everywhere(self):
        zone = loopback.Zone({"records": {"a.test": {"A": "127.0.0.1"}}})
        with self.assertRaises(loopback.ZoneNameError):
            zone.resolve(b"elsewhere.example", dns.A)
        answers, _, _ = zone.resolve("A.TEST.", dns.A)
        self.assertEqual(answers[0].payload.dottedQuad(), "127.0.0.1")

    def test_refuses_non_loopback_interface(self):
        with self.assertRaises(ValueError):
            loopback.start_dns_server(ZONE, reactor, interface="0.0.0.0")
        with self.assertRaises(ValueError):
            loopback.start_smtp_receiver(reactor, interface="192.0.2.1")


def _raw_query(port: int, name: bytes, qtype: int, tcp: bool = False) -> dns.Message | None:
    query = dns.Message(id=4242, recDes=1)
    query.queries = [dns.Query(name, qtype)]
    wire = query.toStr()
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(len(wire).to_bytes(2, "big") + wire)
            reply = b""
            while len(reply) < 2 or len(reply) < 2 + int.from_bytes(reply[:2], "big"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            reply = reply[2:]
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.sendto(wire, ("127.0.0.1", port))
            try:
                reply = sock.recv(65535)
            except TimeoutError:
                return None
    message = dns.Message()
    message.fromStr(reply)
    return message


def test_dns_server_fixture_udp_and_tcp(dns_server):
    port = dns_server(ZONE)
    for tcp in (False, True):
        mx = _raw_query(port, b"example.test", dns.MX, tcp=tcp)
        assert mx is not None and mx.rCode == dns.OK and mx.auth
        assert [a.payload.preference for a in mx.answers] == [10, 20]
        assert _raw_query(port, b"missing.test", dns.A, tcp=tcp).rCode == dns.ENAME
        nodata = _raw_query(port, b"example.test", dns.AAAA, tcp=tcp)
        assert (nodata.rCode, nodata.answers, nodata.auth) == (dns.OK, [], True)
        assert _raw_query(port, b"broken.test", dns.MX, tcp=tcp).rCode == dns.ESERVER
        assert _raw_query(port, b"other.example", dns.A, tcp=tcp).rCode == dns.EREFUSED
    assert _raw_query(port, b"slow.test", dns.MX) is None


def test_dns_server_process_stops_cleanly_on_sigterm(tmp_path):
    server = DnsServerProcess(ZONE, workdir=tmp_path)
    port = server.start()
    assert (tmp_path / "dns.port").read_text() == f"{port}\n"
    assert server.stop() == 0
    assert "listening on 127.0.0.1" in (tmp_path / "dns.log").read_text()


def test_dns_server_process_reports_bad_zone(tmp_path):
    server = DnsServerProcess({"records": {"x.test": {"A": ["nope"]}}}, workdir=tmp_path)
    with pytest.raises(RuntimeError, match="bad A record"):
        server.start()


# ------------------------------------------------------------------------ helpers


def test_free_port_and_wait_for():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert wait_for(lambda: 42, timeout=1) == 42
    started = time.monotonic()
    with pytest.raises(TimeoutError,
                       match=r"after 0\.2 s waiting for the answer \(last value: None\)"):
        wait_for(lambda: None, timeout=0.2, what="the answer")
    assert time.monotonic() - started < 2
    with pytest.raises(TimeoutError,
                       match=r"waiting for the log line .*\nthe log at the deadline$"):
        wait_for(lambda: "", timeout=0.05, what="the log line",
                 detail=lambda: "the log at the deadline")


# ----------------------------------------------------------------------- aiosmtpd


def test_aiosmtpd_sink_records_unstuffed_bytes(aiosmtpd_sink):
    sink = aiosmtpd_sink()
    refused = _smtplib_send(
        "127.0.0.1", sink.port, "sender@example.org", ["a@example.test", "b@example.test"], MESSAGE
    )
    assert refused == {}
    (msg,) = sink.wait_for_messages(1)
    assert msg["mail_from"] == "sender@example.org"
    assert msg["rcpt_tos"] == ["a@example.test", "b@example.test"]
    assert msg["data"] == MESSAGE
    assert "BODY=8BITMIME" in msg["mail_options"]
    assert msg["helo"] == "client.example.org"


def test_aiosmtpd_sink_rcpt_reply_and_data_reply(aiosmtpd_sink):
    sink = aiosmtpd_sink(
        rcpt_reply=lambda rcpt: "550 5.1.1 No such user" if rcpt.startswith("bad") else None
    )
    refused = _smtplib_send(
        "127.0.0.1", sink.port, "", ["bad@example.test", "good@example.test"], MESSAGE
    )
    assert refused == {"bad@example.test": (550, b"5.1.1 No such user")}
    (msg,) = sink.wait_for_messages(1)
    assert (msg["mail_from"], msg["rcpt_tos"]) == ("", ["good@example.test"])
    assert sink.refused == [{"rcpt": "bad@example.test", "reply": "550 5.1.1 No such user"}]

    sink.data_reply = lambda record: "451 4.3.0 Try again later"
    with pytest.raises(smtplib.SMTPDataError) as info:
        _smtplib_send("127.0.0.1", sink.port, "s@example.org", ["good@example.test"], MESSAGE)
    assert info.value.smtp_code == 451
    assert len(sink.messages) == 1


def test_aiosmtpd_sink_greeting_reply_and_close(aiosmtpd_sink):
    sink = aiosmtpd_sink(greeting_reply="421 4.3.2 busy")
    with pytest.raises(smtplib.SMTPConnectError) as info:
        smtplib.SMTP("127.0.0.1", sink.port, timeout=5)
    assert info.value.smtp_code == 421
    sink.greeting_reply = None
    sink.close_on_connect = True
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtplib.SMTP("127.0.0.1", sink.port, timeout=5)
    assert sink.messages == []


def test_aiosmtpd_sink_counts_a_session_until_the_client_is_gone(aiosmtpd_sink):
    """open_sessions counts a connection from accept until aiosmtpd is done
    with it; wait_idle returns once a client that left without QUIT is
    finished with, and its message is then recorded."""
    sink = aiosmtpd_sink()
    sink.wait_idle(timeout=10)  # the controller's own start-up probe
    with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as conn:
        replies = conn.makefile("rb")
        assert replies.readline().startswith(b"220")
        assert sink.open_sessions == 1
        conn.sendall(b"HELO client.test\r\nMAIL FROM:<s@example.org>\r\n"
                     b"RCPT TO:<r@example.test>\r\nDATA\r\n")
        assert [replies.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        conn.sendall(b"Subject: left without QUIT\r\n\r\nbody\r\n.\r\n")
        assert replies.readline().startswith(b"250")
        replies.close()
    [msg] = sink.wait_idle(timeout=10)
    assert sink.open_sessions == 0
    assert msg["data"] == b"Subject: left without QUIT\r\n\r\nbody\r\n"


def test_aiosmtpd_sink_ipv6():
    try:
        free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with AiosmtpdSink(hostname="::1") as sink:
        _smtplib_send("::1", sink.port, "s@example.org", ["r@example.test"], MESSAGE)
        assert sink.wait_for_messages(1)[0]["data"] == MESSAGE


# ---------------------------------------------------------------------- smtp-sink


def test_smtp_sink_records_unstuffed_bytes(smtp_sink, monkeypatch):
    sink = smtp_sink()
    refused = _smtplib_send(
        "127.0.0.1", sink.port, "sender@example.org", ["a@example.test", "b@example.test"], MESSAGE
    )
    assert refused == {}
    (msg,) = sink.wait_for_messages(1)
    assert msg["mail_from"] == "sender@example.org"
    assert msg["rcpt_tos"] == ["a@example.test", "b@example.test"]
    assert msg["data"] == MESSAGE
    assert msg["mail_args"] == "<sender@example.org> BODY=8BITMIME"
    assert msg["client_addr"] == "127.0.0.1"
    assert msg["client_proto"] == "ESMTP"
    assert msg["helo"] == "client.example.org"

    _smtplib_send("127.0.0.1", sink.port, "", ["c@example.test"], b"", mail_options=())
    second = sink.wait_for_messages(2)[1]
    # smtplib terminates an empty message with CRLF before the final dot
    assert (second["mail_from"], second["rcpt_tos"], second["data"]) == (
        "",
        ["c@example.test"],
        b"\r\n",
    )
    # the completeness heuristic used when /proc/PID/fd is unreadable agrees
    checked = sink.messages()
    monkeypatch.setattr(sink, "_open_files", lambda: None)
    assert sink.messages() == checked
    sink.clear()
    assert sink.messages() == []


def test_smtp_sink_extra_args_soft_reject_rcpt(smtp_sink):
    sink = smtp_sink(extra_args=["-r", "RCPT"])
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        _smtplib_send("127.0.0.1", sink.port, "s@example.org", ["r@example.test"], MESSAGE)
    assert info.value.recipients["r@example.test"][0] == 450


def test_smtp_sink_ipv6(smtp_sink):
    try:
        free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    sink = smtp_sink(host="::1")
    _smtplib_send("::1", sink.port, "s@example.org", ["r@example.test"], MESSAGE)
    (msg,) = sink.wait_for_messages(1)
    assert msg["data"] == MESSAGE
    assert msg["client_addr"] == "ipv6:::1"


def test_parse_smtp_sink_dump_rejects_garbage():
    with pytest.raises(ValueError):
        parse_smtp_sink_dump(b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\n")
    with pytest.raises(ValueError):
        parse_smtp_sink_dump(b"hello\n")


# ------------------------------------------------------------- Twisted receiver


class TwistedReceiverTests(unittest.TestCase):
    timeout = 30
    interface = "127.0.0.1"

    def start(self, **kwargs):
        try:
            port, receiver = loopback.start_smtp_receiver(
                reactor, interface=self.interface, **kwargs
            )
        except Exception as exc:
            raise unittest.SkipTest(f"cannot listen on {self.interface}: {exc}") from exc
        self.addCleanup(port.stopListening)
        return port.getHost().port, receiver

    def send(self, port, mail_from, rcpts, data, **kwargs):
        return threads.deferToThread(
            _smtplib_send, self.interface, port, mail_from, rcpts, data, **kwargs
        )

    @defer.inlineCallbacks
    def test_records_unstuffed_bytes_once_per_transaction(self):
        port, receiver = self.start(name="mx.example.test")
        refused = yield self.send(
            port, "sender@example.org", ["a@example.test", "b@example.test"], MESSAGE
        )
        self.assertEqual(refused, {})
        self.assertEqual(
            receiver.messages,
            [
                {
                    "mail_from": "sender@example.org",
                    "rcpt_tos": ["a@example.test", "b@example.test"],
                    "data": MESSAGE,
                }
            ],
        )
        self.assertEqual(receiver.connections, 1)

    @defer.inlineCallbacks
    def test_headerless_and_empty_bodies_kept_as_sent(self):
        port, receiver = self.start()
        body = b"no header here\r\n\r\n.dot\r\n"
        yield self.send(port, "", ["r@example.test"], body, mail_options=())
        yield self.send(port, "s@example.org", ["r@example.test"], b"")
        # smtplib terminates an empty message with CRLF before the final dot
        self.assertEqual([m["data"] for m in receiver.messages], [body, b"\r\n"])
        self.assertEqual(receiver.messages[0]["mail_from"], "")

    @defer.inlineCallbacks
    def test_policy_refuses_with_given_codes(self):
        replies = {
            "gone@example.test": (550, "5.1.1 No such user"),
            "later@example.test": (451, "4.3.0 Try again later"),
        }
        port, receiver = self.start(policy=replies.get)
        refused = yield self.send(
            port,
            "s@example.org",
            ["gone@example.test", "later@example.test", "ok@example.test"],
            MESSAGE,
        )
        self.assertEqual(
            refused,
            {
                "gone@example.test": (550, b"5.1.1 No such user"),
                "later@example.test": (451, b"4.3.0 Try again later"),
            },
        )
        self.assertEqual(receiver.messages[0]["rcpt_tos"], ["ok@example.test"])
        self.assertEqual([r["code"] for r in receiver.refused], [550, 451])

    @defer.inlineCallbacks
    def test_when_messages(self):
        port, receiver = self.start()
        waiter = receiver.when_messages(1)
        waiter.addTimeout(10, reactor)
        yield self.send(port, "s@example.org", ["r@example.test"], MESSAGE)
        messages = yield waiter
        self.assertEqual(messages[0]["data"], MESSAGE)

    @defer.inlineCallbacks
    def test_starttls(self):
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        cert = ca.issue_cert("mx.example.test", self.interface)
        # not self.mktemp(): under pytest it creates directories in the current directory
        tmpdir = tempfile.TemporaryDirectory(prefix="test-peers-tls-")
        self.addCleanup(tmpdir.cleanup)
        pem_path = os.path.join(tmpdir.name, "mx.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(pem_path)
        options = PemContextFactory(pem_path)
        port, receiver = self.start(tls_context_factory=options)

        def send_over_tls():
            context = stdlib_ssl.create_default_context()
            ca.configure_trust(context)
            with smtplib.SMTP(self.interface, port, timeout=10) as conn:
                conn.ehlo("client.example.org")
                assert conn.has_extn("starttls")
                conn.starttls(context=context)
                conn.ehlo("client.example.org")
                assert not conn.has_extn("starttls")
                conn.sendmail("s@example.org", ["r@example.test"], MESSAGE)

        yield threads.deferToThread(send_over_tls)
        self.assertEqual(receiver.messages[0]["data"], MESSAGE)


class TwistedReceiverIPv6Tests(TwistedReceiverTests):
    interface = "::1"
