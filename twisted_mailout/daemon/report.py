"""C{mailout report}: summarise a JSON delivery log as C{pflogsumm} does.

C{mailout report [--since HOURS] [--top N] [--json] LOGFILE...} reads the
records L{twisted_mailout.daemon.jsonlog} writes (one JSON object a line) and
prints:

  - grand totals: delivered, deferred, bounced and expired, each as messages
    (distinct queue ids) and recipients (records; for deferred, distinct
    recipients, with the number of deferrals beside), the admin actions, and
    the delivery delay (average and maximum, arrival to delivery);
  - per-hour traffic (UTC): delivered, deferred, bounced, expired and admin
    records per hour, quiet hours included (for a log spanning at most 31
    days; only the busy hours beyond that);
  - the top destinations by volume (outcome records), with delivered,
    deferred, bounced, expired and the delivery delay;
  - the top deferral reasons and the top bounce reasons (C{Bounce} and
    C{Expiration} records): replies grouped by code, enhanced code and text
    with addresses, IP addresses, ids and numbers masked (L{mask}), so that
    C{"451 4.7.1 try again in 300 seconds"} and C{"... in 120 seconds"} are
    one reason;
  - the admin actions by action (events and messages).

C{--json} prints the same as one JSON document (L{Summary.to_json}).

Input: each LOGFILE is a path or C{-} (standard input, once); gzip, bzip2 and
xz files (C{mailout.json.2.gz}) are read as such, told by their first bytes,
so rotated files can be given together in any order. Files are streamed line
by line: memory grows with the number of distinct queue ids, destinations and
reasons, not with the size of the log. A line that is not a JSON object with
a string C{type} and a numeric C{timestamp} (or longer than 1 MiB) is counted
and skipped, with one warning on standard error at the end; records of types
this report does not know (a future C{Reception}) are counted as ignored.

Exit status (sysexits(3)): 0; 64 (C{EX_USAGE}) for bad arguments; 66
(C{EX_NOINPUT}) when an input cannot be opened or read to its end (a
truncated C{.gz}): then nothing is printed on standard output.
"""

from __future__ import annotations

import argparse
import bz2
import datetime
import gzip
import io
import json
import lzma
import math
import re
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any, BinaryIO, cast

from twisted_mailout.daemon.jsonlog import (
    ADMIN_TYPES,
    BOUNCE,
    DELIVERY,
    EXPIRATION,
    TRANSIENT_FAILURE,
)

__all__ = ["EX_NOINPUT", "EX_USAGE", "Summary", "add_arguments", "main", "mask",
           "open_input", "run"]

EX_USAGE = 64
EX_NOINPUT = 66

#: The longest line read; a longer one is skipped as malformed.
MAX_LINE = 1 << 20
#: Quiet hours are listed (as zeros) when the log spans at most this many hours.
FILL_HOURS = 31 * 24

#: The outcome categories, in the order of every table.
CATEGORIES = ("delivered", "deferred", "bounced", "expired")
_CATEGORY_OF_TYPE = {DELIVERY: 0, TRANSIENT_FAILURE: 1, BOUNCE: 2, EXPIRATION: 3}
_ADMIN = 4  # the admin column of the per-hour table

# -- masking reply texts ------------------------------------------------------------

_ADDR = re.compile(r"[^\s<>()\[\]{},;:\"'@]+@[^\s<>()\[\]{},;\"'@]+")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)")
_ID = re.compile(r"(?<![\w-])(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{6,}(?![\w-])", re.ASCII)
_NUM = re.compile(r"\d+")
_MASKED_MAX = 200


def _ipv6(m: re.Match[str]) -> str:
    s = m.group(0)
    return "{ip}" if "::" in s or s.count(":") == 7 else s


def mask(text: str) -> str:
    """The reply text with what varies from message to message masked, so
    that similar replies group: addresses become C{{addr}}, IPv4 and IPv6
    addresses C{{ip}}, tokens of letters and digits of 6 characters or more
    (queue ids, session ids) C{{id}}, other numbers C{{n}}; white space is
    collapsed and the result cut at 200 characters.

    @param text: a reply text (without code and enhanced code).
    @return: the masked text.
    """
    t = " ".join(text.split())
    t = _ADDR.sub("{addr}", t)
    t = _IPV6.sub(_ipv6, t)
    t = _IPV4.sub("{ip}", t)
    t = _ID.sub("{id}", t)
    t = _NUM.sub("{n}", t)
    return t[:_MASKED_MAX]


# -- the summary ----------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _hour(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(
        timespec="seconds").replace("+00:00", "Z")


class _Destination:
    __slots__ = ("counts", "delay_max", "delay_n", "delay_sum")

    def __init__(self) -> None:
        self.counts = [0, 0, 0, 0]
        self.delay_sum = 0.0
        self.delay_n = 0
        self.delay_max: float | None = None

    @property
    def total(self) -> int:
        return sum(self.counts)


class Summary:
    """What a JSON delivery log says, accumulated record by record.

    @ivar since: records before this time (seconds since the epoch) are not
        counted; L{None} counts all.
    @ivar records: records counted (outcomes and admin actions in the window).
    @ivar malformed: lines skipped as malformed.
    @ivar first_malformed: C{"FILE:LINE"} of the first of them, or L{None}.
    @ivar outside: records before L{since}.
    @ivar ignored: C{{type: count}} of records of other types.
    """

    def __init__(self, since: float | None = None) -> None:
        """
        @param since: see L{since}.
        """
        self.since = since
        self.records = 0
        self.malformed = 0
        self.first_malformed: str | None = None
        self.outside = 0
        self.ignored: dict[str, int] = {}
        self.first: float | None = None
        self.last: float | None = None
        self.recipients = [0, 0, 0, 0]
        self.messages: list[set[str]] = [set(), set(), set(), set()]
        self.deferred_recipients: set[tuple[str, str]] = set()
        self.delay_sum = 0.0
        self.delay_n = 0
        self.delay_max: float | None = None
        self.hours: dict[int, list[int]] = {}
        self.destinations: dict[str, _Destination] = {}
        self.deferral_reasons: dict[tuple[int | None, str, str], list[Any]] = {}
        self.bounce_reasons: dict[tuple[int | None, str, str], list[Any]] = {}
        self.admin_events: dict[str, int] = {}
        self.admin_messages: dict[str, int] = {}

    # -- input ------------------------------------------------------------

    def add_line(self, line: bytes | None, where: str) -> None:
        """Count one line of a log: a record, a blank line (nothing) or a
        malformed line.

        @param line: the line's bytes (UTF-8 JSON), or L{None} for a line
            that was too long to read.
        @param where: C{"FILE:LINE"}, kept for the warning about the first
            malformed line.
        """
        if line is not None:
            line = line.strip()
            if not line:
                return
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # also UnicodeDecodeError
                rec = None
            if isinstance(rec, dict) and self.add(rec):
                return
        self.malformed += 1
        if self.first_malformed is None:
            self.first_malformed = where

    def add(self, rec: Mapping[str, Any]) -> bool:
        """Count one record.

        @param rec: a decoded record (see L{twisted_mailout.daemon.jsonlog}).
        @return: C{False} when it is malformed (no string C{type}, no finite
            numeric C{timestamp}): not counted; C{True} otherwise.
        """
        rtype = rec.get("type")
        ts = _num(rec.get("timestamp"))
        if not isinstance(rtype, str) or ts is None:
            return False
        if self.since is not None and ts < self.since:
            self.outside += 1
            return True
        cat = _CATEGORY_OF_TYPE.get(rtype)
        if cat is None and rtype not in ADMIN_TYPES:
            self.ignored[rtype] = self.ignored.get(rtype, 0) + 1
            return True
        self.records += 1
        self.first = ts if self.first is None else min(self.first, ts)
        self.last = ts if self.last is None else max(self.last, ts)
        hour = self.hours.get(int(ts // 3600))
        if hour is None:
            hour = self.hours[int(ts // 3600)] = [0, 0, 0, 0, 0]
        qid = rec.get("queue_id")
        if cat is None:
            hour[_ADMIN] += 1
            action = rec.get("action")
            action = action if isinstance(action, str) and action else rtype
            count = rec.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                count = 1 if isinstance(qid, str) and qid else 0
            self.admin_events[action] = self.admin_events.get(action, 0) + 1
            self.admin_messages[action] = self.admin_messages.get(action, 0) + count
            return True
        hour[cat] += 1
        self.recipients[cat] += 1
        rcpt = rec.get("recipient")
        rcpt = rcpt if isinstance(rcpt, str) else ""
        if isinstance(qid, str):
            self.messages[cat].add(qid)
            if cat == 1:
                self.deferred_recipients.add((qid, rcpt))
        dest_name = rec.get("destination")
        if not isinstance(dest_name, str) or not dest_name:
            dest_name = rcpt.rpartition("@")[2].lower() or "(none)"
        dest = self.destinations.get(dest_name)
        if dest is None:
            dest = self.destinations[dest_name] = _Destination()
        dest.counts[cat] += 1
        delay = _num(rec.get("delay"))
        if cat == 0 and delay is not None:
            dest.delay_sum += delay
            dest.delay_n += 1
            dest.delay_max = delay if dest.delay_max is None else max(dest.delay_max, delay)
            self.delay_sum += delay
            self.delay_n += 1
            self.delay_max = delay if self.delay_max is None else max(self.delay_max, delay)
        if cat:
            reply = rec.get("reply")
            self._reason(self.deferral_reasons if cat == 1 else self.bounce_reasons,
                         reply if isinstance(reply, Mapping) else {})
        return True

    @staticmethod
    def _reason(table: dict[tuple[int | None, str, str], list[Any]],
                reply: Mapping[str, Any]) -> None:
        code = reply.get("code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        enhanced = reply.get("enhanced_code")
        enhanced = enhanced if isinstance(enhanced, str) else ""
        text = reply.get("text")
        text = text if isinstance(text, str) else ""
        key = (code, enhanced, mask(text))
        slot = table.get(key)
        if slot is None:
            table[key] = [1, " ".join(text.split())[:500]]
        else:
            slot[0] += 1

    # -- output -----------------------------------------------------------

    def _hour_rows(self) -> list[tuple[int, list[int]]]:
        if not self.hours:
            return []
        lo, hi = min(self.hours), max(self.hours)
        if hi - lo < FILL_HOURS:
            return [(h, self.hours.get(h, [0, 0, 0, 0, 0])) for h in range(lo, hi + 1)]
        return sorted(self.hours.items())

    def _top_destinations(self, top: int) -> list[tuple[str, _Destination]]:
        return sorted(self.destinations.items(), key=lambda kv: (-kv[1].total, kv[0]))[:top]

    @staticmethod
    def _top_reasons(table: dict[tuple[int | None, str, str], list[Any]],
                     top: int) -> list[dict[str, Any]]:
        rows = sorted(table.items(),
                      key=lambda kv: (-kv[1][0], kv[0][0] or 0, kv[0][1], kv[0][2]))[:top]
        return [{"count": n, "code": code, "enhanced_code": enh or None, "text": text,
                 "example": example} for (code, enh, text), (n, example) in rows]

    def to_json(self, top: int = 10) -> dict[str, Any]:
        """The summary as a JSON-ready dict.

        @param top: how many destinations and reasons to list.
        @return: C{{"window": {"since", "first", "last"} (epoch seconds or
            null), "records", "malformed", "outside_window", "ignored"
            {type: n}, "totals": {"delivered"|"bounced"|"expired":
            {"messages", "recipients"}, "deferred": {"messages",
            "recipients", "deferrals"}, "admin_actions": {"events",
            "messages"}}, "delivery_delay": {"average", "max"} (seconds or
            null), "hours": [{"hour" (ISO 8601 UTC), "timestamp", "delivered",
            "deferred", "bounced", "expired", "admin"}], "destinations":
            [{"destination", "total", "delivered", "deferred", "bounced",
            "expired", "average_delay", "max_delay"}], "deferral_reasons" and
            "bounce_reasons": [{"count", "code", "enhanced_code", "text"
            (masked), "example" (the first such text, unmasked)}],
            "admin_actions": [{"action", "events", "messages"}]}}.
        """
        totals: dict[str, Any] = {}
        for i, name in enumerate(CATEGORIES):
            totals[name] = {"messages": len(self.messages[i]), "recipients": self.recipients[i]}
        totals["deferred"] = {"messages": len(self.messages[1]),
                              "recipients": len(self.deferred_recipients),
                              "deferrals": self.recipients[1]}
        totals["admin_actions"] = {"events": sum(self.admin_events.values()),
                                   "messages": sum(self.admin_messages.values())}
        return {
            "window": {"since": self.since, "first": self.first, "last": self.last},
            "records": self.records,
            "malformed": self.malformed,
            "outside_window": self.outside,
            "ignored": dict(sorted(self.ignored.items())),
            "totals": totals,
            "delivery_delay": {
                "average": self.delay_sum / self.delay_n if self.delay_n else None,
                "max": self.delay_max},
            "hours": [dict(hour=_iso(h * 3600), timestamp=h * 3600,
                           **dict(zip((*CATEGORIES, "admin"), row, strict=True)))
                      for h, row in self._hour_rows()],
            "destinations": [
                dict(destination=name, total=d.total,
                     **dict(zip(CATEGORIES, d.counts, strict=True)),
                     average_delay=d.delay_sum / d.delay_n if d.delay_n else None,
                     max_delay=d.delay_max)
                for name, d in self._top_destinations(top)],
            "deferral_reasons": self._top_reasons(self.deferral_reasons, top),
            "bounce_reasons": self._top_reasons(self.bounce_reasons, top),
            "admin_actions": [
                {"action": a, "events": n, "messages": self.admin_messages[a]}
                for a, n in sorted(self.admin_events.items(), key=lambda kv: (-kv[1], kv[0]))],
        }

    def render(self, top: int = 10) -> str:
        """The summary as text for people, in pflogsumm's order.

        @param top: how many destinations and reasons to list.
        @return: the text, ending with a newline.
        """
        out: list[str] = []

        def title(text: str) -> None:
            out.extend(["", text, "-" * len(text)])

        if self.first is None or self.last is None:
            head = "mailout report: no records"
        else:
            head = (f"mailout report: {self.records} records, {_iso(self.first)} to "
                    f"{_iso(self.last)}")
        if self.since is not None:
            head += f" (since {_iso(self.since)})"
        out.append(head)

        title("Grand totals")
        out.append(f"  {'':<15}{'messages':>10}{'recipients':>12}")
        for i, name in enumerate(CATEGORIES):
            rcpts = len(self.deferred_recipients) if i == 1 else self.recipients[i]
            extra = f"   ({self.recipients[1]} deferrals)" if i == 1 else ""
            out.append(f"  {name:<15}{len(self.messages[i]):>10}{rcpts:>12}{extra}")
        events = sum(self.admin_events.values())
        out.append(f"  {'admin actions':<15}{sum(self.admin_messages.values()):>10}"
                   f"{'':>12}   ({events} actions)")
        if self.delay_n and self.delay_max is not None:
            out.append(f"  delivery delay: average {_secs(self.delay_sum / self.delay_n)}, "
                       f"max {_secs(self.delay_max)}")

        title("Per-hour traffic (UTC)")
        cols = (*CATEGORIES, "admin")
        out.append(f"  {'hour':<18}" + "".join(f"{c:>11}" for c in cols))
        rows = self._hour_rows()
        out.extend(f"  {_hour(h * 3600):<18}" + "".join(f"{n:>11}" for n in row)
                   for h, row in rows)
        if not rows:
            out.append("  (none)")

        title(f"Top {top} destinations by volume")
        out.append(f"  {'total':>8}" + "".join(f"{c:>11}" for c in CATEGORIES)
                   + f"{'avg delay':>11}{'max delay':>11}  destination")
        dests = self._top_destinations(top)
        for name, d in dests:
            avg = _secs(d.delay_sum / d.delay_n) if d.delay_n else "-"
            mx = _secs(d.delay_max) if d.delay_max is not None else "-"
            out.append(f"  {d.total:>8}" + "".join(f"{n:>11}" for n in d.counts)
                       + f"{avg:>11}{mx:>11}  {name}")
        if not dests:
            out.append("  (none)")

        for heading, table in (("deferral", self.deferral_reasons),
                               ("bounce", self.bounce_reasons)):
            title(f"Top {top} {heading} reasons")
            reasons = self._top_reasons(table, top)
            for r in reasons:
                reply = " ".join(str(x) for x in (r["code"], r["enhanced_code"], r["text"])
                                 if x not in (None, ""))
                out.append(f"  {r['count']:>8}  {_cut(reply, 100)}")
            if not reasons:
                out.append("  (none)")

        if self.admin_events:
            title("Admin actions")
            out.append(f"  {'action':<20}{'events':>8}{'messages':>10}")
            for a in self.to_json(top)["admin_actions"]:
                out.append(f"  {a['action']:<20}{a['events']:>8}{a['messages']:>10}")
        return "\n".join(out) + "\n"


def _secs(s: float) -> str:
    if s < 100:
        return f"{s:.1f} s"
    if s < 6000:
        return f"{s / 60:.1f} m"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# -- input files -----------------------------------------------------------------------


def open_input(name: str, stdin: IO[bytes] | None = None) -> BinaryIO:
    """Open one LOGFILE for reading, decompressed when it is gzip, bzip2 or
    xz (told by its first bytes, whatever its name).

    @param name: a path, or C{"-"} for C{stdin}.
    @param stdin: the binary standard input; C{sys.stdin.buffer} when L{None}.
    @return: a binary stream of the log's lines (the caller closes it).
    @raise OSError: it cannot be opened (missing, a folder, no permission).
    """
    raw: Any
    if name == "-":
        raw = stdin if stdin is not None else sys.stdin.buffer
        if not hasattr(raw, "peek"):
            raw = io.BufferedReader(raw)
    else:
        raw = open(name, "rb")  # noqa: SIM115 - returned to the caller
    try:
        magic = raw.peek(6)[:6]
        if magic.startswith(b"\x1f\x8b"):
            return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
        if magic.startswith(b"BZh"):
            return cast(BinaryIO, bz2.BZ2File(raw, "rb"))
        if magic.startswith(b"\xfd7zXZ\x00"):
            return cast(BinaryIO, lzma.LZMAFile(raw, "rb"))
    except BaseException:
        if name != "-":
            raw.close()
        raise
    return cast(BinaryIO, raw)


def _lines(stream: BinaryIO) -> Iterator[bytes | None]:
    """The lines of C{stream}; L{None} for a line longer than L{MAX_LINE}
    (read through to its end, never held whole)."""
    while True:
        line = stream.readline(MAX_LINE)
        if not line:
            return
        if len(line) >= MAX_LINE and not line.endswith(b"\n"):
            while True:
                rest = stream.readline(MAX_LINE)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line


#: What reading a damaged (truncated, corrupt) compressed file raises.
_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


# -- the command -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add C{mailout report}'s arguments to C{parser}: C{--since HOURS}
    (float), C{--top N} (int, default 10), C{--json}, and C{logfiles} (one
    or more paths or C{-}).

    @param parser: the C{report} subcommand's parser.
    """
    parser.add_argument("--since", type=float, default=None, metavar="HOURS",
                        help="only records of the last HOURS hours")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="destinations and reasons to list (default 10)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON document")
    parser.add_argument("logfiles", nargs="+", metavar="LOGFILE",
                        help="JSON log files (--json-log), rotated and .gz ones too; "
                        "- for standard input")


def main(args: argparse.Namespace, *, now: float | None = None,
         stdin: IO[bytes] | None = None, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None) -> int:
    """C{mailout report}: summarise the LOGFILEs.

    @param args: the parsed arguments (L{add_arguments}): C{since} (hours or
        L{None}), C{top}, C{json}, C{logfiles}.
    @param now: the present, seconds since the epoch, for C{--since};
        C{time.time()} when L{None}.
    @param stdin: binary standard input for C{-}; C{sys.stdin.buffer} when
        L{None}.
    @param stdout: where the report goes; C{sys.stdout} when L{None}.
    @param stderr: where errors and warnings go; C{sys.stderr} when L{None}.
    @return: 0; L{EX_USAGE} (64) for a bad C{--since} or C{--top}, no
        LOGFILE, or C{-} given twice; L{EX_NOINPUT} (66) when a LOGFILE
        cannot be opened or read to its end.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    files: list[str] = list(args.logfiles or [])
    since_hours = args.since
    problem = None
    if since_hours is not None and not (math.isfinite(since_hours) and since_hours > 0):
        problem = "--since takes a number of hours greater than 0"
    elif args.top < 1:
        problem = "--top takes a number greater than 0"
    elif not files:
        problem = "give at least one LOGFILE (or - for standard input)"
    elif files.count("-") > 1:
        problem = "standard input (-) can be given once"
    if problem:
        print(f"mailout report: {problem}", file=err)
        return EX_USAGE
    if now is None:
        now = time.time()
    summary = Summary(None if since_hours is None else now - since_hours * 3600)
    opened: list[tuple[str, BinaryIO]] = []
    try:
        for name in files:
            try:
                opened.append((name, open_input(name, stdin)))
            except OSError as e:
                print(f"mailout report: cannot open {name}: {e.strerror or e}", file=err)
                return EX_NOINPUT
        for name, stream in opened:
            label = "<stdin>" if name == "-" else name
            n = 0
            try:
                for n, line in enumerate(_lines(stream), 1):
                    summary.add_line(line, f"{label}:{n}")
            except _READ_ERRORS as e:
                print(f"mailout report: cannot read {label} after line {n}: "
                      f"{getattr(e, 'strerror', None) or e}", file=err)
                return EX_NOINPUT
    finally:
        for name, stream in opened:
            if name != "-":
                stream.close()
    if args.json:
        json.dump(summary.to_json(args.top), out, indent=2)
        out.write("\n")
    else:
        out.write(summary.render(args.top))
    if summary.malformed:
        print(f"mailout report: warning: {summary.malformed} malformed line"
              f"{'s' if summary.malformed != 1 else ''} skipped (the first at "
              f"{summary.first_malformed})", file=err)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"mailout report: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def run(argv: Sequence[str] | None = None) -> int:
    """C{python -m twisted_mailout.daemon.report [options] LOGFILE...}: the
    command on its own, with argparse errors exiting 64 (C{mailout report}
    itself is wired in L{twisted_mailout.daemon.cli}).

    @param argv: arguments without the program name; C{sys.argv[1:]} when
        L{None}.
    @return: the exit status of L{main}.
    @raise SystemExit: 64 for arguments argparse refuses (0 for C{--help}).
    """
    parser = _Parser(prog="mailout report",
                     description="Summarise a JSON delivery log (--json-log) as pflogsumm "
                     "does.")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
