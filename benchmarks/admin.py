"""Queue administration at scale: ``python benchmarks/admin.py [--messages N]``.

Fills a queue folder with N messages (default 100,000; 2 KB each; recipients
spread over 100 domains), then times the operator's commands as an operator
runs them, each a ``mailout queue`` process working on the stopped daemon's
folder under its lock:

- ``list --json``: the time to its first line and to its last;
- ``summary`` (qshape);
- ``hold ALL``, ``release ALL`` (the first action also picks up the whole
  drop zone, timed apart as ``pickup``);
- ``delete --domain d7.test`` (1% of the messages).

Prints a Markdown table (for docs/benchmarks.md) and, with ``--json``, the
figures. Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env, message

DOMAINS = 100


def fill(q: Path, n: int, size: int) -> None:
    """N messages written into tmp/ in the queue's own format, one sync(2),
    renamed into new/ (as benchmarks/run.py's fill_queue_fast, with the
    recipients spread over DOMAINS domains)."""
    from twisted_mailout.queue.model import encode_envelope_line, new_queue_id
    from twisted_mailout.queue.store import Queue

    Queue(str(q))
    body = message(0, size)
    names = []
    now = time.time()
    for i in range(n):
        qid = new_queue_id()
        head = encode_envelope_line("bench@mailout.test", [f"r{i}@d{i % DOMAINS}.test"],
                                    now - (i % 2000) * 60, eightbit=not body.isascii())
        with open(q / "tmp" / qid, "wb") as f:
            f.write(head + body)
        names.append(qid)
    os.sync()
    for qid in names:
        os.rename(q / "tmp" / qid, q / "new" / qid)
    os.sync()


def mailout(q: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "twisted_mailout.daemon.cli", "queue", "--queue", str(q),
            *args]


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=3600,
                       check=False)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt, p.stdout


def first_line(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds to the first line, seconds to the end, lines)."""
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None
        first = None
        lines = 0
        for _line in p.stdout:
            if first is None:
                first = time.perf_counter() - t0
            lines += 1
        rc = p.wait(timeout=3600)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc})")
    return first or 0.0, time.perf_counter() - t0, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    rows: list[tuple[str, str]] = []
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mailout-admin-bench-") as tmp:
        q = Path(tmp) / "q"
        t0 = time.perf_counter()
        fill(q, a.messages, a.size)
        figures["fill"] = time.perf_counter() - t0

        first, total, lines = first_line(mailout(q, "list", "--json"))
        figures.update(list_incoming_first=first, list_incoming_total=total)
        rows.append(("list --json (not yet picked up)",
                     f"first line {first * 1000:.0f} ms, all {lines:,} in {total:.1f} s"))
        dt, _ = timed(mailout(q, "hold", "ALL"))
        figures["hold_all_with_pickup"] = dt
        rows.append(("hold ALL (includes picking up the drop zone)", f"{dt:.1f} s"))
        first, total, lines = first_line(mailout(q, "list", "--json"))
        figures.update(list_first=first, list_total=total)
        rows.append(("list --json", f"first line {first * 1000:.0f} ms, "
                                    f"all {lines:,} in {total:.1f} s"))
        dt, _ = timed(mailout(q, "summary"))
        figures["summary"] = dt
        rows.append(("summary", f"{dt:.1f} s"))
        dt, _ = timed(mailout(q, "release", "ALL"))
        figures["release_all"] = dt
        rows.append(("release ALL", f"{dt:.1f} s"))
        dt, _ = timed(mailout(q, "hold", "ALL"))
        figures["hold_all"] = dt
        rows.append(("hold ALL (picked up already)", f"{dt:.1f} s"))
        dt, _out = timed(mailout(q, "delete", "--domain", "d7.test", "--reason", "bench"))
        figures["delete_domain"] = dt
        rows.append((f"delete --domain d7.test ({a.messages // DOMAINS:,} messages)",
                     f"{dt:.1f} s"))
    print(f"Queue administration, {a.messages:,} queued messages of {a.size} bytes "
          f"(fill {figures['fill']:.0f} s)\n")
    print("| command | time |\n| --- | --- |")
    for name, value in rows:
        print(f"| `{name}` | {value} |")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
