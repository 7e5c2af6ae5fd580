"""One worker's share of a queue folder (C{twistd mailout --workers N}).

N delivery processes work on one queue folder. Each message belongs to
exactly one worker, decided by its queue id alone: worker C{i} of C{n} owns
the messages whose queue id's CRC-32 is C{i} modulo C{n} (L{shard_of}). A
file dropped in C{new/} is owned by the worker its queue id names (for a
zope.sendmail or repoze.sendmail file, the id its pickup will give it), so
the pickup's rename from C{new/} into C{messages/} needs no claim: no other
worker ever touches that name. Ownership is a pure function of the name, so
it survives C{kill -9} of any worker or of the parent with nothing to repair:
the worker that restarts in a dead one's place recovers the dead one's
messages exactly as a daemon recovers the whole folder after a crash (see
docs/reliability.md), and a dead parent's successor, holding C{DIR/lock},
recovers the whole folder before it starts any worker.

Each worker holds C{flock(DIR/workers/I.lock)} while it runs, so two
processes never work on one share; the parent holds C{DIR/lock} as a single
daemon does, so C{enqueue()}, C{mailout queue} and a second daemon see one
daemon.

A message sent to several domains goes out from its owner's connections to
each of them; the connection limits hold across workers through
L{twisted_mailout.delivery.limits.SharedLimits}.
"""

from __future__ import annotations

import errno
import fcntl
import os
import zlib
from collections.abc import Iterator

from twisted_mailout.queue.foreign import foreign_qid
from twisted_mailout.queue.model import (
    ListedEntry,
    Recovery,
    CorruptEntry,
    EntryNotFound,
    QueueError,
    QueueLocked,
    is_safe_qid,
)
from twisted_mailout.queue.durable import FILE_MODE
from twisted_mailout.queue.store import Queue

__all__ = ["ShardQueue", "shard_of", "workers_dir"]


def workers_dir(queue_dir: str) -> str:
    """C{DIR/workers}: the workers' locks, sockets and shared limits."""
    return os.path.join(os.path.abspath(queue_dir), "workers")


def shard_of(name: str, count: int) -> int:
    """The worker (0 to C{count - 1}) owning the message whose file is
    named C{name} in C{new/}, C{cur/} or C{messages/}.

    @param name: a file name (no folder): our own queue id, or a foreign
        file's name, whose queue id is L{foreign_qid} of it.
    @param count: the number of workers, at least 1.
    @return: the worker's index.
    """
    qid = name if is_safe_qid(name) else foreign_qid(name)
    return zlib.crc32(qid.encode("ascii", "replace")) % count


class ShardQueue(Queue):
    """Worker C{index}'s share of the queue folder C{path} (an
    L{IQueueStore}): L{Queue} restricted to the messages L{shard_of} gives
    this worker.

    @param path: the queue folder (created as L{Queue} does).
    @param index: this worker, from 0.
    @param count: the number of workers (at least 1, above C{index}).
    @param owner: as for L{Queue}.
    @raise ValueError: C{index} or C{count} out of range.
    @raise QueueError: as for L{Queue}.
    """

    def __init__(self, path: str, index: int, count: int, owner: str | None = None) -> None:
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"worker {index} of {count}: out of range")
        super().__init__(path, owner=owner or f"worker-{index}-pid-{os.getpid()}")
        self.index = index
        self.count = count
        try:
            os.makedirs(workers_dir(self.path), mode=0o700, exist_ok=True)
        except OSError as e:
            raise QueueError(f"cannot create {workers_dir(self.path)}: {e.strerror}") from e

    def mine(self, name: str) -> bool:
        """Whether the file or queue id C{name} belongs to this worker."""
        return shard_of(name, self.count) == self.index

    @property
    def lock_path(self) -> str:
        """C{DIR/workers/I.lock}: held while this worker runs."""
        return os.path.join(workers_dir(self.path), f"{self.index}.lock")

    def lock(self) -> None:
        """Take this worker's lock (C{flock} on C{DIR/workers/I.lock}; the
        parent holds C{DIR/lock}) and write this process's pid into it.

        @raise QueueLocked: another process works on this share.
        @raise QueueError: the lock file cannot be opened.
        """
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise QueueError(f"cannot open {self.lock_path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise QueueLocked(f"worker {self.index} of {self.path} is already running "
                                  f"(see {self.lock_path})") from None
            raise QueueError(f"cannot lock {self.lock_path}: {e.strerror}") from e
        self._lock_fd = fd
        self.write_pid()

    def incoming(self) -> list[str]:
        """This worker's files waiting for pickup (see L{Queue.incoming})."""
        return [n for n in super().incoming() if self.mine(n.split("/", 1)[1])]

    def recover(self) -> Recovery:
        """Recover this worker's messages (see L{Queue.recover}), touching
        nothing of the other workers': only this share's unfinished pickup
        rewrites in C{tmp/}, orphaned state files and unfinished state
        writes are repaired. The parent repairs the rest of C{tmp/} (stale
        enqueues) before it starts any worker.

        @return: a L{Recovery} of this share.
        """
        problems = []
        for name in os.listdir(self._path("tmp")):
            # ".QID.pickup": a foreign file's rewrite, interrupted
            if name.startswith(".") and name.endswith(".pickup") and self.mine(name[1:-7]):
                try:
                    os.unlink(self._path("tmp", name))
                    problems.append(f"removed unfinished pickup tmp/{name}")
                except OSError:
                    pass
        messages = {n for n in os.listdir(self._path("messages"))
                    if not n.startswith(".") and self.mine(n)}
        states = set()
        for name in sorted(os.listdir(self._path("state"))):
            qid = name.split(".", 1)[0]
            if not self.mine(qid):
                continue
            path = self._path("state", name)
            if name.endswith(".tmp"):
                os.unlink(path)
                problems.append(f"removed unfinished state write state/{name}")
            elif name.endswith(".json"):
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
                if state.held:
                    on_hold.append(qid)
                else:
                    due.append((qid, state.next_attempt()))
            except (CorruptEntry, OSError) as e:
                self.quarantine(qid, str(e))
                problems.append(f"{qid}: moved to corrupt/: {e}")
        return Recovery(due, problems, on_hold)

    def iter_entries(self) -> Iterator[ListedEntry]:
        """This worker's messages, as L{Queue.iter_entries} lists them (the
        other workers' files are neither opened nor listed)."""
        for name in self.incoming():
            listed = self._listed_incoming(name)
            if listed is not None:
                yield listed
        try:
            qids = sorted(n for n in os.listdir(self._path("messages")) if self.mine(n))
        except FileNotFoundError:
            return
        owner = self.owner if self._lock_fd is not None else None
        for qid in qids:
            try:
                entry = self.load(qid)
            except (CorruptEntry, OSError, EntryNotFound):
                continue
            yield ListedEntry(entry, "active", None, owner)
