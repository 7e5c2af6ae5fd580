"""L{QueueAdmin}: the operator's actions over any queue store.

One object, two ways in (issue 11): the C{mailout queue} command makes one
over the folder of a stopped daemon (holding the folder's lock, with no
scheduler), and the daemon makes one over its own store and scheduler for
its HTTP API. With a scheduler, each message an action changes is first
taken out of the schedule (work in flight on it is waited for, never cut
off), changed in the store, then given back with its new due time, so the
daemon acts on the change at once.

Every method returns a Deferred; store work runs through C{run_blocking}
(a thread pool in the daemon, L{inline_io} in the command). Each message is
changed atomically in the store (one state write, or one removal): an action
applies to a message completely or not at all.

Every change is logged, one line per message, in the namespace
C{twisted_mailout.admin} with the fields C{action}, C{qid}, C{reason},
C{source} (C{"cli"} or C{"api"}), and C{domain} / C{suspension} for
suspensions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from twisted_mailout.admin import views
from twisted_mailout.admin.selector import Selector, SelectorError
from twisted_mailout.delivery.bounce import enqueue_dsn
from twisted_mailout.delivery.commit import RunBlocking, inline_io
from twisted_mailout.delivery.suspend import Suspensions, domain_of
from twisted_mailout.envelope import FINAL_STATES, RecipientState, Reply
from twisted_mailout.errors import MailoutError
from twisted_mailout.queue.interface import IQueueStore
from twisted_mailout.queue.model import EntryNotFound, ListedEntry, QueueEntry, Suspension

if TYPE_CHECKING:  # the scheduler (and the SMTP code below it) loads only in the daemon
    from twisted_mailout.delivery.scheduler import Scheduler

__all__ = ["ActionResult", "AdminConflict", "QueueAdmin"]

log = Logger()
admin_log = Logger(namespace="twisted_mailout.admin")

#: Messages written per store call (a group commit) during a bulk action.
BATCH = 500


def bounce_text(reason: str) -> str:
    """The diagnostic of an operator's bounce (after the code 550).

    @param reason: the operator's reason, or C{""}.
    """
    return "5.0.0 bounced by the operator" + (f": {reason}" if reason else "")


class AdminConflict(MailoutError):
    """The action conflicts with the queue's state (the API answers 409):
    a domain already suspended, for instance."""


class _Clock(Protocol):
    def seconds(self) -> float: ...


class _Forgets(Protocol):
    def forget(self, destination: str) -> None: ...


@dataclass
class ActionResult:
    """What one action did.

    @ivar action: C{hold}, C{release}, C{delete}, C{bounce}, C{flush},
        C{requeue}.
    @ivar matched: messages the selector chose.
    @ivar changed: queue ids changed (in queue id order).
    @ivar skipped: C{{queue id: why}} for messages chosen but left alone
        (already held, nothing deferred, busy writing an outcome).
    @ivar dsns: queue ids of the failure reports queued (C{bounce}).
    @ivar bounced: C{{queue id: [recipient addresses returned]}} (C{bounce}).
    """

    action: str
    matched: int = 0
    changed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dsns: list[str] = field(default_factory=list)
    bounced: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The API's JSON form: C{{"action", "matched", "changed" (count),
        "queue_ids", "skipped", "dsn_queue_ids"}}."""
        return {"action": self.action, "matched": self.matched,
                "changed": len(self.changed), "queue_ids": self.changed,
                "skipped": self.skipped, "dsn_queue_ids": self.dsns}


#: What a per-message change returns: C{("save" | "remove" | "skip", due or
#: None, why)}; C{due} is when the scheduler should take it up again.
_Change = tuple[str, float | None, str]


class QueueAdmin:
    """The operator's actions on one queue store.

    @param store: the L{IQueueStore}. Without a C{scheduler}, the caller
        holds the store for itself (the folder's lock).
    @param clock: has C{seconds()} (the reactor, a C{task.Clock}).
    @param run_blocking: runs blocking store work (L{inline_io} by default).
    @param scheduler: the running daemon's L{Scheduler}, or L{None}.
    @param suspensions: the L{Suspensions} in force (the scheduler's own);
        when L{None}, the scheduler's, or a new copy loaded by L{start}.
    @param reporting_mta: this host's name, for admin bounces' reports.
    @param connector: what requeue asks to forget a destination's cached
        routing, policy and connections (an object with C{forget(dest)}),
        or L{None}.
    @param source: C{"cli"} or C{"api"}, for the log lines.
    @param progress: called as C{progress(done, total)} (messages) after
        each batch of a bulk action, in the caller's thread (a progress bar).
    """

    def __init__(self, store: IQueueStore, clock: _Clock,
                 run_blocking: RunBlocking = inline_io, scheduler: Scheduler | None = None,
                 suspensions: Suspensions | None = None, reporting_mta: str = "localhost",
                 connector: _Forgets | None = None, source: str = "cli",
                 progress: Callable[[int, int], object] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.run_blocking = run_blocking
        self.scheduler = scheduler
        if suspensions is None:
            suspensions = scheduler.suspensions if scheduler is not None else Suspensions()
        self.suspensions = suspensions
        self.reporting_mta = reporting_mta
        self.connector = connector
        self.source = source
        self.progress = progress
        #: suspension saves one at a time, each writing the set as it is then
        self._saving = defer.DeferredLock()

    def start(self) -> defer.Deferred[int]:
        """Load the saved suspensions into L{suspensions}.

        @return: Deferred firing with how many are in force.
        @raise QueueError: (in the Deferred) they cannot be read.
        """
        def loaded(items: list[Suspension]) -> int:
            now = self.clock.seconds()
            for s in items:
                if s.until > now:
                    self.suspensions.add(s)
            return len(self.suspensions.active(now))

        return self.run_blocking(self.store.suspensions).addCallback(loaded)

    def reload_suspensions(self) -> defer.Deferred[int]:
        """Replace L{suspensions} with the saved ones (a shared queue's
        operator changed them from another machine); the mail of a domain
        whose suspension is gone is due at once.

        @return: Deferred firing with how many are in force.
        @raise QueueError: (in the Deferred) they cannot be read.
        """
        async def run() -> int:
            items = await self.run_blocking(self.store.suspensions)
            now = self.clock.seconds()
            saved = {s.id for s in items if s.until > now}
            ended = [s for s in self.suspensions.active(now) if s.id not in saved]
            for s in ended:
                self.suspensions.cancel(s.id)
            for s in items:
                if s.until > now:
                    self.suspensions.add(s)
            if self.scheduler is not None:
                for s in ended:
                    await self._reschedule_domain(s.domain)
            n = len(self.suspensions.active(now))
            log.info("suspensions reloaded from the shared queue: {n} in force", n=n)
            return n

        return defer.Deferred.fromCoroutine(run())

    # -- reading ---------------------------------------------------------------

    def _in_flight(self) -> frozenset[str]:
        return self.scheduler.in_flight() if self.scheduler is not None else frozenset()

    def iter_rows(self, selector: Selector, now: float,
                  in_flight: frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
        """The C{list --json} rows of the selected messages, as a generator
        (blocks: run it in a thread; it reads one entry at a time, so the
        first row comes at once).

        @param selector: which messages (empty: all).
        @param now: seconds since the epoch.
        @param in_flight: the scheduler's queue ids in flight (take
            L{Scheduler.in_flight} in the reactor thread first).
        @raise EntryNotFound: (when the generator runs) an id not in the queue.
        """
        for listed, name in self._select(selector, now, in_flight):
            yield views.row(listed, name)

    def list_messages(self, selector: Selector | None = None,
                      ) -> defer.Deferred[list[dict[str, Any]]]:
        """The C{list --json} rows of the selected messages.

        @param selector: which messages (L{None} or empty: all).
        @return: Deferred firing with the rows (see L{views.row}).
        @raise EntryNotFound: (in the Deferred) a given id is not in the queue.
        """
        sel = selector or Selector()
        now, flying = self.clock.seconds(), self._in_flight()
        return self.run_blocking(lambda: list(self.iter_rows(sel, now, flying)))

    def summary(self, by: str = "domain", selector: Selector | None = None,
                top: int | None = None) -> defer.Deferred[dict[str, Any]]:
        """The queue's shape (C{qshape}; see L{views.summary}).

        @param by: C{"domain"} or C{"sender"}.
        @param selector: which messages (L{None}: all).
        @param top: at most this many rows.
        @raise SelectorError: (in the Deferred) an unknown C{by}.
        """
        if by not in ("domain", "sender"):
            return defer.fail(SelectorError(f"summary --by domain or sender, not {by!r}"))
        sel = selector or Selector()
        now, flying = self.clock.seconds(), self._in_flight()
        return self.run_blocking(
            lambda: views.summary((x for x, _ in self._select(sel, now, flying)), now, by, top))

    def show(self, qid: str, body: bool = False) -> defer.Deferred[dict[str, Any]]:
        """One message in full (see L{views.detail}): its envelope, each
        recipient's history, its headers and, with C{body}, the message.

        @param qid: the queue id.
        @param body: include the message text (at most 10 MB of it).
        @raise EntryNotFound: (in the Deferred) no such message.
        @raise SelectorError: (in the Deferred) not a queue id.
        """
        try:
            Selector(ids=(qid,))
        except SelectorError as e:
            return defer.fail(e)
        flying = self._in_flight()
        due = self.scheduler.due_time(qid) if self.scheduler is not None else None

        def read() -> dict[str, Any]:
            listed = self._find(qid)
            e = listed.entry
            try:
                headers: bytes | None = (self.store.read_headers(e)
                                         if listed.where == "active" else None)
            except OSError:
                headers = None
            text = None
            if body and listed.where == "active":
                with self.store.open_body(e) as f:
                    text = f.read(10 * 1024 * 1024)
            return views.detail(listed, views.queue_name(listed, flying), headers, text, due)

        return self.run_blocking(read)

    def _find(self, qid: str) -> ListedEntry:
        """Blocking: the message C{qid}, active or incoming.
        @raise EntryNotFound."""
        try:
            return ListedEntry(self.store.load(qid), "active")
        except EntryNotFound:
            pass
        for listed in self.store.iter_entries():
            if listed.where == "incoming" and listed.entry.qid == qid:
                return listed
        raise EntryNotFound(f"no message {qid} in the queue")

    def _select(self, selector: Selector, now: float,
                in_flight: frozenset[str]) -> Iterator[tuple[ListedEntry, str]]:
        """Blocking: the selected messages with their queue names.
        @raise EntryNotFound: a given id is not in the queue (before any
        is yielded)."""
        if selector.ids:
            found = []
            missing = []
            for qid in selector.ids:
                try:
                    found.append(self._find(qid))
                except EntryNotFound:
                    missing.append(qid)
            if missing:
                raise EntryNotFound("not in the queue: " + ", ".join(missing))
            source: Any = found
        else:
            source = self.store.iter_entries()
        for listed in source:
            name = views.queue_name(listed, in_flight)
            if selector.matches(listed.entry, name, now):
                yield listed, name

    # -- acting ------------------------------------------------------------------

    def hold(self, selector: Selector, reason: str = "") -> defer.Deferred[ActionResult]:
        """Put the selected messages on hold (Postfix C{postsuper -h}): never
        attempted, never expired, listed under C{hold}, until released.

        @raise SelectorError, EntryNotFound: (in the Deferred) as L{list_messages};
            nothing changed.
        """
        def change(e: QueueEntry, now: float) -> _Change:
            if not e.hold(now):
                return "skip", None, "already held"
            return "save", None, ""

        return self._act("hold", selector, reason, change)

    def release(self, selector: Selector, reason: str = "") -> defer.Deferred[ActionResult]:
        """Release held messages (Postfix C{postsuper -H}): due at once; the
        time held does not count towards their lifetime."""
        def change(e: QueueEntry, now: float) -> _Change:
            if not e.release(now):
                return "skip", e.next_attempt(), "not held"
            return "save", now, ""

        return self._act("release", selector, reason, change)

    def flush(self, selector: Selector | None = None,
              reason: str = "") -> defer.Deferred[ActionResult]:
        """Make deferred mail due now (Postfix C{postqueue -f}, C{-s}, C{-i});
        held mail stays held.

        @param selector: which messages; L{None} or empty: all deferred mail.
        """
        sel = (selector if selector is not None and not selector.is_empty
               else Selector(state="deferred"))

        def change(e: QueueEntry, now: float) -> _Change:
            if e.held:
                return "skip", None, "held"
            deferred = [r for r in e.recipients if r.state is RecipientState.DEFERRED]
            if not deferred:
                return "skip", e.next_attempt(), "nothing deferred"
            for r in deferred:
                r.next_attempt = now
            return "save", now, ""

        return self._act("flush", sel, reason, change, allow_empty=True)

    def requeue(self, selector: Selector, reason: str = "") -> defer.Deferred[ActionResult]:
        """Forget the cached routing, policy and connections of the selected
        mail's destinations and route it again now (Postfix C{postsuper -r}).
        Held mail stays held."""
        def change(e: QueueEntry, now: float) -> _Change:
            if e.held:
                return "skip", None, "held"
            for r in e.recipients:
                if r.state is RecipientState.DEFERRED:
                    r.next_attempt = now
            return "save", now, ""

        return self._act("requeue", selector, reason, change, before=self._forget)

    def delete(self, selector: Selector, reason: str = "") -> defer.Deferred[ActionResult]:
        """Remove the selected messages without a bounce (Postfix C{postsuper
        -d}); one log line each with the reason."""
        def change(e: QueueEntry, now: float) -> _Change:
            return "remove", None, ""

        return self._act("delete", selector, reason, change)

    def bounce(self, selector: Selector, reason: str = "") -> defer.Deferred[ActionResult]:
        """Bounce every unfinished recipient of the selected messages: the
        sender gets an RFC 3464 failure report with C{reason} as the
        diagnostic (KumoMTA's admin bounce), then the message leaves the
        queue. A bounce itself (null sender) is only removed."""
        text = bounce_text(reason)
        returned: dict[str, list[str]] = {}

        def change(e: QueueEntry, now: float) -> _Change:
            reply = Reply(550, text, local=True)
            for r in e.recipients:
                if r.state not in FINAL_STATES:
                    r.move(RecipientState.BOUNCED, reply)
                    r.record(now, reply)
                    returned.setdefault(e.qid, []).append(r.address)
            return "bounce", None, ""

        def keep(result: ActionResult) -> None:
            result.bounced = {q: returned.get(q, []) for q in result.changed}

        return self._act("bounce", selector, reason, change, annotate=keep)


    def _forget(self, entries: Sequence[QueueEntry]) -> None:
        if self.connector is None:
            return
        dests = {domain_of(r.address) for e in entries for r in e.recipients
                 if r.state not in FINAL_STATES}
        for d in sorted(dests):
            try:
                self.connector.forget(d)
            except Exception:  # noqa: BLE001 - forgetting is best effort
                log.failure("requeue: cannot forget {dest}", dest=d)

    def _act(self, action: str, selector: Selector, reason: str,
             change: Callable[[QueueEntry, float], _Change], allow_empty: bool = False,
             before: Callable[[Sequence[QueueEntry]], None] | None = None,
             annotate: Callable[[ActionResult], None] | None = None,
             ) -> defer.Deferred[ActionResult]:
        if not allow_empty:
            try:
                selector.require(action)
            except SelectorError as e:
                return defer.fail(e)
        return defer.Deferred.fromCoroutine(
            self._act_async(action, selector, reason, change, before, annotate))

    async def _act_async(self, action: str, selector: Selector, reason: str,
                         change: Callable[[QueueEntry, float], _Change],
                         before: Callable[[Sequence[QueueEntry]], None] | None,
                         annotate: Callable[[ActionResult], None] | None = None,
                         ) -> ActionResult:
        result = ActionResult(action)
        # Mail not yet picked up is picked up first, so that every message
        # is acted on in one place (the active queue).
        if self.scheduler is not None:
            await self.scheduler.pickup()
        else:
            await self.run_blocking(self._pickup_all)
        now, flying = self.clock.seconds(), self._in_flight()
        chosen = await self.run_blocking(
            lambda: [x.entry.qid for x, _ in self._select(selector, now, flying)])
        result.matched = len(chosen)
        taken = chosen
        if self.scheduler is not None:
            taken = await self.scheduler.take(chosen)
            for qid in set(chosen) - set(taken):
                result.skipped[qid] = "busy: its last outcome is still being written"
        dues: dict[str, float | None] = {}
        try:
            for i in range(0, len(taken), BATCH):
                batch = taken[i:i + BATCH]
                done = await self.run_blocking(self._apply, batch, change, action, reason,
                                               before)
                for qid, (kind, due, why) in done.items():
                    dues[qid] = due
                    if kind == "skip":
                        result.skipped[qid] = why
                    elif kind == "gone":
                        # give it back due now: if it did leave, the scheduler
                        # says so; if a pickup was moving it, it is not lost
                        result.skipped[qid] = why
                        dues[qid] = self.clock.seconds()
                    else:
                        result.changed.append(qid)
                        if kind.startswith("dsn:"):
                            result.dsns.append(kind[4:])
                if self.progress is not None:
                    self.progress(min(i + BATCH, len(taken)), len(taken))
        finally:
            if self.scheduler is not None:
                now = self.clock.seconds()
                for qid in taken:
                    if qid in dues:
                        self.scheduler.give_back(qid, dues[qid])
                    else:  # not reached (an error): as it was, due now
                        self.scheduler.give_back(qid, now)
                if result.dsns:
                    self.scheduler.pickup()
        if self.scheduler is not None:
            held = self.scheduler.on_hold
            for qid in result.changed:
                if action == "hold":
                    held.add(qid)
                elif action in ("release", "delete", "bounce"):
                    held.discard(qid)
        if annotate is not None:
            annotate(result)
        for qid in result.changed:
            extra = {}
            if action == "bounce":  # who was returned, and with what (metrics, status page)
                extra = {"recipients": result.bounced.get(qid, []),
                         "reply": f"550 {bounce_text(reason)}"}
            admin_log.info("{qid}: {action} by the operator ({source}){why}", qid=qid,
                           action=action, reason=reason, source=self.source,
                           why=f": {reason}" if reason else "", **extra)
        return result

    def _pickup_all(self) -> None:
        while True:
            got = self.store.pickup(1000)
            for p in got.problems:
                log.warn("pickup: {problem}", problem=p)
            if len(got.entries) + len(got.problems) < 1000:
                return

    def _apply(self, qids: Sequence[str], change: Callable[[QueueEntry, float], _Change],
               action: str, reason: str,
               before: Callable[[Sequence[QueueEntry]], None] | None,
               ) -> dict[str, tuple[str, float | None, str]]:
        """Blocking: load each message, change it, write it (one group commit
        of states, one of removals). @return: qid -> (kind, due, why)."""
        now = self.clock.seconds()
        out: dict[str, tuple[str, float | None, str]] = {}
        save: list[QueueEntry] = []
        remove: list[str] = []
        entries: list[QueueEntry] = []
        for qid in qids:
            try:
                entries.append(self.store.load(qid))
            except EntryNotFound:
                out[qid] = ("gone", None, "left the queue meanwhile")
        if before is not None:
            before(entries)
        for e in entries:
            kind, due, why = change(e, now)
            if kind == "save":
                save.append(e)
            elif kind == "remove":
                remove.append(e.qid)
            elif kind == "bounce":
                kind = self._bounce_one(e, now)
                remove.append(e.qid)
            out[e.qid] = (kind, due, why)
        if save:
            self.store.save_many(save)
        if remove:
            self.store.remove_many(remove)
        return out

    def _bounce_one(self, e: QueueEntry, now: float) -> str:
        """Blocking: record the bounce, queue the report, mark it reported.
        A crash after the first write leaves a message whose recipients are
        bounced but unreported: the daemon reports and removes it when it
        next starts (as for any bounce). @return: C{"dsn:QID"} or C{"remove"}."""
        self.store.save_many([e])
        unreported = [r for r in e.recipients if r.state is RecipientState.BOUNCED
                      and r.address not in e.bounced_reported]
        if not e.sender or not unreported:
            return "remove"
        dsn = enqueue_dsn(self.store, e, unreported, self.reporting_mta, now)
        e.bounced_reported.extend(r.address for r in unreported)
        # recorded at once: should the removal fail or the process die before
        # it, the message is only removed later, never reported twice
        self.store.save_many([e])
        return "dsn:" + dsn

    # -- suspensions ---------------------------------------------------------------

    def list_suspensions(self) -> list[dict[str, Any]]:
        """The suspensions in force (no I/O): C{[{"id", "domain", "reason",
        "created", "until"}]}, oldest first."""
        return [s.to_json() for s in self.suspensions.active(self.clock.seconds())]

    def suspend(self, domain: str, duration: float,
                reason: str = "") -> defer.Deferred[dict[str, Any]]:
        """Suspend a destination (KumoMTA's C{suspend/v1}): mail to C{domain}
        stays queued and is not attempted (attempts not counted, lifetimes
        running) until C{duration} seconds pass or it is cancelled. Saved in
        the store, so it survives a restart.

        @param domain: the recipient domain.
        @param duration: seconds, more than 0.
        @param reason: the operator's reason.
        @return: Deferred firing with the suspension's JSON form.
        @raise SelectorError: (in the Deferred) a bad domain or duration.
        @raise AdminConflict: (in the Deferred) the domain is already suspended.
        """
        now = self.clock.seconds()
        d = domain.strip().lower().rstrip(".")
        until = self.suspensions.until(d, now)
        if until is not None:
            existing = [s for s in self.suspensions.active(now) if s.domain == d]
            return defer.fail(AdminConflict(
                f"{d} is already suspended until {until:.0f} (suspension "
                f"{existing[0].id if existing else '?'}); cancel it first"))
        try:
            s = self.suspensions.new(domain, float(duration), reason, now)
        except (ValueError, TypeError) as e:
            return defer.fail(SelectorError(str(e)))

        def saved(_: object) -> dict[str, Any]:
            admin_log.info("suspended {domain} until {until:.0f} by the operator ({source})"
                           "{why}", action="suspend", qid=None, domain=s.domain,
                           suspension=s.id, until=s.until, reason=reason,
                           source=self.source, why=f": {reason}" if reason else "")
            return s.to_json()

        def failed(f: Any) -> Any:
            self.suspensions.cancel(s.id)
            return f

        return self._save_suspensions().addCallbacks(saved, failed)

    def cancel_suspension(self, sid: str, reason: str = "") -> defer.Deferred[dict[str, Any]]:
        """End a suspension now; its domain's mail is due at once.

        @param sid: the suspension's id.
        @return: Deferred firing with the cancelled suspension's JSON form.
        @raise EntryNotFound: (in the Deferred) no such suspension in force.
        """
        now = self.clock.seconds()
        s = self.suspensions.get(sid)
        if s is None or s.until <= now:
            return defer.fail(EntryNotFound(f"no suspension {sid!r} in force"))
        self.suspensions.cancel(sid)

        def saved(_: object) -> defer.Deferred[dict[str, Any]]:
            admin_log.info("suspension of {domain} cancelled by the operator ({source}){why}",
                           action="cancel-suspension", qid=None, domain=s.domain,
                           suspension=s.id, reason=reason, source=self.source,
                           why=f": {reason}" if reason else "")
            if self.scheduler is None:
                return defer.succeed(s.to_json())
            # its mail waits in the schedule until the suspension's end: now
            domains = [s.domain]
            shaper = getattr(self.scheduler, "shaper", None)
            if s.domain.startswith("provider:") and shaper is not None:
                domains = shaper.destinations_of(s.domain)  # a rule's, of a provider
            ds = [self._reschedule_domain(d) for d in domains]
            return defer.gatherResults(ds, consumeErrors=True).addCallback(
                lambda _: s.to_json())

        def failed(f: Any) -> Any:
            self.suspensions.add(s)
            return f

        return self._save_suspensions().addCallbacks(saved, failed)

    def save_suspensions(self) -> defer.Deferred[None]:
        """Save the suspensions in force now (after one was added outside
        L{suspend}: a throttling rule's). Errors are logged, not raised.

        @return: a Deferred firing (with L{None}) once saved or failed.
        """
        def failed(f: Any) -> None:
            log.failure("cannot save the destination suspensions", f)

        return self._save_suspensions().addErrback(failed)

    def _save_suspensions(self) -> defer.Deferred[None]:
        """Save the suspensions in force, one save at a time (a later save
        never overtakes an earlier one)."""
        def save() -> defer.Deferred[None]:
            return self.run_blocking(self.store.save_suspensions,
                                     self.suspensions.active(self.clock.seconds()))

        return self._saving.run(save)

    def _reschedule_domain(self, domain: str) -> defer.Deferred[None]:
        assert self.scheduler is not None
        sched = self.scheduler
        sel = Selector(domain=domain)
        now, flying = self.clock.seconds(), sched.in_flight()

        async def run() -> None:
            qids = await self.run_blocking(
                lambda: [x.entry.qid for x, n in self._select(sel, now, flying)
                         if n != "hold"])
            for qid in await sched.take(qids):
                sched.give_back(qid, self.clock.seconds())

        return defer.Deferred.fromCoroutine(run())
