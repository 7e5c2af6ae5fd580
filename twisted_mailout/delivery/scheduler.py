"""The scheduler: which queued message goes next, and what its outcome does.

It keeps only C{(due time, queue id)} pairs in memory (a heap), loads a
message's state from the queue store when it is due, hands each
destination's recipients to the L{Connector}, records every recipient's
outcome atomically, queues bounces, and removes finished messages.

It reaches the queue only through L{IQueueStore} (no paths, no C{os}); every
blocking store call runs through C{run_blocking} (a thread pool in the daemon), except
L{IQueueStore.open_body}, which the connector calls when a transaction
starts. With a store whose leases expire it renews them (a heartbeat) and
gives them back at stop.
"""

from __future__ import annotations

import heapq
import random as _random
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import IO, Any, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mailout.delivery.admission import Admission
from twisted_mailout.delivery.bounce import all_reported, report_bounces, warn_delay
from twisted_mailout.delivery.commit import GroupCommit, RunBlocking, inline_io, thread_io
from twisted_mailout.delivery.lease import LeaseGuard
from twisted_mailout.delivery.connector import Attempt, Connector
from twisted_mailout.delivery.destinations import group_by_destination
from twisted_mailout.delivery.pool import Clock, DelayedCall
from twisted_mailout.delivery.retry import RetryPolicy, outcome_for
from twisted_mailout.delivery.schedview import OperatorHands
from twisted_mailout.delivery.signing import MessageSigner, PrefixedBody, signature_for
from twisted_mailout.delivery.suspend import Suspensions
from twisted_mailout.delivery.throttle import ThrottleRules
from twisted_mailout.envelope import (
    Address,
    RecipientState,
    Reply,
    parse_address,
    parse_sender,
)
from twisted_mailout.errors import AddressError
from twisted_mailout.outcome import RecipientResult, Status
from twisted_mailout.queue.interface import IQueueStore
from twisted_mailout.queue.model import (
    CorruptEntry,
    EntryNotFound,
    LeaseLost,
    QueueEntry,
    RecipientStatus,
)

__all__ = ["GroupCommit", "Outcome", "RetryPolicy", "Scheduler", "inline_io", "outcome_for",
           "thread_io"]

log = Logger()
outcome_log = Logger(namespace="twisted_mailout.outcome")

_PICKUP_LINE = "{}: from=<{}>, nrcpt={} (queue active, {})"
_OUTCOME_LINE = "{}: to=<{}>, relay={}, delay={:.2f}, attempts={}, dsn={}, status={} ({})"


#: The daemon's per-recipient outcome is the package's one result type: a
#: L{RecipientResult} with C{queue_id}, C{attempts} and C{delay} (C{qid} too).
Outcome = RecipientResult


def _first(pair: tuple[Address, RecipientStatus]) -> Address:
    return pair[0]


def _destination(address: str) -> str:
    """The MX routing key of a queued recipient (its domain's A-label form,
    as L{group_by_destination} makes it)."""
    try:
        return parse_address(address).ascii_domain
    except AddressError:  # (validated at enqueue; the attempt will say what is wrong)
        return address.rpartition("@")[2].lower()


class _Parked:
    """What L{Scheduler._process} returns for a message set aside because
    its destination has its share of the messages in flight.

    @ivar dest: the destination that is full.
    @ivar due: when the message was due (it goes back into the schedule at
        that time, so it keeps its place).
    """

    __slots__ = ("dest", "due")

    def __init__(self, dest: str, due: float):
        self.dest = dest
        self.due = due


class Scheduler(OperatorHands):
    """Drives delivery of everything in one queue store.

    @param queue: the L{IQueueStore} (the folder store already locked by the
        service).
    @param connector: a L{Connector} (tests give a fake with its C{deliver}
        and C{close}).
    @param clock: a L{Clock} (C{seconds}, C{callLater}): the reactor or a
        C{task.Clock}.
    @param run_blocking: a L{RunBlocking}, C{run_blocking(f, *args) ->
        Deferred}, for blocking store work: L{thread_io} in the daemon,
        L{inline_io} by default.
    @param retry: L{RetryPolicy}; by default C{RetryPolicy()}.
    @param relay: C{True} when every message goes to one relay (one
        destination), C{False} for MX routing by recipient domain.
    @param max_inflight: messages being worked on at once.
    @param max_inflight_per_destination: with MX routing, the messages one
        destination may have in flight at once, waiting for a connection or
        being sent (a message to several destinations counts in each): a
        due message whose destination has its share waits outside the
        in-flight set, in arrival order, and goes back into the schedule
        when one of that destination's deliveries ends. So the mail of a
        slow destination (a tarpit) cannot take the places of everyone
        else's (issue 14). L{None} (the default): twice the destination's
        connection limit, from the connector's pool (C{pool.limit_for}), or
        no limit with a connector that has none. Never applied with a relay
        (one destination).
    @param reporting_mta: this host's name, for bounces.
    @param observers: callables receiving each outcome, a L{RecipientResult};
        their errors are logged, never raised.
    @param delay_warning: seconds after arrival when the sender of mail still
        deferred gets one delay warning (RFC 3464 action C{delayed}), or
        L{None} for none.
    @param rng: C{random.Random} for retry jitter; by default a new one.
    @param suspensions: the L{Suspensions} in force (the operator's
        C{mailout queue suspend}); recipients of a suspended domain are not
        attempted, and their attempts not counted, until it ends.
    @param signer: a L{MessageSigner} (DKIM): each message is signed once,
        in a thread, before its first attempt; the signature is kept in its
        state (L{QueueEntry.dkim}) and sent in front of it on every attempt.
        A message that cannot be signed is deferred with the reason, never
        sent unsigned.
    @param throttle: the L{ThrottleRules} every reply of a failed attempt is
        shown to, or L{None}. With traffic shaping (the connector's
        C{shaper}), each destination's retry schedule and message rate apply
        too (L{Admission}).
    """

    PICKUP_BATCH = 1000  # files picked up (and fsynced) at a time
    #: entries picked up and kept in memory until their first attempt (so
    #: they need not be read again); beyond it they are loaded from disk.
    #: 100,000 of them add about 5 MB (benchmarks/run.py --only scale).
    PRELOAD_LIMIT = 200000

    def __init__(self, queue: IQueueStore, connector: Connector, clock: Clock,
                 run_blocking: RunBlocking = inline_io,
                 retry: RetryPolicy | None = None, relay: bool = False,
                 max_inflight: int = 200, reporting_mta: str | None = None,
                 observers: Iterable[Callable[[RecipientResult], object]] = (),
                 rng: _random.Random | None = None,
                 delay_warning: float | None = None,
                 suspensions: Suspensions | None = None,
                 signer: MessageSigner | None = None,
                 throttle: ThrottleRules | None = None,
                 max_inflight_per_destination: int | None = None) -> None:
        if max_inflight_per_destination is not None and max_inflight_per_destination < 1:
            raise ValueError("max_inflight_per_destination must be at least 1")
        self.queue = queue
        self.connector = connector
        self.clock = clock
        self.run_blocking = run_blocking
        self.retry = retry or RetryPolicy()
        self.relay = relay
        self.max_inflight = max_inflight
        self.max_inflight_per_destination = max_inflight_per_destination
        self.reporting_mta = reporting_mta or socket.gethostname()
        self.observers = list(observers)
        self.rng = rng or _random.Random()
        self.delay_warning = delay_warning
        self.suspensions = suspensions if suspensions is not None else Suspensions()
        self.signer = signer
        self.throttle = throttle
        self.shaper = getattr(connector, "shaper", None)
        self.admission = Admission(self.suspensions, self.shaper, relay)
        if hasattr(connector, "hold") and not relay:
            connector.hold = lambda dest: self.admission.held(dest, self.clock.seconds())
        self._heap: list[tuple[float, int, str]] = []
        #: queue id -> the sequence number of its live heap item (items whose
        #: number differs are stale: taken by the operator or rescheduled).
        self._queued: dict[str, int] = {}
        #: queue ids the operator is working on (L{take}): never dispatched.
        self._taken: set[str] = set()
        self._finished: dict[str, list[defer.Deferred[None]]] = {}
        #: queue ids on hold (from recovery, then kept by the operator's
        #: actions): counted by L{shape}, never scheduled.
        self.on_hold: set[str] = set()
        self._shape: tuple[float, dict[str, Any]] | None = None
        #: queue id -> its work (L{None} while the work is being started).
        self._inflight: dict[str, defer.Deferred[float | _Parked | None] | None] = {}
        #: destination -> messages in flight for it (between the share check
        #: and the end of the delivery attempt).
        self._busy: dict[str, int] = {}
        #: destination -> (due, queue id) set aside while it has its share;
        #: queue id -> its destination there (items whose queue id maps to
        #: another destination, or to none, are stale: taken since).
        self._parked: dict[str, deque[tuple[float, str]]] = {}
        self._parked_at: dict[str, str] = {}
        self._preloaded: dict[str, QueueEntry] = {}
        self._unsaved: set[str] = set()  # outcomes known but not yet on disk
        self._saver: GroupCommit[QueueEntry] = GroupCommit(run_blocking, queue.save_many)
        self._remover: GroupCommit[str] = GroupCommit(run_blocking, queue.remove_many)
        self._seq = 0
        self._wakeup: DelayedCall | None = None
        self._heartbeat: task.LoopingCall | None = None
        self.guard: LeaseGuard | None = None
        self._more = False  # the last claim of a shared store was full
        self._stopping = False
        self._dispatching = False
        self._picking = False
        self._pick_again = False
        self._pick_waiters: list[defer.Deferred[int]] = []
        #: outcomes so far by L{Status} value (C{delivered}, C{deferred}, ...).
        self.counts = {s.value: 0 for s in (Status.DELIVERED, Status.DEFERRED,
                                            Status.BOUNCED, Status.EXPIRED)}

    # -- lifecycle --------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Recover the queue, schedule every entry, pick up new mail.

        @return: Deferred firing with the number of entries recovered.
        """
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> int:
        due, problems, on_hold = await self.run_blocking(self.queue.recover)
        self.on_hold.update(on_hold)
        for p in problems:
            log.warn("queue recovery: {problem}", problem=p)
        now = self.clock.seconds()
        for qid, when in due:
            self._schedule(qid, now if when is None else when, dispatch=False)
        self._dispatch()
        log.info("queue {path}: {n} messages recovered", path=self.queue.location, n=len(due))
        lease = self.queue.lease_duration
        if lease is not None and not self._stopping:
            self.guard = LeaseGuard(self.clock, lease)  # no final dot once it lapses
            self._heartbeat = task.LoopingCall(self._renew)
            # LoopingCall's attribute is declared as the whole IReactorTime;
            # it calls only seconds() and callLater(), which a Clock has.
            self._heartbeat.clock = cast(IReactorTime, self.clock)
            self._heartbeat.start(lease / 3.0, now=False)
        await self.pickup()
        return len(due)

    def _renew(self) -> defer.Deferred[None]:
        """Extend this owner's leases (the heartbeat); a failure is logged and
        the next beat tries again."""
        guard = self.guard
        assert guard is not None
        started = guard.renewing()
        d = self.run_blocking(self.queue.renew)
        d.addCallback(lambda _: guard.renewed(started))
        d.addErrback(lambda f: log.failure("cannot renew the queue leases of {owner}", f,
                                           owner=self.queue.owner))
        return d

    def stop(self, timeout: float = 30.0) -> defer.Deferred[None]:
        """Start no new work; wait up to C{timeout} seconds for messages in
        flight (without cancelling them: what finishes in time has its
        outcome recorded), then cancel what is still in flight, which aborts
        its connections and frees their slots (the connector logs one line
        per connection), and close the idle connections. Mail whose work was
        cut off stays in the queue as last saved, with one warning line for
        all of it, and is tried again (after restart, or by another daemon
        once the leases are given back).

        @param timeout: seconds to wait for work in flight.
        @return: Deferred firing with L{None}, never failing.
        """
        self._stopping = True
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        pending = [d for d in self._inflight.values() if d is not None]
        d: defer.Deferred[None] = defer.Deferred()
        if not pending:
            d.callback(None)
        else:
            # Wait without cancelling: the work's own Deferreds are only
            # observed (a timed-out DeferredList would cancel every member,
            # that is, the deliveries themselves).
            left = [len(pending)]

            def finished(result: object, _d: defer.Deferred[None] = d) -> object:
                left[0] -= 1
                if left[0] == 0 and not _d.called:
                    if timer.active():
                        timer.cancel()
                    _d.callback(None)
                return result

            def late(_d: defer.Deferred[None] = d) -> None:
                cut = [w for w in self._inflight.values() if w is not None and not w.called]
                log.warn("shutdown: {n} messages still in flight after {t}s; their "
                         "connections are aborted and they stay queued", n=len(cut), t=timeout)
                for work in cut:
                    work.cancel()  # _process: CancelledError, quietly; nothing recorded
                if not _d.called:
                    _d.callback(None)

            timer = self.clock.callLater(timeout, late)
            for work in pending:
                work.addBoth(finished)

        def release(_: object) -> defer.Deferred[None] | None:
            # Only what waits: work still in flight may yet finish here; its
            # leases lapse by themselves if it does not.
            held = list(self._queued) + list(self._parked_at) + sorted(self._taken)
            if self.queue.lease_duration is None or not held:
                return None
            return self.run_blocking(self.queue.release, held).addErrback(
                lambda f: log.failure("cannot give back the queue leases", f))

        def close(_: object) -> defer.Deferred[None]:
            return self.connector.close()

        d.addBoth(release)
        return d.addBoth(close).addBoth(lambda _: None)

    # -- pickup -------------------------------------------------------------

    def pickup(self) -> defer.Deferred[int]:
        """Pick up everything waiting in the store (new mail; entries whose
        lease expired, for a shared store) and schedule it.

        Concurrent calls are coalesced.

        @return: Deferred firing with the number of messages picked up.
        """
        if self._picking:
            # another pass follows the running one; the caller learns when
            # it is over (an operator's action must see the mail just dropped)
            self._pick_again = True
            w: defer.Deferred[int] = defer.Deferred()
            self._pick_waiters.append(w)
            return w
        self._picking = True
        return defer.Deferred.fromCoroutine(self._pickup())

    async def _pickup(self) -> int:
        total = 0
        try:
            while True:
                self._pick_again = False
                # a shared store: claim what can be worked on now, no more,
                # so the other daemons get the rest (_done asks for more)
                batch = (max(1, self.max_inflight - len(self._inflight))
                         if self.guard is not None else self.PICKUP_BATCH)
                try:
                    entries, problems = await self.run_blocking(self.queue.pickup, batch)
                except Exception:  # noqa: BLE001 - pickup must survive and run again
                    log.failure("pickup failed; will try again at the next poll")
                    break
                for p in problems:
                    log.error("pickup: {problem}", problem=p)
                now = self.clock.seconds()
                for e in entries:
                    # Formatted here with str.format (C); twisted.logger's own
                    # formatter is pure Python and was a tenth of the CPU
                    # (docs/benchmarks.md). The structured fields stay, for
                    # observers that filter or reformat.
                    log.info("{text}", text=_PICKUP_LINE.format(
                        e.qid, e.sender, len(e.recipients), e.origin),
                        qid=e.qid, sender=e.sender, n=len(e.recipients), origin=e.origin)
                    if len(self._preloaded) < self.PRELOAD_LIMIT:
                        self._preloaded[e.qid] = e
                    when = e.next_attempt()  # taken over from a dead daemon: its retry
                    tried = when is not None and any(r.attempts for r in e.recipients)
                    self._schedule(e.qid, max(now, when) if tried else now,
                                   dispatch=False)
                self._dispatch()
                total += len(entries)
                full = len(entries) + len(problems) >= batch
                self._more = full and self.guard is not None
                if not (full or self._pick_again) or self._stopping or self._more:
                    break
        finally:
            self._picking = False
            waiters, self._pick_waiters = self._pick_waiters, []
            for w in waiters:
                w.callback(0)
        return total

    # -- scheduling ---------------------------------------------------------

    def _schedule(self, qid: str, due: float, dispatch: bool = True) -> None:
        if (qid in self._queued or qid in self._inflight or qid in self._taken
                or qid in self._parked_at):
            return
        self._seq += 1
        self._queued[qid] = self._seq
        heapq.heappush(self._heap, (due, self._seq, qid))
        if dispatch and not self._stopping:
            self._dispatch()

    def _dispatch(self) -> None:
        if self._stopping or self._dispatching:
            return  # (a message finished at once inside the loop below: it goes on)
        self._dispatching = True
        try:
            self._dispatch_due()
        finally:
            self._dispatching = False

    def _dispatch_due(self) -> None:
        now = self.clock.seconds()
        while self._heap and len(self._inflight) < self.max_inflight:
            due, _, qid = self._heap[0]
            if due > now:
                break
            _, seq, _ = heapq.heappop(self._heap)
            if self._queued.get(qid) != seq:
                continue  # stale: taken by the operator, or rescheduled since
            del self._queued[qid]
            self._inflight[qid] = None
            d = defer.Deferred.fromCoroutine(self._process(qid))
            if qid in self._inflight and not d.called:
                self._inflight[qid] = d
            d.addBoth(self._done, qid)
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        if self._heap and len(self._inflight) < self.max_inflight:
            delay = max(0.0, self._heap[0][0] - now)
            self._wakeup = self.clock.callLater(delay, self._dispatch)

    def _done(self, result: float | _Parked | Failure | None, qid: str) -> None:
        self._inflight.pop(qid, None)
        if isinstance(result, _Parked):
            if qid not in self._taken:
                self._parked_at[qid] = result.dest
                self._parked.setdefault(result.dest, deque()).append((result.due, qid))
                self._unpark(result.dest)  # (its share may have freed meanwhile)
            for w in self._finished.pop(qid, []):
                w.callback(None)
            self._dispatch()
            return
        if self._more and len(self._inflight) <= self.max_inflight // 2 and not self._stopping:
            self._more = False
            self.pickup()  # a shared store had more waiting: claim the next share
        if result is None:
            self.admission.forget((qid,))
        if isinstance(result, float) and not self._stopping:
            self._schedule(qid, result)  # not when the operator has taken it
        for w in self._finished.pop(qid, []):
            w.callback(None)
        self._dispatch()

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing due now."""
        now = self.clock.seconds()
        return not self._inflight and not (self._heap and self._heap[0][0] <= now)

    def queued(self) -> int:
        """Messages scheduled or in flight."""
        return len(self._queued) + len(self._inflight) + len(self._parked_at)

    # -- each destination's share of the messages in flight -------------------

    def _share(self, dest: str) -> int | None:
        """The messages C{dest} may have in flight, or L{None} for no limit."""
        if self.relay:
            return None
        if self.max_inflight_per_destination is not None:
            return self.max_inflight_per_destination
        limit_for = getattr(getattr(self.connector, "pool", None), "limit_for", None)
        return None if limit_for is None else 2 * int(limit_for(dest))

    def _reserve(self, due: list[RecipientStatus]) -> tuple[list[str], str | None]:
        """Count a message to the destinations of C{due} in flight.

        @return: C{(destinations counted, None)}, or C{([], dest)} when
            C{dest} has its share already (nothing counted).
        """
        if self.relay:
            return [], None
        keys = list(dict.fromkeys(_destination(rs.address) for rs in due))
        busy = self._busy
        for k in keys:
            share = self._share(k)
            if share is not None and busy.get(k, 0) >= share:
                return [], k
        for k in keys:
            busy[k] = busy.get(k, 0) + 1
        return keys, None

    def _unreserve(self, keys: list[str]) -> None:
        """A delivery attempt to C{keys} has ended: each may let one message
        it set aside go."""
        busy = self._busy
        for k in keys:
            n = busy.get(k, 0) - 1
            if n > 0:
                busy[k] = n
            else:
                busy.pop(k, None)
            self._unpark(k)

    def _unpark(self, dest: str) -> None:
        """Put the first message set aside for C{dest} back into the schedule,
        at its old due time, if C{dest} is below its share."""
        line = self._parked.get(dest)
        while line and not self._stopping:  # (stopping: stop() gives them back)
            share = self._share(dest)
            if share is not None and self._busy.get(dest, 0) >= share:
                return
            due, qid = line.popleft()
            if self._parked_at.get(qid) != dest:
                continue  # stale: the operator took it
            del self._parked_at[qid]
            self._schedule(qid, due)
            break
        if line is not None and not line:
            self._parked.pop(dest, None)

    # -- one message ----------------------------------------------------------

    async def _process(self, qid: str) -> float | _Parked | None:
        """Work on one message. @return: when it is due next, L{None}, or
        L{_Parked} when its destination has its share in flight."""
        try:
            try:
                return await self._process_inner(qid)
            except defer.FirstError as e:  # one of several destinations' deliveries
                if e.subFailure.check(defer.CancelledError):
                    raise defer.CancelledError() from None
                raise
        except defer.CancelledError:
            # Cancelled (by stop() after its timeout, or by a caller holding
            # the work's Deferred): nothing went wrong; the message stays
            # queued as last saved and is tried again later. When stopping,
            # stop() said so once and the connector once per connection.
            if self._stopping:
                log.debug("{qid}: work cancelled by the shutdown; it stays queued", qid=qid)
            else:
                log.info("{qid}: work cancelled; it stays queued", qid=qid)
            return float(self.clock.seconds() + self.retry.base)
        except LeaseLost as e:
            log.warn("{qid}: given up, another daemon holds it now ({err})", qid=qid, err=e)
            return None
        except Exception:  # noqa: BLE001 - a bug or disk error must not lose the message
            log.failure("{qid}: internal error; will retry", qid=qid)
            return float(self.clock.seconds() + self.retry.base)

    async def _process_inner(self, qid: str) -> float | _Parked | None:
        entry = self._preloaded.pop(qid, None)
        try:
            if entry is None or entry.size is None:
                # (size is known from pickup: then no store work at all)
                entry = await self.run_blocking(self.queue.load, qid)
        except EntryNotFound:
            log.warn("{qid}: vanished from the queue", qid=qid)
            return None
        except CorruptEntry as e:
            log.error("{qid}: corrupt state, moved to corrupt/: {err}", qid=qid, err=e)
            await self.run_blocking(self.queue.quarantine, qid, str(e))
            return None
        size = entry.size if entry.size is not None else 0  # set by load and pickup
        now = self.clock.seconds()
        due = entry.due(now)
        paced = False
        keys: list[str] = []
        if due and qid not in self._unsaved:
            keys, full = self._reserve(due)
            if full is not None:
                self._preloaded[qid] = entry  # it comes back soon: keep it loaded
                return _Parked(full, min(now, entry.next_attempt() or now))
        try:
            try:
                if due and self.admission.active:
                    waiting = len(due)
                    due, paced = await self.admission.admit(qid, due, now)
                    if len(due) < waiting and entry.size is not None:
                        self._preloaded[qid] = entry  # it comes back soon: keep it loaded
                if due:
                    await self._attempt(entry, due, size, paced)
                    self._unsaved.add(qid)
            finally:
                if keys:
                    self._unreserve(keys)
            # When the message is finished, removing it is the record of its
            # outcome: a state write just before it would only cost an fsync.
            if qid in self._unsaved and not (entry.done and all_reported(entry)):
                await self._saver.submit(entry)
                self._unsaved.discard(qid)
            if due:
                await self._warn_delay(entry, now)
            await self._report_bounces(entry)
            if entry.done:
                await self._remover.submit(entry.qid)
                self._unsaved.discard(qid)
                return None
        except OSError as e:
            # Disk full, read-only file system...: the outcomes are known and
            # kept in memory; only the write is tried again, never a delivery
            # the server has already accepted.
            retry = min(30.0, self.retry.base)
            log.error("{qid}: cannot record the outcome ({err}); kept in memory, writing "
                      "again in {retry:g}s", qid=qid, err=e.strerror or e, retry=retry)
            self._unsaved.add(qid)
            self._preloaded[qid] = entry
            return float(self.clock.seconds() + retry)
        na = self._next_attempt(entry, now)
        return None if na is None else float(na)

    def _next_attempt(self, entry: QueueEntry, now: float) -> float | None:
        """L{QueueEntry.next_attempt}, with recipients held back by
        L{Admission} (a suspension, a rate slot) due when they may go."""
        if not self.admission.active or entry.held:
            return entry.next_attempt()
        times = []
        for r in entry.recipients:
            if r.state is RecipientState.PENDING:
                t = entry.arrival
            elif r.state is RecipientState.DEFERRED:
                t = r.next_attempt or 0.0
            else:
                continue
            until = self.admission.until(entry.qid, r.address, now)
            times.append(t if until is None else max(t, until))
        return min(times) if times else None

    async def _attempt(self, entry: QueueEntry, due: list[RecipientStatus], size: int,
                       paced: bool = False) -> None:
        sender_addr = parse_sender(entry.sender)
        sender = sender_addr.smtp_form() if sender_addr else ""
        utf8 = bool(sender_addr and sender_addr.needs_smtputf8)
        by_dest = group_by_destination([(parse_address(rs.address), rs) for rs in due],
                                       _first, self.relay)
        groups: dict[str, dict[str, RecipientStatus]] = {
            k: {a.smtp_form(): rs for a, rs in pairs} for k, pairs in by_dest.items()}
        flags = {k: utf8 or any(a.needs_smtputf8 for a, _ in pairs)
                 for k, pairs in by_dest.items()}

        unsigned: Reply | None = None
        if self.signer is not None and entry.dkim is None:
            try:
                # kept in memory and saved with the first outcome: a message
                # finished at its first attempt needs no extra write
                entry.dkim = await self.run_blocking(signature_for, self.queue, entry,
                                                     self.signer)
            except OSError as e:  # the message cannot be read: a deferral like any other
                unsigned = Reply(451, f"4.3.0 cannot read the queued message to sign it: "
                                 f"{e.strerror or e}", local=True)
                log.error("{qid}: cannot read it to sign: {err}; deferred", qid=entry.qid, err=e)
            except Exception as e:  # noqa: BLE001 - any signing failure defers, with why
                unsigned = Reply(451, f"4.7.0 message not signed: {e}", local=True)
                log.error("{qid}: cannot sign: {err}; deferred", qid=entry.qid, err=e)
        prefix = entry.dkim.encode("ascii") if entry.dkim else b""
        size += len(prefix)

        def opener() -> IO[bytes]:
            body = self.queue.open_body(entry)  # the connector closes it
            return cast(IO[bytes], PrefixedBody(prefix, body)) if prefix else body

        keys = list(groups)
        extra: dict[str, Any] = {"paced": True} if paced else {}  # (older tests' fakes)
        if self.guard is not None:
            extra["may_finish"] = self.guard.may_finish
        results: list[Attempt]
        if unsigned is not None:
            results = [Attempt({form: unsigned for form in groups[k]}, None) for k in keys]
        elif len(keys) == 1:  # the usual case: no DeferredList to build
            k = keys[0]
            results = [await self.connector.deliver(
                k, sender, list(groups[k]), opener, size, flags[k], entry.eightbit, **extra)]
        else:
            results = await defer.gatherResults([
                self.connector.deliver(k, sender, list(groups[k]), opener, size, flags[k],
                                       entry.eightbit, **extra)
                for k in keys], consumeErrors=True)
        now = self.clock.seconds()
        for key, attempt in zip(keys, results, strict=True):
            shape = self.shaper.cached(key) if self.shaper is not None else None
            retry = shape.settings.retry_policy(self.retry) if shape is not None else self.retry
            untried = set(getattr(attempt, "untried", ()))
            for form, rs in groups[key].items():
                if form in untried:
                    continue  # suspended while it waited: no attempt made
                reply = attempt.replies.get(form) or Reply(
                    451, "4.3.0 no reply recorded for this recipient", local=True)
                rs.relay = attempt.relay
                if self.throttle is not None and not reply.is_positive and not reply.local:
                    self.throttle.observe(key, reply.one_line(), shape)
                status = outcome_for(rs, reply, now, entry.lifetime_start, retry,
                                     not entry.sender, self.rng)
                final = rs.reply or reply  # outcome_for recorded it (expiry notes added)
                rs.record(now, final, attempt.relay)
                self._emit(RecipientResult(
                    rs.address, status, final.code, final.text, attempt.relay, final.local,
                    entry.qid, rs.attempts, now - entry.arrival),
                    sender=entry.sender, destination=key, tls=getattr(attempt, "tls", None))

    def _emit(self, o: RecipientResult, **extra: Any) -> None:
        """Log one outcome and give it to the observers.

        The log event's namespace is C{twisted_mailout.outcome}; its fields
        are stable (L{RecipientResult.log_fields}): C{qid}, C{recipient},
        C{outcome} (the L{Status}: C{"delivered"}, C{"deferred"},
        C{"bounced"}, C{"expired"}), C{event} (the same with C{"expired"} as
        C{"bounced"}), C{status} (the Postfix word of the line: C{"sent"},
        ...), C{code}, C{dsn} (enhanced status), C{reply} (one line),
        C{relay}, C{delay} (seconds), C{attempts}, C{local} (no server gave
        the reply); and, from the scheduler, C{sender} (the envelope sender,
        C{""} for the null sender), C{destination} (the recipient domain, or
        the relay's key when relaying) and C{tls} (how the session was
        protected, L{None} when unknown or no session).

        @param o: the outcome.
        @param extra: the scheduler's extra fields (C{sender}, C{destination},
            C{tls}).
        """
        self.counts[o.status.value] = self.counts.get(o.status.value, 0) + 1
        fields = o.log_fields()
        # Pre-formatted with str.format for CPU, as the pickup line is
        # (docs/benchmarks.md); every field is also on the event.
        outcome_log.info(
            "{text}", text=_OUTCOME_LINE.format(o.queue_id, o.recipient, fields["relay"],
                                                o.delay, o.attempts, fields["dsn"],
                                                fields["status"], fields["reply"]),
            **fields, **extra)
        for obs in self.observers:
            try:
                obs(o)
            except Exception:  # noqa: BLE001 - observers never break delivery
                log.failure("outcome observer {obs!r} failed", obs=obs)

    async def _warn_delay(self, entry: QueueEntry, now: float) -> None:
        if self.delay_warning is not None and await warn_delay(
                self.queue, self.run_blocking, entry, now, self.delay_warning,
                self.reporting_mta, self.clock.seconds()):
            self.pickup()

    async def _report_bounces(self, entry: QueueEntry) -> None:
        if await report_bounces(self.queue, self.run_blocking, entry, self.reporting_mta,
                                self.clock.seconds()):
            self.pickup()
