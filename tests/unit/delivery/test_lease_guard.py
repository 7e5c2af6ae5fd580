"""The lease guard on a task.Clock, and the scheduler's use of it: with a
store whose leases expire, a delivery may finish only while the last
successful renewal still covers it (less a margin); failed renewals let it
lapse, a success brings it back."""

from __future__ import annotations

from twisted.internet import defer, task

from twisted_mailout.delivery.connector import Attempt
from twisted_mailout.delivery.lease import LeaseGuard
from twisted_mailout.delivery.scheduler import Scheduler
from twisted_mailout.envelope import Reply
from twisted_mailout.testing.memorystore import MemoryBackend, MemoryStore

MSG = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"


def test_the_guard_follows_renewals():
    clock = task.Clock()
    clock.advance(1000)
    g = LeaseGuard(clock, 60)
    assert g.may_finish()
    clock.advance(53)
    assert g.may_finish()
    clock.advance(1.5)  # inside the last tenth
    assert not g.may_finish()
    started = g.renewing()
    clock.advance(0.5)
    g.renewed(started)  # counted from the renewal's start
    assert g.may_finish() and g.until == started + 60


class Recording:
    """A connector that keeps each delivery's may_finish and answers later."""

    def __init__(self):
        self.calls = []

    def deliver(self, dest, sender, recipients, open_source, *a, **kw):
        open_source().close()
        d = defer.Deferred()
        self.calls.append((kw.get("may_finish"), recipients, d))
        return d

    def close(self):
        return defer.succeed(None)


def test_failed_renewals_forbid_the_final_dot():
    clock = task.Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock=clock.seconds)
    store = MemoryStore(backend, owner="d0", lease_duration=30)
    conn = Recording()
    sched = Scheduler(store, conn, clock)
    store.enqueue("a@example.com", ["b@example.org"], MSG)
    sched.start()
    clock.advance(0)
    [(may_finish, rcpts, d)] = conn.calls
    assert may_finish is not None and may_finish()
    backend.fail("renew", OSError("database unreachable"), times=100)
    for _ in range(3):
        clock.advance(10)  # heartbeats every 10 s, all failing
    assert not may_finish()  # 30 s since the last good renewal: no final dot
    d.callback(Attempt({r: Reply(451, "4.4.2 final dot not sent", local=True)
                        for r in rcpts}, None))
    sched.stop()


def test_a_store_held_alone_has_no_guard():
    from twisted_mailout.testing.memorystore import MemoryStore as Store

    clock = task.Clock()
    conn = Recording()
    store = Store()
    sched = Scheduler(store, conn, clock)
    store.enqueue("a@example.com", ["b@example.org"], MSG)
    sched.start()
    clock.advance(0)
    assert conn.calls[0][0] is None and sched.guard is None
