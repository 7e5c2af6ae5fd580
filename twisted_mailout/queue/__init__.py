"""The queue layer: mail kept safe on disk until it is delivered or bounced.

L{Queue} is the filesystem store (docs/queue-format.md, docs/reliability.md);
L{enqueue} and L{enqueue_many} put mail in a queue folder from any program, no
reactor needed. Imports only the core modules (envelope, message, errors).
"""

from twisted_mailout.queue.store import (
    ENVELOPE_HEADER,
    CorruptEntry,
    MessageError,
    Queue,
    QueueEntry,
    QueueError,
    QueueLocked,
    RecipientStatus,
    StagedMessage,
    enqueue,
    enqueue_many,
    validate_envelope,
)

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
