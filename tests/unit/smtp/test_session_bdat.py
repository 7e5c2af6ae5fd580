"""ESMTPSession with CHUNKING (RFC 3030): BDAT on the wire, byte for byte,
over a StringTransport and a Clock; the lease guard before BDAT LAST; the
writes per transaction of DATA and BDAT."""

from __future__ import annotations

import io
import re

from twisted.internet import error
from twisted.python.failure import Failure

from tests.unit.smtp.test_session import (
    BODY,
    EHLO,
    FakeTransport,
    ReadRecorder,
    SessionTestBase,
    ehlo_reply,
)
from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.dotstuff import encode_bdat, encode_data
from twisted_mailout.smtp.producers import BDAT_CHUNK, INLINE
from twisted_mailout.smtp.protocol import CHUNK, ESMTPSession, Timeouts

TX_CMDS = b"MAIL FROM:<f@a.example>\r\nRCPT TO:<a@b.example>\r\n"


def big_body() -> bytes:
    """Over three chunks: bare LFs and bare CRs (so converted chunks grow),
    lines starting with dots, 8-bit bytes, a CR LF split across the first
    read boundary, and no line end at the very end."""
    head = b"Subject: big\n\n" + b"h" * (CHUNK - 15) + b"\r"
    assert len(head) == CHUNK
    lines = []
    for i in range(40000):
        lines.append(b"." * (i % 3) + b"line %d \xe9\xff caf\xc3\xa9 " % i
                     + (b"\n" if i % 2 else b"\r\n" if i % 5 else b"\r"))
    return head + b"\n" + b"".join(lines) + b"no final line end"


def parse_bdat(wire: bytes) -> tuple[list[tuple[int, bool]], bytes]:
    """Split a stream of BDAT commands and their octets: ([(n, last)], data)."""
    chunks, data, pos = [], b"", 0
    while pos < len(wire):
        m = re.compile(rb"BDAT (\d+)( LAST)?\r\n").match(wire, pos)
        assert m, wire[pos:pos + 40]
        n = int(m.group(1))
        chunks.append((n, bool(m.group(2))))
        data += wire[m.end():m.end() + n]
        pos = m.end() + n
        assert len(data) == sum(c[0] for c in chunks), "short chunk"
    return chunks, data


class BdatTestBase(SessionTestBase):
    def make(self, tls="none", timeouts=None, pipelining=True, hostname="mx.example",
             chunking=True):
        self.session = ESMTPSession(
            "client.example", self.clock_(), tls=tls, hostname=hostname, timeouts=timeouts,
            pipelining=pipelining, chunking=chunking)
        self.transport = FakeTransport()
        self.session.makeConnection(self.transport)
        return self.session, self.transport

    def clock_(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        return self.clock


class PipelinedBdatTests(BdatTestBase):
    def test_small_message_one_write_with_mail_and_rcpt(self):
        s, t = self.start("PIPELINING", "CHUNKING", "SIZE 100000")
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY), size=len(BODY))
        wire = encode_bdat(BODY)
        self.assertEqual(t.writes, [
            f"MAIL FROM:<f@a.example> SIZE={len(BODY)}\r\n".encode()
            + b"RCPT TO:<a@b.example>\r\n" + b"BDAT %d LAST\r\n" % len(wire) + wire])
        self.assertIn(b"\r\n.leading dot\r\n", wire)  # no dot-stuffing
        self.assertIsNone(t.producer)
        self.feed(b"250 ok\r\n250 ok\r\n")
        self.assertNoResult(d)
        self.feed(b"250 2.0.0 queued as X\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.replies, {"a@b.example": Reply(250, "2.0.0 queued as X")})
        self.assertTrue(result.session_usable)
        # No RSET before the next transaction.
        t.writes.clear()
        s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b"x"))
        self.assertEqual(t.writes, [TX_CMDS + b"BDAT 3 LAST\r\nx\r\n"])

    def test_over_inline_waits_for_replies_before_last(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        body = b"Subject: m\r\n\r\n" + (b"x" * 70 + b"\r\n") * 60
        self.assertGreater(len(body), INLINE)
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(body))
        self.assertEqual(t.writes, [TX_CMDS])
        self.feed(b"250 ok\r\n")
        self.assertEqual(len(t.writes), 1)
        self.feed(b"250 ok\r\n")
        self.assertEqual(t.writes[1], b"BDAT %d LAST\r\n" % len(body) + body)
        self.feed(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.successResultOf(d).replies["a@b.example"].code, 250)
        # and when every RCPT is refused, no BDAT at all
        t.writes.clear()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(body))
        self.feed(b"250 ok\r\n550 no\r\n")
        self.assertEqual(t.writes, [TX_CMDS])
        self.assertEqual(self.successResultOf(d).replies["a@b.example"].code, 550)

    def test_inline_limit_counts_bare_line_ends(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        body = b"a\n" * (INLINE // 2 - 40)  # fits as it is, not once every LF is CRLF
        s.transaction("f@a.example", ["a@b.example"], io.BytesIO(body))
        self.assertEqual(t.writes, [TX_CMDS])

    def test_empty_message(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b""))
        self.assertEqual(t.writes, [TX_CMDS + b"BDAT 0 LAST\r\n"])
        self.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n")
        self.assertEqual(self.successResultOf(d).replies["a@b.example"].code, 250)

    def test_big_message_in_chunks_same_bytes_as_data(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        body = big_body()
        source = ReadRecorder(body)
        d = s.transaction("f@a.example", ["a@b.example", "c@b.example"], source)
        cmds = TX_CMDS + b"RCPT TO:<c@b.example>\r\n"
        # Over INLINE: MAIL and RCPT alone; each chunk after every reply owed
        # (Nagle at the server, see _ChunkProducer); never a registered producer.
        self.assertEqual(t.writes, [cmds])
        # reads of CHUNK up to BDAT_CHUNK, and one to see the message goes on
        self.assertEqual(source.sizes, [CHUNK] * (BDAT_CHUNK // CHUNK + 1))
        self.feed(b"250 ok\r\n250 ok\r\n")
        self.assertEqual(len(t.writes), 1)
        self.feed(b"550 no\r\n")
        chunks = 0
        while not t.writes[-1].split(b"\r\n", 1)[0].endswith(b" LAST"):
            chunks += 1
            self.assertEqual(len(t.writes), chunks + 1)  # one chunk per reply
            self.assertIsNone(t.producer)
            self.feed(b"250 2.0.0 chunk ok\r\n")
        self.assertTrue(all(sz == CHUNK for sz in source.sizes), source.sizes)
        heads, data = parse_bdat(b"".join(t.writes[1:]))
        self.assertEqual(len(heads), chunks + 1)
        self.assertGreaterEqual(len(heads), 3)
        self.assertEqual([last for _, last in heads], [False] * chunks + [True])
        self.assertTrue(all(n <= 4 * BDAT_CHUNK for n, _ in heads))
        self.assertEqual(data, encode_bdat(body))
        # What a server keeps from DATA (un-stuffed, without the final dot).
        dot = encode_data(body)[:-3]
        self.assertEqual(re.sub(rb"(^|\r\n)\.", rb"\1", dot), data)
        self.assertIn(b"\xe9\xff", data)
        self.assertNoResult(d)
        self.feed(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.successResultOf(d).replies, {
            "a@b.example": Reply(250, "2.0.0 queued"), "c@b.example": Reply(550, "no")})

    def _one_chunk_out(self, s, t):
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(big_body()))
        self.feed(b"250 ok\r\n250 ok\r\n")
        self.assertEqual(len(t.writes), 2)
        self.assertRegex(t.writes[1][:20], rb"^BDAT \d+\r\n")  # not LAST
        return d

    def test_5xx_to_a_chunk_stops_the_chunks(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        d = self._one_chunk_out(s, t)
        self.feed(b"552 5.3.4 message too big\r\n")
        # RFC 3030 2: no chunk after a refused one.
        self.assertEqual(len(t.writes), 2)
        result = self.successResultOf(d)
        self.assertEqual(result.replies, {"a@b.example": Reply(552, "5.3.4 message too big")})
        self.assertTrue(result.session_usable)
        self.take()
        s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b"x"))
        self.assertEqual(self.take(), b"RSET\r\n")
        self.feed(b"250 reset\r\n")
        self.assertEqual(self.take(), TX_CMDS + b"BDAT 3 LAST\r\nx\r\n")

    def test_4xx_to_a_chunk_defers(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        d = self._one_chunk_out(s, t)
        self.feed(b"451 4.3.0 disk full\r\n")
        self.assertEqual(self.successResultOf(d).replies,
                         {"a@b.example": Reply(451, "4.3.0 disk full")})
        self.assertEqual(len(t.writes), 2)

    def test_every_rcpt_refused_no_chunk(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(big_body()))
        self.feed(b"250 ok\r\n550 5.1.1 unknown\r\n")
        self.assertEqual(t.writes, [TX_CMDS])
        self.assertEqual(self.successResultOf(d).replies,
                         {"a@b.example": Reply(550, "5.1.1 unknown")})

    def test_no_reply_to_last_times_out(self):
        s, t = self.start("PIPELINING", "CHUNKING",
                          timeouts=Timeouts(data_block=30, data_done=600))
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.feed(b"250 ok\r\n250 ok\r\n")
        self.clock.advance(599)
        self.assertNoResult(d)
        self.clock.advance(1)
        reply = self.successResultOf(d).replies["a@b.example"]
        self.assertLocal4xx(reply)
        self.assertIn("BDAT LAST reply", reply.text)
        self.assertTrue(t.disconnected)

    def test_connection_lost_while_sending_chunks(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(big_body()))
        s.connectionLost(Failure(error.ConnectionLost()))
        reply = self.successResultOf(d).replies["a@b.example"]
        self.assertLocal4xx(reply)
        self.assertIsNone(t.producer)

    def test_cancel_while_sending_chunks(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(big_body()))
        d.cancel()
        self.failureResultOf(d)
        self.assertTrue(t.disconnected)

    def test_chunking_false_sends_data(self):
        s, t = self.start("PIPELINING", "CHUNKING", chunking=False)
        s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.assertEqual(t.writes, [TX_CMDS + b"DATA\r\n"])

    def test_not_offered_sends_data(self):
        s, t = self.start("PIPELINING")
        s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.assertEqual(t.writes, [TX_CMDS + b"DATA\r\n"])


class LeaseGuardBdatTests(BdatTestBase):
    """may_finish is asked before BDAT LAST; when it says no, LAST never goes."""

    def test_small_message_nothing_written(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        asked = []
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY),
                          may_finish=lambda: asked.append(1) or False)
        self.assertEqual(asked, [1])
        self.assertEqual(t.writes, [])
        self.assertTrue(t.disconnected)
        result = self.successResultOf(d)
        self.assertLocal4xx(result.replies["a@b.example"])
        self.assertIn("BDAT LAST not sent", result.replies["a@b.example"].text)
        self.assertFalse(result.session_usable)

    def test_big_message_earlier_chunks_but_no_last(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        asked = []
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(big_body()),
                          may_finish=lambda: asked.append(1) or False)
        self.feed(b"250 ok\r\n250 ok\r\n")
        while not t.disconnected:
            self.assertEqual(asked, [])
            self.feed(b"250 chunk ok\r\n")
        self.assertEqual(asked, [1])
        wire = b"".join(t.writes)
        self.assertIn(b"BDAT ", wire)
        self.assertNotIn(b" LAST\r\n", wire)
        self.assertLocal4xx(self.successResultOf(d).replies["a@b.example"])

    def test_last_goes_when_the_lease_holds(self):
        s, t = self.start("PIPELINING", "CHUNKING")
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b"x"),
                          may_finish=lambda: True)
        self.assertEqual(t.writes, [TX_CMDS + b"BDAT 3 LAST\r\nx\r\n"])
        self.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n")
        self.assertEqual(self.successResultOf(d).replies["a@b.example"].code, 250)


class UnpipelinedBdatTests(BdatTestBase):
    def test_each_chunk_waits_for_its_250(self):
        s, t = self.start("CHUNKING", timeouts=Timeouts(data_block=30))
        body = big_body()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(body))
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\n")
        self.feed(b"250 ok\r\n")
        self.assertEqual(self.take(), b"RCPT TO:<a@b.example>\r\n")
        self.assertIsNone(t.producer)
        self.feed(b"250 ok\r\n")
        wire = b""
        chunks = 0
        while True:
            self.assertIsNone(t.producer)  # one chunk written, then wait for its reply
            out = self.take()
            self.assertEqual(out.count(b"BDAT "), 1)
            wire += out
            chunks += 1
            self.clock.advance(29)  # the reply is timed (data_block), not yet out
            if out.split(b"\r\n", 1)[0].endswith(b" LAST"):
                break
            self.feed(b"250 2.0.0 chunk ok\r\n")
        self.assertGreaterEqual(chunks, 4)
        self.assertEqual(parse_bdat(wire)[1], encode_bdat(body))
        self.feed(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.successResultOf(d).replies["a@b.example"],
                         Reply(250, "2.0.0 queued"))

    def test_no_reply_to_a_chunk_times_out(self):
        s, t = self.start("CHUNKING", timeouts=Timeouts(data_block=30))
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(big_body()))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.assertIn(b"BDAT ", self.take())
        self.clock.advance(30)
        reply = self.successResultOf(d).replies["a@b.example"]
        self.assertLocal4xx(reply)
        self.assertIn("timeout", reply.text)
        self.assertIn("BDAT reply", reply.text)

    def test_refused_chunk(self):
        s, t = self.start("CHUNKING")
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(big_body()))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 ok\r\n")
        self.assertIn(b"BDAT ", self.take())
        self.feed(b"554 5.6.0 rejected\r\n")
        self.assertIsNone(t.producer)
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.successResultOf(d).replies,
                         {"a@b.example": Reply(554, "5.6.0 rejected")})


class WritesPerTransactionTests(BdatTestBase):
    """Socket writes (transport.write calls) per transaction on a reused
    session, small messages: DATA needs two (MAIL/RCPT/DATA, then the body
    with its dot after the 354); BDAT with PIPELINING one (up to INLINE
    bytes in all; beyond, two: MAIL/RCPT, then BDAT LAST after their replies)."""

    def _writes(self, *extensions, n=5):
        s, t = self.start(*extensions)
        counts = []
        for i in range(n):
            t.writes.clear()
            d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b"msg %d\r\n" % i))
            replies = b"250 ok\r\n250 ok\r\n"
            if "CHUNKING" not in extensions:
                replies += b"354 go\r\n"
            self.feed(replies)
            self.pump_body()
            self.feed(b"250 queued\r\n")
            self.assertEqual(self.successResultOf(d).replies["a@b.example"].code, 250)
            counts.append(len(t.writes))
        return counts

    def test_data_two_writes(self):
        self.assertEqual(self._writes("PIPELINING"), [2] * 5)

    def test_bdat_one_write(self):
        self.assertEqual(self._writes("PIPELINING", "CHUNKING"), [1] * 5)


def test_ehlo_constant_unchanged():
    assert EHLO == b"EHLO client.example\r\n"
    assert ehlo_reply("CHUNKING").endswith(b"250 CHUNKING\r\n")
