"""What DKIM signing costs the drain: ``python benchmarks/dkim.py [--messages N] [--runs K]``.

Drains N queued 2 KB messages to Postfix's smtp-sink (one relay, 10
connections) without signing, signing with an rsa-2048 key and signing with an
ed25519 key (``--dkim-keys``), K runs each, alternating; prints the median
rates, their ratio to the unsigned drain, and the daemon's CPU per message.
Before the drains it times one signature in this process (``Signer.sign``
of one such message, rsa-2048 and ed25519, and with ``--pure-python-rsa``
also dkimpy's own RSA, for comparison). Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# This file is named like dkimpy's package, and benchmarks/run.py puts this
# folder on the path: load dkimpy (through the signer) first, with this
# folder off the path, so that "dkim" is dkimpy in this process.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
import twisted_mailout.dkim.signer  # noqa: E402, F401

from benchmarks.common import Daemon, Sink, Workdir, message, proc_stats, wait_queue_empty  # noqa: E402
from benchmarks.run import fill_queue  # noqa: E402


def drain(tmp: Path, sink: Sink, n: int, extra: list[str]) -> tuple[float, float]:
    """(messages per second, CPU ms per message) of one drain."""
    q = tmp / "q"
    fill_queue(q, [message(i, 2048) for i in range(n)])
    with Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--max-connections=10",
                "--max-per-destination=10", "--poll-interval=1", "--no-http", *extra,
                log=tmp / "daemon.log") as d:
        t0, c0 = d.wait_ready()
        d.wait_sent(n, 1200)
        t1 = wait_queue_empty(q)
        c1, _, _ = proc_stats(d.pid)
    return n / (t1 - t0), (c1 - c0) / n * 1000


def sign_cost(table: Path, runs: int = 300, pure_python: bool = False) -> float:
    """Milliseconds of one ``Signer.sign`` of a 2 KB benchmark message (in
    this process, median of 5 batches of ``runs``); ``pure_python``: with
    dkimpy's own RSA instead of OpenSSL (the signer before issue 12's fix)."""
    from twisted_mailout.dkim import signer as signer_module
    from twisted_mailout.dkim.keys import KeyTable

    signer = signer_module.Signer(KeyTable.load(table), required=True)
    if pure_python:
        signer._rsa.clear()  # PEM text: _FastDKIM hands it to dkimpy's RSA
    msg = message(0, 2048)
    signer.sign(msg, "bench@mailout.test")
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(runs):
            signer.sign(msg, "bench@mailout.test")
        batches.append((time.perf_counter() - t0) / runs * 1000)
    return statistics.median(batches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--pure-python-rsa", action="store_true",
                    help="also time one signature with dkimpy's pure-Python RSA")
    a = ap.parse_args()
    from twisted_mailout.dkim import keygen

    sink = Sink().start()
    results: dict[str, list[tuple[float, float]]] = {"none": [], "rsa": [], "ed25519": []}
    try:
        with Workdir(None, "mailout-dkim-keys-") as keys:
            tables = {}
            for kind in ("rsa", "ed25519"):
                table = keys / kind / "keys.toml"
                table.parent.mkdir(mode=0o700)
                # the benchmark's messages are From: bench@mailout.test
                keygen(table, "mailout.test", "b1", kind)
                tables[kind] = table
            costs = {kind: sign_cost(tables[kind]) for kind in ("rsa", "ed25519")}
            if a.pure_python_rsa:
                costs["rsa, dkimpy's pure-Python RSA"] = sign_cost(tables["rsa"], 30, True)
            for _ in range(a.runs):
                for name, rows in results.items():
                    extra = [] if name == "none" else [f"--dkim-keys={tables[name]}",
                                                      "--dkim-required"]
                    with Workdir(None, "mailout-dkim-") as tmp:
                        rows.append(drain(tmp, sink, a.messages, extra))
    finally:
        sink.stop()
    print("One Signer.sign of a 2 KB message, in one thread\n")
    print("| key | ms / signature |\n| --- | ---: |")
    for name, ms in costs.items():
        print(f"| {name} | {ms:.2f} |")
    print()
    base = statistics.median(r for r, _ in results["none"])
    print(f"DKIM signing, {a.messages:,} messages of 2 KB, {a.runs} runs each, medians\n")
    print("| signing | msg/s | ratio to unsigned | CPU ms / msg |\n| --- | ---: | ---: | ---: |")
    for name, rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
