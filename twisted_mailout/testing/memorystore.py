"""An in-memory queue store with real leases, for tests.

L{MemoryStore} implements L{twisted_mailout.queue.interface.IQueueStore}
entirely in memory: run the real L{twisted_mailout.delivery.scheduler.Scheduler}
against it with C{task.Clock} and no disk at all. Several L{MemoryStore}
objects over one L{MemoryBackend} behave like several daemons sharing one
database: each has its own owner id, pickup hands entries out under
expiring leases, and a write under a lost lease raises L{LeaseLost}. It is
the executable form of the interface's documented semantics, which the
contract tests (tests/unit/queue/test_store_contract.py) hold the folder
store to as well.

Faults can be injected per method (L{MemoryBackend.fail}) to test how callers
survive a full disk or a lost database.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from twisted_mailout.queue.interface import IQueueStore, enqueue_staged
from twisted_mailout.queue.model import (
    CorruptEntry,
    EntryNotFound,
    Lease,
    LeaseLost,
    ListedEntry,
    Pickup,
    QueueEntry,
    Recovery,
    StagedMessage,
    Suspension,
    header_block,
    new_queue_id,
    parse_envelope_line,
    queued_bytes,
)

__all__ = ["MemoryBackend", "MemoryStore"]

_INF = float("inf")


@dataclass
class MemoryBackend:
    """The shared contents: what a database would hold.

    @ivar messages: queue id -> stored bytes (envelope line, then message),
        published messages only.
    @ivar incoming: queue ids published and not yet picked up, oldest first.
    @ivar states: queue id -> saved state (the JSON form, round-tripped
        through C{json} so anything unserialisable fails as on disk).
    @ivar leases: queue id -> L{Lease}.
    @ivar staged: queue id -> bytes staged, not yet published.
    @ivar quarantined: queue id -> C{(stored bytes, reason)}.
    @ivar suspensions: the saved destination suspensions (JSON forms).
    @ivar clock: C{() -> float}, seconds since the epoch (C{Clock.seconds} in
        tests); lease expiry and arrival times follow it.
    """

    messages: dict[str, bytes] = field(default_factory=dict)
    incoming: list[str] = field(default_factory=list)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    staged: dict[str, bytes] = field(default_factory=dict)
    quarantined: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    suspensions: list[dict[str, Any]] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    _faults: dict[str, list[BaseException]] = field(default_factory=dict)

    def fail(self, method: str, error: BaseException, times: int = 1) -> None:
        """Make the next C{times} calls of C{method} (on any store over this
        backend) raise C{error} before changing anything.

        @param method: an L{IQueueStore} method name, e.g. C{"save_many"}.
        """
        self._faults.setdefault(method, []).extend([error] * times)

    def _check_fault(self, method: str) -> None:
        errors = self._faults.get(method)
        if errors:
            raise errors.pop(0)


class MemoryStore:
    """One daemon's view of a L{MemoryBackend} (see the module docstring).

    @param backend: the shared contents; a new one when L{None}.
    @param owner: this store's owner id; random when L{None}.
    @param lease_duration: seconds a lease lasts unless renewed; L{None} for
        leases that never expire (as the folder store).
    @param clock: C{() -> float}; replaces the backend's clock when given.
    """

    def __init__(self, backend: MemoryBackend | None = None, owner: str | None = None,
                 lease_duration: float | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.backend = backend if backend is not None else MemoryBackend()
        if clock is not None:
            self.backend.clock = clock
        self.owner = owner or "memory-" + secrets.token_hex(4)
        self.lease_duration = lease_duration
        self.location = f"memory:{id(self.backend):x}"

    # -- helpers ------------------------------------------------------------

    def _now(self) -> float:
        return self.backend.clock()

    def _new_lease(self) -> Lease:
        if self.lease_duration is None:
            return Lease(self.owner, _INF)
        return Lease(self.owner, self._now() + self.lease_duration)

    def _free(self, qid: str) -> bool:
        """May this owner take C{qid} at recovery? Held alone (no lease
        duration), any earlier owner is gone; shared, only when no live owner
        holds it."""
        if self.lease_duration is None:
            return True
        lease = self.backend.leases.get(qid)
        return lease is None or lease.owner == self.owner or lease.expires <= self._now()

    def _lost(self, qids: Iterable[str]) -> set[str]:
        """The queue ids among C{qids} whose lease another owner holds."""
        out = set()
        for qid in qids:
            lease = self.backend.leases.get(qid)
            if lease is not None and lease.owner != self.owner:
                out.add(qid)
        return out

    def _entry(self, qid: str) -> QueueEntry:
        data = self.backend.messages.get(qid)
        if data is None:
            raise EntryNotFound(qid)
        state = self.backend.states.get(qid)
        if state is None:
            entry = QueueEntry.pending(qid, parse_envelope_line(data[:65536], self._now()))
        else:
            entry = QueueEntry.from_json(state)
        entry.size = len(data) - entry.body_offset
        entry.lease = self.backend.leases.get(qid)
        return entry

    # -- producers ----------------------------------------------------------

    def enqueue(self, sender: str | None, recipients: Any, message: object) -> str:
        """See L{IQueueStore.enqueue}."""
        return self.publish([self.stage(sender, recipients, message)])[0]

    def enqueue_many(self, items: Iterable[tuple[Any, Any, Any]]) -> list[str]:
        """See L{IQueueStore.enqueue_many}."""
        return enqueue_staged(self, items)

    def stage(self, sender: str | None, recipients: Any, message: object,
              sync: bool = True) -> StagedMessage:
        """See L{IQueueStore.stage}."""
        _, _, data = queued_bytes(sender, recipients, message, self._now())
        self.backend._check_fault("stage")
        qid = new_queue_id()
        self.backend.staged[qid] = data
        return StagedMessage(qid, f"staged/{qid}", len(data))

    def sync_staged(self, staged: Sequence[StagedMessage]) -> None:
        """See L{IQueueStore.sync_staged}."""
        self.backend._check_fault("sync_staged")

    def publish(self, staged: Sequence[StagedMessage]) -> list[str]:
        """See L{IQueueStore.publish}."""
        try:
            self.backend._check_fault("publish")
        except BaseException:
            self.discard(staged)
            raise
        for s in staged:
            self.backend.messages[s.qid] = self.backend.staged.pop(s.qid)
            self.backend.incoming.append(s.qid)
        return [s.qid for s in staged]

    def discard(self, staged: Sequence[StagedMessage]) -> None:
        """See L{IQueueStore.discard}."""
        for s in staged:
            self.backend.staged.pop(s.qid, None)

    # -- the daemon ---------------------------------------------------------

    def recover(self) -> Recovery:
        """See L{IQueueStore.recover}."""
        self.backend._check_fault("recover")
        due: list[tuple[str, float | None]] = []
        on_hold: list[str] = []
        problems: list[str] = []
        waiting = set(self.backend.incoming)
        for qid in sorted(self.backend.messages):
            if qid in waiting or not self._free(qid):
                continue
            try:
                entry = self._entry(qid)
            except CorruptEntry as e:
                self.quarantine(qid, str(e))
                problems.append(f"{qid}: quarantined: {e}")
                continue
            self.backend.leases[qid] = self._new_lease()
            if entry.held:  # held mail waits for release, unscheduled
                on_hold.append(qid)
            else:
                due.append((qid, entry.next_attempt() if qid in self.backend.states else None))
        return Recovery(due, problems, on_hold)

    def pickup(self, limit: int | None = None) -> Pickup:
        """See L{IQueueStore.pickup}."""
        self.backend._check_fault("pickup")
        entries: list[QueueEntry] = []
        problems: list[str] = []
        room = (lambda: True) if limit is None else (lambda: len(entries) + len(problems) < limit)
        while self.backend.incoming and room():
            qid = self.backend.incoming.pop(0)
            try:
                entry = self._entry(qid)
            except CorruptEntry as e:
                self.quarantine(qid, str(e))
                problems.append(f"{qid}: quarantined: {e}")
                continue
            entry.lease = self.backend.leases[qid] = self._new_lease()
            entries.append(entry)
        if self.lease_duration is None:
            return Pickup(entries, problems)  # held alone: nothing to take over
        now = self._now()
        for qid in sorted(set(self.backend.messages) - set(self.backend.incoming)):
            if not room():
                break
            lease = self.backend.leases.get(qid)
            if lease is None or (lease.expires <= now and lease.owner != self.owner):
                entry = self._entry(qid)
                entry.lease = self.backend.leases[qid] = self._new_lease()
                entries.append(entry)
        return Pickup(entries, problems)

    def renew(self) -> float:
        """See L{IQueueStore.renew}."""
        self.backend._check_fault("renew")
        lease = self._new_lease()
        now = self._now()
        for qid, old in list(self.backend.leases.items()):
            if old.owner == self.owner and old.expires > now:
                self.backend.leases[qid] = lease
        return lease.expires

    def release(self, qids: Sequence[str]) -> None:
        """See L{IQueueStore.release}; a no-op for a store held alone."""
        if self.lease_duration is None:
            return
        for qid in qids:
            lease = self.backend.leases.get(qid)
            if lease is not None and lease.owner == self.owner:
                del self.backend.leases[qid]

    def load(self, qid: str) -> QueueEntry:
        """See L{IQueueStore.load}."""
        self.backend._check_fault("load")
        return self._entry(qid)

    def save_many(self, entries: Sequence[QueueEntry]) -> None:
        """See L{IQueueStore.save_many}."""
        self.backend._check_fault("save_many")
        lost = self._lost(e.qid for e in entries)
        for entry in entries:
            if entry.qid not in lost and entry.qid in self.backend.messages:
                self.backend.states[entry.qid] = json.loads(json.dumps(entry.to_json()))
        if lost:
            raise LeaseLost(lost, f"not saved by {self.owner}")

    def remove_many(self, qids: Sequence[str]) -> None:
        """See L{IQueueStore.remove_many}."""
        self.backend._check_fault("remove_many")
        lost = self._lost(qids)
        for qid in qids:
            if qid not in lost:
                self.backend.messages.pop(qid, None)
                self.backend.states.pop(qid, None)
                self.backend.leases.pop(qid, None)
        if lost:
            raise LeaseLost(lost, f"not removed by {self.owner}")

    def quarantine(self, qid: str, why: str) -> None:
        """See L{IQueueStore.quarantine}."""
        data = self.backend.messages.pop(qid, b"")
        self.backend.states.pop(qid, None)
        self.backend.leases.pop(qid, None)
        if qid in self.backend.incoming:
            self.backend.incoming.remove(qid)
        self.backend.quarantined[qid] = (data, why)

    def open_body(self, entry: QueueEntry) -> IO[bytes]:
        """See L{IQueueStore.open_body}."""
        data = self.backend.messages.get(entry.qid)
        if data is None:
            raise FileNotFoundError(f"{entry.qid} is not in the queue")
        return io.BytesIO(data[entry.body_offset:])

    def read_headers(self, entry: QueueEntry, limit: int = 256 * 1024) -> bytes:
        """See L{IQueueStore.read_headers}."""
        data = self.backend.messages.get(entry.qid)
        if data is None:
            raise FileNotFoundError(f"{entry.qid} is not in the queue")
        return header_block(data[entry.body_offset:entry.body_offset + limit])

    # -- administration -------------------------------------------------------

    def list_entries(self) -> list[ListedEntry]:
        """See L{IQueueStore.list_entries}."""
        return list(self.iter_entries())

    def iter_entries(self) -> Iterator[ListedEntry]:
        """See L{IQueueStore.iter_entries}."""
        waiting = list(self.backend.incoming)
        for qid in waiting:
            try:
                yield ListedEntry(self._entry(qid), "incoming", qid)
            except (CorruptEntry, EntryNotFound):
                continue
        for qid in sorted(set(self.backend.messages) - set(waiting)):
            try:
                entry = self._entry(qid)
            except (CorruptEntry, EntryNotFound):
                continue
            lease = self.backend.leases.get(qid)
            yield ListedEntry(entry, "active", None, lease.owner if lease else None)

    def suspensions(self) -> list[Suspension]:
        """See L{IQueueStore.suspensions}."""
        self.backend._check_fault("suspensions")
        return [Suspension.from_json(d) for d in self.backend.suspensions]

    def save_suspensions(self, suspensions: Sequence[Suspension]) -> None:
        """See L{IQueueStore.save_suspensions}."""
        self.backend._check_fault("save_suspensions")
        self.backend.suspensions = [json.loads(json.dumps(s.to_json())) for s in suspensions]

    def inject(self, qid: str, data: bytes) -> None:
        """Publish raw bytes as a message (to test what pickup does with a
        malformed one).

        @param qid: its queue id.
        @param data: the stored bytes, normally an envelope line and a message.
        """
        self.backend.messages[qid] = data
        self.backend.incoming.append(qid)


if TYPE_CHECKING:  # mypy proves that MemoryStore implements the interface
    _implements: IQueueStore = MemoryStore()
