"""Synchronous helpers running loopback mail/DNS peers for the tests.

Everything here listens on loopback addresses only and every wait is bounded.

* :func:`free_port` -- a currently unused port number on a loopback address;
* :func:`zone` -- a zone description for the loopback DNS server;
* :class:`DnsServerProcess` -- ``python -m twisted_mailout.testing.loopback dns`` in a subprocess;
* :class:`AiosmtpdSink` -- an aiosmtpd SMTP receiver in its own thread;
* :class:`SmtpSink` -- Postfix's ``smtp-sink`` in a subprocess, dumping each message to a file.

Received messages are dicts with at least ``"mail_from"`` (str, ``""`` for the null
sender), ``"rcpt_tos"`` (list of str) and ``"data"`` (bytes, dot-unstuffed, CRLF
line endings).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from tests.support.wait import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Where Debian's postfix package installs smtp-sink.
SMTP_SINK = "/usr/sbin/smtp-sink"

#: True when running under CI (env ``CI=true``): missing tools must fail, not skip.
IN_CI = os.environ.get("CI", "").strip().lower() == "true"

_STOP_TIMEOUT = 10.0


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """Return a port number that is free right now on loopback address ``host``.

    :param host: loopback IP address literal (``"127.0.0.1"`` or ``"::1"``).
    :param kind: ``socket.SOCK_STREAM`` (TCP) or ``socket.SOCK_DGRAM`` (UDP).
    :return: the port number (int).  Another process may take it before the caller
        binds it, so callers should retry on bind errors.
    :raises OSError: if ``host`` cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _stop_process(proc: subprocess.Popen, timeout: float = _STOP_TIMEOUT) -> int | None:
    """SIGTERM ``proc``, then SIGKILL after ``timeout`` seconds; return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def zone(
    records: dict[str, Any], *, ttl: int = 300, authoritative_for: Iterable[str] = ("test",)
) -> dict[str, Any]:
    """A zone description for the loopback DNS server (in process or not).

    @param records: C{{name: {type: [values]}}}, for example
        C{{"example.test": {"MX": [[10, "mx.example.test"]]}}}; see
        L{twisted_mailout.testing.loopback} for the record types.
    @param ttl: the TTL of every answer, in seconds.
    @param authoritative_for: suffixes answered with NXDOMAIN for unlisted
        names (anything else is REFUSED).
    @return: the description dict (C{ttl}, C{records}, C{authoritative_for}).
    """
    return {"ttl": ttl, "records": records, "authoritative_for": list(authoritative_for)}


class DnsServerProcess:
    """``python -m twisted_mailout.testing.loopback dns`` running in a child process.

    :param zone: zone description dict (see :mod:`twisted_mailout.testing.loopback`).
    :param interface: loopback address to bind (``"127.0.0.1"`` or ``"::1"``).
    :param workdir: directory for the zone, port and log files (default: a new
        temporary directory, removed by :meth:`stop`).
    :param max_lifetime: the child stops by itself after this many seconds, a
        safety net should :meth:`stop` never be called.

    After :meth:`start`, ``port`` (int) is the UDP and TCP port number.
    """

    def __init__(
        self,
        zone: dict[str, Any],
        interface: str = "127.0.0.1",
        workdir: str | os.PathLike[str] | None = None,
        max_lifetime: float = 1800.0,
    ) -> None:
        self.zone = zone
        self.interface = interface
        self.max_lifetime = max_lifetime
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def log_path(self) -> Path:
        """Path of the child's combined stdout/stderr log."""
        assert self.workdir is not None
        return self.workdir / "dns.log"

    def log(self) -> str:
        """Return the child's output so far (str; empty if not started)."""
        try:
            return self.log_path.read_text(errors="replace")
        except (AssertionError, OSError):
            return ""

    def start(self, timeout: float = 10.0) -> int:
        """Start the child and wait until it has written its port file.

        :param timeout: maximum wait for the port file, in seconds.
        :return: the port number (int).
        :raises RuntimeError: the child exited early (its log is in the message).
        :raises TimeoutError: no port file within ``timeout`` (the child is stopped).
        """
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="loopback-dns-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        zone_path = self.workdir / "zone.json"
        port_path = self.workdir / "dns.port"
        zone_path.write_text(json.dumps(self.zone))
        port_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        cmd = [
            sys.executable,
            "-m",
            "twisted_mailout.testing.loopback",
            "dns",
            "--zone",
            str(zone_path),
            "--interface",
            self.interface,
            "--port",
            "0",
            "--port-file",
            str(port_path),
            "--max-lifetime",
            str(self.max_lifetime),
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )

        def ready() -> int | None:
            assert self.proc is not None
            if port_path.exists():
                text = port_path.read_text().strip()
                if text.isdigit():
                    return int(text)
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"loopback dns exited with {self.proc.returncode}:\n{self.log()}"
                )
            return None

        try:
            self.port = wait_for(ready, timeout, what="the loopback DNS server's port file")
        except BaseException:
            self.stop()
            raise
        return self.port

    def stop(self) -> int | None:
        """Stop the child (SIGTERM, SIGKILL after 10 s) and remove an own workdir.

        :return: the child's exit status, or None if it was never started.
        """
        if self.proc is not None:
            self.returncode = _stop_process(self.proc)
            self.proc = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return self.returncode


# --------------------------------------------------------------------------- aiosmtpd


def start_controller(
    make: Callable[[int], Any], host: str, port: int | None = None, attempts: int = 5
) -> tuple[Any, int]:
    """Start an aiosmtpd C{Controller} (its own thread and event loop) on a
    loopback port, retrying with fresh free ports when a bind race is lost.

    Shared by L{AiosmtpdSink} and L{tests.support.tls_peers.TlsSmtpServer}.

    @param make: C{make(port)} builds the (not started) controller for C{port}.
    @param host: the loopback address it listens on (for picking free ports).
    @param port: a fixed port number (not retried), or None for a free one.
    @param attempts: how many free ports to try when C{port} is None.
    @return: C{(controller, port)}, the controller started.
    @raise OSError: no port could be bound.
    @raise TimeoutError: aiosmtpd did not come up within the controller's ready timeout.
    """
    last_error: OSError | None = None
    for _ in range(max(1, attempts)):
        chosen = port or free_port(host)
        controller = make(chosen)
        try:
            controller.start()
        except OSError as exc:
            controller.loop.close()
            if port:
                raise
            last_error = exc
            continue
        return controller, chosen
    assert last_error is not None
    raise last_error


def stop_controller(controller: Any, timeout: float, name: str) -> None:
    """Stop an aiosmtpd C{Controller} from another thread, waiting at most
    C{timeout} seconds (C{Controller.stop} can block on a stuck session).

    @param controller: the started controller, or None (nothing to do).
    @param timeout: the longest wait, in seconds.
    @param name: what to call the server in the error.
    @raise TimeoutError: the controller's thread did not stop in time.
    """
    if controller is None:
        return
    stopper = threading.Thread(target=controller.stop, name="aiosmtpd-stop", daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        raise TimeoutError(f"{name} did not stop in {timeout} s")


def _make_aiosmtpd_classes():
    """Build the aiosmtpd subclasses lazily, so importing this module never needs aiosmtpd."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    class SinkSMTP(SMTP):
        def __init__(self, *args: Any, sink: AiosmtpdSink, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._sink = sink

        def connection_made(self, transport: Any) -> None:
            # Called once per connection (and again after STARTTLS, with the
            # same session task): count the session until its task is done.
            task_before = self._handler_coroutine
            super().connection_made(transport)
            task = self._handler_coroutine
            if task is not None and task is not task_before:
                self._sink._session_started(task)

        async def _handle_client(self) -> None:
            # Override of aiosmtpd's per-connection coroutine (private in 1.4) to
            # replace the 220 greeting.
            if self._sink.close_on_connect:
                self.transport.close()
                return
            if self._sink.greeting_reply:
                await self.push(self._sink.greeting_reply)
                self.transport.close()
                return
            await super()._handle_client()

    class SinkController(Controller):
        def __init__(self, handler: Any, *, sink: AiosmtpdSink, **kwargs: Any) -> None:
            super().__init__(handler, **kwargs)
            self._sink = sink

        def factory(self):
            return SinkSMTP(self.handler, sink=self._sink, **self.SMTP_kwargs)

    return SinkController


class _AiosmtpdHandler:
    def __init__(self, sink: AiosmtpdSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.sink.rcpt_reply(address) if self.sink.rcpt_reply else None
        if reply:
            with self.sink._lock:
                self.sink._refused.append({"rcpt": address, "reply": reply})
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        record = {
            # aiosmtpd keeps the null reverse-path as the literal "<>"
            "mail_from": "" if envelope.mail_from == "<>" else envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            # original_content: the bytes as received, dot-unstuffed, CRLF kept,
            # never decoded (envelope.content may be str when decode_data=True).
            "data": envelope.original_content,
            "mail_options": list(envelope.mail_options),
            "rcpt_options": list(envelope.rcpt_options),
            "helo": session.host_name,
            "peer": session.peer,
            "time": time.monotonic(),  # when the end of the data arrived
        }
        reply = self.sink.data_reply(record) if self.sink.data_reply else None
        if reply:
            return reply
        with self.sink._lock:
            self.sink._messages.append(record)
        return "250 2.0.0 Message accepted for delivery"


class AiosmtpdSink:
    """An aiosmtpd SMTP receiver running in its own thread on a loopback address.

    :param hostname: loopback address to listen on (``"127.0.0.1"`` or ``"::1"``).
    :param port: port number, or None to pick a free one (retried on bind races).
    :param rcpt_reply: optional ``rcpt_reply(address: str) -> None | str``; a string
        such as ``"550 5.1.1 No such user"`` is sent as the RCPT reply (refusing it).
    :param data_reply: optional ``data_reply(record: dict) -> None | str``; a string
        such as ``"451 4.3.0 Try later"`` is sent after DATA instead of accepting
        (the message is then not recorded).
    :param greeting_reply: optional reply line, e.g. ``"421 4.3.2 busy"``, sent
        instead of the 220 greeting, after which the connection is closed.
    :param close_on_connect: close every connection at once, without any greeting.
    :param server_hostname: name used in the greeting and EHLO reply.

    ``messages`` is a thread-safe snapshot list of received messages (dicts with
    ``mail_from``, ``rcpt_tos``, ``data`` and also ``mail_options``,
    ``rcpt_options``, ``helo``, ``peer``); ``refused`` lists refused RCPTs.
    ``rcpt_reply``/``data_reply``/``greeting_reply``/``close_on_connect`` may be
    changed while running.  Use as a context manager or call :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        port: int | None = None,
        *,
        rcpt_reply: Callable[[str], str | None] | None = None,
        data_reply: Callable[[dict[str, Any]], str | None] | None = None,
        greeting_reply: str | None = None,
        close_on_connect: bool = False,
        server_hostname: str = "aiosmtpd.sink.test",
    ) -> None:
        self.hostname = hostname
        self.port = port
        self._requested_port = port
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.greeting_reply = greeting_reply
        self.close_on_connect = close_on_connect
        self.server_hostname = server_hostname
        self._lock = threading.Lock()
        self._messages: list[dict[str, Any]] = []
        self._refused: list[dict[str, Any]] = []
        self._open_sessions = 0
        self._peak_sessions = 0
        self._controller: Any = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """A copy of the list of received messages (thread-safe)."""
        with self._lock:
            return list(self._messages)

    @property
    def open_sessions(self) -> int:
        """How many SMTP sessions are still being served (int).

        A session counts from the moment the server accepts its connection
        until aiosmtpd's task for it is finished: after the client closed or
        reset the connection, every command it had sent has then been handled
        or dropped, and nothing more from it can reach C{messages}.
        """
        with self._lock:
            return self._open_sessions

    @property
    def peak_sessions(self) -> int:
        """The most SMTP sessions served at once so far (int)."""
        with self._lock:
            return self._peak_sessions

    def _session_started(self, task: Any) -> None:
        """Count C{task} (aiosmtpd's asyncio task for one session) until it is done."""
        with self._lock:
            self._open_sessions += 1
            self._peak_sessions = max(self._peak_sessions, self._open_sessions)
        task.add_done_callback(self._session_ended)

    def _session_ended(self, task: Any) -> None:
        with self._lock:
            self._open_sessions -= 1

    def wait_idle(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until no session is being served; return C{messages}.

        The positive signal that a client which went away (closed, killed)
        has nothing left in the server's hands: every byte it had sent has
        been read and handled, or dropped with its session. A client that
        keeps a connection open keeps this waiting.

        @param timeout: the longest wait, in seconds.
        @return: the received messages at that moment (list of dicts).
        @raise TimeoutError: a session was still open after C{timeout} seconds.
        """
        wait_for(lambda: self.open_sessions == 0, timeout,
                 what=f"every session at the aiosmtpd sink on port {self.port} to end")
        return self.messages

    @property
    def refused(self) -> list[dict[str, Any]]:
        """A copy of the list of refused RCPTs, ``{"rcpt": str, "reply": str}`` dicts."""
        with self._lock:
            return list(self._refused)

    def clear(self) -> None:
        """Forget the received messages and refused recipients."""
        with self._lock:
            self._messages.clear()
            self._refused.clear()

    def start(self, attempts: int = 5) -> AiosmtpdSink:
        """Start listening; return self.

        :param attempts: bind attempts with fresh free ports when ``port`` was None.
        :raises OSError: the port could not be bound.
        :raises TimeoutError: aiosmtpd did not come up within its ready timeout (10 s).
        """
        controller_cls = _make_aiosmtpd_classes()

        def make(port: int) -> Any:
            return controller_cls(_AiosmtpdHandler(self), sink=self, hostname=self.hostname,
                                  port=port, ready_timeout=10.0,
                                  server_hostname=self.server_hostname)

        self._controller, self.port = start_controller(make, self.hostname, self._requested_port,
                                                       attempts)
        return self

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server thread, waiting at most ``timeout`` seconds.

        :raises TimeoutError: the aiosmtpd thread did not stop in time.
        """
        controller, self._controller = self._controller, None
        stop_controller(controller, timeout, f"aiosmtpd sink on port {self.port}")

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` messages arrived; return ``messages``.

        :raises TimeoutError: fewer than ``count`` messages after ``timeout`` seconds.
        """
        return wait_for(
            lambda: len(self.messages) >= count and self.messages,
            timeout,
            what=f"{count} messages at the aiosmtpd sink",
        )

    def __enter__(self) -> Self:
        return self.start() if self._controller is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- smtp-sink

_SINK_HEADERS = {
    b"X-Client-Addr": "client_addr",
    b"X-Client-Proto": "client_proto",
    b"X-Helo-Args": "helo",
    b"X-Mail-Args": "mail_args",
}


def _address_from_args(args: str) -> str:
    """Return the address of a MAIL/RCPT argument string such as ``<a@b> BODY=8BITMIME``."""
    args = args.strip()
    if args.startswith("<"):
        end = args.find(">")
        return args[1:end] if end != -1 else args[1:]
    return args.split(None, 1)[0] if args else ""


def parse_smtp_sink_dump(raw: bytes) -> dict[str, Any]:
    """Parse one smtp-sink ``-d`` dump file (smtp-sink run without ``-S``).

    Format (see smtp-sink(1)), every line LF-terminated (CR stripped): ``X-Client-Addr``,
    ``X-Client-Proto``, optional ``X-Helo-Args``, ``X-Mail-Args``, one ``X-Rcpt-Args``
    per RCPT, a three-line ``Received:`` header, the message lines (dot-unstuffed),
    then one empty line.

    :param raw: the file contents (bytes).
    :return: dict with ``mail_from`` (str), ``rcpt_tos`` (list of str), ``data``
        (bytes, LF turned back into CRLF), and ``client_addr``, ``client_proto``,
        ``helo`` (str or None), ``mail_args`` (str), ``rcpt_args`` (list of str),
        ``received`` (bytes, the smtp-sink Received header).
    :raises ValueError: the contents do not follow that format (e.g. incomplete).
    """
    if not raw.endswith(b"\n"):
        raise ValueError("smtp-sink dump does not end with a newline (incomplete?)")
    result: dict[str, Any] = {"helo": None, "rcpt_args": []}
    pos = 0
    while True:
        end = raw.find(b"\n", pos)
        if end == -1:
            raise ValueError("smtp-sink dump has no Received: header")
        line = raw[pos:end]
        name, sep, value = line.partition(b": ")
        if name == b"Received" and sep:
            received_start = pos
            pos = end + 1
            for _ in range(2):  # "\tby ...;" and "\t<date>"
                end = raw.find(b"\n", pos)
                if end == -1 or not raw.startswith(b"\t", pos):
                    raise ValueError("smtp-sink dump has a malformed Received: header")
                pos = end + 1
            result["received"] = raw[received_start:pos]
            break
        if not sep:
            raise ValueError(f"unexpected smtp-sink dump header line {line!r}")
        text = value.decode("utf-8", errors="surrogateescape")
        if name == b"X-Rcpt-Args":
            result["rcpt_args"].append(text)
        elif name in _SINK_HEADERS:
            result[_SINK_HEADERS[name]] = text
        else:
            raise ValueError(f"unexpected smtp-sink dump header line {line!r}")
        pos = end + 1
    if "mail_args" not in result:
        raise ValueError("smtp-sink dump has no X-Mail-Args header")
    body = raw[pos:]
    if not body.endswith(b"\n"):
        raise ValueError("smtp-sink dump lacks its final empty line")
    body = body[:-1]  # the empty line smtp-sink appends after the message
    result["data"] = body.replace(b"\n", b"\r\n")
    result["mail_from"] = _address_from_args(result["mail_args"])
    result["rcpt_tos"] = [_address_from_args(a) for a in result["rcpt_args"]]
    return result


def _listening_inodes(port: int) -> set[str]:
    """Return the socket inodes listening on TCP ``port`` (from Linux /proc/net/tcp{,6}).

    :raises OSError: /proc/net/tcp is not available (not Linux).
    """
    inodes: set[str] = set()
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            listening = len(fields) > 9 and fields[3] == "0A"  # TCP_LISTEN
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not found_table:
        raise OSError("no /proc/net/tcp")
    return inodes


def _socket_inodes(pid: int) -> set[str] | None:
    """Return the socket inodes process ``pid`` holds, or None if /proc/PID/fd is unreadable."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


class SmtpSink:
    """Postfix ``smtp-sink`` on a loopback address, dumping each message to a file.

    Runs ``smtp-sink [-u nobody] -d DUMPDIR/%Y%m%d%H/%M. [extra_args] HOST:PORT backlog``
    (``-u`` only when running as root, since smtp-sink refuses to run as root
    without it; the dump directory is then owned by that user).

    :param host: loopback address, ``"127.0.0.1"`` or ``"::1"``.
    :param port: port number, or None to pick a free one (retried on bind races).
    :param extra_args: more smtp-sink options, e.g. ``["-r", "RCPT"]`` to answer
        every RCPT with 450, ``["-Q", "CONNECT"]`` to answer the connection with 421,
        ``["-h", "sink.test"]`` for the greeting name (see ``man smtp-sink``).
    :param user: unprivileged user for ``-u`` when running as root.
    :param binary: path of the smtp-sink program.

    After :meth:`start`, ``port`` is the port number; :meth:`messages` reads the
    completed dump files back.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        extra_args: Iterable[str] = (),
        user: str = "nobody",
        binary: str = SMTP_SINK,
        backlog: int = 64,
    ) -> None:
        self.host = host
        self.port = port
        self._requested_port = port
        self.extra_args = list(extra_args)
        self.user = user
        self.binary = binary
        self.backlog = backlog
        self.workdir: Path | None = None
        self.dumpdir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    @staticmethod
    def available(binary: str = SMTP_SINK) -> bool:
        """Return whether the smtp-sink program exists and is executable."""
        return os.access(binary, os.X_OK)

    def log(self) -> str:
        """Return smtp-sink's stdout/stderr so far (str)."""
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "smtp-sink.log").read_text(errors="replace")
        except OSError:
            return ""

    def _prepare_dirs(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        self.workdir.chmod(0o755)  # the unprivileged smtp-sink must traverse it
        self.dumpdir = self.workdir / "dump"
        self.dumpdir.mkdir()
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dumpdir, entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = 10.0, attempts: int = 5) -> SmtpSink:
        """Start smtp-sink and wait until it listens; return self.

        :param timeout: maximum wait for each attempt to listen, in seconds.
        :param attempts: tries with fresh free ports when ``port`` was None.
        :raises FileNotFoundError: smtp-sink is not installed.
        :raises RuntimeError: smtp-sink exited (bind failure with a fixed port, bad option).
        :raises TimeoutError: smtp-sink did not listen within ``timeout``.
        """
        if not self.available(self.binary):
            raise FileNotFoundError(self.binary)
        self._prepare_dirs()
        assert self.workdir is not None and self.dumpdir is not None
        template = f"{self.dumpdir}/%Y%m%d%H/%M."
        last_error: Exception | None = None
        for _ in range(max(1, attempts)):
            port = self._requested_port or free_port(self.host)
            address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
            cmd = [self.binary]
            if os.geteuid() == 0:
                cmd += ["-u", self.user]
            cmd += ["-d", template, *self.extra_args, address, str(self.backlog)]
            with open(self.workdir / "smtp-sink.log", "ab") as log:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )

            def ready(proc: subprocess.Popen = proc, port: int = port) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"smtp-sink exited with {proc.returncode}: {self.log()}")
                try:
                    listening = _listening_inodes(port)
                    own = _socket_inodes(proc.pid)
                    return bool(listening & own if own is not None else listening)
                except OSError:  # no /proc/net: probe by connecting (one extra session)
                    try:
                        socket.create_connection((self.host, port), timeout=0.5).close()
                    except OSError:
                        return False
                    return True

            try:
                wait_for(ready, timeout, what=f"smtp-sink to listen on {address}")
            except RuntimeError as exc:
                last_error = exc
                if self._requested_port:
                    break
                continue
            except BaseException:
                _stop_process(proc)
                raise
            self.proc = proc
            self.port = port
            return self
        self._remove_dirs()
        assert last_error is not None
        raise last_error

    def _open_files(self) -> set[str] | None:
        """Paths smtp-sink holds open (capture files in progress), None if unknown."""
        if self.proc is None or self.proc.poll() is not None:
            return set()
        fd_dir = f"/proc/{self.proc.pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return None
        paths = set()
        for name in names:
            try:
                paths.add(os.readlink(os.path.join(fd_dir, name)))
            except OSError:
                continue
        return paths

    def dump_files(self) -> list[Path]:
        """Return the paths of completed dump files, oldest first.

        A file is complete when smtp-sink no longer holds it open (checked through
        /proc/PID/fd) or, if that cannot be checked, when it ends with an empty line.
        smtp-sink deletes the capture file of a transaction aborted during DATA.
        """
        if self.dumpdir is None:
            return []
        # List the files before asking which are open: a file created after
        # the /proc snapshot would otherwise look complete while being written
        # (smtp-sink never reopens a file it has closed).
        paths = list(self.dumpdir.rglob("*"))
        open_files = self._open_files()
        found = []
        for path in paths:
            try:
                if not path.is_file():
                    continue
                stat = path.stat()
            except OSError:
                continue
            if open_files is not None and str(path) in open_files:
                continue
            if open_files is None:
                with open(path, "rb") as handle:
                    if stat.st_size < 2:
                        continue
                    handle.seek(-2, os.SEEK_END)
                    if handle.read() != b"\n\n":
                        continue
            found.append((stat.st_mtime_ns, path.name, path))
        return [path for _, _, path in sorted(found)]

    def messages(self) -> list[dict[str, Any]]:
        """Parse the completed dump files; see :func:`parse_smtp_sink_dump`.

        :return: list of message dicts, oldest first, each with an extra ``path``.
        :raises ValueError: a completed dump file is malformed.
        """
        out = []
        for path in self.dump_files():
            record = parse_smtp_sink_dump(path.read_bytes())
            record["path"] = str(path)
            out.append(record)
        return out

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` messages were dumped; return :meth:`messages`.

        :raises TimeoutError: fewer than ``count`` messages after ``timeout`` seconds.
        """

        def enough() -> list[dict[str, Any]] | None:
            found = self.messages()
            return found if len(found) >= count else None

        return wait_for(enough, timeout, what=f"{count} messages at smtp-sink")

    def clear(self) -> None:
        """Delete the completed dump files."""
        for path in self.dump_files():
            path.unlink(missing_ok=True)

    def _remove_dirs(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = self.dumpdir = None

    def stop(self) -> int | None:
        """Stop smtp-sink (SIGTERM, SIGKILL after 10 s) and delete its dump files.

        :return: its exit status, or None if it was not running.
        """
        if self.proc is not None:
            self.returncode = _stop_process(self.proc)
            self.proc = None
        self._remove_dirs()
        return self.returncode

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@implementer(IOpenSSLContextFactory)
class PemContextFactory:
    """Twisted TLS context factory loading a key + certificate chain PEM file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def getContext(self):
        from OpenSSL import SSL

        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate_chain_file(self.path)
        context.use_privatekey_file(self.path)
        return context
