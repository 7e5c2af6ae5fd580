"""Two workers' pools on one shared connection table (delivery/limits.py):
the limits hold across them, a waiting worker gets a slot the other gives
up, and a dead worker's slots come back when the parent resets them."""

from __future__ import annotations

import pytest
from twisted.internet import task

from tests.unit.delivery.test_pool import Opener
from twisted_mailout.delivery.limits import SharedLimits
from twisted_mailout.delivery.pool import ConnectionPool, PoolLimits


@pytest.fixture
def two(tmp_path):
    path = str(tmp_path / "limits")
    SharedLimits.create(path, max_workers=4, slots=64)
    clock = task.Clock()
    tables = [SharedLimits(path, w) for w in (0, 1)]
    openers = [Opener(clock), Opener(clock)]
    limits = PoolLimits(max_connections=3, max_per_destination=1, idle_timeout=60)
    pools = [ConnectionPool(clock, o, limits, shared=t) for o, t in zip(openers, tables)]
    yield clock, pools, openers, tables, path
    for t in tables:
        t.close()


def test_the_per_destination_limit_holds_across_two_pools(two):
    clock, (a, b), (oa, ob), (ta, _), _ = two
    da = a.acquire("d.test")
    oa.succeed()
    lease_a = da.result
    db = b.acquire("d.test")
    assert ob.pending == [] and not db.called  # the other worker holds the one slot
    assert ta.others_waiting("d.test")
    clock.advance(1)
    assert ob.pending == []  # still held: no opening, however long it waits
    a.release(lease_a, reusable=True)  # another worker waits: given up, not kept idle
    assert a.idle_connections() == 0
    clock.advance(ConnectionPool.SHARED_TICK)
    assert len(ob.pending) == 1
    ob.succeed()
    assert db.called and ta.connections("d.test") == 1
    assert not ta.others_waiting("d.test")


def test_the_global_limit_holds_and_idle_connections_are_given_up(two):
    clock, (a, b), (oa, ob), (ta, _), _ = two
    leases = []
    for k in ("x.test", "y.test", "z.test"):
        d = a.acquire(k)
        oa.succeed()
        leases.append(d.result)
    for lease in leases:
        a.release(lease, reusable=True)  # nobody waits: kept idle for reuse
    assert a.idle_connections() == 3
    db = b.acquire("w.test")
    assert ob.pending == [] and not db.called  # 3 of 3 counted, all in worker 0
    for _ in range(4):
        clock.advance(ConnectionPool.SHARED_TICK * 4)
    assert a.idle_connections() < 3  # worker 0 closed an idle one for worker 1
    assert len(ob.pending) == 1
    ob.succeed()
    assert db.called
    assert ta.connections() <= 3


def test_a_dead_workers_slots_return_after_the_reset(two):
    clock, (a, b), (oa, ob), _, path = two
    a.acquire("d.test")
    oa.succeed()  # worker 0 holds d.test's slot, then is killed (-9)
    db = b.acquire("d.test")
    clock.advance(1)
    assert ob.pending == []
    SharedLimits.reset(path, 0)  # the parent, before it starts worker 0 again
    clock.advance(ConnectionPool.SHARED_TICK)
    assert len(ob.pending) == 1
    ob.succeed()
    assert db.called


def test_without_a_table_nothing_changes(tmp_path):
    clock = task.Clock()
    o = Opener(clock)
    pool = ConnectionPool(clock, o, PoolLimits(max_connections=2, max_per_destination=1))
    pool.acquire("d.test")
    pool.acquire("d.test")
    assert len(o.pending) == 1
    assert clock.getDelayedCalls() == []  # no polling in a single process
