"""The C{mailout} command: C{sendmail}, C{queue} (L{queuecli}), C{report},
C{dkim} (L{dkimcli}), C{db} (L{dbcli}), C{demo}.

Exit codes follow sysexits(3), as sendmail(1) does: 64 bad usage or address,
65 bad message data, 73 queue folder cannot be written, 75 temporary failure.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted_mailout.daemon import queuecli
from twisted_mailout.envelope import AddressError
from twisted_mailout.message import MessageError, recipients_from_headers, remove_headers
from twisted_mailout.queue.store import Queue, QueueError, validate_envelope

__all__ = ["main"]

EX_USAGE = 64
EX_DATAERR = 65
EX_CANTCREAT = 73
EX_TEMPFAIL = 75


def _default_sender() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name: use a neutral one
        user = "mailout"
    return f"{user}@{socket.gethostname()}"


def cmd_sendmail(args: argparse.Namespace) -> int:
    """C{mailout sendmail}: read a message on stdin and queue it.

    @param args: the parsed arguments (C{queue}, C{f}, C{t}, C{recipients}).
    @return: the exit status: 0 (the queue id printed), C{EX_USAGE} (no
        recipient, bad address), C{EX_DATAERR} (empty or bad message) or
        C{EX_CANTCREAT} (the queue folder cannot be written).
    """
    data = sys.stdin.buffer.read()
    if not data.strip():
        print("mailout sendmail: the message on standard input is empty", file=sys.stderr)
        return EX_DATAERR
    rcpts = list(args.recipients)
    if args.t:
        try:
            from_headers = recipients_from_headers(data)
        except MessageError as e:  # e.g. a bare CR in To: (an injected RCPT TO)
            print(f"mailout sendmail: {e}", file=sys.stderr)
            return EX_DATAERR
        rcpts.extend(r for r in from_headers if r not in rcpts)
        data = remove_headers(data, ["Bcc"])
    if not rcpts:
        print("mailout sendmail: no recipients (give them as arguments, or use -t)",
              file=sys.stderr)
        return EX_USAGE
    sender = args.f if args.f is not None else _default_sender()
    try:
        validate_envelope(sender, rcpts)  # before the queue folder is touched
        qid = Queue(args.queue).enqueue(sender, rcpts, data)
    except AddressError as e:
        hint = "" if args.f is not None else " (the default sender; give one with -f)"
        print(f"mailout sendmail: bad address: {e}{hint}", file=sys.stderr)
        return EX_USAGE
    except MessageError as e:
        print(f"mailout sendmail: {e}", file=sys.stderr)
        return EX_DATAERR
    except QueueError as e:
        print(f"mailout sendmail: {e}", file=sys.stderr)
        return EX_CANTCREAT
    print(qid)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """C{mailout demo}: the whole job on loopback (see L{demo.run}).

    @param args: the parsed arguments (C{queue}, C{timeout} in seconds).
    @return: the exit status of L{demo.main}.
    """
    # imported here so that `mailout sendmail` does not load the daemon and its peers
    from twisted_mailout.daemon import demo

    return demo.main(args)


def _report() -> Any:
    """The C{mailout report} module, imported on use (C{mailout sendmail}
    stays light)."""
    from twisted_mailout.daemon import report

    return report


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the C{mailout} command."""
    p = argparse.ArgumentParser(prog="mailout", description="twisted_mailout command line")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sendmail", help="queue a message read from standard input",
                       description="Queue the message on standard input, like sendmail(1). "
                       "Prints the queue id.")
    s.add_argument("--queue", "-q", required=True, metavar="DIR", help="queue folder")
    s.add_argument("-f", metavar="SENDER", default=None,
                   help="envelope sender (MAIL FROM); '' or '<>' for the null sender")
    s.add_argument("-t", action="store_true",
                   help="take recipients from To, Cc and Bcc (Bcc is removed)")
    s.add_argument("-i", "-oi", dest="ignore_dots", action="store_true",
                   help="accepted for compatibility: a lone dot never ends the input here")
    s.add_argument("-F", metavar="NAME", default=None, help="accepted for compatibility")
    s.add_argument("recipients", nargs="*", metavar="RCPT", help="recipient addresses")
    s.set_defaults(func=cmd_sendmail)

    queuecli.add_parser(sub)
    from twisted_mailout.daemon import dkimcli  # light: dkimpy loads when a key is used

    dkimcli.add_parser(sub)
    from twisted_mailout.daemon import dbcli  # light: psycopg loads when a URI is used

    dbcli.add_parser(sub)

    r = sub.add_parser("report", help="summarise a JSON delivery log (--json-log) as pflogsumm "
                       "does", description="Summarise the JSON delivery log written with "
                       "--log-format json (docs/operations.md): totals, per hour, top "
                       "destinations, top deferral and bounce reasons.")
    _report().add_arguments(r)
    r.set_defaults(func=lambda args: _report().main(args))

    d = sub.add_parser("demo", help="run the delivery service against loopback DNS and SMTP "
                       "servers it starts itself, and print the outcomes")
    d.add_argument("--queue", metavar="DIR|URI", default=None,
                   help="queue folder to use (default: a temporary one), or an empty "
                   "PostgreSQL queue, postgresql://... (after `mailout db upgrade`)")
    d.add_argument("--timeout", type=float, default=60.0,
                   help="give up after this many seconds (default 60)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the C{mailout} console script.

    @param argv: arguments without the program name; C{sys.argv[1:]} when L{None}.
    @return: the exit status.
    """
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
