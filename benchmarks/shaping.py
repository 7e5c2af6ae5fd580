"""What traffic shaping costs the drain: ``python benchmarks/shaping.py [--messages N] [--runs K]``.

Drains N queued 2 KB messages to Postfix's smtp-sink (one relay, 10
connections), K runs of each case, alternating:

  none      no ``--shaping``;
  presets   ``--shaping`` with the shipped presets and no limit that applies
            (every message still goes through classification and admission);
  rate      ``[default] max_message_rate = "RATE/s"`` (``--rate``, default
            500): the drain should come out at that rate, not above it.

Prints the median rates, their ratio to the unshaped drain, and the daemon's
CPU per message. Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks.common import Sink, Workdir  # noqa: E402
from benchmarks.dkim import drain  # noqa: E402


def main() -> int:
    """Run the cases; print a table. @return: the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rate", type=int, default=500, help="messages a second in case 'rate'")
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"none": [], "presets": [], "rate": []}
    sink = Sink().start()
    try:
        with Workdir(None, "mailout-shaping-files-") as files:
            presets = files / "presets.toml"
            presets.write_text("# the shipped presets only\n")
            rate = files / "rate.toml"
            rate.write_text(f'[default]\nmax_message_rate = "{args.rate}/s"\n')
            cases = {"none": [], "presets": [f"--shaping={presets}"],
                     "rate": [f"--shaping={rate}"]}
            for run in range(args.runs):
                for name, extra in cases.items():
                    with Workdir(None, "mailout-shaping-") as tmp:
                        results[name].append(drain(tmp, sink, args.messages, extra))
                    r, c = results[name][-1]
                    print(f"run {run + 1} {name}: {r:.0f} msg/s, {c:.2f} ms CPU/msg", flush=True)
    finally:
        sink.stop()
    base = statistics.median(r for r, _ in results["none"])
    print(f"\n{args.messages} messages, {args.runs} runs, medians")
    print(f"{'case':10} {'msg/s':>8} {'ratio':>6} {'CPU ms/msg':>11}")
    for name, rs in results.items():
        rate_ = statistics.median(r for r, _ in rs)
        cpu = statistics.median(c for _, c in rs)
        print(f"{name:10} {rate_:8.0f} {rate_ / base:6.2f} {cpu:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
