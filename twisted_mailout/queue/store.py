"""The queue folder: durable enqueue, pickup, per-recipient state, recovery.

Layout (see docs/queue-format.md)::

    DIR/lock          flock(2) held by the one daemon working on DIR
    DIR/tmp/          enqueue writes here first (Maildir)
    DIR/new/          the drop zone: ready for pickup (Maildir); also cur/
    DIR/messages/QID  a picked-up message: envelope line + message bytes
    DIR/state/QID.json  the state of every recipient, from the first outcome on
    DIR/corrupt/      files that could not be parsed, moved aside

Every function here blocks on the file system; the daemon calls them from a
thread, never from the reactor thread.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field

from twisted.logger import Logger

from twisted_mailout.errors import QueueError, QueueLocked

from twisted_mailout.envelope import (
    FINAL_STATES,
    AddressError,
    RecipientState,
    Reply,
    check_transition,
    parse_address,
    parse_sender,
)
from twisted_mailout.message import MessageError, coerce_message, header_values, prepare_message, remove_headers

__all__ = [
    "ENVELOPE_HEADER",
    "CorruptEntry",
    "MessageError",
    "Queue",
    "QueueEntry",
    "QueueError",
    "QueueLocked",
    "RecipientStatus",
    "StagedMessage",
    "enqueue",
    "enqueue_many",
    "validate_envelope",
]

ENVELOPE_HEADER = b"X-Mailout-Envelope: "
FORMAT_VERSION = 1
DIR_MODE = 0o700
FILE_MODE = 0o600

log = Logger()


@dataclass(frozen=True, slots=True)
class StagedMessage:
    """A message written to C{tmp/} but not yet visible to the daemon.

    @ivar qid: its queue id. @ivar path: the file in C{tmp/}.
    @ivar size: bytes written.
    """

    qid: str
    path: str
    size: int


_libc_syncfs = None


def _syncfs(path: str) -> bool:
    """C{syncfs(2)} the file system holding C{path}; C{False} when the
    platform lacks it (the caller then fsyncs file by file)."""
    global _libc_syncfs
    if _libc_syncfs is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc_syncfs = libc.syncfs
        except (OSError, AttributeError):
            _libc_syncfs = False
    if _libc_syncfs is False:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
    return True


class CorruptEntry(Exception):
    """A queue file that cannot be parsed."""


def _new_queue_id() -> str:
    """A queue id: 13 hex digits of microseconds since the epoch, then 10
    random hex digits. Sorts by arrival; unique without coordination."""
    return f"{time.time_ns() // 1000:013X}{secrets.token_hex(5).upper()}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, data: bytes, sync: bool = True) -> None:
    """Create C{path} with C{data}, fsynced (unless C{sync} is false);
    remove the partial file on error."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)


@dataclass(slots=True)
class RecipientStatus:
    """One recipient of a queued message and where it stands.

    @ivar address: the recipient as given at enqueue (validated).
    @ivar state: a L{RecipientState}.
    @ivar attempts: delivery attempts so far.
    @ivar next_attempt: when a deferred recipient is tried again (seconds
        since the epoch), else L{None}.
    @ivar reply: the last reply, from a server or made locally, or L{None}.
    @ivar relay: the last host tried, C{"host[ip]:port"}, or L{None}.
    """

    address: str
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float | None = None
    reply: Reply | None = None
    relay: str | None = None

    def to_json(self) -> dict:
        """JSON-ready dict (see docs/queue-format.md)."""
        return {
            "address": self.address,
            "state": self.state.value,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "reply": self.reply.to_json() if self.reply else None,
            "relay": self.relay,
        }

    @classmethod
    def from_json(cls, d: dict) -> RecipientStatus:
        """Inverse of L{to_json}. @raise ValueError, KeyError, TypeError: malformed."""
        na = d.get("next_attempt")
        return cls(
            address=str(d["address"]),
            state=RecipientState(d["state"]),
            attempts=int(d.get("attempts", 0)),
            next_attempt=float(na) if na is not None else None,
            reply=Reply.from_json(d.get("reply")),
            relay=d.get("relay"),
        )

    def move(self, new: RecipientState, reply: Reply | None, next_attempt: float | None = None,
             relay: str | None = None) -> None:
        """Change state, checking the transition (L{check_transition}).

        @raise InvalidTransition: for a forbidden change.
        """
        check_transition(self.state, new)
        self.state = new
        self.reply = reply
        self.next_attempt = next_attempt if new is RecipientState.DEFERRED else None
        if relay is not None:
            self.relay = relay


@dataclass(slots=True)
class QueueEntry:
    """A message in the queue: its envelope and the state of each recipient.

    @ivar qid: the queue id.
    @ivar sender: the envelope sender, C{""} for the null sender.
    @ivar arrival: when it was enqueued (seconds since the epoch).
    @ivar body_offset: where the message bytes start in the message file.
    @ivar origin: C{"mailout"}, C{"zope"} or C{"repoze"}.
    @ivar recipients: one L{RecipientStatus} per envelope recipient.
    @ivar eightbit: the message has bytes above 127 (sent with
        C{BODY=8BITMIME}, RFC 6152, where the server offers it).
    @ivar delay_warned: C{True} once a delay warning (RFC 3464 action
        C{delayed}) has been queued for this message.
    @ivar bounced_reported: addresses of bounced recipients already named in
        a delivery status notification that has been queued (so a restart
        never reports them twice).
    """

    qid: str
    sender: str
    arrival: float
    body_offset: int
    origin: str = "mailout"
    recipients: list[RecipientStatus] = field(default_factory=list)
    bounced_reported: list[str] = field(default_factory=list)
    delay_warned: bool = False
    eightbit: bool = False
    #: message bytes after the envelope, when known from pickup (not stored).
    size: int | None = field(default=None, compare=False)

    @property
    def done(self) -> bool:
        """Every recipient is delivered or bounced."""
        return all(r.state in FINAL_STATES for r in self.recipients)

    def due(self, now: float) -> list[RecipientStatus]:
        """Recipients to try at time C{now} (pending, or deferred and due)."""
        out = []
        for r in self.recipients:
            if r.state is RecipientState.PENDING or (
                r.state is RecipientState.DEFERRED and (r.next_attempt or 0) <= now
            ):
                out.append(r)
        return out

    def next_attempt(self) -> float | None:
        """The earliest time a recipient needs an attempt, or L{None} when
        none does. Pending recipients count as due at C{arrival}."""
        times = []
        for r in self.recipients:
            if r.state is RecipientState.PENDING:
                times.append(self.arrival)
            elif r.state is RecipientState.DEFERRED:
                times.append(r.next_attempt or 0.0)
        return min(times) if times else None

    def to_json(self) -> dict:
        """JSON-ready dict (see docs/queue-format.md)."""
        return {
            "v": FORMAT_VERSION,
            "qid": self.qid,
            "sender": self.sender,
            "arrival": self.arrival,
            "body_offset": self.body_offset,
            "origin": self.origin,
            "recipients": [r.to_json() for r in self.recipients],
            "bounced_reported": self.bounced_reported,
            "delay_warned": self.delay_warned,
            "8bit": self.eightbit,
        }

    @classmethod
    def from_json(cls, d: dict) -> QueueEntry:
        """Inverse of L{to_json}.

        @raise CorruptEntry: for anything malformed.
        """
        try:
            if d.get("v") != FORMAT_VERSION:
                raise ValueError(f"unknown state format version {d.get('v')!r}")
            entry = cls(
                qid=str(d["qid"]),
                sender=str(d["sender"]),
                arrival=float(d["arrival"]),
                body_offset=int(d["body_offset"]),
                origin=str(d.get("origin", "mailout")),
                recipients=[RecipientStatus.from_json(r) for r in d["recipients"]],
                bounced_reported=[str(a) for a in d.get("bounced_reported", [])],
                delay_warned=bool(d.get("delay_warned", False)),
                eightbit=bool(d.get("8bit", False)),
            )
            if not entry.recipients:
                raise ValueError("no recipients")
            validate_envelope(entry.sender, [r.address for r in entry.recipients])
            return entry
        except CorruptEntry:
            raise
        except Exception as e:
            raise CorruptEntry(f"malformed state: {e!r}") from e


def validate_envelope(sender, recipients) -> tuple[str, list[str]]:
    """Validate an envelope as enqueue does.

    @param sender: a mailbox, or C{""}/C{"<>"}/L{None} for the null sender.
    @param recipients: an iterable of mailboxes (a C{str} is one recipient).
    @return: C{(sender, recipients)} normalised: C{""} for the null sender,
        duplicates removed.
    @raise AddressError: bad sender or recipient, or no recipients.
    """
    if isinstance(recipients, str):
        recipients = [recipients]
    recipients = list(recipients)
    if not recipients:
        raise AddressError("no recipients")
    snd = parse_sender(sender)
    rcpts = []
    for r in recipients:
        a = parse_address(r)
        s = str(a)
        if s not in rcpts:
            rcpts.append(s)
    return ("" if snd is None else str(snd)), rcpts


class Queue:
    """A queue folder.

    @param path: the folder; created (mode 0700, with its subfolders) when
        C{create} is true and it does not exist.
    @raise QueueError: when the folder is missing (and C{create} is false) or
        cannot be created.
    """

    SUBDIRS = ("tmp", "new", "cur", "messages", "state", "corrupt")

    def __init__(self, path: str, create: bool = True):
        self.path = os.path.abspath(path)
        self._lock_fd: int | None = None
        self._backlog: list[str] = []  # names listed, not yet picked up (newest first)
        if not create:
            if not os.path.isdir(os.path.join(self.path, "new")):
                raise QueueError(f"{self.path} is not a mailout queue folder (no new/ in it)")
            return
        for folder in [self.path, *(os.path.join(self.path, sub) for sub in self.SUBDIRS)]:
            try:
                os.makedirs(folder, mode=DIR_MODE, exist_ok=True)
            except OSError as e:
                raise QueueError(f"cannot create queue folder {folder}: {e.strerror}") from e
            if not os.path.isdir(folder):  # a dangling symlink, or a file through one
                raise QueueError(f"cannot create queue folder {folder}: not a folder")

    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # -- the lock -------------------------------------------------------

    def lock(self) -> None:
        """Take the daemon's lock on this folder (flock on C{DIR/lock}).

        @raise QueueLocked: another process holds it.
        @raise QueueError: the lock file cannot be opened.
        """
        try:
            fd = os.open(self._p("lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise QueueError(f"cannot open {self._p('lock')}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise QueueLocked(
                    f"another mailout daemon is already running on {self.path}"
                ) from None
            raise QueueError(f"cannot lock {self._p('lock')}: {e.strerror}") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock taken by L{lock} (no-op when not held)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- enqueue ----------------------------------------------------------

    def enqueue(self, sender: str | None, recipients, message) -> str:
        """Put one message in the queue, durably (see docs/reliability.md).

        The file is written to C{tmp/}, fsynced, renamed into C{new/}, and
        C{new/} is fsynced; only then is the queue id returned.

        @param sender: envelope sender; C{""}, C{"<>"} or L{None} for null.
        @param recipients: an iterable of recipient addresses (a single
            C{str} is taken as one recipient).
        @param message: C{bytes}, C{str} or C{email.message.Message}.
            Message-ID and Date are added when missing.
        @return: the queue id (C{str}).
        @raise AddressError: a bad sender or recipient, or none.
        @raise MessageError: an empty message.
        @raise QueueError: the message could not be written (nothing is left
            behind in the queue).
        """
        return self.publish([self.stage(sender, recipients, message)])[0]

    def stage(self, sender: str | None, recipients, message, sync: bool = True) -> StagedMessage:
        """Write a message into C{tmp/} where the daemon does not see it yet:
        the first phase of a two-phase enqueue (L{publish} or L{discard}
        ends it). Used by send-on-commit (the C{vote} phase) and by
        L{enqueue_many}.

        @param sync: fsync the file now (C{False} when the caller syncs a
            whole batch at once with L{sync_staged}).
        @return: a L{StagedMessage}.
        @raise AddressError, MessageError: as L{enqueue}; nothing is written.
        @raise QueueError: the file could not be written (nothing is left).
        """
        sender, rcpts = validate_envelope(sender, recipients)
        data = coerce_message(message)
        data = prepare_message(data, parse_sender(sender).ascii_domain if sender else None)
        qid = _new_queue_id()
        head = ENVELOPE_HEADER + json.dumps(
            {"v": FORMAT_VERSION, "sender": sender, "recipients": rcpts, "arrival": time.time(),
             **({"8bit": True} if not data.isascii() else {})},
            separators=(",", ":"),
        ).encode("ascii") + b"\n"
        tmp = self._p("tmp", qid)
        try:
            _write_durably(tmp, head + data, sync=sync)
        except OSError as e:
            raise QueueError(f"cannot write to queue {self.path}: {e.strerror or e}") from e
        return StagedMessage(qid, tmp, len(head) + len(data))

    def sync_staged(self, staged: list[StagedMessage]) -> None:
        """Make staged files durable in one step: C{syncfs(2)} on the queue's
        file system when the platform has it, else one fsync per file.

        @raise QueueError: the sync failed.
        """
        try:
            if not _syncfs(self._p("tmp")):
                for s in staged:
                    fd = os.open(s.path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        except OSError as e:
            raise QueueError(f"cannot sync queue {self.path}: {e.strerror or e}") from e

    def publish(self, staged: list[StagedMessage]) -> list[str]:
        """Make staged (and synced) messages visible to the daemon: rename
        each into C{new/}, then fsync C{new/} once.

        @return: the queue ids, in order.
        @raise QueueError: a rename or the folder sync failed; the messages
            not yet renamed are removed from C{tmp/}, those renamed may be
            delivered (the caller must treat the batch as failed).
        """
        done = 0
        try:
            for s in staged:
                os.rename(s.path, self._p("new", s.qid))
                done += 1
            _fsync_dir(self._p("new"))
        except OSError as e:
            self.discard(staged[done:])
            raise QueueError(f"cannot write to queue {self.path}: {e.strerror or e}") from e
        return [s.qid for s in staged]

    def discard(self, staged: list[StagedMessage]) -> None:
        """Remove staged messages that will not be published (abort)."""
        for s in staged:
            try:
                os.unlink(s.path)
            except FileNotFoundError:
                pass
            except OSError as e:  # left for recovery's tmp/ sweep
                log.warn("cannot remove staged {path}: {err}", path=s.path, err=e)

    def enqueue_many(self, items) -> list[str]:
        """Enqueue a batch durably with one file-system sync and one folder
        fsync for the whole batch, instead of two fsyncs per message.

        All or nothing: every item is validated before anything is written,
        and on any error nothing from the batch is left in the queue.

        @param items: iterable of C{(sender, recipients, message)} tuples,
            each as for L{enqueue}.
        @return: the queue ids, in the order given.
        @raise AddressError, MessageError: a bad item (its index is in the
            message); nothing written.
        @raise QueueError: writing failed; nothing left in the queue.
        """
        items = list(items)
        for i, item in enumerate(items):
            try:
                sender, recipients, message = item
            except (TypeError, ValueError):
                raise TypeError(f"item {i}: expected (sender, recipients, message)") from None
            try:
                validate_envelope(sender, recipients)
                if not coerce_message(message).strip():
                    raise MessageError("empty message")
            except (AddressError, MessageError) as e:
                raise type(e)(f"item {i}: {e}") from None
        staged: list[StagedMessage] = []
        try:
            for sender, recipients, message in items:
                staged.append(self.stage(sender, recipients, message, sync=False))
            self.sync_staged(staged)
        except BaseException:
            self.discard(staged)
            raise
        return self.publish(staged)

    # -- pickup -------------------------------------------------------------

    def incoming(self) -> list[str]:
        """Names waiting for pickup, as C{"new/NAME"} or C{"cur/NAME"}, oldest
        name first; dot files (another program's work in progress) skipped."""
        out = []
        for sub in ("new", "cur"):
            try:
                names = os.listdir(self._p(sub))
            except FileNotFoundError:
                continue
            out.extend(f"{sub}/{n}" for n in names if not n.startswith("."))
        out.sort(key=lambda s: s.split("/", 1)[1])
        return out

    def pickup(self, name: str) -> QueueEntry | None:
        """Move one dropped file into the active queue (see L{pickup_all})."""
        entry = self._pickup_one(name)
        self._sync_pickup()
        return entry

    def pickup_all(self, limit: int | None = None) -> tuple[list[QueueEntry], list[str]]:
        """Pick up everything waiting in C{new/} and C{cur/}, in arrival order.

        Our own files are renamed into C{messages/}; zope.sendmail and
        repoze.sendmail files are rewritten (fsynced) without their envelope
        lines. No state file is written: a message without one has every
        recipient pending (its envelope line says who they are). The folders
        are fsynced once for the whole batch, before this returns.

        @param limit: pick up at most this many files (L{None}: all).
        @return: C{(entries, problems)}: the new entries, and one line per
            file moved to C{corrupt/} or that could not be read.
        """
        entries, problems = [], []
        if not self._backlog:
            # One listing serves every batch until it is used up: listing
            # (and sorting) a folder of 100,000 names per batch of 1,000
            # would make pickup quadratic. Files arriving meanwhile are
            # found by the next listing.
            try:
                self._backlog = self.incoming()
            except OSError as e:
                return [], [f"cannot list {self.path}/new or cur: {e}"]
            self._backlog.reverse()  # pop() from the end gives the oldest first
        n = len(self._backlog) if limit is None else min(limit, len(self._backlog))
        names = [self._backlog.pop() for _ in range(n)]
        try:
            for name in names:
                try:
                    e = self._pickup_one(name)
                except CorruptEntry as err:
                    problems.append(f"{name}: moved to corrupt/: {err}")
                    continue
                except FileNotFoundError:
                    continue
                except OSError as err:
                    problems.append(f"{name}: cannot pick up: {err}")
                    continue
                if e is not None:
                    entries.append(e)
        finally:
            if names:
                self._sync_pickup()
        return entries, problems

    def _sync_pickup(self) -> None:
        for sub in ("messages", "new", "cur"):
            _fsync_dir(self._p(sub))

    def _pickup_one(self, name: str) -> QueueEntry | None:
        """@return: the entry, or L{None} when the file had already been
        picked up (only the removal of a rewritten source was interrupted).
        @raise CorruptEntry: moved to C{corrupt/}. @raise OSError."""
        src = self._p(name)
        base = name.split("/", 1)[1]
        with open(src, "rb") as f:
            first = f.read(65536)
            try:
                entry, rewrite = self._parse_dropped(base, first, f, src)
            except CorruptEntry as e:
                self._move_corrupt(src, base, str(e))
                raise
            total = os.fstat(f.fileno()).st_size
        msg_path = self._p("messages", entry.qid)
        if rewrite is None:
            os.rename(src, msg_path)
            entry.size = total - entry.body_offset
            return entry
        if os.path.exists(msg_path):
            os.unlink(src)
            return None
        tmp = self._p("tmp", "." + entry.qid + ".pickup")
        if os.path.exists(tmp):
            os.unlink(tmp)
        _write_durably(tmp, rewrite)
        os.rename(tmp, msg_path)
        os.unlink(src)
        entry.size = len(rewrite) - entry.body_offset
        return entry

    def _parse_dropped(self, base: str, first: bytes, f, src: str):
        """@return: C{(entry, rewritten_bytes_or_None)}. @raise CorruptEntry."""
        if first.startswith(ENVELOPE_HEADER):
            end = first.find(b"\n")
            if end < 0:
                raise CorruptEntry("envelope line not terminated")
            try:
                env = json.loads(first[len(ENVELOPE_HEADER) : end])
                sender, rcpts = validate_envelope(env["sender"], env["recipients"])
                arrival = float(env.get("arrival", time.time()))
            except (ValueError, KeyError, TypeError, AddressError) as e:
                raise CorruptEntry(f"bad envelope line: {e}") from e
            qid = base if _is_safe_qid(base) else _foreign_qid(base)
            if os.fstat(f.fileno()).st_size <= end + 1:
                raise CorruptEntry("no message after the envelope line")
            origin = env.get("origin", "mailout")
            if origin not in ("mailout", "zope", "repoze"):
                raise CorruptEntry(f"unknown origin {origin!r} in the envelope line")
            entry = self._entry(qid, sender, rcpts, arrival, end + 1, origin)
            entry.eightbit = bool(env.get("8bit", False))
            return entry, None
        # Foreign formats are small; read them whole and rewrite them.
        data = first + f.read()
        arrival = os.fstat(f.fileno()).st_mtime
        if data.startswith(b"X-Zope-From:"):
            try:
                line1, line2, rest = data.split(b"\n", 2)
            except ValueError:
                raise CorruptEntry("zope.sendmail file without X-Zope-To line") from None
            if not line2.startswith(b"X-Zope-To:"):
                raise CorruptEntry("zope.sendmail file without X-Zope-To line")
            try:
                sender = line1[len(b"X-Zope-From:") :].strip().decode("utf-8")
                rcpts_raw = line2[len(b"X-Zope-To:") :].strip().decode("utf-8")
                sender, rcpts = validate_envelope(
                    sender, [r.strip() for r in rcpts_raw.split(",") if r.strip()]
                )
            except (UnicodeDecodeError, AddressError) as e:
                raise CorruptEntry(f"bad zope.sendmail envelope: {e}") from e
            origin, body = "zope", rest
        else:
            froms = header_values(data, "X-Actually-From")
            tos = header_values(data, "X-Actually-To")
            if not (froms and tos):
                raise CorruptEntry(
                    "no envelope: neither X-Mailout-Envelope, X-Zope-From/X-Zope-To "
                    "nor X-Actually-From/X-Actually-To"
                )
            try:
                sender, rcpts = validate_envelope(
                    froms[0].strip(), [r.strip() for r in tos[0].split(",") if r.strip()]
                )
            except AddressError as e:
                raise CorruptEntry(f"bad repoze.sendmail envelope: {e}") from e
            origin = "repoze"
            body = remove_headers(data, ["X-Actually-From", "X-Actually-To"])
        if not body.strip():
            raise CorruptEntry("empty message")
        qid = _foreign_qid(base)
        head = ENVELOPE_HEADER + json.dumps(
            {"v": FORMAT_VERSION, "sender": sender, "recipients": rcpts, "arrival": arrival,
             "origin": origin, "source": base, **({"8bit": True} if not body.isascii() else {})},
            separators=(",", ":"),
        ).encode("ascii") + b"\n"
        entry = self._entry(qid, sender, rcpts, arrival, len(head), origin)
        entry.eightbit = not body.isascii()
        return entry, head + body

    @staticmethod
    def _entry(qid, sender, rcpts, arrival, offset, origin) -> QueueEntry:
        return QueueEntry(
            qid=qid,
            sender=sender,
            arrival=arrival,
            body_offset=offset,
            origin=origin,
            recipients=[RecipientStatus(a) for a in rcpts],
        )

    def _move_corrupt(self, src: str, base: str, why: str) -> None:
        dst = self._p("corrupt", base)
        if os.path.exists(dst):
            dst = dst + "." + secrets.token_hex(3)
        try:
            os.rename(src, dst)
            with open(dst + ".reason", "w") as f:
                f.write(why + "\n")
        except OSError:
            pass

    # -- state --------------------------------------------------------------

    def save(self, entry: QueueEntry) -> None:
        """Replace the state file of C{entry} atomically (tmp, fsync, rename,
        fsync of C{state/}).

        @raise OSError: the write failed; the old state stays in place.
        """
        self.save_many([entry])

    def save_many(self, entries: list[QueueEntry]) -> None:
        """L{save} for several entries, with one fsync of C{state/} for all
        (group commit): each file is written to a C{.tmp}, fsynced and renamed.

        @raise OSError: a write failed; every entry not yet renamed keeps
            its old state.
        """
        for entry in entries:
            path = self._p("state", entry.qid + ".json")
            tmp = path + ".tmp"
            data = json.dumps(entry.to_json(), separators=(",", ":")).encode("utf-8")
            if os.path.exists(tmp):
                os.unlink(tmp)
            _write_durably(tmp, data)
            os.rename(tmp, path)
        _fsync_dir(self._p("state"))

    def load(self, qid: str) -> QueueEntry:
        """Read the state of C{qid}; a message that has no state file yet has
        every recipient pending, as its envelope line says.

        @raise CorruptEntry: unreadable or malformed state or envelope.
        @raise FileNotFoundError: no such entry.
        """
        try:
            with open(self._p("state", qid + ".json"), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return self._fresh_entry(qid)
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise CorruptEntry(f"state file of {qid} is not JSON: {e}") from e
        if not isinstance(d, dict):
            raise CorruptEntry(f"state file of {qid} is not a JSON object")
        return QueueEntry.from_json(d)

    def _fresh_entry(self, qid: str) -> QueueEntry:
        path = self._p("messages", qid)
        with open(path, "rb") as f:
            entry, _ = self._parse_dropped(qid, f.read(65536), f, path)
        entry.qid = qid
        return entry

    def remove(self, qid: str) -> None:
        """Remove a finished entry: the message first, then its state, so a
        crash in between leaves a state without message, which L{recover}
        deletes (see docs/reliability.md)."""
        self.remove_many([qid])

    def remove_many(self, qids: list[str]) -> None:
        """L{remove} for several entries: every message, then every state,
        then one fsync of each folder (group commit)."""
        removed = {"messages": 0, "state": 0}
        for folder, suffix in (("messages", ""), ("state", ".json")):
            for qid in qids:
                try:
                    os.unlink(self._p(folder, qid + suffix))
                    removed[folder] += 1
                except FileNotFoundError:
                    pass  # mail finished at its first attempt never had a state file
        _fsync_dir(self._p("messages"))
        if removed["state"]:
            _fsync_dir(self._p("state"))

    def quarantine(self, qid: str, why: str) -> None:
        """Move the state and message of C{qid} to C{corrupt/}, with the
        reason in a C{.reason} file beside them."""
        self._move_corrupt(self._p("state", qid + ".json"), qid + ".json", why)
        self._move_corrupt(self._p("messages", qid), qid, why)

    def message_path(self, qid: str) -> str:
        """The path of the message file of C{qid} (its bytes start at the
        entry's C{body_offset})."""
        return self._p("messages", qid)

    def read_message(self, entry: QueueEntry) -> bytes:
        """The whole message bytes of C{entry} (envelope line excluded). For
        small messages and bounces; delivery streams from L{message_path}."""
        with open(self.message_path(entry.qid), "rb") as f:
            f.seek(entry.body_offset)
            return f.read()

    def read_headers(self, entry: QueueEntry, limit: int = 256 * 1024) -> bytes:
        """The header block of the message of C{entry}, at most C{limit} bytes."""
        with open(self.message_path(entry.qid), "rb") as f:
            f.seek(entry.body_offset)
            data = f.read(limit)
        for sep in (b"\r\n\r\n", b"\n\n"):
            i = data.find(sep)
            if i >= 0:
                return data[: i + len(sep) // 2]
        return data

    def recover(self) -> tuple[list[tuple[str, float | None]], list[str]]:
        """Find every active message at start and repair what a crash left.

        Removes leftover C{tmp/} files of enqueue (never acknowledged), state
        files whose message is gone (finished: the message is removed first),
        and unfinished C{.tmp} state writes; moves a corrupt state and its
        message to C{corrupt/}. Only state files are read: a message without
        one is pending, due at once, and is not opened here (so a queue of
        100,000 fresh messages starts after one directory listing).

        @return: C{(due, problems)}: C{(qid, when)} per active message, with
            C{when} the next attempt time (seconds since the epoch) or L{None}
            for "now"; and one human-readable line per repair made.
        """
        problems = []
        for name in os.listdir(self._p("tmp")):
            path = self._p("tmp", name)
            try:
                if name.startswith(".") or time.time() - os.stat(path).st_mtime > 36 * 3600:
                    os.unlink(path)
                    problems.append(f"removed stale tmp/{name}")
            except OSError:
                pass
        messages = {n for n in os.listdir(self._p("messages")) if not n.startswith(".")}
        states = set()
        for name in sorted(os.listdir(self._p("state"))):
            path = self._p("state", name)
            if name.endswith(".tmp"):
                os.unlink(path)
                problems.append(f"removed unfinished state write state/{name}")
            elif name.endswith(".json"):
                qid = name[: -len(".json")]
                if qid in messages:
                    states.add(qid)
                else:
                    os.unlink(path)
                    problems.append(f"{qid}: removed the state of a finished message")
        due: list[tuple[str, float | None]] = []
        for qid in sorted(messages):
            if qid not in states:
                due.append((qid, None))
                continue
            try:
                due.append((qid, self.load(qid).next_attempt()))
            except (CorruptEntry, OSError) as e:
                self.quarantine(qid, str(e))
                problems.append(f"{qid}: moved to corrupt/: {e}")
        return due, problems

    def incoming_entries(self) -> list[tuple[str, QueueEntry]]:
        """Files waiting in C{new/} and C{cur/}, parsed but left in place
        (for C{mailout queue list}); unparseable ones are skipped.

        @return: C{[(name, entry), ...]}.
        """
        out = []
        for name in self.incoming():
            path = self._p(name)
            try:
                with open(path, "rb") as f:
                    entry, _ = self._parse_dropped(name.split("/", 1)[1], f.read(65536), f, path)
            except (CorruptEntry, OSError):
                continue
            out.append((name, entry))
        return out

    def entries(self) -> list[QueueEntry]:
        """Every entry in the active queue, read-only (for C{mailout queue list});
        unreadable ones are skipped."""
        out = []
        for qid in sorted(os.listdir(self._p("messages"))):
            if not qid.startswith("."):
                try:
                    out.append(self.load(qid))
                except (CorruptEntry, OSError):
                    pass
        return out


def _is_safe_qid(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() for c in name) and name.isascii()


def _foreign_qid(name: str) -> str:
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=11)
    return "F" + digest.hexdigest().upper()


def enqueue_many(queue_dir: str, items) -> list[str]:
    """Put a batch of messages in the queue folder C{queue_dir} with one
    file-system sync for the batch (see L{Queue.enqueue_many}); no reactor.

    @param items: iterable of C{(sender, recipients, message)} tuples.
    @return: the queue ids, in order.
    @raise AddressError, MessageError: a bad item; nothing is written.
    @raise QueueError: the folder cannot be created or written; nothing of
        the batch is left in the queue.
    """
    return Queue(queue_dir).enqueue_many(items)


def enqueue(queue_dir: str, sender: str | None, recipients, message) -> str:
    """Put a message in the queue folder C{queue_dir}; no reactor needed.

    Safe from any thread or process. The message is on disk (fsynced, renamed
    into C{new/}, folder fsynced) before this returns.

    @param queue_dir: the queue folder (created if missing).
    @param sender: envelope sender (MAIL FROM); C{""}/L{None} for null.
    @param recipients: iterable of recipient addresses (RCPT TO).
    @param message: C{bytes}, C{str} or C{email.message.Message}.
    @return: the queue id.
    @raise AddressError: bad sender or recipient address, or no recipients.
    @raise MessageError: empty message.
    @raise QueueError: the folder cannot be created or written.
    """
    return Queue(queue_dir).enqueue(sender, recipients, message)

