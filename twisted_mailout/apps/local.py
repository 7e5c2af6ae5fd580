"""Deliveries that need no network: an in-memory outbox, files, the console,
null, a sendmail-compatible command, and local Maildir and mbox delivery.

Every one is synchronous: C{send} returns the message id once the message is
where it puts it, or raises L{DeliveryError}. Import them from
L{twisted_mailout.apps.deliveries}, which also chooses them by URL.
"""

from __future__ import annotations

import email.message
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from twisted_mailout.apps.base import (
    Delivery,
    Envelope,
    MessageInput,
    Recipients,
    new_message_id,
    prepare,
)
from twisted_mailout.envelope import Reply
from twisted_mailout.errors import DeliveryError

__all__ = [
    "ConsoleDelivery",
    "FileDelivery",
    "MaildirDelivery",
    "MboxDelivery",
    "MemoryDelivery",
    "NullDelivery",
    "SendmailDelivery",
    "SentMessage",
    "sysexit_reply",
]


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
