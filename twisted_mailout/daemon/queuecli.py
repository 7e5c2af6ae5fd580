"""The C{mailout queue} command: the operator's queue administration (issue 11).

One set of operations (L{twisted_mailout.admin.QueueAdmin}), two ways in:

- when a daemon runs on the queue folder (it holds the folder's lock), the
  command asks the daemon's HTTP API (docs/operations.md), found through
  C{DIR/control.json} (L{twisted_mailout.daemon.control.find_daemon}), so the
  daemon's schedule changes at once;
- when none runs, the command works on the folder itself: actions hold the
  folder's lock for the whole command (so no daemon starts meanwhile); the
  read-only commands (C{list}, C{show}, C{summary}, C{suspensions}) only
  probe the lock to learn whether a daemon runs and then read without it
  (the folder's listing is safe to read while a daemon works on it).

Subcommands: C{list [--json] [SELECTOR]}, C{show QID [--body] [--json]},
C{summary [--by domain|sender] [--top N] [--json] [SELECTOR]},
C{hold|release|delete|bounce|flush|requeue SELECTOR [--reason TEXT]},
C{suspend --domain D --duration S [--reason TEXT]}, C{suspensions [--json]},
C{cancel-suspension ID [--reason TEXT]}. A SELECTOR is queue ids, C{-} (ids
one a line on standard input, C{list --json} lines accepted), C{ALL}, and
the filters C{--domain}, C{--sender}, C{--recipient}, C{--state},
C{--older-than} (see L{twisted_mailout.admin.selector}).

Exit codes follow sysexits(3): 0 done; 64 bad usage, bad selector or a
C{--queue} that is not a queue folder; 66 unknown queue id or suspension; 69
a conflict (a domain already suspended); 70 the daemon failed internally; 73
the queue folder cannot be written; 75 a daemon runs but its API cannot be
reached; 77 the API refused the token. Errors go to standard error as
C{mailout queue: ...}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from twisted_mailout.daemon.queueback import (
    ACTIONS,
    EX_CANTCREAT,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    ApiBackend,
    Backend,
    CommandError,
    OfflineBackend,
    fired,
)
from twisted_mailout.daemon.queueprint import (
    _ProgressBar,
    _Spinner,
    _stamp,
    print_action,
    print_detail,
    print_ndjson,
    print_summary,
    print_suspensions,
    print_table,
)
from twisted_mailout.queue.model import EntryNotFound
from twisted_mailout.queue.store import Queue, QueueError, QueueLocked

if TYPE_CHECKING:
    from twisted_mailout.admin import Selector

# The admin layer (and the delivery layer under it) is imported when a
# subcommand runs, not when the parser is built: `mailout sendmail` builds
# the same parser and should not pay for it.
#
# The backends (the folder, the daemon's API) live in queueback, the
# printing and the progress display in queueprint; their names are
# imported here so that they stay importable from this module.

__all__ = [
    "ACTIONS",
    "ApiBackend",
    "Backend",
    "CommandError",
    "OfflineBackend",
    "add_parser",
    "api_endpoint",
    "fired",
    "open_backend",
    "parse_duration",
    "run",
]

#: Commands that change nothing.
READ_ONLY = frozenset({"list", "show", "summary", "suspensions"})

#: Names a queue folder may hold before it is initialised (no C{new/} yet)
#: and still count as an empty queue.
_EMPTY_QUEUE_NAMES = frozenset({*Queue.SUBDIRS, "lock"})

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """A duration given on the command line, in seconds.

    @param text: seconds (C{"90"}, C{"1.5"}) or a number with one unit:
        C{s}, C{m} (minutes), C{h}, C{d}, C{w} (C{"30m"}, C{"2h"}, C{"1d"}).
    @return: seconds (a finite float >= 0).
    @raise argparse.ArgumentTypeError: anything else.
    """
    m = _DURATION.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (seconds, or a number with s, m, h, d or w: 30m, 2h, 1d)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"not a number above 0: {text!r}")
    return n


# -- choosing the way in ------------------------------------------------------------


def _control() -> Any:
    """The daemon's control client module.
    @raise CommandError: it is not available (exit 75)."""
    try:
        return importlib.import_module("twisted_mailout.daemon.control")
    except ImportError as e:
        raise CommandError(f"this installation has no control API client ({e})",
                           EX_TEMPFAIL) from None


def api_endpoint(url: str) -> str:
    """The control client's endpoint for C{--api URL}.

    @param url: C{http://HOST:PORT} (C{tcp:}), C{https://HOST:PORT}
        (C{ssl:}), with an optional trailing C{/}, or an endpoint as
        C{control.json} lists them (C{unix:/path}, C{tcp:HOST:PORT},
        C{tcp6:[HOST]:PORT}, C{ssl:HOST:PORT}), given as it is.
    @return: the endpoint string.
    @raise CommandError: a URL with a path, a query or no port (exit 64).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    kinds = {"http": "tcp", "https": "ssl"}
    if scheme.lower() not in kinds:
        raise CommandError(f"--api {url}: give http://HOST:PORT, https://HOST:PORT or an "
                           "endpoint (unix:/path/control.sock, tcp:HOST:PORT)", EX_USAGE)
    hostport = rest[:-1] if rest.endswith("/") else rest
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit() or not host or any(c in hostport for c in "/?#@"):
        raise CommandError(f"--api {url}: give the daemon's address as "
                           f"{scheme}://HOST:PORT", EX_USAGE)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    kind = kinds[scheme.lower()]
    if kind == "tcp" and host.startswith("["):
        kind = "tcp6"
    return f"{kind}:{host}:{port}"


def _client_for_url(url: str, token_file: str | None) -> Any:
    """A ControlClient for an explicit C{--api URL} (see L{api_endpoint}).
    @raise CommandError: a bad URL or an unreadable token file (64), no
        control client (75)."""
    endpoint = api_endpoint(url)
    token = _read_token(token_file) if token_file is not None else None
    control = _control()
    try:
        return control.ControlClient(endpoint, token=token)
    except ValueError as e:
        raise CommandError(f"--api {url}: {e}", EX_USAGE) from None


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as e:
        raise CommandError(f"cannot read the token file {path}: {e.strerror or e}",
                           EX_USAGE) from None
    if not token:
        raise CommandError(f"the token file {path} is empty", EX_USAGE)
    return token


def _find_daemon(path: str, token_file: str | None) -> Any:
    """The client of the daemon that holds C{path}'s lock.
    @raise CommandError: it has no reachable API (exit 75)."""
    control = _control()
    try:
        client = control.find_daemon(path)
    except Exception as e:  # noqa: BLE001 - any failure here means: no usable API
        raise CommandError(
            f"a mailout daemon runs on {path} (it holds the queue's lock), but its control "
            f"API cannot be reached: {e}", EX_TEMPFAIL) from None
    if client is None:
        raise CommandError(
            f"a mailout daemon runs on {path} (it holds the queue's lock), but it publishes "
            f"no control API ({os.path.join(path, 'control.json')} is missing or stale): "
            "run it with its default --http socket, or give --api URL", EX_TEMPFAIL)
    if token_file is not None:
        token = _read_token(token_file)
        if hasattr(client, "token"):
            client.token = token
    return client


def _open_folder(path: str) -> Queue | None:
    """The queue folder at C{path}, or L{None} when it exists but is empty
    or not initialised (nothing in it but empty queue subfolders and a lock).

    @raise CommandError: nothing there, not a folder, or a folder holding
        other things (exit 64).
    """
    if not os.path.exists(path):
        raise CommandError(f"{path} is not a mailout queue folder (nothing is there)",
                           EX_USAGE)
    if not os.path.isdir(path):
        raise CommandError(f"{path} is not a mailout queue folder (not a folder)", EX_USAGE)
    if os.path.isdir(os.path.join(path, "new")):
        try:
            return Queue(path, create=False)
        except QueueError as e:
            raise CommandError(str(e), EX_USAGE) from None
    try:
        names = os.listdir(path)
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}", EX_NOINPUT) from None
    for name in sorted(names):
        full = os.path.join(path, name)
        if name == "lock" and os.path.isfile(full):
            continue
        if name in _EMPTY_QUEUE_NAMES and os.path.isdir(full) and not os.listdir(full):
            continue
        raise CommandError(f"{path} is not a mailout queue folder (no new/ in it, and it "
                           f"holds {name!r})", EX_USAGE)
    return None


def _open_database(uri: str, writes: bool) -> Backend:
    """A PostgreSQL queue, from this process (any machine): read directly;
    changed through L{SharedBackend}, which gets the messages from the
    daemons holding them first.

    @raise CommandError: the database cannot be used (69).
    """
    try:
        from twisted_mailout.queue.postgres import PostgresStore
    except ImportError:
        raise CommandError("psycopg is not installed: pip install "
                           "'twisted_mailout[postgresql]'", EX_UNAVAILABLE) from None
    try:
        store = PostgresStore(uri, owner=f"mailout-queue-{os.getpid()}")
        if writes:
            from twisted_mailout.daemon.queueshared import SharedBackend

            return SharedBackend(store)
        return OfflineBackend(store)
    except QueueError as e:
        raise CommandError(str(e), EX_UNAVAILABLE) from None


def open_backend(queue: str | None, api: str | None = None, token_file: str | None = None,
                 writes: bool = True) -> Backend:
    """Choose the way in: the daemon's API when a daemon holds the queue's
    lock (or C{api} is given), else the folder itself.

    @param queue: the queue folder (may be L{None} only with C{api}).
    @param api: the daemon's API given explicitly (see L{api_endpoint});
        the folder is then not touched.
    @param token_file: a file whose first line is the API's bearer token.
    @param writes: the command changes the queue: hold the lock for the
        whole command (released by C{close()}); otherwise the lock is only
        probed and the folder read without it.
    @return: a L{Backend}; call its C{close()} at the end.
    @raise CommandError: not a queue folder (64), the lock file cannot be
        written (73), a daemon runs without a reachable API (75).
    """
    if api is not None:
        return ApiBackend(_client_for_url(api, token_file))
    if queue is None:
        raise CommandError("give the queue folder (--queue DIR) or the API (--api URL)",
                           EX_USAGE)
    if queue.startswith(("postgresql://", "postgres://")):
        return _open_database(queue, writes)
    store = _open_folder(queue)
    if store is None:
        return OfflineBackend(None)
    try:
        store.lock()
    except QueueLocked:
        return ApiBackend(_find_daemon(store.path, token_file))
    except QueueError as e:
        if writes:
            raise CommandError(str(e), EX_CANTCREAT) from None
        return OfflineBackend(store)  # no lock to be had (a read-only folder): read
    if not writes:
        store.unlock()
        return OfflineBackend(store)
    return OfflineBackend(store, locked=True)


# -- the subcommands -------------------------------------------------------------------


def _selector(args: argparse.Namespace) -> Selector:
    """The SELECTOR of a subcommand's arguments. @raise SelectorError."""
    from twisted_mailout.admin import Selector

    return Selector.parse(args.words, stdin=sys.stdin if "-" in args.words else None,
                          domain=args.domain, sender=args.sender, recipient=args.recipient,
                          state=args.state, older_than=args.older_than)


def _cmd_list(b: Backend, args: argparse.Namespace) -> int:
    rows = b.rows(_selector(args))
    if args.json:
        print_ndjson(rows, sys.stdout)
    else:
        print_table(rows, sys.stdout)
    return EX_OK


def _cmd_show(b: Backend, args: argparse.Namespace) -> int:
    d = b.show(args.qid, args.body)
    if args.json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        print_detail(d, sys.stdout)
    return EX_OK


def _cmd_summary(b: Backend, args: argparse.Namespace) -> int:
    s = b.summary(args.by, args.top, _selector(args))
    if args.json:
        sys.stdout.write(json.dumps(s) + "\n")
    else:
        print_summary(s, sys.stdout)
    return EX_OK


def _cmd_action(b: Backend, args: argparse.Namespace) -> int:
    action = args.queue_command
    selector = _selector(args)
    tty = sys.stderr.isatty()
    if isinstance(b, ApiBackend):
        many = not (len(selector.ids) == 1 and not selector.all)
        with _Spinner(f"{action}: the daemon is working...", tty and many):
            result = b.act(action, selector, args.reason, None)
    else:
        bar = _ProgressBar(action, tty)
        try:
            result = b.act(action, selector, args.reason, bar)
        finally:
            bar.close()
    print_action(result, sys.stdout)
    return EX_OK


def _cmd_suspend(b: Backend, args: argparse.Namespace) -> int:
    if args.duration <= 0:
        raise CommandError("--duration must be more than 0 seconds", EX_USAGE)
    s = b.suspend(args.domain, args.duration, args.reason)
    sys.stdout.write(f"suspended {s['domain']} until {_stamp(s['until'])} "
                     f"(suspension {s['id']})\n")
    return EX_OK


def _cmd_suspensions(b: Backend, args: argparse.Namespace) -> int:
    items = b.suspensions()
    if args.json:
        for s in items:
            sys.stdout.write(json.dumps(s, separators=(",", ":")) + "\n")
    else:
        print_suspensions(items, sys.stdout)
    return EX_OK


def _cmd_cancel(b: Backend, args: argparse.Namespace) -> int:
    s = b.cancel_suspension(args.id, args.reason)
    sys.stdout.write(f"suspension {s['id']} of {s['domain']} cancelled\n")
    return EX_OK


_COMMANDS: dict[str, Callable[[Backend, argparse.Namespace], int]] = {
    "list": _cmd_list, "show": _cmd_show, "summary": _cmd_summary,
    "suspend": _cmd_suspend, "suspensions": _cmd_suspensions, "cancel-suspension": _cmd_cancel,
    **dict.fromkeys(ACTIONS, _cmd_action),
}


def _control_error_status(e: Exception) -> int:
    status = getattr(e, "status", None)
    code = getattr(e, "code", None)
    if status == 400 or code == "bad_request":
        return EX_USAGE
    if status == 404 or code == "not_found":
        return EX_NOINPUT
    if status == 409 or code == "conflict":
        return EX_UNAVAILABLE
    if status in (401, 403) or code in ("unauthorized", "forbidden"):
        return EX_NOPERM
    if isinstance(status, int) and 400 <= status < 600:
        return EX_SOFTWARE
    return EX_TEMPFAIL  # no answer: connection refused, reset, timed out


def _is_control_error(e: BaseException) -> bool:
    return any(c.__name__ == "ControlError" for c in type(e).__mro__)


def run(args: argparse.Namespace) -> int:
    """Run one C{mailout queue} subcommand.

    @param args: the parsed arguments (C{queue}, C{api}, C{token_file},
        C{queue_command} and the subcommand's own).
    @return: the exit status (see the module's docstring).
    """
    from twisted_mailout.admin import AdminConflict, SelectorError

    command: str = args.queue_command
    backend: Backend | None = None
    try:
        backend = open_backend(args.queue, args.api, args.token_file,
                               writes=command not in READ_ONLY)
        status = _COMMANDS[command](backend, args)
        sys.stdout.flush()
        return status
    except CommandError as e:
        return _fail(e.message, e.status)
    except SelectorError as e:
        return _fail(str(e), EX_USAGE)
    except EntryNotFound as e:
        return _fail(str(e).strip("'\""), EX_NOINPUT)
    except AdminConflict as e:
        return _fail(str(e), EX_UNAVAILABLE)
    except QueueError as e:
        return _fail(str(e), EX_CANTCREAT)
    except BrokenPipeError:
        # the reader went away (list --json | head): not an error; keep
        # Python from complaining again when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_OK
    except Exception as e:
        if _is_control_error(e):
            return _fail(getattr(e, "message", None) or str(e), _control_error_status(e))
        raise
    finally:
        if backend is not None:
            backend.close()


def _fail(message: str, status: int) -> int:
    sys.stdout.flush()
    print(f"mailout queue: {message}", file=sys.stderr)
    return status


# -- the parser -----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and C{mailout queue: MESSAGE}; exit 64."""
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _add_selector(p: argparse.ArgumentParser, words_help: str) -> None:
    p.add_argument("words", nargs="*", metavar="ID", help=words_help)
    p.add_argument("--domain", default=None,
                   help="messages with an unfinished recipient at this domain "
                   "(.example.com: its subdomains too)")
    p.add_argument("--sender", default=None,
                   help="envelope sender: an address, @domain, or <> for bounces")
    p.add_argument("--recipient", default=None, help="a recipient address")
    p.add_argument("--state", default=None, metavar="QUEUE",
                   help="queue name: incoming, active, deferred or hold")
    p.add_argument("--older-than", dest="older_than", type=parse_duration, default=None,
                   metavar="AGE", help="arrived at least this long ago (seconds, or 30m, 2h, 1d)")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the C{queue} command and its subcommands to the C{mailout}
    parser.

    @param sub: the C{mailout} parser's subparsers action
        (C{ArgumentParser.add_subparsers()}).
    @return: the C{queue} parser (its C{func} default runs L{run}).
    """
    q = sub.add_parser(
        "queue", help="administer a queue: list, show, summary, hold, release, delete, "
        "bounce, flush, requeue, suspend",
        description="Administer a mailout queue. When a daemon runs on the queue, its HTTP "
        "API is used (found through DIR/control.json); otherwise the folder itself, under "
        "its lock. Exit status: 0 done, 64 bad usage or selector, 66 unknown queue id or "
        "suspension, 69 conflict, 70 the daemon failed, 73 the queue cannot be written, 75 "
        "the daemon cannot be reached, 77 the API refused the token.")
    # usage errors exit 64 (EX_USAGE) here, as sysexits(3) says
    setattr(q, "error", _Parser.error.__get__(q))  # noqa: B010 - an instance's own method
    q.add_argument("--queue", "-q", default=None, metavar="DIR", help="queue folder")
    q.add_argument("--api", default=None, metavar="URL",
                   help="the daemon's API (http://127.0.0.1:PORT, or an endpoint of "
                   "DIR/control.json: unix:/path/control.sock, tcp:HOST:PORT) instead of "
                   "finding it through the queue folder")
    q.add_argument("--token-file", dest="token_file", default=None, metavar="FILE",
                   help="file whose first line is the API's bearer token")
    q.set_defaults(func=run)
    qs = q.add_subparsers(dest="queue_command", required=True, metavar="COMMAND",
                          parser_class=_Parser)

    sel_help = "queue ids, - (ids one a line on standard input), or ALL"
    p = qs.add_parser("list", help="the messages, as mailq prints them",
                      description="List the selected messages (all by default).")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line, as postqueue -j prints them")
    _add_selector(p, sel_help)

    p = qs.add_parser("show", help="one message in full",
                      description="Show one message: its envelope, each recipient's history, "
                      "its headers.")
    p.add_argument("qid", metavar="QID", help="the queue id")
    p.add_argument("--body", action="store_true", help="print the message too")
    p.add_argument("--json", action="store_true", help="print the JSON object")

    p = qs.add_parser("summary", help="the queue's shape, as qshape prints it",
                      description="Messages per domain and age (minutes), as qshape prints "
                      "them.")
    p.add_argument("--by", choices=("domain", "sender"), default="domain",
                   help="rows by recipient domain (default) or sender domain")
    p.add_argument("--top", type=_positive_int, default=None, metavar="N",
                   help="only the N biggest rows")
    p.add_argument("--json", action="store_true", help="print the JSON object")
    _add_selector(p, sel_help)

    helps = {
        "hold": "put messages on hold (never attempted, never expired) until released",
        "release": "release held messages (due at once)",
        "delete": "remove messages without a bounce",
        "bounce": "return messages to their senders with a failure report",
        "flush": "make deferred mail due now (default: all deferred mail)",
        "requeue": "forget cached routing and policy, and route the messages again",
    }
    for action, text in helps.items():
        p = qs.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        _add_selector(p, sel_help)
        p.add_argument("--reason", default="", metavar="TEXT",
                       help="why (logged; the diagnostic of a bounce's report)")

    p = qs.add_parser("suspend", help="stop attempting a destination for a while",
                      description="Suspend a destination: its mail stays queued and is not "
                      "attempted until the suspension ends or is cancelled.")
    p.add_argument("--domain", required=True, help="the recipient domain")
    p.add_argument("--duration", required=True, type=parse_duration, metavar="DURATION",
                   help="seconds, or 30m, 2h, 1d")
    p.add_argument("--reason", default="", metavar="TEXT", help="why (logged, listed)")

    p = qs.add_parser("suspensions", help="the destinations suspended now")
    p.add_argument("--json", action="store_true", help="one JSON object a line")

    p = qs.add_parser("cancel-suspension", help="end a suspension now",
                      description="End a suspension now: its destination's mail is due "
                      "at once.")
    p.add_argument("id", metavar="ID", help="the suspension's id (see suspensions)")
    p.add_argument("--reason", default="", metavar="TEXT", help="why (logged)")
    return q
