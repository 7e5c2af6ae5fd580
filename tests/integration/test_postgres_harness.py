"""Tests of the private PostgreSQL harness (tests/support/postgres.py) and its fixtures.

The PostgreSQL queue store's tests rely on it: a cluster reached over a Unix
socket only, an empty database per test, and a restart that keeps committed data.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import postgres as pgsupport
from tests.support.postgres import (
    PostgresCluster,
    PostgresUnavailable,
    database_name,
    tcp_listeners_of,
)

try:
    import psycopg
except ImportError:
    if pgsupport.IN_CI:
        raise
    pytest.skip("psycopg 3 is not installed (pip install -e '.[test]')", allow_module_level=True)


def _unix_listeners(path: Path) -> list[int]:
    """Inodes of the listening Unix sockets bound to ``path`` (from /proc/net/unix)."""
    inodes = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Flags 00010000 is __SO_ACCEPTCON: a listening socket.
        if len(fields) >= 8 and fields[7] == str(path) and fields[3] == "00010000":
            inodes.append(int(fields[6]))
    return inodes


def _alive(pid: int) -> bool:
    """True when process ``pid`` exists and is not a zombie (pg_ctl's server is
    reparented to init, which may reap it late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_cluster_starts_and_psycopg_connects_through_the_socket(
    postgres_cluster: PostgresCluster,
) -> None:
    cluster = postgres_cluster
    assert stat.S_ISSOCK(cluster.socket_path.stat().st_mode)
    assert cluster.uri.startswith("postgresql:///mailout?host=")
    with psycopg.connect(cluster.uri) as conn:
        row = conn.execute(
            "SELECT current_database(), current_user, inet_server_addr(),"
            " current_setting('server_encoding'), current_setting('lc_collate'),"
            " current_setting('fsync')").fetchone()
    # inet_server_addr() is NULL on a Unix-socket connection.
    assert row == ("mailout", "postgres", None, "UTF8", "C", "on")
    with psycopg.connect(cluster.conninfo) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("mailout",)
    pid = cluster.postmaster_pid()
    owner = os.stat(f"/proc/{pid}").st_uid
    if os.geteuid() == 0:
        assert owner == pwd.getpwnam("postgres").pw_uid
    else:
        assert owner == os.geteuid()


def test_a_fresh_database_is_empty_and_its_own(
    postgres_cluster: PostgresCluster, pg_uri: str
) -> None:
    user_tables = ("SELECT count(*) FROM pg_catalog.pg_class c"
                   " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                   " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
                   " AND n.nspname NOT LIKE 'pg_toast%'")
    user_schemas = ("SELECT count(*) FROM pg_catalog.pg_namespace"
                    " WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public')"
                    " AND nspname NOT LIKE 'pg_toast%' AND nspname NOT LIKE 'pg_temp%'")
    with psycopg.connect(pg_uri) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (database_name(pg_uri),)
        assert conn.execute(user_tables).fetchone() == (0,)
        assert conn.execute(user_schemas).fetchone() == (0,)
        conn.execute("CREATE SCHEMA mailout")
        conn.execute("CREATE TABLE mailout.t (x int)")
        # the same queries see what was just made, so they can fail
        assert conn.execute(user_tables).fetchone() == (1,)
        assert conn.execute(user_schemas).fetchone() == (1,)
    other = postgres_cluster.fresh_database()
    try:
        assert other != pg_uri
        with psycopg.connect(other) as conn:
            assert conn.execute(user_tables).fetchone() == (0,)
    finally:
        postgres_cluster.drop_database(database_name(other))


def test_restart_keeps_committed_data(postgres_cluster: PostgresCluster, pg_uri: str) -> None:
    with psycopg.connect(pg_uri) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (1), (2)")
    before = postgres_cluster.postmaster_pid()
    survivor = psycopg.connect(pg_uri)
    try:
        postgres_cluster.restart()
        # a connection open across the restart is gone
        with pytest.raises(psycopg.OperationalError):
            survivor.execute("SELECT 1")
    finally:
        survivor.close()
    assert postgres_cluster.postmaster_pid() != before
    with psycopg.connect(pg_uri) as conn:
        assert conn.execute("SELECT x FROM kept ORDER BY x").fetchall() == [(1,), (2,)]


def test_the_server_listens_on_no_tcp_port(postgres_cluster: PostgresCluster) -> None:
    pid = postgres_cluster.postmaster_pid()
    with psycopg.connect(postgres_cluster.uri) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
    assert tcp_listeners_of(pid) == set()
    # ... and it does listen on its Unix socket, found the same way
    unix = _unix_listeners(postgres_cluster.socket_path)
    assert unix
    assert set(unix) <= pgsupport.socket_inodes(pid)
    # the check sees a TCP listener where there is one
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert tcp_listeners_of(os.getpid())


def test_stop_ends_the_server_and_removes_the_folder() -> None:
    cluster = PostgresCluster(bindir=pgsupport.require_postgres(), database="other")
    cluster.start()
    try:
        root = cluster.root
        assert root is not None
        pid = cluster.postmaster_pid()
        uri = cluster.fresh_database("named")
        assert database_name(uri) == "named"
        with psycopg.connect(cluster.uri) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("other",)
        cluster.stop_server()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(uri, connect_timeout=5)
        cluster.start_server()
        with psycopg.connect(uri) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pid = cluster.postmaster_pid()
    finally:
        cluster.stop()
    assert not root.exists()
    assert not _alive(pid)
    cluster.stop()  # a second stop does nothing


def test_database_names_are_plain_identifiers(postgres_cluster: PostgresCluster) -> None:
    for bad in ("Upper", "with-dash", 'quo"te', "", "x" * 64):
        with pytest.raises(ValueError):
            postgres_cluster.fresh_database(bad)


def test_missing_postgresql_skips_or_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgsupport.shutil, "which", lambda name, **kw: None)
    monkeypatch.setattr(pgsupport.glob, "glob", lambda pattern: [])
    with pytest.raises(PostgresUnavailable, match="apt-get install postgresql"):
        pgsupport.find_bindir()
    monkeypatch.setattr(pgsupport, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="initdb"):
        pgsupport.require_postgres()
    monkeypatch.setattr(pgsupport, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        pgsupport.require_postgres()


def test_bindir_is_the_highest_installed_version(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    folders = {}
    for version in ("9.6", "15", "16"):
        folder = tmp_path / version / "bin"
        folder.mkdir(parents=True)
        for program in ("initdb", "pg_ctl"):
            (folder / program).write_text("#!/bin/sh\n")
            (folder / program).chmod(0o755)
        folders[version] = folder
    monkeypatch.setattr(pgsupport.shutil, "which", lambda name, **kw: None)
    monkeypatch.setattr(pgsupport.glob, "glob",
                        lambda pattern: [str(f) for f in folders.values()])
    assert pgsupport.find_bindir() == folders["16"].resolve()


def test_a_cluster_left_running_is_stopped_at_exit(tmp_path: Path) -> None:
    pgsupport.require_postgres()
    script = ("import json\n"
              "from tests.support.postgres import PostgresCluster\n"
              "c = PostgresCluster().start()\n"
              "print(json.dumps([str(c.root), c.postmaster_pid()]), flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    root, pid = json.loads(result.stdout.strip().splitlines()[-1])
    assert pid > 0
    assert not Path(root).exists()
    assert not _alive(pid)
