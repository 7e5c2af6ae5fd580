"""A private Dovecot IMAP server for the tests, on 127.0.0.1, in a temporary folder.

:class:`DovecotServer` runs Debian's ``dovecot-imapd`` (``/usr/sbin/dovecot``)
in the foreground (``dovecot -F -c CONF``) with a configuration of its own:

* everything lives in a new temporary folder: the configuration, ``base_dir``
  (sockets, ``master.pid``), ``state_dir``, the log, the users' Maildirs;
* it listens on 127.0.0.1 only: IMAP (STARTTLS offered) and IMAPS on free
  ports (:attr:`DovecotServer.port`, :attr:`DovecotServer.imaps_port`);
* TLS with a certificate for ``localhost`` and ``127.0.0.1`` (or the names
  given) from a ``trustme`` CA (:attr:`DovecotServer.cafile`);
* users and passwords in a ``passwd-file`` (``{PLAIN}`` scheme), mail in
  ``maildir:~/Maildir`` with ``/`` as the hierarchy separator;
* plaintext authentication is allowed (the tests also try ``tls=none``),
  authentication failures are not delayed (``auth_failure_delay = 0``, and
  the anvil auth penalty socket is closed, as Dovecot's documentation says
  to disable it);
* when the tests run as root (CI), Dovecot's own processes run as the
  Debian package's ``dovecot`` and ``dovenull`` users and the mail
  processes as ``nobody``; otherwise every process runs as the current
  user (no chroot).

:func:`require_dovecot` skips the calling test when Dovecot is missing and
fails it under CI (env ``CI=true``), like the other harnesses in this folder.
Every wait is bounded, and a started server is stopped and its folder removed
at interpreter exit if nobody called :meth:`DovecotServer.stop`.
"""

from __future__ import annotations

import atexit
import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.support.peers import IN_CI, free_port
from tests.support.wait import wait_for

#: Where Debian's dovecot-core installs the server.
DOVECOT = "/usr/sbin/dovecot"

#: Longest wait for the server to listen or to stop, in seconds.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

#: The mail processes' user when running as root.
MAIL_USER = "nobody"

#: Dovecot's own users when running as root (created by Debian's dovecot-core).
INTERNAL_USER = "dovecot"
LOGIN_USER = "dovenull"


class DovecotUnavailable(RuntimeError):
    """Dovecot cannot run here: the program or its users are missing.

    The message says what is missing and which package provides it.
    """


class DovecotError(RuntimeError):
    """The server did not start or stop in time; the message includes its log."""


def _is_root() -> bool:
    """True when the tests run as root (then Dovecot's processes change user)."""
    return os.geteuid() == 0


def _check() -> None:
    """Check that Dovecot and, as root, its users exist.

    :raises DovecotUnavailable: something is missing.
    """
    if not os.access(DOVECOT, os.X_OK):
        raise DovecotUnavailable(f"{DOVECOT} not found (apt-get install dovecot-imapd)")
    if _is_root():
        for user in (INTERNAL_USER, LOGIN_USER, MAIL_USER):
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise DovecotUnavailable(
                    f"running as root but there is no {user!r} user for Dovecot "
                    "(apt-get install dovecot-core creates dovecot and dovenull)")


def require_dovecot() -> None:
    """Skip the calling test when Dovecot is missing; fail it under CI.

    :raises pytest.skip.Exception: something is missing and env ``CI`` is not ``true``.
    :raises pytest.fail.Exception: something is missing and env ``CI=true``.
    """
    import pytest

    try:
        _check()
    except DovecotUnavailable as exc:
        if IN_CI:
            pytest.fail(f"{exc}, but CI=true")
        pytest.skip(str(exc))


def _traversable_by_others(path: Path) -> bool:
    """True when every folder from ``/`` down to ``path`` has the others-execute bit."""
    current = path.resolve()
    for folder in [current, *current.parents]:
        try:
            if not folder.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _base_dir() -> str:
    """Where to make the temporary folder: the temp dir, or ``/tmp`` when
    Dovecot's users could not reach it (root with a private ``TMPDIR``) or
    the socket paths would be too long (``sun_path``)."""
    base = tempfile.gettempdir()
    if len(base) + 60 > 107 or (_is_root() and not _traversable_by_others(Path(base))):
        return "/tmp"
    return base


def _listening(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class DovecotServer:
    """A private Dovecot for the tests (see the module docstring).

    :param users: user name to password (the ``passwd-file``); default one
        user ``alice`` with password ``secret``.
    :param names: the names (host names, IP literals) of the server's
        certificate; default ``localhost`` and ``127.0.0.1``.

    Use::

        server = DovecotServer().start()
        imaplib.IMAP4("127.0.0.1", server.port)     # STARTTLS offered
        imaplib.IMAP4_SSL("127.0.0.1", server.imaps_port,
                          ssl_context=ssl.create_default_context(cafile=server.cafile))
        server.stop()                               # stopped, folder removed

    After :meth:`start`: :attr:`root`, :attr:`port`, :attr:`imaps_port`,
    :attr:`cafile` (the test CA, PEM), :attr:`logfile`.
    """

    def __init__(self, users: dict[str, str] | None = None,
                 names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
        self.users = dict(users or {"alice": "secret"})
        self.names = tuple(names)
        self.root: Path | None = None
        self.port = 0
        self.imaps_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths ----------------------------------------------------------------

    def _root(self) -> Path:
        """The temporary folder; :raises DovecotError: not started."""
        if self.root is None:
            raise DovecotError("the server is not started (call start())")
        return self.root

    @property
    def cafile(self) -> str:
        """The test CA's certificate (PEM): what a client passes as ``cafile=``."""
        return str(self._root() / "ca.pem")

    @property
    def logfile(self) -> Path:
        """Dovecot's log (every process logs here)."""
        return self._root() / "dovecot.log"

    @property
    def config(self) -> Path:
        """The configuration file passed with ``-c``."""
        return self._root() / "dovecot.conf"

    def log(self) -> str:
        """The log so far (str; empty when there is none)."""
        try:
            return self.logfile.read_text(errors="replace")
        except (OSError, DovecotError):
            return ""

    def maildir(self, user: str) -> Path:
        """The user's Maildir (``<root>/mail/<user>/Maildir``; made by Dovecot at first use)."""
        return self._root() / "mail" / user / "Maildir"

    # -- users ----------------------------------------------------------------

    def _write_passwd(self) -> None:
        """Write the passwd-file from :attr:`users` (read again by Dovecot on change)."""
        for name, password in self.users.items():
            if any(c in name + password for c in ":\n\r"):
                raise ValueError(f"user {name!r}: no ':' or line break in passwd-file entries")
        lines = "".join(f"{name}:{{PLAIN}}{password}\n" for name, password in self.users.items())
        path = self._root() / "passwd"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(lines)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def add_user(self, name: str, password: str) -> None:
        """Add (or change) a user while the server runs.

        :param name: the user name (no ``:``).
        :param password: the password (no ``:`` nor line break).
        """
        self.users[name] = password
        self._write_passwd()

    # -- life cycle -----------------------------------------------------------

    def _settings(self) -> str:
        """The configuration file's text."""
        root = self._root()
        if _is_root():
            owners = (f"default_internal_user = {INTERNAL_USER}\n"
                      f"default_internal_group = {INTERNAL_USER}\n"
                      f"default_login_user = {LOGIN_USER}\n")
            mail_uid, mail_gid = MAIL_USER, grp.getgrgid(pwd.getpwnam(MAIL_USER).pw_gid).gr_name
            chroot = ""
        else:
            me = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
            owners = (f"default_internal_user = {me}\ndefault_internal_group = {group}\n"
                      f"default_login_user = {me}\nfirst_valid_uid = {os.geteuid()}\n"
                      f"first_valid_gid = {os.getegid()}\n")
            mail_uid, mail_gid = str(os.geteuid()), str(os.getegid())
            chroot = "  chroot =\n"
        return f"""# tests/support/dovecot.py
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailout-test-{root.name}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
{owners}ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={root}/mail/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
{chroot}  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service anvil {{
{chroot}  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""

    def _certificates(self) -> None:
        """A trustme CA (``ca.pem``) and a certificate for :attr:`names`."""
        import trustme

        root = self._root()
        ca = trustme.CA(organization_name="twisted_mailout dovecot test CA")
        leaf = ca.issue_cert(*self.names)
        ca.cert_pem.write_to_path(str(root / "ca.pem"))
        (root / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (root / "key.pem").write_bytes(leaf.private_key_pem.bytes())
        os.chmod(root / "key.pem", 0o600)

    def start(self) -> DovecotServer:
        """Make the folder and configuration, start Dovecot, wait until both
        ports accept connections.

        :return: self, started.
        :raises DovecotUnavailable: Dovecot or its users are missing.
        :raises DovecotError: it did not listen within :data:`START_TIMEOUT`
            seconds or exited (log in the message); nothing is left running.
        """
        if self.root is not None:
            raise DovecotError("the server is already started")
        _check()
        self.root = Path(tempfile.mkdtemp(prefix="mailout-dovecot-", dir=_base_dir()))
        atexit.register(self.stop)
        try:
            os.chmod(self.root, 0o755)
            for sub in ("run", "state", "mail"):
                (self.root / sub).mkdir()
            if _is_root():
                owner = pwd.getpwnam(MAIL_USER)
                os.chown(self.root / "mail", owner.pw_uid, owner.pw_gid)
            self._certificates()
            self._write_passwd()
            self.port, self.imaps_port = free_port(), free_port()
            while self.imaps_port == self.port:
                self.imaps_port = free_port()
            self.config.write_text(self._settings())
            with open(self.root / "stdout.log", "wb") as out:
                self._proc = subprocess.Popen(
                    [DOVECOT, "-F", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                    start_new_session=True)
            wait_for(self._ready, START_TIMEOUT, what="Dovecot listening on its two ports",
                     detail=self._details)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        """True once both ports listen; :raises DovecotError: Dovecot exited."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise DovecotError(f"dovecot exited with status {self._proc.returncode}\n"
                               f"{self._details()}")
        return _listening(self.port) and _listening(self.imaps_port)

    def _details(self) -> str:
        """Dovecot's standard output and log, for failure messages."""
        try:
            out = (self._root() / "stdout.log").read_text(errors="replace")
        except (OSError, DovecotError):
            out = ""
        return f"--- output ---\n{out}\n--- log ---\n{self.log()}"

    @property
    def running(self) -> bool:
        """True while the master process started by :meth:`start` runs."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Stop Dovecot (SIGTERM to its master, SIGKILL to its process group
        after :data:`STOP_TIMEOUT` seconds) and remove the folder. Safe to
        call twice or when not started.
        """
        if self.root is None:
            return
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(STOP_TIMEOUT)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> DovecotServer:
        """Start the server (see :meth:`start`)."""
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        """Stop the server and remove its folder (see :meth:`stop`)."""
        self.stop()
