"""twisted_mailout: an outbound mail agent on Twisted.

Applications put mail in a durable queue folder with L{enqueue} (no reactor
needed) or deliver it at once with L{sendmail} (a Deferred); the daemon
(C{twistd -n mailout --queue=DIR}) delivers the queue over ESMTP to a relay
or to each domain's MX hosts.
"""

from twisted_mailout.api import DeliveryReport, RecipientResult, sendmail
from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.deliveries import get_delivery
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.envelope import AddressError
from twisted_mailout.message import MessageError
from twisted_mailout.queue.store import QueueError, QueueLocked, enqueue, enqueue_many

__all__ = [
    "AddressError",
    "DeliveryReport",
    "Mailer",
    "MessageError",
    "QueueError",
    "QueueLocked",
    "RecipientResult",
    "build_message",
    "enqueue",
    "enqueue_many",
    "get_delivery",
    "sendmail",
]

__version__ = "0.1.0"
