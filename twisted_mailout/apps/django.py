"""A Django email backend that hands mail to twisted_mailout.

Django 5.x (C{EMAIL_BACKEND})::

    EMAIL_BACKEND = "twisted_mailout.apps.django.EmailBackend"
    MAILOUT_DELIVERY = "queue:///var/spool/mailout"   # or any delivery URL or dict

Django 6.1 and later (C{MAILERS})::

    MAILERS = {
        "default": {
            "BACKEND": "twisted_mailout.apps.django.EmailBackend",
            "OPTIONS": {"delivery": "queue:///var/spool/mailout"},
        },
    }

With a PostgreSQL queue in the site's own database (docs/postgresql.md), the
delivery C{"django-db"} (or C{"django-db:ALIAS"} for another database alias)
writes each message through Django's own connection, in the current
transaction: mail sent inside C{transaction.atomic()} is queued only when the
block commits, and a rollback leaves no mail (the transactional outbox); in
autocommit mode it is committed at once::

    MAILOUT_DELIVERY = "django-db"

C{send_messages()} returns how many messages were sent (for the queue: how
many were durably queued), and with C{fail_silently} counts a failed message
out instead of raising. With the option C{"on_commit": True} (or the setting
C{MAILOUT_ON_COMMIT = True}) a message sent inside C{transaction.atomic()} is
validated at once but handed to the delivery only when the database
transaction commits (Django's C{transaction.on_commit}); a rollback drops it.
Bcc addresses are in the envelope, never in the bytes (Django leaves them out
of the header). While L{twisted_mailout.testing.capture_mail} is active, mail
goes to its outbox.
"""

from __future__ import annotations

import email.policy
import functools
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend

from twisted.logger import Logger

from twisted_mailout.apps.builder import parse_display_address
from twisted_mailout.apps.deliveries import DeliveryError, DeliveryReport, Envelope, prepare
from twisted_mailout.apps.mailer import Mailer, Observer

__all__ = ["EmailBackend", "message_bytes"]

log = Logger()


def message_bytes(email_message: Any) -> bytes:
    """The bytes of a Django C{EmailMessage} (CRLF line ends), with Django
    6's C{message(policy=...)} or Django 5's C{message()}."""
    try:
        msg = email_message.message(policy=email.policy.SMTP)
    except TypeError:  # Django 5.x: message() takes no policy
        return email_message.message().as_bytes(linesep="\r\n")
    return msg.as_bytes()


class EmailBackend(BaseEmailBackend):
    """Send Django's mail through a twisted_mailout delivery.

    @param fail_silently: count failed messages out instead of raising.
    @param delivery: a delivery URL or dict (see
        L{twisted_mailout.apps.deliveries.get_delivery}); by default the
        C{MAILOUT_DELIVERY} setting. (C{url} is accepted as another name.)
    @param observers: callables receiving L{twisted_mailout.apps.mailer.MailEvent}s.
    @param on_commit: hand each message to the delivery when the database
        transaction of C{using} commits (at once outside C{atomic()}); by
        default the C{MAILOUT_ON_COMMIT} setting, else C{False}.
    @param using: the database alias for C{on_commit}.
    @param kwargs: Django's own (C{alias} from C{MAILERS}); an unknown option
        is reported by Django 6.1 as C{InvalidMailer}.
    @raise ImproperlyConfigured: no delivery configured, or a bad one.
    """

    def __init__(self, fail_silently: bool = False, *, delivery: Any = None,
                 url: str | None = None, observers: Iterable[Observer] = (),
                 on_commit: bool | None = None, using: str | None = None,
                 username: str | None = None, password: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_silently = fail_silently
        if username is not None or password is not None:
            raise ImproperlyConfigured(
                "twisted_mailout's EmailBackend takes no auth_user/auth_password: put the "
                "SMTP credentials in the delivery URL (smtp://user:password@host:587)")
        config = delivery if delivery is not None else url
        if config is None:
            config = getattr(settings, "MAILOUT_DELIVERY", None)
        if config is None:
            raise ImproperlyConfigured(
                "twisted_mailout EmailBackend: set MAILOUT_DELIVERY (e.g. "
                "'queue:///var/spool/mailout') or the 'delivery' option in MAILERS")
        #: the database alias of the PostgreSQL queue (C{"django-db"}), or L{None}
        self.db_alias: str | None = None
        if isinstance(config, str) and (config == "django-db"
                                        or config.startswith("django-db:")):
            from django.db import connections

            alias = config.partition(":")[2] or "default"
            if alias not in connections.settings:
                raise ImproperlyConfigured(f"twisted_mailout EmailBackend: {config!r}: no "
                                           f"database {alias!r} in DATABASES")
            self.db_alias = alias
            self.on_commit = False  # the INSERT is part of the transaction itself
            self.using = using
            return
        try:
            self.mailer = Mailer(config, observers=observers)
        except (ValueError, TypeError) as e:
            raise ImproperlyConfigured(f"twisted_mailout EmailBackend: {e}") from e
        if on_commit is None:
            on_commit = bool(getattr(settings, "MAILOUT_ON_COMMIT", False))
        self.on_commit = on_commit
        self.using = using

    def send_messages(self, email_messages: Iterable[Any]) -> int:
        """Send Django C{EmailMessage}s.

        @return: how many were sent (queued, written, or accepted for at
            least one recipient by a direct delivery).
        @raise Exception: the first failure (L{AddressError}, L{QueueError},
            L{DeliveryError}, ...), unless C{fail_silently}.
        """
        if not email_messages:
            return 0
        sent = 0
        for message in email_messages:
            recipients = message.recipients()
            if not recipients:
                continue
            try:
                sender = parse_display_address(message.from_email)[1]
                rcpts = [parse_display_address(r)[1] for r in recipients]
                data = message_bytes(message)
                if self.db_alias is not None:
                    from django.db import connections

                    from twisted_mailout.queue.postgres import enqueue_in

                    enqueue_in(connections[self.db_alias], sender, rcpts, data)
                elif self.on_commit:
                    from django.db import transaction

                    env = prepare(*self.mailer.prepare(data, sender, rcpts))  # validate now
                    transaction.on_commit(functools.partial(self._after_commit, env),
                                          using=self.using, robust=True)
                else:
                    self._send(data, sender, rcpts)
            except Exception:
                if not self.fail_silently:
                    raise
                continue
            sent += 1
        return sent

    def _send(self, data: bytes, sender: str | None, rcpts: list[str] | None) -> None:
        result = self.mailer.send_blocking(data, sender=sender, recipients=rcpts)
        if isinstance(result, DeliveryReport) and not result.accepted:
            first = result.results[0]
            raise DeliveryError(first.reply, [r.recipient for r in result], first.status)

    def _after_commit(self, env: Envelope) -> None:
        """Deliver a message whose transaction committed; a failure is for
        the observers (and Django's log), never for the committing code."""
        try:
            self._send(env.data, env.sender, env.recipients)
        except Exception:  # noqa: BLE001 - the observers have the outcome
            log.failure("mail after commit not sent: {recipients}",
                        recipients=env.recipients)
