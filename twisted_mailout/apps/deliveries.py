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

L{get_delivery} turns a URL, a dict or a delivery into a delivery.
"""

from __future__ import annotations

import email.message
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import defer, threads

from twisted_mailout import api
from twisted_mailout.api import DeliveryReport, RecipientResult, SMTPClient, default_reactor
from twisted_mailout.envelope import AddressError, Reply, parse_sender
from twisted_mailout.errors import DeliveryError
from twisted_mailout.message import MessageError, coerce_message, prepare_message
from twisted_mailout.queue.store import Queue, QueueError, StagedMessage, _new_queue_id, validate_envelope
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
    "NullDelivery",
    "QueueDelivery",
    "QueueError",
    "RecipientResult",
    "SMTPDelivery",
    "SendmailDelivery",
    "SentMessage",
    "active_capture",
    "get_delivery",
    "new_message_id",
    "parse_url",
    "sysexit_reply",
]

#: What C{send} takes as the envelope recipients: one address, or an iterable of them.
Recipients = str | Iterable[str]
#: What C{send} takes as the message: its bytes, text (encoded as UTF-8) or an
#: C{email.message.Message} (serialised with C{as_bytes()}).
MessageInput = bytes | str | email.message.Message

#: The TLS levels a delivery accepts: the one list (it used to lack dane, dane-only).
TLS_CHOICES = LEVELS


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


# -- queue -------------------------------------------------------------------


class QueueDelivery(Delivery):
    """Into a mailout queue folder, durably; the daemon
    (C{twistd mailout --queue=PATH}) delivers it. No reactor; safe from any
    thread or process. This is how web applications should send.

    @param path: the queue folder (created, mode 0700, when missing).
    @raise QueueError: the folder cannot be created.
    """

    scheme = "queue"

    def __init__(self, path: str):
        if not path:
            raise ValueError("queue delivery needs a folder path (queue:///var/spool/mailout)")
        self.queue = Queue(path)
        self.path = self.queue.path

    def url(self) -> str:
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
    def stage(self, sender: str | None, recipients: Recipients, message: MessageInput) -> StagedMessage:
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
    From another thread while the reactor runs, use L{send_blocking}.

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
    @raise ValueError: a bad TLS level, timeout or port.
    """

    scheme = "smtp"
    asynchronous = True

    def __init__(self, relay: str | None = None, *, auth: tuple[str, str] | None = None,
                 tls: str = "may", cafile: str | None = None, timeout: float = 60.0,
                 helo: str | None = None, resolver: str | None = None, mx_port: int = 25,
                 reactor: Any = None, client: SMTPClient | None = None) -> None:
        if tls not in TLS_CHOICES:
            raise ValueError(f"tls must be one of {', '.join(TLS_CHOICES)}, not {tls!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if auth is not None:
            if not (isinstance(auth, (tuple, list)) and len(auth) == 2
                    and all(isinstance(x, str) for x in auth)):
                raise ValueError("auth must be (username, password), two str")
            auth = (auth[0], auth[1])
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
        return f"{self.scheme}://{user}{host}?tls={self.tls}"

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
        return api.sendmail(env.sender, env.recipients, env.data, **kwargs)

    def send_blocking(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
                      message_id: str | None = None) -> DeliveryReport:
        """L{send} from a thread other than the reactor's, waiting for the
        report. The reactor must be running in another thread.

        @return: the L{DeliveryReport}.
        @raise RuntimeError: called in the reactor thread (it would wait for
            itself) or the reactor is not running (L{api.blocking_call}).
        """
        report: DeliveryReport = api.blocking_call(
            default_reactor(self.reactor), self.send, sender, recipients, message)
        return report


# -- in memory, files, console, null ------------------------------------------


@dataclass
class SentMessage:
    """A message an in-memory outbox took.

    @ivar message_id: the id L{send} returned. @ivar sender: envelope sender.
    @ivar recipients: envelope recipients. @ivar data: the message bytes.
    """

    message_id: str
    sender: str
    recipients: list
    data: bytes
    _parsed: Any = field(default=None, repr=False, compare=False)

    @property
    def message(self) -> email.message.EmailMessage:
        """The message parsed with C{email.policy.default}
        (an C{email.message.EmailMessage})."""
        if self._parsed is None:
            import email.policy

            self._parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        return self._parsed


class MemoryDelivery(Delivery):
    """An in-memory outbox, for tests: C{outbox} is a list of L{SentMessage}.
    Thread-safe."""

    scheme = "memory"

    def __init__(self) -> None:
        self.outbox: list[SentMessage] = []
        self._lock = threading.Lock()

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Append to C{outbox}. @return: the message id. @raise AddressError, MessageError."""
        env = prepare(sender, recipients, message)
        mid = message_id or new_message_id()
        with self._lock:
            self.outbox.append(SentMessage(mid, env.sender, env.recipients, env.data))
        return mid

    def clear(self) -> None:
        """Empty the outbox."""
        with self._lock:
            self.outbox.clear()


def _envelope_headers(env: Envelope) -> bytes:
    """C{Return-Path} (RFC 5321 4.4) and C{X-Envelope-To} lines, with the
    message's own line end."""
    eol = b"\r\n" if env.data.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    rcpts = ", ".join(env.recipients)
    return (f"Return-Path: <{env.sender}>".encode() + eol
            + f"X-Envelope-To: {rcpts}".encode() + eol)


class FileDelivery(Delivery):
    """One C{.eml} file per message in a folder, named after the message id,
    starting with C{Return-Path} and C{X-Envelope-To} lines (the envelope)
    then the message bytes. Written to a dot file, fsynced, then renamed.

    @param path: the folder (created when missing).
    @raise DeliveryError: at L{send}, when the file cannot be written.
    """

    scheme = "file"

    def __init__(self, path: str):
        if not path:
            raise ValueError("file delivery needs a folder path (file:///tmp/mail)")
        self.path = os.path.abspath(path)

    def url(self) -> str:
        return f"file://{self.path}"

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Write C{ID.eml}. @return: the message id.
        @raise DeliveryError: not written (deferred, 451). @raise AddressError, MessageError."""
        env = prepare(sender, recipients, message)
        mid = message_id or new_message_id()
        final = os.path.join(self.path, mid + ".eml")
        tmp = os.path.join(self.path, "." + mid + ".tmp")
        try:
            os.makedirs(self.path, exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(_envelope_headers(env) + env.data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise DeliveryError(Reply(451, f"4.3.0 cannot write {final}: {e.strerror or e}",
                                      True), env.recipients) from e
        return mid

    def paths(self) -> list[str]:
        """The C{.eml} files in the folder, oldest message id first."""
        try:
            names = sorted(n for n in os.listdir(self.path) if n.endswith(".eml"))
        except FileNotFoundError:
            return []
        return [os.path.join(self.path, n) for n in names]


class ConsoleDelivery(Delivery):
    """Write each message, with its envelope, to a text stream (development).

    @param stream: a text stream; C{sys.stdout} (looked up at each send) when
        L{None}.
    """

    scheme = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def url(self) -> str:
        return "console://?stream=stderr" if self.stream is sys.stderr else "console://"

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Write to the stream. @return: the message id. @raise AddressError, MessageError."""
        env = prepare(sender, recipients, message)
        mid = message_id or new_message_id()
        text = env.data.decode("utf-8", "replace").replace("\r\n", "\n")
        out = (f"---------- {mid} from=<{env.sender}> to={', '.join(env.recipients)}\n"
               f"{text}{'' if text.endswith(chr(10)) else chr(10)}"
               f"---------- end of {mid}\n")
        stream = self.stream if self.stream is not None else sys.stdout
        with self._lock:
            stream.write(out)
            stream.flush()
        return mid


class NullDelivery(Delivery):
    """Validate the envelope and message, then drop them."""

    scheme = "null"

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Validate only. @return: a message id. @raise AddressError, MessageError."""
        prepare(sender, recipients, message)
        return message_id or new_message_id()


# -- a sendmail-compatible command -------------------------------------------

# sysexits.h (BSD), as sendmail-compatible commands use them.
_SYSEXITS = {
    64: ("EX_USAGE", 554, "5.3.5", "command line usage error"),
    65: ("EX_DATAERR", 554, "5.6.0", "data format error"),
    66: ("EX_NOINPUT", 554, "5.3.0", "cannot open input"),
    67: ("EX_NOUSER", 550, "5.1.1", "addressee unknown"),
    68: ("EX_NOHOST", 550, "5.1.2", "host name unknown"),
    69: ("EX_UNAVAILABLE", 451, "4.3.0", "service unavailable"),
    70: ("EX_SOFTWARE", 451, "4.3.0", "internal software error"),
    71: ("EX_OSERR", 451, "4.3.0", "system error"),
    72: ("EX_OSFILE", 451, "4.3.0", "critical OS file missing"),
    73: ("EX_CANTCREAT", 451, "4.3.0", "cannot create output file"),
    74: ("EX_IOERR", 451, "4.3.0", "input/output error"),
    75: ("EX_TEMPFAIL", 451, "4.3.0", "temporary failure"),
    76: ("EX_PROTOCOL", 451, "4.5.0", "remote error in protocol"),
    77: ("EX_NOPERM", 554, "5.7.1", "permission denied"),
    78: ("EX_CONFIG", 451, "4.3.5", "configuration error"),
}


def sysexit_reply(status: int, stderr: str = "") -> Reply:
    """Map a sendmail-compatible command's exit status to a L{Reply}.

    0 is success (250). 64 (usage), 65 (data), 66 (no input), 67 (no such
    user), 68 (no such host) and 77 (no permission) are permanent (5xx); 69,
    70, 71, 72, 73, 74, 75, 76 and 78 are temporary (4xx), as is any other
    status and death by a signal (negative status), so mail is never bounced
    by a command that merely broke. RFC 3463 enhanced codes are included.

    @param status: the exit status (C{subprocess} style: negative for a signal).
    @param stderr: what the command wrote to standard error (its last line is
        added to the text).
    @return: a local L{Reply}.
    """
    detail = stderr.strip().splitlines()[-1].strip() if stderr.strip() else ""
    if status == 0:
        return Reply(250, "2.0.0 accepted by the sendmail command", True)
    if status in _SYSEXITS:
        name, code, enhanced, what = _SYSEXITS[status]
        text = f"{enhanced} sendmail command exited with {status} ({name}: {what})"
    elif status < 0:
        code, text = 451, f"4.3.0 sendmail command killed by signal {-status}"
    else:
        code, text = 451, f"4.3.0 sendmail command exited with {status}"
    if detail:
        text += f": {detail}"
    return Reply(code, text, True)


class SendmailDelivery(Delivery):
    """Pipe the message to a sendmail-compatible command:
    C{COMMAND [ARGS] -oi -f SENDER -- RCPT...} with the message on standard
    input (C{-oi}: a line with a single dot does not end it). Its exit status
    is mapped by L{sysexit_reply}. Blocks until the command exits: from
    Twisted code, call it in a thread.

    @param command: the program, C{/usr/sbin/sendmail} by default.
    @param args: extra arguments before ours (e.g. C{["-C", "/etc/postfix-out"]}).
    @param timeout: seconds before the command is killed (then deferred).
    @param env: extra environment variables for the command.
    @raise ValueError: a relative command path or bad timeout.
    """

    scheme = "sendmail"

    def __init__(self, command: str = "/usr/sbin/sendmail", args: Sequence[str] = (),
                 timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        if not command or not os.path.isabs(command):
            raise ValueError(f"the sendmail command must be an absolute path, not {command!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if isinstance(args, str):
            raise ValueError("args must be a list of str, not one str")
        self.command = command
        self.args = [str(a) for a in args]
        self.timeout = float(timeout)
        self.env = dict(env or {})

    def url(self) -> str:
        return f"sendmail://{self.command}"

    def argv(self, env: Envelope) -> list[str]:
        """The command line for C{env}. The sender is never empty on it:
        the null sender is given as C{-f <>}."""
        return [self.command, *self.args, "-oi", "-f", env.sender or "<>", "--",
                *env.recipients]

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Run the command (blocks up to C{timeout} seconds). @return: the message id.
        @raise DeliveryError: a non-zero exit status (see L{sysexit_reply}), a
            timeout or a command that cannot run (deferred).
        @raise AddressError, MessageError."""
        env = prepare(sender, recipients, message)
        mid = message_id or new_message_id()
        environ = {**os.environ, **self.env} if self.env else None
        try:
            proc = subprocess.run(self.argv(env), input=env.data, capture_output=True,
                                  timeout=self.timeout, env=environ, check=False)
        except subprocess.TimeoutExpired:
            raise DeliveryError(Reply(451, f"4.4.7 sendmail command {self.command} did not "
                                      f"finish in {self.timeout:g} s (killed)", True),
                                env.recipients) from None
        except OSError as e:
            raise DeliveryError(Reply(451, f"4.3.5 cannot run {self.command}: "
                                      f"{e.strerror or e}", True), env.recipients) from e
        if proc.returncode != 0:
            raise DeliveryError(sysexit_reply(proc.returncode,
                                              proc.stderr.decode("utf-8", "replace")),
                                env.recipients)
        return mid


# -- local Maildir and mbox delivery ----------------------------------------


class MaildirDelivery(Delivery):
    """Local delivery into a Maildir with the standard library's
    C{mailbox.Maildir} (every recipient's copy lands in this one folder), with
    C{Return-Path} and C{X-Envelope-To} lines added first (RFC 5321 4.4).

    @param path: the Maildir (created with C{tmp/}, C{new/}, C{cur/} if missing).
    """

    scheme = "maildir"

    def __init__(self, path: str):
        if not path:
            raise ValueError("maildir delivery needs a folder path (maildir:///path)")
        self.path = os.path.abspath(path)

    def url(self) -> str:
        return f"maildir://{self.path}"

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Add to the Maildir. @return: the message id (not the Maildir key).
        @raise DeliveryError: not written (deferred). @raise AddressError, MessageError."""
        import mailbox

        env = prepare(sender, recipients, message)
        mid = message_id or new_message_id()
        try:
            box = mailbox.Maildir(self.path, factory=None, create=True)
            box.add(_to_lf(_envelope_headers(env) + env.data))
        except OSError as e:
            raise DeliveryError(Reply(451, f"4.3.0 cannot deliver to Maildir {self.path}: "
                                      f"{e.strerror or e}", True), env.recipients) from e
        return mid


class MboxDelivery(Delivery):
    """Local delivery into an mbox file with the standard library's
    C{mailbox.mbox}, under its locks (C{fcntl} and dot-lock), the C{From }
    line carrying the envelope sender; then C{Return-Path} and C{X-Envelope-To}
    lines. Line ends are stored as LF.

    @param path: the mbox file (created if missing).
    """

    scheme = "mbox"

    def __init__(self, path: str):
        if not path:
            raise ValueError("mbox delivery needs a file path (mbox:///path)")
        self.path = os.path.abspath(path)

    def url(self) -> str:
        return f"mbox://{self.path}"

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Append to the mbox under its locks. @return: the message id.
        @raise DeliveryError: not written or locked elsewhere (deferred).
        @raise AddressError, MessageError."""
        import mailbox

        env = prepare(sender, recipients, message)
        mid = message_id or new_message_id()
        # Bytes starting with "From " keep their bytes in mailbox.mbox (no
        # re-generation by the email package); ">From " quoting is its own.
        stamp = time.asctime(time.gmtime())
        sender_text = env.sender.encode("utf-8") if env.sender else b"MAILER-DAEMON"
        data = (b"From " + sender_text + b" " + stamp.encode("ascii") + b"\n"
                + _to_lf(_envelope_headers(env) + env.data))
        try:
            box = mailbox.mbox(self.path, create=True)
            box.lock()
            try:
                box.add(data)
                box.flush()
            finally:
                box.unlock()
                box.close()
        except (OSError, mailbox.ExternalClashError) as e:
            raise DeliveryError(Reply(451, f"4.3.0 cannot deliver to mbox {self.path}: {e}",
                                      True), env.recipients) from e
        return mid


def _to_lf(data: bytes) -> bytes:
    """CRLF line ends to LF, the convention of local mailboxes."""
    return data.replace(b"\r\n", b"\n")


# -- configuration ------------------------------------------------------------

_CLASSES = {
    "queue": QueueDelivery,
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
        relay names and MX routing) and without a host C{mx_port}; the port
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
    if scheme not in _CLASSES:
        raise ValueError(f"unknown delivery {scheme or url!r} in {_safe(url)!r}; one of "
                         f"{', '.join(s + '://' for s in _CLASSES)}")
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
    try:
        cls = _CLASSES[scheme]
    except KeyError:
        raise ValueError(f"unknown delivery scheme {scheme!r}; one of "
                         f"{', '.join(_CLASSES)}") from None
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

