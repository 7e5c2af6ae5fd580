"""BDAT (RFC 3030 CHUNKING) against DATA: the twisted_mailout queue drain to a
server that offers CHUNKING and to one that does not, side by side.

    python3 benchmarks/bdat.py [--messages 2000] [--size 2048] [--runs 3]
                               [--workdir /var/tmp]

smtp-sink offers no CHUNKING, so the server is a private Postfix smtpd (see
postfix_instance.py), twice: one instance as Debian ships it (CHUNKING
offered: our daemon sends BDAT) and one with ``smtpd_discard_ehlo_keywords =
chunking`` (our daemon sends DATA); everything else is the same. Both relay to
one smtp-sink, with their queue managers held, so that Postfix only receives
(smtpd and cleanup, fsynced) while our daemon drains. Each run drains the
same N queued messages to each instance in turn (the order alternates run by
run); the table gives medians, the daemon's CPU per message (all its
threads) and the BDAT/DATA ratios. The rate is bounded by Postfix's smtpd and
cleanup as much as by us: the CPU per message is the figure that tells.

Needs root (Postfix's master).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Sink, Workdir, message
from postfix_instance import PostfixInstance
from run import Ctx, drain_once, fill_queue, relay_args


class _Instance(PostfixInstance):
    def __init__(self, sink_port: int, chunking: bool, base: str | None) -> None:
        super().__init__(sink_port, base=base)
        self.chunking = chunking

    def _main_cf(self) -> str:
        extra = "local_header_rewrite_clients =\n"
        if not self.chunking:
            extra += "smtpd_discard_ehlo_keywords = chunking\n"
        return super()._main_cf() + extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=2048, help="message size, bytes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    rows: dict[str, list[dict]] = {"BDAT": [], "DATA": []}
    with Sink() as sink:
        ctx = Ctx(n=a.messages, size=a.size, sink=sink, base=a.workdir, timeout=a.timeout,
                  scale_sizes=[], scale_window=0, big_n=0, huge_mb=0)
        instances = {"BDAT": _Instance(sink.port, True, "/var/tmp"),
                     "DATA": _Instance(sink.port, False, "/var/tmp")}
        try:
            for pf in instances.values():
                pf.start()
                pf.hold_queue_manager()
            for run in range(a.runs):
                order = ["BDAT", "DATA"] if run % 2 == 0 else ["DATA", "BDAT"]
                for name in order:
                    pf = instances[name]
                    before = pf.queued()
                    with Workdir(a.workdir, f"bdat-bench-{name}-") as tmp:
                        fill_queue(tmp / "q", [message(i, a.size) for i in range(a.messages)])
                        r = drain_once(ctx, tmp, relay_args(pf.port), a.messages)
                    pf.wait_queued(before + a.messages, 60)
                    vals = {"rate": a.messages / r["seconds"],
                            "cpu_ms": r["cpu"] / a.messages * 1000}
                    rows[name].append(vals)
                    print(f"run {run + 1}: {name}: {vals['rate']:.0f} msg/s, "
                          f"{vals['cpu_ms']:.3f} ms CPU/msg", file=sys.stderr, flush=True)
            log = instances["BDAT"].log()
            assert "bdat=" in log, "the CHUNKING instance never saw BDAT"
            assert "bdat=" not in instances["DATA"].log(), "BDAT to the DATA instance"
        finally:
            for pf in instances.values():
                pf.stop()
    med = {k: {f: statistics.median(v[f] for v in vals) for f in ("rate", "cpu_ms")}
           for k, vals in rows.items()}
    print(f"\n{a.messages:,} messages of {a.size:,} bytes, {a.runs} runs, medians\n")
    print("| path | msg/s | runs: min–max | CPU ms/msg (daemon) |")
    print("| --- | ---: | --- | ---: |")
    for k in ("DATA", "BDAT"):
        rates = [v["rate"] for v in rows[k]]
        print(f"| {k} | {med[k]['rate']:,.0f} | {min(rates):,.0f}–{max(rates):,.0f} | "
              f"{med[k]['cpu_ms']:.3f} |")
    print(f"\nBDAT/DATA: rate ×{med['BDAT']['rate'] / med['DATA']['rate']:.2f}, "
          f"CPU per message ×{med['BDAT']['cpu_ms'] / med['DATA']['cpu_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
