"""Connection limits shared by the worker processes of one queue.

With C{twistd mailout --workers N}, N processes deliver one queue folder,
each with its own L{ConnectionPool<twisted_mailout.delivery.pool.ConnectionPool>}.
The limits an operator sets (C{--max-connections}, C{--max-per-destination},
a shaping file's destination and provider limits) hold across all of them
through one small table in a file, C{DIR/workers/limits}, mapped into every
worker's memory. A worker counts a connection in the table before it opens
one (L{SharedLimits.try_open}: check every limit and count, in one step
under C{flock}) and uncounts it when it is closed (L{SharedLimits.closed});
both are a few microseconds, once per connection, never per message.

Counts are kept per worker, so a worker killed with C{kill -9} leaves no
phantom connections: the parent zeroes its column (L{SharedLimits.reset})
before it starts its successor (the dead worker's sockets were closed by the
kernel), and the whole table when it starts.

A worker waiting for a slot that another worker holds says so in the table
(L{SharedLimits.want}); the holder then closes an idle connection or gives
up a finished one instead of keeping it for reuse (see the pool).

Why a shared table and not messages to the parent (AMP): a limit checked by
a round trip to the parent costs a wake-up of two processes per connection
and makes every opening asynchronous inside the pool; the table keeps the
pool's decisions synchronous and costs two system calls (C{flock} twice).

Layout (little-endian)::

    header   "MLIM" u32 version, u32 max_workers, u32 slots, i32 keys waited for
             (all workers: read without the lock, a hint that spares the
             lock when nobody waits)
    global   max_workers x (i32 connections, i32 waiting keys)
    slots    slots x (u64 key hash, max_workers x (i32 connections, i32 waiting))

A key (a destination, or C{"group:NAME"} for a provider group) hashes to 64
bits (BLAKE2b); slots are found by linear probing, and a slot whose counts
are all zero is reused when the table fills (L{SharedLimits._compact}).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct

__all__ = ["SharedLimits", "SharedLimitsError"]

MAGIC = b"MLIM"
VERSION = 2
_HEADER = struct.Struct("<4sIIIi")
_WAITING_AT = 16  # the header's last field: keys waited for, all workers
_PAIR = struct.Struct("<ii")
_HASH = struct.Struct("<Q")


class SharedLimitsError(Exception):
    """The shared table cannot be created, opened or is not ours."""


def _hash(key: str) -> int:
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                       digest_size=8).digest(), "little")
    return h or 1  # 0 marks an empty slot


class SharedLimits:
    """One worker's view of the shared connection table.

    @param path: the table's file (C{DIR/workers/limits}); it must exist
        (L{create}).
    @param worker: this worker's index, from 0, below the table's
        C{max_workers}.
    @raise SharedLimitsError: the file is missing, not a table, or the
        index is out of range.
    """

    def __init__(self, path: str, worker: int) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise SharedLimitsError(f"cannot open the shared limits {path}: {e.strerror}") from e
        try:
            size = os.fstat(self._fd).st_size
            if size < _HEADER.size:
                raise SharedLimitsError(f"{path} is not a shared limits table")
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        magic, version, self.max_workers, self.slots, _ = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or version != VERSION:
            self.close()
            raise SharedLimitsError(f"{path} is not a version {VERSION} shared limits table")
        if not 0 <= worker < self.max_workers:
            self.close()
            raise SharedLimitsError(f"worker {worker} out of range (0 to {self.max_workers - 1})")
        self.path = path
        self.worker = worker
        self._mine_waiting = 0  # keys this worker waits for (its share of the hint)
        self._row = _PAIR.size * self.max_workers
        self._global = _HEADER.size
        self._slot0 = self._global + self._row
        self._slot_size = _HASH.size + self._row

    # -- the file ---------------------------------------------------------------

    @staticmethod
    def create(path: str, max_workers: int = 64, slots: int = 4096) -> None:
        """Create (or empty) the table at C{path}, atomically: the parent's
        start, before any worker runs.

        @param max_workers: the most workers the table has columns for.
        @param slots: keys (destinations and groups) counted at once; more
            than the most connections that can ever be open.
        @raise SharedLimitsError: the file cannot be written.
        """
        size = _HEADER.size + _PAIR.size * max_workers * (1 + slots) + _HASH.size * slots
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
                os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, max_workers, slots, 0), 0)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as e:
            raise SharedLimitsError(f"cannot create the shared limits {path}: {e.strerror}") from e

    @staticmethod
    def reset(path: str, worker: int) -> None:
        """Zero worker C{worker}'s counts (it died; its connections are
        gone). The parent calls this before it starts the worker's
        successor.

        @raise SharedLimitsError: the table cannot be opened.
        """
        table = SharedLimits(path, worker)
        try:
            with table._locked():
                table._zero_column(worker)
        finally:
            table.close()

    def close(self) -> None:
        """Unmap and close the file (idempotent)."""
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None  # type: ignore[assignment]
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None  # type: ignore[assignment]

    # -- what the pool asks -------------------------------------------------------

    def try_open(self, key: str, limit: int, global_limit: int,
                 group: str | None = None, group_limit: int | None = None) -> bool:
        """Count one connection of this worker to C{key} if every limit
        allows it, all workers counted.

        @param key: the destination.
        @param limit: connections to C{key} at most, all workers.
        @param global_limit: connections at most, all destinations and workers.
        @param group: the provider group C{key} belongs to, or L{None}.
        @param group_limit: the group's connections at most (with C{group}).
        @return: whether the connection was counted (then open it, and call
            L{closed} when it is gone).
        """
        with self._locked():
            if self._sum(self._global)[0] >= global_limit:
                return False
            at = self._new_slot(key)
            if self._sum(at + _HASH.size)[0] >= limit:
                return False
            gat = None
            if group is not None and group_limit is not None:
                gat = self._new_slot("group:" + group)
                if self._sum(gat + _HASH.size)[0] >= group_limit:
                    return False
            self._add(self._global, 1)
            self._add(at + _HASH.size, 1)
            if gat is not None:
                self._add(gat + _HASH.size, 1)
            return True

    def closed(self, key: str, group: str | None = None) -> None:
        """Uncount one connection of this worker to C{key} (and its group)."""
        with self._locked():
            self._add(self._global, -1)
            at = self._slot(key, create=False)
            if at is not None:
                self._add(at + _HASH.size, -1)
            if group is not None:
                gat = self._slot("group:" + group, create=False)
                if gat is not None:
                    self._add(gat + _HASH.size, -1)

    def want(self, key: str, waiting: bool) -> None:
        """Say whether this worker waits for a slot to C{key} that the
        limits keep it from opening (other workers then give theirs up
        rather than keep them idle)."""
        with self._locked():
            at = self._slot(key, create=waiting)
            if at is None:
                return
            off = at + _HASH.size + self.worker * _PAIR.size
            conns, was = _PAIR.unpack_from(self._map, off)
            now = 1 if waiting else 0
            if was == now:
                return
            _PAIR.pack_into(self._map, off, conns, now)
            goff = self._global + self.worker * _PAIR.size
            gconns, gwait = _PAIR.unpack_from(self._map, goff)
            _PAIR.pack_into(self._map, goff, gconns, max(0, gwait + now - was))
            self._add_hint(now - was)
            self._mine_waiting += now - was

    def others_waiting(self, key: str | None = None) -> bool:
        """Whether another worker waits for a slot to C{key} (L{None}: for
        any slot at all). Without the lock when the hint says nobody else
        waits (the common case: one read of shared memory)."""
        if self._hint() - self._mine_waiting <= 0:
            return False
        with self._locked():
            if key is None:
                base = self._global
            else:
                at = self._slot(key, create=False)
                if at is None:
                    return False
                base = at + _HASH.size
            return any(_PAIR.unpack_from(self._map, base + w * _PAIR.size)[1]
                       for w in range(self.max_workers) if w != self.worker)

    def connections(self, key: str | None = None) -> int:
        """Connections counted, all workers: to C{key}, or in all (L{None})."""
        with self._locked():
            if key is None:
                return self._sum(self._global)[0]
            at = self._slot(key, create=False)
            return 0 if at is None else self._sum(at + _HASH.size)[0]

    # -- internals ------------------------------------------------------------------

    def _locked(self) -> _Flock:
        return _Flock(self._fd)

    def _sum(self, base: int) -> tuple[int, int]:
        conns = waiting = 0
        for c, w in _PAIR.iter_unpack(self._map[base:base + self._row]):
            conns += c
            waiting += w
        return conns, waiting

    def _add(self, base: int, n: int) -> None:
        off = base + self.worker * _PAIR.size
        conns, waiting = _PAIR.unpack_from(self._map, off)
        _PAIR.pack_into(self._map, off, max(0, conns + n), waiting)

    def _hint(self) -> int:
        return int.from_bytes(self._map[_WAITING_AT:_WAITING_AT + 4], "little", signed=True)

    def _add_hint(self, n: int) -> None:
        value = max(0, self._hint() + n)
        self._map[_WAITING_AT:_WAITING_AT + 4] = value.to_bytes(4, "little", signed=True)

    def _zero_column(self, worker: int) -> None:
        zero = _PAIR.pack(0, 0)
        col = worker * _PAIR.size
        gwait = _PAIR.unpack_from(self._map, self._global + col)[1]
        self._add_hint(-gwait)  # the keys it waited for are no longer waited for
        self._map[self._global + col:self._global + col + _PAIR.size] = zero
        for i in range(self.slots):
            off = self._slot0 + i * self._slot_size + _HASH.size + col
            self._map[off:off + _PAIR.size] = zero

    def _new_slot(self, key: str) -> int:
        """The offset of C{key}'s slot, made when it has none."""
        at = self._slot(key, create=True)
        assert at is not None
        return at

    def _slot(self, key: str, create: bool) -> int | None:
        """The offset of C{key}'s slot; a new one when C{create} (compacting
        the table when it is full), else L{None} when it has none."""
        h = _hash(key)
        start = h % self.slots
        free = None
        for probe in range(self.slots):
            off = self._slot0 + ((start + probe) % self.slots) * self._slot_size
            (have,) = _HASH.unpack_from(self._map, off)
            if have == h:
                return off
            if have == 0:
                free = off
                break
        if not create:
            return None
        if free is None:
            if not self._compact():
                raise SharedLimitsError(f"the shared limits table {self.path} is full")
            return self._slot(key, create)
        _HASH.pack_into(self._map, free, h)
        return free

    def _compact(self) -> bool:
        """Drop keys with no connection and no waiter, and place the rest
        again. @return: whether a slot is free now."""
        live = []
        for i in range(self.slots):
            off = self._slot0 + i * self._slot_size
            (h,) = _HASH.unpack_from(self._map, off)
            row = bytes(self._map[off + _HASH.size:off + self._slot_size])
            if h and row.count(0) != len(row):
                live.append((h, row))
        if len(live) >= self.slots:
            return False
        empty = bytes(self._slot_size)
        for i in range(self.slots):
            off = self._slot0 + i * self._slot_size
            self._map[off:off + self._slot_size] = empty
        for h, row in live:
            start = h % self.slots
            for probe in range(self.slots):
                off = self._slot0 + ((start + probe) % self.slots) * self._slot_size
                if _HASH.unpack_from(self._map, off)[0] == 0:
                    _HASH.pack_into(self._map, off, h)
                    self._map[off + _HASH.size:off + self._slot_size] = row
                    break
        return True


class _Flock:
    """C{with}: an exclusive C{flock} on a file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
