"""The queue-store interface: the one way the daemon and tools reach the queue.

The scheduler, the DSN code (L{twisted_mailout.delivery.bounce}) and the
C{mailout queue} command talk to the queue only through L{IQueueStore}: no
file paths, no C{os} calls. Implementations:

- L{twisted_mailout.queue.store.Queue}: the queue folder (docs/queue-format.md);
- L{twisted_mailout.testing.memorystore.MemoryStore}: an in-memory double
  with real leases, for tests (and the executable specification of the
  semantics below);
- L{twisted_mailout.queue.postgres.PostgresStore}: a PostgreSQL database,
  which several daemons share (docs/postgresql.md).

Shaped after procrastinate's job store (one manager over a connector with an
in-memory and a PostgreSQL implementation; workers fetch jobs under their id
and keep them with a heartbeat), with the queue's own vocabulary.

Threads
=======

Every method blocks (on the disk, or on a database round trip) unless its
docstring says otherwise. Code in the reactor thread calls them through its
C{run_blocking} callable (a thread pool in the daemon, L{twisted.internet.threads}),
never directly. The exceptions are L{IQueueStore.open_body} and the stream
it returns, which the SMTP session reads in the reactor thread: the folder
store's open and reads are page-cache reads (docs/design.md); a store whose
reads go over the network returns a local copy (a spooled temporary file)
and says so.

Owners and leases
=================

A store object acts for one owner, L{IQueueStore.owner} (one per daemon
process). A daemon works only on entries it holds under a L{Lease}: pickup
and recover hand entries out under a lease of C{lease_duration} seconds,
and L{IQueueStore.renew} extends every lease of the owner at once (a
heartbeat; the scheduler calls it every third of the duration). An entry
whose lease expired (its daemon died or hung) is handed out again by the
next L{IQueueStore.pickup} of any owner, with its last saved state. Writes
under a lost lease raise L{LeaseLost} naming those entries; a batch write
still writes every other entry of the batch (one daemon's lost lease must
not cost the others their group commit).

A store that one daemon holds alone (the folder store, which takes
C{flock(DIR/lock)}) implements leases trivially: C{lease_duration} is
L{None}, leases never expire, L{IQueueStore.renew} and
L{IQueueStore.release} do nothing.

Atomicity and durability
========================

When a method returns (or the Deferred of the C{run_blocking} call running it fires):

- L{IQueueStore.publish}, L{IQueueStore.enqueue}, L{IQueueStore.enqueue_many}:
  the messages are durable and visible to pickup, all of them (the queue ids
  may be acknowledged to the user);
- L{IQueueStore.save_many}: each entry's state is replaced atomically (the
  old state or the new, never a mix) and durably; on error, entries not yet
  written keep their old state;
- L{IQueueStore.remove_many}: the entries are gone, durably (a crash cannot
  bring a removed entry back to be delivered again);
- L{IQueueStore.pickup}: the entries handed out are durably held by this
  owner (a crash after it returned finds them again in L{IQueueStore.recover}
  or, for a shared store, after their lease expires);
- L{IQueueStore.quarantine}: the entry is out of the active queue and kept
  for the operator with the reason.

Nothing else is promised: in particular a batch is not a transaction (a
store may write part of it before failing), which is why every write is an
idempotent replacement and removal comes last (docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Protocol, runtime_checkable

from twisted_mailout.queue.model import (
    ListedEntry,
    Pickup,
    QueueEntry,
    Recovery,
    StagedMessage,
    Suspension,
    check_batch,
)

__all__ = ["IQueueStore", "MessageSource", "enqueue_staged"]

#: What enqueue takes: C{bytes}, C{str} or C{email.message.Message}.
MessageSource = object


@runtime_checkable
class IQueueStore(Protocol):
    """A queue of messages waiting for delivery, with per-recipient state.

    @ivar owner: the lease owner this store object acts for (one per daemon;
        a random id unless given).
    @ivar lease_duration: seconds a lease lasts unless renewed, or L{None}
        when leases never expire (a store one daemon holds alone).
    @ivar location: where the queue is, for log lines (a folder path; for a
        database, its name without credentials).
    """

    owner: str
    lease_duration: float | None
    location: str

    # -- producers: any process, any thread; no lease involved ---------------

    def enqueue(self, sender: str | None, recipients: str | Iterable[str],
                message: MessageSource) -> str:
        """Put one message in the queue, durably.

        @param sender: envelope sender (MAIL FROM); C{""}, C{"<>"} or L{None}
            for the null sender (RFC 5321 4.5.5).
        @param recipients: envelope recipients (RCPT TO); a C{str} is one.
        @param message: C{bytes}, C{str} or C{email.message.Message};
            Message-ID and Date are added when missing.
        @return: the queue id, once the message is durable and visible.
        @raise AddressError: a bad sender or recipient, or none.
        @raise MessageError: an empty message.
        @raise QueueError: not written; nothing is left in the queue.
        """

    def enqueue_many(self, items: Iterable[tuple[str | None, str | Iterable[str],
                                                 MessageSource]]) -> list[str]:
        """Enqueue a batch, all or nothing, with one sync for the batch.

        @param items: C{(sender, recipients, message)} tuples as for L{enqueue}.
        @return: the queue ids, in order.
        @raise AddressError, MessageError: a bad item (its index is named);
            nothing is written.
        @raise QueueError: writing failed; nothing of the batch is left.
        """

    def stage(self, sender: str | None, recipients: str | Iterable[str],
              message: MessageSource, sync: bool = True) -> StagedMessage:
        """First phase of a two-phase enqueue (send-on-commit's vote): write
        the message where no daemon sees it yet. L{publish} or L{discard}
        ends it; a staged message left behind by a crash is removed by
        L{recover} (after a grace period: its writer may still be running).

        @param sync: make it durable now; C{False} when the caller syncs a
            batch with L{sync_staged}.
        @raise AddressError, MessageError, QueueError: as L{enqueue}.
        """

    def sync_staged(self, staged: Sequence[StagedMessage]) -> None:
        """Make staged messages durable in one step. @raise QueueError."""

    def publish(self, staged: Sequence[StagedMessage]) -> list[str]:
        """Second phase: make staged (synced) messages visible to pickup,
        durably. @return: their queue ids, in order. @raise QueueError: the
        batch failed (those not yet published are discarded; the caller must
        treat every one as failed, though some may be delivered)."""

    def discard(self, staged: Sequence[StagedMessage]) -> None:
        """Abort staged messages (best effort; never raises for a missing one)."""

    # -- the daemon: under its owner's leases ----------------------------------

    def recover(self) -> Recovery:
        """At start: repair what a crash left (unfinished writes, the state of
        finished messages, corrupt entries, stale staged messages) and take
        every active entry that no live owner holds.

        @return: a L{Recovery}: C{(qid, next attempt or None)} per entry now
            held, and one line per repair.
        """

    def pickup(self, limit: int | None = None) -> Pickup:
        """Take up to C{limit} waiting entries under this owner's lease, oldest
        first: newly published mail (every recipient pending), and entries
        whose lease expired (as last saved). Unparseable messages are
        quarantined and reported in C{problems}; they never stop the rest.

        @param limit: at most this many (L{None}: all waiting).
        @return: a L{Pickup}; its entries have C{size} set.
        """

    def renew(self) -> float:
        """Extend every lease of this owner by C{lease_duration} (a heartbeat).

        @return: when the leases now expire (seconds since the epoch;
            C{float("inf")} when they never do).
        """

    def release(self, qids: Sequence[str]) -> None:
        """Give up the leases on C{qids} (at stop), so another owner takes
        them at once; their state stays as last saved."""

    def load(self, qid: str) -> QueueEntry:
        """The entry C{qid} as last saved (every recipient pending when it was
        never saved), with C{size} set.

        @raise CorruptEntry: unreadable or malformed; the caller quarantines it.
        @raise EntryNotFound: no such entry.
        @raise OSError: the store cannot be read now (retried by the caller).
        """

    def save_many(self, entries: Sequence[QueueEntry]) -> None:
        """Replace the state of each entry, atomically per entry and durably,
        as one group commit.

        An entry no longer in the queue is not an error (nothing to keep).

        @raise OSError: a write failed; entries not yet written keep their
            old state (the caller keeps the outcomes in memory and retries).
        @raise LeaseLost: some entries are held by another owner now (its
            C{qids}); every other entry was written.
        """

    def remove_many(self, qids: Sequence[str]) -> None:
        """Remove finished entries (message and state), durably, as one group
        commit. Removing a missing entry is not an error.

        @raise OSError: the removal failed (retried by the caller).
        @raise LeaseLost: some entries are held by another owner now (its
            C{qids}, left in place); every other entry was removed.
        """

    def quarantine(self, qid: str, why: str) -> None:
        """Move C{qid} out of the active queue, kept for the operator with the
        reason C{why} (C{corrupt/} in the folder store). Failures are logged,
        not raised: the caller has already given up on the entry."""

    def open_body(self, entry: QueueEntry) -> IO[bytes]:
        """Open the message bytes of C{entry} (after the envelope line) as a
        stream, positioned at the first byte: what the SMTP session's body
        producer reads. May be called more than once per entry (one stream
        per transaction); the caller closes each.

        Called in the reactor thread (see "Threads" above).

        @raise OSError: the message cannot be read (the attempt is deferred).
        """

    def read_headers(self, entry: QueueEntry, limit: int = 256 * 1024) -> bytes:
        """The header block of the message of C{entry}, for a DSN's
        C{text/rfc822-headers} part (RFC 3462).

        @param limit: read at most this many bytes.
        @return: the header lines with their line ends, the empty line
            excluded; at most C{limit} bytes.
        @raise OSError: the message cannot be read.
        """

    # -- administration --------------------------------------------------------

    def list_entries(self) -> list[ListedEntry]:
        """Every message in the queue, read-only, incoming first, then active
        in queue id order; unreadable ones are skipped. Takes no lease and
        may run while a daemon works (what it shows may be a moment old).
        """

    def iter_entries(self) -> Iterator[ListedEntry]:
        """L{list_entries} as a generator, reading each entry as it is
        needed, so that a listing of 100,000 messages starts at once."""

    def suspensions(self) -> list[Suspension]:
        """The destination suspensions saved in the store (ended ones
        included: the caller drops them), in creation order.

        @raise QueueError: they cannot be read.
        """

    def save_suspensions(self, suspensions: Sequence[Suspension]) -> None:
        """Replace the saved suspensions, atomically and durably (they
        survive a restart of the daemon).

        @raise QueueError: not written; the old ones are kept.
        """


def enqueue_staged(store: IQueueStore,
                   items: Iterable[tuple[str | None, str | Iterable[str], MessageSource]],
                   ) -> list[str]:
    """L{IQueueStore.enqueue_many} in terms of the two-phase calls, for any
    store: check every item first, stage each without syncing, sync them all
    at once, publish them together; on any error discard what was staged.

    Blocks.

    @param store: the store.
    @param items: C{(sender, recipients, message)} tuples.
    @return: the queue ids, in the order given.
    @raise AddressError, MessageError: a bad item (its index is in the
        message); nothing written.
    @raise QueueError: writing failed; nothing left in the queue.
    """
    batch = check_batch(items)
    staged: list[StagedMessage] = []
    try:
        for sender, recipients, message in batch:
            staged.append(store.stage(sender, recipients, message, sync=False))
        store.sync_staged(staged)
    except BaseException:
        store.discard(staged)
        raise
    return store.publish(staged)
