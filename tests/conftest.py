"""Shared pytest fixtures: loopback DNS server process, aiosmtpd and smtp-sink receivers.

The helpers themselves live in ``tests/support/`` (``from tests.support.peers import ...``).

The tree is arranged by layer: ``tests/unit/<layer>/`` is the fast lane,
``pytest -m "not slow"``: in memory or on loopback in-process, with no daemon, no
Postfix or Unbound and no downloads (a few run a short child process, such as a
fake sendmail command); the unit tests that need more are marked ``slow`` where
they stand. Everything under
``tests/integration/`` (real peers on loopback: aiosmtpd, Postfix, Unbound, HTTPS) and
``tests/system/`` (the daemon, the CLI, crashes, the wheel) is marked ``slow`` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.peers import (
    IN_CI,
    SMTP_SINK,
    AiosmtpdSink,
    DnsServerProcess,
    SmtpSink,
)
from tests.support.postgres import PostgresCluster, database_name, require_postgres


#: Fixtures shared by several test modules (the DANE test PKI).
pytest_plugins = ["tests.support.dane_pki"]

_SLOW_DIRS = ("integration", "system")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under C{tests/integration/} and C{tests/system/} as C{slow}."""
    for item in items:
        parts = item.path.parts
        if "tests" in parts and any(d in parts[parts.index("tests"):] for d in _SLOW_DIRS):
            item.add_marker(pytest.mark.slow)


def require_smtp_sink() -> None:
    """Skip the calling test if smtp-sink is missing; fail instead when env CI=true."""
    if not SmtpSink.available():
        if IN_CI:
            pytest.fail(f"{SMTP_SINK} is missing but CI=true (install postfix)")
        pytest.skip(f"{SMTP_SINK} not installed (apt-get install postfix)")


@pytest.fixture
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., int]]:
    """Factory fixture: ``make_dns_server(zone, interface="127.0.0.1") -> port``.

    Each call runs ``python -m twisted_mailout.testing.loopback dns`` in a subprocess
    serving ``zone`` (a dict, see twisted_mailout.testing.loopback) on UDP and TCP, waits
    at most 10 s for its port file and returns the port (int).  All servers are
    stopped (SIGTERM, then SIGKILL after 10 s) at teardown.
    """
    servers: list[DnsServerProcess] = []

    def make_dns_server(zone: dict[str, Any], interface: str = "127.0.0.1") -> int:
        workdir = tmp_path_factory.mktemp("dns")
        server = DnsServerProcess(zone, interface=interface, workdir=workdir)
        servers.append(server)
        return server.start(timeout=10.0)

    yield make_dns_server
    for server in servers:
        server.stop()


@pytest.fixture
def aiosmtpd_sink() -> Iterator[Callable[..., AiosmtpdSink]]:
    """Factory fixture: ``make_sink(**kwargs) -> AiosmtpdSink`` (already started).

    Keyword arguments are those of :class:`peers.AiosmtpdSink` (``hostname``,
    ``port``, ``rcpt_reply``, ``data_reply``, ``greeting_reply``,
    ``close_on_connect``, ``server_hostname``).  All sinks are stopped at teardown.
    """
    sinks: list[AiosmtpdSink] = []

    def make_sink(**kwargs: Any) -> AiosmtpdSink:
        sink = AiosmtpdSink(**kwargs)
        sinks.append(sink)
        return sink.start()

    yield make_sink
    for sink in sinks:
        sink.stop()


@pytest.fixture
def sink(aiosmtpd_sink: Callable[..., AiosmtpdSink]) -> AiosmtpdSink:
    """An aiosmtpd sink on 127.0.0.1 accepting everything (started; stopped at teardown).

    A test that needs refusals sets ``sink.rcpt_reply`` or ``sink.data_reply``
    (see :class:`tests.support.peers.AiosmtpdSink`), so the behaviour is visible
    in the test itself.
    """
    return aiosmtpd_sink()


@pytest.fixture
def smtp_sink() -> Iterator[Callable[..., SmtpSink]]:
    """Factory fixture: ``make_smtp_sink(**kwargs) -> SmtpSink`` (already listening).

    Keyword arguments are those of :class:`peers.SmtpSink` (``host``, ``port``,
    ``extra_args``, ``user``, ...).  Skips the test when /usr/sbin/smtp-sink is
    missing, except under CI (env CI=true) where that fails the test.  All sinks
    are stopped and their dump directories removed at teardown.
    """
    require_smtp_sink()
    sinks: list[SmtpSink] = []

    def make_smtp_sink(**kwargs: Any) -> SmtpSink:
        sink = SmtpSink(**kwargs)
        sinks.append(sink)
        return sink.start()

    yield make_smtp_sink
    for sink in sinks:
        sink.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL server for the whole session (started on first use).

    It listens on a Unix socket in a temporary folder and on no TCP address
    (see :mod:`tests.support.postgres`); ``postgres_cluster.uri`` names its
    ``mailout`` database.  Skips the test when PostgreSQL or psycopg is
    missing, except under CI (env CI=true) where that fails it.  Stopped and
    its folder removed at the end of the session.
    """
    bindir = require_postgres()
    cluster = PostgresCluster(bindir=bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_uri(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The libpq URI (str) of a new, empty database of the session's cluster.

    ``psycopg.connect(pg_uri)`` connects to it as the superuser over the Unix
    socket.  The database is dropped at teardown (open sessions are ended).  A
    server left stopped by an earlier test (``stop_server``) is started again.
    """
    if not postgres_cluster.running:
        postgres_cluster.start_server()
    uri = postgres_cluster.fresh_database()
    yield uri
    if postgres_cluster.running:
        postgres_cluster.drop_database(database_name(uri))
