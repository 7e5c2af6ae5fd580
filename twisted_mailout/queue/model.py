"""The queue's data model: entries, recipient states, the envelope line.

Pure values and their JSON forms (docs/queue-format.md); no file, no clock,
no reactor. Every queue store (the folder in L{twisted_mailout.queue.store},
the in-memory double in L{twisted_mailout.testing.memorystore}, a later
PostgreSQL store) keeps these values and nothing else.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from twisted_mailout.errors import QueueError, QueueLocked
from twisted_mailout.envelope import (
    FINAL_STATES,
    AddressError,
    RecipientState,
    Reply,
    check_transition,
    parse_sender,
    validate_envelope,
)
from twisted_mailout.message import MessageError, coerce_message, prepare_message

__all__ = [
    "ENVELOPE_HEADER",
    "FORMAT_VERSION",
    "ORIGINS",
    "CorruptEntry",
    "EntryNotFound",
    "EnvelopeLine",
    "Lease",
    "LeaseLost",
    "ListedEntry",
    "Pickup",
    "QueueEntry",
    "QueueError",
    "QueueLocked",
    "RecipientStatus",
    "Recovery",
    "StagedMessage",
    "Suspension",
    "check_batch",
    "encode_envelope_line",
    "header_block",
    "is_safe_qid",
    "new_queue_id",
    "parse_envelope_line",
    "queued_bytes",
]

#: The name in front of the JSON envelope on the first line of a queued file.
ENVELOPE_HEADER = b"X-Mailout-Envelope: "
#: The version of the envelope line and of the state JSON (C{"v"}).
FORMAT_VERSION = 1
#: Where a queued message came from: our own enqueue, or a foreign queue.
ORIGINS = ("mailout", "zope", "repoze")
#: Attempts kept per recipient in its history (the oldest are dropped).
HISTORY_LIMIT = 20


class LeaseLost(QueueError):
    """This store's owner no longer holds the lease on some entries: another
    daemon took them over after their leases expired. The caller drops those
    entries from memory and must not deliver them again.

    @ivar qids: the queue ids concerned (C{frozenset[str]}); a batch write
        that raises this has written every other entry of the batch.
    """

    def __init__(self, qids: Iterable[str], detail: str = "") -> None:
        self.qids = frozenset(qids)
        names = ", ".join(sorted(self.qids))
        super().__init__(f"held by another owner now: {names}" + (f" ({detail})" if detail
                                                                  else ""))


class EntryNotFound(QueueError, LookupError):
    """No such entry in the queue (finished and removed, or never there)."""


class CorruptEntry(QueueError):
    """A queued message or its state cannot be parsed (the store
    quarantines it)."""


def new_queue_id() -> str:
    """A new queue id: 13 hex digits of microseconds since the epoch, then
    10 random hex digits (23 characters). Sorts by arrival; unique without
    coordination, so several processes (and several daemons sharing one
    store) can make them at once.

    @return: the queue id, C{str} of C{[0-9A-F]}.
    """
    return f"{time.time_ns() // 1000:013X}{secrets.token_hex(5).upper()}"


def is_safe_qid(name: str) -> bool:
    """C{True} when C{name} can serve as a queue id as it is: 1 to 64 ASCII
    letters and digits (so it is safe as a file name and in a log line).

    @param name: a candidate queue id, such as a file name found in C{new/}.
    """
    return 0 < len(name) <= 64 and name.isascii() and name.isalnum()


@dataclass(frozen=True, slots=True)
class EnvelopeLine:
    """The decoded envelope line of a queued file (docs/queue-format.md).

    @ivar sender: the envelope sender (MAIL FROM), C{""} for the null sender.
    @ivar recipients: the envelope recipients (RCPT TO), validated, duplicates
        removed.
    @ivar arrival: when the message was enqueued, seconds since the epoch.
    @ivar origin: one of L{ORIGINS}.
    @ivar eightbit: the message has bytes above 127 (sent with
        C{BODY=8BITMIME}, RFC 6152, where the server offers it).
    @ivar length: bytes of the line including its LF: where the message bytes
        start (the entry's C{body_offset}).
    """

    sender: str
    recipients: list[str]
    arrival: float
    origin: str
    eightbit: bool
    length: int


def encode_envelope_line(sender: str, recipients: list[str], arrival: float, *,
                         eightbit: bool, origin: str = "mailout",
                         source: str | None = None) -> bytes:
    """The envelope line that starts every queued file: the one encoder
    (enqueue and the rewrite of foreign files both use it).

    @param sender: the validated envelope sender, C{""} for the null sender.
    @param recipients: the validated envelope recipients.
    @param arrival: seconds since the epoch.
    @param eightbit: the message has bytes above 127.
    @param origin: one of L{ORIGINS}; C{"mailout"} is the default and is not
        written.
    @param source: the original file name of a foreign message (kept for the
        operator), or L{None}.
    @return: C{ENVELOPE_HEADER + JSON + b"\\n"}, ASCII (JSON escapes the rest).
    """
    env: dict[str, Any] = {"v": FORMAT_VERSION, "sender": sender, "recipients": recipients,
                           "arrival": arrival}
    if origin != "mailout":
        env["origin"] = origin
    if source is not None:
        env["source"] = source
    if eightbit:
        env["8bit"] = True
    return ENVELOPE_HEADER + json.dumps(env, separators=(",", ":")).encode("ascii") + b"\n"


def parse_envelope_line(first: bytes, default_arrival: float) -> EnvelopeLine:
    """Decode the envelope line at the start of C{first}: the inverse of
    L{encode_envelope_line}, validating the envelope as enqueue does.

    @param first: the first bytes of a queued file (at least the whole line;
        64 KiB are read).
    @param default_arrival: the arrival time to use when the line has none.
    @return: an L{EnvelopeLine}.
    @raise CorruptEntry: not an envelope line, unterminated, bad JSON, a bad
        address, no recipients, or an unknown origin.
    """
    if not first.startswith(ENVELOPE_HEADER):
        raise CorruptEntry("no X-Mailout-Envelope line")
    end = first.find(b"\n")
    if end < 0:
        raise CorruptEntry("envelope line not terminated")
    try:
        env = json.loads(first[len(ENVELOPE_HEADER):end])
        sender, rcpts = validate_envelope(env["sender"], env["recipients"])
        arrival = float(env.get("arrival", default_arrival))
    except (ValueError, KeyError, TypeError, AttributeError, AddressError) as e:
        raise CorruptEntry(f"bad envelope line: {e}") from e
    origin = env.get("origin", "mailout")
    if origin not in ORIGINS:
        raise CorruptEntry(f"unknown origin {origin!r} in the envelope line")
    return EnvelopeLine(sender, rcpts, arrival, origin, bool(env.get("8bit", False)), end + 1)


def queued_bytes(sender: str | None, recipients: Any, message: object,
                 arrival: float) -> tuple[str, list[str], bytes]:
    """What enqueue stores for one message: validated, with Message-ID and
    Date added when missing, behind its envelope line. Every store enqueues
    through this, so they all store the same bytes.

    @param sender: envelope sender; C{""}, C{"<>"} or L{None} for null.
    @param recipients: envelope recipients (a C{str} is one).
    @param message: C{bytes}, C{str} or C{email.message.Message}.
    @param arrival: seconds since the epoch.
    @return: C{(sender, recipients, data)}: the normalised envelope and the
        bytes to store (envelope line, then the message).
    @raise AddressError: a bad sender or recipient, or none.
    @raise MessageError: an empty message or an unsupported type.
    """
    snd, rcpts = validate_envelope(sender, recipients)
    data = coerce_message(message)
    sender_addr = parse_sender(snd) if snd else None
    data = prepare_message(data, sender_addr.ascii_domain if sender_addr else None)
    head = encode_envelope_line(snd, rcpts, arrival, eightbit=not data.isascii())
    return snd, rcpts, head + data


def check_batch(items: Any) -> list[tuple[Any, Any, Any]]:
    """Validate a batch for C{enqueue_many} before anything is written.

    @param items: an iterable of C{(sender, recipients, message)}.
    @return: the items as a list.
    @raise TypeError: an item is not a 3-tuple (its index is named).
    @raise AddressError, MessageError: a bad item (its index is named).
    """
    items = list(items)
    for i, item in enumerate(items):
        try:
            sender, recipients, message = item
        except (TypeError, ValueError):
            raise TypeError(f"item {i}: expected (sender, recipients, message)") from None
        try:
            validate_envelope(sender, recipients)
            if not coerce_message(message).strip():
                raise MessageError("empty message")
        except (AddressError, MessageError) as e:
            raise type(e)(f"item {i}: {e}") from None
    return items


def header_block(data: bytes) -> bytes:
    """The header block at the start of C{data}: every header line with its
    line end, without the empty line that ends the block (all of C{data}
    when no empty line is found).

    @param data: the start of a message (RFC 5322), CRLF or LF line ends.
    """
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[: i + len(sep) // 2]
    return data


@dataclass(frozen=True, slots=True)
class StagedMessage:
    """A message written by the first phase of a two-phase enqueue, not yet
    visible to any daemon (see L{IQueueStore.stage}).

    @ivar qid: its queue id (kept when it is published).
    @ivar path: the store's private handle on the staged bytes (a file in
        C{tmp/} for the folder store); callers never interpret it.
    @ivar size: bytes written (envelope line included).
    """

    qid: str
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class Lease:
    """Who works on a queue entry, and until when.

    @ivar owner: the owner id of the store object (one per daemon) that
        picked the entry up.
    @ivar expires: when the lease ends unless renewed, seconds since the
        epoch; C{float("inf")} for a store that one daemon holds alone.
    """

    owner: str
    expires: float


@dataclass(slots=True)
class RecipientStatus:
    """One recipient of a queued message and where it stands.

    @ivar address: the recipient as given at enqueue (validated).
    @ivar state: a L{RecipientState}.
    @ivar attempts: delivery attempts so far.
    @ivar next_attempt: when a deferred recipient is tried again (seconds
        since the epoch), else L{None}.
    @ivar reply: the last reply, from a server or made locally, or L{None}.
    @ivar relay: the last host tried, C{"host[ip]:port"}, or L{None}.
    @ivar history: the last L{HISTORY_LIMIT} attempts and operator actions,
        oldest first, each a dict C{{"time": epoch seconds, "state": the
        state it led to, "code": int, "text": str, "local": bool, "relay":
        str or None}} (what C{mailout queue show} prints).
    """

    address: str
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float | None = None
    reply: Reply | None = None
    relay: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (see docs/queue-format.md)."""
        d: dict[str, Any] = {
            "address": self.address,
            "state": self.state.value,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "reply": self.reply.to_json() if self.reply else None,
            "relay": self.relay,
        }
        if self.history:
            d["history"] = self.history
        return d

    def record(self, when: float, reply: Reply, relay: str | None = None) -> None:
        """Append one attempt's (or operator action's) reply to L{history},
        keeping the last L{HISTORY_LIMIT}.

        @param when: seconds since the epoch.
        @param reply: the reply (its code, text and whether it was local).
        @param relay: the host that gave it, C{"host[ip]:port"}, if any.
        """
        self.history.append({"time": round(when, 3), "state": self.state.value,
                             "code": reply.code, "text": reply.text,
                             "local": reply.local, "relay": relay})
        if len(self.history) > HISTORY_LIMIT:
            del self.history[: len(self.history) - HISTORY_LIMIT]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RecipientStatus:
        """Inverse of L{to_json}. @raise ValueError, KeyError, TypeError: malformed."""
        when = d.get("next_attempt")
        return cls(
            address=str(d["address"]),
            state=RecipientState(d["state"]),
            attempts=int(d.get("attempts", 0)),
            next_attempt=float(when) if when is not None else None,
            reply=Reply.from_json(d.get("reply")),
            relay=d.get("relay"),
            history=[dict(h) for h in d.get("history", [])],
        )

    def move(self, new: RecipientState, reply: Reply | None, next_attempt: float | None = None,
             relay: str | None = None) -> None:
        """Change state, checking the transition (L{check_transition}).

        @param new: the new state.
        @param reply: the reply that caused it.
        @param next_attempt: for C{DEFERRED}, when to try again (seconds since
            the epoch); ignored for other states.
        @param relay: the host that gave the reply, C{"host[ip]:port"}.
        @raise InvalidTransition: for a forbidden change.
        """
        check_transition(self.state, new)
        self.state = new
        self.reply = reply
        self.next_attempt = next_attempt if new is RecipientState.DEFERRED else None
        if relay is not None:
            self.relay = relay


@dataclass(slots=True)
class QueueEntry:
    """A message in the queue: its envelope and the state of each recipient.

    @ivar qid: the queue id.
    @ivar sender: the envelope sender, C{""} for the null sender.
    @ivar arrival: when it was enqueued (seconds since the epoch).
    @ivar body_offset: where the message bytes start in the stored message
        (after the envelope line).
    @ivar origin: one of L{ORIGINS}.
    @ivar recipients: one L{RecipientStatus} per envelope recipient.
    @ivar eightbit: the message has bytes above 127 (sent with
        C{BODY=8BITMIME}, RFC 6152, where the server offers it).
    @ivar delay_warned: C{True} once a delay warning (RFC 3464 action
        C{delayed}) has been queued for this message.
    @ivar bounced_reported: addresses of bounced recipients already named in
        a delivery status notification that has been queued (so a restart
        never reports them twice).
    @ivar held: on hold (C{mailout queue hold}, Postfix C{postsuper -h}):
        never attempted, never expired, until released.
    @ivar held_since: when it was put on hold (seconds since the epoch),
        L{None} when not held.
    @ivar held_total: seconds it has spent on hold before, which do not
        count towards its queue lifetime.
    @ivar dkim: the DKIM-Signature header fields made for it before its
        first attempt (text, CRLF line ends; C{""} when no key applied), sent
        in front of the stored bytes on every attempt; L{None} before
        signing, or when the daemon does not sign.
    @ivar size: bytes of the message after the envelope line when the store
        knows it (pickup and load set it), else L{None}; not stored.
    @ivar lease: the lease under which this store's owner holds the entry,
        when the store hands out leases; not stored in the state JSON.
    """

    qid: str
    sender: str
    arrival: float
    body_offset: int
    origin: str = "mailout"
    recipients: list[RecipientStatus] = field(default_factory=list)
    bounced_reported: list[str] = field(default_factory=list)
    delay_warned: bool = False
    eightbit: bool = False
    held: bool = False
    held_since: float | None = None
    held_total: float = 0.0
    dkim: str | None = None
    size: int | None = field(default=None, compare=False)
    lease: Lease | None = field(default=None, compare=False)

    @classmethod
    def pending(cls, qid: str, line: EnvelopeLine) -> QueueEntry:
        """A newly queued entry: every recipient of C{line} pending.

        @param qid: its queue id.
        @param line: its decoded L{EnvelopeLine}.
        """
        return cls(qid=qid, sender=line.sender, arrival=line.arrival, body_offset=line.length,
                   origin=line.origin, recipients=[RecipientStatus(a) for a in line.recipients],
                   eightbit=line.eightbit)

    @property
    def done(self) -> bool:
        """Every recipient is delivered or bounced."""
        return all(r.state in FINAL_STATES for r in self.recipients)

    def due(self, now: float) -> list[RecipientStatus]:
        """Recipients to try at time C{now} (pending, or deferred and due);
        none while the entry is held."""
        if self.held:
            return []
        out = []
        for r in self.recipients:
            if r.state is RecipientState.PENDING or (
                r.state is RecipientState.DEFERRED and (r.next_attempt or 0) <= now
            ):
                out.append(r)
        return out

    def next_attempt(self) -> float | None:
        """The earliest time a recipient needs an attempt, or L{None} when
        none does (or the entry is held). Pending recipients count as due at
        C{arrival}."""
        if self.held:
            return None
        times = []
        for r in self.recipients:
            if r.state is RecipientState.PENDING:
                times.append(self.arrival)
            elif r.state is RecipientState.DEFERRED:
                times.append(r.next_attempt or 0.0)
        return min(times) if times else None

    @property
    def lifetime_start(self) -> float:
        """The arrival time as the queue lifetime sees it: C{arrival} moved
        later by the time spent on hold."""
        return self.arrival + self.held_total

    def hold(self, now: float) -> bool:
        """Put on hold at C{now}. @return: C{False} when it already was."""
        if self.held:
            return False
        self.held, self.held_since = True, now
        return True

    def release(self, now: float) -> bool:
        """Take off hold at C{now}: the time held stops counting towards the
        lifetime and every deferred recipient is due at once.

        @return: C{False} when it was not held.
        """
        if not self.held:
            return False
        self.held_total += max(0.0, now - (self.held_since or now))
        self.held, self.held_since = False, None
        for r in self.recipients:
            if r.state is RecipientState.DEFERRED:
                r.next_attempt = now
        return True

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (see docs/queue-format.md)."""
        d = self._base_json()
        if self.held:
            d["held"] = True
            d["held_since"] = self.held_since
        if self.held_total:
            d["held_total"] = self.held_total
        if self.dkim is not None:
            d["dkim"] = self.dkim
        return d

    def _base_json(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "qid": self.qid,
            "sender": self.sender,
            "arrival": self.arrival,
            "body_offset": self.body_offset,
            "origin": self.origin,
            "recipients": [r.to_json() for r in self.recipients],
            "bounced_reported": self.bounced_reported,
            "delay_warned": self.delay_warned,
            "8bit": self.eightbit,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QueueEntry:
        """Inverse of L{to_json}.

        @raise CorruptEntry: for anything malformed.
        """
        try:
            if d.get("v") != FORMAT_VERSION:
                raise ValueError(f"unknown state format version {d.get('v')!r}")
            entry = cls(
                qid=str(d["qid"]),
                sender=str(d["sender"]),
                arrival=float(d["arrival"]),
                body_offset=int(d["body_offset"]),
                origin=str(d.get("origin", "mailout")),
                recipients=[RecipientStatus.from_json(r) for r in d["recipients"]],
                bounced_reported=[str(a) for a in d.get("bounced_reported", [])],
                delay_warned=bool(d.get("delay_warned", False)),
                eightbit=bool(d.get("8bit", False)),
                held=bool(d.get("held", False)),
                held_since=(float(d["held_since"]) if d.get("held_since") is not None
                            else None),
                held_total=float(d.get("held_total", 0.0)),
                dkim=str(d["dkim"]) if d.get("dkim") is not None else None,
            )
            if not entry.recipients:
                raise ValueError("no recipients")
            validate_envelope(entry.sender, [r.address for r in entry.recipients])
            return entry
        except CorruptEntry:
            raise
        except Exception as e:
            raise CorruptEntry(f"malformed state: {e!r}") from e


class Pickup(NamedTuple):
    """What one L{IQueueStore.pickup} call found (unpacks as
    C{(entries, problems)}).

    @ivar entries: entries now held by this store's owner, every recipient
        pending (new mail) or as last saved (an entry taken over from an owner
        whose lease expired), each with C{size} set.
    @ivar problems: one human-readable line per file or row set aside
        (quarantined, unreadable).
    """

    entries: list[QueueEntry]
    problems: list[str]


class Recovery(NamedTuple):
    """What L{IQueueStore.recover} found at start (unpacks as
    C{(due, problems, on_hold)}).

    @ivar due: C{(qid, when)} per active entry now held by this owner, with
        C{when} its next attempt (seconds since the epoch) or L{None} for
        "now" (never tried: its state is its envelope).
    @ivar problems: one human-readable line per repair made.
    @ivar on_hold: queue ids of the entries on hold (in no schedule until
        the operator releases them).
    """

    due: list[tuple[str, float | None]]
    problems: list[str]
    on_hold: list[str] = []  # a NamedTuple default: never mutated


@dataclass(frozen=True, slots=True)
class ListedEntry:
    """One message as listed for C{mailout queue list} and administration.

    @ivar entry: the entry (read-only copy: changing it changes nothing).
    @ivar where: C{"incoming"} (not yet picked up) or C{"active"}.
    @ivar name: the store's name for an incoming message (C{"new/NAME"} in the
        folder store), else L{None}.
    @ivar owner: the owner id holding its lease, L{None} when none does or the
        store has no leases.
    """

    entry: QueueEntry
    where: str
    name: str | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Suspension:
    """A destination the operator suspended: its mail stays queued and is
    not attempted until C{until} or until cancelled (KumoMTA's admin
    C{suspend/v1}). Attempts are not counted meanwhile; queue lifetimes keep
    running.

    @ivar id: the suspension's id (what cancelling names).
    @ivar domain: the recipient domain suspended, lower case, A-label form
        as given.
    @ivar reason: the operator's reason, for logs and the status page.
    @ivar created: when it was made, seconds since the epoch.
    @ivar until: when it ends by itself, seconds since the epoch.
    """

    id: str
    domain: str
    reason: str
    created: float
    until: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the store's form and the API's)."""
        return {"id": self.id, "domain": self.domain, "reason": self.reason,
                "created": self.created, "until": self.until}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Suspension:
        """Inverse of L{to_json}. @raise ValueError, KeyError, TypeError: malformed."""
        return cls(str(d["id"]), str(d["domain"]), str(d["reason"]), float(d["created"]),
                   float(d["until"]))
