"""Queue scale benchmark: does a queue of 100,000 cost more per message than 1,000?

    python benchmarks/scale.py [--sizes 1000 100000] [--deliver 5000]

For each queue size N: fills a queue folder with N 2 KB messages (written
straight into the folder, not through the durable enqueue(), to keep set-up
short), picks them up (so the daemon starts on an active queue, as after a
restart), starts `twistd -n mailout --relay=...` against Postfix's smtp-sink,
and measures the time until the first message is delivered (start-up,
including recovery of N entries), the rate and CPU per message over the first
`--deliver` deliveries, and the daemon's resident memory (VmRSS at the end of
the measured window, and VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from drain import free_port, message, proc_stats, start_sink  # noqa: E402

from twisted_mailout.queue import ENVELOPE_HEADER, Queue, _new_queue_id  # noqa: E402


def fill(q: Path, n: int, size: int) -> None:
    queue = Queue(str(q))
    body = message(0, size)
    now = time.time()
    for i in range(n):
        qid = _new_queue_id()
        head = ENVELOPE_HEADER + json.dumps({"v": 1, "sender": "bench@mailout.test",
                                             "recipients": ["sink@dest.test"],
                                             "arrival": now}).encode() + b"\n"
        with open(q / "new" / qid, "wb") as f:
            f.write(head + body.replace(b"<bench0@", f"<bench{i}@".encode()))
    while queue.pickup_all(10000)[0]:
        pass


def run(n: int, deliver: int, size: int, port: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mailout-scale-"))
    q = tmp / "q"
    t = time.perf_counter()
    fill(q, n, size)
    fill_s = time.perf_counter() - t
    cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
           "--pidfile=", f"--logfile={tmp / 'log'}", "mailout", f"--queue={q}",
           f"--relay=127.0.0.1:{port}", "--max-connections=10", "--max-per-destination=10",
           "--helo=bench.mailout.test"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        msgs = q / "messages"
        first = None
        deadline = time.monotonic() + 900
        while True:
            left = len(os.listdir(msgs))
            if first is None and left < n:
                first = time.perf_counter() - t0
                c1, t1, left1 = proc_stats(proc.pid)[0], time.perf_counter(), left
            if first is not None and (left1 - left >= deliver or left == 0):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"no progress; see {tmp / 'log'}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t1
        done = left1 - left
        c2, cur, peak = proc_stats(proc.pid)
        used = c2 - c1
    finally:
        proc.terminate()
        proc.wait(60)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"n": n, "fill_s": fill_s, "start_s": first, "rate": done / elapsed,
            "cpu_ms": used / done * 1000, "rss_mb": cur / 2**20, "hwm_mb": peak / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--deliver", type=int, default=5000)
    ap.add_argument("--size", type=int, default=2048)
    a = ap.parse_args()
    port = free_port()
    sink = start_sink(port)
    try:
        rows = [run(n, min(a.deliver, n - 1), a.size, port) for n in a.sizes]
    finally:
        sink.terminate()
        sink.wait(10)
    print(f"{'queued':>8} {'start s':>8} {'msg/s':>7} {'CPU ms/msg':>11} {'RSS MB':>7} "
          f"{'peak MB':>8}")
    for r in rows:
        print(f"{r['n']:8d} {r['start_s']:8.2f} {r['rate']:7.0f} {r['cpu_ms']:11.2f} "
              f"{r['rss_mb']:7.1f} {r['hwm_mb']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
