"""The delivery interface: L{Delivery}, what its C{send} takes, and the
validation every delivery does first (L{prepare}).

The deliveries themselves are in L{twisted_mailout.apps.deliveries} (the
queue, direct SMTP, configuration by URL) and L{twisted_mailout.apps.local}
(memory, files, console, null, a sendmail command, Maildir, mbox); import them
all from L{twisted_mailout.apps.deliveries}.
"""

from __future__ import annotations

import email.message
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, threads

from twisted_mailout.api import DeliveryReport, default_reactor
from twisted_mailout.envelope import parse_sender
from twisted_mailout.message import coerce_message, prepare_message
from twisted_mailout.queue.store import _new_queue_id, validate_envelope

__all__ = ["Delivery", "Envelope", "MessageInput", "Recipients", "new_message_id", "prepare"]

#: What C{send} takes as the envelope recipients: one address, or an iterable of them.
Recipients = str | Iterable[str]
#: What C{send} takes as the message: its bytes, text (encoded as UTF-8) or an
#: C{email.message.Message} (serialised with C{as_bytes()}).
MessageInput = bytes | str | email.message.Message


@dataclass(frozen=True)
class Envelope:
    """A validated envelope and the message bytes to deliver.

    @ivar sender: envelope sender, C{""} for the null sender (RFC 5321 4.5.5).
    @ivar recipients: envelope recipients, validated, duplicates removed.
    @ivar data: the message bytes, with Message-ID and Date added when missing.
    """

    sender: str
    recipients: list
    data: bytes


def new_message_id() -> str:
    """A message id in the queue id format (23 hex digits, sorting by time)."""
    return _new_queue_id()


def prepare(sender: str | None, recipients: Recipients, message: MessageInput) -> Envelope:
    """Validate an envelope and coerce a message as L{twisted_mailout.enqueue}
    does, without writing anything.

    @param sender: a mailbox, or C{""}/C{"<>"}/L{None} for the null sender.
    @param recipients: an iterable of mailboxes (a C{str} is one recipient).
    @param message: C{bytes}, C{str} or C{email.message.Message}.
    @return: an L{Envelope}.
    @raise AddressError: a bad sender or recipient, or no recipients.
    @raise MessageError: an empty message or an unsupported type.
    """
    snd, rcpts = validate_envelope(sender, recipients)
    addr = parse_sender(snd)
    domain = addr.ascii_domain if addr is not None else None  # A-label for Message-ID
    data = prepare_message(coerce_message(message), domain)
    return Envelope(snd, rcpts, data)


class Delivery:
    """The delivery interface (a base class; see the module docstring).

    @cvar scheme: the URL scheme that selects it.
    @cvar asynchronous: C{True} when L{send} returns a C{Deferred}.
    """

    scheme = ""
    asynchronous = False

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str | defer.Deferred[DeliveryReport]:
        """Deliver one message.

        @param sender: envelope sender; C{""}/C{"<>"}/L{None} for the null sender.
        @param recipients: iterable of envelope recipients (a C{str} is one).
        @param message: C{bytes}, C{str} or C{email.message.Message}; its
            bytes are delivered as given (Message-ID and Date added when missing).
        @param message_id: the id to use (L{new_message_id} format); a new one
            when L{None}. The queue chooses its own queue id and ignores it.
        @return: the message id (C{str}), or for asynchronous deliveries a
            C{Deferred} firing with a L{DeliveryReport}.
        @raise AddressError, MessageError: bad input; nothing delivered.
        @raise DeliveryError: the message could not be delivered.
        """
        raise NotImplementedError

    def send_deferred(self, sender: str | None, recipients: Recipients,
                      message: MessageInput, *, message_id: str | None = None,
                      reactor: Any = None) -> defer.Deferred[str | DeliveryReport]:
        """L{send} for Twisted code, always returning a C{Deferred} (Twisted's
        rule "always or never a Deferred", which L{send} keeps per delivery
        only). A synchronous delivery's L{send} runs in the reactor's thread
        pool, so its file, fsync or process work never blocks the reactor
        thread; an asynchronous one's Deferred is returned as it is. Call it
        in the reactor thread.

        @param reactor: the reactor whose thread pool runs a synchronous
            L{send}; the global one when L{None}.
        @return: a Deferred firing with what L{send} returns (the message id,
            or a L{DeliveryReport}), or failing with what it raises.
        """
        send: Callable[..., Any] = self.send
        if self.asynchronous:
            return defer.maybeDeferred(send, sender, recipients, message, message_id=message_id)
        reactor = default_reactor(reactor)
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), send, sender,
                                         recipients, message, message_id=message_id)

    def close(self) -> None:
        """Release what the delivery holds (nothing by default)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url()}>"

    def url(self) -> str:
        """The configuration URL of this delivery, without any password."""
        return f"{self.scheme}://"
