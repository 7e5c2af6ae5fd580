"""Throughput benchmarks: twisted_mailout and its peers, side by side.

    python3 benchmarks/run.py [--quick] [--messages N] [--runs K] [--size BYTES]
                              [--only NAMES] [--json OUT.json] [--workdir DIR]

Every peer delivers to the same Postfix ``smtp-sink`` on 127.0.0.1, started
once for the whole run; the cases run one after the other, all of them once
per run (so noise falls on every peer alike), and the table gives medians of
the runs. See docs/benchmarks.md for what each case does and measures.

Cases (``--only`` takes a comma-separated list of these names):

  drain        twisted_mailout daemon draining N queued messages (--relay)
  enqueue      the same daemon while a producer process calls enqueue(), and
               one calling enqueue_many() (batches of 100), concurrently
  mx           twisted_mailout direct to MX, 50 domains, loopback DNS
  twisted      twisted.mail.smtp.sendmail(), 10 in flight
  smtplib      smtplib, one reused connection
  aiosmtplib   aiosmtplib, 10 reused connections
  zope         zope.sendmail: enqueue (commit per message), then its queue
               processor draining to the sink
  postfix      a private Postfix: inject (smtp-source, 10 sessions), then drain
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
    Sink,
    Workdir,
    env,
    message,
    proc_stats,
    run_client,
    wait_queue_empty,
)

sys.path.insert(0, str(ROOT))

ALL = ["drain", "enqueue", "mx", "twisted", "smtplib", "aiosmtplib", "zope", "postfix",
       "smtp-source", "micro", "big", "scale", "huge"]
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
    ("postfix-inject", "Postfix: inject (smtp-source → smtpd, 10 sessions)",
     "cleanup fsyncs each queue file"),
    ("postfix-drain", "Postfix: drain (qmgr → smtp → sink)",
     "no fsync at removal"),
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
    disk: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # case -> error text
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
               limit: float | None = None) -> dict:
    """Start the daemon on the queue in tmp/q, time it from service start to
    the n-th delivery and an empty queue. CPU: the daemon's (all threads).

    With ``limit`` (seconds), a drain still running then is cut short and
    measured over what was sent (``partial`` in the result)."""
    q = tmp / "q"
    with Daemon(q, *args, log=tmp / "daemon.log") as d:
        t0, c0 = d.wait_ready()
        try:
            d.wait_sent(n, limit or ctx.timeout)
        except TimeoutError:
            if limit is None:
                raise
            t1 = time.perf_counter()
            c1, _, peak = proc_stats(d.pid)
            return {"seconds": t1 - t0, "cpu": c1 - c0, "peak": peak,
                    "sent": d.counter.sent, "partial": True}
        t1 = wait_queue_empty(q)
        c1, _, peak = proc_stats(d.pid)
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


def _concurrent(ctx: Ctx, row: str, producer: str) -> None:
    from twisted_mailout.queue.store import Queue

    with Workdir(ctx.base, "mailout-conc-") as tmp:
        q = tmp / "q"
        Queue(str(q))
        with Daemon(q, *relay_args(ctx.sink.port), log=tmp / "daemon.log") as d:
            d.wait_ready()
            c0 = proc_stats(d.pid)[0]
            cmd = [sys.executable, str(BENCH / "clients.py"), producer, "--queue", str(q),
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
                c1, _, peak = proc_stats(d.pid)
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
                   "--size", str(ctx.size), *extra, timeout=ctx.timeout)
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


def _smtp_source(port: int, n: int, msgfile: Path, timeout: float) -> tuple[float, float, int]:
    """Run smtp-source (10 sessions, connections reused); (seconds, CPU, peak RSS)."""
    cmd = [SMTP_SOURCE, "-d", "-s", "10", "-m", str(n), "-f", SENDER, "-t", RECIPIENT,
           "-F", str(msgfile), "-M", "source.bench.test", f"127.0.0.1:{port}"]
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
        s, cpu, rss = _smtp_source(ctx.sink.port, ctx.n, _msgfile(tmp, ctx.size), ctx.timeout)
    add_rate(ctx, "smtp-source", ctx.n, s, cpu, rss)


def case_postfix(ctx: Ctx) -> None:
    from postfix_instance import PostfixInstance

    with Workdir(ctx.base, "postfix-src-") as tmp:
        msgfile = _msgfile(tmp, ctx.size)
        with PostfixInstance(ctx.sink.port, base=ctx.base or "/var/tmp") as pf:
            pf.hold_queue_manager()
            c0, t0 = pf.cpu_seconds(), time.perf_counter()
            _smtp_source(pf.port, ctx.n, msgfile, ctx.timeout)
            pf.wait_queued(ctx.n, ctx.timeout)
            t1, c1 = time.perf_counter(), pf.cpu_seconds()
            peak = [pf.pss_bytes()]
            add_rate(ctx, "postfix-inject", ctx.n, t1 - t0, c1 - c0, peak[0])

            def sample():
                peak.append(pf.pss_bytes())

            t2, c2 = time.perf_counter(), pf.cpu_seconds()
            pf.release_queue_manager()
            pf.wait_queued(0, ctx.timeout, interval=0.01, on_poll=sample)
            t3, c3 = time.perf_counter(), pf.cpu_seconds()
            sent = pf.log().count("status=sent")
            if sent < ctx.n:
                raise RuntimeError(f"postfix sent {sent} of {ctx.n}:\n{pf.log()[-3000:]}")
    add_rate(ctx, "postfix-drain", ctx.n, t3 - t2, c3 - c2, max(peak))


def case_micro(ctx: Ctx) -> None:
    n = min(ctx.n, 2000)
    with Workdir(ctx.base, "micro-") as tmp:
        for row in ("raw-fsync", "mailout-enqueue", "mailout-enqueue-many"):
            p = run_client(row, "--queue", str(tmp / row), "--messages", str(n),
                           "--size", str(ctx.size), "--batch", "100", timeout=ctx.timeout)
            add_rate(ctx, "micro:" + row, n, p["seconds"], p["cpu"], p["maxrss"])


def case_big(ctx: Ctx) -> None:
    size = 100 * 1024
    with Workdir(ctx.base, "mailout-big-") as tmp:
        fill_queue(tmp / "q", [message(i, size) for i in range(ctx.big_n)])
        r = drain_once(ctx, tmp, relay_args(ctx.sink.port), ctx.big_n)
    add_rate(ctx, "big:mailout-drain-100k", ctx.big_n, r["seconds"], r["cpu"], r["peak"],
             size=size)


def case_scale(ctx: Ctx) -> None:
    for n in ctx.scale_sizes:
        window = min(n, ctx.scale_window or n)
        with Workdir(ctx.base, "mailout-scale-") as tmp:
            q = tmp / "q"
            t = time.perf_counter()
            fill_queue_fast(q, n, ctx.size)
            fill_s = time.perf_counter() - t
            with Daemon(q, *relay_args(ctx.sink.port), log=tmp / "daemon.log") as d:
                t0, c0 = d.wait_ready(timeout=120)
                t1 = d.wait_sent(1, ctx.timeout, interval=0.002)
                t2 = d.wait_sent(window, ctx.timeout)
                if window == n:
                    t2 = wait_queue_empty(q)
                c2, rss, peak = proc_stats(d.pid)
        ctx.add(f"scale:{n}", rate=window / (t2 - t0), cpu_ms=(c2 - c0) / window * 1000,
                start_s=t1 - t0, rss_mb=rss / MB, peak_mb=peak / MB, window=window,
                fill_s=fill_s)


def case_huge(ctx: Ctx) -> None:
    from twisted_mailout import enqueue

    for label, size in (("small", 2048), ("huge", ctx.huge_mb * MB)):
        with Workdir(ctx.base, "mailout-huge-") as tmp:
            enqueue(str(tmp / "q"), SENDER, [RECIPIENT], message(0, size))
            r = drain_once(ctx, tmp, relay_args(ctx.sink.port), 1)
        ctx.add(f"huge:{label}", peak_mb=r["peak"] / MB, seconds=r["seconds"], size=size)


CASES = {"drain": case_drain, "enqueue": case_enqueue, "mx": case_mx,
         "twisted": case_twisted, "smtplib": case_smtplib, "aiosmtplib": case_aiosmtplib,
         "zope": case_zope, "postfix": case_postfix, "smtp-source": case_smtp_source,
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
               f"{ctx.disk['fsync_ms']:.2f} ms (before the run).\n")
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
        out.append("")
    if "huge:huge" in ctx.results:
        s, h = med(ctx, "huge:small", "peak_mb"), med(ctx, "huge:huge", "peak_mb")
        out.append(f"One {ctx.huge_mb} MB message: daemon peak RSS {h:.1f} MB, vs "
                   f"{s:.1f} MB for one 2 KB message (+{h - s:.1f} MB).\n")
    for name, errs in ctx.errors.items():
        out.append(f"**{name} failed** in {len(errs)} run(s): {errs[0]}\n")
    out.append(targets(ctx))
    return "\n".join(out)


def targets(ctx: Ctx) -> str:
    lines = ["Targets (issue 5), from this run:", ""]
    base = med(ctx, "mailout-drain", "rate")

    def check(text: str, value: float | None, ok) -> None:
        if value is None:
            return
        lines.append(f"- [{'x' if ok(value) else ' '}] {text}: {value:.2f}")

    for key, need, text in (("postfix-drain", 4, "drain ≥ 4× Postfix's drain"),
                            ("zope-drain", 2, "drain ≥ 2× zope.sendmail's drain"),
                            ("aiosmtplib", 1, "drain > aiosmtplib, 10 connections")):
        peer = med(ctx, key, "rate")
        if base and peer:
            check(f"{text} (×)", base / peer, lambda v, need=need: v >= need)
    check("CPU ms per 2 KB message ≤ 0.5 (drain)", med(ctx, "mailout-drain", "cpu_ms"),
          lambda v: v <= 0.5)
    sizes = sorted(int(k.split(":")[1]) for k in ctx.results if k.startswith("scale:"))
    if len(sizes) >= 2:
        lo, hi = med(ctx, f"scale:{sizes[0]}", "cpu_ms"), med(ctx, f"scale:{sizes[-1]}", "cpu_ms")
        check(f"CPU per message flat from {sizes[0]:,} to {sizes[-1]:,} queued (ratio, ≤ 1.1)",
              hi / lo, lambda v: v <= 1.1)
        check(f"RSS with {sizes[-1]:,} queued < 150 MB (peak, MB)",
              med(ctx, f"scale:{sizes[-1]}", "peak_mb"), lambda v: v < 150)
    raw = med(ctx, "micro:raw-fsync", "rate")
    if raw:
        many, one = med(ctx, "micro:mailout-enqueue-many", "rate"), \
            med(ctx, "micro:mailout-enqueue", "rate")
        if many:
            check("enqueue_many ≥ 3× one fsync per message (×)", many / raw, lambda v: v >= 3)
        if one:
            check("enqueue() within 20% of create+write+fsync+rename (×)", one / raw,
                  lambda v: v >= 0.8)
    if "huge:huge" in ctx.results:
        check(f"{ctx.huge_mb} MB message raises peak RSS by a few MB at most (MB, ≤ 5)",
              med(ctx, "huge:huge", "peak_mb") - med(ctx, "huge:small", "peak_mb"),
              lambda v: v <= 5)
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
                  huge_mb=10 if a.quick else 50, mx_limit=a.mx_limit)
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
                                            "errors": ctx.errors,
                                            "results": ctx.results, "medians": medians,
                                            "report": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
