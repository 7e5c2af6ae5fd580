"""The application's mailer: a delivery plus defaults, and typed outcome events.

A L{Mailer} holds a delivery (see L{twisted_mailout.apps.deliveries}), a default
sender and default header fields, and observers. L{Mailer.send} takes a built
message (an C{email.message.EmailMessage} from L{twisted_mailout.apps.builder}, or
bytes), takes the envelope from its header fields when not given (Bcc removed
from the bytes, kept in the envelope) and hands it to the delivery, at once
or, for a transactional mailer, when the current C{transaction} commits
(L{twisted_mailout.apps.txn}).

Outcomes are reported to observers as L{MailEvent}s, one per recipient:
L{MailQueued} (accepted into the queue), L{MailDelivered}, L{MailDeferred}
(temporary failure) and L{MailBounced} (permanent failure, or given up). The
daemon's per-recipient outcomes and the results of L{twisted_mailout.sendmail} are
the same L{RecipientResult<twisted_mailout.outcome.RecipientResult>}s (one
L{Status} vocabulary); they convert with L{event_from_outcome} and
L{event_from_result}. Observers never break delivery: their exceptions are
logged and dropped.

With C{dkim=} (a DKIM key table path or a loaded
L{Signer<twisted_mailout.dkim.Signer>}) the mailer signs each message once,
before handing it to the delivery: a direct (asynchronous) delivery signs in
the reactor's thread pool, a synchronous one in the thread that delivers. A
queue mailer does not sign: the daemon signs queued mail (C{twistd mailout
--dkim-keys}). (The event types live in L{twisted_mailout.apps.events},
so that send-on-commit can report without importing the mailer; they are
documented here and importable from here.)
"""

from __future__ import annotations

import email.policy
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, cast

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from twisted_mailout.api import (
    DKIMSetting,
    default_reactor,
    load_signer,
    sign_in_thread,
    unsigned_reply,
)
from twisted_mailout.apps.builder import (
    format_address,
    message_retries,
    send_async_with_retries,
    send_sync_with_retries,
)
from twisted_mailout.apps.blocking import ReactorThreadError
from twisted_mailout.apps.deliveries import (
    QUEUE_SIGNING,
    Delivery,
    DeliveryError,
    MessageInput,
    QueueDelivery,
    Recipients,
    active_capture,
    get_delivery,
    new_message_id,
)
from twisted_mailout.apps.events import (
    EVENT_TYPES,
    OUTCOME_NAMESPACE,
    MailBounced,
    MailDeferred,
    MailDelivered,
    MailEvent,
    MailQueued,
    Observer,
    Observers,
    event_from_log,
    event_from_outcome,
    event_from_result,
    log_observer,
    make_event,
    outcome_observer,
)
from twisted_mailout.apps.managers import (
    Job,
    Manager,
    deliver_now,
    make_manager,
    waiting_runner,
)
from twisted_mailout.apps.txn import join
from twisted_mailout.envelope import AddressError
from twisted_mailout.message import (
    coerce_message,
    header_addresses,
    header_values,
    recipients_from_headers,
    remove_headers,
)
from twisted_mailout.outcome import DeliveryReport, RecipientResult

__all__ = [
    "EVENT_TYPES",
    "Observer",
    "MailBounced",
    "MailDeferred",
    "MailDelivered",
    "MailEvent",
    "MailQueued",
    "Mailer",
    "Observers",
    "OUTCOME_NAMESPACE",
    "event_from_log",
    "event_from_outcome",
    "event_from_result",
    "log_observer",
    "make_event",
    "outcome_observer",
]


def _fold(name: str, value: str) -> bytes:
    """One header field, folded and encoded (RFC 5322 2.2.3, RFC 2047) by the
    standard library's SMTP policy, with CRLF."""
    policy = email.policy.SMTP
    return policy.header_factory(name, value).fold(policy=policy).encode("ascii")


def envelope_from_headers(data: bytes) -> tuple[str | None, list[str]]:
    """The envelope a message's header fields give: the sender from
    C{Sender} (RFC 5322 3.6.2) or else the first C{From} address, and the
    recipients from C{To}, C{Cc} and C{Bcc}.

    @return: C{(sender or None, recipients)}.
    @raise MessageError: one of those fields holds a control character or is
        not a valid, unambiguous address list
        (L{twisted_mailout.message.parse_address_list}).
    """
    return sender_from_headers(data), recipients_from_headers(data)


def sender_from_headers(data: bytes) -> str | None:
    """The envelope sender a message's header fields give: the C{Sender}
    address (RFC 5322 3.6.2), or else the first C{From} address.

    @return: the address, or L{None} when neither field holds one.
    @raise MessageError: the field read holds a control character or is not
        a valid, unambiguous address list
        (L{twisted_mailout.message.parse_address_list}).
    """
    for name in ("Sender", "From"):
        addrs = header_addresses(data, [name])
        if addrs:
            return addrs[0]
    return None


class Mailer:
    """A delivery with defaults and observers; what applications send with.

    @param delivery: a L{Delivery}, a URL (C{"queue:///var/spool/mailout"})
        or a dict (see L{get_delivery}).
    @param sender: the default sender (C{"Name <addr>"} or an address): the
        C{From} field of messages that have none, and so their envelope sender.
    @param headers: default header fields (C{dict} or list of pairs), added
        to messages that lack them (e.g. C{{"Reply-To": ...}}).
    @param transactional: send only when the current C{transaction} commits
        (L{twisted_mailout.apps.txn}); L{send} then returns at once.
    @param transaction_manager: the C{transaction} manager; the thread-local
        C{transaction.manager} when L{None}.
    @param observers: callables receiving each L{MailEvent}.
    @param dkim: DKIM signing (RFC 6376): a key table path (read here, once;
        the file of C{twistd mailout --dkim-keys}) or a loaded
        L{Signer<twisted_mailout.dkim.Signer>}. Each message is signed once,
        before it is handed to the delivery (a direct delivery: in the
        reactor's thread pool), so every recipient gets the same bytes. Not
        for a queue delivery (the daemon signs) nor a delivery that signs
        itself (C{SMTPDelivery(dkim=...)}).
    @param dkim_required: a message that cannot be signed is not handed to
        the delivery: a synchronous delivery raises L{DeliveryError}
        (deferred, 451 4.7.0), a direct one reports every recipient deferred
        with that reply; the observers hear of it either way.
    @param manager: marrow.mailer's delivery manager
        (L{twisted_mailout.apps.managers}): C{"immediate"} (L{send} delivers
        in the calling thread), C{"futures"} or C{"dynamic"} (L{send} returns
        a C{concurrent.futures.Future}), or marrow.mailer's configuration
        dict (C{{"use": "dynamic", "workers": 10, "divisor": 10, "timeout":
        60}}; also C{"pipeline"}, messages per transport). L{None} (the
        default): no manager, L{send} as described there. Not with
        C{transactional}.
    @ivar signer: the signer, or L{None}.
    @ivar manager: the L{Manager}, or L{None}.
    @raise ValueError, TypeError: a bad delivery configuration or default;
        C{dkim} with a queue delivery or one that signs itself; a bad
        manager, or one with C{transactional}.
    @raise ConfigError: an unusable DKIM key table or key (a C{ValueError}).
    """

    def __init__(self, delivery: str | dict[str, Any] | Delivery, *, sender: str | None = None,
                 headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
                 transactional: bool = False, transaction_manager: Any = None,
                 observers: Iterable[Observer] = (), dkim: DKIMSetting = None,
                 dkim_required: bool = False,
                 manager: str | dict[str, Any] | Manager | None = None) -> None:
        self.delivery: Delivery = get_delivery(delivery)
        if dkim is not None or dkim_required:
            if isinstance(self.delivery, QueueDelivery):
                raise ValueError(QUEUE_SIGNING)
            if getattr(self.delivery, "signer", None) is not None:
                raise ValueError(f"{self.delivery.url()} signs already (its dkim=): give "
                                 f"dkim= to the Mailer or to the delivery, not both")
        self.signer = load_signer(dkim, dkim_required)
        self.sender = sender
        if sender is not None:
            self._from_field = format_address(sender)
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
        self.headers = []
        for name, value in items:
            if not isinstance(name, str) or not name or ":" in name or not name.isascii():
                raise ValueError(f"bad header field name {name!r}")
            if any(c in str(value) for c in "\r\n"):
                raise ValueError(f"header field {name} contains CR or LF")
            self.headers.append((name, str(value)))
        self.observers = Observers(observers)
        self.transactional = transactional or transaction_manager is not None
        self._transaction_manager = transaction_manager
        if manager is not None and self.transactional:
            raise ValueError("a manager and transactional: mail sent on commit is handed to "
                             "the delivery after the commit, not to a manager")
        self.manager: Manager | None = (make_manager(manager, self) if manager is not None
                                        else None)

    def __repr__(self) -> str:
        return f"<Mailer {self.delivery!r}{' transactional' if self.transactional else ''}>"

    @property
    def transaction_manager(self) -> Any:
        """The C{transaction} manager used when transactional."""
        if self._transaction_manager is None:
            import transaction

            return transaction.manager
        return self._transaction_manager

    def add_observer(self, observer: Observer) -> None:
        """Register C{observer(event: MailEvent)}."""
        self.observers.add(observer)

    def remove_observer(self, observer: Observer) -> None:
        """Unregister C{observer}."""
        self.observers.remove(observer)

    def current_delivery(self) -> Delivery:
        """The delivery L{send} uses now: the test outbox of
        L{twisted_mailout.testing.capture_mail} while one is active, else
        this mailer's."""
        return active_capture() or self.delivery

    def prepare(self, message: MessageInput, sender: str | None = None,
                recipients: Recipients | None = None) -> tuple[str, list[str], bytes]:
        """Apply the defaults and take the envelope from the header fields.

        @param message: C{email.message.Message}, C{bytes} or C{str}.
        @param sender: the envelope sender; from C{Sender}/C{From} when L{None}.
        @param recipients: envelope recipients; C{To}, C{Cc}, C{Bcc} when L{None}.
        @return: C{(sender, recipients, data)}, C{Bcc} removed from C{data}.
        @raise AddressError: no sender or no recipient can be found.
        @raise MessageError: an empty message, or a header field the envelope
            is taken from holds a control character or an ambiguous address
            list (the field is named; nothing is sent).
        """
        data = coerce_message(message)
        add = []
        if self.sender is not None and not header_values(data, "From"):
            add.append(_fold("From", self._from_field))
        for name, value in self.headers:
            if not header_values(data, name):
                add.append(_fold(name, value))
        if add:
            data = b"".join(add) + data
        if sender is None:
            sender = sender_from_headers(data)
            if sender is None:
                raise AddressError("no envelope sender: give sender=, a From field, or "
                                   "a default sender to the Mailer")
        if recipients is None:
            recipients = recipients_from_headers(data)
            if not recipients:
                raise AddressError("no recipients: give recipients= or To/Cc/Bcc fields")
        elif isinstance(recipients, str):
            recipients = [recipients]
        data = remove_headers(data, ["Bcc", "Resent-Bcc"])
        return sender, list(recipients), data

    def send(self, message: MessageInput, *, sender: str | None = None,
             recipients: Recipients | None = None) -> Any:
        """Send a built message.

        @param message: an C{email.message.EmailMessage} (see
            L{twisted_mailout.apps.builder.build_message}), C{bytes} or C{str}.
        @param sender: the envelope sender (RFC 5321 C{MAIL FROM}); by default
            the C{Sender} or C{From} field (the mailer's default sender fills
            a missing C{From}).
        @param recipients: the envelope recipients; by default every address
            in C{To}, C{Cc} and C{Bcc}. C{Bcc} is always removed from the bytes.
        @return: the message id (the queue id for a queue) for a synchronous
            delivery or a transactional mailer. For a direct (asynchronous)
            delivery (C{smtp://}, C{smtps://}, the HTTP APIs): in the reactor
            thread a C{Deferred} firing with the L{DeliveryReport}; in any
            other thread (a program without a reactor, a Django or Flask
            request) the L{DeliveryReport} itself, waited for through
            L{twisted_mailout.apps.blocking} (a reactor thread started on
            first use). With a C{manager}: the result in the calling thread
            (C{immediate}) or a C{concurrent.futures.Future} of it
            (C{futures}, C{dynamic}).
        @raise AddressError, MessageError: bad input; nothing sent.
        @raise DeliveryError, QueueError: a synchronous delivery failed
            (the observers heard of it first).
        @raise RuntimeError: a transactional direct delivery from a thread
            while no reactor runs (it could never be sent).
        """
        sender, recipients, data = self.prepare(message, sender, recipients)
        delivery = self.current_delivery()
        if self.transactional:
            return join(self, delivery, sender, recipients, data)
        retries = message_retries(message)
        if self.manager is not None:
            return self.manager.send(Job(delivery, sender, recipients, data, retries))
        if delivery.asynchronous and waiting_runner(delivery) is not None:
            return deliver_now(self, delivery, sender, recipients, data, retries)
        return self.deliver(delivery, sender, recipients, data, retries=retries)

    def submit(self, message: MessageInput, *, sender: str | None = None,
               recipients: Recipients | None = None) -> Future[str | DeliveryReport]:
        """Send a built message and return a C{concurrent.futures.Future} of
        the outcome at once (marrow.mailer's futures): the message id, or a
        direct delivery's L{DeliveryReport} (per recipient). A direct
        delivery runs in the reactor thread (L{twisted_mailout.apps.blocking});
        with a C{futures} or C{dynamic} manager a worker thread delivers; a
        synchronous delivery without one (or with C{immediate}) is done in
        this thread before this returns.

        @param message: as L{send}.
        @param sender: as L{send}.
        @param recipients: as L{send}.
        @return: a C{Future}; its exception is what L{send} would raise
            (C{DeliveryError}, C{QueueError}, ...).
        @raise AddressError, MessageError: bad input; nothing sent.
        @raise ValueError: a transactional mailer (mail is sent at commit).
        """
        if self.transactional:
            raise ValueError("submit() on a transactional mailer: use send(); mail is handed "
                             "over at commit")
        sender, recipients, data = self.prepare(message, sender, recipients)
        delivery = self.current_delivery()
        retries = message_retries(message)
        if self.manager is not None:
            return self.manager.submit(Job(delivery, sender, recipients, data, retries))
        if delivery.asynchronous:
            runner = waiting_runner(delivery)
            if runner is not None:
                future: Future[str | DeliveryReport] = runner.submit(
                    self.deliver, delivery, sender, recipients, data, retries=retries)
                return future
        future = Future()
        try:
            result = self.deliver(delivery, sender, recipients, data, retries=retries)
        except Exception as e:  # noqa: BLE001 - the future carries it
            future.set_exception(e)
            return future
        if isinstance(result, defer.Deferred):  # the reactor thread: settled when it fires
            def settle(outcome: Any) -> None:
                if isinstance(outcome, Failure):
                    future.set_exception(outcome.value)
                else:
                    future.set_result(outcome)

            result.addBoth(settle)
        else:
            future.set_result(result)
        return future

    def start(self) -> Mailer:
        """Start the manager's threads (marrow.mailer's C{Mailer.start()});
        optional: the first message starts them too.

        @return: C{self}, so that C{Mailer(...).start()} chains.
        """
        if self.manager is not None:
            self.manager.startup()
        return self

    def stop(self, wait: bool = True) -> Mailer:
        """Stop the manager (marrow.mailer's C{Mailer.stop()}): with C{wait}
        the mail it queued is sent first; its connections are closed. A
        stopped manager starts again on the next message.

        @param wait: wait for the queued mail.
        @return: C{self}.
        """
        if self.manager is not None:
            self.manager.shutdown(wait=wait)
        return self

    def __enter__(self) -> Mailer:
        """C{with Mailer(...) as mailer:} starts it and stops it at the end."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def send_deferred(self, message: MessageInput, *, sender: str | None = None,
                      recipients: Recipients | None = None,
                      reactor: Any = None) -> defer.Deferred[str | DeliveryReport]:
        """L{send} for Twisted code: always a C{Deferred} (Twisted's rule
        "always or never a Deferred"; L{send} keeps it per delivery only).

        A direct delivery's Deferred is returned as it is. A synchronous
        delivery (the queue with its fsyncs, files, C{sendmail}, mbox ...)
        runs in the reactor's thread pool, so it never blocks the reactor
        thread; its observers are then called in that thread. A
        transactional mailer joins the current transaction at once, as
        L{send} does. Call it in the reactor thread.

        @param reactor: the reactor whose thread pool runs a synchronous
            delivery; the delivery's, else the global one, when L{None}.
        @return: a Deferred firing with the message id (the queue id for a
            queue) or, for a direct delivery, the L{DeliveryReport}; failing
            with what L{send} raises (L{AddressError}, C{MessageError},
            L{DeliveryError}, C{QueueError}).
        """
        try:
            sender, recipients, data = self.prepare(message, sender, recipients)
            delivery = self.current_delivery()
            if self.transactional:
                return defer.succeed(join(self, delivery, sender, recipients, data))
            retries = message_retries(message)
        except Exception as e:  # noqa: BLE001 - bad input fails the Deferred
            return defer.fail(e)
        deliver: Callable[..., Any] = self.deliver
        if delivery.asynchronous:
            return defer.maybeDeferred(deliver, delivery, sender, recipients, data,
                                       retries=retries)
        reactor = default_reactor(reactor or getattr(delivery, "reactor", None))
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), deliver, delivery,
                                         sender, recipients, data, retries=retries)

    def deliver(self, delivery: Delivery, sender: str, recipients: list[str], data: bytes,
                message_id: str | None = None,
                retries: int = 0) -> str | defer.Deferred[DeliveryReport]:
        """Hand a prepared message to C{delivery} now and report the outcome
        to the observers (used by L{send} and at commit). With a signer the
        message is signed first (see the C{dkim} parameter of L{Mailer}).

        @param retries: how many more times a delivery that fails for now is
            tried, at once (the message's C{retries}, marrow.mailer's: see
            L{send_sync_with_retries} and L{send_async_with_retries}); the
            events and results count the attempts.
        @return: as L{send}.
        """
        mid = message_id or new_message_id()
        source = delivery.url()
        signer = None if isinstance(delivery, QueueDelivery) else self.signer
        if delivery.asynchronous:
            if signer is None:
                d = defer.Deferred.fromCoroutine(send_async_with_retries(
                    delivery, sender, recipients, data, message_id=mid, retries=retries))
            else:
                reactor = default_reactor(getattr(delivery, "reactor", None))
                d = defer.Deferred.fromCoroutine(
                    self._sign_then_send(reactor, signer, delivery, sender, recipients, data,
                                         mid, retries))

            def report(rep: DeliveryReport) -> DeliveryReport:
                for r in rep:
                    self.observers.notify(event_from_result(mid, r, sender, source))
                return rep

            return d.addCallback(report)
        try:
            if signer is not None:
                data = self._sign_here(signer, sender, recipients, data)
            mid, attempts = send_sync_with_retries(delivery, sender, recipients, data,
                                                   message_id=mid, retries=retries)
        except DeliveryError as e:
            for r in e.recipients or recipients:
                self.observers.notify(make_event(
                    e.status, queue_id=mid, recipient=r, code=e.reply.code, text=e.reply.text,
                    sender=sender, local=e.reply.local, source=source,
                    attempts=getattr(e, "attempts", 1)))
            raise
        self.notify_accepted(delivery, mid, sender, recipients, attempts)
        return mid

    @staticmethod
    def _sign_here(signer: Any, sender: str, recipients: list[str], data: bytes) -> bytes:
        """Sign in this thread (a synchronous delivery's).

        @return: the signed message.
        @raise DeliveryError: it cannot be signed (deferred, 451 4.7.0).
        """
        from twisted_mailout.dkim.signer import prepend_signature

        try:
            return prepend_signature(signer.sign(data, sender), data)
        except Exception as e:  # any signing failure: nothing is handed on
            raise DeliveryError(unsigned_reply(e), recipients) from e

    @staticmethod
    async def _sign_then_send(reactor: Any, signer: Any, delivery: Delivery, sender: str,
                              recipients: list[str], data: bytes,
                              mid: str, retries: int = 0) -> DeliveryReport:
        """Sign in the reactor's thread pool, then hand to a direct delivery.

        @return: the delivery's report; when the message cannot be signed,
            every recipient deferred with L{unsigned_reply} (nothing sent).
        """
        try:
            signed = await sign_in_thread(reactor, signer, data, sender)
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any signing failure: nothing is sent
            reply = unsigned_reply(e)
            return DeliveryReport([RecipientResult.from_reply(r, reply) for r in recipients])
        return await send_async_with_retries(delivery, sender, recipients, signed,
                                             message_id=mid, retries=retries)

    def notify_accepted(self, delivery: Delivery, mid: str, sender: str,
                        recipients: Iterable[str], attempts: int = 1) -> None:
        """Report a message a synchronous delivery took: L{MailQueued} for a
        queue, L{MailDelivered} for the others (after C{attempts})."""
        queued = isinstance(delivery, QueueDelivery)
        for r in recipients:
            event: MailEvent
            if queued:
                event = MailQueued(mid, r, 250, f"2.0.0 queued as {mid}", sender, local=True,
                                   will_retry=True, attempts=0, source=delivery.url())
            else:
                event = MailDelivered(mid, r, 250, "2.0.0 delivered", sender, local=True,
                                      source=delivery.url(), attempts=attempts)
            self.observers.notify(event)

    def send_blocking(self, message: MessageInput, *, sender: str | None = None,
                      recipients: Recipients | None = None) -> str | DeliveryReport:
        """L{send} that always waits for the outcome (Django, WSGI): a direct
        delivery's report is waited for through the reactor thread of
        L{twisted_mailout.apps.blocking} (started on first use; the
        program's reactor when it runs one), a manager's future too.

        @return: the message id, or for a direct delivery the L{DeliveryReport}.
        @raise ReactorThreadError: a direct delivery, called in the reactor
            thread (it would wait for itself; a C{RuntimeError}).
        @raise DeliveryError, QueueError, AddressError, MessageError: as L{send}.
        """
        sender, recipients, data = self.prepare(message, sender, recipients)
        delivery = self.current_delivery()
        if self.transactional:
            return join(self, delivery, sender, recipients, data)
        retries = message_retries(message)
        if self.manager is not None:
            outcome = self.manager.send(Job(delivery, sender, recipients, data, retries))
            return outcome.result() if isinstance(outcome, Future) else outcome
        if not delivery.asynchronous:
            return cast(str, self.deliver(delivery, sender, recipients, data, retries=retries))
        if waiting_runner(delivery) is None:
            from twisted_mailout.api import blocking_call

            if default_reactor(getattr(delivery, "reactor", None)).running:
                raise ReactorThreadError(
                    f"{delivery.url()}: send_blocking() was called in the reactor thread, "
                    "where it would wait for itself; use send(), which returns a Deferred")
            # a fake reactor nobody runs for other threads: its own error
            return cast(DeliveryReport, blocking_call(
                default_reactor(getattr(delivery, "reactor", None)), self.deliver, delivery,
                sender, recipients, data, retries=retries))
        return deliver_now(self, delivery, sender, recipients, data, retries)
