"""Send on commit: a data manager for the C{transaction} package (the
transaction manager of Zope, Plone and pyramid_tm).

A transactional L{twisted_mailout.apps.mailer.Mailer} joins the current
transaction on its first L{Mailer.send}; mail is delivered only if the
transaction commits.

Queued delivery takes part in two-phase commit:

  - at C{send}: the message is validated and written into the queue's
    C{tmp/} (not synced, invisible to the daemon); the queue id is returned;
  - C{tpc_vote}: the staged files are made durable (one C{syncfs}); a failure
    here (disk full) fails the vote, so the whole transaction aborts;
  - C{tpc_finish}: they are renamed into C{new/} (visible to the daemon);
  - C{abort}/C{tpc_abort}, or rollback to a savepoint taken before the send:
    they are removed; nothing is delivered.

Every other delivery (direct SMTP, files, console, sendmail, Maildir, mbox,
the test outbox) runs in an after-commit hook, after the transaction has
committed, so commit never waits on the network; direct delivery is started
in the reactor thread and its outcome goes to the mailer's observers. Nothing
that happens after the vote can fail the commit, and nothing is lost without
an event: a delivery error after commit is reported as a L{MailDeferred} or
L{MailBounced} event (and logged), never raised into the committing code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mailout.api import default_reactor
from twisted_mailout.apps.blocking import waiting_runner
from twisted_mailout.apps.deliveries import (
    Delivery,
    DeliveryError,
    DeliveryReport,
    QueueDelivery,
    new_message_id,
    prepare,
)
from twisted_mailout.apps.events import MailBounced, Observers
from twisted_mailout.queue.store import StagedMessage, validate_envelope

__all__ = ["MailDataManager", "MailerLike", "in_reactor_thread", "join"]

log = Logger()

try:
    from transaction.interfaces import IDataManager, IDataManagerSavepoint, ISavepointDataManager
except ImportError:  # pragma: no cover - the transaction extra is not installed
    IDataManager = IDataManagerSavepoint = ISavepointDataManager = None


def _implementer(*ifaces: Any) -> Callable[[type], type]:
    present = [i for i in ifaces if i is not None]
    return implementer(*present) if present else (lambda cls: cls)


class MailerLike(Protocol):
    """What send-on-commit needs of a L{Mailer<twisted_mailout.apps.mailer.Mailer>}
    (the mailer imports this module, not the other way round)."""

    observers: Observers

    @property
    def transaction_manager(self) -> Any:
        """The C{transaction} manager."""

    def deliver(self, delivery: Delivery, sender: str, recipients: list[str], data: bytes,
                message_id: str | None = None) -> str | defer.Deferred[DeliveryReport]:
        """Hand a prepared message to C{delivery} now; report to the observers."""

    def notify_accepted(self, delivery: Delivery, mid: str, sender: str,
                        recipients: Iterable[str]) -> None:
        """Report a message a synchronous delivery took."""


class _Pending:
    __slots__ = ("data", "delivery", "message_id", "recipients", "sender", "staged")

    def __init__(self, delivery: Delivery, sender: str, recipients: list[str], data: bytes,
                 message_id: str, staged: StagedMessage | None) -> None:
        self.delivery = delivery
        self.sender = sender
        self.recipients = recipients
        self.data = data
        self.message_id = message_id
        self.staged = staged


@_implementer(IDataManager, ISavepointDataManager)
class MailDataManager:
    """The mail of one mailer in one transaction.

    @param mailer: the L{Mailer} (its observers get the outcomes).
    @param transaction_manager: the manager the transaction belongs to.
    """

    def __init__(self, mailer: MailerLike, transaction_manager: Any) -> None:
        self.mailer = mailer
        self.transaction_manager = transaction_manager
        self.pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._voted = False
        self.joined = False  # the transaction unjoins us on rollback to a
        # savepoint taken before we joined (after calling abort)

    def __repr__(self) -> str:
        return f"<MailDataManager {len(self.pending)} message(s) for {self.mailer!r}>"

    def add(self, item: _Pending) -> None:
        """Add a message to send at commit."""
        with self._lock:
            self.pending.append(item)

    def _discard(self, items: Iterable[_Pending]) -> None:
        by_delivery: dict[int, tuple[QueueDelivery, list[StagedMessage]]] = {}
        for it in items:
            if it.staged is not None and isinstance(it.delivery, QueueDelivery):
                by_delivery.setdefault(id(it.delivery), (it.delivery, []))[1].append(it.staged)
        for delivery, staged in by_delivery.values():
            delivery.discard(staged)

    def _queued(self) -> list[tuple[QueueDelivery, list[_Pending]]]:
        groups: dict[int, tuple[QueueDelivery, list[_Pending]]] = {}
        for it in self.pending:
            if it.staged is not None and isinstance(it.delivery, QueueDelivery):
                groups.setdefault(id(it.delivery), (it.delivery, []))[1].append(it)
        return list(groups.values())

    # -- IDataManager ---------------------------------------------------------

    def abort(self, transaction: Any) -> None:
        """The transaction is aborted before two-phase commit, or rolled back
        to a savepoint taken before this manager joined: remove the staged
        files; nothing is delivered."""
        with self._lock:
            items, self.pending = self.pending, []
            self.joined = False
        self._discard(items)

    def tpc_begin(self, transaction: Any) -> None:
        """Nothing to do: the messages are already staged."""

    def commit(self, transaction: Any) -> None:
        """Nothing to do: the work is in L{tpc_vote} and L{tpc_finish}."""

    def tpc_vote(self, transaction: Any) -> None:
        """Make staged queue files durable.

        @raise QueueError: they could not be synced: the transaction aborts.
        """
        for delivery, items in self._queued():
            delivery.sync([it.staged for it in items if it.staged is not None])
        self._voted = True

    def tpc_finish(self, transaction: Any) -> None:
        """Publish staged queue files into C{new/}. Never raises: a failure
        (the disk vanished between vote and finish) is reported to the
        observers as a bounce of each recipient and logged."""
        for delivery, items in self._queued():
            try:
                delivery.publish([it.staged for it in items if it.staged is not None])
            except Exception as e:  # noqa: BLE001 - tpc_finish must not fail
                log.failure("mail of a committed transaction could not be queued in "
                            "{queue}", queue=delivery.path)
                self._report_lost(items, f"4.3.0 not queued after commit: {e}")
                with self._lock:
                    self.pending = [it for it in self.pending if it not in items]
            for it in items:
                it.staged = None

    def tpc_abort(self, transaction: Any) -> None:
        """The commit failed (here or in another resource): remove the staged
        files; nothing is delivered."""
        self.abort(transaction)

    def sortKey(self) -> str:
        """Sort after most resources, so their conflicts abort the
        transaction before the queue files are synced."""
        return f"~twisted_mailout.apps.txn:{id(self):x}"

    # -- savepoints -------------------------------------------------------

    def savepoint(self) -> _Savepoint:
        """@return: a savepoint whose C{rollback} drops every message sent
        after it (and removes its staged file)."""
        with self._lock:
            return _Savepoint(self, len(self.pending))

    # -- after commit ---------------------------------------------------

    def after_commit(self, committed: bool) -> None:
        """The after-commit hook: deliver the non-queue messages when
        C{committed}; report queued ones. Never raises."""
        with self._lock:
            items, self.pending = self.pending, []
        if not committed:
            self._discard(items)
            return
        for it in items:
            try:
                if isinstance(it.delivery, QueueDelivery):
                    self.mailer.notify_accepted(it.delivery, it.message_id, it.sender,
                                                it.recipients)
                else:
                    self._deliver(it)
            except Exception:  # noqa: BLE001 - never into the committing code
                log.failure("delivery after commit failed for {qid}", qid=it.message_id)

    def _deliver(self, it: _Pending) -> None:
        if not it.delivery.asynchronous:
            try:
                self.mailer.deliver(it.delivery, it.sender, it.recipients, it.data,
                                    it.message_id)
            except DeliveryError as e:  # the observers have heard of it
                log.warn("{qid}: {delivery}: {error}", qid=it.message_id,
                         delivery=it.delivery.url(), error=str(e))
            except Exception as e:  # noqa: BLE001
                log.failure("{qid}: delivery after commit failed", qid=it.message_id)
                self._report_lost([it], f"4.3.0 delivery after commit failed: {e}")
            return
        runner = waiting_runner(getattr(it.delivery, "reactor", None))
        if runner is None:  # the reactor thread, or a reactor its owner drives
            self._start_direct(it)
            return
        try:  # in the reactor thread (started now when no reactor runs); awaited at exit
            runner.submit(self._start_direct, it)
        except RuntimeError as e:  # ReactorThreadError, ReactorStopped
            log.failure("{qid}: direct delivery after commit failed", qid=it.message_id)
            self._report_lost([it], f"4.3.0 direct delivery failed: {e}")

    def _start_direct(self, it: _Pending) -> defer.Deferred[Any] | None:
        try:
            d = self.mailer.deliver(it.delivery, it.sender, it.recipients, it.data,
                                    it.message_id)
        except Exception as e:  # noqa: BLE001
            log.failure("{qid}: direct delivery after commit failed", qid=it.message_id)
            self._report_lost([it], f"4.3.0 direct delivery failed: {e}")
            return None

        def failed(f: Failure) -> None:
            log.failure("{qid}: direct delivery after commit failed", f, qid=it.message_id)
            self._report_lost([it], f"4.3.0 direct delivery failed: {f.getErrorMessage()}")

        return cast("defer.Deferred[DeliveryReport]", d).addErrback(failed)

    def _report_lost(self, items: Iterable[_Pending], text: str) -> None:
        """Nothing will deliver these: one L{MailBounced} per recipient."""
        for it in items:
            for r in it.recipients:
                self.mailer.observers.notify(MailBounced(
                    it.message_id, r, 451, text, it.sender, local=True,
                    source=it.delivery.url()))


@_implementer(IDataManagerSavepoint)
class _Savepoint:
    def __init__(self, dm: MailDataManager, mark: int):
        self.dm = dm
        self.mark = mark

    def rollback(self) -> None:
        with self.dm._lock:
            dropped = self.dm.pending[self.mark:]
            del self.dm.pending[self.mark:]
        self.dm._discard(dropped)


def in_reactor_thread() -> bool:
    """Whether this is the reactor's thread: the one running it, or the main
    thread before any reactor ran (where a program will run it)."""
    from twisted.python import threadable

    if threadable.isInIOThread():
        return True
    return threadable.ioThread is None and threading.current_thread() is threading.main_thread()


def _reactor_of(delivery: Delivery) -> Any:
    return default_reactor(getattr(delivery, "reactor", None))


def join(mailer: MailerLike, delivery: Delivery, sender: str, recipients: list[str],
         data: bytes) -> str:
    """Put a prepared message into the current transaction of
    C{mailer.transaction_manager} (joining it on the first message).

    @return: the queue id (queue) or message id (other deliveries).
    @raise AddressError, MessageError: bad input; nothing added.
    @raise QueueError: the staged file could not be written.
    @raise RuntimeError: a direct delivery from a thread while no reactor
        runs: it could never be sent.
    """
    manager = mailer.transaction_manager
    txn = manager.get()
    if isinstance(delivery, QueueDelivery):
        staged = delivery.stage(sender, recipients, data)
        mid = staged.qid
        env_sender, env_rcpts = validate_envelope(sender, recipients)
    else:
        env = prepare(sender, recipients, data)  # validate now, not at commit
        staged, mid = None, new_message_id()
        env_sender, env_rcpts = env.sender, env.recipients
        if (delivery.asynchronous and not in_reactor_thread()
                and waiting_runner(getattr(delivery, "reactor", None)) is None
                and not _reactor_of(delivery).running):
            raise RuntimeError(f"{delivery.url()} after commit needs a running Twisted "
                               "reactor; use queue:// from programs without one")
    try:
        dm = txn.data(mailer)
    except KeyError:
        dm = None
    try:
        if dm is None:
            dm = MailDataManager(mailer, manager)
            txn.join(dm)
            txn.addAfterCommitHook(dm.after_commit)
            txn.set_data(mailer, dm)
        elif not dm.joined:
            txn.join(dm)
    except BaseException:
        if staged is not None and isinstance(delivery, QueueDelivery):
            delivery.discard([staged])
        raise
    dm.joined = True
    dm.add(_Pending(delivery, env_sender, env_rcpts, data, mid, staged))
    return mid

