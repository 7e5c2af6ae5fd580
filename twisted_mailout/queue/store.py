"""The queue folder: the filesystem implementation of L{IQueueStore}.

Layout (see docs/queue-format.md)::

    DIR/lock          flock(2) held by the one daemon working on DIR
    DIR/tmp/          enqueue writes here first (Maildir)
    DIR/new/          the drop zone: ready for pickup (Maildir); also cur/
    DIR/messages/QID  a picked-up message: envelope line + message bytes
    DIR/state/QID.json  the state of every recipient, from the first outcome on
    DIR/corrupt/      files that could not be parsed, moved aside

One daemon works on a folder at a time (L{Queue.lock}), so its leases are
trivial: they never expire, L{Queue.renew} and L{Queue.release} do nothing.
Enqueueing needs no lock: any process may write into C{tmp/} and C{new/}.

Every method blocks on the file system; the daemon calls them from a thread,
never from the reactor thread, except L{Queue.open_body} (see
L{twisted_mailout.queue.interface}). The data model is in
L{twisted_mailout.queue.model}, the durable-write primitives in
L{twisted_mailout.queue.durable}, the zope/repoze formats in
L{twisted_mailout.queue.foreign}.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from twisted.logger import Logger

from twisted_mailout.envelope import validate_envelope
from twisted_mailout.message import MessageError
from twisted_mailout.queue.durable import (
    DIR_MODE,
    FILE_MODE,
    fsync_dir,
    fsync_file,
    syncfs,
    write_durably,
)
from twisted_mailout.queue.foreign import foreign_qid, rewrite_foreign
from twisted_mailout.queue.interface import IQueueStore, enqueue_staged
from twisted_mailout.queue.model import (
    ENVELOPE_HEADER,
    CorruptEntry,
    EntryNotFound,
    Lease,
    ListedEntry,
    Pickup,
    QueueEntry,
    QueueError,
    QueueLocked,
    RecipientStatus,
    Recovery,
    StagedMessage,
    Suspension,
    header_block,
    is_safe_qid,
    new_queue_id,
    parse_envelope_line,
    queued_bytes,
)

__all__ = [
    "ENVELOPE_HEADER",
    "CorruptEntry",
    "EntryNotFound",
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

log = Logger()

# Compatibility names for one release (benchmarks and applications used them).
_new_queue_id = new_queue_id
_write_durably = write_durably

#: A staged file older than this (seconds) is removed at recovery: its
#: writer is gone (send-on-commit's vote to finish is seconds, not hours).
STALE_STAGED = 36 * 3600
_FOREVER = Lease("", float("inf"))


class Queue:
    """A queue folder (implements L{IQueueStore}).

    @param path: the folder; created (mode 0700, with its subfolders) when
        C{create} is true and it does not exist.
    @param create: create missing folders; when false, the folder must
        already be a queue folder (C{mailout queue list}).
    @param owner: the owner id of this store object (for the interface; the
        folder's lock, not leases, keeps daemons apart). Default: the pid.
    @raise QueueError: when the folder is missing (and C{create} is false) or
        cannot be created.
    """

    SUBDIRS = ("tmp", "new", "cur", "messages", "state", "corrupt")
    #: Leases never expire: one daemon holds the folder (L{lock}).
    lease_duration: float | None = None
    #: Bytes of small messages kept from their pickup until their first
    #: attempt (L{open_body}), so sending does not read the file again.
    BODY_CACHE = 8 * 1024 * 1024

    def __init__(self, path: str, create: bool = True, owner: str | None = None) -> None:
        self.path = os.path.abspath(path)
        self.location = self.path
        self.owner = owner or f"pid-{os.getpid()}"
        self._lease = Lease(self.owner, float("inf"))
        self._lock_fd: int | None = None
        self._backlog: list[str] = []  # names listed, not yet picked up (newest first)
        # message bytes read whole at pickup, for the first open_body (one
        # open, read and close less per message); at most BODY_CACHE bytes
        self._bodies: dict[str, bytes] = {}
        self._body_bytes = 0
        self._body_lock = threading.Lock()
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

    def _path(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # -- the lock -------------------------------------------------------

    @property
    def lock_path(self) -> str:
        """The file L{lock} holds: C{DIR/lock}."""
        return self._path("lock")

    def _held_by_another(self) -> str:
        return f"another mailout daemon is already running on {self.path}"

    def mine(self, name: str) -> bool:
        """Whether the file or queue id C{name} belongs to this store: always
        for a whole folder (a worker's share says otherwise, L{ShardQueue
        <twisted_mailout.queue.shard.ShardQueue>})."""
        return True

    def lock(self) -> None:
        """Take the daemon's lock on this folder (flock on L{lock_path}) and
        write this process's pid into it (see L{write_pid}).

        @raise QueueLocked: another process holds it.
        @raise QueueError: the lock file cannot be opened.
        """
        path = self.lock_path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise QueueError(f"cannot open {path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise QueueLocked(self._held_by_another()) from None
            raise QueueError(f"cannot lock {path}: {e.strerror}") from e
        self._lock_fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        """Write this process's pid into the held lock file. The lock is
        inherited across twistd's fork when it daemonizes, so the daemon
        calls this again once it runs in its final process.

        @raise OSError: the write failed. No-op when the lock is not held.
        """
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def unlock(self) -> None:
        """Release the lock taken by L{lock} (no-op when not held)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- enqueue ----------------------------------------------------------

    def enqueue(self, sender: str | None, recipients: Any, message: object) -> str:
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

    def stage(self, sender: str | None, recipients: Any, message: object,
              sync: bool = True) -> StagedMessage:
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
        _, _, data = queued_bytes(sender, recipients, message, time.time())
        qid = new_queue_id()
        tmp = self._path("tmp", qid)
        try:
            write_durably(tmp, data, sync=sync)
        except OSError as e:
            raise QueueError(f"cannot write to queue {self.path}: {e.strerror or e}") from e
        return StagedMessage(qid, tmp, len(data))

    def sync_staged(self, staged: Sequence[StagedMessage]) -> None:
        """Make staged files durable in one step: C{syncfs(2)} on the queue's
        file system when the platform has it, else one fsync per file.

        @raise QueueError: the sync failed.
        """
        try:
            if not syncfs(self._path("tmp")):
                for s in staged:
                    fsync_file(s.path)
        except OSError as e:
            raise QueueError(f"cannot sync queue {self.path}: {e.strerror or e}") from e

    def publish(self, staged: Sequence[StagedMessage]) -> list[str]:
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
                os.rename(s.path, self._path("new", s.qid))
                done += 1
            fsync_dir(self._path("new"))
        except OSError as e:
            self.discard(staged[done:])
            raise QueueError(f"cannot write to queue {self.path}: {e.strerror or e}") from e
        return [s.qid for s in staged]

    def discard(self, staged: Sequence[StagedMessage]) -> None:
        """Remove staged messages that will not be published (abort)."""
        for s in staged:
            try:
                os.unlink(s.path)
            except FileNotFoundError:
                pass
            except OSError as e:  # left for recovery's tmp/ sweep
                log.warn("cannot remove staged {path}: {err}", path=s.path, err=e)

    def enqueue_many(self, items: Iterable[tuple[Any, Any, Any]]) -> list[str]:
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
        return enqueue_staged(self, items)

    # -- pickup -------------------------------------------------------------

    def incoming(self) -> list[str]:
        """Names waiting for pickup, as C{"new/NAME"} or C{"cur/NAME"}, oldest
        name first; dot files (another program's work in progress) skipped."""
        out: list[str] = []
        for sub in ("new", "cur"):
            try:
                names = os.listdir(self._path(sub))
            except FileNotFoundError:
                continue
            out.extend(f"{sub}/{n}" for n in names if not n.startswith(".") and self.mine(n))
        out.sort(key=lambda s: s.split("/", 1)[1])
        return out

    def backlog(self) -> int:
        """Files listed by the last pickup and not yet picked up (no I/O:
        the C{incoming} count of the metrics between two pickups)."""
        return len(self._backlog)

    def pickup(self, limit: int | None = None) -> Pickup:
        """Pick up what waits in C{new/} and C{cur/}, in arrival order.

        Our own files are renamed into C{messages/}; zope.sendmail and
        repoze.sendmail files are rewritten (fsynced) without their envelope
        lines. No state file is written: a message without one has every
        recipient pending (its envelope line says who they are). The folders
        are fsynced once for the whole batch, before this returns. (No lease
        ever expires here, so nothing is taken over.)

        @param limit: pick up at most this many files (L{None}: all).
        @return: a L{Pickup}: the new entries (C{size} set), and one line per
            file moved to C{corrupt/} or that could not be read.
        """
        entries: list[QueueEntry] = []
        problems: list[str] = []
        if not self._backlog:
            # One listing serves every batch until it is used up: listing
            # (and sorting) a folder of 100,000 names per batch of 1,000
            # would make pickup quadratic. Files arriving meanwhile are
            # found by the next listing.
            try:
                self._backlog = self.incoming()
            except OSError as err:
                return Pickup([], [f"cannot list {self.path}/new or cur: {err}"])
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
                    e.lease = self._lease
                    entries.append(e)
        finally:
            if names:
                self._sync_pickup()
        return Pickup(entries, problems)

    def pickup_all(self, limit: int | None = None) -> Pickup:
        """The old name of L{pickup} (kept for one release)."""
        return self.pickup(limit)

    def _sync_pickup(self) -> None:
        for sub in ("messages", "new", "cur"):
            fsync_dir(self._path(sub))

    def _pickup_one(self, name: str) -> QueueEntry | None:
        """@return: the entry, or L{None} when the file had already been
        picked up (only the removal of a rewritten source was interrupted).
        @raise CorruptEntry: moved to C{corrupt/}. @raise OSError."""
        src = self._path(name)
        base = name.split("/", 1)[1]
        with open(src, "rb") as f:
            first = f.read(65536)
            try:
                entry, rewrite = self._parse_dropped(base, first, f)
            except CorruptEntry as e:
                self._move_corrupt(src, base, str(e))
                raise
            total = os.fstat(f.fileno()).st_size
        msg_path = self._path("messages", entry.qid)
        if rewrite is None:
            os.rename(src, msg_path)
            entry.size = total - entry.body_offset
            if len(first) == total:  # read whole: keep it for the first send
                self._keep_body(entry.qid, first[entry.body_offset:])
            return entry
        if os.path.exists(msg_path):
            os.unlink(src)
            return None
        tmp = self._path("tmp", "." + entry.qid + ".pickup")
        if os.path.exists(tmp):
            os.unlink(tmp)
        write_durably(tmp, rewrite)
        os.rename(tmp, msg_path)
        os.unlink(src)
        entry.size = len(rewrite) - entry.body_offset
        return entry

    def _parse_dropped(self, base: str, first: bytes,
                       f: BinaryIO) -> tuple[QueueEntry, bytes | None]:
        """@return: C{(entry, rewritten_bytes_or_None)}. @raise CorruptEntry."""
        st = os.fstat(f.fileno())
        if first.startswith(ENVELOPE_HEADER):
            line = parse_envelope_line(first, time.time())
            if st.st_size <= line.length:
                raise CorruptEntry("no message after the envelope line")
            qid = base if is_safe_qid(base) else foreign_qid(base)
            return QueueEntry.pending(qid, line), None
        # Foreign formats are small; read them whole and rewrite them.
        return rewrite_foreign(base, first + f.read(), st.st_mtime)

    def _move_corrupt(self, src: str, base: str, why: str) -> None:
        """Move C{src} to C{corrupt/} with a C{.reason} file; a failure is
        logged (the file then stays where it is, and is tried again)."""
        dst = self._path("corrupt", base)
        if os.path.exists(dst):
            dst = dst + "." + secrets.token_hex(3)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return  # nothing to move (a message without state file, say)
        except OSError as e:
            log.error("cannot move {src} to corrupt/ ({why}): {err}", src=src, why=why,
                      err=e.strerror or e)
            return
        try:
            with open(dst + ".reason", "w") as f:
                f.write(why + "\n")
        except OSError as e:
            log.error("moved {src} to {dst}, but cannot write its reason ({why}): {err}",
                      src=src, dst=dst, why=why, err=e.strerror or e)

    # -- leases (trivial: the folder lock keeps other daemons out) --------------

    def recover(self) -> Recovery:
        """Find every active message at start and repair what a crash left.

        Removes leftover C{tmp/} files of enqueue (never acknowledged), state
        files whose message is gone (finished: the message is removed first),
        and unfinished C{.tmp} state writes; moves a corrupt state and its
        message to C{corrupt/}. Only state files are read: a message without
        one is pending, due at once, and is not opened here (so a queue of
        100,000 fresh messages starts after one directory listing).

        @return: a L{Recovery}: C{(qid, when)} per active message, with
            C{when} the next attempt time (seconds since the epoch) or L{None}
            for "now"; and one human-readable line per repair made.
        """
        problems = self._recover_tmp()
        messages = {n for n in os.listdir(self._path("messages"))
                    if not n.startswith(".") and self.mine(n)}
        states = set()
        for name in sorted(os.listdir(self._path("state"))):
            if not self.mine(name.split(".", 1)[0]):
                continue
            path = self._path("state", name)
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
        on_hold: list[str] = []
        for qid in sorted(messages):
            if qid not in states:
                due.append((qid, None))
                continue
            try:
                state = self._load_state(qid)
                if state.held:  # held mail waits for release, unscheduled
                    on_hold.append(qid)
                else:
                    due.append((qid, state.next_attempt()))
            except (CorruptEntry, OSError) as e:
                self.quarantine(qid, str(e))
                problems.append(f"{qid}: moved to corrupt/: {e}")
        return Recovery(due, problems, on_hold)

    def _recover_tmp(self) -> list[str]:
        """Remove what enqueue and pickup left in C{tmp/}: dot files (an
        interrupted pickup rewrite) at once, others after L{STALE_STAGED}
        seconds. @return: one line per file removed."""
        problems = []
        for name in os.listdir(self._path("tmp")):
            path = self._path("tmp", name)
            try:
                if name.startswith(".") or time.time() - os.stat(path).st_mtime > STALE_STAGED:
                    os.unlink(path)
                    problems.append(f"removed stale tmp/{name}")
            except OSError:
                pass
        return problems

    def renew(self) -> float:
        """Leases never expire here. @return: C{float("inf")}."""
        return float("inf")

    def release(self, qids: Sequence[str]) -> None:
        """Nothing to release: the folder's lock is released by L{unlock}."""

    # -- state --------------------------------------------------------------

    def save(self, entry: QueueEntry) -> None:
        """L{save_many} for one entry."""
        self.save_many([entry])

    def save_many(self, entries: Sequence[QueueEntry]) -> None:
        """Replace the state file of each entry atomically (tmp, fsync,
        rename), with one fsync of C{state/} for all (group commit).

        @raise OSError: a write failed; every entry not yet renamed keeps
            its old state.
        """
        if self._bodies:  # tried: a retry, much later, reads the file
            self._drop_bodies(e.qid for e in entries if any(r.attempts for r in e.recipients))
        if len(entries) >= self.BULK_SYNC:
            self._save_bulk(entries)
            return
        for entry in entries:
            path = self._path("state", entry.qid + ".json")
            tmp = path + ".tmp"
            data = json.dumps(entry.to_json(), separators=(",", ":")).encode("utf-8")
            if os.path.exists(tmp):
                os.unlink(tmp)
            write_durably(tmp, data)
            os.rename(tmp, path)
        fsync_dir(self._path("state"))

    #: From this many entries on, L{save_many} writes every temporary file,
    #: makes them all durable with one C{syncfs(2)}, then renames them (an
    #: operator's action on 100,000 messages, a busy group commit).
    BULK_SYNC = 16

    def _save_bulk(self, entries: Sequence[QueueEntry]) -> None:
        """L{save_many} with one file-system sync for the batch (one fsync
        per file where C{syncfs(2)} is missing), before any rename.

        @raise OSError: a write or the sync failed: no state was replaced
            (every temporary file is removed); or a rename failed: the
            entries renamed before it have their new state.
        """
        tmps: list[tuple[str, str]] = []
        try:
            for entry in entries:
                path = self._path("state", entry.qid + ".json")
                tmp = path + ".tmp"
                if os.path.exists(tmp):
                    os.unlink(tmp)
                write_durably(tmp, json.dumps(entry.to_json(), separators=(",", ":"))
                              .encode("utf-8"), sync=False)
                tmps.append((tmp, path))
            synced = syncfs(self._path("state"))
        except BaseException:
            for tmp, _ in tmps:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise
        if not synced:
            for tmp, _ in tmps:
                fsync_file(tmp)
        for tmp, path in tmps:
            os.rename(tmp, path)
        fsync_dir(self._path("state"))

    def load(self, qid: str) -> QueueEntry:
        """Read the state of C{qid}; a message that has no state file yet has
        every recipient pending, as its envelope line says. C{size} is set.

        @raise CorruptEntry: unreadable or malformed state or envelope.
        @raise EntryNotFound: no such message.
        @raise OSError: the folder cannot be read.
        """
        try:
            total = os.path.getsize(self._path("messages", qid))
        except FileNotFoundError:
            raise EntryNotFound(qid) from None
        entry = self._load_state(qid)
        entry.size = total - entry.body_offset
        entry.lease = self._lease
        return entry

    def _load_state(self, qid: str) -> QueueEntry:
        try:
            with open(self._path("state", qid + ".json"), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return self._pending_entry(qid)
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise CorruptEntry(f"state file of {qid} is not JSON: {e}") from e
        if not isinstance(d, dict):
            raise CorruptEntry(f"state file of {qid} is not a JSON object")
        return QueueEntry.from_json(d)

    def _pending_entry(self, qid: str) -> QueueEntry:
        path = self._path("messages", qid)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise EntryNotFound(qid) from None
        with f:
            entry, _ = self._parse_dropped(qid, f.read(65536), f)
        entry.qid = qid
        return entry

    def remove(self, qid: str) -> None:
        """L{remove_many} for one entry."""
        self.remove_many([qid])

    def remove_many(self, qids: Sequence[str]) -> None:
        """Remove finished entries: every message first, then every state,
        then one fsync of each folder (group commit). A crash in between
        leaves a state without message, which L{recover} deletes (see
        docs/reliability.md)."""
        if self._bodies:
            self._drop_bodies(qids)
        removed = {"messages": 0, "state": 0}
        for folder, suffix in (("messages", ""), ("state", ".json")):
            for qid in qids:
                try:
                    os.unlink(self._path(folder, qid + suffix))
                    removed[folder] += 1
                except FileNotFoundError:
                    pass  # mail finished at its first attempt never had a state file
        fsync_dir(self._path("messages"))
        if removed["state"]:
            fsync_dir(self._path("state"))

    def quarantine(self, qid: str, why: str) -> None:
        """Move the state and message of C{qid} to C{corrupt/}, with the
        reason in a C{.reason} file beside each; failures are logged."""
        self._drop_bodies((qid,))
        self._move_corrupt(self._path("state", qid + ".json"), qid + ".json", why)
        self._move_corrupt(self._path("messages", qid), qid, why)

    # -- message bytes ----------------------------------------------------------

    def _keep_body(self, qid: str, data: bytes) -> None:
        with self._body_lock:
            if self._body_bytes + len(data) <= self.BODY_CACHE and qid not in self._bodies:
                self._bodies[qid] = data
                self._body_bytes += len(data)

    def _drop_bodies(self, qids: Iterable[str]) -> None:
        with self._body_lock:
            for qid in qids:
                data = self._bodies.pop(qid, None)
                if data is not None:
                    self._body_bytes -= len(data)

    def open_body(self, entry: QueueEntry) -> IO[bytes]:
        """Open the message bytes of C{entry} for the SMTP session's body
        producer, positioned after the envelope line. Unbuffered: the body is
        read in 64 KiB chunks anyway, and a raw file skips the isatty/fstat
        probes and the buffer of C{open()}. Cheap enough for the reactor
        thread (one open and one seek).

        @raise OSError: the message file cannot be opened.
        """
        data = self._bodies.get(entry.qid)
        if data is not None:
            return io.BytesIO(data)  # read whole at pickup: no second read
        f = open(self._path("messages", entry.qid), "rb", buffering=0)  # noqa: SIM115
        try:
            f.seek(entry.body_offset)
        except BaseException:
            f.close()
            raise
        return f

    def read_message(self, entry: QueueEntry) -> bytes:
        """The whole message bytes of C{entry} (envelope line excluded); for
        small messages, tests and tools."""
        with self.open_body(entry) as f:
            return f.read()

    def read_headers(self, entry: QueueEntry, limit: int = 256 * 1024) -> bytes:
        """The header block of the message of C{entry}, at most C{limit} bytes,
        each line with its line end, the empty line excluded."""
        with open(self._path("messages", entry.qid), "rb") as f:
            f.seek(entry.body_offset)
            return header_block(f.read(limit))

    # -- administration ---------------------------------------------------------

    def list_entries(self) -> list[ListedEntry]:
        """Every message, read-only: files waiting in C{new/} and C{cur/}
        (parsed, left in place), then the active queue in queue id order;
        unreadable ones are skipped. Safe while the daemon runs."""
        return list(self.iter_entries())

    def iter_entries(self) -> Iterator[ListedEntry]:
        """L{list_entries} as a generator: one directory listing per folder,
        then each file read as it is reached. A folder that is not (yet) a
        whole queue folder lists what it has."""
        try:
            incoming = self.incoming()
        except OSError:
            incoming = []
        for name in incoming:
            listed = self._listed_incoming(name)
            if listed is not None:
                yield listed
        try:
            qids = sorted(os.listdir(self._path("messages")))
        except FileNotFoundError:
            return
        owner = self.owner if self._lock_fd is not None else None
        for qid in qids:
            if not qid.startswith(".") and self.mine(qid):
                try:
                    entry = self.load(qid)
                except (CorruptEntry, OSError, EntryNotFound):
                    continue
                yield ListedEntry(entry, "active", None, owner)

    def _listed_incoming(self, name: str) -> ListedEntry | None:
        """The file C{name} (C{"new/..."}) waiting for pickup, parsed and
        left in place; L{None} when it is gone or cannot be parsed."""
        try:
            with open(self._path(name), "rb") as f:
                entry, _ = self._parse_dropped(name.split("/", 1)[1], f.read(65536), f)
                entry.size = os.fstat(f.fileno()).st_size - entry.body_offset
        except (CorruptEntry, OSError):
            return None
        return ListedEntry(entry, "incoming", name)

    # -- suspensions --------------------------------------------------------------

    def suspensions(self) -> list[Suspension]:
        """The suspensions saved in C{DIR/suspensions.json} (none when it
        does not exist).

        @raise QueueError: the file cannot be read or parsed.
        """
        path = self._path("suspensions.json")
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read())
            return [Suspension.from_json(d) for d in raw["suspensions"]]
        except FileNotFoundError:
            return []
        except OSError as e:
            raise QueueError(f"cannot read {path}: {e.strerror or e}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise QueueError(f"{path} is malformed: {e}") from e

    def save_suspensions(self, suspensions: Sequence[Suspension]) -> None:
        """Replace C{DIR/suspensions.json} atomically (tmp, fsync, rename,
        fsync of the folder).

        @raise QueueError: not written; the old file is kept.
        """
        path = self._path("suspensions.json")
        data = json.dumps({"v": 1, "suspensions": [s.to_json() for s in suspensions]},
                          indent=1).encode("utf-8")
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # never a stale one's name
        try:
            write_durably(tmp, data)
            os.rename(tmp, path)
            fsync_dir(self.path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # never written, or already renamed
            raise QueueError(f"cannot write {path}: {e.strerror or e}") from e


def _store_for(queue: Any) -> IQueueStore | None:
    """The store a C{queue} argument names: L{None} for a DB-API connection
    (the caller's transaction), a L{PostgresStore} for a PostgreSQL URI, else
    the folder."""
    if not isinstance(queue, (str, os.PathLike)):
        return None
    path = os.fspath(queue)
    if isinstance(path, str) and path.startswith(("postgresql://", "postgres://")):
        from twisted_mailout.queue.postgres import PostgresStore

        return PostgresStore(path)
    return Queue(str(path))


def enqueue_many(queue_dir: Any, items: Iterable[tuple[Any, Any, Any]]) -> list[str]:
    """Put a batch of messages in a queue, all or nothing; no reactor.

    @param queue_dir: the queue folder (one file-system sync for the batch,
        see L{Queue.enqueue_many}); or a PostgreSQL URI (one transaction); or
        an open DB-API connection to the PostgreSQL queue's database (the
        caller's transaction: see L{enqueue}).
    @param items: iterable of C{(sender, recipients, message)} tuples.
    @return: the queue ids, in order.
    @raise AddressError, MessageError: a bad item; nothing is written.
    @raise QueueError: the queue cannot be written; nothing of the batch is
        left in it.
    """
    store = _store_for(queue_dir)
    if store is None:
        from twisted_mailout.queue.model import check_batch
        from twisted_mailout.queue.postgres import enqueue_in

        return [enqueue_in(queue_dir, s, r, m) for s, r, m in check_batch(items)]
    try:
        return store.enqueue_many(items)
    finally:
        _close(store)


def enqueue(queue_dir: Any, sender: str | None, recipients: Any, message: object) -> str:
    """Put a message in a queue; no reactor needed.

    Safe from any thread or process.

    @param queue_dir: where the queue is:
      - a folder (created if missing): the message is on disk (fsynced,
        renamed into C{new/}, folder fsynced) before this returns;
      - a PostgreSQL URI (C{postgresql://...}): committed before this returns;
      - an open DB-API connection to the PostgreSQL queue's database
        (psycopg 3's, or Django's C{connection}): the transactional outbox.
        The row is written in the caller's current transaction and nothing
        is committed here: the mail exists if and only if the caller commits.
    @param sender: envelope sender (MAIL FROM); C{""}/L{None} for null.
    @param recipients: iterable of recipient addresses (RCPT TO).
    @param message: C{bytes}, C{str} or C{email.message.Message}.
    @return: the queue id.
    @raise AddressError: bad sender or recipient address, or no recipients.
    @raise MessageError: empty message.
    @raise QueueError: the queue cannot be written.
    """
    store = _store_for(queue_dir)
    if store is None:
        from twisted_mailout.queue.postgres import enqueue_in

        return enqueue_in(queue_dir, sender, recipients, message)
    try:
        return store.enqueue(sender, recipients, message)
    finally:
        _close(store)


def _close(store: IQueueStore) -> None:
    close = getattr(store, "close", None)  # a database store's connection
    if close is not None:
        close()


if TYPE_CHECKING:  # mypy proves that Queue implements the interface
    _implements: IQueueStore = Queue(".")
