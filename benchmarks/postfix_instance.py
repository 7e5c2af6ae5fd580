"""A private Postfix instance for the benchmarks: relays everything to a sink.

    with PostfixInstance(sink_port, concurrency=10, prefix=pin_prefix("0")) as pf:
        pf.hold("pickup")                 # inject only: mail waits in maildrop/
        ... sendmail(1) with pf.sendmail_command() ...
        pf.release()                      # the drain starts (SIGHUP to the master)
        pf.wait_queued(0, timeout)

    with PostfixInstance(sink_port) as pf:
        pf.hold_queue_manager()           # inject only: mail waits in incoming/
        ... inject over SMTP to 127.0.0.1:pf.port ...
        pf.release_queue_manager()        # the drain starts
        pf.wait_queued(0, timeout)

Everything lives under one temporary folder: ``etc/`` (``main.cf``,
``master.cf``: the instance's config_directory), ``spool/`` (its
queue_directory), ``data/`` and ``maillog``. It listens on 127.0.0.1 only
(``inet_interfaces``), its smtpd on a free loopback port, and sends every
message to ``relayhost = [127.0.0.1]:SINKPORT``. No service is chrooted (the
queue folder is a temporary one), DNS is never used, and it logs to its own
file through ``postlogd`` (``maillog_file``), one line per delivery as a
daemon normally does. The system's Postfix (``/etc/postfix``) is neither
read nor started: the instance is started with ``postfix -c ETC start`` and
stopped with ``postfix -c ETC stop`` (then its master is killed if still
there) when the ``with`` block ends, on errors too.

"Inject, then drain": :meth:`hold` rewrites ``master.cf`` without the named
services and reloads (``postfix reload``), and waits until their processes
are gone; :meth:`release` puts every service back and sends SIGHUP to the
master itself (what ``postfix reload`` does, without the ``postsuper`` runs
its script adds, so the drain's clock starts at the signal). Two holds:

- ``hold("pickup")``: ``sendmail(1)`` (:meth:`sendmail_command`) hands mail
  to ``postdrop``, which writes it into ``maildrop/`` (the mail is
  accepted when sendmail returns); nothing picks it up. On release pickup
  starts at once, and the drain runs through pickup, cleanup (which writes
  and fsyncs the queue file), qmgr and smtp: the whole of Postfix's path
  from the program that handed the mail over.
- ``hold_queue_manager()`` (``hold("qmgr")``): ``cleanup`` files mail that
  smtpd received (fsynced, Postfix's default) into ``incoming/`` but nothing
  moves it on; on release the queue manager scans the full incoming queue.
  That drain starts after cleanup's work is done.

Pinning: with ``prefix`` (e.g. ``["taskset", "-c", "0"]``) every ``postfix``
command runs under it, so the master and every service it starts inherit
the CPU affinity.

CPU: :meth:`cpu_seconds` sums utime+stime+cutime+cstime over the master and
every live process descending from it (from ``/proc``). The master reaps every
service process it starts, so the CPU of processes that have exited is in the
master's cutime/cstime; live ones are counted by their own entries.
:meth:`pss_bytes` is the sum of the proportional set size of those live
processes.
Must run as root (Postfix's master does; the services drop to ``postfix``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import tree_cpu, tree_pids, tree_pss

POSTFIX = "/usr/sbin/postfix"
SENDMAIL = "/usr/sbin/sendmail"

# service type private unpriv chroot wakeup maxproc command
_SERVICES = [
    ("{listen}", "inet", "n", "-", "n", "-", "-", "smtpd"),
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_name(pid: int) -> str | None:
    """The command name of a live process (``/proc/PID/stat``), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.find("(") + 1: raw.rfind(")")]


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


class PostfixInstance:
    """A private Postfix relaying to ``[127.0.0.1]:sink_port``; see the module doc.

    :param sink_port: the sink's port on 127.0.0.1.
    :param concurrency: ``default_destination_concurrency_limit`` (Postfix's
        default, 20, unless given).
    :param base: where to make the instance's folder; every folder above it
        must be searchable by the ``postfix`` user.
    :param prefix: a command prefix for every ``postfix`` command (CPU
        pinning: ``["taskset", "-c", "0"]``); the services inherit it.
    """

    def __init__(self, sink_port: int, concurrency: int | None = None,
                 base: str | None = None, prefix: list[str] | None = None) -> None:
        self.sink_port = sink_port
        self.concurrency = concurrency
        self.prefix = list(prefix or [])
        self.held: set[str] = set()
        # base: a folder the postfix user can traverse (e.g. /tmp, /var/tmp)
        self.root = Path(tempfile.mkdtemp(prefix="bench-postfix-", dir=base))
        self.etc = self.root / "etc"
        self.spool = self.root / "spool"
        self.port = 0
        self.master_pid: int | None = None

    # -- set-up -------------------------------------------------------------

    def _main_cf(self) -> str:
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.spool),
            "data_directory": str(self.root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$mydomain",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_peername_lookup": "no",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            # Without a queue manager (inject phase) no flow-control tokens
            # come back, and each message would wait in_flow_delay (1 s).
            "in_flow_delay": "0",
            "maillog_file": str(self.root / "maillog"),
            "maillog_file_prefixes": str(self.root),
            "shlib_directory": "/usr/lib/postfix",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "command_directory": "/usr/sbin",
            "meta_directory": "/etc/postfix",
        }
        if self.concurrency:
            lines["default_destination_concurrency_limit"] = str(self.concurrency)
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def _master_cf(self, without: frozenset[str] | set[str] = frozenset()) -> str:
        out = []
        for row in _SERVICES:
            if row[0] in without:
                continue
            name = row[0].format(listen=f"127.0.0.1:{self.port}")
            out.append("  ".join((name, *row[1:])) + "\n")
        return "".join(out)

    def _postfix(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self.prefix, POSTFIX, "-c", str(self.etc), *args], check=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, capture_output=True)

    def _write_master(self) -> None:
        path = self.etc / "master.cf"
        tmp = self.etc / "master.cf.tmp"
        tmp.write_text(self._master_cf(self.held))
        os.replace(tmp, path)

    def sendmail_command(self) -> list[str]:
        """The ``sendmail(1)`` command line of this instance, without the
        recipients (``-C`` names its configuration, so postdrop writes into
        its maildrop; ``-i``: a lone dot does not end the message)."""
        return [SENDMAIL, "-C", str(self.etc), "-i"]

    def start(self, timeout: float = 30) -> PostfixInstance:
        if os.geteuid() != 0:
            raise RuntimeError("the private Postfix instance needs root")
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        shutil.chown(self.root / "data", "postfix", "postfix")
        self.spool.mkdir(exist_ok=True)
        self.root.chmod(0o755)
        self.port = _free_port()
        (self.etc / "main.cf").write_text(self._main_cf())
        self._write_master()
        try:
            self._postfix("start", timeout=timeout)
        except subprocess.CalledProcessError as e:
            self.stop()
            raise RuntimeError(f"postfix start failed: {e.stderr.decode(errors='replace')}"
                               f"\n{self.log()[-2000:]}") from None
        pidfile = self.spool / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.master_pid = int(pidfile.read_text().split()[0])
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        self.stop()
        raise TimeoutError("private postfix did not start listening")

    # -- holding services ---------------------------------------------------

    def hold(self, *services: str, timeout: float = 10) -> None:
        """Run without ``services`` (master.cf rewritten, ``postfix
        reload``), and wait until their processes have exited.

        :raises TimeoutError: one still runs after ``timeout`` seconds.
        """
        self.held |= set(services)
        self._write_master()
        self._postfix("reload")
        deadline = time.monotonic() + timeout
        while any(cmd in services for _, cmd in self._processes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"postfix: {services} still running after reload")
            time.sleep(0.05)

    def release(self) -> None:
        """Put every held service back: master.cf rewritten, then SIGHUP to
        the master (its reload starts the services that were missing; a
        wakeup service such as pickup is triggered at once)."""
        self.held.clear()
        self._write_master()
        assert self.master_pid is not None
        os.kill(self.master_pid, signal.SIGHUP)

    def hold_queue_manager(self) -> None:
        """No qmgr: injected mail stays in the incoming queue."""
        self.hold("qmgr")

    def release_queue_manager(self) -> None:
        """Put qmgr back (it scans incoming/ at start)."""
        self.release()

    # -- queue ----------------------------------------------------------------

    def queued(self) -> int:
        """Files in the incoming, active, deferred, maildrop and hold queues."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _dirpath, _dirs, files in os.walk(self.spool / sub):
                n += len(files)
        return n

    def wait_queued(self, count: int, timeout: float, interval: float = 0.02,
                    on_poll=None) -> None:
        """Wait until exactly ``count`` files are queued (``0``: drained).

        :raises TimeoutError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while self.queued() != count:
            if on_poll is not None:
                on_poll()
            if time.monotonic() > deadline:
                raise TimeoutError(f"postfix: {self.queued()} queued, not {count}, "
                                   f"after {timeout}s\n{self.log()[-2000:]}")
            time.sleep(interval)

    def deferred(self) -> int:
        return sum(len(f) for _, _, f in os.walk(self.spool / "deferred"))

    # -- processes --------------------------------------------------------------

    def _processes(self) -> list[tuple[int, str]]:
        """(pid, command name) of the master and its live descendants."""
        if self.master_pid is None:
            return []
        out = []
        for pid in tree_pids(self.master_pid):
            f = _stat_name(pid)
            if f is not None:
                out.append((pid, f))
        return out

    def cpu_seconds(self) -> float:
        """CPU seconds of the master and its descendants, those that exited
        included (see :func:`common.tree_cpu`)."""
        return 0.0 if self.master_pid is None else tree_cpu(self.master_pid)

    def pss_bytes(self) -> int:
        """Proportional set size summed over the live processes (shared
        pages split between the processes sharing them, so the sum is the
        instance's memory, not N times its libraries)."""
        return 0 if self.master_pid is None else tree_pss(self.master_pid)

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    # -- stop -----------------------------------------------------------------

    def stop(self) -> None:
        if (self.spool / "pid" / "master.pid").exists():
            try:
                self._postfix("stop", timeout=30)
            except (subprocess.SubprocessError, OSError):
                pass
        if self.master_pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _stat(self.master_pid) is not None:
                time.sleep(0.05)
            if _stat(self.master_pid) is not None:
                for pid, _ in self._processes():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            self.master_pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
