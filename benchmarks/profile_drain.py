"""Profile the daemon draining a full queue to smtp-sink (``--relay``).

    python3 benchmarks/profile_drain.py [--messages 10000] [--size 2048]
        [--py-spy OUT.svg | --py-spy-top OUT.txt | --cprofile OUT.prof] [--native]
        [--workdir DIR]

``--py-spy OUT.svg`` attaches ``py-spy record`` (all threads, the reactor
and the file-I/O thread pool; ``--native`` adds C frames) to the twistd
process from service start until the queue is empty; ``--py-spy-top``
writes the same samples as a flat profile (``--format raw``, folded stacks,
summed per function by this script). ``--cprofile OUT.prof`` runs twistd
with ``--profile=OUT.prof --profiler=cprofile --savestats`` instead (the
reactor thread only; read it with ``python3 -m pstats``); its top
functions by own time are printed.

py-spy: ``pip install py-spy``; attaching needs root or ptrace rights.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Daemon, Sink, Workdir, message, proc_stats, stop_process, wait_queue_empty
from run import fill_queue, relay_args


def _function(frame: str) -> str:
    """``f (path/x.py:12)`` -> ``f (path/x.py)``: samples summed per function."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def flat_from_folded(path: Path, top: int = 40, by_line: bool = False) -> str:
    """Sum folded stacks (``a;b;c N``) into own and total samples per
    function (per line with ``by_line``)."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        if not by_line:
            frames = [_function(f) for f in frames]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    out = [f"{samples} samples", "", "own%   total%  frame"]
    for frame, n in own.most_common(top):
        out.append(f"{100 * n / samples:5.1f}  {100 * total[frame] / samples:6.1f}  {frame}")
    out += ["", "by total (inclusive):"]
    for frame, n in total.most_common(top):
        out.append(f"{100 * n / samples:5.1f}  {frame}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--py-spy", dest="pyspy", help="flame graph (SVG) to write")
    ap.add_argument("--py-spy-top", dest="pyspy_top", help="flat profile (text) to write")
    ap.add_argument("--native", action="store_true", help="py-spy --native")
    ap.add_argument("--gil", action="store_true",
                    help="py-spy --gil: only the thread holding the GIL (Python CPU)")
    ap.add_argument("--by-line", action="store_true", help="flat profile per line")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--cprofile", help="cProfile stats file to write")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    with Sink() as sink, Workdir(a.workdir, "mailout-prof-") as tmp:
        q = tmp / "q"
        fill_queue(q, [message(i, a.size) for i in range(a.messages)])
        d = Daemon(q, *relay_args(sink.port), log=tmp / "daemon.log")
        if a.cprofile:
            d.twistd_args = [f"--profile={os.path.abspath(a.cprofile)}", "--profiler=cprofile",
                             "--savestats"]
        spy = None
        with d:
            t0, c0 = d.wait_ready()
            if a.pyspy or a.pyspy_top:
                out = a.pyspy or str(tmp / "folded.txt")
                cmd = ["py-spy", "record", "--pid", str(d.pid), "--threads", "--rate",
                       str(a.rate), "-o", out, "--nonblocking"]
                if a.pyspy_top and not a.pyspy:
                    cmd += ["--format", "raw"]
                if a.native:
                    cmd.append("--native")
                if a.gil:
                    cmd.append("--gil")
                spy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                d.wait_sent(a.messages, a.timeout)
                t1 = wait_queue_empty(q)
                c1, _, peak = proc_stats(d.pid)
            finally:
                if spy is not None:
                    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
                    try:
                        spy.wait(60)
                    except subprocess.TimeoutExpired:
                        stop_process(spy)
        print(f"{a.messages} messages: {a.messages / (t1 - t0):.0f} msg/s, "
              f"{(c1 - c0) / a.messages * 1000:.2f} ms CPU/msg, peak {peak / 2**20:.0f} MB"
              f"{' (profiled: slower)' if spy or a.cprofile else ''}")
        if spy is not None and spy.returncode not in (0, None, -2):
            print(spy.stderr.read().decode(errors="replace"), file=sys.stderr)
        if a.pyspy_top:
            folded = Path(a.pyspy) if a.pyspy and a.pyspy.endswith(".txt") else \
                tmp / "folded.txt"
            if folded.exists():
                text = flat_from_folded(folded, by_line=a.by_line)
                Path(a.pyspy_top).write_text(text + "\n")
                print(text)
    if a.cprofile:
        deadline = time.monotonic() + 10
        while not os.path.exists(a.cprofile) and time.monotonic() < deadline:
            time.sleep(0.1)
        if os.path.exists(a.cprofile):
            pstats.Stats(a.cprofile).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
