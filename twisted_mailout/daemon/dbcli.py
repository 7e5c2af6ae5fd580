"""The C{mailout db} command: the PostgreSQL queue's schema (docs/postgresql.md).

  - C{mailout db upgrade --queue postgresql://...}: create the schema, or
    apply the migrations it lacks, each in one transaction (several runs at
    once wait for each other); never done implicitly by a daemon.
  - C{mailout db status --queue postgresql://...}: the schema's version and
    what this code needs.

The password comes from C{--queue-password-file FILE} (its first line), or
libpq's own C{PGPASSFILE} / C{PGPASSWORD}; never from the command line.

Exit statuses (sysexits(3)): 0 done (C{status}: up to date), 1 (C{status})
the schema is missing or older than the code, 64 bad usage, 66 the password
file cannot be read, 69 the database cannot be reached, 70 a migration failed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "read_password_file"]

EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70


def read_password_file(path: str) -> str:
    """The first line of C{path}, without its line end.

    @raise OSError: the file cannot be read.
    @raise ValueError: it is empty.
    """
    with open(path, encoding="utf-8") as f:
        line = f.readline().rstrip("\r\n")
    if not line:
        raise ValueError(f"{path}: the first line is empty")
    return line


def _password(args: argparse.Namespace) -> tuple[str | None, int]:
    if args.queue_password_file is None:
        return None, 0
    try:
        return read_password_file(args.queue_password_file), 0
    except (OSError, ValueError) as e:
        print(f"mailout db: --queue-password-file: {e}", file=sys.stderr)
        return None, EX_NOINPUT


def _check_uri(args: argparse.Namespace) -> int:
    from twisted_mailout.queue.postgres import is_postgres_uri

    if not is_postgres_uri(args.queue):
        print(f"mailout db: --queue must be a PostgreSQL URI (postgresql://...), not "
              f"{args.queue!r}", file=sys.stderr)
        return EX_USAGE
    try:
        import psycopg  # noqa: F401
    except ImportError:
        print("mailout db: psycopg is not installed: pip install 'twisted_mailout[postgresql]'",
              file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    """C{mailout db upgrade}: apply the migrations the schema lacks.

    @param args: C{queue}, C{queue_password_file}.
    @return: the exit status (module docstring).
    """
    status = _check_uri(args)
    if status:
        return status
    password, status = _password(args)
    if status:
        return status
    from twisted_mailout.errors import QueueError
    from twisted_mailout.queue.postgres import DatabaseUnavailable, redact_uri, upgrade

    try:
        applied = upgrade(args.queue, password)
    except DatabaseUnavailable as e:
        print(f"mailout db upgrade: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    except QueueError as e:
        print(f"mailout db upgrade: {e}", file=sys.stderr)
        return EX_SOFTWARE
    where = redact_uri(args.queue)
    if not applied:
        print(f"{where}: the schema is up to date")
    for version, name in applied:
        print(f"{where}: applied migration {version} ({name})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """C{mailout db status}: the schema's version against the code's.

    @return: 0 up to date, 1 missing or older, 69 unreachable.
    """
    status = _check_uri(args)
    if status:
        return status
    password, status = _password(args)
    if status:
        return status
    from twisted_mailout.queue.postgres import (
        MIGRATIONS,
        DatabaseUnavailable,
        connect,
        redact_uri,
        schema_version,
    )

    where = redact_uri(args.queue)
    try:
        conn: Any = connect(args.queue, password)
        try:
            version = schema_version(conn)
        finally:
            conn.close()
    except DatabaseUnavailable as e:
        print(f"mailout db status: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    latest = MIGRATIONS[-1][0]
    if version == latest:
        print(f"{where}: schema version {version}, up to date")
        return 0
    have = "missing" if version is None else f"at version {version}"
    print(f"{where}: the schema is {have}; this code needs version {latest}: "
          f"run `mailout db upgrade --queue URI`")
    return 1


def add_parser(sub: Any) -> None:
    """Add C{db} and its subcommands to the C{mailout} command's parsers.

    @param sub: the C{add_subparsers()} object of the C{mailout} parser.
    """
    p = sub.add_parser("db", help="create or upgrade the PostgreSQL queue's schema",
                       description="The schema of a PostgreSQL queue (docs/postgresql.md).")
    dsub = p.add_subparsers(dest="db_command", required=True)
    for name, func, text in (
            ("upgrade", cmd_upgrade, "create the schema or apply the migrations it lacks"),
            ("status", cmd_status, "show the schema's version and what this code needs")):
        c = dsub.add_parser(name, help=text, description=text)
        c.add_argument("--queue", "-q", required=True, metavar="URI",
                       help="the queue: a libpq URI, postgresql://[USER@]HOST[:PORT]/DB "
                       "or postgresql:///DB?host=/SOCKET/DIR (no password in it)")
        c.add_argument("--queue-password-file", metavar="FILE", default=None,
                       help="file whose first line is the password (else PGPASSFILE or "
                       "PGPASSWORD)")
        c.set_defaults(func=func)
