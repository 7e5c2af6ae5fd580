"""Queue scale benchmark (kept for its old command line): the ``scale`` case
of ``run.py``.

    python benchmarks/scale.py [--sizes 1000 100000] [--deliver N]

is ``python benchmarks/run.py --only scale --scale-sizes ... --scale-window ...``
(the daemon pinned to CPU 0, as in every run.py case but ``workers``): the
CPU ms per message at each size, their ratio (issue 14: flat, ≤ 1.1, and
≤ 0.5 ms at each size) and how long the case took; see run.py and
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--deliver", type=int, default=0, help="0: all")
    ap.add_argument("--size", type=int, default=2048)
    a = ap.parse_args()
    run = Path(__file__).resolve().parent / "run.py"
    os.execv(sys.executable, [sys.executable, str(run), "--only", "scale", "--runs", "1",
                              "--size", str(a.size), "--scale-window", str(a.deliver),
                              "--scale-sizes", *map(str, a.sizes)])
