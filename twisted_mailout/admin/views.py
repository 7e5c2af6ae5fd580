"""What the operator sees: list rows, one message in detail, the queue's shape.

Pure functions over queue entries (no store, no clock: the caller gives
C{now}). The JSON row is C{postqueue -j}'s (docs/operations.md): one object a
message with C{queue_id}, C{queue_name}, C{arrival_time}, C{message_size},
C{sender} and C{recipients}.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Collection, Iterable
from typing import Any

from twisted_mailout.envelope import FINAL_STATES, RecipientState, Reply
from twisted_mailout.queue.model import ListedEntry

__all__ = ["AGE_BUCKETS", "detail", "queue_name", "row", "summary"]

#: qshape's age buckets, in minutes: a message counts in the first bucket
#: its age is below; the last column is "older than 1280 minutes".
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def queue_name(listed: ListedEntry, in_flight: Collection[str] = ()) -> str:
    """The queue a message is listed under, as Postfix names them.

    C{hold}: on hold. C{incoming}: not yet picked up. C{active}: being
    delivered, or picked up and waiting for its first attempt. C{deferred}:
    some recipient was deferred and waits for its next attempt.

    @param listed: the message as the store lists it.
    @param in_flight: queue ids being delivered now (the scheduler's).
    @return: one of C{"incoming"}, C{"active"}, C{"deferred"}, C{"hold"}.
    """
    e = listed.entry
    if e.held:
        return "hold"
    if listed.where == "incoming":
        return "incoming"
    if e.qid in in_flight:
        return "active"
    if any(r.state is RecipientState.DEFERRED for r in e.recipients):
        return "deferred"
    return "active"


def _last_reply(reply: Reply | None) -> str | None:
    return None if reply is None else reply.one_line()  # "451 4.3.0 text", one line


def row(listed: ListedEntry, name: str) -> dict[str, Any]:
    """One message as a C{list --json} line (C{postqueue -j}'s object).

    @param listed: the message.
    @param name: its queue name (L{queue_name}).
    @return: C{{"queue_id", "queue_name", "arrival_time" (int epoch
        seconds), "message_size" (bytes, or L{None} when unknown),
        "sender" ("" for the null sender), "origin", "recipients": [{
        "address", "state", "attempts", "next_attempt" (epoch seconds or
        L{None}), "last_reply" ("code text" or L{None}), "relay"}]}}; a held
        message also has C{"held_since"}.
    """
    e = listed.entry
    out: dict[str, Any] = {
        "queue_id": e.qid,
        "queue_name": name,
        "arrival_time": int(e.arrival),
        "message_size": e.size,
        "sender": e.sender,
        "origin": e.origin,
        "recipients": [
            {"address": r.address, "state": r.state.value, "attempts": r.attempts,
             "next_attempt": r.next_attempt, "last_reply": _last_reply(r.reply),
             "relay": r.relay}
            for r in e.recipients
        ],
    }
    if e.held:
        out["held_since"] = e.held_since
    return out


def detail(listed: ListedEntry, name: str, headers: bytes | None,
           body: bytes | None = None, next_due: float | None = None) -> dict[str, Any]:
    """One message in full, for C{show} (KumoMTA's C{inspect-message}).

    @param listed: the message.
    @param name: its queue name.
    @param headers: its header block (L{IQueueStore.read_headers}), or
        L{None} when it could not be read.
    @param body: the whole message, when asked for (C{--body}).
    @param next_due: when the scheduler will next work on it, if known.
    @return: L{row}'s fields, plus C{"headers"} (C{[[name, value], ...]}
        decoded as RFC 2047 allows), C{"lifetime_start"},
        C{"held_total"}, C{"next_due"}, each recipient's C{"history"}
        (C{[{time, state, code, text, local, relay}]}), C{"reply"} (the
        last reply as an object) and, with C{body}, C{"message"} (the bytes
        as text, undecodable bytes replaced).
    """
    out = row(listed, name)
    e = listed.entry
    out["lifetime_start"] = e.lifetime_start
    out["held_total"] = e.held_total
    out["next_due"] = next_due
    out["delay_warned"] = e.delay_warned
    for rj, r in zip(out["recipients"], e.recipients, strict=True):
        rj["history"] = list(r.history)
        rj["reply"] = r.reply.to_json() if r.reply else None
    out["headers"] = None if headers is None else _headers(headers)
    if body is not None:
        out["message"] = body.decode("utf-8", "replace")
    return out


def _headers(block: bytes) -> list[list[str]]:
    msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        block + b"\r\n")
    return [[k, str(v)] for k, v in msg.items()]


def _age_column(age_seconds: float) -> int:
    minutes = age_seconds / 60.0
    for i, limit in enumerate(AGE_BUCKETS):
        if minutes < limit:
            return i
    return len(AGE_BUCKETS)


def summary(entries: Iterable[ListedEntry], now: float, by: str = "domain",
            top: int | None = None) -> dict[str, Any]:
    """The queue's shape, as Postfix's C{qshape} prints it.

    Rows are recipient domains (C{by="domain"}: a message counts once per
    domain among its unfinished recipients) or sender domains
    (C{by="sender"}: once); columns are age buckets (L{AGE_BUCKETS} minutes,
    then older); a C{TOTAL} row comes first.

    @param entries: the messages.
    @param now: seconds since the epoch.
    @param by: C{"domain"} or C{"sender"}.
    @param top: keep only the C{top} biggest rows (L{None}: all).
    @return: C{{"by", "buckets": ["5", ..., "1280", "1280+"], "total":
        {"total": n, "counts": [...]}, "rows": [{"domain", "total",
        "counts"}], "messages": n}}, rows sorted by total, then name.
    @raise ValueError: an unknown C{by}.
    """
    if by not in ("domain", "sender"):
        raise ValueError(f"summary by 'domain' or 'sender', not {by!r}")
    width = len(AGE_BUCKETS) + 1
    rows: dict[str, list[int]] = {}
    total = [0] * width
    messages = 0
    for listed in entries:
        e = listed.entry
        col = _age_column(now - e.arrival)
        messages += 1
        total[col] += 1
        if by == "sender":
            keys = {e.sender.rpartition("@")[2].lower() or "<>"}
        else:
            keys = {r.address.rpartition("@")[2].lower() for r in e.recipients
                    if r.state not in FINAL_STATES}
        for k in keys:
            rows.setdefault(k, [0] * width)[col] += 1
    ordered = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    if top is not None:
        ordered = ordered[:top]
    return {
        "by": by,
        "buckets": [str(b) for b in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1]}+"],
        "total": {"total": sum(total), "counts": total},
        "rows": [{"domain": k, "total": sum(v), "counts": v} for k, v in ordered],
        "messages": messages,
    }
