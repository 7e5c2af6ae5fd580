"""The PostgreSQL store's leases and claims against a real PostgreSQL (the
tests' private cluster): one owner at a time per entry, expiry on the
database's clock, renewal, release, fenced writes that refuse only the rows
another owner took, concurrent claims that never hand one row to two owners,
quarantine kept with its reason, and a schema that must be upgraded first."""

from __future__ import annotations

import threading

import psycopg
import pytest

from twisted_mailout.envelope import RecipientState, Reply
from twisted_mailout.queue import LeaseLost
from twisted_mailout.queue.postgres import (
    MIGRATIONS,
    DatabaseUnavailable,
    PostgresStore,
    SchemaOutOfDate,
    redact_uri,
    upgrade,
)
from tests.support.wait import wait_for

MSG = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n"


@pytest.fixture
def uri(pg_uri):
    upgrade(pg_uri)
    return pg_uri


def db_now(uri) -> float:
    with psycopg.connect(uri, autocommit=True) as conn:
        return float(conn.execute("SELECT extract(epoch from now())").fetchone()[0])


def stores(uri, n=2, lease=1.5):
    return [PostgresStore(uri, owner=f"d{i}", lease_duration=lease) for i in range(n)]


def test_the_schema_must_be_upgraded_first_and_upgrading_twice_is_harmless(pg_uri):
    with pytest.raises(SchemaOutOfDate, match="mailout db upgrade"):
        PostgresStore(pg_uri)
    assert upgrade(pg_uri) == [(v, name) for v, name, _ in MIGRATIONS]
    assert upgrade(pg_uri) == []
    PostgresStore(pg_uri)


def test_an_entry_is_held_by_one_owner_until_its_lease_expires(uri):
    one, two = stores(uri)
    qid = one.enqueue("a@example.com", ["b@example.org"], MSG)
    [entry], _ = one.pickup()
    assert entry.lease.owner == "d0"
    assert two.pickup() == ([], [])
    entry.recipients[0].attempts = 1
    entry.recipients[0].move(RecipientState.DEFERRED, Reply(451, "4.3.0 later"), 1.0)
    one.save_many([entry])
    # the lease runs out on the database's clock; then the other owner takes
    # the entry with its last saved state
    wait_for(lambda: db_now(uri) > entry.lease.expires, 10, what="the lease's end")
    [taken], _ = two.pickup()
    assert taken.qid == qid and taken.recipients[0].attempts == 1
    assert taken.lease.owner == "d1"
    # the first owner's writes are refused from now on
    with pytest.raises(LeaseLost) as e:
        one.save_many([entry])
    assert e.value.qids == frozenset({qid})
    with pytest.raises(LeaseLost):
        one.remove_many([qid])
    two.remove_many([qid])
    assert two.list_entries() == []


def test_renewing_keeps_the_lease_and_releasing_gives_it_back(uri):
    one, two = stores(uri)
    one.enqueue("a@example.com", ["b@example.org"], MSG)
    [entry], _ = one.pickup()
    first = entry.lease.expires
    wait_for(lambda: db_now(uri) > first - 0.7, 10, what="most of the lease gone")
    renewed = one.renew()
    assert renewed > first
    wait_for(lambda: db_now(uri) > first + 0.2, 10, what="the first expiry passed")
    assert two.pickup() == ([], [])  # renewed: still held
    one.release([entry.qid])
    [taken], _ = two.pickup()  # at once
    assert taken.qid == entry.qid


def test_a_batch_write_refuses_only_the_rows_another_owner_took(uri):
    one, two = stores(uri)
    a = one.enqueue("a@example.com", ["a@example.org"], MSG)
    b = one.enqueue("a@example.com", ["b@example.org"], MSG)
    entries, _ = one.pickup()
    wait_for(lambda: db_now(uri) > entries[0].lease.expires, 10, what="the leases' end")
    one.renew()  # too late: expired leases are not renewed
    [taken], _ = two.pickup(1)
    assert taken.qid == a
    for e in entries:
        e.recipients[0].attempts = 7
    with pytest.raises(LeaseLost) as lost:
        one.save_many(entries)
    assert lost.value.qids == frozenset({a})
    # b was written (its lease had expired, but nobody else took it)...
    assert two.load(b).recipients[0].attempts == 7
    assert two.load(a).recipients[0].attempts == 0
    # ...and the same owner that lost a keeps b until someone takes it
    one.remove_many([b])
    assert [x.entry.qid for x in two.list_entries()] == [a]


def test_concurrent_claims_never_hand_a_row_to_two_owners(uri):
    owners = stores(uri, n=4, lease=60)
    owners[0].enqueue_many([("a@example.com", [f"r{i}@example.org"], MSG)
                            for i in range(400)])
    got: dict[str, list[str]] = {s.owner: [] for s in owners}
    start = threading.Barrier(len(owners))

    def claim(store):
        start.wait()
        while True:
            entries, _ = store.pickup(25)
            if not entries:
                return
            got[store.owner] += [e.qid for e in entries]

    threads = [threading.Thread(target=claim, args=(s,)) for s in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [q for qids in got.values() for q in qids]
    assert len(every) == 400 and len(set(every)) == 400
    assert sum(1 for qids in got.values() if qids) >= 2  # shared out, not serialised


def test_quarantine_keeps_the_message_and_the_reason(uri):
    [one] = stores(uri, n=1)
    qid = one.enqueue("a@example.com", ["b@example.org"], MSG)
    one.pickup()
    one.quarantine(qid, "crashed the daemon 3 times")
    assert one.list_entries() == []
    with psycopg.connect(uri, autocommit=True) as conn:
        reason, data = conn.execute("SELECT reason, data FROM mailout.quarantine "
                                    "WHERE qid = %s", (qid,)).fetchone()
    assert reason == "crashed the daemon 3 times" and MSG.split(b"\r\n")[2] in bytes(data)


def test_bodies_are_read_off_the_reactor_thread_and_cached(uri):
    [one] = stores(uri, n=1)
    one.enqueue("a@example.com", ["b@example.org"], MSG)
    [entry], _ = one.pickup()
    calls = []
    real = one._run
    one._run = lambda work: calls.append(work) or real(work)  # type: ignore[method-assign]
    assert one.open_body(entry).read().endswith(b"body\r\n")
    assert calls == []  # no database round trip from open_body
    assert b"Subject: s\r\n" in one.read_headers(entry)
    assert calls == []


def test_an_unreachable_database_is_an_io_error_and_the_location_has_no_password(uri):
    bad = "postgresql://mailout:s3cret@127.0.0.1:1/nowhere?connect_timeout=2"
    with pytest.raises(DatabaseUnavailable) as e:
        PostgresStore(bad)
    assert isinstance(e.value, OSError) and "s3cret" not in str(e.value)
    assert "s3cret" not in redact_uri(bad)


def test_mailout_queue_reads_and_changes_a_postgresql_queue(uri, capsys):
    import json

    from twisted_mailout.daemon.cli import main

    [one] = stores(uri, n=1, lease=1.5)
    qids = [one.enqueue("a@example.com", [f"r{i}@example.org"], MSG) for i in range(3)]
    [claimed], _ = one.pickup(1)  # one active (claimed by d0), two incoming
    assert main(["queue", "--queue", uri, "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["queue_id"] for r in rows) == sorted(qids)
    assert sorted(r["queue_name"] for r in rows) == ["active", "incoming", "incoming"]
    assert main(["queue", "--queue", uri, "summary"]) == 0
    assert "example.org" in capsys.readouterr().out
    # no daemon runs: the command takes what it needs itself, also from an
    # owner whose lease has expired, and gives it all back
    wait_for(lambda: db_now(uri) > claimed.lease.expires, 10, what="d0's lease's end")
    assert main(["queue", "--queue", uri, "hold", "ALL", "--reason", "audit"]) == 0
    capsys.readouterr()
    listed = one.list_entries()
    assert len(listed) == 3 and all(x.entry.held for x in listed)
    assert all(x.owner is None for x in listed if x.where == "active")
    assert main(["queue", "--queue", uri, "delete", qids[0]]) == 0
    assert sorted(x.entry.qid for x in one.list_entries()) == sorted(qids[1:])
    assert main(["queue", "--queue", uri, "suspend", "--domain", "example.org",
                 "--duration", "1h"]) == 0
    assert [s.domain for s in one.suspensions()] == ["example.org"]


def test_a_message_that_kills_every_daemon_is_quarantined(uri):
    """Claimed again and again with no outcome saved (each daemon died with
    it): quarantined at the sixth claim; one saved outcome resets the count."""
    from twisted_mailout.queue.postgres import MAX_CLAIMS

    owners = stores(uri, n=2, lease=1)
    killer = owners[0].enqueue("a@example.com", ["k@example.org"], MSG)
    fine = owners[0].enqueue("a@example.com", ["f@example.org"], MSG)
    for i in range(MAX_CLAIMS):
        store = owners[i % 2]
        entries, problems = store.pickup()
        assert killer in [e.qid for e in entries] and problems == []
        for e in entries:
            if e.qid == fine:
                store.save_many([e])  # this one got an outcome each time
        wait_for(lambda: db_now(uri) > entries[0].lease.expires, 10, what="the lease's end")
    entries, problems = owners[1].pickup()
    assert [e.qid for e in entries] == [fine]
    assert len(problems) == 1 and killer in problems[0] and "claimed 5 times" in problems[0]
    with psycopg.connect(uri, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM mailout.quarantine WHERE qid = %s",
                            (killer,)).fetchone()[0] == 1


def test_backlog_counts_the_shared_queues_unclaimed_mail(uri):
    one, two = stores(uri, lease=60)
    for i in range(5):
        one.enqueue("a@example.com", [f"r{i}@example.org"], MSG)
    one.pickup(2)
    assert one.backlog() == 3  # what waits for any daemon, as of that pickup
    two.pickup(1)
    assert two.backlog() == 2 and one.backlog() == 3  # no I/O: the last count
    assert two.shared_counts() == {"incoming": 2, "claimed": 3, "hold": 0, "owners": 2}


def test_a_report_and_the_state_that_says_it_was_made_are_one_transaction(uri):
    one, two = stores(uri)
    qid = one.enqueue("a@example.com", ["b@example.org"], MSG)
    [entry], _ = one.pickup()
    entry.bounced_reported.append("b@example.org")
    dsn = one.save_with_report(entry, "", ["a@example.com"], b"Subject: report\r\n\r\nx\r\n")
    assert one.load(qid).bounced_reported == ["b@example.org"]
    assert dsn in [x.entry.qid for x in one.list_entries()]
    # under a lost lease: neither the state nor the report
    wait_for(lambda: db_now(uri) > entry.lease.expires, 10, what="the lease's end")
    taken = [e for e in two.pickup().entries if e.qid == qid]
    assert taken
    entry.bounced_reported.append("c@example.org")
    with pytest.raises(LeaseLost):
        one.save_with_report(entry, "", ["a@example.com"], b"Subject: again\r\n\r\nx\r\n")
    assert len(one.list_entries()) == 2  # the message and the first report only
    assert two.load(qid).bounced_reported == ["b@example.org"]


def test_a_bounce_on_a_shared_store_is_made_with_its_state(uri):
    """The scheduler's bounce path on the PostgreSQL store goes through
    save_with_report: the DSN exists and the entry is marked reported."""
    from twisted.internet import defer, task

    from twisted_mailout.delivery.connector import Attempt
    from twisted_mailout.delivery.scheduler import Scheduler

    calls = []

    class Refusing:
        def deliver(self, dest, sender, recipients, open_source, *a, **kw):
            with open_source() as f:
                calls.append((sender, list(recipients), f.read()))
            return defer.succeed(Attempt({r: Reply(550, "5.1.1 no such user")
                                          if r.startswith("gone@") else Reply(250, "2.0.0 ok")
                                          for r in recipients}, "mx[192.0.2.1]:25"))

        def close(self):
            return defer.succeed(None)

    [store] = stores(uri, n=1, lease=60)
    store.enqueue("a@example.com", ["gone@example.org"], MSG)
    clock = task.Clock()
    clock.advance(db_now(uri))
    sched = Scheduler(store, Refusing(), clock)
    d = sched.start()
    for _ in range(5):
        clock.advance(0)  # (everything runs inline: the store calls block here)
    assert d.called
    # the message bounced, its report was made once and delivered to the sender
    assert [(snd, rcpts) for snd, rcpts, _ in calls] == [
        ("a@example.com", ["gone@example.org"]), ("", ["a@example.com"])]
    assert b"5.1.1" in calls[1][2]
    assert store.list_entries() == []  # both finished
    sched.stop()


def test_two_daemons_saving_suspensions_at_once_lose_neither(uri):
    from twisted_mailout.queue.model import Suspension

    one, two = stores(uri)
    assert one.suspensions() == [] and two.suspensions() == []
    a = Suspension("a1", "example.org", "operator", 1.0, 9e9)
    b = Suspension("b2", "example.net", "rule", 2.0, 9e9)
    one.save_suspensions([a])      # each saves its own whole set...
    two.save_suspensions([b])      # ...without having seen the other's
    assert [s.id for s in one.suspensions()] == ["a1", "b2"]
    one.save_suspensions([b])      # one cancels its a1 (it knows both now)
    assert [s.id for s in two.suspensions()] == ["b2"]


def test_a_claim_takes_a_run_of_one_destination_first(uri):
    """New mail for three domains, interleaved: each claim takes the oldest
    waiting message's destination first (what one daemon's connections to
    it carry), then fills up by age."""
    [one] = stores(uri, n=1, lease=60)
    qids = {d: [] for d in ("a.test", "b.test", "c.test")}
    for i in range(5):
        for d, ids in qids.items():
            ids.append(one.enqueue("x@example.com", [f"r{i}@{d}"], MSG))
    first, _ = one.pickup(5)
    assert [e.qid for e in first] == qids["a.test"]
    second, _ = one.pickup(7)
    assert [e.qid for e in second][:5] == qids["b.test"]
    assert [e.qid for e in second][5:] == qids["c.test"][:2]  # then by age
    with psycopg.connect(uri, autocommit=True) as conn:
        dest = conn.execute("SELECT mailout.enqueue('x@example.com', ARRAY['u@Mixed.Test'], "
                            "'Subject: x\r\n\r\nb\r\n'::bytea)").fetchone()[0]
        assert conn.execute("SELECT dest FROM mailout.message WHERE qid = %s",
                            (dest,)).fetchone()[0] == "mixed.test"
