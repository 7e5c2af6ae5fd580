"""Operator actions racing the daemon's own work (found in review): mail still
being picked up, an outcome being written, a bounce whose removal fails, a
message that cannot be read for signing, a stale suspensions file."""

import errno
import os
import random
import time

from twisted.internet import defer, task

from tests.support.fakes import ScriptedConnector
from twisted_mailout.admin import QueueAdmin, Selector
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler
from twisted_mailout.envelope import Reply
from twisted_mailout.queue.store import Queue

MSG = (b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m1@example.com>\r\n"
       b"Date: Thu, 03 Dec 2026 06:00:00 +0000\r\n\r\nbody\r\n")


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class Gates:
    """A run_blocking whose calls of the named functions wait for the test."""

    def __init__(self):
        self.names = set()
        self.held = {}

    def __call__(self, f, *a, **kw):
        name = getattr(f, "__name__", "")
        if name in self.names:
            d = defer.Deferred()
            self.held[name] = (d, f, a, kw)
            return d
        return defer.maybeDeferred(f, *a, **kw)

    def run(self, name):
        d, f, a, kw = self.held.pop(name)
        d.callback(f(*a, **kw))


def setup(tmp_path, store_cls=Queue, reply=Reply(250, "2.0.0 ok"), signer=None):
    clock = task.Clock()
    clock.advance(time.time())
    q = store_cls(str(tmp_path / "q"))
    q.lock()
    gates = Gates()
    conn = ScriptedConnector(lambda d, r: reply)
    sched = Scheduler(q, conn, clock, run_blocking=gates, rng=random.Random(0),
                      retry=RetryPolicy(base=300, max=300, jitter=0, lifetime=1000),
                      reporting_mta="mx.test", signer=signer)
    admin = QueueAdmin(q, clock, run_blocking=gates, scheduler=sched, source="api",
                       reporting_mta="mx.test")
    result_of(sched.start())
    return clock, q, conn, sched, admin, gates


def test_an_action_waits_for_the_pickup_running(tmp_path):
    clock, q, conn, sched, admin, gates = setup(tmp_path)
    result_of(admin.suspend("example.org", 600))  # picked up, but not delivered at once
    gates.names.add("pickup")
    qid = q.enqueue("spam@example.com", ["b@example.org"], MSG)
    sched.pickup()  # running, in its thread
    d = admin.delete(Selector(sender="spam@example.com"))
    assert not d.called
    gates.names.clear()
    gates.run("pickup")
    assert result_of(d).changed == [qid]  # not "left the queue meanwhile"
    clock.advance(601)
    assert conn.calls == []  # deleted, never delivered


def test_an_action_waits_for_an_outcome_being_written(tmp_path):
    clock, q, conn, sched, admin, gates = setup(tmp_path, reply=Reply(451, "4.3.0 later"))
    gates.names.add("save_many")
    qid = q.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(sched.pickup())
    assert sched.in_flight() == {qid}  # the deferral is being written
    gates.names.clear()
    d = admin.delete(Selector(ids=(qid,)))
    gates.run("save_many")
    assert result_of(d).changed == [qid]  # not skipped as busy


def test_a_bounce_is_reported_once_even_if_its_removal_fails(tmp_path):
    class FailRemoveOnce(Queue):
        fail = True

        def remove_many(self, qids):
            if self.fail:
                self.fail = False
                raise OSError(errno.EIO, "Input/output error")
            return super().remove_many(qids)

    clock, q, conn, sched, admin, gates = setup(tmp_path, store_cls=FailRemoveOnce,
                                                reply=Reply(451, "4.3.0 later"))
    qid = q.enqueue("sender@example.net", ["b@example.org"], MSG)
    result_of(sched.pickup())
    conn.calls.clear()
    d = admin.bounce(Selector(ids=(qid,)), "spam")
    d.addErrback(lambda f: None)  # the failed removal
    result_of(sched.pickup())  # the report (the daemon's poller would do this)
    for _ in range(5):
        clock.advance(301)
    to_sender = [c for c in conn.calls if c[2] == ["sender@example.net"]]
    assert len({c[3] for c in to_sender}) == 1  # one report (retried, never a second)
    assert [c for c in conn.calls if c[2] == ["b@example.org"]] == []
    assert [x.entry.qid for x in q.list_entries()] != [qid] and all(
        x.entry.sender == "" for x in q.list_entries())


def test_a_message_that_cannot_be_read_for_signing_is_deferred_and_expires(tmp_path):
    class Signer:
        def sign(self, message, sender=None):
            return b"DKIM-Signature: x\r\n"

    class Unreadable(Queue):
        def open_body(self, entry):
            raise OSError(errno.EIO, "Input/output error")

    clock, q, conn, sched, admin, gates = setup(tmp_path, store_cls=Unreadable,
                                                signer=Signer())
    qid = q.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(sched.pickup())
    r = q.load(qid).recipients[0]
    assert r.state.value == "deferred" and r.attempts == 1
    assert "cannot read the queued message" in r.reply.text
    assert result_of(admin.hold(Selector(ids=(qid,)))).changed == [qid]  # not "busy"


def test_a_stale_temporary_suspensions_file_does_not_block_saving(tmp_path):
    clock, q, conn, sched, admin, gates = setup(tmp_path)
    with open(os.path.join(q.path, "suspensions.json.tmp"), "w") as f:
        f.write("left by a crash")
    s = result_of(admin.suspend("example.org", 60, "test"))
    assert [x.id for x in q.suspensions()] == [s["id"]]
    # two at once are written one after the other, both kept
    gates.names.add("save_suspensions")
    d1 = admin.suspend("example.net", 60)
    d2 = admin.suspend("example.com", 60)
    gates.names.clear()
    gates.run("save_suspensions")
    result_of(d1)
    result_of(d2)
    assert sorted(x.domain for x in q.suspensions()) == [
        "example.com", "example.net", "example.org"]
    assert not [n for n in os.listdir(q.path) if n.endswith(".tmp") and "." in n[:-4]
                and n != "suspensions.json.tmp"]
