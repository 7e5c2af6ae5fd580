"""The queue layer: mail kept safe until it is delivered or bounced.

- L{interface}: L{IQueueStore}, the one interface the scheduler and the
  tools use (stage/publish, pickup under leases, load, save, remove,
  recover, quarantine, list, the message body as a stream);
- L{model}: entries, recipient states and the envelope line;
- L{store}: L{Queue}, the queue folder (docs/queue-format.md,
  docs/reliability.md), with L{durable} writes and L{foreign} formats.

L{enqueue} and L{enqueue_many} put mail in a queue folder from any program,
no reactor needed. Imports only the core modules (envelope, message).
"""

from twisted_mailout.envelope import validate_envelope
from twisted_mailout.message import MessageError
from twisted_mailout.queue.interface import IQueueStore
from twisted_mailout.queue.model import (
    ENVELOPE_HEADER,
    CorruptEntry,
    EntryNotFound,
    Lease,
    LeaseLost,
    ListedEntry,
    Pickup,
    QueueEntry,
    QueueError,
    QueueLocked,
    RecipientStatus,
    Recovery,
    StagedMessage,
)
from twisted_mailout.queue.store import Queue, enqueue, enqueue_many

__all__ = [
    "ENVELOPE_HEADER",
    "CorruptEntry",
    "EntryNotFound",
    "IQueueStore",
    "Lease",
    "LeaseLost",
    "ListedEntry",
    "MessageError",
    "Pickup",
    "Queue",
    "QueueEntry",
    "QueueError",
    "QueueLocked",
    "RecipientStatus",
    "Recovery",
    "StagedMessage",
    "enqueue",
    "enqueue_many",
    "validate_envelope",
]
