"""A Django email backend that hands mail to twisted_mailout.

Django 5.x (C{EMAIL_BACKEND})::

    EMAIL_BACKEND = "twisted_mailout.contrib.django.EmailBackend"
    MAILOUT_DELIVERY = "queue:///var/spool/mailout"   # or any delivery URL or dict

Django 6.1 and later (C{MAILERS})::

    MAILERS = {
        "default": {
            "BACKEND": "twisted_mailout.contrib.django.EmailBackend",
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

Django's SMTP options (C{get_connection(host=..., port=..., username=...,
password=..., use_tls=..., use_ssl=..., timeout=...)}, or the same names in
C{MAILERS} C{OPTIONS}) override the configured delivery as they override
Django's C{EMAIL_*} settings in its own SMTP backend; L{smtp_options} says what
each becomes.

C{fail_silently} is Django's (see L{EmailBackend.send_messages}): a message
Django itself could not make (a header or an address with CR/LF, an address
list where one address belongs) raises whatever C{fail_silently} says, and
what the delivery refuses or cannot do (the relay or the queue) is counted
out with it. C{send_messages()} returns how many messages were sent (for the
queue: how many were durably queued). A connection (backend instance) may be
shared by threads; C{open()} and C{close()} (or C{with connection:}) keep one
set of SMTP sessions for many C{send_messages()} calls, as Django's SMTP
backend keeps one connection, and one C{send_messages()} call (so
C{send_mass_mail}) always reuses its sessions.

With the option C{"on_commit": True} (or the setting C{MAILOUT_ON_COMMIT =
True}) a message sent inside C{transaction.atomic()} is validated at once but
handed to the delivery only when the database transaction commits (Django's
C{transaction.on_commit}); a rollback drops it. Bcc addresses are in the
envelope, never in the bytes (Django leaves them out of the header). While
L{twisted_mailout.testing.capture_mail} is active, mail goes to its outbox.
"""

from __future__ import annotations

import email.policy
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from email.headerregistry import AddressHeader
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend

from twisted.logger import Logger

from twisted_mailout.api import SMTPClient, blocking_call, default_reactor
from twisted_mailout.apps.blocking import runner_for
from twisted_mailout.apps.builder import parse_display_address
from twisted_mailout.apps.deliveries import (
    Delivery,
    DeliveryError,
    DeliveryReport,
    Envelope,
    SMTPDelivery,
    parse_url,
    prepare,
)
from twisted_mailout.apps.mailer import Mailer, Observer
from twisted_mailout.envelope import AddressError
from twisted_mailout.message import MessageError, control_character
from twisted_mailout.queue.store import QueueError

__all__ = ["REFUSALS", "EmailBackend", "check_address", "message_bytes", "smtp_options"]

log = Logger()

#: What C{fail_silently} swallows, per message: the delivery refused the
#: message or could not take it (Django's SMTP backend swallows
#: C{smtplib.SMTPException} from C{sendmail()}, the relay's refusals).
#: L{DeliveryError} (no recipient accepted, or a local delivery failed),
#: L{QueueError} (not written to the queue), C{OSError}, and the
#: L{AddressError} and L{MessageError} of the delivery's own checks (an
#: address Django takes but no MTA would, such as one without a domain).
REFUSALS: tuple[type[BaseException], ...] = (DeliveryError, QueueError, AddressError,
                                             MessageError, OSError)

#: Seconds the sessions of an open connection are kept idle for its next message.
IDLE_TIMEOUT = 10.0

#: The TLS levels at least as strict as Django's C{use_tls}/C{use_ssl}
#: (a certificate verified against the host name, Python's default context).
_VERIFYING = ("verify", "secure")


def message_bytes(email_message: Any) -> bytes:
    """The bytes of a Django C{EmailMessage} (CRLF line ends), with Django
    6's C{message(policy=...)} or Django 5's C{message()}.

    @param email_message: a C{django.core.mail.EmailMessage}.
    @return: the message, CRLF line ends.
    @raise ValueError: Django refuses a header (C{BadHeaderError} in Django
        5, C{ValueError} in Django 6).
    """
    try:
        msg = email_message.message(policy=email.policy.SMTP)
    except TypeError:  # Django 5.x: message() takes no policy
        return email_message.message().as_bytes(linesep="\r\n")
    return msg.as_bytes()


def check_address(value: Any) -> None:
    """Refuse an address as Django's own SMTP backend refuses it before it
    connects (Django 6.1's C{prep_address}, Django 5.2's
    C{sanitize_address}): not exactly one mailbox, a parse defect other than
    a missing domain, or a control character (CR, LF, NUL, ...; Django 5.2
    lets NUL through, 6.1 and this backend do not). Such an error is raised
    whatever C{fail_silently} says. An address that passes may still be
    refused by the delivery (L{parse_display_address} is stricter).

    @param value: a C{str} (C{"Name <a@b>"} or C{"a@b"}); other types
        (Django 6's C{Address} objects) are left to the delivery.
    @raise AddressError: the address is refused (a C{ValueError}, as Django's).
    """
    if not isinstance(value, str):
        return
    what = control_character(value)
    if what:
        raise AddressError(f"invalid address {value!r}: contains a control character ({what})")
    try:
        parsed = AddressHeader.value_parser(value)
    except Exception as e:  # noqa: BLE001 - the parser's own errors: refused
        raise AddressError(f"invalid address {value!r}: {e}") from None
    defects = {str(d) for d in parsed.all_defects}
    defects.discard("addr-spec local part with no domain")  # Django allows "webmaster"
    if defects:
        raise AddressError(f"invalid address {value!r}: {'; '.join(sorted(defects))}")
    if len(parsed.all_mailboxes) != 1:
        raise AddressError(f"invalid address {value!r}: must be a single address")


def _split_relay(relay: str) -> tuple[str, int | None]:
    """C{(host, port)} of an L{SMTPDelivery} relay (C{"host:port"},
    C{"[::1]:25"} or C{"smtps://host:port"})."""
    parts = urlsplit("//" + relay.split("://", 1)[-1])
    return parts.hostname or "", parts.port


def smtp_options(config: str | dict[str, Any] | Delivery | None, *,
                 host: str | None = None, port: int | None = None,
                 username: str | None = None, password: str | None = None,
                 use_tls: bool | None = None, use_ssl: bool | None = None,
                 timeout: float | None = None) -> str | dict[str, Any] | Delivery | None:
    """Apply Django's SMTP backend options to a delivery configuration, as
    they override Django's C{EMAIL_*} settings in its own SMTP backend.
    L{None} means "not given" (Django's convention), so C{send_mail()}'s
    C{auth_user=None} changes nothing.

    - C{host}: the relay host of an C{smtp://} or C{smtps://} delivery;
      with another delivery (the queue) an C{smtp://host} delivery replaces
      it, as Django's backend sends to that host.
    - C{port}: the relay port; without it the configured relay's port, or
      587 (465 with C{use_ssl}, RFC 8314) for a new host. (Django 5 defaults
      to C{EMAIL_PORT}, 25: give C{port=25} for such a relay.)
    - C{username}, C{password}: SMTP AUTH (RFC 4954), used only when both
      are non-empty (as Django logs in), and offered only over TLS.
    - C{use_tls=True}: C{smtp://} with C{tls=verify}: STARTTLS required, the
      certificate verified as Python's default context does.
    - C{use_ssl=True}: C{smtps://} (implicit TLS, RFC 8314 3.3), C{tls=verify}.
    - C{use_tls=False}, C{use_ssl=False}: C{smtp://} with C{tls=may}
      (STARTTLS when offered, never required; Django would not try it).
    - C{timeout}: C{timeout}, the cap in seconds on each network step.

    A stricter configured level (C{secure}) is kept by C{use_tls}/C{use_ssl}.
    C{ssl_keyfile}/C{ssl_certfile} (client certificates) have no equivalent
    and are refused by L{EmailBackend}.

    @param config: a delivery URL, a dict (C{{"url": ...}} or
        C{{"scheme": ...}}, see L{get_delivery}), a L{Delivery}, or L{None}.
    @return: C{config} itself when no option is given, else a dict for
        L{get_delivery} (C{{"scheme": "smtp"|"smtps", "relay": ..., ...}}).
    @raise ImproperlyConfigured: both C{use_tls} and C{use_ssl}; an option
        for a L{Delivery} object or for a non-SMTP delivery without C{host};
        C{port}, C{username} or C{password} for MX routing (no relay); a bad
        URL.
    """
    given = {name: value for name, value in (
        ("host", host), ("port", port), ("username", username), ("password", password),
        ("use_tls", use_tls), ("use_ssl", use_ssl), ("timeout", timeout)) if value is not None}
    if not given:
        return config
    names = ", ".join(sorted(given))
    if use_tls and use_ssl:
        raise ImproperlyConfigured("use_tls and use_ssl are mutually exclusive (STARTTLS or "
                                   "implicit TLS): set at most one of them to True")
    if isinstance(config, Delivery):
        raise ImproperlyConfigured(f"twisted_mailout EmailBackend: {names} given with a Delivery "
                                   f"object; configure the delivery as a URL or dict instead")
    try:
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, str):
            base = parse_url(config)
        else:
            base = dict(config)
            if "url" in base:
                base = {**parse_url(base.pop("url")), **base}
    except (ValueError, TypeError) as e:
        raise ImproperlyConfigured(f"twisted_mailout EmailBackend: {e}") from e
    scheme = base.get("scheme")
    if scheme not in ("smtp", "smtps"):
        if host is None:
            raise ImproperlyConfigured(
                f"twisted_mailout EmailBackend: {names} apply to smtp:// and smtps:// "
                f"deliveries, not {scheme or config!r}; put the SMTP settings in the delivery "
                f"URL (smtp://user:password@host:587) or give host too")
        base, scheme = {"scheme": "smtp"}, "smtp"
    old_scheme = scheme
    old_host, old_port = _split_relay(base["relay"]) if base.get("relay") else (None, None)
    if use_ssl is not None:
        scheme = "smtps" if use_ssl else ("smtp" if not use_tls else scheme)
    if use_tls:
        scheme = "smtp"
    new_host = host if host is not None else old_host
    if not new_host:
        if port is not None or username is not None or password is not None:
            raise ImproperlyConfigured(
                f"twisted_mailout EmailBackend: {names} need a relay host (smtp://host:port or "
                f"host=); this delivery routes to each domain's MX hosts")
        if scheme == "smtps":
            raise ImproperlyConfigured("twisted_mailout EmailBackend: use_ssl needs a relay "
                                       "host (smtps://host:465 or host=)")
    else:
        if port is not None:
            new_port = int(port)
        elif old_port is not None and new_host == old_host and scheme == old_scheme:
            new_port = old_port
        else:
            new_port = 465 if scheme == "smtps" else 587
        host_text = f"[{new_host}]" if ":" in new_host else new_host
        base["relay"] = (f"smtps://{host_text}:{new_port}" if scheme == "smtps"
                         else f"{host_text}:{new_port}")
    base["scheme"] = scheme
    level = base.get("tls", "verify" if old_scheme == "smtps" else "may")
    if use_tls or use_ssl:
        level = level if level in _VERIFYING else "verify"
    elif use_tls is False or use_ssl is False:
        level = "may"
    base["tls"] = level
    if username is not None or password is not None:
        old_user, old_password = base.get("auth") or (None, None)
        user = username if username is not None else old_user
        secret = password if password is not None else old_password
        if user and secret:
            base["auth"] = (user, secret)
        else:
            base.pop("auth", None)
    if timeout is not None:
        base["timeout"] = timeout
    return base


class EmailBackend(BaseEmailBackend):
    """Send Django's mail through a twisted_mailout delivery.

    @param fail_silently: count a message the delivery refuses or cannot
        take out instead of raising (see L{send_messages}, L{REFUSALS}).
    @param delivery: a delivery URL or dict (see
        L{twisted_mailout.apps.deliveries.get_delivery}); by default the
        C{MAILOUT_DELIVERY} setting. (C{url} is accepted as another name.)
    @param observers: callables receiving L{twisted_mailout.apps.mailer.MailEvent}s.
    @param on_commit: hand each message to the delivery when the database
        transaction of C{using} commits (at once outside C{atomic()}); by
        default the C{MAILOUT_ON_COMMIT} setting, else C{False}.
    @param using: the database alias for C{on_commit}.
    @param host: see L{smtp_options}, with C{port}, C{username},
        C{password}, C{use_tls}, C{use_ssl} and C{timeout} (seconds):
        Django's SMTP options, overriding the delivery's.
    @param ssl_keyfile: must be L{None}: client certificates are not
        supported (taken to refuse them clearly), nor C{ssl_certfile}.
    @param kwargs: Django's own (C{alias} from C{MAILERS}); an unknown option
        is reported by Django 6.1 as C{InvalidMailer}.
    @raise ImproperlyConfigured: no delivery configured, or a bad one.
    """

    def __init__(self, fail_silently: bool = False, *, delivery: Any = None,
                 url: str | None = None, observers: Iterable[Observer] = (),
                 on_commit: bool | None = None, using: str | None = None,
                 host: str | None = None, port: int | None = None,
                 username: str | None = None, password: str | None = None,
                 use_tls: bool | None = None, use_ssl: bool | None = None,
                 timeout: float | None = None, ssl_keyfile: str | None = None,
                 ssl_certfile: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_silently = fail_silently
        self._lock = threading.Lock()
        self._client: SMTPClient | None = None  # the open connection's sessions
        self._client_delivery: SMTPDelivery | None = None
        self._opened = False  # open() called, close() not yet
        self._users = 0  # send_messages() calls using the client
        if ssl_keyfile is not None or ssl_certfile is not None:
            raise ImproperlyConfigured(
                "twisted_mailout EmailBackend: ssl_keyfile/ssl_certfile (TLS client "
                "certificates) are not supported")
        config = delivery if delivery is not None else url
        if config is None:
            config = getattr(settings, "MAILOUT_DELIVERY", None)
        config = smtp_options(config, host=host, port=port, username=username,
                              password=password, use_tls=use_tls, use_ssl=use_ssl,
                              timeout=timeout)
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

    # -- the connection --------------------------------------------------------

    def _pooled(self) -> SMTPDelivery | None:
        """The configured direct SMTP delivery whose sessions this
        connection keeps (one without a client of its own), or L{None}."""
        if self.db_alias is not None:
            return None
        delivery = self.mailer.delivery
        if isinstance(delivery, SMTPDelivery) and delivery.client is None:
            return delivery
        return None

    def _call(self, reactor: Any, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run C{f} in the reactor thread and wait for its result: through
        L{twisted_mailout.blocking} (the reactor the program runs in a thread,
        else one run by the library in a thread of its own, started now if
        needed), or for a reactor no runner drives (a test's own) through
        L{blocking_call}.

        @raise ReactorThreadError: called in the reactor thread (a
            C{RuntimeError}).
        """
        runner = runner_for(reactor)
        if runner is None:
            return blocking_call(default_reactor(reactor), f, *args, **kwargs)
        return runner.call(f, *args, **kwargs)

    def _new_client(self, delivery: SMTPDelivery) -> SMTPClient:
        """An L{SMTPClient} with C{delivery}'s settings, made in the reactor
        thread (its resolver schedules calls)."""
        kwargs: dict[str, Any] = {
            "relay": delivery.relay, "tls": delivery.tls, "cafile": delivery.cafile,
            "timeout": delivery.timeout, "auth": getattr(delivery, "_auth", None),
            "idle_timeout": IDLE_TIMEOUT, "dkim": delivery.signer}
        if delivery.helo:
            kwargs["helo"] = delivery.helo
        if delivery.resolver:
            kwargs["resolver"] = delivery.resolver
        if delivery.relay is None:
            kwargs["mx_port"] = delivery.mx_port
        reactor = default_reactor(delivery.reactor)
        client: SMTPClient = self._call(reactor, SMTPClient, reactor, **kwargs)
        return client

    def open(self) -> bool | None:
        """Keep one set of SMTP sessions for the messages sent until
        L{close} (C{with connection:} calls both), as Django's SMTP backend
        keeps one connection. Sessions are opened when a message needs one
        and kept idle L{IDLE_TIMEOUT} seconds between messages. Only direct
        SMTP deliveries have anything to open.

        @return: C{True} when this call opened it, C{False} when it was open
            already or there is nothing to open, L{None} when opening failed
            and C{fail_silently} is set (Django's contract).
        @raise OSError: opening failed (an unreadable C{cafile}), unless
            C{fail_silently}.
        @raise RuntimeError: no reactor can run the sessions.
        """
        with self._lock:
            if self._opened or self._pooled() is None:
                return False
            try:
                self._ensure_client()
            except OSError:
                if not self.fail_silently:
                    raise
                return None
            self._opened = True
            return True

    def _ensure_client(self) -> None:
        """Make the client if there is none (call with C{_lock} held)."""
        delivery = self._pooled()
        if self._client is None and delivery is not None:
            client = self._new_client(delivery)
            self._client = client
            self._client_delivery = SMTPDelivery(client=client)

    def close(self) -> None:
        """End what L{open} kept: QUIT the idle SMTP sessions (at once, or
        when the last C{send_messages()} in flight in another thread ends).

        @raise Exception: closing failed, unless C{fail_silently} (Django's
            SMTP backend swallows C{SMTPException} from QUIT then).
        """
        with self._lock:
            self._opened = False
            client = self._take_idle_client()
        self._close_client(client)

    def _take_idle_client(self) -> SMTPClient | None:
        """The client to close now, if no call uses it and the connection is
        not open (call with C{_lock} held)."""
        if self._client is None or self._users or self._opened:
            return None
        client, self._client, self._client_delivery = self._client, None, None
        return client

    def _close_client(self, client: SMTPClient | None) -> None:
        if client is None:
            return
        try:
            self._call(client.reactor, client.close)
        except Exception:
            if not self.fail_silently:
                raise
            log.failure("closing the SMTP sessions of a Django connection")

    # -- sending ----------------------------------------------------------------

    def send_messages(self, email_messages: Sequence[Any]) -> int:
        """Send Django C{EmailMessage}s, as Django's SMTP backend does: an
        empty list returns 0 at once; a message without recipients is
        skipped (not counted, no error); each message is made, then handed to
        the delivery; with a direct SMTP delivery, the messages of one call
        share SMTP sessions (one session for N messages to one relay).

        Raised whatever C{fail_silently} says (Django raises these before it
        sends): a header Django refuses (C{ValueError}, C{BadHeaderError}),
        an address Django refuses (L{check_address}), a configuration or
        programming error (C{RuntimeError}, C{ImproperlyConfigured}) and the
        database's own errors (C{"django-db"}). Swallowed with
        C{fail_silently}, the message counted out and the next one sent:
        L{REFUSALS}, what the delivery says (Django's C{SMTPException} from
        C{sendmail()}). A message accepted for at least one recipient counts
        as sent, as C{smtplib.sendmail} reports it.

        @param email_messages: a sequence of C{django.core.mail.EmailMessage}.
        @return: how many were sent (queued, written, or accepted for at
            least one recipient by a direct delivery); C{int}.
        @raise Exception: the first failure, unless C{fail_silently} allows it.
        """
        if not email_messages:
            return 0
        pooled = self._pooled() is not None and self._capturing() is None
        if pooled:
            with self._lock:
                try:
                    self._ensure_client()
                except OSError:
                    if not self.fail_silently:
                        raise
                    return 0  # Django: "we failed silently on open()"
                self._users += 1
        sent = 0
        try:
            for message in email_messages:
                if self._send_one(message):
                    sent += 1
        finally:
            if pooled:
                with self._lock:
                    self._users -= 1
                    client = self._take_idle_client()
                self._close_client(client)
        return sent

    def _capturing(self) -> Delivery | None:
        from twisted_mailout.apps.deliveries import active_capture

        return active_capture()

    def _send_one(self, message: Any) -> bool:
        """Send one message; C{True} when it counts as sent."""
        recipients = message.recipients()
        if not recipients:
            return False
        for address in (message.from_email, *recipients):
            check_address(address)
        data = message_bytes(message)
        try:
            sender = parse_display_address(message.from_email)[1]
            rcpts = [parse_display_address(r)[1] for r in recipients]
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
                self._send(data, sender, rcpts, self._client_delivery)
        except REFUSALS:
            if not self.fail_silently:
                raise
            return False
        return True

    def _send(self, data: bytes, sender: str | None, rcpts: list[str] | None,
              pooled: SMTPDelivery | None = None) -> None:
        """Hand one message to the delivery (the capture's while one is
        active, else C{pooled}, this connection's sessions, when given) and
        wait for it.

        @raise DeliveryError: a direct delivery accepted no recipient.
        """
        sender, recipients, data = self.mailer.prepare(data, sender, rcpts)
        delivery = self.mailer.current_delivery()
        if delivery is self.mailer.delivery and pooled is not None:
            delivery = pooled
        if not delivery.asynchronous:
            self.mailer.deliver(delivery, sender, recipients, data)
            return
        result = self._call(getattr(delivery, "reactor", None), self.mailer.deliver, delivery,
                            sender, recipients, data)
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
