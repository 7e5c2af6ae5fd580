"""The connection table shared by worker processes (delivery/limits.py)."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from twisted_mailout.delivery.limits import SharedLimits, SharedLimitsError


@pytest.fixture
def table(tmp_path):
    path = str(tmp_path / "limits")
    SharedLimits.create(path, max_workers=4, slots=8)
    views = [SharedLimits(path, w) for w in range(4)]
    yield path, views
    for v in views:
        v.close()


def test_the_per_destination_limit_holds_across_workers(table):
    _, (a, b, *_) = table
    assert a.try_open("d.test", limit=2, global_limit=10)
    assert b.try_open("d.test", limit=2, global_limit=10)
    assert not a.try_open("d.test", limit=2, global_limit=10)
    assert not b.try_open("d.test", limit=2, global_limit=10)
    assert b.try_open("other.test", limit=2, global_limit=10)
    assert a.connections("d.test") == 2 and a.connections() == 3
    b.closed("d.test")
    assert a.try_open("d.test", limit=2, global_limit=10)


def test_the_global_and_group_limits_hold_across_workers(table):
    _, (a, b, c, _) = table
    assert a.try_open("x.test", 5, 3)
    assert b.try_open("y.test", 5, 3)
    assert c.try_open("z.test", 5, 3)
    assert not a.try_open("w.test", 5, 3)
    a.closed("x.test")
    assert a.try_open("g1.test", 5, 10, group="google", group_limit=2)
    assert b.try_open("g2.test", 5, 10, group="google", group_limit=2)
    assert not c.try_open("g3.test", 5, 10, group="google", group_limit=2)
    b.closed("g2.test", group="google")
    assert c.try_open("g3.test", 5, 10, group="google", group_limit=2)


def test_a_dead_workers_counts_are_reset(table):
    path, (a, b, *_) = table
    assert a.try_open("d.test", 1, 10)
    assert not b.try_open("d.test", 1, 10)
    SharedLimits.reset(path, 0)  # the parent, before restarting worker 0
    assert b.try_open("d.test", 1, 10)
    assert b.connections() == 1


def test_waiting_is_seen_by_the_others(table):
    _, (a, b, *_) = table
    assert not a.others_waiting("d.test") and not a.others_waiting()
    b.want("d.test", True)
    assert a.others_waiting("d.test") and a.others_waiting()
    assert not b.others_waiting("d.test")  # its own wait does not count
    b.want("d.test", True)  # idempotent
    b.want("d.test", False)
    assert not a.others_waiting("d.test") and not a.others_waiting()


def test_a_full_table_reuses_the_slots_of_closed_destinations(table):
    _, (a, *_) = table
    for i in range(8):
        assert a.try_open(f"d{i}.test", 1, 100)
    with pytest.raises(SharedLimitsError, match="full"):
        a.try_open("d8.test", 1, 100)
    a.closed("d3.test")
    assert a.try_open("d8.test", 1, 100)
    assert a.connections("d8.test") == 1 and a.connections("d4.test") == 1
    assert a.connections() == 8


def test_not_a_table_and_out_of_range(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"x" * 64)
    with pytest.raises(SharedLimitsError, match="not a version"):
        SharedLimits(str(bad), 0)
    with pytest.raises(SharedLimitsError, match="cannot open"):
        SharedLimits(str(tmp_path / "missing"), 0)
    path = str(tmp_path / "limits")
    SharedLimits.create(path, max_workers=2, slots=4)
    with pytest.raises(SharedLimitsError, match="out of range"):
        SharedLimits(path, 2)


def _hammer(path: str, worker: int, rounds: int, out) -> None:
    t = SharedLimits(path, worker)
    peak = 0
    for _ in range(rounds):
        if t.try_open("hot.test", 3, 100):
            peak = max(peak, t.connections("hot.test"))
            t.closed("hot.test")
    out.put(peak)


def test_processes_racing_never_exceed_the_limit(tmp_path):
    path = str(tmp_path / "limits")
    SharedLimits.create(path, max_workers=4, slots=16)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(path, w, 2000, out)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    peaks = [out.get(timeout=5) for _ in procs]
    assert max(peaks) <= 3 and max(peaks) >= 1
    assert SharedLimits(path, 0).connections() == 0
    assert os.path.getsize(path) > 0


def test_a_dead_workers_waits_end_with_its_reset(table):
    path, (a, b, *_) = table
    b.want("d.test", True)
    assert a.others_waiting() and a.others_waiting("d.test")
    SharedLimits.reset(path, 1)  # worker 1 died while it waited
    assert not a.others_waiting() and not a.others_waiting("d.test")
