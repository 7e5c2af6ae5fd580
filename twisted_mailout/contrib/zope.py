"""Zope and Plone: zope.sendmail's C{IMailer} over a twisted_mailout delivery.

zope.sendmail's deliveries (C{DirectMailDelivery}, and the queue processor
of C{QueuedMailDelivery}) hand each message to an C{IMailer} utility, which
its C{mail:smtpMailer} directive makes an C{smtplib} client. L{MailoutMailer}
is an C{IMailer} that hands the message to any twisted_mailout delivery
instead (C{queue:///var/spool/mailout}, C{smtp://relay}, C{maildir://},
...), chosen by URL (L{twisted_mailout.apps.deliveries}), and dispatches a
L{MailSentEvent} or a L{MailErrorEvent} through C{zope.event} for every
message it sends or fails to send.

Register it in ZCML with this package's directive (C{zope.zcml} here)::

    <include package="twisted_mailout.contrib" file="zope.zcml" />
    <mailout:mailer name="mailout" delivery="queue:///var/spool/mailout" />
    <mail:directDelivery name="Mail" mailer="mailout" />

(C{xmlns:mailout="http://namespaces.twisted-mailout.org/mailout"}), or as
a plain C{<utility component="..." provides="zope.sendmail.interfaces.IMailer"
name="mailout" />} of an instance made in Python.

Two-phase commit with C{DirectMailDelivery} (which calls C{vote} in the
transaction's vote and C{send} after it committed; C{abort} when it is
aborted): for a C{queue://} delivery the vote writes the message into the
queue's C{tmp/} and makes it durable, C{send} makes it visible to the daemon,
C{abort} removes it, so a vote that succeeded means the mail will go out,
and an aborted transaction sends nothing. For other deliveries the vote
validates the envelope and the message (a bad address aborts the
transaction) and C{send} delivers; its failures are events (and, as
C{smtplib}'s, exceptions that zope.sendmail logs), never a failed commit.

The events: zope.sendmail 4.0 deleted its never-emitted C{IMailSentEvent} and
C{IMailErrorEvent} (and C{zope.sendmail.events}); this module defines them
again with their old shape (C{messageId}, and C{errorMessage} for an
error), so subscribers written for them work, and adds what happened to each
recipient (C{results}). Where an installed zope.sendmail still defines those
interfaces, the events provide them too.
"""

from __future__ import annotations

import email.parser
import smtplib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

try:  # the optional extra: say which, not just what is missing
    import zope.event
    import zope.sendmail.interfaces as _zs
except ImportError as _e:  # pragma: no cover - the extra is installed in tests
    raise ImportError("twisted_mailout.contrib.zope needs zope.sendmail, zope.component and "
                      f"transaction: pip install 'twisted-mailout[zope]' ({_e})") from _e
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer
from zope.schema import TextLine
from zope.sendmail.interfaces import IMailer

from twisted_mailout.apps.deliveries import (
    Delivery,
    DeliveryError,
    DeliveryReport,
    QueueDelivery,
    get_delivery,
)
from twisted_mailout.apps.events import Observer
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.outcome import RecipientResult, Status
from twisted_mailout.queue.store import StagedMessage

__all__ = [
    "IMailErrorEvent",
    "IMailEvent",
    "IMailFailedEvent",
    "IMailSentEvent",
    "IMailoutMailerDirective",
    "MailErrorEvent",
    "MailFailedEvent",
    "MailSentEvent",
    "MailoutMailer",
    "MailoutSendError",
    "mailer_directive",
]

log = Logger()


class IMailEvent(Interface):
    """An event about one message (zope.sendmail 3's C{IMailEvent})."""

    messageId = Attribute("The Message-Id of the message, without angle brackets "
                          "(RFC 5322 3.6.4), as IMailDelivery.send returned it")


class IMailSentEvent(IMailEvent):
    """The message left this system: accepted by the relay or the
    recipients' servers, or into the mailout queue (C{queued}). A bounce
    may still come later."""


class IMailErrorEvent(IMailEvent):
    """The message, or some of its recipients, could not be sent."""

    errorMessage = Attribute("Why, one line per failed recipient (the reply)")


#: The name the issue and zope.sendmail's README use for the error event.
IMailFailedEvent = IMailErrorEvent


def _old(name: str) -> list[Any]:
    """zope.sendmail's own interface C{name}, where the installed version
    still has it (before 4.0)."""
    iface = getattr(_zs, name, None)
    return [iface] if iface is not None else []


@implementer(IMailSentEvent, *_old("IMailSentEvent"))
class MailSentEvent:
    """The message was sent (see L{IMailSentEvent}).

    @ivar messageId: the Message-Id without angle brackets (C{str}).
    @ivar sender: the envelope sender. @ivar recipients: C{list[str]}.
    @ivar results: a L{RecipientResult} per recipient.
    @ivar queued: C{True} when it went into a mailout queue (the daemon
        delivers it and reports through its own outcome events).
    """

    def __init__(self, messageId: str, *, sender: str = "",
                 recipients: Iterable[str] = (), results: Iterable[RecipientResult] = (),
                 queued: bool = False) -> None:
        self.messageId = messageId
        self.sender = sender
        self.recipients = list(recipients)
        self.results = list(results)
        self.queued = queued

    def __repr__(self) -> str:
        return f"<MailSentEvent {self.messageId!r} to {len(self.recipients)}>"


@implementer(IMailErrorEvent, *_old("IMailErrorEvent"))
class MailErrorEvent:
    """The message, or some recipients, could not be sent (see L{IMailErrorEvent}).

    @ivar messageId: the Message-Id without angle brackets.
    @ivar errorMessage: why (C{str}).
    @ivar sender: the envelope sender. @ivar recipients: C{list[str]}, all of them.
    @ivar results: a L{RecipientResult} per recipient (the delivered ones
        too, when only some failed).
    @ivar permanent: C{True} when no failed recipient can succeed later
        (5xx); C{False} when some failed for now (4xx, no server reached).
    """

    def __init__(self, messageId: str, errorMessage: str, *, sender: str = "",
                 recipients: Iterable[str] = (), results: Iterable[RecipientResult] = (),
                 permanent: bool = False) -> None:
        self.messageId = messageId
        self.errorMessage = errorMessage
        self.sender = sender
        self.recipients = list(recipients)
        self.results = list(results)
        self.permanent = permanent

    def __repr__(self) -> str:
        return f"<MailErrorEvent {self.messageId!r}: {self.errorMessage!r}>"


#: The issue's name for L{MailErrorEvent}.
MailFailedEvent = MailErrorEvent


class MailoutSendError(smtplib.SMTPResponseException):
    """L{MailoutMailer.send} failed for every recipient, some for now: an
    C{smtplib.SMTPResponseException} with the 4xx code, so zope.sendmail's
    queue processor keeps the message and tries again (a 5xx one would be
    moved aside; all recipients refused for good raise
    C{smtplib.SMTPRecipientsRefused}, as C{smtplib} does).

    @ivar smtp_code: the reply code. @ivar smtp_error: the text (C{bytes}).
    @ivar results: a L{RecipientResult} per recipient.
    """

    def __init__(self, code: int, text: str, results: Iterable[RecipientResult]) -> None:
        super().__init__(code, text.encode("utf-8", "replace"))
        self.results = list(results)


def _notify(event: object) -> None:
    """C{zope.event.notify}; a subscriber's exception is logged, never
    turned into a failed send (the mail went out: retrying would send it twice)."""
    try:
        zope.event.notify(event)
    except Exception:  # noqa: BLE001 - the subscriber's bug, not the mail's
        log.failure("a zope.event subscriber failed on {event!r}", event=event)


def _message_id(data: bytes) -> str | None:
    """The Message-Id of C{data} without angle brackets, or L{None}."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    value = email.parser.BytesHeaderParser().parsebytes(head + b"\n\n").get("Message-Id")
    if not value:
        return None
    value = str(value).strip()
    return value[1:-1] if value.startswith("<") and value.endswith(">") else value


@dataclass
class _Staged:
    """A message L{MailoutMailer.vote} wrote into a queue's C{tmp/}."""

    key: tuple[Any, ...]
    delivery: QueueDelivery
    staged: StagedMessage
    sender: str
    recipients: list[str]
    message_id: str


def _key(fromaddr: str, toaddrs: Iterable[str], message: bytes | str) -> tuple[Any, ...]:
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    return (fromaddr, tuple(toaddrs), data)


@implementer(IMailer)
class MailoutMailer:
    """zope.sendmail's C{IMailer} (C{send}, C{vote}, C{abort}) handing
    messages to a twisted_mailout delivery; see the module docstring.

    @param delivery: a delivery URL (C{"queue:///var/spool/mailout"},
        C{"smtp://user:password@relay:587"}, ...), a dict or a
        L{Delivery} (L{get_delivery}).
    @param observers: observers of the L{Mailer}'s per-recipient
        L{MailEvent<twisted_mailout.apps.events.MailEvent>}s, if you want
        them besides the C{zope.event} events.
    @ivar mailer: the L{Mailer} (non-transactional: zope.sendmail's
        delivery does the transaction).
    @raise ValueError, TypeError: a bad delivery configuration.
    """

    def __init__(self, delivery: str | dict[str, Any] | Delivery,
                 observers: Iterable[Observer] = ()) -> None:
        self.mailer = Mailer(get_delivery(delivery), observers=observers)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<MailoutMailer {self.mailer.delivery.url()}>"

    def _staged(self) -> list[_Staged]:
        staged = getattr(self._local, "staged", None)
        if staged is None:
            staged = self._local.staged = []
        return staged

    # -- IMailer ------------------------------------------------------------

    def vote(self, fromaddr: str, toaddrs: Iterable[str], message: bytes | str) -> None:
        """Raise when the message cannot be sent: a bad envelope or message.
        For a queue delivery, also write it into the queue's C{tmp/} and make
        it durable (L{send} publishes it, L{abort} removes it).

        @param fromaddr: the envelope sender. @param toaddrs: the recipients.
        @param message: the message (C{bytes}, or C{str} encoded as UTF-8).
        @raise AddressError, MessageError: bad input (the transaction aborts).
        @raise QueueError: the queue cannot be written or synced.
        """
        toaddrs = list(toaddrs)
        sender, recipients, data = self.mailer.prepare(message, fromaddr, toaddrs)
        delivery = self.mailer.current_delivery()
        if isinstance(delivery, QueueDelivery):
            staged = delivery.stage(sender, recipients, data)
            try:
                delivery.sync([staged])
            except BaseException:
                delivery.discard([staged])
                raise
            self._staged().append(_Staged(_key(fromaddr, toaddrs, message), delivery, staged,
                                          sender, recipients, _message_id(data) or staged.qid))

    def abort(self) -> None:
        """The transaction was aborted: remove what L{vote} staged in this
        thread; nothing is sent. Never raises."""
        staged, self._local.staged = self._staged(), []
        for it in staged:
            try:
                it.delivery.discard([it.staged])
            except Exception:  # noqa: BLE001 - abort must not fail
                log.failure("could not remove the staged message {qid}", qid=it.staged.qid)

    def send(self, fromaddr: str, toaddrs: Iterable[str], message: bytes | str) -> None:
        """Send a message now (after commit, or from zope.sendmail's queue
        processor); dispatch a L{MailSentEvent} or a L{MailErrorEvent}.

        A message L{vote} staged in a queue is made visible to the daemon.
        A direct delivery (C{smtp://}) is waited for; it needs a Twisted
        reactor, which L{twisted_mailout.blocking} runs in a thread of its
        own when none runs.

        @param fromaddr: the envelope sender. @param toaddrs: the recipients.
        @param message: the message bytes (or C{str}).
        @raise smtplib.SMTPRecipientsRefused: every recipient refused for
            good (zope.sendmail's queue processor then moves the message aside).
        @raise MailoutSendError: every recipient failed, some for now (a
            4xx C{SMTPResponseException}: the queue processor tries again).
        @raise AddressError, MessageError, QueueError, RuntimeError: as
            L{Mailer.send_blocking<twisted_mailout.apps.mailer.Mailer.send_blocking>}
            (a L{MailErrorEvent} is dispatched first).
        """
        toaddrs = list(toaddrs)
        key = _key(fromaddr, toaddrs, message)
        staged = self._staged()
        for i, it in enumerate(staged):
            if it.key == key:
                del staged[i]
                self._publish(it)
                return
        data = key[2]
        mid = _message_id(data) or ""
        try:
            outcome = self.mailer.send_blocking(data, sender=fromaddr, recipients=toaddrs)
        except DeliveryError as e:
            results = [RecipientResult.from_reply(r, e.reply, e.status)
                       for r in (e.recipients or toaddrs)]
            error = self._failed(mid, fromaddr, toaddrs, results)
            raise (error or e) from e
        except Exception as e:
            _notify(MailErrorEvent(mid, f"{type(e).__name__}: {e}", sender=fromaddr,
                                   recipients=toaddrs))
            raise
        if isinstance(outcome, DeliveryReport):
            results = list(outcome)
            if not all(r.status is Status.DELIVERED for r in results):
                error = self._failed(mid, fromaddr, toaddrs, results)
                if error is not None:
                    raise error
                return
        else:
            results = [RecipientResult(r, Status.DELIVERED, 250, "2.0.0 sent", local=True,
                                       queue_id=outcome) for r in toaddrs]
        _notify(MailSentEvent(mid, sender=fromaddr, recipients=toaddrs, results=results,
                              queued=isinstance(self.mailer.current_delivery(), QueueDelivery)))

    # -- outcomes -------------------------------------------------------------

    def _publish(self, it: _Staged) -> None:
        """Make a staged queue file visible to the daemon; report it queued.

        @raise QueueError: it could not be published (a L{MailErrorEvent}
            is dispatched first).
        """
        try:
            [qid] = it.delivery.publish([it.staged])
        except Exception as e:
            _notify(MailErrorEvent(it.message_id, f"not queued after commit: {e}",
                                   sender=it.sender, recipients=it.recipients))
            raise
        self.mailer.notify_accepted(it.delivery, qid, it.sender, it.recipients)
        results = [RecipientResult(r, Status.QUEUED, 250, f"2.0.0 queued as {qid}", local=True,
                                   queue_id=qid) for r in it.recipients]
        _notify(MailSentEvent(it.message_id, sender=it.sender, recipients=it.recipients,
                              results=results, queued=True))

    def _failed(self, mid: str, sender: str, recipients: list[str],
                results: list[RecipientResult]) -> Exception | None:
        """Dispatch a L{MailErrorEvent}.

        @return: the exception to raise, as C{smtplib} would, when no
            recipient was delivered (see L{send}); L{None} when some were.
        """
        failed = [r for r in results if r.status is not Status.DELIVERED]
        permanent = all(r.status in (Status.BOUNCED, Status.EXPIRED) for r in failed)
        text = "; ".join(f"{r.recipient}: {r.code} {r.text}" for r in failed)
        _notify(MailErrorEvent(mid, text, sender=sender, recipients=recipients,
                               results=results, permanent=permanent))
        if len(failed) < len(results):
            log.warn("{mid}: sent to some recipients only: {text}", mid=mid, text=text)
            return None
        if permanent:
            return smtplib.SMTPRecipientsRefused(
                {r.recipient: (r.code, r.text.encode("utf-8", "replace")) for r in failed})
        first = next(r for r in failed if r.status is Status.DEFERRED)
        return MailoutSendError(first.code, text, results)


# -- ZCML ----------------------------------------------------------------------


class IMailoutMailerDirective(Interface):
    """C{<mailout:mailer name="..." delivery="..." />}: register a
    L{MailoutMailer} as a named C{IMailer} utility (the C{mailer=} of
    zope.sendmail's C{mail:directDelivery} and C{mail:queuedDelivery})."""

    name = TextLine(
        title="Name",
        description="The name of the IMailer utility (what mail:directDelivery's "
                    "and mail:queuedDelivery's mailer= names).",
        required=True)

    delivery = TextLine(
        title="Delivery",
        description="A twisted_mailout delivery URL: queue:///var/spool/mailout, "
                    "smtp://user:password@relay:587, maildir:///path, ...",
        required=True)


def mailer_directive(_context: Any, name: str, delivery: str) -> None:
    """The handler of C{<mailout:mailer>}: make the L{MailoutMailer} now (so
    a bad URL fails the configuration, naming the line) and register it
    when the configuration's actions run.

    @param _context: the ZCML configuration context.
    @param name: the utility name. @param delivery: the delivery URL.
    @raise zope.configuration.exceptions.ConfigurationError: a bad URL
        (wrapping the C{ValueError}).
    """
    from zope.component.zcml import handler
    from zope.configuration.exceptions import ConfigurationError

    try:
        mailer = MailoutMailer(delivery)
    except (ValueError, TypeError) as e:
        raise ConfigurationError(f"mailout:mailer {name!r}: {e}") from e
    _context.action(discriminator=("utility", IMailer, name), callable=handler,
                    args=("registerUtility", mailer, IMailer, name))
