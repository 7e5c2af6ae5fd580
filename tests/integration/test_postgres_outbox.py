"""The transactional outbox (issue 13 item 2) against the tests' private
PostgreSQL: `twisted_mailout.enqueue(conn, ...)` and the SQL function
`mailout.enqueue(sender, recipients, message)` write in the caller's
transaction, so the mail exists if and only if the caller commits; what
they write is what the daemon picks up (envelope, Message-ID and Date added
when missing, the 8-bit flag); bad input is refused with a clear error and
writes nothing."""

from __future__ import annotations

import psycopg
import pytest

import twisted_mailout
from twisted_mailout.envelope import AddressError
from twisted_mailout.queue.postgres import PostgresStore, upgrade


@pytest.fixture
def uri(pg_uri):
    upgrade(pg_uri)
    return pg_uri


def picked(uri):
    store = PostgresStore(uri)
    try:
        entries, problems = store.pickup()
        assert problems == []
        return {e.qid: (e, store.open_body(e).read()) for e in entries}
    finally:
        store.close()


def test_enqueue_in_the_callers_transaction(uri):
    with psycopg.connect(uri) as conn:
        kept = twisted_mailout.enqueue(conn, "a@origin.test", ["b@dest.test"],
                                       b"Subject: kept\r\n\r\nbody\r\n")
        conn.commit()
        dropped = twisted_mailout.enqueue(conn, "a@origin.test", ["c@dest.test"],
                                          b"Subject: dropped\r\n\r\nbody\r\n")
        # not visible to others before the commit...
        assert set(picked(uri)) == {kept}
        conn.rollback()
        batch = twisted_mailout.enqueue_many(conn, [
            ("a@origin.test", [f"r{i}@dest.test"], b"Subject: many\r\n\r\nx\r\n")
            for i in range(3)])
        conn.commit()
    got = picked(uri)
    assert dropped not in got and set(batch) <= set(got)
    entry, body = got[batch[0]]
    assert entry.sender == "a@origin.test" and entry.recipients[0].address == "r0@dest.test"
    assert b"\r\nDate: " in b"\r\n" + body and b"Message-ID: <" in body


def test_a_bad_message_is_refused_before_anything_is_written(uri):
    with psycopg.connect(uri) as conn:
        with pytest.raises(AddressError):
            twisted_mailout.enqueue(conn, "a@origin.test", ["not an address"], b"x")
        conn.commit()
    assert picked(uri) == {}


def test_the_sql_function_writes_in_the_transaction_too(uri):
    with psycopg.connect(uri) as conn:
        def sql_enqueue(sender, rcpts, data):
            return conn.execute("SELECT mailout.enqueue(%s, %s, %s)",
                                (sender, rcpts, data)).fetchone()[0]

        crlf = sql_enqueue("a@origin.test", ["b@dest.test"],
                           "Subject: Grüße\r\n\r\nGrüße\r\n".encode())
        lf = sql_enqueue("<>", ["c@dest.test", "d@dest.test"],
                         b"Message-ID: <given@origin.test>\nSubject: lf\n\nbody\n")
        conn.commit()
        gone = sql_enqueue("a@origin.test", ["e@dest.test"], b"Subject: no\r\n\r\nx\r\n")
        conn.rollback()
        for bad, why in (((None, [], b"x"), "no recipients"),
                         (("a b@x.test", ["b@dest.test"], b"x"), "bad sender"),
                         (("a@x.test", ["nope"], b"x"), "bad recipient"),
                         (("a@x.test", ["b@dest.test"], b""), "empty message")):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match=why):
                sql_enqueue(*bad)
            conn.rollback()
    got = picked(uri)
    assert set(got) == {crlf, lf} and gone not in got
    entry, body = got[crlf]
    assert entry.eightbit and entry.sender == "a@origin.test"
    # the fields added use the message's own line ends
    assert body.startswith(b"Message-ID: <") and b"\r\nDate: " in body
    assert body.endswith("Grüße\r\n".encode())
    entry, body = got[lf]
    assert entry.sender == "" and [r.address for r in entry.recipients] == [
        "c@dest.test", "d@dest.test"]
    assert not entry.eightbit
    assert body.startswith(b"Date: ") and body.count(b"Message-ID:") == 1
    assert b"\r" not in body


def test_mailout_demo_runs_on_a_postgresql_queue(uri, postgres_cluster):
    """`mailout demo --queue postgresql://...`: the whole demo (loopback DNS,
    SMTP receivers, MX routing, bounces) on the shared store; a schema that
    was never upgraded is named, with the command to run."""
    import subprocess
    import sys

    from tests.support.daemon import ROOT, env

    def demo(queue):
        return subprocess.run([sys.executable, "-m", "twisted_mailout.daemon.cli", "demo",
                               "--queue", queue, "--timeout", "60"], capture_output=True,
                              text=True, timeout=120, env=env(), cwd=str(ROOT))

    run = demo(uri)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "All outcomes as expected" in run.stdout
    bare = postgres_cluster.fresh_database()
    run = demo(bare)
    assert run.returncode == 1 and "mailout db upgrade" in run.stdout, run.stdout


def _staged_and_visible(uri):
    with psycopg.connect(uri, autocommit=True) as conn:
        staged = conn.execute("SELECT count(*) FROM mailout.message "
                              "WHERE staged IS NOT NULL").fetchone()[0]
    store = PostgresStore(uri)
    try:
        return int(staged), sorted(x.entry.qid for x in store.list_entries())
    finally:
        store.close()


def test_send_on_commit_with_the_transaction_package(uri):
    """The `transaction` package's two phases on the PostgreSQL queue: at the
    vote the mail is a staged row (committed, so durable, yet seen by no
    daemon); the finish makes it incoming; an abort, or a second resource
    failing its vote, leaves nothing."""
    import transaction

    from twisted_mailout.apps.builder import build_message
    from twisted_mailout.apps.mailer import Mailer

    class Failing:
        def __init__(self, tm):
            self.transaction_manager = tm

        def abort(self, txn): pass
        def tpc_begin(self, txn): pass
        def commit(self, txn): pass
        def tpc_abort(self, txn): pass
        def tpc_finish(self, txn): pass
        def sortKey(self): return "~~~ after the mail"  # votes after the mail's vote

        def tpc_vote(self, txn):
            seen.append(_staged_and_visible(uri))  # the mail's vote is done
            raise RuntimeError("database conflict")

    seen: list = []
    tm = transaction.TransactionManager(explicit=True)
    mailer = Mailer(uri, transactional=True, transaction_manager=tm)

    def msg(n):
        return build_message(sender="a@origin.test", to="b@dest.test", subject=f"order {n}",
                             text="thanks")

    tm.begin()
    kept = mailer.send(msg(1))
    assert _staged_and_visible(uri) == (0, [])  # nothing written before the vote
    tm.commit()
    assert _staged_and_visible(uri) == (0, [kept])
    tm.begin()
    mailer.send(msg(2))
    tm.abort()
    assert _staged_and_visible(uri) == (0, [kept])
    tm.begin()
    tm.get().join(Failing(tm))
    mailer.send(msg(3))
    with pytest.raises(RuntimeError, match="database conflict"):
        tm.commit()
    tm.abort()
    assert seen == [(1, [kept])]  # staged and durable at the vote, invisible
    assert _staged_and_visible(uri) == (0, [kept])  # and gone after the abort
