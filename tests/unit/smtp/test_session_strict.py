"""ESMTPSession over the state machine: replies that do not belong end the
session (review F2), cancellation aborts it, a refused RSET
defers. Same harness as test_session: StringTransport, Clock, bytes by hand."""

from __future__ import annotations

import io

from twisted.internet import defer, error
from twisted.python.failure import Failure

from tests.unit.smtp.test_session import BODY, WIRE_BODY, SessionTestBase
from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.errors import Stage
from twisted_mailout.smtp.replies import encode_reply

RCPTS = ["a@b.example", "c@b.example"]


class WrongCodeTests(SessionTestBase):
    """A 1xx, a 3xx or a 2xx where it does not belong, in the MAIL, RCPT,
    DATA and final-dot positions: protocol error, the session ends (aborted,
    unusable), every undecided recipient deferred with a local 421; never
    delivered, never bounced."""

    def _case(self, pipelined: bool, position: int, bad: bytes):
        ext = ("PIPELINING",) if pipelined else ()
        s, t = self.start(*ext)
        d = s.transaction("f@a.example", RCPTS, io.BytesIO(BODY))
        good = [b"250 sender ok\r\n", b"250 a ok\r\n", b"250 c ok\r\n", b"354 go\r\n"]
        # position: 0 MAIL, 1 first RCPT, 3 DATA, 4 final dot
        for reply in good[:position]:
            self.feed(reply)
        if position == 4:
            self.pump_body()
            self.assertTrue(self.take().endswith(WIRE_BODY))
        self.take()
        self.feed(bad)
        result = self.successResultOf(d)
        self.assertFalse(result.session_usable)
        self.assertTrue(t.disconnected)  # aborted: nothing more is trusted
        self.assertFalse(s.usable)
        self.assertEqual(self.take(), b"")  # no further command, never a dot
        self.assertIsNone(t.producer)
        return result.replies

    def test_wrong_codes_in_every_position(self):
        cases = [(0, b"354 go\r\n"), (0, b"334 eh\r\n"), (0, b"251 fwd\r\n"), (0, b"150 wait\r\n"),
                 (1, b"354 go\r\n"), (1, b"334 eh\r\n"), (1, b"101 hmm\r\n"),
                 (3, b"250 ok\r\n"), (3, b"334 eh\r\n"), (3, b"199 x\r\n"),
                 (4, b"354 again\r\n"), (4, b"334 eh\r\n"), (4, b"120 x\r\n")]
        for pipelined in (False, True):
            for position, bad in cases:
                label = (pipelined, position, bad)
                replies = self._case(pipelined, position, bad)
                self.assertEqual(set(replies), set(RCPTS), label)
                for r in replies.values():
                    self.assertLocal4xx(r)
                    self.assertEqual(r.code, 421, label)
                    self.assertIn("protocol error", r.text, label)

    def test_refusal_before_the_fault_still_counts(self):
        # c was refused before the bad reply: it stays refused (bounced).
        s, _ = self.start()
        d = s.transaction("f@a.example", RCPTS, io.BytesIO(BODY))
        self.feed(b"250 ok\r\n")
        self.feed(b"250 a ok\r\n")
        self.feed(b"550 c unknown\r\n")
        self.feed(b"334 what\r\n")  # to DATA
        replies = self.successResultOf(d).replies
        self.assertEqual(replies["c@b.example"], Reply(550, "c unknown"))
        self.assertEqual(replies["a@b.example"].code, 421)

    def test_greeting_2xx_other_than_220_is_a_protocol_error_not_a_verdict(self):
        s, t = self.make()
        self.feed(b"250 hello\r\n")
        e = self.ready_failure()
        self.assertLocal4xx(e.reply)
        self.assertIn("protocol error", e.reply.text)
        self.assertEqual(e.stage, Stage.GREETING)
        self.assertTrue(t.disconnected)

    def test_rset_refused_defers_and_gives_the_session_up(self):
        s, t = self.start()
        d = s.transaction("f@a.example", ["x@b.example"], io.BytesIO(BODY))
        self.feed(b"250 ok\r\n")
        self.feed(b"550 no\r\n")
        self.successResultOf(d)
        d2 = s.transaction("f@a.example", ["y@b.example"], io.BytesIO(BODY))
        self.assertEqual(self.take().splitlines()[-1], b"RSET")
        self.feed(b"502 5.5.1 RSET not implemented\r\n")
        result = self.successResultOf(d2)
        self.assertLocal4xx(result.replies["y@b.example"])
        self.assertIn("RSET", result.replies["y@b.example"].text)
        self.assertFalse(result.session_usable)
        self.assertTrue(t.disconnecting or t.disconnected)


class CancelTests(SessionTestBase):
    """Cancelling a transaction aborts the connection; the Deferred fails
    with CancelledError and nothing is logged as an error."""

    def _check_cancelled(self, d, s, t):
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(t.disconnected)
        self.assertFalse(s.usable)
        written = self.take()
        s.connectionLost(Failure(error.ConnectionAborted()))
        self.successResultOf(s.closed)
        self.assertEqual(self.flushLoggedErrors(), [])
        return written

    def test_cancel_while_replies_are_owed(self):
        for ext in ((), ("PIPELINING",)):
            s, t = self.start(*ext)
            d = s.transaction("f@a.example", RCPTS, io.BytesIO(BODY))
            self.feed(b"250 ok\r\n")
            self.take()
            self._check_cancelled(d, s, t)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_while_the_body_is_sent(self):
        s, t = self.start()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b"x\r\n" * 100000))
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            self.feed(reply)
        t.producer.resumeProducing()
        self.take()
        self.assertIsNotNone(t.producer)
        written = self._check_cancelled(d, s, t)
        self.assertNotIn(b"\r\n.\r\n", written)
        self.assertIsNone(t.producer)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_after_the_result_is_harmless(self):
        s, t = self.start()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(b"x"))
        self.feed(b"250 ok\r\n")
        self.feed(b"550 no\r\n")
        result = self.successResultOf(d)
        d.cancel()
        self.assertTrue(result.session_usable)
        self.assertFalse(t.disconnected)


class EncodedRepliesTests(SessionTestBase):
    def test_replies_built_with_the_shared_encoder(self):
        s, t = self.start("PIPELINING")
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.feed(encode_reply(250, "2.1.0 sender\nok") + encode_reply(250, "ok")
                  + encode_reply(354, "go"))
        self.pump_body()
        self.feed(encode_reply(250, "2.0.0 queued\nas X"))
        self.assertEqual(self.successResultOf(d).replies["a@b.example"],
                         Reply(250, "2.0.0 queued\nas X"))


class MisuseTests(SessionTestBase):
    def test_transaction_before_ready_or_while_one_runs_fails_cleanly(self):
        s, t = self.make()
        d = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        self.failureResultOf(d, ValueError)  # still waiting for the greeting
        self.assertEqual(self.take(), b"")
        self.feed(b"220 hi\r\n")
        self.take()
        self.feed(b"250 mx\r\n")
        self.successResultOf(s.ready)
        d1 = s.transaction("f@a.example", ["a@b.example"], io.BytesIO(BODY))
        d2 = s.transaction("f@a.example", ["c@b.example"], io.BytesIO(BODY))
        self.failureResultOf(d2, ValueError)
        self.assertEqual(self.take(), b"MAIL FROM:<f@a.example>\r\n")
        self.feed(b"550 no\r\n")
        self.assertEqual(set(self.successResultOf(d1).replies), {"a@b.example"})

    def test_when_closed_gives_each_caller_its_own_deferred(self):
        s, _ = self.start()
        a, b = s.when_closed(), s.when_closed()
        a.addCallback(lambda _: "changed")
        s.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(a), "changed")
        self.assertIsNone(self.successResultOf(b))
