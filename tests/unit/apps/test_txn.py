"""Send on commit with real `transaction` managers: commit, abort, a second
resource failing its vote (no mail may leave), savepoints, a queue that
fails in the vote, and direct delivery after commit (aiosmtpd on loopback)."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import transaction
from tests.support.peers import AiosmtpdSink
from transaction.interfaces import IDataManager
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest
from zope.interface import implementer

from twisted_mailout import AddressError, QueueError
from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.deliveries import MemoryDelivery
from twisted_mailout.apps.mailer import MailBounced, MailDelivered, Mailer, MailQueued
from twisted_mailout.queue.store import Queue


def msg(n=1):
    return build_message(sender="a@origin.test", to="b@dest.test", bcc="c@dest.test",
                         subject=f"order {n}", text="thanks")


@implementer(IDataManager)
class OtherResource:
    """A second resource (a database, say) that may fail its vote."""

    def __init__(self, manager, fail_vote=False):
        self.transaction_manager = manager
        self.fail_vote = fail_vote
        self.calls = []

    def abort(self, txn):
        self.calls.append("abort")

    def tpc_begin(self, txn):
        self.calls.append("tpc_begin")

    def commit(self, txn):
        self.calls.append("commit")

    def tpc_vote(self, txn):
        self.calls.append("tpc_vote")
        if self.fail_vote:
            raise RuntimeError("database conflict")

    def tpc_finish(self, txn):
        self.calls.append("tpc_finish")

    def tpc_abort(self, txn):
        self.calls.append("tpc_abort")

    def sortKey(self):
        return "other"  # votes before the mail (which sorts last), ...

    def savepoint(self):
        class SP:
            def rollback(self):
                pass
        return SP()


class LastResource(OtherResource):
    def sortKey(self):
        return "~~~ after the mail"  # ... or after it, once staged files are synced


def folders(path):
    return {sub: sorted(os.listdir(os.path.join(path, sub))) for sub in ("tmp", "new")}


@pytest.fixture
def setup(tmp_path):
    tm = transaction.TransactionManager(explicit=True)
    events = []
    path = str(tmp_path / "queue")
    mailer = Mailer(f"queue://{path}", transactional=True, transaction_manager=tm,
                    observers=[events.append])
    return tm, mailer, path, events


def test_commit_makes_queued_mail_visible(setup):
    tm, mailer, path, events = setup
    tm.begin()
    q1, q2 = mailer.send(msg(1)), mailer.send(msg(2))
    assert folders(path) == {"tmp": sorted([q1, q2]), "new": []}  # staged, invisible
    assert events == []
    tm.commit()
    assert folders(path) == {"tmp": [], "new": sorted([q1, q2])}
    entries, _ = Queue(path).pickup_all()
    assert {e.qid for e in entries} == {q1, q2}
    assert all([r.address for r in e.recipients] == ["b@dest.test", "c@dest.test"]
               for e in entries)
    assert [(type(e), e.queue_id, e.recipient) for e in events] == [
        (MailQueued, q1, "b@dest.test"), (MailQueued, q1, "c@dest.test"),
        (MailQueued, q2, "b@dest.test"), (MailQueued, q2, "c@dest.test")]


def test_abort_sends_nothing(setup):
    tm, mailer, path, events = setup
    tm.begin()
    mailer.send(msg())
    tm.abort()
    assert folders(path) == {"tmp": [], "new": []} and events == []
    # the next transaction starts clean
    tm.begin()
    qid = mailer.send(msg())
    tm.commit()
    assert folders(path)["new"] == [qid]


@pytest.mark.parametrize("resource", [OtherResource, LastResource])
def test_a_second_resource_failing_its_vote_aborts_and_no_mail_leaves(setup, resource):
    tm, mailer, path, events = setup
    tm.begin()
    other = resource(tm, fail_vote=True)
    tm.get().join(other)
    mailer.send(msg())
    with pytest.raises(RuntimeError, match="database conflict"):
        tm.commit()
    tm.abort()
    assert folders(path) == {"tmp": [], "new": []}
    assert Queue(path).pickup_all() == ([], [])
    assert events == []
    assert "tpc_abort" in other.calls


def test_savepoint_rollback_drops_only_later_mail(setup):
    tm, mailer, path, events = setup
    tm.begin()
    kept = mailer.send(msg(1))
    sp = tm.savepoint()
    dropped = mailer.send(msg(2))
    assert len(folders(path)["tmp"]) == 2
    sp.rollback()
    assert folders(path)["tmp"] == [kept]
    later = mailer.send(msg(3))
    tm.commit()
    assert folders(path) == {"tmp": [], "new": sorted([kept, later])}
    assert dropped not in {e.queue_id for e in events}


def test_savepoint_taken_before_any_mail(setup):
    # the transaction unjoins a resource that joined after the savepoint
    # when rolling back to it: mail sent after that must still go
    tm, mailer, path, _ = setup
    tm.begin()
    sp = tm.savepoint()
    mailer.send(msg(1))
    sp.rollback()
    assert folders(path) == {"tmp": [], "new": []}
    sp2 = tm.savepoint()
    later = mailer.send(msg(2))
    sp2.rollback()
    last = mailer.send(msg(3))
    tm.commit()
    assert later != last
    assert folders(path) == {"tmp": [], "new": [last]}


def test_a_queue_that_cannot_sync_fails_the_vote_and_aborts_everything(setup):
    tm, mailer, path, events = setup
    tm.begin()
    other = LastResource(tm)
    tm.get().join(other)
    mailer.send(msg())
    shutil.rmtree(os.path.join(path, "tmp"))  # the disk lost the staged file
    with pytest.raises(QueueError):
        tm.commit()
    tm.abort()
    assert "tpc_finish" not in other.calls and "tpc_abort" in other.calls
    assert os.listdir(os.path.join(path, "new")) == []


def test_bad_input_raises_at_send_not_at_commit(setup):
    tm, mailer, path, _ = setup
    tm.begin()
    with pytest.raises(AddressError):
        mailer.send(msg(), recipients=["nope"])
    tm.commit()
    assert folders(path) == {"tmp": [], "new": []}


def test_observer_errors_never_break_the_commit(tmp_path):
    tm = transaction.TransactionManager(explicit=True)

    def bad(event):
        raise RuntimeError("observer bug")

    path = str(tmp_path / "q")
    mailer = Mailer(f"queue://{path}", transactional=True, transaction_manager=tm,
                    observers=[bad])
    tm.begin()
    qid = mailer.send(msg())
    tm.commit()
    assert os.listdir(os.path.join(path, "new")) == [qid]


def test_other_deliveries_run_after_commit_only():
    tm = transaction.TransactionManager(explicit=True)
    outbox = MemoryDelivery()
    events = []
    mailer = Mailer(outbox, transactional=True, transaction_manager=tm,
                    observers=[events.append])
    tm.begin()
    mid = mailer.send(msg())
    assert outbox.outbox == []
    tm.commit()
    assert [m.message_id for m in outbox.outbox] == [mid]
    assert [type(e) for e in events] == [MailDelivered, MailDelivered]
    tm.begin()
    mailer.send(msg())
    tm.abort()
    assert len(outbox.outbox) == 1


def test_a_failing_delivery_after_commit_is_reported_not_raised(tmp_path):
    script = tmp_path / "sendmail"
    script.write_text("#!/bin/sh\ncat >/dev/null\nexit 75\n")
    script.chmod(0o755)
    tm = transaction.TransactionManager(explicit=True)
    events = []
    mailer = Mailer(f"sendmail://{script}", transactional=True, transaction_manager=tm,
                    observers=[events.append])
    tm.begin()
    mailer.send(msg())
    tm.commit()  # does not raise
    assert {(e.status, e.code) for e in events} == {("deferred", 451)}
    assert len(events) == 2


def test_thread_local_managers_keep_transactions_apart(tmp_path):
    path = str(tmp_path / "q")
    mailer = Mailer(f"queue://{path}", transactional=True)  # transaction.manager
    results = {}

    def worker(name, commit):
        transaction.begin()
        results[name] = mailer.send(msg())
        if commit:
            transaction.commit()
        else:
            transaction.abort()

    threads_ = [threading.Thread(target=worker, args=(n, n == "yes")) for n in ("yes", "no")]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join(30)
    assert folders(path) == {"tmp": [], "new": [results["yes"]]}


class DirectAfterCommitTests(unittest.TestCase):
    timeout = 60

    def sink(self, **kw):
        s = AiosmtpdSink("127.0.0.1", **kw).start()
        self.addCleanup(lambda: threads.deferToThread(s.stop))
        return s

    def wait_events(self, events, n):
        d = defer.Deferred()

        def check(left=200):
            if len(events) >= n:
                d.callback(events)
            elif left == 0:
                d.errback(AssertionError(f"only {len(events)} events: {events}"))
            else:
                reactor.callLater(0.05, check, left - 1)

        check()
        return d

    @defer.inlineCallbacks
    def test_direct_delivery_starts_after_commit_and_reports(self):
        sink = self.sink(rcpt_reply=lambda r: "550 5.1.1 no such user"
                         if r.startswith("c@") else None)
        tm = transaction.TransactionManager(explicit=True)
        events = []
        mailer = Mailer(f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=10",
                        transactional=True, transaction_manager=tm, observers=[events.append])
        tm.begin()
        mid = mailer.send(msg())
        self.assertEqual(sink.messages, [])
        tm.commit()  # returns at once: commit never waits on the network
        yield self.wait_events(events, 2)
        self.assertEqual({(type(e), e.recipient) for e in events}, {
            (MailDelivered, "b@dest.test"), (MailBounced, "c@dest.test")})
        self.assertTrue(all(e.queue_id == mid for e in events))
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_direct_delivery_from_a_thread_and_an_unreachable_relay_is_reported(self):
        sink = self.sink()
        port = sink.port
        yield threads.deferToThread(sink.stop)  # nothing listens there now
        tm = transaction.TransactionManager(explicit=True)
        events = []
        mailer = Mailer(f"smtp://127.0.0.1:{port}?tls=none&timeout=5",
                        transactional=True, transaction_manager=tm, observers=[events.append])

        def in_thread():
            tm.begin()
            mailer.send(msg())
            tm.commit()

        yield threads.deferToThread(in_thread)
        yield self.wait_events(events, 2)
        self.assertEqual({(e.status, e.local) for e in events}, {("deferred", True)})
        self.assertFalse(any(e.will_retry for e in events))

    @defer.inlineCallbacks
    def test_direct_delivery_aborted_sends_nothing(self):
        sink = self.sink()
        tm = transaction.TransactionManager(explicit=True)
        mailer = Mailer(f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=5",
                        transactional=True, transaction_manager=tm)
        tm.begin()
        mailer.send(msg())
        tm.abort()
        d = defer.Deferred()
        reactor.callLater(0.3, d.callback, None)
        yield d
        self.assertEqual(sink.messages, [])
