"""Fairness under slow destinations (issue 14): one destination's slow
deliveries must not take the places in flight of everyone else's mail.

Driven by a task.Clock, the in-memory store and a connector whose
deliveries to ``slow.test`` wait until the test answers them, while every
other destination answers at once."""

import random

import pytest

from twisted.internet import defer, task

from twisted_mailout.delivery.connector import Attempt
from twisted_mailout.delivery.pool import ConnectionPool, PoolLimits
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler
from twisted_mailout.envelope import Reply
from twisted_mailout.testing.memorystore import MemoryBackend, MemoryStore

MSG = b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m1@example.com>\r\n\r\nbody\r\n"
OK = Reply(250, "2.0.0 Ok: queued")


class Limits:
    """The part of the connection pool the scheduler asks: each
    destination's connection limit."""

    def __init__(self, per_destination):
        self.per_destination = per_destination

    def limit_for(self, key):
        return self.per_destination


class SlowAndFast:
    """Deliveries to ``slow.test`` wait for :meth:`answer`; others succeed."""

    def __init__(self, per_destination=2):
        self.pool = Limits(per_destination)
        self.waiting = []  # (dest, recipients, Deferred), in the order called
        self.fast = []  # recipients delivered at once

    def deliver(self, dest, sender, recipients, open_source, size=None, smtputf8=False,
                eightbit=False, **kw):
        with open_source() as f:
            f.read()
        if dest == "slow.test":
            d = defer.Deferred()
            self.waiting.append((dest, list(recipients), d))
            return d
        self.fast.extend(recipients)
        return defer.succeed(Attempt({r: OK for r in recipients}, f"mx.{dest}[192.0.2.1]:25"))

    def outstanding(self):
        return [w for w in self.waiting if not w[2].called]

    def answer_first(self):
        dest, rcpts, d = self.outstanding()[0]
        d.callback(Attempt({r: OK for r in rcpts}, f"mx.{dest}[192.0.2.2]:25"))
        return rcpts

    def close(self):
        return defer.succeed(None)


def scheduler(connector, store=None, clock=None, **kw):
    clock = clock or task.Clock()
    if not clock.seconds():
        clock.advance(1_800_000_000)
    store = store or MemoryStore(clock=clock.seconds)
    sched = Scheduler(store, connector, clock, reporting_mta="mx.mailout.test",
                      rng=random.Random(0),
                      retry=RetryPolicy(base=300, max=300, jitter=0), **kw)
    return store, sched, clock


def queued_ids(store):
    return {x.entry.qid for x in store.list_entries()}


def test_mail_to_other_destinations_flows_while_a_slow_one_hangs():
    """30 messages to a destination whose deliveries hang, queued before 10
    to another: with 10 places in flight, the slow destination takes at
    most its share (twice its connection limit of 2), and the other mail is
    delivered at once instead of waiting behind it."""
    conn = SlowAndFast(per_destination=2)
    store, sched, clock = scheduler(conn, max_inflight=10)
    slow = [store.enqueue("s@origin.test", [f"s{i}@slow.test"], MSG) for i in range(30)]
    fast = [store.enqueue("s@origin.test", [f"f{i}@fast.test"], MSG) for i in range(10)]
    sched.start()
    assert sorted(conn.fast) == sorted(f"f{i}@fast.test" for i in range(10))
    assert queued_ids(store) == set(slow)  # the fast mail is delivered and removed
    assert len(conn.outstanding()) == 4  # the slow destination's share, no more
    assert len(sched.in_flight()) == 4
    assert sched.queued() == 30  # the others wait for their destination, counted
    assert fast  # (queued after the slow mail)


def test_a_slow_destination_still_gets_its_share_in_arrival_order():
    """Each delivery to the slow destination that ends lets exactly one of
    its waiting messages go, oldest first, until all are delivered."""
    conn = SlowAndFast(per_destination=2)
    store, sched, clock = scheduler(conn, max_inflight=10)
    for i in range(12):
        store.enqueue("s@origin.test", [f"s{i}@slow.test"], MSG)
    sched.start()
    order = []
    while conn.outstanding():
        assert len(conn.outstanding()) <= 4
        order += conn.answer_first()
    assert order == [f"s{i}@slow.test" for i in range(12)]
    assert queued_ids(store) == set()
    assert sched.queued() == 0 and sched.idle


def test_an_explicit_share_and_no_share_when_relaying():
    conn = SlowAndFast(per_destination=2)
    store, sched, clock = scheduler(conn, max_inflight=10, max_inflight_per_destination=1)
    for i in range(5):
        store.enqueue("s@origin.test", [f"s{i}@slow.test"], MSG)
    sched.start()
    assert len(conn.outstanding()) == 1

    class Relay(SlowAndFast):
        def deliver(self, dest, *args, **kw):
            return super().deliver("slow.test", *args, **kw)  # the one relay

    relay = Relay(per_destination=2)
    store, sched, clock = scheduler(relay, max_inflight=10, relay=True)
    for i in range(15):
        store.enqueue("s@origin.test", [f"s{i}@d{i}.test"], MSG)
    sched.start()
    assert len(relay.outstanding()) == 10  # one destination: max_inflight alone


def test_a_message_with_a_slow_and_a_fast_recipient_counts_in_both():
    conn = SlowAndFast(per_destination=1)  # share: 2
    store, sched, clock = scheduler(conn, max_inflight=10)
    for i in range(3):
        store.enqueue("s@origin.test", [f"s{i}@slow.test", f"f{i}@fast.test"], MSG)
    sched.start()
    assert len(conn.outstanding()) == 2 and len(conn.fast) == 2
    conn.answer_first()
    assert len(conn.outstanding()) == 2 and len(conn.fast) == 3
    while conn.outstanding():
        conn.answer_first()
    assert queued_ids(store) == set()


def test_the_operator_takes_a_waiting_message_at_once_and_gives_it_back():
    conn = SlowAndFast(per_destination=1)  # share: 2
    store, sched, clock = scheduler(conn, max_inflight=10)
    ids = [store.enqueue("s@origin.test", [f"s{i}@slow.test"], MSG) for i in range(4)]
    sched.start()
    assert sched.due_time(ids[2]) is not None  # waiting, with its due time
    taken = sched.take([ids[2]])
    assert taken.called and taken.result == [ids[2]]  # nothing to wait for
    assert sched.due_time(ids[2]) is None and sched.queued() == 3
    conn.answer_first()
    assert conn.outstanding()[-1][1] == ["s3@slow.test"]  # the taken one was skipped
    sched.give_back(ids[2], clock.seconds())
    while conn.outstanding():
        conn.answer_first()
    assert queued_ids(store) == set()
    assert [w[1][0] for w in conn.waiting] == [
        "s0@slow.test", "s1@slow.test", "s3@slow.test", "s2@slow.test"]


def test_shape_counts_waiting_messages_as_active():
    conn = SlowAndFast(per_destination=1)
    store, sched, clock = scheduler(conn, max_inflight=10)
    for i in range(5):
        store.enqueue("s@origin.test", [f"s{i}@slow.test"], MSG)
    sched.start()
    shape = sched.shape(clock.seconds(), max_age=0)
    assert shape["active"] == 5 and shape["deferred"] == 0


def test_a_stopping_daemon_gives_back_the_leases_of_waiting_messages():
    clock = task.Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock=clock.seconds)
    conn = SlowAndFast(per_destination=1)
    one = MemoryStore(backend, owner="one", lease_duration=60)
    store, sched, clock = scheduler(conn, store=one, clock=clock, max_inflight=10)
    ids = [one.enqueue("s@origin.test", [f"s{i}@slow.test"], MSG) for i in range(4)]
    sched.start()
    assert len(conn.outstanding()) == 2
    sched.stop(timeout=1)
    clock.advance(1)
    two = MemoryStore(backend, owner="two", lease_duration=60)
    assert sorted(e.qid for e in two.pickup().entries) == sorted(ids[2:])


def test_the_pool_tells_each_destinations_connection_limit():
    pool = ConnectionPool(task.Clock(), lambda key: defer.Deferred(),
                          PoolLimits(max_connections=20, max_per_destination=4))
    assert pool.limit_for("unknown.test") == 4
    pool.shape("own.test", limit=7)
    assert pool.limit_for("own.test") == 7
    pool.shape("member.test", group="provider:x", group_limit=3)
    assert pool.limit_for("member.test") == 3


# -- the pool: a slow destination's connections (PoolLimits.slow_start) ------


def _pool(slow_start):
    from tests.unit.delivery.test_pool import Opener

    clock = task.Clock()
    opener = Opener(clock)
    pool = ConnectionPool(clock, opener, PoolLimits(
        max_connections=3, max_per_destination=3, slow_start=slow_start,
        slow_transaction=2.0))
    return pool, opener, clock


def test_a_new_destination_opens_one_connection_then_more_as_transactions_end_quickly():
    pool, opener, clock = _pool(slow_start=1)
    a, b, c = (pool.acquire("a.test") for _ in range(3))
    assert len(opener.pending) == 1  # one, until it has carried a transaction
    opener.succeed()
    lease = a.result
    clock.advance(0.1)
    pool.release(lease, reusable=True)  # quick: the window widens to 2
    assert len(opener.pending) == 1 and c.result is lease  # one more opening, and reuse
    opener.succeed()
    assert b.called and pool.connections_to("a.test") == 2


def _slow_has_two_busy_connections(pool, opener, clock, slow_start):
    if slow_start is None:
        first, second = pool.acquire("slow.test"), pool.acquire("slow.test")
        opener.succeed()
        opener.succeed()
        return [first.result, second.result]
    first, second = pool.acquire("slow.test"), pool.acquire("slow.test")
    opener.succeed()
    clock.advance(30)
    lease = first.result
    pool.release(lease, reusable=True)  # slow, but nobody else waits: widened to 2
    assert second.result is lease
    third = pool.acquire("slow.test")
    opener.succeed()
    return [lease, third.result]


@pytest.mark.parametrize("slow_start", [1, None])
def test_a_slow_destination_gives_up_connections_beyond_one_while_others_wait(slow_start):
    """A destination whose transactions take 30 s holds two connections of
    three; another takes the third and a third destination waits for the
    global limit. When one of the slow transactions ends, its connection
    goes to the waiting destination, not to the slow one's own next
    message (with slow_start; without it, the old rule keeps it)."""
    pool, opener, clock = _pool(slow_start)
    s1, s2 = _slow_has_two_busy_connections(pool, opener, clock, slow_start)
    pool.acquire("fast.test")
    opener.succeed()
    waiting = pool.acquire("other.test")  # the global limit (3) is reached
    assert not opener.pending and pool.open_connections == 3
    mine = pool.acquire("slow.test")
    clock.advance(30)
    pool.release(s1, reusable=True)
    if slow_start is None:
        assert mine.result is s1 and not waiting.called  # before issue 14
        return
    assert [k for k, _ in opener.pending] == ["other.test"]
    assert not mine.called and pool.connections_to("slow.test") == 1
    opener.succeed()
    assert waiting.called
    clock.advance(30)
    pool.release(s2, reusable=True)  # its one connection now serves its own mail
    assert mine.result is s2
