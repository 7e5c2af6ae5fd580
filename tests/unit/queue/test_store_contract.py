"""The queue-store contract: the folder store, the in-memory store and the
PostgreSQL store (slow lane: it needs the tests' private cluster) pass the
same tests of L{IQueueStore}'s documented behaviour; the leases of a shared
store are tested on the in-memory one here, and on PostgreSQL in
tests/integration/test_postgres_store.py."""

import inspect
import os

import pytest
from twisted.internet import task

from twisted_mailout.envelope import AddressError, RecipientState, Reply
from twisted_mailout.queue import (
    EntryNotFound,
    IQueueStore,
    LeaseLost,
    Queue,
)
from twisted_mailout.queue.model import ENVELOPE_HEADER
from twisted_mailout.testing.memorystore import MemoryBackend, MemoryStore

MSG = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n"
T0 = 1_800_000_000.0


class FolderCase:
    name = "folder"

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "q")

    def store(self):
        return Queue(self.path)

    def drop(self, store, name, data):
        with open(os.path.join(self.path, "new", name), "wb") as f:
            f.write(data)


class MemoryCase:
    name = "memory"

    def __init__(self, tmp_path):
        self.backend = MemoryBackend()

    def store(self):
        return MemoryStore(self.backend)

    def drop(self, store, name, data):
        store.inject(name, data)


class PostgresCase:
    """The PostgreSQL store on a fresh database of the tests' private cluster
    (slow lane). Every store object acts for one owner: a restart of the same
    daemon, as with the folder."""

    name = "postgresql"

    def __init__(self, tmp_path, uri):
        from twisted_mailout.queue.postgres import upgrade

        self.uri = uri
        upgrade(uri)

    def store(self):
        from twisted_mailout.queue.postgres import PostgresStore

        return PostgresStore(self.uri, owner="daemon-1", lease_duration=60)

    def drop(self, store, name, data):
        import psycopg

        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute("INSERT INTO mailout.message (qid, data) VALUES (%s, %s)", (name, data))


@pytest.fixture(params=[FolderCase, MemoryCase,
                        pytest.param(PostgresCase, marks=pytest.mark.slow)],
                ids=lambda c: c.name)
def case(request, tmp_path):
    if request.param is PostgresCase:
        return PostgresCase(tmp_path, request.getfixturevalue("pg_uri"))
    return request.param(tmp_path)


def listed(store):
    return [(x.where, x.entry.qid) for x in store.list_entries()]


def test_both_stores_implement_the_interface(case):
    store = case.store()
    assert isinstance(store, IQueueStore)
    for name, member in inspect.getmembers(IQueueStore, inspect.isfunction):
        if name.startswith("_"):
            continue
        wanted = list(inspect.signature(member).parameters)
        got = list(inspect.signature(getattr(store, name)).parameters)
        assert got == wanted[1:], (name, got, wanted)
    assert isinstance(store.owner, str) and store.owner
    assert isinstance(store.location, str)


def test_published_mail_is_listed_then_picked_up_pending_with_its_size(case):
    store = case.store()
    qid = store.enqueue("a@example.com", ["b@example.org", "c@example.org"], MSG)
    assert listed(store) == [("incoming", qid)]
    entries, problems = store.pickup()
    assert problems == [] and [e.qid for e in entries] == [qid]
    [entry] = entries
    assert entry.sender == "a@example.com"
    assert [r.address for r in entry.recipients] == ["b@example.org", "c@example.org"]
    assert all(r.state is RecipientState.PENDING for r in entry.recipients)
    assert entry.lease is not None and entry.lease.owner == store.owner
    with store.open_body(entry) as f:
        body = f.read()
    assert body.endswith(MSG) and b"Message-ID: <" in body  # Message-ID added
    assert entry.size == len(body)
    assert store.read_headers(entry).endswith(b"Subject: s\r\n")
    assert b"body" not in store.read_headers(entry)
    assert listed(store) == [("active", qid)]
    assert store.pickup() == ([], [])  # handed out once


def test_pickup_takes_the_oldest_first_and_at_most_limit(case):
    store = case.store()
    qids = [store.enqueue("a@example.com", [f"r{i}@example.org"], MSG) for i in range(5)]
    first, _ = store.pickup(2)
    rest, _ = store.pickup()
    assert [e.qid for e in first] == qids[:2]
    assert [e.qid for e in rest] == qids[2:]


def test_saved_state_is_loaded_back_and_recovered_by_the_next_daemon(case):
    store = case.store()
    qid = store.enqueue("a@example.com", ["b@example.org", "c@example.org"], MSG)
    fresh = store.enqueue("a@example.com", ["d@example.org"], MSG)
    entries, _ = store.pickup()
    entry = entries[0]
    entry.recipients[0].attempts = 1
    entry.recipients[0].move(RecipientState.DELIVERED, Reply(250, "2.0.0 ok"))
    entry.recipients[1].attempts = 1
    entry.recipients[1].move(RecipientState.DEFERRED, Reply(451, "4.3.0 later"), T0 + 300)
    store.save_many([entry])
    again = store.load(qid)
    assert again.to_json() == entry.to_json() and again.size == entry.size
    assert store.load(fresh).recipients[0].state is RecipientState.PENDING
    # A restart: a new store object over the same queue.
    due, problems, _ = case.store().recover()
    assert problems == []
    assert sorted(due) == sorted([(qid, T0 + 300), (fresh, None)])


def test_removed_entries_are_gone_and_removing_twice_is_fine(case):
    store = case.store()
    qid = store.enqueue("a@example.com", ["b@example.org"], MSG)
    [entry], _ = store.pickup()
    store.save_many([entry])
    store.remove_many([qid])
    store.remove_many([qid])
    with pytest.raises(EntryNotFound):
        store.load(qid)
    assert listed(store) == []
    assert case.store().recover() == ([], [], [])


def test_quarantined_entries_leave_the_active_queue(case):
    store = case.store()
    qid = store.enqueue("a@example.com", ["b@example.org"], MSG)
    store.pickup()
    store.quarantine(qid, "operator asked")
    with pytest.raises(EntryNotFound):
        store.load(qid)
    assert listed(store) == []


def test_an_unparseable_message_is_set_aside_and_the_rest_picked_up(case):
    store = case.store()
    case.drop(store, "0BAD", ENVELOPE_HEADER + b'{"v":1,"sender":"a@example.com"}\nx\n')
    good = store.enqueue("a@example.com", ["b@example.org"], MSG)
    entries, problems = store.pickup()
    assert [e.qid for e in entries] == [good]
    assert len(problems) == 1 and "0BAD" in problems[0]
    assert listed(store) == [("active", good)]


def test_enqueue_many_is_all_or_nothing(case):
    store = case.store()
    items = [("a@example.com", ["ok@example.org"], MSG), ("a@example.com", ["no at"], MSG)]
    with pytest.raises(AddressError, match="item 1"):
        store.enqueue_many(items)
    assert listed(store) == []
    qids = store.enqueue_many(items[:1] * 3)
    assert [q for _, q in listed(store)] == qids


def test_staged_mail_is_invisible_until_published_and_gone_when_discarded(case):
    store = case.store()
    kept = store.stage("a@example.com", ["b@example.org"], MSG)
    dropped = store.stage("a@example.com", ["c@example.org"], MSG, sync=False)
    store.sync_staged([dropped])
    assert listed(store) == [] and store.pickup() == ([], [])
    store.discard([dropped])
    assert store.publish([kept]) == [kept.qid]
    assert listed(store) == [("incoming", kept.qid)]
    assert [e.qid for e in store.pickup().entries] == [kept.qid]


def test_leases_of_a_store_held_alone_never_expire(case):
    store = case.store()
    if store.lease_duration is not None:
        pytest.skip("a shared store")
    store.enqueue("a@example.com", ["b@example.org"], MSG)
    [entry], _ = store.pickup()
    assert entry.lease.expires == float("inf")
    assert store.renew() == float("inf")
    store.release([entry.qid])  # nothing to do, nothing breaks
    store.save_many([entry])


# -- leases, on the in-memory store (the behaviour a shared store must have) ----------


@pytest.fixture
def shared():
    clock = task.Clock()
    clock.advance(T0)
    backend = MemoryBackend(clock=clock.seconds)
    return clock, [MemoryStore(backend, owner=f"d{i}", lease_duration=60) for i in range(2)]


def test_an_entry_is_held_by_one_owner_until_its_lease_expires(shared):
    clock, (one, two) = shared
    qid = one.enqueue("a@example.com", ["b@example.org"], MSG)
    [entry], _ = one.pickup()
    assert entry.lease.owner == "d0"
    assert entry.lease.expires == T0 + 60
    assert two.pickup() == ([], [])
    assert two.recover() == ([], [], [])  # held by a live owner
    clock.advance(59)
    assert two.pickup() == ([], [])
    clock.advance(1)
    [taken], _ = two.pickup()  # expired: taken over, as last saved
    assert taken.qid == qid and taken.lease.owner == "d1"
    with pytest.raises(LeaseLost):
        one.save_many([entry])
    with pytest.raises(LeaseLost):
        one.remove_many([qid])
    two.remove_many([qid])


def test_renewing_keeps_the_lease_and_releasing_gives_it_back(shared):
    clock, (one, two) = shared
    qid = one.enqueue("a@example.com", ["b@example.org"], MSG)
    one.pickup()
    clock.advance(50)
    assert one.renew() == T0 + 110
    clock.advance(50)
    assert two.pickup() == ([], [])  # renewed at 50: still held at 100
    one.release([qid])
    assert [e.qid for e in two.pickup().entries] == [qid]


def test_a_batch_write_refuses_only_the_entries_whose_lease_was_lost(shared):
    clock, (one, two) = shared
    lost = one.enqueue("a@example.com", ["b@example.org"], MSG)
    [old], _ = one.pickup()
    clock.advance(61)
    [taken], _ = two.pickup()  # d1 takes `lost` over
    kept = one.enqueue("a@example.com", ["c@example.org"], MSG)
    [mine], _ = one.pickup()
    for entry in (old, mine):
        entry.recipients[0].attempts = 1
        entry.recipients[0].move(RecipientState.DEFERRED, Reply(451, "4.3.0 later"), T0 + 900)
    with pytest.raises(LeaseLost) as caught:
        one.save_many([old, mine])
    assert caught.value.qids == {lost}
    assert one.load(kept).recipients[0].attempts == 1  # written all the same
    assert two.load(lost).recipients[0].attempts == 0  # untouched
    with pytest.raises(LeaseLost) as caught:
        one.remove_many([lost, kept])
    assert caught.value.qids == {lost}
    assert [x.entry.qid for x in two.list_entries()] == [lost]


def test_suspensions_are_saved_and_replaced_whole(case):
    from twisted_mailout.queue.model import Suspension

    s = case.store()
    assert s.suspensions() == []
    one = Suspension("a1", "example.org", "asked", T0, T0 + 60)
    two = Suspension("b2", "example.net", "", T0, T0 + 120)
    s.save_suspensions([one, two])
    assert case.store().suspensions() == [one, two]  # another store object sees them
    s.save_suspensions([two])
    assert case.store().suspensions() == [two]


def test_held_entries_are_not_recovered_for_delivery(case):
    s = case.store()
    held = s.enqueue("a@example.com", ["b@example.org"], MSG)
    free = s.enqueue("a@example.com", ["c@example.org"], MSG)
    s.pickup()
    e = s.load(held)
    e.hold(T0)
    s.save_many([e])
    again = case.store()
    due, _, on_hold = again.recover()
    assert [q for q, _ in due] == [free] and on_hold == [held]
    assert again.load(held).held


def test_iter_entries_is_lazy_and_matches_list_entries(case):
    s = case.store()
    for i in range(3):
        s.enqueue("a@example.com", [f"r{i}@example.org"], MSG)
    it = s.iter_entries()
    first = next(it)
    assert first.where == "incoming" and first.entry.size is not None
    assert [x.entry.qid for x in [first, *it]] == [x.entry.qid for x in s.list_entries()]
