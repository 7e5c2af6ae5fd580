"""One delivery interface, many deliveries, chosen by configuration.

Every delivery has C{send(sender, recipients, message)}: the envelope sender
(RFC 5321 C{MAIL FROM}), the envelope recipients (C{RCPT TO}) and the message
(C{bytes}, C{str} or C{email.message.Message}). Synchronous deliveries return
a message id (C{str}) once the message is where they put it, and raise
L{DeliveryError} when it could not be put there; asynchronous ones (only
L{SMTPDelivery}) return a C{Deferred} firing with a L{DeliveryReport} of
per-recipient results.

| URL | class | what it does |
| --- | --- | --- |
| C{queue:///var/spool/mailout} | L{QueueDelivery} | into a queue folder (the daemon delivers) |
| C{smtp://[user:pass@]host[:port]} | L{SMTPDelivery} | now, to a relay (router and session) |
| C{smtps://...} | L{SMTPDelivery} | the same with implicit TLS (RFC 8314) |
| C{smtp://} (no host) | L{SMTPDelivery} | now, to each domain's MX hosts |
| C{memory://} | L{MemoryDelivery} | an in-memory outbox (tests) |
| C{file:///tmp/mail} | L{FileDelivery} | one C{.eml} file per message |
| C{console://} (C{?stream=stderr}) | L{ConsoleDelivery} | written to a text stream |
| C{null://} | L{NullDelivery} | validated, then dropped |
| C{sendmail:///usr/sbin/sendmail} | L{SendmailDelivery} | C{sendmail -oi -f SENDER -- RCPTS} |
| C{maildir:///path} | L{MaildirDelivery} | local delivery into a Maildir (C{mailbox.Maildir}) |
| C{mbox:///path} | L{MboxDelivery} | local delivery into an mbox file (C{mailbox.mbox}), locked |
| C{imap://user@host/Folder} | C{IMAPDelivery} | APPEND into an IMAP folder (C{imaps://}: TLS) |
| C{ses://REGION} | C{SESDelivery} | Amazon SES v2 C{SendEmail}, raw content |
| C{sendgrid://} | C{SendGridDelivery} | SendGrid v3 C{mail/send} |
| C{log://} | C{LogDelivery} | marrow.mailer's C{DELIVER} line to C{logging} |
| C{mock://} | C{MockDelivery} | marrow.mailer's mock transport (tests of managers) |

The last five live in modules of their own (L{_LAZY}), imported on first use.

L{get_delivery} turns a URL, a dict or a delivery into a delivery.

DKIM: L{SMTPDelivery} signs with C{dkim=} (a key table path or a loaded
L{Signer<twisted_mailout.dkim.Signer>}) and C{dkim_required=}, or the URL
parameters C{?dkim=/etc/mailout/dkim/keys.toml&dkim_required=yes}; a
L{Mailer<twisted_mailout.apps.mailer.Mailer>} with C{dkim=} signs for any
delivery. Queued mail (C{queue://}) is signed by the daemon that delivers it
(C{twistd mailout --dkim-keys FILE}), so L{QueueDelivery} refuses C{dkim=}.

This module holds the queue and direct SMTP deliveries and the configuration;
the interface is in L{twisted_mailout.apps.base}, the deliveries that need no
network in L{twisted_mailout.apps.local}. Every name is importable from here.
"""

from __future__ import annotations

import sys
import threading
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import defer

from twisted_mailout import api
from twisted_mailout.api import (
    DeliveryReport,
    DKIMSetting,
    RecipientResult,
    SMTPClient,
    default_reactor,
    load_signer,
)
from twisted_mailout.apps.base import (
    Delivery,
    Envelope,
    MessageInput,
    Recipients,
    new_message_id,
    prepare,
)
from twisted_mailout.apps.local import (
    ConsoleDelivery,
    FileDelivery,
    MaildirDelivery,
    MboxDelivery,
    MemoryDelivery,
    NullDelivery,
    SendmailDelivery,
    SentMessage,
    sysexit_reply,
)
from twisted_mailout.envelope import AddressError
from twisted_mailout.errors import DeliveryError
from twisted_mailout.message import MessageError
from twisted_mailout.queue.store import Queue, QueueError, StagedMessage
from twisted_mailout.tls.levels import LEVELS

__all__ = [
    "ConsoleDelivery",
    "Delivery",
    "DeliveryError",
    "DeliveryReport",
    "Envelope",
    "FileDelivery",
    "MaildirDelivery",
    "MboxDelivery",
    "MemoryDelivery",
    "MessageInput",
    "NullDelivery",
    "QueueDelivery",
    "QueueError",
    "RecipientResult",
    "Recipients",
    "SMTPDelivery",
    "SendmailDelivery",
    "SentMessage",
    "active_capture",
    "get_delivery",
    "new_message_id",
    "parse_url",
    "prepare",
    "schemes",
    "sysexit_reply",
]

#: The TLS levels a delivery accepts: the one list (it used to lack dane, dane-only).
TLS_CHOICES = LEVELS

#: Why C{dkim=} is refused for the queue.
QUEUE_SIGNING = ("queue:// mail is DKIM signed by the daemon that delivers it: give the key "
                 "table to the daemon (twistd mailout --dkim-keys FILE [--dkim-required]), "
                 "not to the queue delivery")


# -- queue -------------------------------------------------------------------


class QueueDelivery(Delivery):
    """Into a mailout queue folder, durably; the daemon
    (C{twistd mailout --queue=PATH}) delivers it. No reactor; safe from any
    thread or process. This is how web applications should send.

    @param path: the queue folder (created, mode 0700, when missing), or a
        PostgreSQL queue's URI (C{postgresql://...}, docs/postgresql.md; its
        schema up to date).
    @param dkim: must be L{None}: queued mail is signed by the daemon that
        delivers it (C{twistd mailout --dkim-keys FILE [--dkim-required]}),
        once, before its first attempt; taken only to refuse it clearly.
    @param dkim_required: must be false, likewise.
    @raise QueueError: the folder cannot be created.
    @raise ValueError: C{dkim} or C{dkim_required} given.
    """

    scheme = "queue"

    def __init__(self, path: str, *, dkim: DKIMSetting = None, dkim_required: bool = False):
        if dkim is not None or dkim_required:
            raise ValueError(QUEUE_SIGNING)
        if not path:
            raise ValueError("queue delivery needs a folder path (queue:///var/spool/mailout)")
        self.queue: Any
        if path.startswith(("postgresql://", "postgres://")):
            from twisted_mailout.queue.postgres import PostgresStore

            self.queue = PostgresStore(path)
            self.path = self.queue.location
        else:
            self.queue = Queue(path)
            self.path = self.queue.path

    def url(self) -> str:
        if self.path.startswith("postgresql://"):
            return self.path  # (without its password)
        return f"queue://{self.path}"

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Enqueue (written, fsynced, renamed into C{new/}, folder fsynced).

        @return: the queue id. @raise QueueError: not written (nothing left).
        @raise AddressError, MessageError: bad input.
        """
        env = prepare(sender, recipients, message)  # Message-ID with an A-label domain
        return self.queue.enqueue(env.sender, env.recipients, env.data)

    # The two phases used by send-on-commit (twisted_mailout.apps.txn).
    def stage(self, sender: str | None, recipients: Recipients,
              message: MessageInput) -> StagedMessage:
        """Write into C{tmp/}, not yet synced nor visible (see L{Queue.stage})."""
        env = prepare(sender, recipients, message)
        return self.queue.stage(env.sender, env.recipients, env.data, sync=False)

    def sync(self, staged: list[StagedMessage]) -> None:
        """Make staged files durable (see L{Queue.sync_staged}). @raise QueueError."""
        if staged:
            self.queue.sync_staged(staged)

    def publish(self, staged: list[StagedMessage]) -> list[str]:
        """Make staged files visible to the daemon. @raise QueueError."""
        return self.queue.publish(staged) if staged else []

    def discard(self, staged: list[StagedMessage]) -> None:
        """Remove staged files (abort)."""
        self.queue.discard(staged)


# -- SMTP, now ---------------------------------------------------------------


class SMTPDelivery(Delivery):
    """Deliver now over ESMTP through the daemon's router and session
    (L{twisted_mailout.api.sendmail}): no queue, no retry.

    L{send} must be called in the reactor thread and returns a C{Deferred}
    firing with a L{DeliveryReport}: per recipient C{"delivered"},
    C{"deferred"} (4xx or nothing reached: not retried) or C{"bounced"}.
    From any other thread (a program without a reactor too), use
    L{send_blocking}, or a L{Mailer<twisted_mailout.apps.mailer.Mailer>}.

    @param relay: C{"host:port"} of a smarthost; C{"smtps://host:port"} for
        implicit TLS (RFC 8314 3.3); L{None} to deliver to each domain's MX.
    @param auth: C{(username, password)} for SMTP AUTH (RFC 4954) or L{None};
        the password never appears in C{repr}, C{str} or logs.
    @param tls: C{none}, C{may}, C{encrypt}, C{verify} or C{secure}.
    @param cafile: CA certificates (PEM) for C{verify}/C{secure}.
    @param timeout: cap in seconds on each network step.
    @param helo: the EHLO name; this host's name when L{None}.
    @param resolver: C{"host:port"} of the only DNS server to ask (relay names
        and MX routing); resolv.conf when L{None}.
    @param mx_port: the port of MX hosts (tests).
    @param reactor: the reactor; the global one when L{None}.
    @param client: an L{SMTPClient} to send with instead of the clients
        L{twisted_mailout.api.sendmail} shares (the other arguments are then
        ignored); e.g. the client of L{twisted_mailout.testing.memory.StubSMTP}.
    @param dkim: DKIM signing: a key table path (read here, once) or a loaded
        L{Signer<twisted_mailout.dkim.Signer>} (see
        L{twisted_mailout.api.DKIMSetting}); each message is signed once, in
        the reactor's thread pool, before its first transaction. Not with
        C{client}: give C{dkim=} to that L{SMTPClient}.
    @param dkim_required: do not send a message that cannot be signed (each
        recipient deferred, 451 4.7.0, see L{twisted_mailout.api.unsigned_reply}).
    @ivar signer: the signer, or L{None}.
    @raise ValueError: a bad TLS level, timeout or port; C{dkim} with
        C{client}; C{dkim_required} without C{dkim}.
    @raise ConfigError: an unusable key table or key (a C{ValueError}).
    """

    scheme = "smtp"
    asynchronous = True

    def __init__(self, relay: str | None = None, *, auth: tuple[str, str] | None = None,
                 tls: str = "may", cafile: str | None = None, timeout: float = 60.0,
                 helo: str | None = None, resolver: str | None = None, mx_port: int = 25,
                 reactor: Any = None, client: SMTPClient | None = None,
                 dkim: DKIMSetting = None, dkim_required: bool = False) -> None:
        if tls not in TLS_CHOICES:
            raise ValueError(f"tls must be one of {', '.join(TLS_CHOICES)}, not {tls!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if auth is not None:
            if not (isinstance(auth, (tuple, list)) and len(auth) == 2
                    and all(isinstance(x, str) for x in auth)):
                raise ValueError("auth must be (username, password), two str")
            auth = (auth[0], auth[1])
        if client is not None and (dkim is not None or dkim_required):
            raise ValueError("dkim= with client=: give dkim= to that SMTPClient")
        self.signer = load_signer(dkim, dkim_required)
        self.client = client
        if client is not None:
            relay, reactor = client.relay, client.reactor
        self.relay = relay
        self._auth = auth
        self.tls = tls
        self.cafile = cafile
        self.timeout = float(timeout)
        self.helo = helo
        self.resolver = resolver
        self.mx_port = int(mx_port)
        self.reactor = reactor
        if relay is not None and relay.startswith("smtps://"):
            self.scheme = "smtps"

    @property
    def username(self) -> str | None:
        """The SMTP AUTH user name, or L{None}."""
        return self._auth[0] if self._auth else None

    def url(self) -> str:
        host = ""
        if self.relay:
            host = self.relay.split("://", 1)[-1]
        user = f"{self._auth[0]}:***@" if self._auth else ""
        signed = "&dkim=on" if self.signer is not None else ""
        return f"{self.scheme}://{user}{host}?tls={self.tls}{signed}"

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> defer.Deferred[DeliveryReport]:
        """Deliver now (always a C{Deferred}, see L{Delivery.send}).

        @return: a C{Deferred} firing with a L{DeliveryReport}; it fails only
            for bad input (L{AddressError}, L{MessageError}, C{ValueError})."""
        try:
            env = prepare(sender, recipients, message)
        except (AddressError, MessageError) as e:
            return defer.fail(e)
        if self.client is not None:
            return self.client.send(env.sender, env.recipients, env.data)
        kwargs: dict[str, Any] = {"relay": self.relay, "tls": self.tls, "cafile": self.cafile,
                                  "timeout": self.timeout, "reactor": self.reactor}
        if self.helo:
            kwargs["helo"] = self.helo
        if self.resolver:
            kwargs["resolver"] = self.resolver
        if self.relay is None:
            kwargs["mx_port"] = self.mx_port
        if self._auth is not None:
            kwargs["auth"] = self._auth
        if self.signer is not None:
            kwargs["dkim"] = self.signer  # loaded once: shared clients key on it
        return api.sendmail(env.sender, env.recipients, env.data, **kwargs)

    def send_blocking(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
                      message_id: str | None = None) -> DeliveryReport:
        """L{send} from a thread other than the reactor's, waiting for the
        report: through L{twisted_mailout.apps.blocking} (the reactor the
        program runs in a thread, else one run in a thread of the library's,
        started now if needed).

        @return: the L{DeliveryReport}.
        @raise RuntimeError: called in the reactor thread (it would wait for
            itself), or with a reactor no L{ReactorThread} drives that is not
            running (L{api.blocking_call}).
        """
        from twisted_mailout.apps.blocking import ReactorThreadError, runner_for, waiting_runner

        driver = runner_for(self.reactor)
        if driver is not None and driver.in_reactor_thread():
            raise ReactorThreadError(f"{self.url()}: send_blocking() was called in the reactor "
                                     "thread, where it would wait for itself; use send()")
        runner = waiting_runner(self.reactor)
        if runner is not None:
            result: DeliveryReport = runner.call(self.send, sender, recipients, message)
            return result
        report: DeliveryReport = api.blocking_call(
            default_reactor(self.reactor), self.send, sender, recipients, message)
        return report


# -- configuration ------------------------------------------------------------

_CLASSES = {
    "queue": QueueDelivery,
    "postgresql": QueueDelivery,
    "postgres": QueueDelivery,
    "smtp": SMTPDelivery,
    "smtps": SMTPDelivery,
    "memory": MemoryDelivery,
    "file": FileDelivery,
    "console": ConsoleDelivery,
    "null": NullDelivery,
    "sendmail": SendmailDelivery,
    "maildir": MaildirDelivery,
    "mbox": MboxDelivery,
}

#: Deliveries kept in modules of their own, imported on first use (so that
#: their optional libraries are needed only by those who use them): scheme ->
#: C{"module:Class"}. Such a class parses its own URL: a classmethod
#: C{url_arguments(url: str) -> dict[str, Any]} returning its constructor's
#: keyword arguments and raising C{ValueError} (without the password) for a
#: bad URL.
_LAZY: dict[str, str] = {
    "imap": "twisted_mailout.apps.imap:IMAPDelivery",
    "imaps": "twisted_mailout.apps.imap:IMAPDelivery",
    "log": "twisted_mailout.apps.logdelivery:LogDelivery",
    "mock": "twisted_mailout.apps.mock:MockDelivery",
    "ses": "twisted_mailout.apps.ses:SESDelivery",
    "sendgrid": "twisted_mailout.apps.sendgrid:SendGridDelivery",
}


def _lazy_class(scheme: str) -> type[Delivery] | None:
    """The class of a delivery in L{_LAZY}, imported now, or L{None}."""
    target = _LAZY.get(scheme)
    if target is None:
        return None
    module, _, name = target.partition(":")
    import importlib
    cls: type[Delivery] = getattr(importlib.import_module(module), name)
    return cls


def schemes() -> list[str]:
    """Every delivery URL scheme this module knows, in a stable order."""
    return [*_CLASSES, *_LAZY]


def _one(params: dict[str, list[str]], name: str, url: str) -> str:
    values = params.pop(name)
    if len(values) != 1:
        raise ValueError(f"{_safe(url)}: {name} given {len(values)} times")
    return values[0]


def _number(text: str, name: str, url: str, kind: type = float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{_safe(url)}: {name} must be a number, not {text!r}") from None
    if value <= 0:
        raise ValueError(f"{_safe(url)}: {name} must be positive, not {text!r}")
    return value


def _flag(text: str, name: str, url: str) -> bool:
    """A yes/no URL parameter: C{yes}, C{true}, C{on}, C{1} or C{no},
    C{false}, C{off}, C{0} (any case). @raise ValueError: anything else."""
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{_safe(url)}: {name} must be yes or no, not {text!r}")


def _safe(url: str) -> str:
    """C{url} with any password replaced by C{***}, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()


def parse_url(url: str) -> dict[str, Any]:
    """Parse a delivery URL into constructor arguments.

    @param url: see the module docstring. Paths are absolute: three slashes
        (C{file:///tmp/mail}). C{smtp} takes C{tls}, C{cafile}, C{timeout}
        (seconds), C{helo}, C{resolver} (the only DNS server to ask, for
        relay names and MX routing), C{dkim} (a DKIM key table path) and
        C{dkim_required} (C{yes}/C{no}), and without a host C{mx_port}; the port
        is 587 for C{smtp} and 465 for C{smtps} when not given (RFC 8314);
        C{sendmail} takes C{timeout} and repeated C{arg}; C{console} takes
        C{stream=stdout|stderr}. User name and password are percent-decoded.
    @return: C{{"scheme": ..., **kwargs}}.
    @raise ValueError: unknown scheme or parameter, a relative path, a bad
        number; the message never contains the password.
    """
    if not isinstance(url, str):
        raise TypeError(f"a delivery URL must be a str, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise ValueError(f"bad delivery URL {_safe(url)!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in ("postgresql", "postgres"):
        # the PostgreSQL queue: the whole URL is its libpq connection URI
        return {"scheme": scheme, "path": url}
    lazy = _lazy_class(scheme)
    if lazy is not None:
        return {"scheme": scheme, **lazy.url_arguments(url)}  # type: ignore[attr-defined]
    if scheme not in _CLASSES:
        raise ValueError(f"unknown delivery {scheme or url!r} in {_safe(url)!r}; one of "
                         f"{', '.join(s + '://' for s in schemes())}")
    if parts.fragment:
        raise ValueError(f"{_safe(url)}: a delivery URL has no #fragment")
    params = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    out: dict = {"scheme": scheme}
    if scheme in ("smtp", "smtps"):
        host = parts.hostname
        if host:
            host_text = f"[{host}]" if ":" in host else host
            # RFC 8314: submission 587 (STARTTLS) and submissions 465 (implicit TLS)
            port = parts.port or (465 if scheme == "smtps" else 587)
            relay = f"{host_text}:{port}"
            out["relay"] = f"smtps://{relay}" if scheme == "smtps" else relay
        else:
            if scheme == "smtps":
                raise ValueError(f"{_safe(url)}: smtps:// needs a relay host")
            out["relay"] = None
        if parts.username is not None:
            out["auth"] = (unquote(parts.username), unquote(parts.password or ""))
        for name in list(params):
            if name == "tls":
                out["tls"] = _one(params, name, url)
                if out["tls"] not in TLS_CHOICES:
                    raise ValueError(f"{_safe(url)}: tls must be one of "
                                     f"{', '.join(TLS_CHOICES)}, not {out['tls']!r}")
            elif name == "cafile":
                out["cafile"] = _one(params, name, url)
            elif name == "timeout":
                out["timeout"] = _number(_one(params, name, url), name, url)
            elif name == "helo":
                out["helo"] = _one(params, name, url)
            elif name == "resolver":
                out["resolver"] = _one(params, name, url)
            elif name == "mx_port" and not host:
                out["mx_port"] = _number(_one(params, name, url), name, url, int)
            elif name == "dkim":
                out["dkim"] = _one(params, name, url)
                if not out["dkim"]:
                    raise ValueError(f"{_safe(url)}: dkim needs the path of a key table")
            elif name == "dkim_required":
                out["dkim_required"] = _flag(_one(params, name, url), name, url)
        if "tls" not in out and scheme == "smtps":
            out["tls"] = "verify"
    else:
        if parts.username is not None or parts.port is not None:
            raise ValueError(f"{_safe(url)}: {scheme}:// takes no user, password or port")
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{url}: {scheme}:// takes an absolute path with three slashes "
                f"({scheme}:///{parts.netloc}{parts.path}), not a host {parts.netloc!r}")
        path = unquote(parts.path)
        if scheme in ("queue", "file", "maildir", "mbox"):
            if not path or path == "/":
                raise ValueError(f"{url}: {scheme}:// needs an absolute path "
                                 f"({scheme}:///var/...)")
            out["path"] = path
        elif scheme == "sendmail":
            if path and path != "/":
                out["command"] = path
            if "timeout" in params:
                out["timeout"] = _number(_one(params, "timeout", url), "timeout", url)
            if "arg" in params:
                out["args"] = params.pop("arg")
        elif scheme == "console":
            if path not in ("", "/"):
                raise ValueError(f"{url}: console:// takes no path")
            if "stream" in params:
                name = _one(params, "stream", url)
                if name not in ("stdout", "stderr"):
                    raise ValueError(f"{url}: stream must be stdout or stderr, not {name!r}")
                out["stream"] = sys.stderr if name == "stderr" else None
        elif path not in ("", "/"):
            raise ValueError(f"{url}: {scheme}:// takes no path")
    if scheme == "queue" and ("dkim" in params or "dkim_required" in params):
        raise ValueError(f"{_safe(url)}: {QUEUE_SIGNING}")
    if params:
        raise ValueError(f"{_safe(url)}: unknown parameter(s) "
                         f"{', '.join(sorted(params))} for {scheme}://")
    return out


def get_delivery(config: str | dict[str, Any] | Delivery, **overrides: Any) -> Delivery:
    """The delivery a configuration names.

    @param config: a L{Delivery} (returned as it is); a URL (L{parse_url});
        or a dict: C{{"url": URL, **kwargs}} or C{{"scheme": NAME, **kwargs}},
        the keyword arguments of that delivery's class (they override what
        the URL says, e.g. C{{"url": "sendmail://", "args": ["-C", dir]}}).
    @param overrides: more keyword arguments for the class (e.g. C{reactor}).
    @return: a L{Delivery}.
    @raise ValueError: unknown scheme or bad parameters.
    @raise TypeError: C{config} of another type, or an argument the class
        does not take.
    """
    if isinstance(config, Delivery):
        if overrides:
            raise TypeError("keyword arguments given with a Delivery instance")
        return config
    if isinstance(config, str):
        kwargs = parse_url(config)
    elif isinstance(config, dict):
        config = dict(config)
        if "url" in config:
            kwargs = parse_url(config.pop("url"))
            kwargs.update(config)
        elif "scheme" in config:
            kwargs = config
        else:
            raise ValueError("a delivery dict needs 'url' or 'scheme'")
    else:
        raise TypeError(f"a delivery configuration must be a URL, a dict or a Delivery, "
                        f"not {type(config).__name__}")
    kwargs.update(overrides)
    scheme = kwargs.pop("scheme")
    cls = _CLASSES.get(scheme) or _lazy_class(scheme)
    if cls is None:
        raise ValueError(f"unknown delivery scheme {scheme!r}; one of "
                         f"{', '.join(schemes())}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"{scheme} delivery: {e}") from None


# -- the test capture (see twisted_mailout.testing) ------------------------

_capture_lock = threading.Lock()
_captures: list = []


def active_capture() -> MemoryDelivery | None:
    """The outbox that L{twisted_mailout.testing.capture_mail} put in place
    of every mailer's delivery, or L{None}."""
    with _capture_lock:
        return _captures[-1] if _captures else None


def _push_capture(outbox: MemoryDelivery) -> None:
    with _capture_lock:
        _captures.append(outbox)


def _pop_capture(outbox: MemoryDelivery) -> None:
    with _capture_lock:
        if outbox in _captures:
            _captures.remove(outbox)

