"""Daemons on a PostgreSQL queue (issue 13): `twistd mailout --queue
postgresql://...` delivers what is in the shared queue to aiosmtpd; several
daemons share one queue without delivering a message twice; a daemon killed
with SIGKILL in mid-run leaves its work to the others once its leases expire,
and the only messages delivered twice are ones the killed daemon had sent
(its final dot accepted, its outcome not yet committed)."""

from __future__ import annotations

import re
from collections import Counter

import psycopg

from tests.support.daemon import Daemon
from tests.support.peers import AiosmtpdSink
from tests.support.wait import wait_for
from twisted_mailout.queue.postgres import PostgresStore, upgrade


def message(i: int) -> bytes:
    return (f"From: a@origin.test\r\nTo: u@dest.test\r\nSubject: m{i}\r\n\r\nbody {i}\r\n"
            ).encode()


def subject(record: dict) -> str:
    m = re.search(rb"^Subject: (m\d+)\r$", record["data"], re.M)
    assert m, record["data"][:200]
    return m.group(1).decode()


def rows(uri: str) -> int:
    with psycopg.connect(uri, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM mailout.message").fetchone()[0])


def fill(uri: str, n: int) -> None:
    store = PostgresStore(uri)
    for start in range(0, n, 500):
        store.enqueue_many([("a@origin.test", [f"u{i}@dest.test"], message(i))
                            for i in range(start, min(n, start + 500))])
    store.close()


def daemon(tmp_path, uri, sink, name, *extra):
    return Daemon(uri, f"--relay=127.0.0.1:{sink.port}", "--tls=none", "--no-http",
                  f"--owner={name}", f"--helo={name}.mailout.test", *extra,
                  log=tmp_path / f"{name}.log")


def test_one_daemon_delivers_a_postgresql_queue(tmp_path, pg_uri):
    upgrade(pg_uri)
    fill(pg_uri, 50)
    sink = AiosmtpdSink("127.0.0.1").start()
    d = daemon(tmp_path, pg_uri, sink, "d0").start()
    try:
        got = sink.wait_for_messages(50, timeout=60)
        wait_for(lambda: rows(pg_uri) == 0, 30, what="the finished rows removed")
    finally:
        d.stop()
        sink.stop()
    assert sorted(subject(m) for m in got) == sorted(f"m{i}" for i in range(50))
    assert "Traceback" not in d.log()


def test_three_daemons_share_the_queue_and_one_is_killed(tmp_path, pg_uri):
    upgrade(pg_uri)
    n = 5000
    fill(pg_uri, n)
    sink = AiosmtpdSink("127.0.0.1").start()
    ds = [daemon(tmp_path, pg_uri, sink, f"d{i}", "--lease-duration=3",
                 "--max-connections=3").start() for i in range(3)]
    try:
        # kill one while the drain is under way
        wait_for(lambda: len(sink.messages) >= n // 5, 60, what="a fifth delivered")
        wait_for(lambda: any(m["helo"] == "d2.mailout.test" for m in sink.messages), 60,
                 what="d2 delivering")
        ds[2].kill()
        wait_for(lambda: rows(pg_uri) == 0, 120, what="the queue drained by d0 and d1")
    finally:
        for d in ds:
            d.stop()
        sink.stop()
    got = sink.messages
    per = Counter(subject(m) for m in got)
    assert set(per) == {f"m{i}" for i in range(n)}  # every message delivered
    twice = {s for s, c in per.items() if c > 1}
    # the only duplicates are messages the killed daemon itself had sent
    by_killed = {subject(m) for m in got if m["helo"] == "d2.mailout.test"}
    assert twice <= by_killed, sorted(twice - by_killed)
    assert all(c <= 2 for c in per.values())
    helos = Counter(m["helo"] for m in got)
    assert helos["d0.mailout.test"] and helos["d1.mailout.test"]  # the work was shared
    print(f"duplicates after SIGKILL: {len(twice)} of {n}; by daemon: {dict(helos)}")


def test_new_mail_wakes_the_daemon_through_notify(tmp_path, pg_uri):
    """With polling every 60 s, mail published after the start is delivered
    at once: the INSERT's NOTIFY woke the daemon."""
    upgrade(pg_uri)
    sink = AiosmtpdSink("127.0.0.1").start()
    d = daemon(tmp_path, pg_uri, sink, "d0", "--poll-interval=60").start()
    try:
        wait_for(lambda: "mailout starting" in d.log(), 30, what="the daemon started")
        for i in range(3):
            # each one after the last was delivered: no start-up pickup takes it,
            # and 20 s is well within the 60 s poll
            fill_one = PostgresStore(pg_uri)
            fill_one.enqueue("a@origin.test", [f"u{i}@dest.test"], message(i))
            fill_one.close()
            sink.wait_for_messages(i + 1, timeout=20)
    finally:
        d.stop()
        sink.stop()
    assert "LISTEN for new mail failed" not in d.log()


def test_postgresql_down_for_a_while_in_mid_run_loses_nothing(tmp_path, pg_uri,
                                                              postgres_cluster):
    """The server stops for two seconds while a daemon drains: the daemon
    logs the failures, reconnects, and every message is delivered once (its
    outcomes were kept in memory and written when the database came back)."""
    import time

    upgrade(pg_uri)
    n = 600
    fill(pg_uri, n)
    sink = AiosmtpdSink("127.0.0.1").start()
    d = daemon(tmp_path, pg_uri, sink, "d0", "--lease-duration=30", "--retry-base=5").start()
    try:
        wait_for(lambda: len(sink.messages) >= n // 4, 60, what="a quarter delivered")
        postgres_cluster.stop_server()
        time.sleep(2)  # the outage itself (not a wait for an event): 2 s down
        postgres_cluster.start_server()
        wait_for(lambda: rows(pg_uri) == 0, 120, what="the queue drained after the outage")
    finally:
        d.stop()
        sink.stop()
    per = Counter(subject(m) for m in sink.messages)
    assert set(per) == {f"m{i}" for i in range(n)}
    assert max(per.values()) == 1, [s for s, c in per.items() if c > 1]
    log = d.log()
    # the outage was met (and survived): outcomes kept in memory, written later
    assert "kept in memory, writing again" in log, log[-3000:]


def test_a_daemon_cut_off_from_postgresql_sends_no_final_dot_after_its_lease(
        tmp_path, pg_uri, postgres_cluster):
    """Daemon A reaches PostgreSQL through a TCP proxy that then stops
    forwarding (a network cut: nothing closed, nothing answered). A cannot
    renew its leases, so once they lapse it sends no more final dots (its
    relay, slow on purpose, still had work queued for it). Daemon B, connected
    directly, takes A's messages over when their leases expire and delivers
    them; the only duplicates are messages A had sent before the cut took
    effect."""
    import time

    from psycopg.conninfo import conninfo_to_dict

    from tests.support.tcp_proxy import FreezingProxy

    upgrade(pg_uri)
    n = 60
    fill(pg_uri, n)
    p = conninfo_to_dict(pg_uri)
    socket_path = f"{p['host']}/.s.PGSQL.{p.get('port', 5432)}"
    proxy = FreezingProxy(socket_path).start()
    via_proxy = f"postgresql://postgres@127.0.0.1:{proxy.port}/{p['dbname']}"

    def slow(record):  # A's relay: half a second a message
        time.sleep(0.5)

    sink_a = AiosmtpdSink("127.0.0.1", data_reply=slow).start()
    sink_b = AiosmtpdSink("127.0.0.1").start()
    lease = 3.0
    a = daemon(tmp_path, via_proxy, sink_a, "a", f"--lease-duration={lease:g}",
               "--max-connections=1", "--max-per-destination=1")
    b = daemon(tmp_path, pg_uri, sink_b, "b", f"--lease-duration={lease:g}")
    try:
        a.start()
        sink_a.wait_for_messages(2, timeout=60)
        proxy.freeze()
        cut = time.monotonic()
        b.start()
        wait_for(lambda: rows(pg_uri) == 0, 120, what="the queue drained by b")
        wait_for(lambda: "final dot not sent" in a.log(), 30,
                 what="a refusing to finish a transaction")
    finally:
        b.stop()
        a.stop(timeout=10)
        sink_a.stop()
        sink_b.stop()
        proxy.stop()
    by_a = list(sink_a.messages)
    # nothing completed at A's relay after A's lease lapsed (the last renewal
    # was before the cut)
    late = [m["time"] - cut for m in by_a if m["time"] > cut + lease]
    assert late == [], late
    per = Counter(subject(m) for m in by_a + sink_b.messages)
    assert set(per) == {f"m{i}" for i in range(n)}
    twice = {s for s, c in per.items() if c > 1}
    assert twice <= {subject(m) for m in by_a}
    print(f"network cut: a sent {len(by_a)}, b {len(sink_b.messages)}, "
          f"duplicates {len(twice)}")


def test_queue_commands_get_messages_back_from_a_running_daemon(tmp_path, pg_uri):
    """`mailout queue --queue postgresql://... hold ALL` while a daemon holds
    deferred messages: the daemon gives them back (its log says so), the
    command holds them; `release` and `flush` then send them at once, through
    the daemon, without its 10-minute retry wait."""
    import subprocess
    import sys

    from tests.support.daemon import ROOT, env

    upgrade(pg_uri)
    fill(pg_uri, 3)
    refuse = [True]
    sink = AiosmtpdSink("127.0.0.1", data_reply=lambda r: "451 4.3.0 later" if refuse[0]
                        else None).start()
    d = daemon(tmp_path, pg_uri, sink, "d0", "--retry-base=600", "--retry-max=600").start()

    def queue(*args):
        return subprocess.run([sys.executable, "-m", "twisted_mailout.daemon.cli", "queue",
                               "--queue", pg_uri, *args], capture_output=True, text=True,
                              timeout=60, env=env(), cwd=str(ROOT))

    def rows_held():
        with psycopg.connect(pg_uri, autocommit=True) as conn:
            return conn.execute("SELECT held, owner FROM mailout.message").fetchall()

    try:
        wait_for(lambda: d.log().count("status=deferred") == 3, 30, what="three deferrals")
        run = queue("hold", "ALL", "--reason", "audit")
        assert run.returncode == 0, run.stdout + run.stderr
        assert rows_held() == [(True, None)] * 3
        wait_for(lambda: "gave 3 of 3 messages back to an operator" in d.log(), 10,
                 what="the daemon's line")
        refuse[0] = False
        for action in ("release", "flush"):
            run = queue(action, "ALL")
            assert run.returncode == 0, run.stdout + run.stderr
        sink.wait_for_messages(3, timeout=30)
        wait_for(lambda: rows(pg_uri) == 0, 30, what="the queue emptied")
        # a suspension made from the command line reaches the running daemon
        run = queue("suspend", "--domain", "dest.test", "--duration", "1h")
        assert run.returncode == 0, run.stdout + run.stderr
        wait_for(lambda: "suspensions reloaded from the shared queue: 1 in force" in d.log(),
                 10, what="the daemon reloading the suspensions")
    finally:
        d.stop()
        sink.stop()
