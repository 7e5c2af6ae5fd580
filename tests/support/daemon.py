"""Run the real daemon, `twistd -n mailout ...`, as a subprocess for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict:
    """The environment for subprocesses: the work tree first on the path, so
    twistd finds twisted/plugins/mailout_plugin.py of this checkout."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


class Daemon:
    """`twistd -n --pidfile= --logfile=LOG mailout --queue=Q ARGS` (twistd run
    by this interpreter).

    Test defaults keep it quick: poll 0.2 s, short timeouts, retry-base 60 s.
    """

    def __init__(self, queue: str | Path, *args: str, log: str | Path | None = None):
        self.queue = str(queue)
        self.log_path = Path(log) if log else Path(self.queue).with_suffix(".log")
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        defaults = {"--poll-interval": "0.2", "--command-timeout": "20", "--connect-timeout":
                    "5", "--dns-timeout": "5", "--retry-base": "60", "--retry-max": "600",
                    "--helo": "mailout.test", "--shutdown-timeout": "10"}
        given = {a.split("=", 1)[0] for a in self.args}
        extra = [f"{k}={v}" for k, v in defaults.items() if k not in given]
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", f"--logfile={self.log_path}",
                "mailout", f"--queue={self.queue}", *extra, *self.args]

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(self.command(), env=env(), cwd=str(ROOT),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self

    def signal(self, sig) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL if needed. Returns the exit code."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def queue_list(queue: str | Path, detail: bool = False) -> list[dict]:
    """The rows `mailout queue --queue Q list --json` prints (one
    `twisted_mailout.admin.views.row` per message: `queue_id`, `queue_name`,
    `recipients` with `state`, `attempts`, `next_attempt`, `last_reply`...),
    read from the folder in this process, without its lock, as the command
    reads a stopped daemon's folder (the listing is safe while a daemon runs,
    and needs neither its API nor a subprocess per poll). A message being
    delivered right now is listed as `active` or `deferred`, never
    in-flight `active`.

    @param detail: give `views.detail` objects instead (each recipient's
        `reply` as `{"code", "text", "local"}` and its `history`; headers
        not read).
    @raise AssertionError: the folder is not a queue folder.
    """
    from twisted_mailout.admin import views
    from twisted_mailout.queue.store import Queue, QueueError

    try:
        store = Queue(str(queue), create=False)
    except QueueError as e:
        raise AssertionError(f"mailout queue list: {e}") from None
    out = []
    for listed in store.iter_entries():
        name = views.queue_name(listed)
        out.append(views.detail(listed, name, None) if detail else views.row(listed, name))
    return out
