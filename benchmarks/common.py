"""Shared pieces of the benchmarks: test messages, the sink, the daemon, /proc.

Every process started here is stopped by whoever started it, on errors too
(``with`` blocks and ``try/finally``), and every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "bench@mailout.test"
RECIPIENT = "sink@dest.test"


def env() -> dict:
    """Environment for child processes: this checkout first on the path, so
    twistd finds twisted/plugins/mailout_plugin.py of the work tree."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message(i: int, size: int, domain: str = "dest.test") -> bytes:
    """A message of about ``size`` bytes (headers included), CRLF line ends,
    with its own Message-ID and Date (so enqueue adds nothing)."""
    head = (f"Message-ID: <bench{i}@mailout.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"From: {SENDER}\r\nTo: sink@{domain}\r\nSubject: {i}\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog. 0123456789\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)] + b"\r\n"
    return head + body


def pin_prefix(cpus: str | None) -> list[str]:
    """The command prefix that pins a sender to ``cpus`` (a taskset(1) CPU
    list such as ``"0"``), or ``[]`` when ``cpus`` is None or empty: taskset
    execs the command, so the pid is the command's and every process or
    thread it starts inherits the affinity."""
    if not cpus:
        return []
    if shutil.which("taskset") is None:
        raise RuntimeError("taskset(1) not found (package util-linux); run with --no-pin")
    return ["taskset", "-c", cpus]


def _children() -> dict[int, list[int]]:
    """{ppid: [pid, ...]} of every live process, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pids(root: int) -> list[int]:
    """``root`` and every live process descending from it (from /proc)."""
    kids = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of a process tree: utime + stime + cutime + cstime of
    ``root`` and of every live descendant. A child that exited and was reaped
    has its CPU in its parent's cutime/cstime, so workers that come and go
    stay counted; a process that ends between two readings moves its CPU
    from its own entry to its parent's, and the sum does not change."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / ticks


def tree_pss(root: int) -> int:
    """Proportional set size (bytes) summed over a process tree: shared pages
    split between the processes sharing them, so N workers do not count the
    interpreter N times."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def proc_stats(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, resident bytes, peak resident bytes) of a live process,
    from /proc (user + system time of all its threads; VmRSS; VmHWM)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cpu, rss, peak


def stop_process(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM, wait at most ``timeout`` s, then SIGKILL (bounded)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Sink:
    """Postfix's smtp-sink on 127.0.0.1, accepting everything, keeping
    nothing (no ``-d`` dump), answering PIPELINING and 8BITMIME."""

    def __init__(self, backlog: int = 256):
        self.backlog = backlog
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Sink:
        for _ in range(5):
            self.port = free_port()
            cmd = [SMTP_SINK]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]
            cmd += [f"127.0.0.1:{self.port}", str(self.backlog)]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), 1).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            stop_process(self.proc)
        raise RuntimeError("smtp-sink did not start")

    def cpu(self) -> float:
        assert self.proc is not None
        return proc_stats(self.proc.pid)[0]

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LogCounter:
    """Counts ``status=sent`` (and failures) in a growing log file, reading
    only what was appended since the last call."""

    SENT = b"status=sent"
    BAD = (b"status=deferred", b"status=bounced", b"status=expired")

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.tail = b""
        self.sent = 0
        self.bad = 0
        self.text = b""  # the first 64 KB, for start-up markers

    def update(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return self.sent
        if not chunk:
            return self.sent
        self.pos += len(chunk)
        if len(self.text) < 65536:
            self.text += chunk[: 65536 - len(self.text)]
        data = self.tail + chunk
        self.sent += data.count(self.SENT)
        self.bad += sum(data.count(b) for b in self.BAD)
        self.tail = data[-(len(self.BAD[0]) - 1):]
        return self.sent


class Daemon:
    """``twistd -n mailout --queue=Q ...`` run by this interpreter, with the
    benchmark's options; stopped (SIGTERM, then SIGKILL) by :meth:`stop`."""

    def __init__(self, queue: Path, *args: str, log: Path, prefix: list[str] | None = None):
        self.queue = queue
        self.prefix = list(prefix or [])  # e.g. pin_prefix("0")
        self.log_path = log
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.counter = LogCounter(log)
        self.twistd_args: list[str] = []  # twistd's own options, e.g. --profile

    def start(self) -> Daemon:
        # The log goes to stdout, into our file: twistd's own log file would
        # rotate at 1 MB under the reader's feet.
        cmd = [*self.prefix, sys.executable, "-c",
               "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
               "--logfile=-", *self.twistd_args, "mailout", f"--queue={self.queue}",
               "--helo=bench.mailout.test", "--shutdown-timeout=5", *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env(), cwd=str(ROOT), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited; see {self.log_path}:\n{self.tail_log()}")

    def tail_log(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0,
                   marker: bytes = b"mailout starting") -> tuple[float, float]:
        """Wait until the service starts (its "mailout starting" line: the
        interpreter, Twisted and the plugin are loaded; recovery and pickup
        come next). @return: (perf_counter, CPU seconds of the daemon's
        process tree, see :func:`tree_cpu`) then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.counter.update()
            if marker in self.counter.text:
                return time.perf_counter(), tree_cpu(self.pid)
            self.alive()
            time.sleep(0.005)
        raise TimeoutError(f"daemon did not start:\n{self.tail_log()}")

    def wait_sent(self, n: int, timeout: float, interval: float = 0.01,
                  on_poll=None) -> float:
        """Wait until ``n`` recipients are logged ``status=sent``; fail fast
        on any deferral or bounce. @return: perf_counter then."""
        deadline = time.monotonic() + timeout
        while True:
            if self.counter.update() >= n:
                return time.perf_counter()
            if self.counter.bad:
                raise RuntimeError(f"delivery failed in the benchmark:\n{self.tail_log()}")
            if on_poll is not None:
                on_poll()
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.counter.sent} of {n} sent after {timeout}s")
            self.alive()
            time.sleep(interval)

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.proc = None

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _has_file(folder: str) -> bool:
    """True at the first regular file anywhere under ``folder`` (stops there:
    a folder of 100,000 files costs one entry, not a full listing)."""
    try:
        it = os.scandir(folder)
    except FileNotFoundError:
        return False
    with it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                if _has_file(e.path):
                    return True
            elif e.is_file(follow_symlinks=False):
                return True
    return False


#: Subfolders of a queue folder that hold messages or their state (searched
#: recursively). The workers of issue 14 share these (a message's worker is
#: a function of its queue id, queue/shard.py); ``workers/`` holds their
#: locks, sockets and shared limits, not messages.
MESSAGE_FOLDERS = ("new", "cur", "messages", "state")


def queue_empty(q: Path) -> bool:
    """No message left in the queue folder: no regular file anywhere under
    ``new/``, ``cur/``, ``messages/`` or ``state/``. ``tmp/``, ``corrupt/``,
    ``workers/``, caches and files at the top (the lock, control.json,
    suspensions.json) are not messages."""
    return not any(_has_file(str(q / sub)) for sub in MESSAGE_FOLDERS)


def wait_queue_empty(q: Path, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while not queue_empty(q):
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue {q} not empty after {timeout}s")
        time.sleep(0.005)
    return time.perf_counter()


def run_client(name: str, *args: str, timeout: float = 600.0,
               prefix: list[str] | None = None) -> dict:
    """Run ``benchmarks/clients.py NAME ARGS`` in a child process (after
    ``prefix``, e.g. :func:`pin_prefix`) and return the JSON it prints (its
    own timing of the work, after imports)."""
    cmd = [*(prefix or []), sys.executable, str(BENCH / "clients.py"), name, *args]
    proc = subprocess.Popen(cmd, env=env(), cwd=str(ROOT), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"client {name} failed ({proc.returncode}):\n"
                           f"{err.decode(errors='replace')[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


class Workdir:
    """A temporary folder under ``base``, removed at the end."""

    def __init__(self, base: str | None, prefix: str):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
