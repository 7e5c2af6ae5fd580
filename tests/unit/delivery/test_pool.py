"""The connection pool's rules, driven by a Clock and fake sessions: limits,
reuse, idle expiry, waiters and the hand-off when a transaction ends,
dead-destination memory, and cancellation."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from twisted_mailout.delivery.pool import (
    ConnectionPool,
    DestinationDown,
    Lease,
    Opened,
    PoolClosed,
    PoolLimits,
)


class FakeSession:
    """A connection: QUIT closes it when the test says so (or at once)."""

    def __init__(self, clock: task.Clock, name: str, close_on_quit: bool = True):
        self.name = name
        self.usable = True
        self.transactions = 0
        self.created = clock.seconds()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.quits = 0
        self.close_on_quit = close_on_quit

    def quit(self) -> defer.Deferred[None]:
        self.quits += 1
        self.usable = False
        if self.close_on_quit:
            self.lose()
        return defer.succeed(None)

    def lose(self) -> None:
        if not self.closed.called:
            self.usable = False
            self.closed.callback(None)


class Opener:
    """Opens connections when the test says so; records every opening."""

    def __init__(self, clock: task.Clock, close_on_quit: bool = True):
        self.clock = clock
        self.close_on_quit = close_on_quit
        self.pending: list[tuple[str, defer.Deferred[Opened[FakeSession]]]] = []
        self.cancelled: list[str] = []
        self.count = 0

    def __call__(self, key: str) -> defer.Deferred[Opened[FakeSession]]:
        def cancel(_d: defer.Deferred[Opened[FakeSession]]) -> None:
            self.cancelled.append(key)

        d: defer.Deferred[Opened[FakeSession]] = defer.Deferred(cancel)
        self.pending.append((key, d))
        return d

    def succeed(self, index: int = 0) -> FakeSession:
        key, d = self.pending.pop(index)
        self.count += 1
        s = FakeSession(self.clock, f"{key}#{self.count}", self.close_on_quit)
        d.callback(Opened(s, f"mx.{key}[192.0.2.{self.count}]:25"))
        return s

    def fail(self, exc: Exception, index: int = 0) -> None:
        _key, d = self.pending.pop(index)
        d.errback(Failure(exc))


class Unreachable(Exception):
    pass


def make(limits: PoolLimits, close_on_quit: bool = True
         ) -> tuple[task.Clock, Opener, ConnectionPool[FakeSession]]:
    clock = task.Clock()
    opener = Opener(clock, close_on_quit)
    return clock, opener, ConnectionPool(clock, opener, limits, remember=(Unreachable,))


def result(d: defer.Deferred[Lease[FakeSession]]) -> Lease[FakeSession]:
    """The lease C{d} has fired with; fails the test if it has not fired."""
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    value = box[0]
    if isinstance(value, Failure):
        value.raiseException()
    assert isinstance(value, Lease)
    return value


def failure(d: defer.Deferred[Lease[FakeSession]]) -> BaseException:
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    return box[0].value


def test_a_new_connection_is_opened_and_counted_until_closed() -> None:
    clock, opener, pool = make(PoolLimits())
    d = pool.acquire("a.test")
    assert not d.called and pool.open_connections == 1  # counted while opening
    session = opener.succeed()
    lease = result(d)
    assert lease.session is session and lease.label == "mx.a.test[192.0.2.1]:25"
    pool.release(lease, reusable=False)
    assert session.quits == 1 and pool.open_connections == 0


def test_an_idle_connection_is_reused_within_idle_timeout() -> None:
    clock, opener, pool = make(PoolLimits(idle_timeout=5))
    d = pool.acquire("a.test")
    opener.succeed()
    lease = result(d)
    pool.release(lease, reusable=True)
    assert pool.idle_to("a.test") == 1
    clock.advance(4.9)
    again = result(pool.acquire("a.test"))
    assert again is lease and opener.pending == [] and opener.count == 1
    assert pool.idle_to("a.test") == 0


def test_an_idle_connection_is_quit_when_its_idle_timeout_passes() -> None:
    clock, opener, pool = make(PoolLimits(idle_timeout=5))
    d = pool.acquire("a.test")
    session = opener.succeed()
    pool.release(result(d), reusable=True)
    clock.advance(5)
    assert session.quits == 1
    assert pool.idle_to("a.test") == 0 and pool.open_connections == 0
    d2 = pool.acquire("a.test")
    assert not d2.called and len(opener.pending) == 1  # a new connection


@pytest.mark.parametrize("limit", ["max_messages", "max_age", "unusable"])
def test_a_connection_past_its_limits_is_not_reused(limit: str) -> None:
    clock, opener, pool = make(PoolLimits(idle_timeout=60, max_age=30, max_messages=2))
    d = pool.acquire("a.test")
    session = opener.succeed()
    lease = result(d)
    if limit == "max_messages":
        session.transactions = 2
    elif limit == "unusable":
        session.usable = False
    else:
        clock.advance(30)
    pool.release(lease, reusable=True)
    assert session.quits == 1 and pool.idle_to("a.test") == 0


def test_an_idle_connection_that_aged_is_quit_instead_of_handed_out() -> None:
    clock, opener, pool = make(PoolLimits(idle_timeout=60, max_age=30))
    d = pool.acquire("a.test")
    session = opener.succeed()
    pool.release(result(d), reusable=True)
    clock.advance(31)
    d2 = pool.acquire("a.test")
    assert session.quits == 1 and not d2.called and len(opener.pending) == 1


def test_per_destination_limit_makes_callers_wait_and_a_transaction_end_hands_over() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=1))
    first = pool.acquire("a.test")
    second = pool.acquire("a.test")
    opener.succeed()
    lease = result(first)
    assert not second.called and pool.waiting_for("a.test") == 1
    assert len(opener.pending) == 0  # no second opening: the limit is 1
    pool.release(lease, reusable=True)
    assert result(second) is lease and pool.waiting_for("a.test") == 0


def test_a_waiter_gets_a_new_connection_when_the_busy_one_closes() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=1), close_on_quit=False)
    first = pool.acquire("a.test")
    second = pool.acquire("a.test")
    session = opener.succeed()
    pool.release(result(first), reusable=False)  # QUIT sent, not yet closed
    assert not second.called and opener.pending == []
    session.lose()
    assert len(opener.pending) == 1
    opener.succeed()
    assert result(second).session is not session


def test_global_limit_closes_the_oldest_idle_connection_for_another_destination() -> None:
    clock, opener, pool = make(PoolLimits(max_connections=2, idle_timeout=60))
    leases = []
    for key in ("a.test", "b.test"):
        d = pool.acquire(key)
        opener.succeed()
        leases.append(result(d))
        clock.advance(1)
    for lease in leases:
        pool.release(lease, reusable=True)
    d = pool.acquire("c.test")
    assert leases[0].session.quits == 1 and leases[1].session.quits == 0
    assert len(opener.pending) == 1 and pool.open_connections == 2
    opener.succeed()
    assert result(d).key == "c.test"


def test_global_limit_hands_the_slot_to_a_blocked_destination_when_a_transaction_ends() -> None:
    clock, opener, pool = make(PoolLimits(max_connections=1, idle_timeout=120))
    da = pool.acquire("a.test")
    a_session = opener.succeed()
    lease = result(da)
    db = pool.acquire("b.test")
    assert not db.called and opener.pending == []
    pool.release(lease, reusable=True)
    # Not parked idle for 120 s: QUIT at once, and b's connection is opened.
    assert a_session.quits == 1 and pool.idle_to("a.test") == 0
    assert [k for k, _ in opener.pending] == ["b.test"]
    opener.succeed()
    assert result(db).key == "b.test" and pool.open_connections == 1


def test_a_failed_opening_remembers_the_destination_and_fails_its_waiters() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=1, failure_memory=60))
    first = pool.acquire("a.test")
    second = pool.acquire("a.test")
    opener.fail(Unreachable("all hosts refused"))
    for d in (first, second):
        e = failure(d)
        assert isinstance(e, DestinationDown) and isinstance(e.error, Unreachable)
    assert pool.open_connections == 0
    clock.advance(59)
    e = failure(pool.acquire("a.test"))
    assert isinstance(e, DestinationDown) and e.until == 60
    assert opener.pending == []  # not tried while remembered
    clock.advance(1)
    d = pool.acquire("a.test")
    assert len(opener.pending) == 1  # the memory expired: tried again
    opener.succeed()
    result(d)


def test_an_error_not_in_remember_is_not_remembered() -> None:
    clock, opener, pool = make(PoolLimits(failure_memory=60))
    d = pool.acquire("a.test")
    opener.fail(ZeroDivisionError("a bug"))
    assert isinstance(failure(d), ZeroDivisionError)
    pool.acquire("a.test")
    assert len(opener.pending) == 1


def test_no_memory_when_failure_memory_is_zero() -> None:
    clock, opener, pool = make(PoolLimits(failure_memory=0))
    d = pool.acquire("a.test")
    opener.fail(Unreachable("refused"))
    assert isinstance(failure(d), DestinationDown)
    pool.acquire("a.test")
    assert len(opener.pending) == 1


def test_cancelling_a_waiter_removes_it_and_the_next_waiter_is_served() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=1))
    first = pool.acquire("a.test")
    second = pool.acquire("a.test")
    third = pool.acquire("a.test")
    opener.succeed()
    lease = result(first)
    second.cancel()
    assert isinstance(failure(second), defer.CancelledError)
    assert pool.waiting_for("a.test") == 1
    pool.release(lease, reusable=True)
    assert result(third) is lease


def test_cancelling_a_waiter_blocked_by_the_global_limit_lets_the_connection_idle() -> None:
    clock, opener, pool = make(PoolLimits(max_connections=1, idle_timeout=10))
    da = pool.acquire("a.test")
    session = opener.succeed()
    lease = result(da)
    db = pool.acquire("b.test")
    db.cancel()
    assert isinstance(failure(db), defer.CancelledError)
    pool.release(lease, reusable=True)
    # Nobody waits any more: kept for reuse, not given up.
    assert session.quits == 0 and pool.idle_to("a.test") == 1 and opener.pending == []


def test_cancelling_during_the_opening_cancels_it_and_frees_the_slot() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=1, failure_memory=60))
    first = pool.acquire("a.test")
    second = pool.acquire("a.test")
    first.cancel()
    assert opener.cancelled == ["a.test"]
    assert isinstance(failure(first), defer.CancelledError)
    # Not remembered as down; the waiter gets the slot and a new opening.
    spent, _ = opener.pending.pop(0)  # the cancelled opening
    assert not second.called and [k for k, _ in opener.pending] == ["a.test"]
    assert pool.connections_to("a.test") == 1
    opener.succeed()
    assert result(second).key == "a.test" and pool.open_connections == 1


def test_discard_frees_the_slot_at_once_for_the_next_caller() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=1), close_on_quit=False)
    first = pool.acquire("a.test")
    second = pool.acquire("a.test")
    session = opener.succeed()
    pool.discard(result(first))  # the caller aborted the connection
    assert pool.connections_to("a.test") == 1  # counted again: second's opening
    assert len(opener.pending) == 1
    session.lose()  # the aborted connection closes later: not counted twice
    assert pool.connections_to("a.test") == 1
    opener.succeed()
    result(second)


def test_close_quits_idle_fails_waiters_and_refuses_new_callers() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=1, idle_timeout=60))
    d = pool.acquire("a.test")
    idle_session = opener.succeed()
    pool.release(result(d), reusable=True)
    busy = pool.acquire("b.test")
    busy_session = opener.succeed()
    busy_lease = result(busy)
    waiter = pool.acquire("b.test")
    closed = pool.close()
    assert closed.called and idle_session.quits == 1
    assert isinstance(failure(waiter), PoolClosed)
    assert isinstance(failure(pool.acquire("a.test")), PoolClosed)
    pool.release(busy_lease, reusable=True)  # not kept: the pool is closing
    assert busy_session.quits == 1 and pool.open_connections == 0
    assert clock.getDelayedCalls() == []


# -- traffic shaping: a destination's own limits, and groups (providers) -----------


def test_a_destination_limit_replaces_max_per_destination() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=4))
    pool.shape("slow.test", limit=1)
    first = pool.acquire("slow.test")
    second = pool.acquire("slow.test")
    assert pool.connections_to("slow.test") == 1 and not second.called
    opener.succeed()
    lease = result(first)
    pool.release(lease, reusable=True)
    assert result(second) is lease  # the one connection, handed over
    # others keep the pool's limit
    ds = [pool.acquire("other.test") for _ in range(5)]
    assert pool.connections_to("other.test") == 4 and not any(d.called for d in ds)


def test_a_group_limit_holds_across_its_destinations() -> None:
    clock, opener, pool = make(PoolLimits(max_per_destination=4, max_connections=20))
    for key in ("a.test", "b.test", "c.test"):
        pool.shape(key, group="provider:big", group_limit=2)
    da, db, dc = pool.acquire("a.test"), pool.acquire("b.test"), pool.acquire("c.test")
    assert pool.group_connections("provider:big") == 2 and len(opener.pending) == 2
    assert pool.waiting_for("c.test") == 1
    opener.succeed()
    opener.succeed()
    la = result(da)
    result(db)
    # a.test's connection given back while c.test waits at the group limit:
    # it goes (QUIT), and c.test opens its own
    pool.release(la, reusable=True)
    assert la.session.quits == 1 and pool.idle_to("a.test") == 0
    assert len(opener.pending) == 1 and opener.pending[0][0] == "c.test"
    assert pool.group_connections("provider:big") == 2
    opener.succeed()
    assert result(dc).key == "c.test"


def test_a_closed_member_frees_a_group_slot_for_another_member() -> None:
    clock, opener, pool = make(PoolLimits())
    for key in ("a.test", "b.test"):
        pool.shape(key, group="g", group_limit=1)
    da, db = pool.acquire("a.test"), pool.acquire("b.test")
    session = opener.succeed()
    result(da)
    assert opener.pending == []
    session.lose()  # the server went away: its slot goes to b.test at once
    assert [k for k, _ in opener.pending] == ["b.test"]
    assert pool.group_connections("g") == 1 and pool.connections_to("a.test") == 0
    opener.succeed()
    result(db)


def test_max_messages_per_destination() -> None:
    clock, opener, pool = make(PoolLimits(max_messages=100))
    pool.shape("few.test", max_messages=2)
    d = pool.acquire("few.test")
    session = opener.succeed()
    lease = result(d)
    session.transactions = 2
    pool.release(lease, reusable=True)
    assert session.quits == 1  # not reused past two transactions
    assert pool.idle_to("few.test") == 0


def test_a_group_limit_below_one_is_refused() -> None:
    clock, opener, pool = make(PoolLimits())
    with pytest.raises(ValueError):
        pool.shape("a.test", group="g")
    with pytest.raises(ValueError):
        pool.shape("a.test", limit=0)
