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

import os
import zlib

from twisted_mailout.queue.foreign import foreign_qid
from twisted_mailout.queue.model import (
    QueueError,
    is_safe_qid,
)
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
    this worker (L{mine}): pickup, recovery and listings see only those;
    recovery touches only this share's files; the lock is
    C{DIR/workers/I.lock}.

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

    def _held_by_another(self) -> str:
        return f"worker {self.index} of {self.path} is already running (see {self.lock_path})"

    def _recover_tmp(self) -> list[str]:
        """Only this share's unfinished pickup rewrites (C{tmp/.QID.pickup}):
        the parent repairs the rest of C{tmp/} (stale enqueues) before it
        starts any worker, and another worker's rewrite may be in progress.
        @return: one line per file removed."""
        problems = []
        for name in os.listdir(self._path("tmp")):
            if name.startswith(".") and name.endswith(".pickup") and self.mine(name[1:-7]):
                try:
                    os.unlink(self._path("tmp", name))
                    problems.append(f"removed unfinished pickup tmp/{name}")
                except OSError:
                    pass
        return problems
