"""Deterministic tests of ESMTPSession: a StringTransport, a Clock, and
server replies fed by hand through dataReceived."""

from __future__ import annotations

import gc
import io

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.replies import encode_reply
from twisted_mailout.smtp.protocol import (
    CHUNK,
    MAX_LINE,
    ESMTPSession,
    SessionError,
    Timeouts,
    TransactionResult,
)

HELO = "client.example"
EHLO = b"EHLO client.example\r\n"
BODY = b"Subject: test\r\n\r\nHello\r\n.leading dot\r\n"
WIRE_BODY = b"Subject: test\r\n\r\nHello\r\n..leading dot\r\n.\r\n"


class FakeTransport(StringTransport):
    """A StringTransport that records each write and each startTLS call."""

    def __init__(self):
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.25", 25))
        self.writes: list[bytes] = []
        self.tls_starts: list = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def startTLS(self, creator):
        self.tls_starts.append(creator)

    def clear(self):
        super().clear()
        self.writes = []


class ReadRecorder(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.sizes: list = []

    def read(self, size=-1):
        self.sizes.append(size)
        return super().read(size)


def ehlo_reply(*extensions: str, name: str = "mx.example") -> bytes:
    return encode_reply(250, "\n".join([name, *extensions]))


class SessionTestBase(unittest.TestCase):
    def make(self, tls="none", timeouts=None, pipelining=True, hostname="mx.example"):
        self.clock = Clock()
        self.session = ESMTPSession(
            HELO, self.clock, tls=tls, tls_creator=lambda h: ("creator-for", h),
            hostname=hostname, timeouts=timeouts, pipelining=pipelining)
        self.transport = FakeTransport()
        self.session.makeConnection(self.transport)
        return self.session, self.transport

    def feed(self, data: bytes):
        self.session.dataReceived(data)

    def take(self) -> bytes:
        """What the client wrote since the last take(), then clear."""
        v = self.transport.value()
        self.transport.clear()
        return v

    def start(self, *extensions, tls="none", **kw):
        """A ready session whose server advertised C{extensions}."""
        s, t = self.make(tls=tls, **kw)
        self.feed(b"220 mx.example ESMTP\r\n")
        self.assertEqual(self.take(), EHLO)
        self.feed(ehlo_reply(*extensions))
        self.assertIs(self.successResultOf(s.ready), s)
        self.transport.clear()
        return s, t

    def pump_body(self, max_rounds=1000):
        """Drive the registered pull producer until it unregisters."""
        for _ in range(max_rounds):
            if self.transport.producer is None:
                return
            self.assertFalse(self.transport.streaming)
            self.transport.producer.resumeProducing()
        self.fail("the body producer did not finish")

    def ready_failure(self) -> SessionError:
        f = self.failureResultOf(self.session.ready, SessionError)
        return f.value

    def assertLocal4xx(self, reply: Reply):
        self.assertTrue(reply.local, reply)
        self.assertTrue(400 <= reply.code < 500, reply)


class GreetingTests(SessionTestBase):
    def test_ehlo_after_220_and_extensions_parsed(self):
        s, _ = self.make()
        self.assertEqual(self.take(), b"")  # nothing before the greeting
        self.feed(b"220 mx.example ESMTP ready\r\n")
        self.assertEqual(self.take(), EHLO)
        self.assertNoResult(s.ready)
        self.feed(b"250-mx.example greets client.example\r\n250-SIZE 35882577\r\n"
                  b"250-8bitmime\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
        self.assertIs(self.successResultOf(s.ready), s)
        self.assertEqual(s.extensions, {"SIZE": "35882577", "8BITMIME": "",
                                        "PIPELINING": "", "ENHANCEDSTATUSCODES": ""})
        self.assertEqual(s.greeting, Reply(220, "mx.example ESMTP ready"))
        self.assertTrue(s.usable)
        self.assertFalse(s.encrypted)
        self.assertEqual(self.take(), b"")
        self.assertFalse(self.transport.disconnecting)

    def test_greeting_421_fails_ready_with_that_code(self):
        s, _ = self.make()
        self.feed(b"421 4.3.2 too busy\r\n")
        self.assertNotIn(b"EHLO", self.transport.value())
        # The server hangs up right after its 421: the failure still carries
        # the 421 (not a local "connection closed").
        s.connectionLost(Failure(error.ConnectionDone()))
        e = self.ready_failure()
        self.assertEqual(e.reply.code, 421)
        self.assertFalse(e.reply.local)
        self.assertIn("too busy", e.reply.text)
        self.assertEqual(e.stage, "greeting")
        self.assertFalse(s.usable)

    def test_greeting_554_quits_and_fails_ready(self):
        s, _ = self.make()
        self.feed(b"554 5.7.1 go away\r\n")
        self.assertEqual(self.take(), b"QUIT\r\n")
        self.feed(b"221 bye\r\n")
        e = self.ready_failure()
        self.assertEqual(e.reply, Reply(554, "5.7.1 go away"))
        self.assertTrue(self.transport.disconnecting)

    def test_ehlo_502_falls_back_to_helo(self):
        s, _ = self.make()
        self.feed(b"220 old server\r\n")
        self.assertEqual(self.take(), EHLO)
        self.feed(b"502 5.5.1 command not implemented\r\n")
        self.assertEqual(self.take(), b"HELO client.example\r\n")
        self.assertNoResult(s.ready)
        self.feed(b"250 old server\r\n")
        self.assertIs(self.successResultOf(s.ready), s)
        self.assertEqual(s.extensions, {})

    def test_ehlo_and_helo_refused(self):
        s, _ = self.make()
        self.feed(b"220 x\r\n")
        self.take()
        self.feed(b"500 what\r\n")
        self.assertEqual(self.take(), b"HELO client.example\r\n")
        self.feed(b"550 not you\r\n")
        self.assertEqual(self.take(), b"QUIT\r\n")
        self.feed(b"221 bye\r\n")
        e = self.ready_failure()
        self.assertEqual(e.reply.code, 550)

    def test_closed_fires_on_connection_lost(self):
        s, _ = self.start()
        self.assertNoResult(s.closed)
        s.connectionLost(Failure(error.ConnectionDone()))
        self.successResultOf(s.closed)
        self.assertFalse(s.usable)


class TransactionTests(SessionTestBase):
    def test_sequential_transaction_with_mixed_recipients(self):
        s, _ = self.start("SIZE 1000000")
        d = s.transaction("from@a.example", ["ok@b.example", "no@b.example", "later@b.example"],
                          io.BytesIO(BODY))
        self.assertEqual(self.take(), b"MAIL FROM:<from@a.example>\r\n")
        self.feed(b"250 2.1.0 sender ok\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<ok@b.example>\r\n")
        self.feed(b"250 2.1.5 ok\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<no@b.example>\r\n")
        self.feed(b"550 5.1.1 no such user\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<later@b.example>\r\n")
        self.feed(b"451 4.7.1 greylisted\r\n")
        self.assertEqual(self.take(), b"DATA\r\n")
        self.assertIsNone(self.transport.producer)
        self.feed(b"354 go ahead\r\n")
        self.assertIsNotNone(self.transport.producer)
        self.pump_body()
        self.assertEqual(self.take(), WIRE_BODY)
        self.assertNoResult(d)
        self.feed(b"250 2.0.0 queued as ABC\r\n")
        result = self.successResultOf(d)
        self.assertIsInstance(result, TransactionResult)
        self.assertEqual(result.replies, {
            "ok@b.example": Reply(250, "2.0.0 queued as ABC"),
            "no@b.example": Reply(550, "5.1.1 no such user"),
            "later@b.example": Reply(451, "4.7.1 greylisted"),
        })
        self.assertTrue(result.session_usable)
        self.assertEqual(s.transactions, 1)

    def test_each_command_waits_for_previous_reply(self):
        s, _ = self.start()
        s.transaction("f@a.example", ["r1@b.example", "r2@b.example"], io.BytesIO(BODY))
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\n")
        # Without a reply nothing else goes out, however much time passes
        # (below the timeout).
        self.clock.advance(60)
        self.assertEqual(self.take(), b"")
        self.feed(b"250 ok\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<r1@b.example>\r\n")
        self.assertEqual(self.take(), b"")

    def test_all_refused_no_data_then_rset(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["x@b.example", "y@b.example"], io.BytesIO(BODY))
        self.take()
        self.feed(b"250 ok\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<x@b.example>\r\n")
        self.feed(b"550 no\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<y@b.example>\r\n")
        self.feed(b"450 later\r\n")
        result = self.successResultOf(d)
        self.assertEqual(self.take(), b"")  # no DATA
        self.assertIsNone(self.transport.producer)
        self.assertEqual(result.replies, {"x@b.example": Reply(550, "no"),
                                          "y@b.example": Reply(450, "later")})
        self.assertTrue(result.session_usable)
        # The next transaction starts with RSET.
        d2 = s.transaction("f@a.example", ["z@b.example"], io.BytesIO(b"x"))
        self.assertEqual(self.take(), b"RSET\r\n")
        self.feed(b"250 reset\r\n")
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\n")
        self.feed(b"250 ok\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<z@b.example>\r\n")
        self.feed(b"250 ok\r\n")
        self.assertEqual(self.take(), b"DATA\r\n")
        self.feed(b"354 go\r\n")
        self.pump_body()
        self.assertEqual(self.take(), b"x\r\n.\r\n")
        self.feed(b"250 done\r\n")
        self.assertEqual(self.successResultOf(d2).replies, {"z@b.example": Reply(250, "done")})
        # A successful transaction needs no RSET before the next one.
        s.transaction("f@a.example", ["z@b.example"], io.BytesIO(b"x"))
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\n")

    def test_mail_from_refused(self):
        s, _ = self.start()
        d = s.transaction("", ["a@b.example", "c@b.example"], io.BytesIO(BODY))
        self.assertEqual(self.take(), b"MAIL FROM:<>\r\n")
        self.feed(b"553 5.7.1 sender rejected\r\n")
        result = self.successResultOf(d)
        self.assertEqual(self.take(), b"")
        self.assertEqual(result.replies, {"a@b.example": Reply(553, "5.7.1 sender rejected"),
                                          "c@b.example": Reply(553, "5.7.1 sender rejected")})
        s.transaction("", ["a@b.example"], io.BytesIO(BODY))
        self.assertEqual(self.take(), b"RSET\r\n")

    def test_data_refused(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.take()
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.feed(b"451 4.3.0 try later\r\n")
        self.assertIsNone(self.transport.producer)
        result = self.successResultOf(d)
        self.assertEqual(result.replies, {"a@b.example": Reply(451, "4.3.0 try later")})

    def test_pipelining_one_write_replies_in_order(self):
        s, t = self.start("PIPELINING", "SIZE 5000")
        d = s.transaction("f@a.example", ["r1@b.example", "r2@b.example", "r3@b.example"],
                          io.BytesIO(BODY), size=len(BODY))
        self.assertEqual(t.writes, [
            f"MAIL FROM:<f@a.example> SIZE={len(BODY)}\r\n".encode()
            + b"RCPT TO:<r1@b.example>\r\nRCPT TO:<r2@b.example>\r\n"
            b"RCPT TO:<r3@b.example>\r\nDATA\r\n"])
        self.take()
        # Replies arrive piecemeal; each is matched to its command in order.
        self.feed(b"250 sender ok\r\n250 r1 ok\r\n550 r2 unknown\r\n")
        self.assertIsNone(t.producer)
        self.feed(b"251 r3 forwarded\r\n354 send\r\n")
        self.assertIsNotNone(t.producer)
        self.pump_body()
        self.assertEqual(self.take(), WIRE_BODY)
        self.feed(b"250 queued\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.replies, {"r1@b.example": Reply(250, "queued"),
                                          "r2@b.example": Reply(550, "r2 unknown"),
                                          "r3@b.example": Reply(250, "queued")})

    def test_pipelining_all_refused_data_554(self):
        s, t = self.start("PIPELINING")
        d = s.transaction("f@a.example", ["r1@b.example"], io.BytesIO(BODY))
        self.take()
        self.feed(b"250 ok\r\n550 nope\r\n554 no valid recipients\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.replies, {"r1@b.example": Reply(550, "nope")})
        self.assertIsNone(t.producer)
        self.assertEqual(self.take(), b"")
        s.transaction("f@a.example", ["r1@b.example"], io.BytesIO(BODY))
        self.assertTrue(self.take().startswith(b"RSET\r\n"))

    def test_pipelining_broken_server_354_after_refusals(self):
        # All recipients refused but DATA answered 354: never end it with a
        # lone dot (the server could accept an empty message): hang up.
        s, t = self.start("PIPELINING")
        d = s.transaction("f@a.example", ["r1@b.example"], io.BytesIO(BODY))
        self.take()
        self.feed(b"250 ok\r\n550 nope\r\n354 go\r\n")
        self.assertEqual(self.take(), b"")
        result = self.successResultOf(d)
        self.assertEqual(result.replies, {"r1@b.example": Reply(550, "nope")})
        self.assertFalse(result.session_usable)
        self.assertTrue(t.disconnecting or t.disconnected)

    def test_pipelining_disabled_by_caller(self):
        s, t = self.start("PIPELINING", pipelining=False)
        s.transaction("f@a.example", ["r1@b.example", "r2@b.example"], io.BytesIO(BODY))
        self.assertEqual(t.writes, [b"MAIL FROM:<f@a.example>\r\n"])

    def test_size_only_when_advertised(self):
        s, _ = self.start("SIZE")
        s.transaction("f@a.example", ["r@b.example"], io.BytesIO(BODY), size=12345)
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example> SIZE=12345\r\n")
        s2, _ = self.start()
        s2.transaction("f@a.example", ["r@b.example"], io.BytesIO(BODY), size=12345)
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\n")

    def test_smtputf8_not_offered(self):
        s, _ = self.start("8BITMIME", "SIZE")
        d = s.transaction("f@a.example", ["jörg@b.example", "x@b.example"],
                          io.BytesIO(BODY), size=10, smtputf8=True)
        result = self.successResultOf(d)
        self.assertEqual(self.take(), b"")
        self.assertEqual(set(result.replies), {"jörg@b.example", "x@b.example"})
        for r in result.replies.values():
            self.assertEqual(r.code, 553)
            self.assertTrue(r.local)
            self.assertIn("SMTPUTF8", r.text)
        self.assertTrue(result.session_usable)

    def test_smtputf8_offered(self):
        s, _ = self.start("8BITMIME", "SMTPUTF8")
        s.transaction("f@a.example", ["jörg@b.example"], io.BytesIO(BODY), smtputf8=True)
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example> BODY=8BITMIME SMTPUTF8\r\n")
        self.feed(b"250 ok\r\n")
        self.assertEqual(self.take(), "RCPT TO:<jörg@b.example>\r\n".encode())

    def test_command_injection_refused(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["a@b.example>\r\nRSET"], io.BytesIO(BODY))
        self.failureResultOf(d, ValueError)
        self.assertEqual(self.take(), b"")


class ConnectionLossTests(SessionTestBase):
    def _to_final_dot(self, recipients, replies):
        s, _ = self.start()
        d = s.transaction("f@a.example", recipients, io.BytesIO(BODY))
        self.feed(b"250 ok\r\n")
        for r in replies:
            self.feed(r)
        self.feed(b"354 go\r\n")
        self.pump_body()
        self.assertTrue(self.take().endswith(WIRE_BODY))
        return s, d

    def test_lost_after_final_dot(self):
        s, d = self._to_final_dot(["a@b.example", "no@b.example", "c@b.example"],
                                  [b"250 ok\r\n", b"550 unknown\r\n", b"250 ok\r\n"])
        self.assertNoResult(d)
        s.connectionLost(Failure(error.ConnectionLost("reset by peer")))
        result = self.successResultOf(d)
        self.assertFalse(result.session_usable)
        self.assertEqual(result.replies["no@b.example"], Reply(550, "unknown"))
        for r in ("a@b.example", "c@b.example"):
            self.assertLocal4xx(result.replies[r])
            self.assertNotEqual(result.replies[r].code // 100, 2)
        # Closed: a later transaction gets local 4xx replies at once.
        result2 = self.successResultOf(
            s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY)))
        self.assertLocal4xx(result2.replies["a@b.example"])

    def test_lost_while_sending_body(self):
        s, _ = self.start()
        big = b"line\r\n" * 40000
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(big))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.feed(b"354 go\r\n")
        self.transport.producer.resumeProducing()
        s.connectionLost(Failure(error.ConnectionLost()))
        result = self.successResultOf(d)
        self.assertLocal4xx(result.replies["a@b.example"])
        self.assertFalse(result.session_usable)

    def test_421_in_reply_makes_session_unusable(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.feed(b"421 4.3.2 shutting down\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.replies["a@b.example"].code, 421)
        self.assertFalse(result.session_usable)


class ReplyParsingTests(SessionTestBase):
    def test_byte_by_byte(self):
        s, _ = self.make()
        for b in b"220 mx.example hi\r\n":
            self.feed(bytes([b]))
        self.assertEqual(self.take(), EHLO)
        data = ehlo_reply("SIZE 1000", "PIPELINING")
        for i, b in enumerate(data):
            if i < len(data) - 1:
                self.assertNoResult(s.ready)
            self.feed(bytes([b]))
        self.successResultOf(s.ready)
        self.assertEqual(s.extensions, {"SIZE": "1000", "PIPELINING": ""})

    def test_bare_lf_line_ends(self):
        s, _ = self.make()
        self.feed(b"220 mx hi\n")
        self.assertEqual(self.take(), EHLO)
        self.feed(b"250-mx\n250-SIZE 1000\n250 STARTTLS\n")
        self.successResultOf(s.ready)
        self.assertEqual(s.extensions, {"SIZE": "1000", "STARTTLS": ""})

    def test_code_only_line(self):
        s, _ = self.make()
        self.feed(b"220\r\n")
        self.assertEqual(self.take(), EHLO)
        self.feed(b"250\r\n")
        self.successResultOf(s.ready)

    def assertProtocolError(self, e: SessionError):
        self.assertLocal4xx(e.reply)
        self.assertIn("protocol error", e.reply.text)
        self.assertTrue(self.transport.disconnected)  # aborted
        self.assertFalse(self.session.usable)

    def test_code_change_in_multiline_greeting(self):
        s, _ = self.make()
        self.feed(b"220-mx.example\r\n554 no\r\n")
        self.assertProtocolError(self.ready_failure())
        self.assertNotIn(b"EHLO", self.transport.value())

    def test_code_change_in_multiline_ehlo(self):
        s, _ = self.make()
        self.feed(b"220 hi\r\n")
        self.feed(b"250-mx.example\r\n251 PIPELINING\r\n")
        self.assertProtocolError(self.ready_failure())

    def test_code_change_in_transaction(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["a@b.example", "c@b.example"], io.BytesIO(BODY))
        self.feed(b"250 ok\r\n")
        self.feed(b"250-a\r\n550 b\r\n")
        result = self.successResultOf(d)
        self.assertFalse(result.session_usable)
        for r in result.replies.values():
            self.assertLocal4xx(r)
            self.assertIn("protocol error", r.text)
        self.assertTrue(self.transport.disconnected)

    def test_overlong_line_with_line_end(self):
        s, _ = self.make()
        self.feed(b"220 " + b"x" * MAX_LINE + b"\r\n")
        self.assertProtocolError(self.ready_failure())
        self.assertNotIn(b"EHLO", self.transport.value())

    def test_overlong_line_without_line_end(self):
        s, _ = self.make()
        self.feed(b"220 " + b"x" * (MAX_LINE // 2))
        self.assertNoResult(s.ready)
        self.feed(b"x" * (MAX_LINE // 2))
        self.assertProtocolError(self.ready_failure())

    def test_overlong_line_in_transaction(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.feed(b"250 " + b"y" * 5000 + b"\r\n")
        result = self.successResultOf(d)
        self.assertLocal4xx(result.replies["a@b.example"])
        self.assertFalse(result.session_usable)
        self.assertTrue(self.transport.disconnected)

    def test_longest_allowed_line_whatever_the_chunking(self):
        # A line of exactly MAX_LINE bytes is accepted, also when its CR and
        # LF arrive in different packets.
        line = b"220 " + b"z" * (MAX_LINE - 4)
        self.assertEqual(len(line), MAX_LINE)
        for packets in ([line + b"\r\n"], [line + b"\r", b"\n"], [line, b"\r\n"],
                        [line[:100], line[100:] + b"\r", b"\n"]):
            s, _ = self.make()
            for p in packets:
                self.feed(p)
            self.assertEqual(self.take(), EHLO, packets[-1])
            self.assertNoResult(s.ready)

    def test_malformed_lines(self):
        for bad in (b"hello\r\n", b"25 x\r\n", b"2500 x\r\n", b"250x\r\n", b"abc ok\r\n",
                    b"\r\n", b"25\r\n"):
            s, _ = self.make()
            self.feed(bad)
            e = self.ready_failure()
            self.assertProtocolError(e)
            self.assertIn("malformed", e.reply.text, bad)

    def test_malformed_line_in_transaction(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.feed(b"OK thanks\r\n")
        result = self.successResultOf(d)
        self.assertLocal4xx(result.replies["a@b.example"])
        self.assertIn("protocol error", result.replies["a@b.example"].text)
        self.assertTrue(self.transport.disconnected)


class TimeoutTests(SessionTestBase):
    def test_no_greeting(self):
        s, t = self.make(timeouts=Timeouts(greeting=30.0))
        self.clock.advance(29.9)
        self.assertNoResult(s.ready)
        self.assertFalse(t.disconnecting)
        self.clock.advance(0.2)
        e = self.ready_failure()
        self.assertLocal4xx(e.reply)
        self.assertIn("timeout", e.reply.text)
        self.assertTrue(t.disconnected)
        self.assertEqual(t.value(), b"")

    def test_no_ehlo_reply(self):
        s, t = self.make(timeouts=Timeouts(helo=20.0))
        self.feed(b"220 hi\r\n")
        self.clock.advance(19)
        self.assertNoResult(s.ready)
        self.clock.advance(2)
        e = self.ready_failure()
        self.assertLocal4xx(e.reply)
        self.assertIn("EHLO", e.reply.text)
        self.assertTrue(t.disconnected)

    def test_no_rcpt_reply(self):
        s, t = self.start(timeouts=Timeouts(mail=100.0, rcpt=5.0))
        d = s.transaction("f@a.example", ["a@b.example", "c@b.example"], io.BytesIO(BODY))
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\n")
        self.clock.advance(50)  # below the MAIL timeout
        self.feed(b"250 ok\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<a@b.example>\r\n")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        result = self.successResultOf(d)
        self.assertEqual(set(result.replies), {"a@b.example", "c@b.example"})
        for r in result.replies.values():
            self.assertLocal4xx(r)
            self.assertIn("timeout", r.text)
            self.assertIn("RCPT", r.text)
        self.assertFalse(result.session_usable)
        self.assertTrue(t.disconnected)

    def test_no_rcpt_reply_pipelined(self):
        s, t = self.start("PIPELINING", timeouts=Timeouts(mail=100.0, rcpt=5.0))
        d = s.transaction("f@a.example", ["a@b.example", "c@b.example"], io.BytesIO(BODY))
        self.clock.advance(50)
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.clock.advance(5.1)
        result = self.successResultOf(d)
        for r in result.replies.values():
            self.assertLocal4xx(r)
        self.assertTrue(t.disconnected)

    def test_pipelined_failure_logs_no_unhandled_error(self):
        # A timeout or a lost connection fails every pipelined command's
        # Deferred; none may end up as "Unhandled error in Deferred".
        for lose in (False, True):
            s, _ = self.start("PIPELINING", timeouts=Timeouts(mail=5.0))
            d = s.transaction("f@a.example", ["a@b.example", "c@b.example"], io.BytesIO(BODY))
            if lose:
                s.connectionLost(Failure(error.ConnectionLost()))
            else:
                self.clock.advance(6)
            for r in self.successResultOf(d).replies.values():
                self.assertLocal4xx(r)
            del d, s
            self.session = self.transport = None
            gc.collect()
            self.assertEqual(self.flushLoggedErrors(), [])

    def test_timer_restarts_for_each_reply(self):
        s, _ = self.start(timeouts=Timeouts(mail=10.0, rcpt=10.0, data=10.0, data_done=10.0))
        d = s.transaction("f@a.example", ["a@b.example", "c@b.example"], io.BytesIO(BODY))
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            self.clock.advance(9)
            self.feed(reply)
        self.pump_body()
        self.clock.advance(9)
        self.feed(b"250 queued\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.replies["a@b.example"], Reply(250, "queued"))
        self.assertTrue(result.session_usable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_final_dot_reply(self):
        s, t = self.start(timeouts=Timeouts(data_done=600.0, data_block=10.0))
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.feed(b"354 go\r\n")
        self.pump_body()
        self.clock.advance(599)
        self.assertNoResult(d)
        self.clock.advance(2)
        result = self.successResultOf(d)
        self.assertLocal4xx(result.replies["a@b.example"])
        self.assertTrue(t.disconnected)

    def test_body_block_timeout(self):
        # The transport never asks for more data: the data_block timer fires.
        s, t = self.start(timeouts=Timeouts(data_block=30.0))
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b"x" * (3 * CHUNK)))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.feed(b"354 go\r\n")
        t.producer.resumeProducing()
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(2)
        result = self.successResultOf(d)
        self.assertLocal4xx(result.replies["a@b.example"])
        self.assertTrue(t.disconnected)


class StartTLSTests(SessionTestBase):
    def _to_starttls(self, tls):
        s, t = self.make(tls=tls)
        self.feed(b"220 mx.example ESMTP\r\n")
        self.assertEqual(self.take(), EHLO)
        self.feed(ehlo_reply("PIPELINING", "STARTTLS"))
        self.assertEqual(self.take(), b"STARTTLS\r\n")
        self.assertEqual(t.tls_starts, [])
        self.assertNoResult(s.ready)
        return s, t

    def test_injected_bytes_after_220_are_discarded(self):
        for injected in (b"250 injected\r\n",
                         b"250-injected\r\n250 PIPELINING\r\n",
                         b"250-INJECTED\r\n250-AUTH PLAIN\r\n250 partial",
                         b"250-partial"):
            s, t = self._to_starttls("may")
            self.feed(b"220 2.0.0 go ahead\r\n" + injected)
            self.assertEqual(t.tls_starts, [("creator-for", "mx.example")], injected)
            self.assertTrue(s.encrypted)
            self.assertEqual(self.take(), EHLO)
            # The EHLO after the handshake waits for a new reply.
            self.assertNoResult(s.ready)
            self.feed(b"250-mx.example real\r\n250 SIZE 999\r\n")
            self.assertIs(self.successResultOf(s.ready), s)
            self.assertEqual(s.extensions, {"SIZE": "999"}, injected)
            self.assertEqual(self.take(), b"")

    def test_starttls_then_ehlo(self):
        s, t = self._to_starttls("encrypt")
        self.feed(b"220 ready\r\n")
        self.assertEqual(len(t.tls_starts), 1)
        self.assertEqual(self.take(), EHLO)
        self.feed(ehlo_reply("PIPELINING", "AUTH PLAIN"))
        self.successResultOf(s.ready)
        self.assertTrue(s.encrypted)
        self.assertEqual(s.extensions, {"PIPELINING": "", "AUTH": "PLAIN"})

    def test_encrypt_without_starttls_offered(self):
        s, t = self.make(tls="encrypt")
        self.feed(b"220 hi\r\n")
        self.take()
        self.feed(ehlo_reply("PIPELINING"))
        self.assertEqual(self.take(), b"QUIT\r\n")
        self.feed(b"221 bye\r\n")
        e = self.ready_failure()
        self.assertLocal4xx(e.reply)
        self.assertIn("TLS", e.reply.text)
        self.assertEqual(e.stage, "starttls")
        self.assertEqual(t.tls_starts, [])
        self.assertTrue(t.disconnecting)

    def test_starttls_454_may_continues_plaintext(self):
        s, t = self._to_starttls("may")
        self.feed(b"454 4.7.0 TLS not available\r\n")
        self.assertIs(self.successResultOf(s.ready), s)
        self.assertFalse(s.encrypted)
        self.assertEqual(t.tls_starts, [])
        self.assertEqual(self.take(), b"")
        s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.assertTrue(self.take().startswith(b"MAIL FROM:<f@a.example>\r\n"))

    def test_starttls_454_encrypt_fails(self):
        s, t = self._to_starttls("encrypt")
        self.feed(b"454 4.7.0 TLS not available\r\n")
        self.assertEqual(self.take(), b"QUIT\r\n")
        self.feed(b"221 bye\r\n")
        e = self.ready_failure()
        self.assertLocal4xx(e.reply)
        self.assertIn("TLS", e.reply.text)
        self.assertEqual(t.tls_starts, [])

    def test_tls_none_ignores_starttls(self):
        s, t = self.make(tls="none")
        self.feed(b"220 hi\r\n")
        self.take()
        self.feed(ehlo_reply("STARTTLS"))
        self.successResultOf(s.ready)
        self.assertEqual(self.take(), b"")
        self.assertEqual(t.tls_starts, [])

    def test_unknown_tls_level(self):
        with self.assertRaises(ValueError):
            ESMTPSession(HELO, Clock(), tls="maybe")


class QuitTests(SessionTestBase):
    def test_quit(self):
        s, t = self.start()
        d = s.quit()
        self.assertEqual(self.take(), b"QUIT\r\n")
        self.assertFalse(s.usable)
        self.assertNoResult(d)
        self.assertFalse(t.disconnecting)
        self.feed(b"221 2.0.0 bye\r\n")
        self.assertTrue(t.disconnecting)
        self.assertNoResult(d)  # fires once the connection is really closed
        s.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsNone(self.successResultOf(d))

    def test_quit_without_reply_fires_after_timeout(self):
        s, t = self.start()
        d = s.quit()
        self.clock.advance(9)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertTrue(t.disconnecting)
        # a peer that never closes: the connection is aborted after the timeout
        self.clock.advance(10)
        s.connectionLost(Failure(error.ConnectionAborted()))
        self.assertIsNone(self.successResultOf(d))

    def test_quit_after_connection_lost(self):
        s, t = self.start()
        s.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsNone(self.successResultOf(s.quit()))
        self.assertEqual(self.take(), b"")


def _expected_wire(body: bytes) -> bytes:
    """Reference dot-stuffing of a CRLF-only body."""
    assert body.endswith(b"\r\n")
    lines = body.split(b"\r\n")[:-1]
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n"
                    for ln in lines) + b".\r\n"


class BodyStreamingTests(SessionTestBase):
    def _body(self) -> bytes:
        # ~200 KB of CRLF lines; many start with a dot, and CRLFs / dot lines
        # straddle or touch the CHUNK boundaries.
        parts = []
        n = 0
        i = 0
        while n < 200 * 1024:
            if i % 7 == 0:
                ln = b"." + b"d" * (i % 50)
            elif i % 11 == 0:
                ln = b"."
            else:
                ln = b"line %d " % i + b"t" * (i % 90)
            parts.append(ln + b"\r\n")
            n += len(ln) + 2
            i += 1
        body = b"".join(parts)
        # Force a CR at the last byte of the first chunk, its LF in the next,
        # and a dot line right at the start of the third chunk.
        head = b"h" * (CHUNK - 1) + b"\r\n"
        pad = b"p" * (2 * CHUNK - len(head) - 2) + b"\r\n"
        body = head + pad + b".starts chunk three\r\n" + body
        self.assertEqual(body[CHUNK - 1 : CHUNK + 1], b"\r\n")
        self.assertEqual(body[2 * CHUNK : 2 * CHUNK + 1], b".")
        self.assertGreater(len(body), 200 * 1024)
        return body

    def test_200k_body_streamed_and_stuffed(self):
        s, t = self.start("PIPELINING")
        body = self._body()
        source = ReadRecorder(body)
        d = s.transaction("f@a.example", ["a@b.example"], source, size=len(body))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.assertEqual(source.sizes, [])  # nothing read before 354
        self.feed(b"354 go\r\n")
        self.take()
        self.assertIs(t.producer.__class__.__name__, "_BodyProducer")
        rounds = 0
        while t.producer is not None and rounds < 100:
            before = len(t.value())
            t.producer.resumeProducing()
            # One chunk at a time: never more than a stuffed CHUNK per call
            # (the last call also writes the terminator).
            self.assertLessEqual(len(t.value()) - before, 2 * CHUNK + 5)
            rounds += 1
        self.assertIsNone(t.producer)
        self.assertGreaterEqual(rounds, len(body) // CHUNK)
        self.assertTrue(all(sz == CHUNK for sz in source.sizes), source.sizes)
        wire = self.take()
        self.assertEqual(wire, _expected_wire(body))
        self.assertTrue(wire.endswith(b"\r\n.\r\n"))
        self.assertEqual((b"\r\n" + wire).count(b"\r\n.\r\n"), 1)
        self.feed(b"250 queued\r\n")
        self.assertEqual(self.successResultOf(d).replies, {"a@b.example": Reply(250, "queued")})

    def test_lf_body_normalised_on_wire(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["a@b.example"],
                          io.BytesIO(b"a\n.\nb\r.\rc\r\n.\r\nlast"))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.feed(b"354 go\r\n")
        self.take()
        self.pump_body()
        self.assertEqual(self.take(), b"a\r\n..\r\nb\r\n..\r\nc\r\n..\r\nlast\r\n.\r\n")
        self.feed(b"250 ok\r\n")
        self.successResultOf(d)

    def test_empty_body(self):
        s, _ = self.start()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b""))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.feed(b"354 go\r\n")
        self.take()
        self.pump_body()
        self.assertEqual(self.take(), b".\r\n")
        self.feed(b"250 ok\r\n")
        self.successResultOf(d)

    def test_two_transactions_on_one_session(self):
        s, _ = self.start("PIPELINING")
        for n in range(2):
            d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b"msg %d\r\n" % n))
            self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\nRCPT TO:<a@b.example>\r\n"
                                          b"DATA\r\n")
            self.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
            self.pump_body()
            self.assertEqual(self.take(), b"msg %d\r\n.\r\n" % n)
            self.feed(b"250 id%d\r\n" % n)
            self.assertEqual(self.successResultOf(d).replies["a@b.example"], Reply(250, f"id{n}"))
        self.assertEqual(s.transactions, 2)


class NoTranscriptInErrorsTests(SessionTestBase):
    """twisted.mail's client puts its session transcript (AUTH lines included)
    into exception texts. Ours never repeats what it sent: errors carry the
    server's reply or a local explanation only."""

    def test_failures_do_not_echo_our_commands(self):
        from twisted.logger import globalLogPublisher

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        s, t = self.start()
        secret_rcpt = "secret-token-1234@example.org"
        d = s.transaction("sender@example.com", [secret_rcpt], io.BytesIO(b"x\r\n"))
        self.feed(b"250 ok\r\n")  # MAIL
        self.assertIn(b"secret-token-1234", self.take())
        self.feed(b"421-4.7.0 closing\r\n421 4.7.0 bye\r\n")  # RCPT
        result = self.successResultOf(d)
        text = " ".join(r.text for r in result.replies.values())
        self.assertIn("closing", text)
        for word in ("secret-token", "MAIL FROM", "RCPT TO", "EHLO"):
            self.assertNotIn(word, text)
        d2 = s.transaction("sender@example.com", [secret_rcpt], io.BytesIO(b"x\r\n"))
        s.connectionLost(Failure(error.ConnectionLost()))
        for reply in self.successResultOf(d2).replies.values():
            self.assertNotIn("secret-token", reply.text)
        from twisted.logger import formatEvent

        for event in logged:
            self.assertNotIn("secret-token", formatEvent(event))


class OutOfStepTests(SessionTestBase):
    """A reply that arrives before the command it would answer (an extra line
    after the greeting, a second reply to EHLO) would shift every later reply
    onto the wrong command; the session refuses to go on instead."""

    def test_extra_line_after_the_greeting(self):
        s, t = self.make()
        self.feed(b"220 mx.example ESMTP\r\n250 surprise\r\n")
        err = self.ready_failure()
        self.assertLocal4xx(err.reply)
        self.assertIn("before the EHLO command", err.reply.text)
        self.assertTrue(t.disconnecting or t.disconnected)

    def test_second_reply_to_a_command(self):
        s, t = self.start()
        d = s.transaction("f@a.example", ["r@b.example"], io.BytesIO(BODY))
        self.take()
        self.feed(b"250 ok\r\n250 extra\r\n")  # MAIL answered twice
        result = self.successResultOf(d)
        self.assertLocal4xx(result.replies["r@b.example"])
        self.assertFalse(result.session_usable)
        self.assertNotIn(b"DATA", self.take())

    def test_pipelined_replies_together_are_in_step(self):
        s, t = self.start("PIPELINING")
        d = s.transaction("f@a.example", ["r@b.example"], io.BytesIO(BODY))
        self.take()
        self.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.pump_body()
        self.feed(b"250 queued\r\n")
        self.assertEqual(self.successResultOf(d).replies["r@b.example"], Reply(250, "queued"))


class EightBitTests(SessionTestBase):
    def test_body_8bitmime_only_when_offered(self):
        s, _ = self.start("8BITMIME")
        s.transaction("f@a.example", ["r@b.example"], io.BytesIO(b"caf\xc3\xa9\r\n"),
                      eightbit=True)
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example> BODY=8BITMIME\r\n")
        s2, _ = self.start()
        s2.transaction("f@a.example", ["r@b.example"], io.BytesIO(b"caf\xc3\xa9\r\n"),
                       eightbit=True)
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\n")


class FinalDotGuardTests(SessionTestBase):
    """may_finish: a shared queue's lease guard is asked before the final
    dot; when it says no, the dot is never written and the connection goes."""

    def _to_data(self, s, may_finish):
        d = s.transaction("f@a.example", ["r@b.example"], io.BytesIO(BODY),
                          may_finish=may_finish)
        self.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.take()
        return d

    def test_no_final_dot_when_the_lease_lapsed(self):
        s, t = self.start("PIPELINING")
        asked = []
        d = self._to_data(s, lambda: asked.append(1) or False)
        self.pump_body()
        wire = self.take()
        self.assertEqual(asked, [1])
        self.assertFalse(wire.endswith(b"\r\n.\r\n"), wire)
        self.assertNotIn(b"\r\n.\r\n", wire)
        self.assertTrue(t.disconnected)  # aborted: the server discards the data
        result = self.successResultOf(d)
        reply = result.replies["r@b.example"]
        self.assertLocal4xx(reply)
        self.assertIn("final dot not sent", reply.text)
        self.assertFalse(result.session_usable)

    def test_the_dot_goes_when_the_lease_holds(self):
        s, t = self.start("PIPELINING")
        d = self._to_data(s, lambda: True)
        self.pump_body()
        self.assertEqual(self.take(), WIRE_BODY)
        self.feed(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.successResultOf(d).replies["r@b.example"].code, 250)
