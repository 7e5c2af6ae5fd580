"""Group commit: one blocking batch call for work that finishes together.

The scheduler records outcomes (L{IQueueStore.save_many}) and removes
finished mail (L{IQueueStore.remove_many}) through a L{GroupCommit} each, so
that writes finishing at about the same time share one folder fsync (or one
database transaction) instead of paying one each (docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["GroupCommit", "RunBlocking"]

T = TypeVar("T")

#: C{io(f, *args) -> Deferred}: runs the blocking C{f(*args)} (in a thread in
#: the daemon) and fires with its result or fails with its error.
RunBlocking = Callable[..., "defer.Deferred[Any]"]


class GroupCommit(Generic[T]):
    """Runs a blocking batch function over items submitted close together.

    While one batch runs (in C{io}), new items wait; they all go in the next
    batch. So a lone item is never delayed, and under load the batches grow
    by themselves.

    @param io: runs the blocking C{func} off the reactor thread (L{RunBlocking}).
    @param func: C{func(items) -> None}, blocking; it may raise (C{OSError},
        L{LeaseLost}...), which fails every item of its batch.
    """

    def __init__(self, io: RunBlocking, func: Callable[[Sequence[T]], object]) -> None:
        self.io = io
        self.func = func
        self._pending: list[tuple[T, defer.Deferred[None]]] = []
        self._running = False

    def submit(self, item: T) -> defer.Deferred[None]:
        """Add C{item} to the next batch.

        @return: a Deferred firing with L{None} once C{item}'s batch is done
            (durable, for the store's writes), or failing with its error.
        """
        d: defer.Deferred[None] = defer.Deferred()
        self._pending.append((item, d))
        if not self._running:
            self._run()
        return d

    def _run(self) -> None:
        batch, self._pending = self._pending, []
        self._running = True

        def done(result: object) -> None:
            self._running = False
            for _, d in batch:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
            if self._pending:
                self._run()

        self.io(self.func, [item for item, _ in batch]).addBoth(done)
