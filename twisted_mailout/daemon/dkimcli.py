"""The C{mailout dkim} command: C{keygen} and C{check} (docs/deliverability.md).

Exit statuses (sysexits(3)): 0 done (C{check}: the published key matches),
1 the published key does not match or is missing, 64 bad usage or a bad key
table, 69 the DNS is unavailable, 73 a file cannot be created.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from twisted_mailout.dkim import DNSUnavailable
from twisted_mailout.errors import ConfigError

__all__ = ["EX_CANTCREAT", "EX_UNAVAILABLE", "EX_USAGE", "add_parser", "run"]

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and C{message}, then exit 64.

        @param message: what is wrong.
        """
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def cmd_keygen(args: argparse.Namespace) -> int:
    """C{mailout dkim keygen}: make a key, add it to the table, print the record.

    @param args: C{keys}, C{domain}, C{selector}, C{type}.
    @return: 0 (the record printed on standard output, the key file on
        standard error), 64 (bad domain, selector, or table) or 73 (a file
        cannot be created, or the key file exists).
    """
    from twisted_mailout.dkim.keys import KeyFileError, keygen

    try:
        path, record = keygen(args.keys, args.domain, args.selector, args.type)
    except KeyFileError as e:
        print(f"mailout dkim keygen: {e}", file=sys.stderr)
        return EX_CANTCREAT
    except ConfigError as e:
        print(f"mailout dkim keygen: {e}", file=sys.stderr)
        return EX_USAGE
    print(f"mailout dkim keygen: wrote {path} (mode 0600) and added it to {args.keys}; "
          f"publish this record:", file=sys.stderr)
    print(record)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """C{mailout dkim check}: compare the published key with the table's.

    @param args: C{keys}, C{domain}, C{selector}, C{resolver}.
    @return: 0 the record matches, 1 it does not (or is missing), 64 bad
        usage or table, 69 the DNS did not answer.
    """
    from twisted_mailout.dkim.keys import KeyTable, check

    try:
        table = KeyTable.load(args.keys)
        ok, message = check(args.domain, args.selector, table, args.resolver,
                            timeout=args.timeout)
    except ConfigError as e:
        print(f"mailout dkim check: {e}", file=sys.stderr)
        return EX_USAGE
    except ValueError as e:
        print(f"mailout dkim check: {e}", file=sys.stderr)
        return EX_USAGE
    except DNSUnavailable as e:
        print(f"mailout dkim check: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    print(("ok: " if ok else "MISMATCH: ") + message)
    return 0 if ok else 1


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the C{dkim} command and its subcommands to the C{mailout} parser.

    @param sub: the C{mailout} parser's subparsers action
        (C{ArgumentParser.add_subparsers()}).
    @return: the C{dkim} parser.
    """
    d = sub.add_parser(
        "dkim", help="DKIM keys: make one (keygen), check its DNS record (check)",
        description="DKIM signing keys (docs/deliverability.md). Exit status: 0 done or "
        "matching, 1 the published record does not match, 64 bad usage or key table, 69 the "
        "DNS is unavailable, 73 a file cannot be created.")
    setattr(d, "error", _Parser.error.__get__(d))  # noqa: B010 - an instance's own method
    ds = d.add_subparsers(dest="dkim_command", required=True, metavar="COMMAND",
                          parser_class=_Parser)
    k = ds.add_parser("keygen", help="make a key pair, add it to the key table and print "
                      "the DNS TXT record to publish")
    k.add_argument("--keys", required=True, metavar="FILE",
                   help="the key table (created if missing); the key is written beside it")
    k.add_argument("--domain", required=True, metavar="D", help="the signing domain (d=)")
    k.add_argument("--selector", required=True, metavar="S", help="the selector (s=)")
    k.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                   help="rsa (2048 bits, rsa-sha256; the default) or ed25519 (ed25519-sha256)")
    k.set_defaults(func=cmd_keygen)
    c = ds.add_parser("check", help="look the key record up and say whether it matches the "
                      "key table")
    c.add_argument("--keys", required=True, metavar="FILE", help="the key table")
    c.add_argument("--domain", required=True, metavar="D", help="the signing domain (d=)")
    c.add_argument("--selector", required=True, metavar="S", help="the selector (s=)")
    c.add_argument("--resolver", default=None, metavar="HOST:PORT",
                   help="the DNS resolver to ask (default: the system's)")
    c.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="the longest wait for the answer (default 5)")
    c.set_defaults(func=cmd_check)
    return d


def run(argv: list[str] | None = None) -> int:
    """Run C{mailout dkim} on its own (for tests and C{python -m}).

    @param argv: the arguments after C{dkim}; C{sys.argv[1:]} when L{None}.
    @return: the exit status.
    """
    p = _Parser(prog="mailout")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = p.parse_args(["dkim", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(run())
