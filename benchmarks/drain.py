"""Queue drain benchmark: twisted_mailout to Postfix's smtp-sink, with a peer.

    python benchmarks/drain.py [--messages 2000] [--size 2048] [--runs 3]

Enqueues N messages of SIZE bytes into a fresh queue, starts the daemon
(`twistd -n mailout --relay=...`) against `smtp-sink` on loopback, and times
the drain until the queue is empty; reports messages/second, the daemon's CPU
seconds per 1,000 messages and its peak resident memory, as medians of the
runs. The same messages sent with the standard library's smtplib over one
reused connection (no queue, no fsync) are measured in the same run, and the
ratio is printed. Issue 5 extends this to the other peers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted_mailout import enqueue  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sink(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "256"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("smtp-sink did not start")


def message(i: int, size: int) -> bytes:
    head = (f"Message-ID: <bench{i}@mailout.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"From: bench@mailout.test\r\nTo: sink@dest.test\r\nSubject: {i}\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog. 0123456789\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)] + b"\r\n"
    return head + body


def proc_stats(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, resident bytes, peak resident bytes) of a live process,
    from /proc (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cpu, rss, peak


def queue_empty(q: Path) -> bool:
    return not any(os.listdir(q / sub) for sub in ("new", "messages", "state"))


def run_mailout(n: int, size: int, port: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mailout-bench-"))
    q = tmp / "q"
    msgs = [message(i, size) for i in range(n)]
    t0 = time.perf_counter()
    for m in msgs:
        enqueue(str(q), "bench@mailout.test", ["sink@dest.test"], m)
    enqueue_rate = n / (time.perf_counter() - t0)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
           "--pidfile=", f"--logfile={tmp / 'log'}", "mailout", f"--queue={q}",
           f"--relay=127.0.0.1:{port}", "--poll-interval=0.1", "--max-connections=10",
           "--max-per-destination=10", "--helo=bench.mailout.test"]
    t1 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    cpu = rss = 0
    try:
        deadline = time.monotonic() + 600
        while not queue_empty(q) or not (q / "messages").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"drain did not finish; see {tmp / 'log'}")
            cpu, _, rss = proc_stats(proc.pid)
            time.sleep(0.02)
        elapsed = time.perf_counter() - t1
        cpu, _, rss = proc_stats(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"rate": n / elapsed, "cpu_per_1000": cpu / n * 1000, "rss_mb": rss / 2**20,
            "enqueue_rate": enqueue_rate}


def run_smtplib(n: int, size: int, port: int) -> dict:
    msgs = [message(i, size) for i in range(n)]
    t0 = time.perf_counter()
    c0 = time.process_time()
    with smtplib.SMTP("127.0.0.1", port) as s:
        for m in msgs:
            s.sendmail("bench@mailout.test", ["sink@dest.test"], m)
    elapsed = time.perf_counter() - t0
    return {"rate": n / elapsed, "cpu_per_1000": (time.process_time() - c0) / n * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    port = free_port()
    sink = start_sink(port)
    try:
        ours = [run_mailout(a.messages, a.size, port) for _ in range(a.runs)]
        peer = [run_smtplib(a.messages, a.size, port) for _ in range(a.runs)]
    finally:
        sink.terminate()
        sink.wait(10)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    print(f"{a.messages} messages of {a.size} bytes to smtp-sink on loopback, median of "
          f"{a.runs} runs, {os.cpu_count()} cores")
    print(f"{'system':44} {'msg/s':>8} {'CPU s/1000':>11} {'peak RSS MB':>12} {'ratio':>6}")
    r0 = med(ours, "rate")
    print(f"{'twisted_mailout queue drain (--relay, durable)':44} {r0:8.0f} "
          f"{med(ours, 'cpu_per_1000'):11.2f} {med(ours, 'rss_mb'):12.1f} {1.0:6.2f}")
    r1 = med(peer, "rate")
    print(f"{'smtplib, one reused connection (no queue)':44} {r1:8.0f} "
          f"{med(peer, 'cpu_per_1000'):11.2f} {'-':>12} {r1 / r0:6.2f}")
    print(f"enqueue() rate (durable, one fsync each): {med(ours, 'enqueue_rate'):.0f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
