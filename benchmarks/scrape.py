"""What watching the daemon costs: ``python benchmarks/scrape.py [--messages N] [--runs K]``.

Drains N queued 2 KB messages to Postfix's smtp-sink (one relay, 10
connections) K times without and K times with a scraper that fetches
``/metrics`` and ``/api/v1/status`` once a second (Prometheus's and the
status page's load, ten times the usual scrape rate), alternating. Reports the
median drain rates and their ratio, and the response times of both endpoints
while the daemon delivers at full speed. Then, with 100,000 messages held in
the queue (every one in the scheduler's counts), times both endpoints again.
Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    Daemon,
    Sink,
    Workdir,
    free_port,
    message,
    wait_queue_empty,
)
from benchmarks.run import fill_queue, fill_queue_fast


class Scraper(threading.Thread):
    """Fetches both endpoints every ``interval`` seconds until stopped;
    keeps each response time (seconds)."""

    def __init__(self, base: str, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.interval = interval
        self.times: dict[str, list[float]] = {"/metrics": [], "/api/v1/status": []}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for path, times in self.times.items():
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(self.base + path, timeout=10) as r:
                        r.read()
                    times.append(time.perf_counter() - t0)
                except OSError:
                    pass
            self.stop.wait(self.interval)


def drain(tmp: Path, sink: Sink, n: int, size: int, scrape: bool) -> tuple[float, Scraper | None]:
    q = tmp / "q"
    fill_queue(q, [message(i, size) for i in range(n)])
    port = free_port()
    args = [f"--relay=127.0.0.1:{sink.port}", "--max-connections=10",
            "--max-per-destination=10", "--poll-interval=1",
            f"--http=tcp:{port}:interface=127.0.0.1"]
    scraper = None
    with Daemon(q, *args, log=tmp / "daemon.log") as d:
        t0, _ = d.wait_ready()
        if scrape:
            scraper = Scraper(f"http://127.0.0.1:{port}")
            scraper.start()
        d.wait_sent(n, 600)
        t1 = wait_queue_empty(q)
        if scraper is not None:
            scraper.stop.set()
            scraper.join(15)
    return n / (t1 - t0), scraper


def ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"median {statistics.median(values) * 1000:.1f} ms, "
            f"max {max(values) * 1000:.1f} ms ({len(values)} requests)")


def held_queue(base: Path | None, sink: Sink, n: int) -> Scraper:
    with Workdir(base, "mailout-scrape-held-") as tmp:
        q = tmp / "q"
        fill_queue_fast(q, n, 2048)
        port = free_port()
        # every message suspended: queued and counted, none attempted
        from twisted_mailout.queue.model import Suspension
        from twisted_mailout.queue.store import Queue

        Queue(str(q)).save_suspensions([Suspension("bench", "dest.test", "benchmark",
                                                   time.time(), time.time() + 3600)])
        with Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--poll-interval=1",
                    f"--http=tcp:{port}:interface=127.0.0.1", log=tmp / "daemon.log") as d:
            d.wait_ready()
            deadline = time.monotonic() + 600
            base_url = f"http://127.0.0.1:{port}"
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
                        text = r.read().decode()
                    if f'mailout_messages_enqueued_total {float(n)}' in text:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            s = Scraper(base_url, interval=0.2)
            s.start()
            time.sleep(5)
            s.stop.set()
            s.join(15)
            return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--held", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    sink = Sink().start()
    try:
        rates: dict[bool, list[float]] = {False: [], True: []}
        scrapes: dict[str, list[float]] = {"/metrics": [], "/api/v1/status": []}
        for _ in range(a.runs):
            for scrape in (False, True):
                with Workdir(a.workdir, "mailout-scrape-") as tmp:
                    rate, s = drain(tmp, sink, a.messages, 2048, scrape)
                rates[scrape].append(rate)
                if s is not None:
                    for k, v in s.times.items():
                        scrapes[k].extend(v)
        held = held_queue(a.workdir, sink, a.held) if a.held else None
    finally:
        sink.stop()
    plain, watched = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"Scraping while draining {a.messages:,} messages, {a.runs} runs each, medians\n")
    print("| | value |\n| --- | --- |")
    print(f"| drain, nobody watching | {plain:,.0f} msg/s |")
    print(f"| drain, /metrics and /api/v1/status every second | {watched:,.0f} msg/s |")
    print(f"| cost of watching | {(1 - watched / plain) * 100:+.1f}% of the rate |")
    for k, v in scrapes.items():
        print(f"| `{k}` during the drain | {ms(v)} |")
    if held is not None:
        for k, v in held.times.items():
            print(f"| `{k}` with {a.held:,} messages queued | {ms(v)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
