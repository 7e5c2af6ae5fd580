"""A private PostgreSQL cluster for the tests, on a Unix socket in a temporary folder.

:class:`PostgresCluster` runs ``initdb`` and ``pg_ctl`` from Debian's ``postgresql``
package (or any PostgreSQL installation it can find, see :func:`find_bindir`):

* the cluster lives in a new temporary folder (data directory, Unix socket, log);
* it listens on **no** TCP address (``listen_addresses = ''``), only on the
  socket in that folder, with ``trust`` authentication for the superuser
  ``postgres``;
* when the tests run as root (CI), ``initdb`` and ``pg_ctl`` run as the
  ``postgres`` OS user (``runuser``, else ``su``), because PostgreSQL refuses
  to run as root; otherwise they run as the current user;
* every wait is bounded, and a started cluster is stopped and its folder
  removed at interpreter exit if nobody called :meth:`PostgresCluster.stop`.

Connections are made with libpq URIs such as
``postgresql:///mailout?host=/tmp/mailout-pg-x1y2&port=5432&user=postgres``,
which ``psycopg.connect(uri)`` accepts.  The URI names the port even though
nothing listens on TCP: the port is part of the socket's file name
(``.s.PGSQL.5432``), and naming it keeps a ``PGPORT`` in the environment from
sending the client to another socket.

:func:`require_postgres` skips the calling test when PostgreSQL or psycopg is
missing, and fails it instead under CI (env ``CI=true``), like the other
harnesses in this folder.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support.peers import IN_CI

#: The OS user that owns the cluster when the tests run as root.
PG_OS_USER = "postgres"

#: The database superuser created by initdb (``initdb -U``), whatever the OS user.
SUPERUSER = "postgres"

#: The port number: only the name of the socket file, since nothing listens on TCP.
PORT = 5432

#: The database created at start and named by :attr:`PostgresCluster.uri`.
DEFAULT_DATABASE = "mailout"

#: Longest wait for initdb, in seconds.
INITDB_TIMEOUT = 60.0

#: Longest wait for the server to start or stop (``pg_ctl -t``), in seconds.
PG_CTL_TIMEOUT = 30

#: Settings appended to postgresql.conf (the socket directory is added per cluster).
#: fsync, synchronous_commit and full_page_writes keep their durable defaults:
#: the crash tests of the store rely on them.
SETTINGS: dict[str, str] = {
    "listen_addresses": "''",
    "max_connections": "200",
    "unix_socket_permissions": "0777",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "log_line_prefix": "'%m [%p] %q%a '",
}

#: Longest Unix socket path (sun_path is 108 bytes on Linux, with its NUL).
_MAX_SOCKET_PATH = 107

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here: binaries, the ``postgres`` OS user or psycopg missing.

    The message says what is missing and which package provides it.
    """


class PostgresHarnessError(RuntimeError):
    """initdb, pg_ctl or a statement failed; the message includes the output or the log."""


def _executable(path: Path) -> bool:
    """True when ``path`` is a file the current user may execute."""
    return path.is_file() and os.access(path, os.X_OK)


def _has_server(bindir: Path) -> bool:
    """True when ``bindir`` holds both ``initdb`` and ``pg_ctl``."""
    return _executable(bindir / "initdb") and _executable(bindir / "pg_ctl")


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key of ``/usr/lib/postgresql/<version>/bin``: the version as ints (16 > 9.6)."""
    version = Path(path).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_bindir() -> Path:
    """Find the folder holding PostgreSQL's server programs (``initdb``, ``pg_ctl``).

    Tried in order: ``pg_config --bindir`` (Debian's wrapper picks the newest
    installed server's), then ``/usr/lib/postgresql/*/bin`` (highest version
    first), then the folders of ``initdb`` and ``pg_ctl`` on ``PATH``.  A
    candidate counts only when it holds both programs (libpq-dev's pg_config
    names a folder without a server).

    :return: the folder (absolute :class:`~pathlib.Path`).
    :raises PostgresUnavailable: no candidate holds both programs.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates.extend(Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                              key=_version_key, reverse=True))
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if _has_server(candidate):
            return candidate.resolve()
    raise PostgresUnavailable(
        "PostgreSQL server programs (initdb, pg_ctl) not found via pg_config --bindir, "
        "/usr/lib/postgresql/*/bin or PATH (apt-get install postgresql)")


def _run_as_postgres() -> bool:
    """True when the programs must run as the ``postgres`` OS user (we are root)."""
    return os.geteuid() == 0


def _check_os_user() -> None:
    """Check that the cluster's owner exists.

    :raises PostgresUnavailable: running as root but there is no ``postgres`` OS user.
    """
    if not _run_as_postgres():
        return
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root but there is no {PG_OS_USER!r} OS user to run PostgreSQL "
            "(apt-get install postgresql creates it)")


def _command(argv: list[str]) -> list[str]:
    """``argv`` wrapped so that it runs as the cluster's owner.

    Not root: ``argv`` itself.  Root: ``runuser -u postgres -- argv``, or
    ``su postgres -s /bin/sh -c 'argv'`` where runuser is missing.

    :param argv: the program (absolute path) and its arguments.
    :return: the command to pass to :func:`subprocess.run`.
    """
    if not _run_as_postgres():
        return argv
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if runuser is not None:
        return [runuser, "-u", PG_OS_USER, "--", *argv]
    return ["su", PG_OS_USER, "-s", "/bin/sh", "-c", shlex.join(argv)]


def _traversable_by_others(path: Path) -> bool:
    """True when every folder from ``/`` down to ``path`` has the others-execute bit."""
    current = path.resolve()
    for folder in [current, *current.parents]:
        try:
            mode = folder.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def _base_dir() -> str:
    """The folder in which to create the cluster's temporary folder.

    :func:`tempfile.gettempdir` unless the ``postgres`` user could not reach
    it (running as root with a private ``TMPDIR``) or the socket's path would
    be too long for ``sun_path``; then ``/tmp``.
    """
    base = tempfile.gettempdir()
    # mkdtemp adds about 20 characters, the socket name 13 more.
    too_long = len(base) + 40 > _MAX_SOCKET_PATH
    if too_long or (_run_as_postgres() and not _traversable_by_others(Path(base))):
        return "/tmp"
    return base


def require_postgres() -> Path:
    """Skip the calling test when PostgreSQL or psycopg is missing; fail it under CI.

    :return: the folder of the server programs (see :func:`find_bindir`).
    :raises pytest.skip.Exception: something is missing and env ``CI`` is not ``true``.
    :raises pytest.fail.Exception: something is missing and env ``CI=true``.
    """
    import pytest

    try:
        bindir = find_bindir()
        _check_os_user()
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise PostgresUnavailable("psycopg 3 is not installed (pip install -e '.[test]')")
    except PostgresUnavailable as exc:
        if IN_CI:
            pytest.fail(f"{exc}, but CI=true")
        pytest.skip(str(exc))
    return bindir


class PostgresCluster:
    """A private PostgreSQL server for the tests, listening on a Unix socket only.

    :param bindir: folder of ``initdb`` and ``pg_ctl`` (default: :func:`find_bindir`).
    :param database: name of the database created at :meth:`start` and named by
        :attr:`uri` (lower-case SQL identifier).
    :param settings: extra ``postgresql.conf`` settings, name to value as
        written in the file (strings quoted by the caller, e.g. ``"'on'"``);
        they override :data:`SETTINGS`.

    Use::

        cluster = PostgresCluster().start()
        with psycopg.connect(cluster.uri) as conn: ...
        uri = cluster.fresh_database()   # an empty database of its own
        cluster.restart()
        cluster.stop()                   # server stopped, folder removed

    After :meth:`start`: :attr:`root` (the temporary folder, which is also the
    socket folder), :attr:`datadir`, :attr:`logfile`.
    """

    def __init__(
        self,
        bindir: str | os.PathLike[str] | None = None,
        database: str = DEFAULT_DATABASE,
        settings: dict[str, str] | None = None,
    ) -> None:
        _check_identifier(database)
        self.bindir = Path(bindir) if bindir is not None else find_bindir()
        self.database = database
        self.settings = {**SETTINGS, **(settings or {})}
        self.root: Path | None = None
        self._running = False
        self._names = itertools.count(1)

    # -- paths and connection strings ---------------------------------------

    def _root(self) -> Path:
        """The temporary folder; :raises PostgresHarnessError: not started."""
        if self.root is None:
            raise PostgresHarnessError("the cluster is not started (call start())")
        return self.root

    @property
    def datadir(self) -> Path:
        """The data directory (``<root>/data``); :raises PostgresHarnessError: not started."""
        return self._root() / "data"

    @property
    def logfile(self) -> Path:
        """The server's log file (``<root>/postgres.log``)."""
        return self._root() / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        """The folder holding the Unix socket ``.s.PGSQL.5432`` (the temporary folder)."""
        return self._root()

    @property
    def socket_path(self) -> Path:
        """The Unix socket's path."""
        return self.socket_dir / f".s.PGSQL.{PORT}"

    def uri_for(self, database: str) -> str:
        """A libpq URI for ``database`` over the Unix socket, as the superuser.

        :param database: database name.
        :return: e.g. ``postgresql:///mailout?host=/tmp/mailout-pg-x&port=5432&user=postgres``
            (str; characters other than letters, digits, ``/``, ``-``, ``_``, ``.``
            and ``~`` percent-encoded, which libpq decodes).
        """
        host = quote(str(self.socket_dir), safe="/")
        return (f"postgresql:///{quote(database, safe='')}"
                f"?host={host}&port={PORT}&user={SUPERUSER}")

    @property
    def uri(self) -> str:
        """The libpq URI of the default database (see :meth:`uri_for`)."""
        return self.uri_for(self.database)

    @property
    def conninfo(self) -> str:
        """The default database as a libpq key/value string (``host=... port=... ...``)."""
        return (f"host='{self.socket_dir}' port={PORT} user={SUPERUSER} "
                f"dbname={self.database}")

    def log(self) -> str:
        """The server's log so far (str; empty when there is none)."""
        try:
            return self.logfile.read_text(errors="replace")
        except (OSError, PostgresHarnessError):
            return ""

    # -- running programs -----------------------------------------------------

    def _run(self, argv: list[str], timeout: float, what: str) -> str:
        """Run a PostgreSQL program as the cluster's owner; return its output.

        :param argv: program name in :attr:`bindir` and its arguments.
        :param timeout: longest wait, in seconds.
        :param what: what is being done, for the error message.
        :return: combined stdout and stderr (str).
        :raises PostgresHarnessError: non-zero exit or timeout (output and log
            in the message).
        """
        command = _command([str(self.bindir / argv[0]), *argv[1:]])
        env = dict(os.environ, LC_ALL="C", LANG="C")
        for name in ("PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS"):
            env.pop(name, None)
        try:
            result = subprocess.run(
                command, cwd=self._root(), env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            output = exc.output if isinstance(exc.output, str) else ""
            raise PostgresHarnessError(
                f"{what}: no answer within {timeout} s\n{output}\n--- log ---\n{self.log()}")
        if result.returncode != 0:
            raise PostgresHarnessError(
                f"{what} failed (exit status {result.returncode})\n{result.stdout}"
                f"\n--- log ---\n{self.log()}")
        return result.stdout

    def _pg_ctl(self, action: str, *extra: str) -> None:
        """``pg_ctl <action> -w -t 30 -D <datadir> ...``; raises PostgresHarnessError."""
        self._run(["pg_ctl", action, "-w", "-t", str(PG_CTL_TIMEOUT), "-D", str(self.datadir),
                   *extra], timeout=PG_CTL_TIMEOUT + 10, what=f"pg_ctl {action}")

    # -- life cycle ------------------------------------------------------------

    def start(self) -> PostgresCluster:
        """Create the folder, run initdb, start the server and create :attr:`database`.

        initdb runs with ``--auth=trust -E UTF8 --locale=C -U postgres`` and
        ``--no-sync`` (it skips only initdb's own final flush of a cluster that
        is thrown away; the server keeps ``fsync=on``).

        :return: self, started.
        :raises PostgresHarnessError: initdb, pg_ctl or CREATE DATABASE failed
            (the folder is removed, nothing is left running).
        :raises PostgresUnavailable: root without a ``postgres`` OS user, or no psycopg.
        """
        if self.root is not None:
            raise PostgresHarnessError("the cluster is already started")
        _check_os_user()
        self.root = Path(tempfile.mkdtemp(prefix="mailout-pg-", dir=_base_dir()))
        atexit.register(self.stop)
        try:
            if _run_as_postgres():
                owner = pwd.getpwnam(PG_OS_USER)
                os.chown(self.root, owner.pw_uid, owner.pw_gid)
            os.chmod(self.root, 0o755)
            self._run(["initdb", "-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust",
                       "-E", "UTF8", "--locale=C", "--no-sync"],
                      timeout=INITDB_TIMEOUT, what="initdb")
            settings = {**self.settings, "unix_socket_directories": _quote_setting(
                str(self.socket_dir)), "port": str(PORT)}
            with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write("\n# tests/support/postgres.py\n")
                conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
            self.start_server()
            self._execute("postgres", "CREATE DATABASE {}", self.database)
        except BaseException:
            try:
                self.stop()
            except PostgresHarnessError:
                pass  # the first error is the one to report; stop's is in the log
            raise
        return self

    def start_server(self) -> None:
        """Start the server of an initialised cluster (``pg_ctl start -w``).

        :raises PostgresHarnessError: it did not start within 30 s (log in the message).
        """
        self._pg_ctl("start", "-l", str(self.logfile))
        self._running = True

    def stop_server(self) -> None:
        """Stop the server (``pg_ctl stop -m fast -w``), keeping the data; :meth:`start_server`
        starts it again.

        :raises PostgresHarnessError: it did not stop within 30 s.
        """
        self._pg_ctl("stop", "-m", "fast")
        self._running = False

    def restart(self) -> None:
        """Restart the server (``pg_ctl restart -m fast -w``): every connection is
        closed, committed data stays.

        :raises PostgresHarnessError: it did not come back within 30 s.
        """
        self._running = False
        self._pg_ctl("restart", "-m", "fast", "-l", str(self.logfile))
        self._running = True

    @property
    def running(self) -> bool:
        """True while the server started by this object has not been stopped."""
        return self._running

    def postmaster_pid(self) -> int:
        """The server's process id, from ``postmaster.pid``.

        :return: the pid (int).
        :raises PostgresHarnessError: the server is not running.
        """
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError) as exc:
            raise PostgresHarnessError(f"no running server: {exc}")

    def _server_alive(self) -> bool:
        """True when the process named in ``postmaster.pid`` exists."""
        try:
            os.kill(self.postmaster_pid(), 0)
        except (PostgresHarnessError, ProcessLookupError):
            return False
        except PermissionError:
            return True
        return True

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``, then ``immediate`` if that
        fails) and remove the folder.  Safe to call twice or when not started.

        :raises PostgresHarnessError: the server would not stop (the folder is kept
            for inspection).
        """
        if self.root is None:
            return
        atexit.unregister(self.stop)
        if self._running or (self.datadir / "postmaster.pid").exists():
            try:
                self._pg_ctl("stop", "-m", "fast")
            except PostgresHarnessError:
                if self._server_alive():
                    self._pg_ctl("stop", "-m", "immediate")
            self._running = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    # -- databases ----------------------------------------------------------

    def _execute(self, database: str, template: str, name: str) -> None:
        """Run one statement about database ``name`` in autocommit mode as the superuser.

        :param database: the database to connect to.
        :param template: the statement with ``{}`` where the quoted name goes.
        :param name: the database the statement is about (quoted as an identifier).
        :raises PostgresUnavailable: psycopg is not installed.
        :raises PostgresHarnessError: the statement failed.
        """
        try:
            import psycopg
            from psycopg import sql
        except ImportError:
            raise PostgresUnavailable("psycopg 3 is not installed (pip install -e '.[test]')")
        statement = sql.SQL(template).format(sql.Identifier(name))
        try:
            with psycopg.connect(self.uri_for(database), autocommit=True,
                                 connect_timeout=10) as conn:
                conn.execute(statement)
        except psycopg.Error as exc:
            raise PostgresHarnessError(
                f"{template.format(name)}: {exc}\n--- log ---\n{self.log()}")

    def fresh_database(self, name: str | None = None) -> str:
        """Create an empty database (a copy of ``template1``) and return its URI.

        :param name: lower-case SQL identifier; default ``test_<n>``, unique in
            this cluster.
        :return: its libpq URI (see :meth:`uri_for`).
        :raises ValueError: ``name`` is not a plain lower-case identifier.
        :raises PostgresHarnessError: CREATE DATABASE failed (the name exists).
        """
        if name is None:
            name = f"test_{next(self._names)}"
        _check_identifier(name)
        self._execute("postgres", "CREATE DATABASE {}", name)
        return self.uri_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending its open sessions first (``WITH (FORCE)``).

        :param name: the database's name.
        :raises ValueError: ``name`` is not a plain lower-case identifier.
        :raises PostgresHarnessError: DROP DATABASE failed.
        """
        _check_identifier(name)
        self._execute("postgres", "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def __enter__(self) -> PostgresCluster:
        """Start the cluster (see :meth:`start`)."""
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        """Stop the cluster and remove its folder (see :meth:`stop`)."""
        self.stop()


def _check_identifier(name: str) -> None:
    """Raise ValueError unless ``name`` is a plain lower-case SQL identifier (so it
    needs no quoting rules beyond double quotes)."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain lower-case identifier: {name!r}")


def _quote_setting(value: str) -> str:
    """``value`` as a postgresql.conf string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def database_name(uri: str) -> str:
    """The database named by a URI from :meth:`PostgresCluster.uri_for`.

    :param uri: ``postgresql:///NAME?...``.
    :return: NAME (str).
    """
    return uri.split("///", 1)[1].split("?", 1)[0]


def tcp_listening_inodes() -> set[int]:
    """Socket inodes of every TCP socket in the LISTEN state on this machine's
    network namespace (``/proc/net/tcp`` and ``/proc/net/tcp6``).

    :return: set of inode numbers (int).
    """
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open (from ``/proc/<pid>/fd``).

    :param pid: process id (readable by the caller: root, or the same user).
    :return: set of inode numbers (int).
    :raises OSError: ``/proc/<pid>/fd`` cannot be read.
    """
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(int(match.group(1)))
    return inodes


def tcp_listeners_of(pid: int) -> set[int]:
    """Inodes of the TCP sockets that process ``pid`` is listening on.

    :param pid: process id.
    :return: set of inode numbers (int), empty when it listens on no TCP port.
    :raises OSError: its file descriptors cannot be read.
    """
    return socket_inodes(pid) & tcp_listening_inodes()
