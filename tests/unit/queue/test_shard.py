"""A worker's share of a queue folder (queue/shard.py)."""

from __future__ import annotations

import os

import pytest

from twisted_mailout.errors import QueueLocked
from twisted_mailout.queue.shard import ShardQueue, shard_of
from twisted_mailout.queue.store import Queue

MSG = b"Subject: hi\r\n\r\nbody\r\n"


def _fill(path, n):
    q = Queue(str(path))
    return q.enqueue_many([("a@example.com", [f"r{i}@d{i % 7}.test"], MSG) for i in range(n)])


def test_every_message_belongs_to_exactly_one_worker(tmp_path):
    qids = _fill(tmp_path, 200)
    shards = [ShardQueue(str(tmp_path), i, 3) for i in range(3)]
    picked = [set(e.qid for e in s.pickup().entries) for s in shards]
    assert set.union(*picked) == set(qids)
    assert sum(len(p) for p in picked) == len(qids)
    assert all(p for p in picked)  # 200 ids spread over all three
    for i, p in enumerate(picked):
        assert all(shard_of(q, 3) == i for q in p)
    assert not any(s.pickup().entries for s in shards)  # nothing twice


def test_recovery_takes_only_the_workers_own_messages(tmp_path):
    qids = _fill(tmp_path, 60)
    a, b = ShardQueue(str(tmp_path), 0, 2), ShardQueue(str(tmp_path), 1, 2)
    a.pickup()
    b.pickup()
    # worker 1 is killed (-9) and restarted: it recovers its own share only
    b2 = ShardQueue(str(tmp_path), 1, 2)
    due = {q for q, _ in b2.recover().due}
    assert due == {q for q in qids if shard_of(q, 2) == 1}
    assert {q for q, _ in a.recover().due} == set(qids) - due


def test_a_foreign_file_belongs_to_the_worker_of_its_future_queue_id(tmp_path):
    Queue(str(tmp_path))
    name = "1700000000.zope.host"
    (tmp_path / "new" / name).write_bytes(
        b"X-Zope-From: a@example.com\nX-Zope-To: b@example.org\n" + MSG)
    owners = [s for s in (ShardQueue(str(tmp_path), i, 4) for i in range(4))
              if s.incoming()]
    assert len(owners) == 1
    (entry,) = owners[0].pickup().entries
    assert owners[0].mine(entry.qid)  # after pickup, still its own
    assert shard_of(name, 4) == shard_of(entry.qid, 4)


def test_listing_shows_the_share_and_one_process_per_share(tmp_path):
    qids = _fill(tmp_path, 30)
    s = ShardQueue(str(tmp_path), 0, 2)
    s.pickup()
    listed = {le.entry.qid for le in s.iter_entries()}
    assert listed == {q for q in qids if shard_of(q, 2) == 0}
    s.lock()
    with pytest.raises(QueueLocked, match="worker 0"):
        ShardQueue(str(tmp_path), 0, 2).lock()
    ShardQueue(str(tmp_path), 1, 2).lock()  # another share is free
    assert open(s.lock_path).read().strip() == str(os.getpid())


def test_out_of_range():
    with pytest.raises(ValueError):
        ShardQueue("/nonexistent-never-created", 2, 2)
