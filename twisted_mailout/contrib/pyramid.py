"""Pyramid: pyramid_mailer's mailer interface over twisted_mailout deliveries.

C{config.include("twisted_mailout.contrib.pyramid")} instead of
C{config.include("pyramid_mailer")}: the views keep calling
C{get_mailer(request).send(message)} (or C{request.mailer}) with
pyramid_mailer's C{Message}, and the mail goes through a twisted_mailout
delivery: into the mailout queue (the daemon delivers, retries and bounces),
over SMTP now, to a sendmail command, a Maildir, a test outbox ...

Settings, with pyramid_mailer's prefix (C{mail.}, or the
C{pyramid_mailer.prefix} setting):

  - C{mail.url}: the delivery URL (L{twisted_mailout.apps.deliveries}):
    C{queue:///var/spool/mailout}, C{smtp://user:password@relay:587}, ...
  - or pyramid_mailer's own keys, which make an C{smtp://} (C{smtps://} with
    C{mail.ssl}) URL: C{mail.host} (C{localhost}), C{mail.port} (25, or
    465 with C{mail.ssl}), C{mail.username}, C{mail.password}, C{mail.tls}
    (true: STARTTLS required, unverified, as pyramid_mailer does; false:
    STARTTLS when offered, else plain text; or a twisted_mailout level:
    C{none}, C{may}, C{encrypt}, C{verify}, ...), C{mail.ssl};
  - C{mail.queue_path}: the mailout queue folder of C{send_to_queue} (by
    default the C{mail.url} queue, when it is one);
  - C{mail.sendmail_app}: the command of C{send_sendmail}
    (C{/usr/sbin/sendmail});
  - C{mail.default_sender}: the sender of messages without one.

C{send} and C{send_to_queue} join the request's transaction (pyramid_tm's
C{request.tm}, bound by L{get_mailer}): the mail goes out only if it commits
(L{twisted_mailout.apps.txn}). C{send_immediately} delivers at once and waits.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

try:  # the optional extra: say which, not just what is missing
    from pyramid.settings import asbool
    from pyramid_mailer.interfaces import IMailer
except ImportError as _e:  # pragma: no cover - the extra is installed in tests
    raise ImportError("twisted_mailout.contrib.pyramid needs pyramid and pyramid_mailer: "
                      f"pip install 'twisted-mailout[pyramid]' ({_e})") from _e
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mailout.apps.deliveries import (
    Delivery,
    DeliveryError,
    DeliveryReport,
    QueueDelivery,
    get_delivery,
)
from twisted_mailout.apps.builder import parse_display_address
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.envelope import Reply
from twisted_mailout.outcome import Status
from twisted_mailout.tls.levels import LEVELS

__all__ = ["PyramidMailer", "get_mailer", "includeme", "mailer_from_settings", "smtp_url"]

log = Logger()

#: The settings (after the prefix) L{PyramidMailer.from_settings} reads.
SETTINGS = ("url", "host", "port", "username", "password", "tls", "ssl", "keyfile",
            "certfile", "queue_path", "debug", "default_sender", "sendmail_app",
            "sendmail_template")


def smtp_url(host: str = "localhost", port: int | str | None = None,
             username: str | None = None, password: str | None = None,
             tls: bool | str = False, ssl: bool | str = False) -> str:
    """The C{smtp://} (or C{smtps://}) URL of pyramid_mailer's SMTP settings.

    @param host: the relay. @param port: its port; 25, or 465 with C{ssl},
        when L{None} (pyramid_mailer's defaults).
    @param username: AUTH user (RFC 4954), with C{password}; percent-encoded.
    @param tls: pyramid_mailer's boolean (true: STARTTLS required without
        certificate verification, C{encrypt}; false: C{may}), or a
        twisted_mailout TLS level.
    @param ssl: implicit TLS (RFC 8314): C{smtps://}, verified unless
        C{tls} names a level.
    @return: the URL.
    @raise ValueError: a bad port or TLS value.
    """
    implicit = asbool(ssl)
    port_number = int(port) if port not in (None, "") else (465 if implicit else 25)
    if isinstance(tls, str) and tls.strip().lower() in LEVELS:
        level: str | None = tls.strip().lower()
    elif implicit:
        level = None  # smtps:// verifies by default
    else:
        level = "encrypt" if asbool(tls) else "may"
    auth = ""
    if username or password:
        auth = f"{quote(username or '', safe='')}:{quote(password or '', safe='')}@"
    url = f"{'smtps' if implicit else 'smtp'}://{auth}{host}:{port_number}"
    return f"{url}?tls={level}" if level else url


def _recipients(message: Any) -> list[str]:
    """A pyramid_mailer C{Message}'s envelope recipients in order (To,
    Cc, Bcc), each once."""
    out: list[str] = []
    for r in [*message.recipients, *(message.cc or ()), *(message.bcc or ())]:
        if r not in out:
            out.append(r)
    return out


def _refused(report: DeliveryReport) -> DeliveryError | None:
    """The error of a report in which no recipient was delivered (as
    C{smtplib} raises when every recipient is refused), else L{None}."""
    if any(r.status is Status.DELIVERED for r in report):
        return None
    first = report.results[0]
    status = Status.BOUNCED if all(r.status in (Status.BOUNCED, Status.EXPIRED)
                                   for r in report) else Status.DEFERRED
    return DeliveryError(Reply(first.code, first.text, first.local),
                         [r.recipient for r in report], status)


@implementer(IMailer)
class PyramidMailer:
    """pyramid_mailer's C{Mailer} interface (C{send}, C{send_immediately},
    C{send_to_queue}, C{send_sendmail}, C{send_immediately_sendmail},
    C{bind}) over twisted_mailout deliveries; registered by L{includeme}.

    @param delivery: the delivery of C{send} and C{send_immediately}: a URL,
        a dict or a L{Delivery}.
    @param queue: the delivery of C{send_to_queue} (a mailout queue folder
        path or any delivery URL); by default C{delivery} when it is a
        queue, else none (C{send_to_queue} then raises, as pyramid_mailer's).
    @param sendmail: the delivery of C{send_sendmail}: a C{sendmail://} URL
        or a command path (C{/usr/sbin/sendmail} by default).
    @param default_sender: the sender of messages without one.
    @param transaction_manager: the C{transaction} manager C{send} and
        C{send_to_queue} join (C{transaction.manager} by default;
        L{get_mailer} binds pyramid_tm's C{request.tm}).
    @raise ValueError, TypeError: a bad delivery configuration.
    """

    def __init__(self, delivery: str | dict[str, Any] | Delivery, *,
                 queue: str | dict[str, Any] | Delivery | None = None,
                 sendmail: str | dict[str, Any] | Delivery | None = None,
                 default_sender: str | None = None,
                 transaction_manager: Any = None) -> None:
        self.delivery = get_delivery(delivery)
        if queue is None and isinstance(self.delivery, QueueDelivery):
            queue = self.delivery
        if isinstance(queue, str) and "://" not in queue:
            queue = f"queue://{queue}"
        self.queue_delivery = get_delivery(queue) if queue is not None else None
        if sendmail is None:
            sendmail = "/usr/sbin/sendmail"
        if isinstance(sendmail, str) and "://" not in sendmail:
            sendmail = f"sendmail://{sendmail}"
        self.sendmail_delivery = get_delivery(sendmail)
        self.default_sender = default_sender
        if transaction_manager is None:
            import transaction

            transaction_manager = transaction.manager
        self.transaction_manager = transaction_manager

    def __repr__(self) -> str:
        return f"<PyramidMailer {self.delivery.url()}>"

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None,
                      prefix: str = "mail.") -> PyramidMailer:
        """A mailer from Pyramid settings (see the module docstring).

        @param settings: the application's settings.
        @param prefix: pyramid_mailer's prefix.
        @raise ValueError: a setting twisted_mailout does not support
            (C{keyfile}, C{certfile}: client certificates) or a bad value.
        """
        conf = {k[len(prefix):]: v for k, v in (settings or {}).items()
                if k.startswith(prefix) and k[len(prefix):] in SETTINGS}
        for key in ("keyfile", "certfile"):
            if conf.get(key):
                raise ValueError(f"{prefix}{key}: client certificates are not supported by "
                                 "twisted_mailout; authenticate with username and password")
        if conf.get("sendmail_template"):
            log.warn("{prefix}sendmail_template is ignored: twisted_mailout runs "
                     "SENDMAIL -oi -f SENDER -- RECIPIENTS", prefix=prefix)
        url = conf.get("url") or smtp_url(
            conf.get("host") or "localhost", conf.get("port"), conf.get("username") or None,
            conf.get("password") or None, conf.get("tls", False), conf.get("ssl", False))
        return cls(url, queue=conf.get("queue_path") or None,
                   sendmail=conf.get("sendmail_app") or None,
                   default_sender=conf.get("default_sender") or None)

    def bind(self, **kw: Any) -> PyramidMailer:
        """A mailer with the same deliveries and other options (as
        pyramid_mailer's C{bind}).

        @param kw: C{default_sender}, C{transaction_manager}.
        @raise ValueError: another option.
        """
        unknown = set(kw) - {"default_sender", "transaction_manager"}
        if unknown:
            raise ValueError(f"invalid options: {', '.join(sorted(unknown))}")
        return type(self)(self.delivery, queue=self.queue_delivery,
                          sendmail=self.sendmail_delivery,
                          default_sender=kw.get("default_sender", self.default_sender),
                          transaction_manager=kw.get("transaction_manager",
                                                     self.transaction_manager))

    # -- the messages -------------------------------------------------------

    def _args(self, message: Any) -> tuple[Any, str | None, list[str] | None]:
        """C{(message, sender, recipients)} for L{Mailer.send}: a
        pyramid_mailer C{Message} is converted (its C{sender} filled with
        the default, as pyramid_mailer does); other messages (an
        C{EmailMessage}, L{build_message<twisted_mailout.apps.builder.build_message>}'s,
        C{bytes}) give their envelope from their header fields."""
        if hasattr(message, "to_message") and hasattr(message, "send_to"):
            message.sender = message.sender or self.default_sender
            msg = message.to_message()  # validates first (pyramid_mailer's errors)
            # "Name <addr>" is accepted, as smtplib (under pyramid_mailer) does
            sender = parse_display_address(message.sender)[1]
            return msg, sender, [parse_display_address(r)[1] for r in _recipients(message)]
        return message, None, None

    def _mailer(self, delivery: Delivery, transactional: bool) -> Mailer:
        return Mailer(delivery, sender=self.default_sender, transactional=transactional,
                      transaction_manager=self.transaction_manager if transactional else None)

    def _now(self, delivery: Delivery, message: Any, fail_silently: bool) -> Any:
        msg, sender, recipients = self._args(message)
        try:
            result = self._mailer(delivery, False).send_blocking(
                msg, sender=sender, recipients=recipients)
            if isinstance(result, DeliveryReport):
                error = _refused(result)
                if error is not None:
                    raise error
            return result
        except (DeliveryError, OSError) as e:
            if not fail_silently:
                raise
            log.warn("{delivery}: not sent (fail_silently): {error}", delivery=delivery.url(),
                     error=str(e))
            return None

    def send(self, message: Any) -> str:
        """Send when the current transaction commits (pyramid_mailer's
        C{send}).

        @param message: a pyramid_mailer C{Message}, an
            C{email.message.Message} or C{bytes}.
        @return: the message id (the queue id for a queue).
        @raise AddressError, MessageError: bad input; nothing will be sent.
        @raise pyramid_mailer.exceptions.InvalidMessage, BadHeaders: as
            pyramid_mailer's C{Message.validate}.
        """
        msg, sender, recipients = self._args(message)
        return str(self._mailer(self.delivery, True).send(msg, sender=sender,
                                                          recipients=recipients))

    def send_immediately(self, message: Any, fail_silently: bool = False) -> Any:
        """Send now, outside the transaction, and wait (pyramid_mailer's
        C{send_immediately}).

        @return: the message id, or for a direct delivery the
            L{DeliveryReport}; L{None} when it failed and C{fail_silently}.
        @raise DeliveryError: no recipient took it (unless C{fail_silently}).
        @raise AddressError, MessageError: bad input (always raised).
        """
        return self._now(self.delivery, message, fail_silently)

    def send_to_queue(self, message: Any) -> str:
        """Put into the mailout queue when the transaction commits
        (pyramid_mailer's C{send_to_queue}): the daemon delivers it.

        @return: the queue id.
        @raise RuntimeError: no queue is configured (C{mail.queue_path}).
        """
        if self.queue_delivery is None:
            raise RuntimeError("No queue_path provided")
        msg, sender, recipients = self._args(message)
        return str(self._mailer(self.queue_delivery, True).send(msg, sender=sender,
                                                                recipients=recipients))

    def send_sendmail(self, message: Any) -> str:
        """Hand to the sendmail command when the transaction commits.

        @return: the message id."""
        msg, sender, recipients = self._args(message)
        return str(self._mailer(self.sendmail_delivery, True).send(
            msg, sender=sender, recipients=recipients))

    def send_immediately_sendmail(self, message: Any, fail_silently: bool = False) -> Any:
        """Hand to the sendmail command now.

        @return: the message id; L{None} when it failed and C{fail_silently}.
        @raise DeliveryError: the command failed (unless C{fail_silently})."""
        return self._now(self.sendmail_delivery, message, fail_silently)


def mailer_from_settings(settings: dict[str, Any] | None,
                         prefix: str = "mail.") -> PyramidMailer:
    """L{PyramidMailer.from_settings} (pyramid_mailer's
    C{mailer_factory_from_settings})."""
    return PyramidMailer.from_settings(settings, prefix)


def includeme(config: Any) -> None:
    """Register a L{PyramidMailer} made from the settings as pyramid_mailer's
    C{IMailer} utility, and C{request.mailer} (L{get_mailer}, reified).

    @param config: the Pyramid C{Configurator}.
    @raise ValueError: bad settings (the application does not start).
    """
    settings = config.registry.settings or {}
    prefix = settings.get("pyramid_mailer.prefix", "mail.")
    config.registry.registerUtility(mailer_from_settings(settings, prefix), IMailer)
    config.add_request_method(get_mailer, "mailer", reify=True)


def get_mailer(request: Any) -> Any:
    """The registered mailer, bound to pyramid_tm's C{request.tm} when there
    is one (as pyramid_mailer's C{get_mailer}; that one works too).

    @param request: a Pyramid request, or a registry.
    @raise ComponentLookupError: no mailer is registered.
    """
    registry = getattr(request, "registry", None) or request
    mailer = registry.getUtility(IMailer)
    tm = getattr(request, "tm", None)
    return mailer.bind(transaction_manager=tm) if tm else mailer

