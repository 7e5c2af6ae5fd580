"""What the C{mailout queue} command (L{queuecli}) prints: the mailq
table, C{postqueue -j} lines, the qshape summary, one message in full, what
an action did, the suspensions; and the progress bar and spinner it shows
on standard error while an action runs.

Everything public here is importable from L{twisted_mailout.daemon.queuecli}
too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from twisted_mailout.daemon.queueback import ACTIONS

__all__ = [
    "print_action",
    "print_detail",
    "print_ndjson",
    "print_summary",
    "print_suspensions",
    "print_table",
]


def _when(t: float | None) -> str:
    """An epoch time as mailq prints it (local time): C{Tue Dec  3 05:09:01}."""
    if t is None:
        return "-"
    lt = time.localtime(t)
    return time.strftime("%a %b ", lt) + f"{lt.tm_mday:2d}" + time.strftime(" %H:%M:%S", lt)


def _stamp(t: float | None) -> str:
    """An epoch time as an ISO date and time (local time)."""
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


_MARK = {"active": "*", "hold": "!"}
_QID_WIDTH = 24


def print_table(rows: Iterator[dict[str, Any]], out: TextIO) -> int:
    """Print the rows as mailq does (one block per message: id with C{*}
    active or C{!} held, size, arrival, sender; then each recipient with
    its state, attempts, next attempt and last reply), streaming, then a
    C{-- N Kbytes in M requests.} line (or C{Mail queue is empty}).

    @param rows: L{views.row} objects.
    @param out: where to print.
    @return: how many messages were printed.
    """
    count = 0
    size = 0
    for row in rows:
        if count == 0:
            out.write(f"{'-Queue ID-':<{_QID_WIDTH}} --Size-- ----Arrival Time---- "
                      "-Sender/Recipient-------\n")
        count += 1
        size += row.get("message_size") or 0
        qid = row["queue_id"] + _MARK.get(row["queue_name"], "")
        out.write(f"{qid:<{_QID_WIDTH}} {row.get('message_size') or 0:>8} "
                  f"{_when(row['arrival_time']):>20}  {row['sender'] or 'MAILER-DAEMON'}\n")
        if row["queue_name"] == "hold":
            out.write(f"{'':8}(on hold since {_when(row.get('held_since'))})\n")
        for r in row["recipients"]:
            line = f"{'':8}{r['address']}  {r['state']}  attempts={r['attempts']}"
            if r.get("next_attempt") is not None and r["state"] == "deferred":
                line += f"  next={_when(r['next_attempt'])}"
            out.write(line + "\n")
            if r.get("last_reply"):
                reply = " ".join(str(r["last_reply"]).split())
                out.write(f"{'':10}({reply})\n")
        out.write("\n")
        if count == 1:
            out.flush()
    if count == 0:
        out.write("Mail queue is empty\n")
    else:
        kbytes = (size + 1023) // 1024
        out.write(f"-- {kbytes} Kbytes in {count} request{'s' if count != 1 else ''}.\n")
    return count


def print_ndjson(rows: Iterator[dict[str, Any]], out: TextIO) -> int:
    """Print one JSON object a line (C{postqueue -j}), the first at once.

    @return: how many rows were printed.
    """
    count = 0
    for row in rows:
        out.write(json.dumps(row, separators=(",", ":")) + "\n")
        count += 1
        if count == 1:
            out.flush()
    return count


def print_summary(s: dict[str, Any], out: TextIO) -> None:
    """Print a L{views.summary} as qshape does: a header of age buckets
    (minutes), a C{TOTAL} row, then one row per domain, every column right
    aligned.

    @param s: the summary object (C{buckets}, C{total}, C{rows}).
    @param out: where to print.
    """
    header = ["", "T", *s["buckets"]]
    table = [header, ["TOTAL", str(s["total"]["total"]), *map(str, s["total"]["counts"])]]
    for row in s["rows"]:
        table.append([row["domain"] or "<>", str(row["total"]), *map(str, row["counts"])])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        out.write(" ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
                  .rstrip() + "\n")


def print_detail(d: dict[str, Any], out: TextIO) -> None:
    """Print one message (L{views.detail}) for people: the envelope, each
    recipient with its history, the headers and, when present, the message.

    @param d: the detail object.
    @param out: where to print.
    """
    lines = [
        f"Queue ID:     {d['queue_id']}",
        f"Queue:        {d['queue_name']}",
        f"Sender:       {d['sender'] or '<> (MAILER-DAEMON)'}",
        f"Arrival:      {_stamp(d['arrival_time'])}",
        f"Size:         {d.get('message_size') if d.get('message_size') is not None else '?'}"
        " bytes",
        f"Origin:       {d.get('origin')}",
    ]
    if d.get("held_since") is not None:
        lines.append(f"Held since:   {_stamp(d['held_since'])}")
    if d.get("held_total"):
        lines.append(f"Held before:  {d['held_total']:.0f} s (not counted in its lifetime)")
    if d.get("next_due") is not None:
        lines.append(f"Next due:     {_stamp(d['next_due'])}")
    lines.append("Recipients:")
    for r in d["recipients"]:
        line = f"  {r['address']}  {r['state']}  attempts={r['attempts']}"
        if r.get("next_attempt") is not None and r["state"] == "deferred":
            line += f"  next={_stamp(r['next_attempt'])}"
        if r.get("relay"):
            line += f"  relay={r['relay']}"
        lines.append(line)
        for h in r.get("history") or []:
            local = " (local)" if h.get("local") else ""
            relay = f" via {h['relay']}" if h.get("relay") else ""
            text = " ".join(str(h.get("text", "")).split())
            lines.append(f"    {_stamp(h.get('time'))}  {h.get('state')}  "
                         f"{h.get('code')} {text}{local}{relay}")
    headers = d.get("headers")
    if headers is None:
        lines.append("Headers:      (not available)")
    else:
        lines.append("Headers:")
        lines.extend(f"  {k}: {' '.join(str(v).split())}" for k, v in headers)
    out.write("\n".join(lines) + "\n")
    if d.get("message") is not None:
        out.write("\n" + d["message"].replace("\r\n", "\n"))
        if not d["message"].endswith("\n"):
            out.write("\n")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def print_action(result: dict[str, Any], out: TextIO) -> None:
    """Print what an action did: C{N messages held} (etc.), then each
    message skipped and why, then the failure reports queued (bounce).

    @param result: C{ActionResult.to_json()}.
    @param out: where to print.
    """
    verb = ACTIONS.get(result["action"], result["action"])
    changed = result["changed"]
    n = changed if isinstance(changed, int) else len(changed)
    out.write(f"{_plural(n, 'message')} {verb}\n")
    for qid, why in sorted(result.get("skipped", {}).items()):
        out.write(f"{qid}: not {verb}: {why}\n")
    dsns = result.get("dsn_queue_ids") or []
    if dsns:
        out.write(f"{_plural(len(dsns), 'failure report')} queued to the senders: "
                  f"{', '.join(dsns)}\n")


def print_suspensions(items: Sequence[dict[str, Any]], out: TextIO) -> None:
    """Print the suspensions as a table (id, domain, until, reason).

    @param items: suspension JSON forms (C{id}, C{domain}, C{reason},
        C{created}, C{until}).
    @param out: where to print.
    """
    if not items:
        out.write("No destination is suspended\n")
        return
    width = max(4, *(len(s["domain"]) for s in items))
    idw = max(2, *(len(s["id"]) for s in items))
    out.write(f"{'ID':<{idw}}  {'DOMAIN':<{width}}  {'UNTIL':<19}  REASON\n")
    for s in items:
        line = (f"{s['id']:<{idw}}  {s['domain']:<{width}}  {_stamp(s['until']):<19}  "
                f"{' '.join(str(s.get('reason') or '').split())}")
        out.write(line.rstrip() + "\n")


# -- progress ------------------------------------------------------------------------


class _ProgressBar:
    """A C{rich} progress bar on standard error for a bulk offline action,
    shown only when standard error is a terminal and more than one message
    is changed; silent otherwise (and when C{rich} is not installed)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 1:
            return
        if self._bar is None:
            try:
                from rich.console import Console
                from rich.progress import Progress
            except ImportError:
                self.enabled = False
                return
            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total)
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class _Spinner:
    """A C{rich} spinner on standard error while the daemon works on a
    request (online actions), when standard error is a terminal."""

    def __init__(self, label: str, enabled: bool) -> None:
        self._status: Any = None
        if enabled:
            try:
                from rich.console import Console
            except ImportError:
                return
            self._status = Console(stderr=True).status(label)

    def __enter__(self) -> _Spinner:
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()

