"""One outcome vocabulary: a L{Status} and a per-recipient L{RecipientResult}.

Every place that says what happened to a recipient uses these: the daemon's
scheduler (its observers and its C{twisted_mailout.outcome} log events), the
L{SMTPClient<twisted_mailout.api.SMTPClient>} report (L{DeliveryReport}), the
application deliveries and the mailer's events.

A L{RecipientResult} also unpacks as C{(recipient, code, text)}, the shape of
the per-address results of Twisted's C{twisted.mail.smtp.sendmail()}, so code
written against Twisted's client moves over unchanged::

    for address, code, text in report:
        ...

The daemon's Postfix-style log line keeps Postfix's words (C{status=sent});
L{Status.log_word} is the one place that translates.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted_mailout.envelope import Reply

__all__ = ["DeliveryReport", "RecipientResult", "Status"]


class Status(enum.StrEnum):
    """What happened to one recipient. A C{str} enum: C{Status.DELIVERED ==
    "delivered"}, so code comparing with the words keeps working.

    - C{DELIVERED}: a server (or a local delivery) accepted it (2xx).
    - C{DEFERRED}: a temporary failure (4xx, or no server reached); the queue
      tries again later, a direct delivery does not.
    - C{BOUNCED}: a permanent failure (5xx): never tried again.
    - C{EXPIRED}: a bounce because the queue lifetime ran out while the
      recipient was still deferred.
    - C{QUEUED}: accepted into a mailout queue (applications only: the daemon
      then reports one of the others).
    """

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    QUEUED = "queued"

    @classmethod
    def of_reply(cls, reply: Reply) -> Status:
        """The status one reply gives (RFC 5321 4.2.1): 2xx L{DELIVERED},
        5xx L{BOUNCED}, anything else L{DEFERRED}.

        @param reply: a L{Reply}.
        """
        if reply.is_positive:
            return cls.DELIVERED
        return cls.BOUNCED if reply.is_permanent else cls.DEFERRED

    @classmethod
    def parse(cls, word: str) -> Status:
        """The status a word names; the daemon's log word C{"sent"} (used in
        the C{outcome} log field before this vocabulary) is L{DELIVERED}.

        @param word: C{"delivered"}, C{"sent"}, C{"deferred"}, C{"bounced"},
            C{"expired"} or C{"queued"}, or a L{Status}.
        @raise ValueError: another word.
        """
        if word == "sent":
            return cls.DELIVERED
        try:
            return cls(word)
        except ValueError:
            raise ValueError(f"unknown outcome status {word!r}; one of "
                             f"{', '.join(s.value for s in cls)}") from None

    @property
    def log_word(self) -> str:
        """The word of the daemon's Postfix-style log line (C{status=...}):
        C{sent}, C{deferred}, C{bounced} (an expired recipient was bounced
        too) or C{queued}. The only translation to Postfix's wording."""
        return _LOG_WORDS[self]

    @property
    def category(self) -> Status:
        """The status as the mailer's event classes group it: L{EXPIRED} is a
        kind of L{BOUNCED}; the others are themselves."""
        return Status.BOUNCED if self is Status.EXPIRED else self

    @property
    def is_final(self) -> bool:
        """Nothing more will happen to the recipient (delivered, bounced or
        expired)."""
        return self in (Status.DELIVERED, Status.BOUNCED, Status.EXPIRED)


_LOG_WORDS = {
    Status.DELIVERED: "sent",
    Status.DEFERRED: "deferred",
    Status.BOUNCED: "bounced",
    Status.EXPIRED: "bounced",
    Status.QUEUED: "queued",
}


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome.

    Unpacks (and indexes) as C{(recipient, code, text)}, like the
    per-address tuples of C{twisted.mail.smtp.sendmail()}'s result.

    @ivar recipient: the envelope recipient (RFC 5321 C{RCPT TO}) as given.
    @ivar status: the L{Status}.
    @ivar code: the SMTP reply code (RFC 5321 4.2.3), or a locally made one.
    @ivar text: the reply text without the code (with the RFC 3463 enhanced
        status code when known); lines joined by C{"\\n"}.
    @ivar relay: C{"host[ip]:port"} of the server that answered, or L{None}
        when none did (DNS failure, nothing reachable, a local delivery).
    @ivar local: C{True} when no server gave the reply (DNS, connection,
        timeout, a local delivery or command).
    @ivar queue_id: the queue id (daemon) or message id (applications), or
        L{None} (a direct C{sendmail()}).
    @ivar attempts: delivery attempts so far (1 for direct delivery).
    @ivar delay: seconds since the message arrived in the queue, or L{None}.
    """

    recipient: str
    status: Status
    code: int
    text: str
    relay: str | None = None
    local: bool = False
    queue_id: str | None = None
    attempts: int = 1
    delay: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):
            object.__setattr__(self, "status", Status.parse(self.status))

    @classmethod
    def from_reply(cls, recipient: str, reply: Reply, status: Status | str | None = None,
                   **fields: Any) -> RecipientResult:
        """The result a reply gives.

        @param recipient: the envelope recipient.
        @param reply: the L{Reply}.
        @param status: the L{Status}; L{Status.of_reply} when L{None}.
        @param fields: C{relay}, C{queue_id}, C{attempts}, C{delay}.
        """
        st = Status.of_reply(reply) if status is None else Status.parse(status)
        return cls(recipient, st, reply.code, reply.text, local=reply.local, **fields)

    # -- twisted.mail.smtp.sendmail()'s shape -------------------------------

    def __iter__(self) -> Iterator[Any]:
        return iter((self.recipient, self.code, self.text))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        return (self.recipient, self.code, self.text)[index]

    # -- derived ----------------------------------------------------------

    @property
    def reply(self) -> Reply:
        """The L{Reply} (code, text, local)."""
        return Reply(self.code, self.text, self.local)

    @property
    def enhanced_status(self) -> str:
        """The RFC 3463 enhanced status code, e.g. C{"5.1.1"}: from the reply
        text when the server gave one (RFC 2034), else from the code."""
        return self.reply.enhanced_status

    @property
    def qid(self) -> str | None:
        """L{queue_id} under the name the daemon's log events use."""
        return self.queue_id

    @property
    def delivered(self) -> bool:
        """The status is L{Status.DELIVERED}."""
        return self.status is Status.DELIVERED

    def log_fields(self) -> dict[str, Any]:
        """The stable fields of the daemon's outcome log event (namespace
        C{twisted_mailout.outcome}):

          - C{qid}, C{recipient};
          - C{outcome}: the L{Status} value (C{delivered}, C{deferred},
            C{bounced}, C{expired}, C{queued});
          - C{event}: its L{Status.category} (C{expired} is C{bounced});
          - C{status}: the Postfix word of the log line (L{Status.log_word});
          - C{code}, C{dsn} (enhanced status), C{reply} (code and text on one
            line), C{relay} (C{"none"} when none), C{delay} (seconds),
            C{attempts}, C{local}.
        """
        reply = self.reply
        return {"qid": self.queue_id, "recipient": self.recipient,
                "outcome": self.status.value, "event": self.status.category.value,
                "status": self.status.log_word, "code": self.code,
                "dsn": reply.enhanced_status, "reply": reply.one_line(),
                "relay": self.relay or "none", "delay": self.delay,
                "attempts": self.attempts, "local": self.local}


@dataclass(frozen=True)
class DeliveryReport:
    """What a direct delivery did, per recipient, in the order given.

    Iterating gives the L{RecipientResult}s (each unpacking as
    C{(recipient, code, text)}); C{report["a@example.org"]} finds one.

    @ivar results: C{list[RecipientResult]}, one per recipient.
    """

    results: list[RecipientResult]

    def __getitem__(self, recipient: str) -> RecipientResult:
        for r in self.results:
            if r.recipient == recipient:
                return r
        raise KeyError(recipient)

    def __iter__(self) -> Iterator[RecipientResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    @property
    def all_delivered(self) -> bool:
        """Every recipient got a 2xx reply."""
        return all(r.status is Status.DELIVERED for r in self.results)

    @property
    def accepted(self) -> int:
        """How many recipients were delivered (the C{numOk} of
        C{twisted.mail.smtp.sendmail()}'s result)."""
        return sum(1 for r in self.results if r.status is Status.DELIVERED)

    def with_status(self, *statuses: Status | str) -> list[RecipientResult]:
        """The results with one of C{statuses}, in order.

        @param statuses: L{Status} members or their words.
        """
        wanted = {Status.parse(s) for s in statuses}
        return [r for r in self.results if r.status in wanted]


def results_from_replies(replies: Iterable[tuple[str, Reply]], relay: str | None = None,
                         **fields: Any) -> list[RecipientResult]:
    """One L{RecipientResult} per C{(recipient, reply)}, statuses from the
    replies (L{Status.of_reply}).

    @param replies: C{(recipient, Reply)} pairs.
    @param relay: C{"host[ip]:port"} that gave them, or L{None}.
    """
    return [RecipientResult.from_reply(r, reply, relay=relay, **fields) for r, reply in replies]
