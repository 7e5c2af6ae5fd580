"""twisted_mailout: an outbound mail agent on Twisted.

Applications put mail in a durable queue folder with L{enqueue} (no reactor
needed) or deliver it at once with an L{SMTPClient} or L{sendmail} (a
Deferred of a L{DeliveryReport}); the daemon (C{twistd -n mailout
--queue=DIR}) delivers the queue over ESMTP to a relay or to each domain's MX
hosts. Outcomes are told in one vocabulary (L{Status}, L{RecipientResult});
every exception raised on purpose is a L{MailoutError}.
"""

from twisted_mailout.api import SMTPClient, sendmail
from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.deliveries import get_delivery
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.errors import (
    AddressError,
    ConfigError,
    DeliveryError,
    MailoutError,
    MessageError,
    QueueError,
    QueueLocked,
)
from twisted_mailout.outcome import DeliveryReport, RecipientResult, Status
from twisted_mailout.queue import enqueue, enqueue_many

__all__ = [
    "AddressError",
    "ConfigError",
    "DeliveryError",
    "DeliveryReport",
    "MailoutError",
    "Mailer",
    "MessageError",
    "QueueError",
    "QueueLocked",
    "RecipientResult",
    "SMTPClient",
    "Status",
    "build_message",
    "enqueue",
    "enqueue_many",
    "get_delivery",
    "sendmail",
]

__version__ = "0.1.0"
