"""Which messages an operator's action applies to (a SELECTOR).

A selector is queue ids (given, or read one a line from standard input with
C{-}), C{ALL}, or filters that combine (all must match): C{--domain},
C{--sender}, C{--recipient}, C{--state}, C{--older-than SECONDS}. Ids and
filters combine too (an id is selected when it also matches the filters).
Pure: no store, no clock (the caller gives C{now}).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted_mailout.envelope import FINAL_STATES
from twisted_mailout.errors import MailoutError
from twisted_mailout.queue.model import QueueEntry, is_safe_qid

__all__ = ["QUEUE_NAMES", "Selector", "SelectorError"]

#: The queue names an entry is listed under (Postfix's, as C{postqueue -j}).
QUEUE_NAMES = ("incoming", "active", "deferred", "hold")


class SelectorError(MailoutError, ValueError):
    """A malformed selector: an unknown filter value, a bad queue id, nothing
    selected where an action needs a selection (the API answers 400)."""


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


@dataclass(frozen=True)
class Selector:
    """Which messages an action applies to.

    @ivar ids: queue ids given (empty: no id restriction).
    @ivar all: C{ALL} was given: every message.
    @ivar domain: a recipient domain (any case; C{example.com} matches only
        that domain, C{.example.com} its subdomains too): messages with an
        unfinished recipient there.
    @ivar sender: an envelope sender address (any case), C{@domain} for any
        sender at that domain, or C{<>} for the null sender.
    @ivar recipient: a recipient address (any case).
    @ivar state: one of L{QUEUE_NAMES}.
    @ivar older_than: seconds: messages that arrived at least this long ago.
    """

    ids: tuple[str, ...] = ()
    all: bool = False
    domain: str | None = None
    sender: str | None = None
    recipient: str | None = None
    state: str | None = None
    older_than: float | None = None

    def __post_init__(self) -> None:
        for qid in self.ids:
            if not is_safe_qid(qid):
                raise SelectorError(f"not a queue id: {qid!r} (1 to 64 letters and digits)")
        if self.state is not None and self.state not in QUEUE_NAMES:
            raise SelectorError(f"unknown --state {self.state!r}: one of "
                                + ", ".join(QUEUE_NAMES))
        if self.older_than is not None and not (math.isfinite(self.older_than)
                                                and self.older_than >= 0):
            raise SelectorError(f"--older-than takes seconds >= 0, not {self.older_than!r}")
        for name in ("domain", "sender", "recipient"):
            v = getattr(self, name)
            if v is not None and (not v.strip() or any(c in v for c in "\r\n\0")):
                raise SelectorError(f"--{name} needs a value without line breaks")
        if self.all and self.ids:
            raise SelectorError("give queue ids or ALL, not both")

    @property
    def has_filters(self) -> bool:
        """Any of the filters is given."""
        return any(v is not None for v in (self.domain, self.sender, self.recipient,
                                           self.state, self.older_than))

    @property
    def is_empty(self) -> bool:
        """Nothing given at all (an action then refuses: see L{require})."""
        return not (self.ids or self.all or self.has_filters)

    def require(self, action: str) -> None:
        """Refuse an empty selector for C{action}.

        @raise SelectorError: nothing was selected.
        """
        if self.is_empty:
            raise SelectorError(f"{action}: say which messages: queue ids, '-' (ids on "
                                "standard input), ALL, or filters (--domain, --sender, "
                                "--recipient, --state, --older-than)")

    def matches(self, entry: QueueEntry, queue_name: str, now: float) -> bool:
        """Does the message match the filters? (Ids are checked by the caller,
        which also needs to report unknown ones.)

        @param entry: the message.
        @param queue_name: the queue it is listed under (L{QUEUE_NAMES}).
        @param now: seconds since the epoch.
        """
        if self.state is not None and queue_name != self.state:
            return False
        if self.older_than is not None and now - entry.arrival < self.older_than:
            return False
        if self.sender is not None:
            want = self.sender.strip().lower()
            have = entry.sender.lower()
            if want in ("<>", '""', "''"):
                if have:
                    return False
            elif want.startswith("@"):
                if _domain(have) != want[1:].rstrip(".") or not have:
                    return False
            elif have != want.strip("<>"):
                return False
        if self.recipient is not None:
            want = self.recipient.strip().strip("<>").lower()
            if not any(r.address.lower() == want for r in entry.recipients):
                return False
        if self.domain is not None:
            want = self.domain.strip().lower().rstrip(".")
            open_ = [r for r in entry.recipients if r.state not in FINAL_STATES]
            if want.startswith("."):
                ok = any(_domain(r.address) == want[1:] or _domain(r.address).endswith(want)
                         for r in open_)
            else:
                ok = any(_domain(r.address) == want for r in open_)
            if not ok:
                return False
        return True

    @classmethod
    def parse(cls, words: Iterable[str] = (), stdin: Iterable[str] | None = None,
              **filters: Any) -> Selector:
        """Build a selector from the command line's words and filters.

        @param words: queue ids, C{"-"} (read ids from C{stdin}) or C{"ALL"}.
        @param stdin: lines of standard input, for C{-} (blank lines and
            C{#} comments skipped; a line may also be a JSON object of
            C{list --json} with its C{queue_id}).
        @param filters: C{domain}, C{sender}, C{recipient}, C{state},
            C{older_than} (L{None} when not given).
        @return: the L{Selector}.
        @raise SelectorError: a malformed word, id or filter.
        """
        ids: list[str] = []
        everything = False
        for w in words:
            if w == "ALL":
                everything = True
            elif w == "-":
                if stdin is None:
                    raise SelectorError("'-' reads queue ids from standard input, "
                                        "which is not available here")
                ids.extend(_ids_from_lines(stdin))
            else:
                ids.append(w)
        unknown = set(filters) - {"domain", "sender", "recipient", "state", "older_than"}
        if unknown:
            raise SelectorError("unknown filter " + ", ".join(sorted(unknown)))
        older = filters.get("older_than")
        if older is not None and not isinstance(older, int | float):
            try:
                older = float(older)
            except (TypeError, ValueError):
                raise SelectorError(f"--older-than takes seconds, not {older!r}") from None
        return cls(ids=tuple(dict.fromkeys(ids)), all=everything,
                   domain=filters.get("domain"), sender=filters.get("sender"),
                   recipient=filters.get("recipient"), state=filters.get("state"),
                   older_than=older)

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Selector:
        """A selector from the API's JSON: C{{"ids": [...], "all": bool,
        "domain": ..., "sender": ..., "recipient": ..., "state": ...,
        "older_than": seconds}} (every key optional).

        @raise SelectorError: not an object, an unknown key or a bad value.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise SelectorError("the selector must be a JSON object")
        unknown = set(d) - {"ids", "all", "domain", "sender", "recipient", "state",
                            "older_than"}
        if unknown:
            raise SelectorError("unknown selector key " + ", ".join(sorted(unknown)))
        ids = d.get("ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise SelectorError("ids must be a list of queue ids")
        for key in ("domain", "sender", "recipient", "state"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise SelectorError(f"{key} must be a string")
        older = d.get("older_than")
        if older is not None and (isinstance(older, bool)
                                  or not isinstance(older, int | float)):
            raise SelectorError("older_than must be a number of seconds")
        all_ = d.get("all", False)
        if not isinstance(all_, bool):
            raise SelectorError("all must be true or false")
        return cls(ids=tuple(dict.fromkeys(ids)), all=all_, domain=d.get("domain"),
                   sender=d.get("sender"), recipient=d.get("recipient"),
                   state=d.get("state"), older_than=older)

    def to_json(self) -> dict[str, Any]:
        """The API's JSON form (inverse of L{from_json}); unset keys left out."""
        out: dict[str, Any] = {}
        if self.ids:
            out["ids"] = list(self.ids)
        if self.all:
            out["all"] = True
        for key in ("domain", "sender", "recipient", "state", "older_than"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _ids_from_lines(lines: Iterable[str]) -> list[str]:
    out = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                qid = json.loads(line)["queue_id"]
            except (ValueError, KeyError, TypeError):
                raise SelectorError(f"not a queue id or a list --json line: {line[:60]!r}") \
                    from None
            out.append(str(qid))
        else:
            out.extend(line.split())
    return out
