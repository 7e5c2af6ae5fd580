"""One exception hierarchy for the whole package (aiosmtplib's C{errors.py} style).

Every exception twisted_mailout raises on purpose is a L{MailoutError}, so an
application can catch them all in one place::

    MailoutError
    ├── AddressError            (also ValueError) a bad mailbox or envelope (RFC 5321 4.1.2)
    ├── MessageError            (also ValueError) a message that cannot be sent (empty,
    │                           wrong type, a header field with a control character)
    ├── ConfigError             (also ValueError) a configuration value that cannot work
    ├── QueueError              the queue cannot be used (missing, not writable, disk full)
    │   └── QueueLocked         another daemon works on the queue folder
    ├── DeliveryError           a synchronous delivery could not take the message
    ├── RoutingError            no next hop for a destination (DNS); carries a reply
    ├── ProtocolError           the SMTP dialogue cannot go on; carries a reply
    └── TLSError                a certificate or TLS policy problem

The classes users already catch keep their names, the modules they were
documented in (C{twisted_mailout.envelope.AddressError} is this very class),
and their old bases: C{AddressError}, C{MessageError} and C{ConfigError} are
still C{ValueError}s. The layers' own exceptions (C{LeaseLost},
C{RouteError}, C{SessionError}, C{CertificateVerifyError}, ...) subclass the
matching base here.

Delivery results are not exceptions: a refused or unreachable recipient is an
outcome (L{twisted_mailout.outcome.RecipientResult}), and L{twisted_mailout.sendmail}
fails only for bad arguments. C{DeliveryError} is for the synchronous
deliveries of L{twisted_mailout.apps.deliveries} (files, C{sendmail}, mbox ...),
which have no report to return.

This module imports nothing from the package: it is the lowest layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "AddressError",
    "ConfigError",
    "DeliveryError",
    "MailoutError",
    "MessageError",
    "ProtocolError",
    "QueueError",
    "QueueLocked",
    "RoutingError",
    "TLSError",
]


class MailoutError(Exception):
    """The base of every exception twisted_mailout raises on purpose."""


class AddressError(MailoutError, ValueError):
    """An address that is not a valid RFC 5321 mailbox (or null reverse-path),
    or an envelope without recipients."""


class MessageError(MailoutError, ValueError):
    """A message that cannot be queued or sent (empty, not bytes, a header
    field the envelope is taken from that holds a control character ...)."""


class ConfigError(MailoutError, ValueError):
    """A configuration value that cannot work; the message says which."""


class QueueError(MailoutError):
    """The queue cannot be used (missing, not writable, disk full...)."""


class QueueLocked(QueueError):
    """Another daemon already works on this queue folder (a store that
    cannot be shared, such as the folder store)."""


class RoutingError(MailoutError):
    """No next hop could be found for a destination (the subclasses carry the
    L{Reply<twisted_mailout.envelope.Reply>} that stands for the recipients)."""


class ProtocolError(MailoutError):
    """The SMTP dialogue with a server cannot go on (refused, broken, timed
    out); the delivery layer turns it into replies, never into a failure of
    L{twisted_mailout.sendmail}."""


class TLSError(MailoutError):
    """A certificate that does not verify, or a TLS policy that cannot be met
    or read."""


class DeliveryError(MailoutError):
    """A synchronous delivery could not take the message.

    @ivar reply: the reply that says why: an SMTP-style code and text (a
        L{Reply<twisted_mailout.envelope.Reply>}; made locally, e.g. from a
        sendmail exit status).
    @ivar recipients: the envelope recipients it concerns (C{list[str]}).
    @ivar status: C{"deferred"} (temporary: trying again later may work) or
        C{"bounced"} (permanent); equal to
        L{Status.DEFERRED<twisted_mailout.outcome.Status.DEFERRED>} and
        L{Status.BOUNCED<twisted_mailout.outcome.Status.BOUNCED>}.
    """

    def __init__(self, reply: Any, recipients: Iterable[str] = (),
                 status: str | None = None) -> None:
        """
        @param reply: the L{Reply<twisted_mailout.envelope.Reply>}.
        @param recipients: the envelope recipients concerned.
        @param status: C{"deferred"} or C{"bounced"}; from the reply code
            (5xx: bounced) when L{None}.
        """
        self.reply = reply
        self.recipients = list(recipients)
        self.status = str(status or ("bounced" if reply.is_permanent else "deferred"))
        super().__init__(f"{self.status}: {reply.one_line()}")
