"""Signing queued mail once, before its first attempt: the signature goes in
front of the stored bytes on every attempt and every destination, is kept
with the message across a deferral, and mail that cannot be signed is
deferred with the reason, never sent unsigned."""

import io
import random
import time

from twisted.internet import task

from tests.support.fakes import ScriptedConnector
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler
from twisted_mailout.delivery.signing import PrefixedBody
from twisted_mailout.envelope import Reply
from twisted_mailout.queue.store import Queue

MSG = (b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m1@example.com>\r\n"
       b"Date: Thu, 03 Dec 2026 06:00:00 +0000\r\n\r\nbody\r\n")
SIG = b"DKIM-Signature: v=1; a=ed25519-sha256; d=example.com; s=s1;\r\n b=abc\r\n"
OK = Reply(250, "2.0.0 Ok")
LATER = Reply(451, "4.3.0 try later")


class CountingSigner:
    def __init__(self, result=SIG, error=None):
        self.result = result
        self.error = error
        self.calls = []

    def sign(self, message, sender=None):
        self.calls.append((message, sender))
        if self.error is not None:
            raise self.error
        return self.result


def harness(tmp_path, signer, script):
    clock = task.Clock()
    clock.advance(time.time())
    q = Queue(str(tmp_path / "q"))
    conn = ScriptedConnector(script)
    outcomes = []
    sched = Scheduler(q, conn, clock, retry=RetryPolicy(base=300, jitter=0),
                      observers=[outcomes.append], rng=random.Random(0), signer=signer)
    sched.start()
    return clock, q, conn, sched, outcomes


def test_signed_once_and_the_same_bytes_on_every_attempt_and_destination(tmp_path):
    replies = {"example.org": [LATER, OK], "example.net": [OK]}
    signer = CountingSigner()
    clock, q, conn, sched, outcomes = harness(
        tmp_path, signer, lambda dest, rcpt: replies[dest].pop(0))
    qid = q.enqueue("a@example.com", ["b@example.org", "c@example.net"], MSG)
    sched.pickup()
    assert [(m, s) for m, s in signer.calls] == [(MSG, "a@example.com")]
    assert {dest: body for dest, _, _, body in conn.calls} == {
        "example.org": SIG + MSG, "example.net": SIG + MSG}
    # deferred for one destination: the signature is kept with the message
    assert q.load(qid).dkim == SIG.decode()
    clock.advance(301)
    assert len(signer.calls) == 1  # not signed again
    assert conn.calls[-1][3] == SIG + MSG
    assert [o.status.value for o in outcomes].count("delivered") == 2


def test_mail_that_cannot_be_signed_is_deferred_not_sent(tmp_path):
    signer = CountingSigner(error=ValueError("no key for example.com"))
    clock, q, conn, sched, outcomes = harness(tmp_path, signer, lambda d, r: OK)
    qid = q.enqueue("a@example.com", ["b@example.org"], MSG)
    sched.pickup()
    assert conn.calls == []
    [o] = outcomes
    assert o.status.value == "deferred" and o.code == 451
    assert "not signed: no key for example.com" in o.text
    entry = q.load(qid)
    assert entry.dkim is None and entry.recipients[0].attempts == 1
    signer.error = None  # the key is there now: signed and sent at the retry
    clock.advance(301)
    assert [body for *_, body in conn.calls] == [SIG + MSG]


def test_no_key_applies_sends_the_message_as_it_is(tmp_path):
    signer = CountingSigner(result=b"")
    clock, q, conn, sched, outcomes = harness(tmp_path, signer, lambda d, r: LATER)
    qid = q.enqueue("a@example.com", ["b@example.org"], MSG)
    sched.pickup()
    assert [body for *_, body in conn.calls] == [MSG]
    assert q.load(qid).dkim == ""
    clock.advance(301)
    assert len(signer.calls) == 1


def test_prefixed_body_reads_across_the_join():
    b = PrefixedBody(b"abc", io.BytesIO(b"defgh"))
    assert [b.read(2), b.read(2), b.read(2), b.read(-1), b.read(4)] == [
        b"ab", b"c", b"de", b"fgh", b""]
    b.close()
    assert PrefixedBody(b"ab", io.BytesIO(b"cd")).read() == b"abcd"
