"""Group commit: one blocking batch call for work that finishes together.

The scheduler records outcomes (L{IQueueStore.save_many}) and removes
finished mail (L{IQueueStore.remove_many}) through a L{GroupCommit} each, so
that writes finishing at about the same time share one folder fsync (or one
database transaction) instead of paying one each (docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet import defer, threads
from twisted.python.failure import Failure

__all__ = ["GroupCommit", "RunBlocking", "inline_io", "thread_io"]

T = TypeVar("T")


def _qid_of(item: Any) -> str:
    return item if isinstance(item, str) else str(getattr(item, "qid", ""))

#: C{run_blocking(f, *args) -> Deferred}: runs the blocking C{f(*args)} (in a thread in
#: the daemon) and fires with its result or fails with its error.
RunBlocking = Callable[..., "defer.Deferred[Any]"]


class GroupCommit(Generic[T]):
    """Runs a blocking batch function over items submitted close together.

    While one batch runs (in C{run_blocking}), new items wait; they all go in the next
    batch. So a lone item is never delayed, and under load the batches grow
    by themselves.

    @param run_blocking: runs the blocking C{func} off the reactor thread (L{RunBlocking}).
    @param func: C{func(items) -> None}, blocking; an error it raises fails
        every item of its batch (C{OSError}: nothing durable may be assumed),
        except an error with a C{qids} attribute (L{LeaseLost}), which fails
        only the items it names: the store wrote the others.
    @param key: the queue id of an item, to match C{qids}; by default the item
        itself when it is a C{str}, else its C{qid} attribute (entries).
    """

    def __init__(self, run_blocking: RunBlocking, func: Callable[[Sequence[T]], object],
                 key: Callable[[T], str] | None = None) -> None:
        self.run_blocking = run_blocking
        self.func = func
        self.key = key or _qid_of
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
            named = getattr(result.value, "qids", None) if isinstance(result, Failure) else None
            for item, d in batch:
                if not isinstance(result, Failure) or (
                        named is not None and self.key(item) not in named):
                    d.callback(None)
                else:
                    d.errback(result)
            if self._pending:
                self._run()

        self.run_blocking(self.func, [item for item, _ in batch]).addBoth(done)


def inline_io(f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred[Any]:
    """C{run_blocking} that runs file work at once (tests, tools): a L{RunBlocking}.

    @param f: the blocking function, called with C{args} and C{kw}.
    @return: a Deferred already fired with C{f}'s result, or failed with its
        error.
    """
    return defer.maybeDeferred(f, *args, **kw)


def thread_io(reactor: Any) -> RunBlocking:
    """C{run_blocking} that runs blocking file work in the reactor's thread pool.

    @param reactor: the reactor (C{IReactorThreads}; Twisted's reactor is
        untyped).
    @return: a L{RunBlocking}: C{run_blocking(f, *args, **kw)} returns a
        Deferred firing with C{f}'s result, or failing with its error.
    """
    pool = reactor.getThreadPool()

    def run(f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(reactor, pool, f, *args, **kw)

    return run
