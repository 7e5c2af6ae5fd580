"""twisted_mailout: an outbound mail agent on Twisted.

Applications put mail in a durable queue folder with L{enqueue} (no reactor
needed) or deliver it at once with an L{SMTPClient} or L{sendmail} (a
Deferred of a L{DeliveryReport}); the daemon (C{twistd -n mailout
--queue=DIR}) delivers the queue over ESMTP to a relay or to each domain's MX
hosts. Outcomes are told in one vocabulary (L{Status}, L{RecipientResult});
every exception raised on purpose is a L{MailoutError}.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from twisted_mailout.api import SMTPClient, sendmail
    from twisted_mailout.apps.builder import build_message
    from twisted_mailout.apps.deliveries import get_delivery
    from twisted_mailout.apps.mailer import Mailer

#: Names imported when first used (PEP 562): the SMTP client, the connector
#: and TLS below them take a quarter of a second to import, which a program
#: that only enqueues (or the `mailout` command) need not pay.
_LAZY = {
    "SMTPClient": "twisted_mailout.api",
    "sendmail": "twisted_mailout.api",
    "build_message": "twisted_mailout.apps.builder",
    "get_delivery": "twisted_mailout.apps.deliveries",
    "Mailer": "twisted_mailout.apps.mailer",
}


def __getattr__(name: str) -> Any:
    """Import a name of L{_LAZY} on first use (PEP 562).

    @raise AttributeError: not a name of this package.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'twisted_mailout' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
