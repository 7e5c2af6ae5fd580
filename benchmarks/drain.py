"""Queue drain benchmark (kept for its old command line): the ``drain`` and
``smtplib`` cases of ``run.py``.

    python benchmarks/drain.py [--messages 2000] [--size 2048] [--runs 3]

is ``python benchmarks/run.py --only drain,smtplib`` with these options;
see run.py and docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    run = Path(__file__).resolve().parent / "run.py"
    os.execv(sys.executable, [sys.executable, str(run), "--only", "drain,smtplib",
                              *sys.argv[1:]])
