"""The PostgreSQL queue against the folder: ``python benchmarks/postgres.py
[--messages N] [--runs K] [--daemons 1,2]``.

Drains N queued 2 KB messages to Postfix's smtp-sink (one relay, 10
connections a daemon) from a queue folder (one daemon), and from a
PostgreSQL queue with 1, 2, ... daemons sharing it; K runs of each,
alternating. The PostgreSQL server is a private one this script starts on a
Unix socket (the tests' harness, tests/support/postgres.py), fsync on.
Each queue is filled before the daemons start (the folder with
enqueue_many(), the database with enqueue_many() over a URI: both durable).
Reports medians: messages a second from the first daemon's start to the
empty queue, CPU per message of the daemons and of PostgreSQL apart, and the
outbox's enqueue rate (one client process, one committed transaction per
message). Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks.common import (  # noqa: E402
    Daemon,
    Sink,
    Workdir,
    message,
    proc_stats,
    wait_queue_empty,
)
from benchmarks.run import fill_queue  # noqa: E402

SENDER = "bench@mailout.test"


def _pg_cpu(cluster) -> float:
    """CPU seconds of every process of the cluster (postmaster and backends)."""
    import os

    total = 0.0
    pid = cluster.postmaster_pid()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(p) == pid or int(fields[1]) == pid:  # the postmaster and its children
            ticks = os.sysconf("SC_CLK_TCK")
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _rows(uri: str) -> int:
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM mailout.message").fetchone()[0])


def drain_folder(tmp: Path, sink: Sink, n: int) -> tuple[float, float, float]:
    q = tmp / "q"
    fill_queue(q, [message(i, 2048) for i in range(n)])
    with Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--max-connections=10",
                "--max-per-destination=10", "--poll-interval=1", "--no-http",
                log=tmp / "daemon.log") as d:
        t0, c0 = d.wait_ready()
        d.wait_sent(n, 1200)
        t1 = wait_queue_empty(q, 1200)
        c1 = proc_stats(d.pid)[0]
    return n / (t1 - t0), (c1 - c0) / n * 1000, 0.0


def drain_postgres(tmp: Path, sink: Sink, cluster, n: int, daemons: int
                   ) -> tuple[float, float, float]:
    from twisted_mailout import enqueue_many
    from twisted_mailout.queue.postgres import upgrade

    uri = cluster.fresh_database()
    upgrade(uri)
    for i in range(0, n, 1000):
        enqueue_many(uri, [(SENDER, ["sink@dest.test"], message(j, 2048))
                           for j in range(i, min(n, i + 1000))])
    ds = [Daemon(uri, f"--relay=127.0.0.1:{sink.port}", "--max-connections=10",  # type: ignore[arg-type]
                 "--max-per-destination=10", "--poll-interval=1", "--no-http",
                 f"--owner=bench{k}", log=tmp / f"daemon{k}.log") for k in range(daemons)]
    pg0 = _pg_cpu(cluster)
    for d in ds:
        d.start()
    t0, _ = ds[0].wait_ready()
    cpu0 = [proc_stats(d.pid)[0] for d in ds]
    deadline = time.monotonic() + 1200
    while _rows(uri) and time.monotonic() < deadline:
        for d in ds:
            d.alive()
        time.sleep(0.02)
    t1 = time.perf_counter()
    cpu = sum(proc_stats(d.pid)[0] - c for d, c in zip(ds, cpu0, strict=True))
    pg = _pg_cpu(cluster) - pg0
    for d in ds:
        d.stop()
    cluster.drop_database(uri.split("?")[0].rsplit("/", 1)[1])
    return n / (t1 - t0), cpu / n * 1000, pg / n * 1000


def _outbox_client(uri: str, n: int, start: Any) -> None:
    import psycopg

    from twisted_mailout import enqueue

    data = message(0, 2048)
    with psycopg.connect(uri) as conn:
        start.wait()
        for _ in range(n):
            enqueue(conn, SENDER, ["sink@dest.test"], data)
            conn.commit()


def outbox_rate(cluster, n: int, clients: int = 1) -> float:
    """Inserts a second, one committed transaction each (psycopg), from
    C{clients} processes enqueueing C{n} messages each."""
    import multiprocessing

    from twisted_mailout.queue.postgres import upgrade

    uri = cluster.fresh_database()
    upgrade(uri)
    start = multiprocessing.Event()
    procs = [multiprocessing.Process(target=_outbox_client, args=(uri, n, start))
             for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every client connected
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join(600)
    t1 = time.perf_counter()
    cluster.drop_database(uri.split("?")[0].rsplit("/", 1)[1])
    return n * clients / (t1 - t0)


def main() -> int:
    """Run the cases; print a table. @return: the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--daemons", default="1,2", help="comma-separated daemon counts")
    args = ap.parse_args()
    from tests.support.postgres import PostgresCluster, require_postgres

    counts = [int(x) for x in args.daemons.split(",")]
    cases = ["folder"] + [f"postgresql x{k}" for k in counts]
    results: dict[str, list[tuple[float, float, float]]] = {c: [] for c in cases}
    cluster = PostgresCluster(bindir=require_postgres()).start()
    sink = Sink().start()
    try:
        for run in range(args.runs):
            for case in cases:
                with Workdir(None, "mailout-pgbench-") as tmp:
                    if case == "folder":
                        r = drain_folder(tmp, sink, args.messages)
                    else:
                        r = drain_postgres(tmp, sink, cluster, args.messages,
                                           int(case.rsplit("x", 1)[1]))
                results[case].append(r)
                print(f"run {run + 1} {case}: {r[0]:.0f} msg/s, daemons {r[1]:.2f} ms CPU/msg, "
                      f"PostgreSQL {r[2]:.2f} ms CPU/msg", flush=True)
        outbox = {k: outbox_rate(cluster, 2000, k) for k in (1, 4)}
    finally:
        sink.stop()
        cluster.stop()
    base = statistics.median(r[0] for r in results["folder"])
    print(f"\n{args.messages:,} messages of 2 KB, {args.runs} runs, medians\n")
    print("| queue | msg/s | ratio to the folder | daemons' CPU ms/msg | PostgreSQL CPU ms/msg |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for case, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        print(f"| {case} | {rate:,.0f} | {rate / base:.2f} | "
              f"{statistics.median(r[1] for r in rows):.2f} | "
              f"{statistics.median(r[2] for r in rows):.2f} |")
    for k, rate in outbox.items():
        print(f"outbox: {rate:,.0f} enqueues a second from {k} client process(es), "
              f"a commit each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
