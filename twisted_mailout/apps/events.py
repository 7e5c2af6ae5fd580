"""The outcome events applications observe: one L{MailEvent} per recipient.

L{MailQueued} (accepted into the queue), L{MailDelivered}, L{MailDeferred}
(temporary failure) and L{MailBounced} (permanent failure, or given up). The
daemon's per-recipient outcomes and the results of L{twisted_mailout.sendmail}
are the same L{RecipientResult<twisted_mailout.outcome.RecipientResult>}s (one
L{Status} vocabulary); they convert with L{event_from_outcome} and
L{event_from_result}, the daemon's log events with L{event_from_log}.
L{Observers} calls observers; an observer that raises is logged and skipped.

The names are documented under L{twisted_mailout.apps.mailer}, which
re-exports them; they live here so that send-on-commit
(L{twisted_mailout.apps.txn}) can report outcomes without importing the mailer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.logger import Logger

from twisted_mailout.envelope import Reply
from twisted_mailout.outcome import RecipientResult, Status

__all__ = [
    "EVENT_TYPES",
    "OUTCOME_NAMESPACE",
    "MailBounced",
    "MailDeferred",
    "MailDelivered",
    "MailEvent",
    "MailQueued",
    "Observer",
    "Observers",
    "event_from_log",
    "event_from_outcome",
    "event_from_result",
    "log_observer",
    "make_event",
    "outcome_observer",
]

log = Logger()

#: An outcome observer: called with each L{MailEvent}; what it returns is ignored.
Observer = Callable[["MailEvent"], object]


@dataclass(frozen=True)
class MailEvent:
    """One recipient's outcome (a base class: see its four subclasses).

    @ivar queue_id: the queue id, or the message id a delivery returned.
    @ivar recipient: the envelope recipient.
    @ivar code: the SMTP reply code (RFC 5321 4.2.3), or a locally made one.
    @ivar text: the reply text (with the RFC 3463 enhanced code when known).
    @ivar sender: the envelope sender (C{""}: null sender), or L{None} if unknown.
    @ivar relay: C{"host[ip]:port"} that answered, or L{None}.
    @ivar local: C{True} when no server gave the reply (DNS, connection,
        timeout, a local delivery or command).
    @ivar will_retry: C{True} when the daemon will try this recipient again
        (a deferred recipient of the queue); C{False} for a direct delivery's
        deferred result, which nobody retries.
    @ivar attempts: delivery attempts so far (1 for direct delivery).
    @ivar delay: seconds since the message arrived, or L{None}.
    @ivar expired: a bounce because the queue lifetime ran out.
    @ivar source: who reported it: C{"daemon"}, or the delivery's URL.
    @cvar status: the event's L{Status}: C{QUEUED}, C{DELIVERED}, C{DEFERRED}
        or C{BOUNCED} (an expired recipient is a C{BOUNCED} event with
        C{expired}; L{result} says C{EXPIRED}). It equals its word
        (C{event.status == "bounced"}).
    """

    status: ClassVar[Status]
    queue_id: str
    recipient: str
    code: int
    text: str
    sender: str | None = None
    relay: str | None = None
    local: bool = False
    will_retry: bool = False
    attempts: int = 1
    delay: float | None = None
    expired: bool = False
    source: str = ""

    @property
    def reply(self) -> Reply:
        """The L{Reply} (code, text, local)."""
        return Reply(self.code, self.text, self.local)

    @property
    def enhanced_status(self) -> str:
        """The RFC 3463 status code, e.g. C{"5.1.1"}."""
        return self.reply.enhanced_status

    @property
    def result(self) -> RecipientResult:
        """The event as the package's one per-recipient result
        (L{twisted_mailout.outcome.RecipientResult}; status C{EXPIRED} for an
        expired bounce)."""
        return RecipientResult(self.recipient, Status.EXPIRED if self.expired else self.status,
                               self.code, self.text, self.relay, self.local, self.queue_id,
                               self.attempts, self.delay)

    def log_fields(self) -> dict[str, Any]:
        """The fields of a C{twisted.logger} event, named as the daemon names
        them (namespace C{twisted_mailout.outcome}; see
        L{RecipientResult.log_fields}): C{qid}, C{recipient}, C{outcome} (the
        L{Status}: C{delivered}, C{deferred}, C{bounced}, C{expired},
        C{queued}), C{event} (the same with C{expired} as C{bounced}),
        C{status} (the Postfix word of the daemon's log line: C{sent} ...),
        C{code}, C{dsn}, C{reply} (one line), C{relay} (C{"none"} when none),
        C{delay}, C{attempts}, C{local}; and C{sender}, C{will_retry}, C{source}."""
        return {**self.result.log_fields(), "sender": self.sender,
                "will_retry": self.will_retry, "source": self.source}


@dataclass(frozen=True)
class MailQueued(MailEvent):
    """Accepted into a mailout queue; the daemon will report what follows."""

    status: ClassVar[Status] = Status.QUEUED


@dataclass(frozen=True)
class MailDelivered(MailEvent):
    """Delivered: a server (or a local delivery) accepted it (2xx)."""

    status: ClassVar[Status] = Status.DELIVERED


@dataclass(frozen=True)
class MailDeferred(MailEvent):
    """A temporary failure (4xx, or no server reached)."""

    status: ClassVar[Status] = Status.DEFERRED


@dataclass(frozen=True)
class MailBounced(MailEvent):
    """A permanent failure (5xx), or given up (C{expired})."""

    status: ClassVar[Status] = Status.BOUNCED


#: The event class of each event status (C{Status.EXPIRED} is a L{MailBounced}).
EVENT_TYPES: dict[Status, type[MailEvent]] = {
    c.status: c for c in (MailQueued, MailDelivered, MailDeferred, MailBounced)}


def make_event(status: Status | str, **fields: Any) -> MailEvent:
    """Build the event class for C{status}: a L{Status} or its word
    (C{queued}, C{delivered}, C{deferred}, C{bounced}, C{expired}; the
    daemon's old log word C{sent} too). C{expired} makes an expired
    L{MailBounced}.

    @raise ValueError: an unknown status.
    """
    st = Status.parse(status)
    if st is Status.EXPIRED:
        fields["expired"] = True
    return EVENT_TYPES[st.category](**fields)


def _event(result: RecipientResult, queue_id: str | None, sender: str | None,
           source: str, will_retry: bool) -> MailEvent:
    return make_event(result.status, queue_id=queue_id, recipient=result.recipient,
                      code=result.code, text=result.text, sender=sender,
                      relay=result.relay if result.relay != "none" else None,
                      local=result.local, will_retry=will_retry, attempts=result.attempts,
                      delay=result.delay, source=source)


def event_from_outcome(outcome: RecipientResult, sender: str | None = None) -> MailEvent:
    """The event for one of the daemon's outcomes (the L{RecipientResult}s
    the scheduler gives its observers).

    C{delivered} becomes L{MailDelivered}; C{deferred} L{MailDeferred} (with
    C{will_retry}); C{bounced} and C{expired} L{MailBounced}.

    @param outcome: a L{RecipientResult} with its C{queue_id}, C{attempts}
        and C{delay}.
    @param sender: the envelope sender when the caller knows it.
    """
    return _event(outcome, outcome.queue_id, sender, "daemon",
                  outcome.status is Status.DEFERRED)


OUTCOME_NAMESPACE = "twisted_mailout.outcome"
_OUTCOME_KEYS = frozenset({"qid", "recipient", "event", "outcome", "code", "dsn", "reply"})


def event_from_log(event: dict[str, Any]) -> MailEvent | None:
    """The L{MailEvent} of a daemon's C{twisted.logger} outcome event
    (namespace C{twisted_mailout.outcome}), or L{None} for any other event.

    @param event: a C{twisted.logger} event dict.
    @raise ValueError: an outcome event with an unknown status.
    """
    # Recognised by namespace, or by the daemon's fields (a namespace given
    # as a keyword to Logger.emit is replaced by the logger's own).
    if event.get("log_namespace") != OUTCOME_NAMESPACE and not event.keys() >= _OUTCOME_KEYS:
        return None
    if "qid" not in event or "recipient" not in event:
        return None
    code = int(event.get("code", 0))
    reply = str(event.get("reply", ""))
    text = reply[len(str(code)):].strip() if reply.startswith(str(code)) else reply
    relay = event.get("relay")
    status = Status.parse(str(event.get("outcome") or event.get("event") or ""))
    return make_event(status, queue_id=event["qid"], recipient=event["recipient"],
                      code=code, text=text, sender=event.get("sender"),
                      relay=None if relay in (None, "none") else relay,
                      local=bool(event.get("local", False)),
                      will_retry=status is Status.DEFERRED,
                      attempts=int(event.get("attempts", 1)),
                      delay=event.get("delay"), source="daemon")


def log_observer(observer: Callable[[MailEvent], object]) -> Callable[[dict[str, Any]], None]:
    """A C{twisted.logger} observer that gives C{observer} a L{MailEvent}
    for each outcome the daemon logs (and ignores every other event):
    C{globalLogPublisher.addObserver(log_observer(watch))}. Errors of
    C{observer} are dropped, as the log system requires."""

    def on_log(event: dict[str, Any]) -> None:
        try:
            mail_event = event_from_log(event)
        except (KeyError, ValueError, TypeError):
            return
        if mail_event is not None:
            try:
                observer(mail_event)
            except Exception:  # noqa: BLE001, S110 - a log observer must not raise
                pass

    on_log.__wrapped__ = observer  # type: ignore[attr-defined]
    return on_log


def event_from_result(queue_id: str, result: RecipientResult, sender: str | None = None,
                      source: str = "") -> MailEvent:
    """The event for one L{RecipientResult} of a direct delivery (nothing
    retries it: C{will_retry} is C{False}).

    @param queue_id: the message id the mailer gave the message.
    @param result: a L{RecipientResult} from a L{DeliveryReport}.
    """
    return _event(result, queue_id, sender, source, False)


class Observers:
    """A list of callables that receive L{MailEvent}s. An observer that
    raises is logged (C{twisted.logger}) and skipped; it never breaks delivery
    nor stops the other observers. Thread-safe."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._lock = threading.Lock()
        self._list = list(observers)

    def add(self, observer: Observer) -> None:
        """Register C{observer(event)}. @raise TypeError: not callable."""
        if not callable(observer):
            raise TypeError(f"an observer must be callable, not {type(observer).__name__}")
        with self._lock:
            self._list.append(observer)

    def remove(self, observer: Observer) -> None:
        """Unregister C{observer}. @raise ValueError: it was not registered."""
        with self._lock:
            self._list.remove(observer)

    def __len__(self) -> int:
        return len(self._list)

    def notify(self, event: MailEvent) -> None:
        """Give C{event} to every observer; exceptions are logged, not raised."""
        with self._lock:
            observers = list(self._list)
        for obs in observers:
            try:
                obs(event)
            except Exception:  # noqa: BLE001 - observers never break delivery
                log.failure("mail outcome observer {observer!r} failed on {event!r}",
                            observer=obs, event=event)


def outcome_observer(observer: Observer) -> Callable[[RecipientResult], None]:
    """Adapt C{observer(MailEvent)} to the daemon's C{observers} argument
    (L{twisted_mailout.daemon.service.DeliveryService}), which gives
    L{RecipientResult}s: C{DeliveryService(config, observers=[outcome_observer(f)])}.
    """

    def adapted(outcome: RecipientResult) -> None:
        observer(event_from_outcome(outcome))

    adapted.__wrapped__ = observer  # type: ignore[attr-defined]
    return adapted
