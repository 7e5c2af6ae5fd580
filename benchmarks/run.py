"""Throughput benchmarks: twisted_mailout and its peers, side by side.

    python3 benchmarks/run.py [--quick] [--messages N] [--runs K] [--size BYTES]
                              [--only NAMES] [--json OUT.json] [--workdir DIR]
                              [--pin CPUS | --no-pin]

Every peer delivers to the same Postfix ``smtp-sink`` on 127.0.0.1, started
once for the whole run; the cases run one after the other, all of them once
per run (so noise falls on every peer alike), and the table gives medians of
the runs. Every sender (our daemon, each Python peer, Postfix and its
injectors, smtp-source) is pinned to one core (``taskset -c 0``, see
``--pin``) except in the ``workers`` case; the sink and this harness are
not pinned. See docs/benchmarks.md for what each case does and measures.

Cases (``--only`` takes a comma-separated list of these names):

  drain        twisted_mailout daemon draining N queued messages (--relay)
  workers      the same drain with `twistd mailout --workers 1` (one process) and
               `--workers 2` (a parent and two workers), 20,000 messages, not pinned
  enqueue      the same daemon while a producer process calls enqueue(), and
               one calling enqueue_many() (batches of 100), concurrently
  mx           twisted_mailout direct to MX, 50 domains, loopback DNS
  twisted      twisted.mail.smtp.sendmail(), 10 in flight
  smtplib      smtplib, one reused connection
  aiosmtplib   aiosmtplib, 10 reused connections
  zope         zope.sendmail: enqueue (commit per message), then its queue
               processor draining to the sink
  postfix      a private Postfix: inject with sendmail(1) into the maildrop
               (pickup held), then drain through pickup, cleanup, qmgr, smtp
  postfix-smtp the same Postfix: inject over SMTP (smtp-source, 10 sessions)
               into incoming/ (qmgr held), then drain from there
  smtp-source  Postfix's C load generator straight to the sink: the ceiling
  micro        enqueue() vs enqueue_many() vs create+write+fsync+rename
  big          twisted_mailout draining 100 KB messages (Mbit/s)
  scale        twisted_mailout with 1,000 vs 100,000 queued (once per run set)
  huge         peak memory of the daemon delivering one 50 MB message (once)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BENCH,
    RECIPIENT,
    ROOT,
    SENDER,
    SMTP_SOURCE,
    Daemon,
    LogCounter,
    Sink,
    Workdir,
    env,
    message,
    pin_prefix,
    proc_stats,
    run_client,
    tree_cpu,
    tree_pids,
    tree_pss,
    wait_queue_empty,
)

sys.path.insert(0, str(ROOT))

ALL = ["drain", "workers", "enqueue", "mx", "twisted", "smtplib", "aiosmtplib", "zope",
       "postfix", "postfix-smtp", "smtp-source", "micro", "big", "scale", "huge"]
ONCE = {"scale", "huge"}
MB = 2**20

# Row keys, in table order, with their label and what durability they keep.
ROWS = [
    ("mailout-drain", "twisted_mailout: queue drain, `--relay`, 10 connections",
     "fsync at enqueue; pickup renames + batched fsync; state/removal group-committed"),
    ("mailout-enqueue-drain", "twisted_mailout: `enqueue()` producer ‖ drain",
     "fsync file + `new/` per message"),
    ("mailout-many-drain", "twisted_mailout: `enqueue_many(100)` producer ‖ drain",
     "one syncfs + one `new/` fsync per 100"),
    ("mailout-mx", "twisted_mailout: direct to MX, 50 domains, loopback DNS",
     "as queue drain"),
    ("twisted", "`twisted.mail.smtp.sendmail()`, 10 in flight", "none (no queue)"),
    ("smtplib", "`smtplib`, one reused connection", "none (no queue)"),
    ("aiosmtplib", "`aiosmtplib`, 10 reused connections", "none (no queue)"),
    ("zope-enqueue", "zope.sendmail: `QueuedMailDelivery` + commit per message",
     "none: write, close, rename (no fsync)"),
    ("zope-drain", "zope.sendmail: queue processor drain (`SMTPMailer`)",
     "none: link, unlink (no fsync)"),
    ("postfix-sendmail", "Postfix: inject with `sendmail(1)`, one at a time → maildrop",
     "postdrop fsyncs each maildrop file"),
    ("postfix-drain", "Postfix: drain from the maildrop (pickup → cleanup → qmgr → smtp → "
     "sink), 10 connections", "cleanup fsyncs each queue file; no fsync at removal"),
    ("postfix-inject", "Postfix: inject (smtp-source → smtpd → cleanup, 10 sessions)",
     "cleanup fsyncs each queue file"),
    ("postfix-incoming-drain", "Postfix: drain from `incoming/` (cleanup already done: "
     "qmgr → smtp → sink), 10 connections", "no fsync at removal"),
    ("smtp-source", "`smtp-source` → sink, 10 sessions (ceiling)", "none"),
]
MICRO_ROWS = [
    ("raw-fsync", "create + write + fsync + rename per message (floor)"),
    ("mailout-enqueue", "`enqueue()`: + fsync of `new/`"),
    ("mailout-enqueue-many", "`enqueue_many()`, batches of 100"),
]


@dataclass
class Ctx:
    n: int
    size: int
    sink: Sink
    base: str | None
    timeout: float
    scale_sizes: list[int]
    scale_window: int
    big_n: int
    huge_mb: int
    mx_limit: float = 60.0
    pin: list = field(default_factory=list)  # command prefix pinning a sender, or []
    pin_cpus: str = ""
    workers_n: int = 20000  # messages in the `workers` case
    workers_counts: list = field(default_factory=lambda: [1, 2])
    scale_s: float = 0.0  # wall time of the scale case, fill included
    postfix_concurrency: int = 10
    disk: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # case -> error text
    skipped: dict = field(default_factory=dict)  # case -> why
    results: dict = field(default_factory=dict)  # row -> list of dicts (one per run)

    def add(self, row: str, **values) -> None:
        self.results.setdefault(row, []).append(values)
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in values.items())
        print(f"  {row}: {shown}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


def relay_args(port: int) -> list[str]:
    return [f"--relay=127.0.0.1:{port}", "--max-connections=10", "--max-per-destination=10",
            "--poll-interval=1"]


def fill_queue(q: Path, msgs: list[bytes], rcpts: list[str] | None = None) -> None:
    """The real, durable enqueue_many(), 1,000 messages per call."""
    from twisted_mailout import enqueue_many

    for i in range(0, len(msgs), 1000):
        enqueue_many(str(q), [(SENDER, [rcpts[j] if rcpts else RECIPIENT], msgs[j])
                              for j in range(i, min(len(msgs), i + 1000))])


def fill_queue_fast(q: Path, n: int, size: int) -> None:
    """N messages written straight into tmp/ in the queue's own format (what
    enqueue writes), one sync(2), then renamed into new/: a full drop zone
    without the durable enqueue's cost per file (for 100,000 messages)."""
    from twisted_mailout.queue.model import encode_envelope_line, new_queue_id
    from twisted_mailout.queue.store import Queue

    Queue(str(q))
    body = message(0, size)
    head = encode_envelope_line(SENDER, [RECIPIENT], time.time(), eightbit=not body.isascii())
    names = []
    for i in range(n):
        qid = new_queue_id()
        with open(q / "tmp" / qid, "wb") as f:
            f.write(head + body.replace(b"<bench0@", f"<bench{i}@".encode(), 1))
        names.append(qid)
    os.sync()
    for qid in names:
        os.rename(q / "tmp" / qid, q / "new" / qid)
    os.sync()


def drain_once(ctx: Ctx, tmp: Path, args: list[str], n: int,
               limit: float | None = None, prefix: list | None = None) -> dict:
    """Start the daemon on the queue in tmp/q (pinned with ``ctx.pin``
    unless ``prefix`` is given), time it from service start to the n-th
    delivery and an empty queue. CPU: the daemon's process tree (all threads,
    and all processes when it has workers: :func:`common.tree_cpu`).

    With ``limit`` (seconds), a drain still running then is cut short and
    measured over what was sent (``partial`` in the result)."""
    q = tmp / "q"
    with Daemon(q, *args, log=tmp / "daemon.log",
                prefix=ctx.pin if prefix is None else prefix) as d:
        t0, c0 = d.wait_ready()
        try:
            d.wait_sent(n, limit or ctx.timeout)
        except TimeoutError:
            if limit is None:
                raise
            t1 = time.perf_counter()
            c1, peak = tree_cpu(d.pid), proc_stats(d.pid)[2]
            return {"seconds": t1 - t0, "cpu": c1 - c0, "peak": peak,
                    "sent": d.counter.sent, "partial": True}
        t1 = wait_queue_empty(q)
        c1, peak = tree_cpu(d.pid), proc_stats(d.pid)[2]
    return {"seconds": t1 - t0, "cpu": c1 - c0, "peak": peak, "sent": n, "partial": False}


def add_rate(ctx: Ctx, row: str, n: int, seconds: float, cpu: float, peak: float | None,
             size: int | None = None, **extra) -> None:
    vals = {"rate": n / seconds, "cpu_ms": cpu / n * 1000,
            "peak_mb": (peak / MB) if peak else None, **extra}
    if size:
        vals["mbit"] = n * size * 8 / seconds / 1e6
    ctx.add(row, **vals)


# --------------------------------------------------------------------------- cases


def case_drain(ctx: Ctx) -> None:
    with Workdir(ctx.base, "mailout-drain-") as tmp:
        fill_queue(tmp / "q", [message(i, ctx.size) for i in range(ctx.n)])
        r = drain_once(ctx, tmp, relay_args(ctx.sink.port), ctx.n)
    add_rate(ctx, "mailout-drain", ctx.n, r["seconds"], r["cpu"], r["peak"])


def workers_supported() -> str | None:
    """None when ``twistd mailout`` takes ``--workers``, else why not."""
    from twisted_mailout.daemon.tap import Options

    if "workers=" in Options().longOpt:
        return None
    return ("`twistd mailout` has no --workers option yet (issue 14's worker processes are "
            "not all on main), so the case is skipped")


def case_workers(ctx: Ctx) -> None:
    """The drain with ``--workers K`` for each K of ``ctx.workers_counts``,
    senders not pinned (the daemon may use every core; the sink takes its
    share). CPU: the whole process tree (parent and workers, and any
    worker that exited, through the parent's cutime/cstime)."""
    why = workers_supported()
    if why:
        ctx.skipped["workers"] = why
        print(f"  workers: skipped: {why}", file=sys.stderr, flush=True)
        return
    msgs = [message(i, ctx.size) for i in range(ctx.workers_n)]
    for k in ctx.workers_counts:
        with Workdir(ctx.base, f"mailout-workers{k}-") as tmp:
            q = tmp / "q"
            fill_queue(q, msgs)
            with Daemon(q, *relay_args(ctx.sink.port), f"--workers={k}",
                        log=tmp / "daemon.log", prefix=[]) as d:
                t0, c0 = d.wait_ready()
                p0 = proc_stats(d.pid)[0]
                first = d.wait_sent(1, ctx.timeout, interval=0.002)
                c_first = tree_cpu(d.pid)
                pss = [tree_pss(d.pid)]
                procs = [len(tree_pids(d.pid))]

                due = [time.monotonic()]

                def sample(d=d, pss=pss, procs=procs, due=due):
                    # every 0.25 s: the harness shares the cores with the workers
                    if time.monotonic() >= due[0]:
                        due[0] = time.monotonic() + 0.25
                        pss.append(tree_pss(d.pid))
                        procs.append(len(tree_pids(d.pid)))

                d.wait_sent(ctx.workers_n, ctx.timeout, interval=0.02, on_poll=sample)
                t1 = wait_queue_empty(q)
                c1 = tree_cpu(d.pid)
                parent = proc_stats(d.pid)[0]
        add_rate(ctx, f"workers:{k}", ctx.workers_n, t1 - t0, c1 - c0, max(pss),
                 start_s=first - t0, start_cpu_s=c_first - c0, processes=max(procs),
                 parent_cpu_ms=(parent - p0) / ctx.workers_n * 1000)


def _concurrent(ctx: Ctx, row: str, producer: str) -> None:
    from twisted_mailout.queue.store import Queue

    with Workdir(ctx.base, "mailout-conc-") as tmp:
        q = tmp / "q"
        Queue(str(q))
        with Daemon(q, *relay_args(ctx.sink.port), log=tmp / "daemon.log",
                    prefix=ctx.pin) as d:
            c0 = d.wait_ready()[1]
            cmd = [*ctx.pin, sys.executable, str(BENCH / "clients.py"), producer, "--queue", str(q),
                   "--messages", str(ctx.n), "--size", str(ctx.size), "--batch", "100"]
            prod = subprocess.Popen(cmd, env=env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                def check():
                    if prod.poll() not in (None, 0):
                        raise RuntimeError(prod.stderr.read().decode(errors="replace"))

                d.wait_sent(ctx.n, ctx.timeout, on_poll=check)
                wait_queue_empty(q)
                t_end = time.time()
                c1, peak = tree_cpu(d.pid), proc_stats(d.pid)[2]
                out, err = prod.communicate(timeout=60)
            finally:
                if prod.poll() is None:
                    prod.kill()
                    prod.communicate(timeout=10)
        if prod.returncode != 0:
            raise RuntimeError(err.decode(errors="replace"))
        p = json.loads(out.decode().strip().splitlines()[-1])
    seconds = t_end - p["t0"]
    add_rate(ctx, row, ctx.n, seconds, (c1 - c0) + p["cpu"], peak,
             producer_rate=ctx.n / p["seconds"], producer_cpu_ms=p["cpu"] / ctx.n * 1000,
             daemon_cpu_ms=(c1 - c0) / ctx.n * 1000)


def case_enqueue(ctx: Ctx) -> None:
    _concurrent(ctx, "mailout-enqueue-drain", "mailout-enqueue")
    _concurrent(ctx, "mailout-many-drain", "mailout-enqueue-many")


def case_mx(ctx: Ctx) -> None:
    from tests.support.peers import DnsServerProcess

    domains = [f"d{i}.test" for i in range(50)]
    records: dict = {}
    for dom in domains:
        records[dom] = {"MX": [[10, f"mx.{dom}"]]}
        records[f"mx.{dom}"] = {"A": ["127.0.0.1"]}
    dns = DnsServerProcess({"ttl": 3600, "authoritative_for": ["test"], "records": records})
    dns_port = dns.start()
    try:
        with Workdir(ctx.base, "mailout-mx-") as tmp:
            rcpts = [f"sink@{domains[i % 50]}" for i in range(ctx.n)]
            msgs = [message(i, ctx.size, domains[i % 50]) for i in range(ctx.n)]
            fill_queue(tmp / "q", msgs, rcpts)
            args = [f"--resolver=127.0.0.1:{dns_port}", f"--mx-port={ctx.sink.port}",
                    "--max-connections=10", "--max-per-destination=10", "--poll-interval=1"]
            r = drain_once(ctx, tmp, args, ctx.n, limit=ctx.mx_limit)
    finally:
        dns.stop()
    add_rate(ctx, "mailout-mx", r["sent"], r["seconds"], r["cpu"], r["peak"],
             partial=1.0 if r["partial"] else 0.0)


def _client_row(ctx: Ctx, row: str, peer: str, *extra: str) -> dict:
    p = run_client(peer, "--port", str(ctx.sink.port), "--messages", str(ctx.n),
                   "--size", str(ctx.size), *extra, timeout=ctx.timeout, prefix=ctx.pin)
    add_rate(ctx, row, p["count"], p["seconds"], p["cpu"], p["maxrss"])
    return p


def case_twisted(ctx: Ctx) -> None:
    _client_row(ctx, "twisted", "twisted")


def case_smtplib(ctx: Ctx) -> None:
    _client_row(ctx, "smtplib", "smtplib")


def case_aiosmtplib(ctx: Ctx) -> None:
    _client_row(ctx, "aiosmtplib", "aiosmtplib")


def case_zope(ctx: Ctx) -> None:
    with Workdir(ctx.base, "zope-") as tmp:
        q = str(tmp / "maildir")
        _client_row(ctx, "zope-enqueue", "zope-enqueue", "--queue", q)
        _client_row(ctx, "zope-drain", "zope-drain", "--queue", q)


def _smtp_source(port: int, n: int, msgfile: Path, timeout: float,
                 prefix: list | None = None) -> tuple[float, float, int]:
    """Run smtp-source (10 sessions, connections reused), after ``prefix``
    (pinning); (seconds, CPU, peak RSS)."""
    cmd = [*(prefix or []), SMTP_SOURCE, "-d", "-s", "10", "-m", str(n), "-f", SENDER,
           "-t", RECIPIENT, "-F", str(msgfile), "-M", "source.bench.test", f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    pid = hwm = 0
    try:
        while True:
            try:
                hwm = max(hwm, proc_stats(proc.pid)[2])
            except (OSError, IndexError, ValueError):
                pass
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("smtp-source did not finish")
            time.sleep(0.002)
    finally:
        if pid == 0:
            proc.kill()
            proc.wait(10)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {proc.stderr.read().decode(errors='replace')}")
    # peak memory: VmHWM sampled while it ran (ru_maxrss would include the
    # Python parent it was forked from)
    return seconds, ru.ru_utime + ru.ru_stime, hwm


def _msgfile(tmp: Path, size: int) -> Path:
    # smtp-source -F: lines are sent with CRLF appended, so LF endings here
    path = tmp / "message.txt"
    path.write_bytes(message(0, size).replace(b"\r\n", b"\n"))
    return path


def case_smtp_source(ctx: Ctx) -> None:
    with Workdir(ctx.base, "source-") as tmp:
        s, cpu, rss = _smtp_source(ctx.sink.port, ctx.n, _msgfile(tmp, ctx.size), ctx.timeout,
                                   ctx.pin)
    add_rate(ctx, "smtp-source", ctx.n, s, cpu, rss)


def _postfix_drain(ctx: Ctx, pf, log: LogCounter) -> tuple[float, float, int]:
    """Release the held Postfix services and time the drain: from the
    master's SIGHUP to ``ctx.n`` deliveries logged ``status=sent`` (the
    sink's 250 to the end of data) and nothing left queued.
    @return: (seconds, CPU seconds of the instance, peak PSS bytes)."""
    log.update()
    log.sent = log.bad = 0
    peak = [pf.pss_bytes()]
    t0, c0 = time.perf_counter(), pf.cpu_seconds()
    pf.release()
    deadline = time.monotonic() + ctx.timeout
    while log.update() < ctx.n or pf.queued():
        if log.bad:
            raise RuntimeError(f"postfix deferred or bounced:\n{pf.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"postfix sent {log.sent} of {ctx.n}, {pf.queued()} queued, "
                               f"after {ctx.timeout}s:\n{pf.log()[-2000:]}")
        peak.append(pf.pss_bytes())
        time.sleep(0.01)
    t1, c1 = time.perf_counter(), pf.cpu_seconds()
    return t1 - t0, c1 - c0, max(peak)


def _postfix(ctx: Ctx):
    from postfix_instance import PostfixInstance

    return PostfixInstance(ctx.sink.port, concurrency=ctx.postfix_concurrency,
                           base=ctx.base or "/var/tmp", prefix=ctx.pin)


def case_postfix(ctx: Ctx) -> None:
    """Postfix from the maildrop: sendmail(1) per message with pickup held
    (the injection, timed on its own), then the drain through pickup,
    cleanup, qmgr and smtp to the sink."""
    with _postfix(ctx) as pf:
        log = LogCounter(pf.root / "maillog")
        pf.hold("pickup")
        c0 = pf.cpu_seconds()
        p = run_client("postfix-sendmail", "--messages", str(ctx.n), "--size", str(ctx.size),
                       "--sendmail", " ".join(pf.sendmail_command()),
                       timeout=ctx.timeout, prefix=ctx.pin)
        c1 = pf.cpu_seconds()
        if pf.queued() != ctx.n:
            raise RuntimeError(f"maildrop holds {pf.queued()} files after {ctx.n} sendmail "
                               f"runs:\n{pf.log()[-2000:]}")
        add_rate(ctx, "postfix-sendmail", ctx.n, p["seconds"], p["cpu"] + (c1 - c0), None,
                 loop_cpu_ms=p["cpu_self"] / ctx.n * 1000)
        seconds, cpu, peak = _postfix_drain(ctx, pf, log)
    add_rate(ctx, "postfix-drain", ctx.n, seconds, cpu, peak)


def case_postfix_smtp(ctx: Ctx) -> None:
    """Postfix from incoming/: smtp-source into smtpd with qmgr held (the
    inject row), then the drain from a queue that cleanup has already
    processed (qmgr, smtp)."""
    with Workdir(ctx.base, "postfix-src-") as tmp:
        msgfile = _msgfile(tmp, ctx.size)
        with _postfix(ctx) as pf:
            log = LogCounter(pf.root / "maillog")
            pf.hold_queue_manager()
            c0, t0 = pf.cpu_seconds(), time.perf_counter()
            _smtp_source(pf.port, ctx.n, msgfile, ctx.timeout, ctx.pin)
            pf.wait_queued(ctx.n, ctx.timeout)
            t1, c1 = time.perf_counter(), pf.cpu_seconds()
            add_rate(ctx, "postfix-inject", ctx.n, t1 - t0, c1 - c0, pf.pss_bytes())
            seconds, cpu, peak = _postfix_drain(ctx, pf, log)
    add_rate(ctx, "postfix-incoming-drain", ctx.n, seconds, cpu, peak)


def case_micro(ctx: Ctx) -> None:
    n = min(ctx.n, 2000)
    with Workdir(ctx.base, "micro-") as tmp:
        for row in ("raw-fsync", "mailout-enqueue", "mailout-enqueue-many"):
            p = run_client(row, "--queue", str(tmp / row), "--messages", str(n),
                           "--size", str(ctx.size), "--batch", "100", timeout=ctx.timeout,
                           prefix=ctx.pin)
            add_rate(ctx, "micro:" + row, n, p["seconds"], p["cpu"], p["maxrss"])


def case_big(ctx: Ctx) -> None:
    size = 100 * 1024
    with Workdir(ctx.base, "mailout-big-") as tmp:
        fill_queue(tmp / "q", [message(i, size) for i in range(ctx.big_n)])
        r = drain_once(ctx, tmp, relay_args(ctx.sink.port), ctx.big_n)
    add_rate(ctx, "big:mailout-drain-100k", ctx.big_n, r["seconds"], r["cpu"], r["peak"],
             size=size)


def case_scale(ctx: Ctx) -> None:
    started = time.perf_counter()
    for n in ctx.scale_sizes:
        window = min(n, ctx.scale_window or n)
        with Workdir(ctx.base, "mailout-scale-") as tmp:
            q = tmp / "q"
            t = time.perf_counter()
            fill_queue_fast(q, n, ctx.size)
            fill_s = time.perf_counter() - t
            with Daemon(q, *relay_args(ctx.sink.port), log=tmp / "daemon.log",
                        prefix=ctx.pin) as d:
                t0, c0 = d.wait_ready(timeout=120)
                t1 = d.wait_sent(1, ctx.timeout, interval=0.002)
                t2 = d.wait_sent(window, ctx.timeout)
                if window == n:
                    t2 = wait_queue_empty(q, timeout=ctx.timeout)
                c2 = tree_cpu(d.pid)
                _, rss, peak = proc_stats(d.pid)
        ctx.add(f"scale:{n}", rate=window / (t2 - t0), cpu_ms=(c2 - c0) / window * 1000,
                start_s=t1 - t0, rss_mb=rss / MB, peak_mb=peak / MB, window=window,
                fill_s=fill_s, drain_s=t2 - t0)
    ctx.scale_s += time.perf_counter() - started


def case_huge(ctx: Ctx) -> None:
    from twisted_mailout import enqueue

    for label, size in (("small", 2048), ("huge", ctx.huge_mb * MB)):
        with Workdir(ctx.base, "mailout-huge-") as tmp:
            enqueue(str(tmp / "q"), SENDER, [RECIPIENT], message(0, size))
            r = drain_once(ctx, tmp, relay_args(ctx.sink.port), 1)
        ctx.add(f"huge:{label}", peak_mb=r["peak"] / MB, seconds=r["seconds"], size=size)


CASES = {"drain": case_drain, "enqueue": case_enqueue, "mx": case_mx,
         "twisted": case_twisted, "smtplib": case_smtplib, "aiosmtplib": case_aiosmtplib,
         "zope": case_zope, "postfix": case_postfix, "postfix-smtp": case_postfix_smtp,
         "smtp-source": case_smtp_source, "workers": case_workers,
         "micro": case_micro, "big": case_big, "scale": case_scale, "huge": case_huge}


def probe_disk(base: str | None) -> dict:
    """What a file costs where the queues are made: CPU per create+write+close
    (ext4's inode allocator can make this 0.02 ms in one folder and 1 ms in
    another on the same disk) and the median latency of one fsync."""
    with Workdir(base, "probe-") as tmp:
        data = b"x" * 2048
        c = time.process_time()
        for i in range(300):
            fd = os.open(tmp / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
        create = (time.process_time() - c) / 300
        lat = []
        for i in range(15):
            fd = os.open(tmp / f"s{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
            os.close(fd)
    return {"create_ms": create * 1000, "fsync_ms": statistics.median(lat) * 1000}


# --------------------------------------------------------------------------- report


def med(ctx: Ctx, row: str, key: str) -> float | None:
    vals = [r[key] for r in ctx.results.get(row, []) if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def spread(ctx: Ctx, row: str, key: str = "rate") -> str:
    """min–max over the runs, when there were several."""
    vals = [r[key] for r in ctx.results.get(row, []) if r.get(key) is not None]
    return f"{min(vals):.0f}–{max(vals):.0f}" if len(vals) > 1 else "–"


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def report(ctx: Ctx, a, elapsed: float) -> str:
    out = []
    runs = max((len(v) for v in ctx.results.values()), default=0)
    load = os.getloadavg()
    out.append(f"{ctx.n:,} messages of {ctx.size:,} bytes, one recipient each, to smtp-sink on "
               f"127.0.0.1; median of {runs} run(s); {os.cpu_count()} cores; load average "
               f"{load[0]:.2f} at the end; {elapsed:.0f} s in all. Queues in {ctx.base}: "
               f"file create {ctx.disk['create_ms']:.3f} ms CPU, fsync "
               f"{ctx.disk['fsync_ms']:.2f} ms (before the run). "
               + (f"Senders pinned to CPU {ctx.pin_cpus} (`taskset -c {ctx.pin_cpus}`) but in "
                  "the workers case; the sink and the harness not pinned. "
                  if ctx.pin_cpus else "Nothing pinned (--no-pin). ")
               + f"Postfix: default_destination_concurrency_limit = "
               f"{ctx.postfix_concurrency}.\n")
    base = med(ctx, "mailout-drain", "rate")
    main_rows = [r for r in ROWS if r[0] in ctx.results]
    if main_rows:
        out.append("| system | msg/s | runs: min–max | ratio to twisted_mailout drain | "
                   "CPU s / 1000 msg | peak memory | fsync (durability) |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for key, label, dur in main_rows:
            rate = med(ctx, key, "rate")
            ratio = rate / base if base and rate else None
            peak = med(ctx, key, "peak_mb")
            if med(ctx, key, "partial"):
                label += f" (cut short after {ctx.mx_limit:.0f} s)"
            out.append(f"| {label} | {fmt(rate, '.0f')} | {spread(ctx, key)} | "
                       f"{fmt(ratio, '.2f')} | "
                       f"{fmt(med(ctx, key, 'cpu_ms'), '.2f')} | "
                       f"{fmt(peak, '.0f')}{' MB' if peak else ''} | {dur} |")
        conc = [k for k in ("mailout-enqueue-drain", "mailout-many-drain") if k in ctx.results]
        if "postfix-sendmail" in ctx.results:
            out.append(f"\n`postfix-sendmail`: CPU of sendmail and postdrop; the injecting "
                       f"loop (fork and exec) {med(ctx, 'postfix-sendmail', 'loop_cpu_ms'):.2f} "
                       "ms/msg more.")
        for key in conc:
            out.append(f"\n`{key}`: producer alone {med(ctx, key, 'producer_rate'):.0f} msg/s; "
                       f"CPU ms/msg: producer {med(ctx, key, 'producer_cpu_ms'):.2f} + daemon "
                       f"{med(ctx, key, 'daemon_cpu_ms'):.2f}.")
        out.append("")
    if any(k.startswith("micro:") for k in ctx.results):
        raw = med(ctx, "micro:raw-fsync", "rate")
        out.append("| enqueue, durable | msg/s | runs: min–max | ratio to the raw loop | "
                   "CPU ms / msg |")
        out.append("| --- | ---: | ---: | ---: | ---: |")
        for key, label in MICRO_ROWS:
            rate = med(ctx, "micro:" + key, "rate")
            if rate is None:
                continue
            out.append(f"| {label} | {rate:.0f} | {spread(ctx, 'micro:' + key)} | "
                       f"{fmt(rate / raw if raw else None, '.2f')} | "
                       f"{med(ctx, 'micro:' + key, 'cpu_ms'):.3f} |")
        out.append("")
    if "big:mailout-drain-100k" in ctx.results:
        k = "big:mailout-drain-100k"
        out.append(f"100 KB messages ({ctx.big_n:,}), queue drain: "
                   f"{med(ctx, k, 'rate'):.0f} msg/s = {med(ctx, k, 'mbit'):.0f} Mbit/s, "
                   f"{med(ctx, k, 'cpu_ms'):.2f} CPU s / 1000 msg, peak "
                   f"{med(ctx, k, 'peak_mb'):.0f} MB.\n")
    workers = sorted((k for k in ctx.results if k.startswith("workers:")),
                     key=lambda s: int(s.split(":")[1]))
    if workers:
        out.append(f"`twistd mailout --workers K` draining {ctx.workers_n:,} queued messages, "
                   "not pinned (both cores; the sink takes its share). CPU: every process of "
                   "the daemon (parent and workers), from the parent's service start to an "
                   "empty queue; start: service start → first delivery.\n")
        out.append("| workers | msg/s | runs: min–max | ratio to 1 worker | CPU ms / msg, all "
                   "processes | of which the parent | start | CPU to the 1st delivery | "
                   "processes | memory (PSS, peak) |")
        out.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        one = med(ctx, "workers:1", "rate")
        for k in workers:
            rate = med(ctx, k, "rate")
            out.append(f"| {k.split(':')[1]} | {fmt(rate, '.0f')} | {spread(ctx, k)} | "
                       f"{fmt(rate / one if one and rate else None, '.2f')} | "
                       f"{fmt(med(ctx, k, 'cpu_ms'), '.3f')} | "
                       f"{fmt(med(ctx, k, 'parent_cpu_ms'), '.3f')} | "
                       f"{fmt(med(ctx, k, 'start_s'), '.2f')} s | "
                       f"{fmt(med(ctx, k, 'start_cpu_s'), '.2f')} s | "
                       f"{fmt(med(ctx, k, 'processes'), '.0f')} | "
                       f"{fmt(med(ctx, k, 'peak_mb'), '.0f')} MB |")
        out.append("")
    scale = [k for k in ctx.results if k.startswith("scale:")]
    if scale:
        out.append("| queued | delivered | start (service up → 1st sent) | msg/s | "
                   "CPU ms / msg | RSS then | peak RSS |")
        out.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for k in sorted(scale, key=lambda s: int(s.split(":")[1])):
            n, w = int(k.split(":")[1]), int(med(ctx, k, "window"))
            out.append(f"| {n:,} | {'all' if w == n else f'first {w:,}'} | "
                       f"{med(ctx, k, 'start_s'):.2f} s | {med(ctx, k, 'rate'):.0f} | "
                       f"{med(ctx, k, 'cpu_ms'):.2f} | {med(ctx, k, 'rss_mb'):.0f} MB | "
                       f"{med(ctx, k, 'peak_mb'):.0f} MB |")
        sizes = sorted(int(k.split(":")[1]) for k in scale)
        lo, hi = med(ctx, f"scale:{sizes[0]}", "cpu_ms"), med(ctx, f"scale:{sizes[-1]}", "cpu_ms")
        fill = sum(med(ctx, k, "fill_s") or 0 for k in scale)
        out.append(f"\nCPU per message with {sizes[-1]:,} queued over {sizes[0]:,} queued: "
                   f"{fmt(hi / lo if lo and hi else None, '.2f')} ({fmt(hi, '.3f')} / "
                   f"{fmt(lo, '.3f')} ms). The scale case took {ctx.scale_s:.0f} s "
                   f"({fill:.0f} s of it filling the queues).")
        out.append("")
    if "huge:huge" in ctx.results:
        s, h = med(ctx, "huge:small", "peak_mb"), med(ctx, "huge:huge", "peak_mb")
        out.append(f"One {ctx.huge_mb} MB message: daemon peak RSS {h:.1f} MB, vs "
                   f"{s:.1f} MB for one 2 KB message (+{h - s:.1f} MB).\n")
    for name, why in ctx.skipped.items():
        out.append(f"**{name} skipped**: {why}.\n")
    for name, errs in ctx.errors.items():
        out.append(f"**{name} failed** in {len(errs)} run(s): {errs[0]}\n")
    out.append(targets(ctx))
    return "\n".join(out)


def verdict(value: float, need: float, at_least: bool, unit: str = "") -> str:
    """"met" or "missed", and by how much: ``value`` against a bound
    ``need`` (``at_least``: value ≥ need is met; else value ≤ need)."""
    met = value >= need if at_least else value <= need
    diff = value - need
    rel = f"{abs(diff) / need:.0%}" if need else "–"
    if met:
        return f"met, by {abs(diff):.2f}{unit} ({rel} beyond the target)"
    return f"MISSED by {abs(diff):.2f}{unit} ({rel} {'short' if at_least else 'over'})"


def targets(ctx: Ctx) -> str:
    """The targets of issue 14 (then those of issue 5 not replaced), each
    with its measured value, met or missed and by how much."""
    lines = ["Targets (issue 14), from this run:", ""]

    def check(text: str, value: float | None, need: float, at_least: bool,
              unit: str = "", why_missing: str = "") -> None:
        if value is None:
            if why_missing:
                lines.append(f"- [?] {text}: not measured ({why_missing})")
            return
        v = verdict(value, need, at_least, unit)
        lines.append(f"- [{'x' if v.startswith('met') else ' '}] {text}: "
                     f"{value:.2f}{unit}, {v}")

    base = med(ctx, "mailout-drain", "rate")
    for key, need, text in (
            ("postfix-drain", 4, "durable drain ≥ 4× Postfix's drain from the maildrop (×)"),
            ("zope-drain", 2, "durable drain ≥ 2× zope.sendmail's queue processor (×)"),
            ("aiosmtplib", 1, "durable drain ≥ 1× aiosmtplib, 10 reused connections (×)")):
        peer = med(ctx, key, "rate")
        missing = "" if (base is None) == (peer is None) else \
            f"`{'drain' if base is None else key}` has no result"
        check(text, base / peer if base and peer else None, need, True, why_missing=missing)
    check("CPU ≤ 0.5 ms per 2 KB message, queue drain (ms)",
          med(ctx, "mailout-drain", "cpu_ms"), 0.5, False, " ms")
    sizes = sorted(int(k.split(":")[1]) for k in ctx.results if k.startswith("scale:"))
    for n in sizes:
        check(f"CPU ≤ 0.5 ms per message with {n:,} queued (ms)",
              med(ctx, f"scale:{n}", "cpu_ms"), 0.5, False, " ms")
    if len(sizes) >= 2:
        lo, hi = med(ctx, f"scale:{sizes[0]}", "cpu_ms"), med(ctx, f"scale:{sizes[-1]}", "cpu_ms")
        check(f"CPU per message flat from {sizes[0]:,} to {sizes[-1]:,} queued "
              "(ratio, ≤ 1.1)", hi / lo if lo and hi else None, 1.1, False)
    for k in sorted((k for k in ctx.results if k.startswith("workers:")),
                    key=lambda s: int(s.split(":")[1])):
        check(f"CPU ≤ 0.5 ms per message with --workers {k.split(':')[1]}, all processes (ms)",
              med(ctx, k, "cpu_ms"), 0.5, False, " ms")
    one, two = med(ctx, "workers:1", "rate"), med(ctx, "workers:2", "rate")
    if "workers" in ctx.skipped or "workers" in ctx.errors:
        lines.append("- [?] 2 workers ≥ 1.5× 1 worker: not measured ("
                     + ("no --workers yet)" if "workers" in ctx.skipped else "the case failed)"))
    else:
        check("2 workers ≥ 1.5× 1 worker, not pinned (×)",
              two / one if one and two else None, 1.5, True)

    mark = len(lines)
    lines += ["", "Targets (issue 5) still checked:", ""]
    if len(sizes) >= 2:
        check(f"RSS with {sizes[-1]:,} queued < 150 MB (peak, MB)",
              med(ctx, f"scale:{sizes[-1]}", "peak_mb"), 150, False, " MB")
    raw = med(ctx, "micro:raw-fsync", "rate")
    if raw:
        many, single = med(ctx, "micro:mailout-enqueue-many", "rate"), \
            med(ctx, "micro:mailout-enqueue", "rate")
        check("enqueue_many ≥ 3× one fsync per message (×)",
              many / raw if many else None, 3, True)
        check("enqueue() within 20% of create+write+fsync+rename (×)",
              single / raw if single else None, 0.8, True)
    if "huge:huge" in ctx.results:
        check(f"{ctx.huge_mb} MB message raises peak RSS by a few MB at most (MB, ≤ 5)",
              med(ctx, "huge:huge", "peak_mb") - med(ctx, "huge:small", "peak_mb"), 5, False,
              " MB")
    if len(lines) == mark + 3:
        del lines[mark:]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, one run: 300 messages, scale 300 vs 5,000, 10 MB")
    ap.add_argument("--messages", type=int, help="N (default 5,000; --quick 300)")
    ap.add_argument("--runs", type=int, help="K runs, medians reported (default 3; --quick 1)")
    ap.add_argument("--size", type=int, default=2048, help="message size, bytes")
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--skip", help="comma-separated case names to leave out")
    ap.add_argument("--scale-sizes", type=int, nargs="+",
                    help="queue sizes for `scale` (default 1000 100000)")
    ap.add_argument("--scale-window", type=int,
                    help="time `scale` over the first W deliveries only (default: all)")
    ap.add_argument("--json", help="write every run's figures and the medians here")
    ap.add_argument("--workdir", default="/var/tmp",
                    help="where queues are made (default /var/tmp; it must be on the disk "
                         "you mean to measure, not tmpfs)")
    ap.add_argument("--timeout", type=float, default=600, help="bound on every wait, s")
    ap.add_argument("--mx-limit", type=float, default=60,
                    help="cut the `mx` case short after this many seconds (default 60)")
    ap.add_argument("--pin", default="0", metavar="CPUS",
                    help="taskset(1) CPU list every sender is pinned to, except in the "
                         "`workers` case (default 0: one core; the sink is not pinned)")
    ap.add_argument("--no-pin", action="store_true", help="pin nothing")
    ap.add_argument("--workers-messages", type=int,
                    help="messages in the `workers` case (default 20,000; --quick: N)")
    ap.add_argument("--workers-counts", type=int, nargs="+", default=[1, 2],
                    help="--workers values of the `workers` case (default 1 2)")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(ALL)
    names = [n for n in names if n not in set((a.skip or "").split(","))]
    unknown = set(names) - set(ALL)
    if unknown:
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}; known: {', '.join(ALL)}")
    n = a.messages or (300 if a.quick else 5000)
    runs = a.runs or (1 if a.quick else 3)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.perf_counter()
    with Sink() as sink:
        ctx = Ctx(n=n, size=a.size, sink=sink, base=a.workdir, timeout=a.timeout,
                  scale_sizes=a.scale_sizes or ([300, 5000] if a.quick else [1000, 100000]),
                  scale_window=a.scale_window or 0,
                  big_n=min(n, 100 if a.quick else 1000),
                  huge_mb=10 if a.quick else 50, mx_limit=a.mx_limit,
                  pin=pin_prefix(None if a.no_pin else a.pin),
                  pin_cpus="" if a.no_pin else a.pin,
                  workers_n=a.workers_messages or (n if a.quick else 20000),
                  workers_counts=a.workers_counts)
        ctx.disk = probe_disk(a.workdir)
        print(f"disk: {ctx.disk}", file=sys.stderr, flush=True)
        for run in range(runs):
            for name in names:
                if name in ONCE and run:
                    continue
                print(f"run {run + 1}/{runs}: {name}", file=sys.stderr, flush=True)
                try:
                    CASES[name](ctx)
                except Exception as e:  # one failing peer must not lose the others
                    traceback.print_exc()
                    ctx.errors.setdefault(name, []).append(f"{type(e).__name__}: {e}"[:300])
    elapsed = time.perf_counter() - started
    text = report(ctx, a, elapsed)
    print(text)
    if a.json:
        medians = {row: {k: med(ctx, row, k) for k in vals[0]}
                   for row, vals in ctx.results.items()}
        Path(a.json).write_text(json.dumps({"messages": n, "size": a.size, "runs": runs,
                                            "workdir": a.workdir, "disk": ctx.disk,
                                            "pin": ctx.pin_cpus, "errors": ctx.errors,
                                            "skipped": ctx.skipped,
                                            "results": ctx.results, "medians": medians,
                                            "report": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
