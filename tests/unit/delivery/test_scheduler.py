"""The scheduler and the recipient state machine, driven by a Clock and a
scripted connector: outcomes, retries with backoff, lifetime, bounces."""

import email
import os
import random
import time

import pytest
from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.support.fakes import ScriptedConnector
from twisted_mailout.delivery.connector import Attempt
from twisted_mailout.envelope import (
    InvalidTransition,
    RecipientState,
    Reply,
    check_transition,
)
from twisted_mailout.queue.store import Queue, RecipientStatus
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler, outcome_for
from twisted_mailout.testing.memorystore import MemoryBackend, MemoryStore

MSG = b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m1@example.com>\r\n\r\nbody\r\n"

OK = Reply(250, "2.0.0 Ok: queued")
NOUSER = Reply(550, "5.1.1 no such user")
LATER = Reply(451, "4.3.0 try later")


def script_by_local_part(dest, rcpt):
    local = rcpt.split("@")[0]
    return {"ok": OK, "nouser": NOUSER, "later": LATER}.get(local, OK)


class Harness:
    def __init__(self, tmp_path, script=script_by_local_part, **kw):
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.queue = Queue(str(tmp_path / "q"))
        self.connector = ScriptedConnector(script)
        self.outcomes = []
        kw.setdefault("retry", RetryPolicy(base=300, max=4000, lifetime=86400,
                                           bounce_lifetime=3600, jitter=0))
        self.sched = Scheduler(self.queue, self.connector, self.clock, observers=[
            self.outcomes.append], reporting_mta="mx.mailout.test", rng=random.Random(0), **kw)

    def start(self):
        self.sched.start()

    def entries(self):
        return {x.entry.qid: x.entry for x in self.queue.list_entries() if x.where == "active"}

    def status(self):
        return [(o.recipient, o.status) for o in self.outcomes]


def test_mixed_outcomes_per_recipient(tmp_path):
    h = Harness(tmp_path)
    qid = h.queue.enqueue("sender@origin.test", ["ok@a.test", "nouser@a.test", "later@b.test"],
                          MSG)
    h.start()
    assert sorted(h.status()) == sorted([("ok@a.test", "delivered"), ("nouser@a.test", "bounced"),
                                         ("later@b.test", "deferred"),
                                         ("sender@origin.test", "delivered")])  # the bounce
    # one transaction per destination, all of its recipients in it
    assert sorted((c[0], tuple(c[2])) for c in h.connector.calls[:2]) == [
        ("a.test", ("ok@a.test", "nouser@a.test")), ("b.test", ("later@b.test",))]
    assert h.connector.calls[0][3].endswith(MSG)  # the body as enqueued
    entry = h.entries()[qid]
    states = {r.address: r.state for r in entry.recipients}
    assert states == {"ok@a.test": RecipientState.DELIVERED,
                      "nouser@a.test": RecipientState.BOUNCED,
                      "later@b.test": RecipientState.DEFERRED}
    deferred = [r for r in entry.recipients if r.address == "later@b.test"][0]
    assert deferred.next_attempt == pytest.approx(h.clock.seconds() + 300)
    assert deferred.reply == LATER
    # The bounce for nouser@ was queued to the sender, with a null sender.
    bounces = [c for c in h.connector.calls if c[1] == ""]
    assert [(c[0], c[2]) for c in bounces] == [("origin.test", ["sender@origin.test"])]


def test_bounce_is_an_rfc3464_report(tmp_path):
    h = Harness(tmp_path)
    h.queue.enqueue("sender@origin.test", ["nouser@a.test", "ok@a.test"], MSG)
    h.start()
    dsn_call = [c for c in h.connector.calls if c[1] == ""][0]
    assert dsn_call[0] == "origin.test" and dsn_call[2] == ["sender@origin.test"]
    msg = email.message_from_bytes(dsn_call[3])
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mx.mailout.test"
    assert "Arrival-Date" in blocks[0]
    assert len(blocks) == 2  # per-message + the one failed recipient only
    assert blocks[1]["Final-Recipient"] == "rfc822; nouser@a.test"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert blocks[1]["Remote-MTA"] == "dns; mx.a.test"
    assert "Message-ID: <m1@example.com>" in parts[2].get_payload()


def test_deferred_recipient_retried_with_backoff_then_delivered(tmp_path):
    replies = iter([LATER, LATER, LATER, OK])
    h = Harness(tmp_path, script=lambda d, r: next(replies))
    qid = h.queue.enqueue("s@origin.test", ["x@b.test"], MSG)
    h.start()
    times = [h.clock.seconds()]
    for wait in (300, 600, 1200):
        h.clock.advance(wait - 1)
        assert len(h.connector.calls) == len(times), "retried too early"
        h.clock.advance(1)
        times.append(h.clock.seconds())
        assert len(h.connector.calls) == len(times)
    assert h.status()[-1] == ("x@b.test", "delivered")
    assert qid not in h.entries()  # finished messages leave the queue
    assert os.listdir(os.path.join(h.queue.path, "messages")) == []


def test_backoff_is_capped_and_jittered():
    p = RetryPolicy(base=300, max=4000, jitter=0.1)
    rng = random.Random(3)
    delays = [p.delay(n, rng) for n in range(1, 12)]
    assert all(d <= 4000 for d in delays)
    assert delays[0] <= 300 and delays[0] >= 270
    assert delays[-1] >= 3600


def test_deferred_past_lifetime_bounces(tmp_path):
    h = Harness(tmp_path, script=lambda d, r: LATER)
    h.queue.enqueue("s@origin.test", ["x@b.test"], MSG)
    h.start()
    for _ in range(200):
        if any(st == "expired" for _, st in h.status()):
            break
        h.clock.advance(4000)
    assert ("x@b.test", "expired") in h.status()
    # the bounce report went to the sender, and the message left the queue
    assert [c[2] for c in h.connector.calls if c[1] == ""] == [["s@origin.test"]]


def test_no_bounce_for_a_bounce(tmp_path):
    h = Harness(tmp_path, script=lambda d, r: NOUSER)
    h.queue.enqueue("", ["x@b.test"], MSG)  # null sender: a bounce itself
    h.start()
    assert h.status() == [("x@b.test", "bounced")]
    assert len(h.connector.calls) == 1  # nothing sent back
    assert h.entries() == {}


def test_recovery_after_restart_reschedules_deferred_mail(tmp_path):
    h = Harness(tmp_path, script=lambda d, r: LATER)
    qid = h.queue.enqueue("s@origin.test", ["x@b.test"], MSG)
    h.start()
    # a new scheduler on the same folder (a restart) knows the next attempt
    h2 = Harness(tmp_path, script=lambda d, r: OK)
    h2.clock.advance(h.clock.seconds() - h2.clock.seconds())
    h2.start()
    assert h2.connector.calls == []
    h2.clock.advance(300)
    assert h2.status() == [("x@b.test", "delivered")]
    assert qid not in h2.entries()


def test_relay_mode_sends_all_domains_in_one_transaction(tmp_path):
    h = Harness(tmp_path, relay=True)
    h.queue.enqueue("s@origin.test", ["ok@a.test", "ok@b.test"], MSG)
    h.start()
    assert [(c[0], c[2]) for c in h.connector.calls] == [("relay", ["ok@a.test", "ok@b.test"])]


def test_observer_errors_never_break_delivery(tmp_path):
    h = Harness(tmp_path)
    h.sched.observers.insert(0, lambda o: 1 / 0)
    h.queue.enqueue("s@origin.test", ["ok@a.test"], MSG)
    h.start()
    assert h.status() == [("ok@a.test", "delivered")]
    assert h.entries() == {}


def test_state_machine_transitions():
    finals = (RecipientState.DELIVERED, RecipientState.BOUNCED)
    for old in RecipientState:
        for new in RecipientState:
            allowed = old not in finals and new is not RecipientState.PENDING
            if allowed:
                check_transition(old, new)
            else:
                with pytest.raises(InvalidTransition):
                    check_transition(old, new)


def test_outcome_for_maps_reply_classes():
    p = RetryPolicy(base=10, max=100, lifetime=1000, jitter=0)
    for reply, status, state in [(OK, "delivered", RecipientState.DELIVERED),
                                 (NOUSER, "bounced", RecipientState.BOUNCED),
                                 (LATER, "deferred", RecipientState.DEFERRED),
                                 (Reply(421, "x", local=True), "deferred",
                                  RecipientState.DEFERRED)]:
        rs = RecipientStatus("x@b.test")
        assert outcome_for(rs, reply, 100.0, 0.0, p, False) == status
        assert rs.state is state and rs.attempts == 1
    rs = RecipientStatus("x@b.test")
    assert outcome_for(rs, LATER, 1000.0, 0.0, p, False) == "expired"
    assert rs.state is RecipientState.BOUNCED
    with pytest.raises(InvalidTransition):
        outcome_for(rs, OK, 1001.0, 0.0, p, False)


def test_delay_warning_sent_once_then_the_final_outcome(tmp_path):
    replies = iter([LATER, LATER, LATER, OK])
    h = Harness(tmp_path, script=lambda d, r: next(replies) if d == "b.test" else OK,
                delay_warning=500)
    h.queue.enqueue("s@origin.test", ["x@b.test"], MSG)
    h.start()
    assert [c for c in h.connector.calls if c[1] == ""] == []  # too early for a warning
    h.clock.advance(300)  # second attempt, 300 s after arrival: still no warning
    assert [c for c in h.connector.calls if c[1] == ""] == []
    h.clock.advance(600)  # third attempt, 900 s: one warning
    warnings = [c for c in h.connector.calls if c[1] == ""]
    assert [(c[0], c[2]) for c in warnings] == [("origin.test", ["s@origin.test"])]
    report = email.message_from_bytes(warnings[0][3])
    blocks = report.get_payload()[1].get_payload()
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Status"] == "4.3.0"
    assert "Delayed Mail" in report["Subject"]
    h.clock.advance(1200)  # delivered: no second warning, no bounce
    assert h.status()[-1] == ("x@b.test", "delivered")
    assert len([c for c in h.connector.calls if c[1] == ""]) == 1


def test_no_delay_warning_by_default(tmp_path):
    h = Harness(tmp_path, script=lambda d, r: LATER)
    h.queue.enqueue("s@origin.test", ["x@b.test"], MSG)
    h.start()
    for _ in range(20):
        h.clock.advance(4000)
    assert [c for c in h.connector.calls if c[1] == ""] == []


def test_group_commit_batches_what_arrives_while_a_batch_runs():
    from twisted.internet import defer

    from twisted_mailout.delivery.scheduler import GroupCommit

    batches, running = [], []

    def io(f, items):
        d = defer.Deferred()
        running.append((d, f, items))
        return d

    gc = GroupCommit(io, lambda items: batches.append(list(items)))
    first = gc.submit("a")  # runs at once, alone
    later = [gc.submit(x) for x in "bcd"]  # wait for "a" to finish: one batch
    assert [items for _, _, items in running] == [["a"]]
    d, f, items = running.pop(0)
    f(items)
    d.callback(None)
    assert first.called and not any(x.called for x in later)
    assert [items for _, _, items in running] == [["b", "c", "d"]]
    d, f, items = running.pop(0)
    d.errback(OSError(28, "No space left on device"))
    for x in later:  # an error fails every item of its batch
        assert isinstance(x.result.value, OSError)
        x.addErrback(lambda _: None)
    assert batches == [["a"]]


def test_group_commit_fails_only_the_items_a_lost_lease_names():
    """A store that lost some leases wrote the rest of the batch: only the
    items the error names fail (an OSError still fails the whole batch)."""
    from twisted_mailout.delivery.commit import GroupCommit
    from twisted_mailout.queue import LeaseLost

    held = []

    def io(f, items):
        d = defer.Deferred()
        held.append((d, f, items))
        return d

    def save(items):
        raise LeaseLost({"B"})

    gc = GroupCommit(io, save)
    first = gc.submit("A")
    later = {q: gc.submit(q) for q in "BC"}
    d, _, _ = held.pop(0)
    d.callback(None)  # A's batch done; B and C now go together
    assert first.called
    d, f, items = held.pop(0)
    assert items == ["B", "C"]
    defer.maybeDeferred(f, items).chainDeferred(d)
    failures = []
    later["B"].addErrback(failures.append)
    assert [type(x.value) for x in failures] == [LeaseLost]
    assert later["C"].called and later["C"].result is None


# -- against the in-memory store; stopping and cancelling --------


class HeldConnector:
    """A connector whose deliveries wait until the test answers them; it
    records whether anything cancelled them."""

    def __init__(self):
        self.calls = []  # (dest, recipients, Deferred)
        self.cancelled = []
        self.closed = False

    def deliver(self, dest, sender, recipients, open_source, size=None, smtputf8=False,
                eightbit=False, **kw):
        with open_source() as f:
            f.read()
        d = defer.Deferred(lambda d: self.cancelled.append(dest))
        self.calls.append((dest, list(recipients), d))
        return d

    def answer(self, i, reply):
        dest, rcpts, d = self.calls[i]
        d.callback(Attempt({r: reply for r in rcpts}, f"mx.{dest}[192.0.2.1]:25"))

    def close(self):
        self.closed = True
        return defer.succeed(None)


class Logged:
    """Every log event emitted while the test runs."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def texts(self):
        return [formatEvent(e) for e in self.events]

    def matching(self, word):
        return [t for t in self.texts() if word in t]


@pytest.fixture
def logged():
    obs = Logged()
    globalLogPublisher.addObserver(obs)
    yield obs
    globalLogPublisher.removeObserver(obs)


def memory_scheduler(connector, clock=None, **kw):
    clock = clock or task.Clock()
    if not clock.seconds():
        clock.advance(1_800_000_000)
    store = MemoryStore(clock=clock.seconds)
    sched = Scheduler(store, connector, clock, reporting_mta="mx.mailout.test",
                      rng=random.Random(0), **kw)
    return store, sched, clock


def active(store):
    return {x.entry.qid: x.entry for x in store.list_entries() if x.where == "active"}


def test_the_scheduler_delivers_from_the_memory_store(logged):
    later = iter([LATER, OK])
    store, sched, clock = memory_scheduler(ScriptedConnector(
        lambda d, r: next(later) if r.startswith("later") else OK))
    outcomes = []
    sched.observers.append(outcomes.append)
    qid = store.enqueue("s@origin.test", ["ok@a.test", "later@b.test"], MSG)
    sched.start()
    assert sorted((o.recipient, o.status) for o in outcomes) == [
        ("later@b.test", "deferred"), ("ok@a.test", "delivered")]
    assert sched.connector.calls[0][3].endswith(MSG)  # the body, streamed from the store
    [entry] = active(store).values()
    assert entry.qid == qid and entry.recipients[1].next_attempt == pytest.approx(
        clock.seconds() + sched.retry.delay(1, random.Random(0)))
    clock.advance(4000)
    assert active(store) == {}  # delivered at the retry, and removed
    assert logged.matching("internal error") == []


def test_stop_waits_for_work_in_flight_without_cancelling_it(logged):
    conn = HeldConnector()
    store, sched, clock = memory_scheduler(conn)
    store.enqueue("s@origin.test", ["x@a.test"], MSG)
    sched.start()
    assert len(conn.calls) == 1  # in flight
    stopped = sched.stop(timeout=30)
    clock.advance(29)
    assert not stopped.called and conn.cancelled == [] and not conn.closed
    conn.answer(0, OK)  # the transaction finishes within the timeout
    assert stopped.called and conn.closed
    assert conn.cancelled == []
    assert active(store) == {}  # its outcome was recorded: delivered and removed
    assert logged.matching("still in flight") == []


def test_stop_after_its_timeout_aborts_work_in_flight_which_stays_queued(logged):
    """After the timeout, what is still in flight is cancelled (the connector
    then aborts its connections and frees their slots), one warning says so,
    and the mail stays queued as it was: no outcome is recorded for it."""
    conn = HeldConnector()
    store, sched, clock = memory_scheduler(conn)
    qid = store.enqueue("s@origin.test", ["x@a.test", "y@b.test"], MSG)
    sched.start()
    assert len(conn.calls) == 2  # two destinations, both in flight
    stopped = sched.stop(timeout=30)
    clock.advance(29)
    assert not stopped.called and conn.cancelled == []  # waited, not cancelled
    clock.advance(1)
    assert stopped.called and conn.closed
    assert sorted(conn.cancelled) == ["a.test", "b.test"]  # both deliveries aborted
    [warning] = logged.matching("still in flight")
    assert ("1 messages still in flight after 30s; their connections are aborted "
            "and they stay queued") in warning
    [entry] = active(store).values()  # queued as it was: nothing recorded
    assert entry.qid == qid
    assert [r.state for r in entry.recipients] == [RecipientState.PENDING] * 2
    # the warning is the scheduler's one line (per message only at debug level)
    assert [e for e in logged.events if "work cancelled" in formatEvent(e)
            and e["log_level"] != LogLevel.debug] == []
    assert logged.matching("internal error") == []
    assert logged.matching("Unhandled") == []


def test_cancelled_work_is_not_an_internal_error_and_the_mail_stays_queued(logged):
    conn = HeldConnector()
    store, sched, clock = memory_scheduler(conn)
    qid = store.enqueue("s@origin.test", ["x@a.test"], MSG)
    sched.start()
    sched._inflight[qid].cancel()  # as any caller holding the work's Deferred may
    assert conn.cancelled == ["a.test"]  # the cancellation reached the delivery
    assert logged.matching("internal error") == []
    assert logged.matching(f"{qid}: work cancelled; it stays queued") != []
    assert [r.state for r in active(store)[qid].recipients] == [RecipientState.PENDING]
    clock.advance(sched.retry.base)  # and it is tried again later
    assert len(conn.calls) == 2
    conn.answer(1, OK)
    assert active(store) == {}


def test_a_failing_destination_leaves_no_unhandled_error_behind(logged):
    """Two destinations whose deliveries both fail (breaking the connector's
    no-fail contract): one internal error for the message, and the second
    failure, arriving after the first ended the attempt, is consumed rather
    than left as an 'Unhandled error in Deferred'."""
    later = defer.Deferred()

    class Broken:
        def deliver(self, dest, *args, **kw):
            return defer.fail(RuntimeError(dest)) if dest == "a.test" else later

        def close(self):
            return defer.succeed(None)

    store, sched, clock = memory_scheduler(Broken())
    qid = store.enqueue("s@origin.test", ["x@a.test", "y@b.test"], MSG)
    sched.start()
    assert len(logged.matching("internal error; will retry")) == 1
    later.errback(RuntimeError("b.test"))
    unhandled = []
    later.addErrback(unhandled.append)  # what garbage collection would log
    assert unhandled == []
    assert qid in active(store)


def test_a_failed_state_write_is_retried_from_memory(logged):
    store, sched, clock = memory_scheduler(ScriptedConnector(script_by_local_part))
    outcomes = []
    sched.observers.append(outcomes.append)
    store.backend.fail("save_many", OSError(28, "No space left on device"))
    qid = store.enqueue("s@origin.test", ["later@b.test"], MSG)
    sched.start()
    assert logged.matching("cannot record the outcome") != []
    assert store.backend.states == {}  # not written yet
    clock.advance(30)
    assert store.backend.states[qid]["recipients"][0]["state"] == "deferred"
    assert len(outcomes) == 1  # the delivery was not repeated, only the write


def test_two_daemons_sharing_one_store_deliver_each_message_once():
    """Leases: two schedulers over one backend never both work on a message;
    when one dies, the other takes its mail over once the lease expires."""
    clock = task.Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock=clock.seconds)
    conns = [ScriptedConnector(lambda d, r: LATER if r.startswith("later") else OK)
             for _ in range(2)]
    scheds = []
    for i, conn in enumerate(conns):
        store = MemoryStore(backend, owner=f"daemon{i}", lease_duration=60)
        scheds.append(Scheduler(store, conn, clock, reporting_mta="mx.mailout.test",
                                rng=random.Random(i),
                                retry=RetryPolicy(base=300, max=300, jitter=0)))
    for s in scheds:
        s.start()
    qids = [MemoryStore(backend).enqueue("s@origin.test", [f"r{i}@a.test"], MSG)
            for i in range(10)]
    stuck = MemoryStore(backend).enqueue("s@origin.test", ["later@b.test"], MSG)
    scheds[0].pickup()
    scheds[1].pickup()  # finds nothing: daemon0 holds all of it
    delivered = [c[2] for conn in conns for c in conn.calls]
    assert sorted(r for rcpts in delivered for r in rcpts) == sorted(
        [f"r{i}@a.test" for i in range(10)] + ["later@b.test"])
    assert conns[1].calls == []
    assert backend.leases[stuck].owner == "daemon0"
    # daemon0 dies (its heartbeat stops); daemon1 takes the deferred message
    # over once the lease has expired, and tries it when it is due.
    scheds[0]._heartbeat.stop()
    scheds[0]._stopping = True
    clock.advance(61)
    scheds[1].pickup()
    assert backend.leases[stuck].owner == "daemon1"
    clock.advance(300)
    assert [c[2] for c in conns[1].calls] == [["later@b.test"]]
    assert set(qids).isdisjoint(backend.messages)


def test_a_write_under_a_lost_lease_is_refused_and_dropped(logged):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock=clock.seconds)
    conn = HeldConnector()
    store = MemoryStore(backend, owner="slow", lease_duration=60)
    sched = Scheduler(store, conn, clock, reporting_mta="mx.mailout.test")
    qid = store.enqueue("s@origin.test", ["x@a.test"], MSG)
    sched.start()
    sched._heartbeat.stop()  # hung: no heartbeat, the transaction still open
    clock.advance(61)
    other = MemoryStore(backend, owner="other", lease_duration=60)
    assert [e.qid for e in other.pickup().entries] == [qid]
    conn.answer(0, OK)  # the slow daemon's outcome arrives too late
    assert logged.matching(f"{qid}: given up, another daemon holds it now") != []
    assert backend.leases[qid].owner == "other"
    assert qid in backend.messages  # not removed by the daemon that lost it


def test_a_stopping_daemon_gives_back_what_waits_and_keeps_what_is_in_flight():
    """With a shared store, stop() releases the leases of the mail waiting for
    its next attempt, so another daemon takes it at once; mail still in flight
    keeps its lease (it may yet be delivered by the stopping daemon)."""
    clock = task.Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock=clock.seconds)
    conn = HeldConnector()
    one = MemoryStore(backend, owner="one", lease_duration=60)
    sched = Scheduler(one, conn, clock, reporting_mta="mx.mailout.test",
                      retry=RetryPolicy(base=300, max=300, jitter=0))
    waiting = one.enqueue("s@origin.test", ["w@a.test"], MSG)
    sched.start()
    conn.answer(0, LATER)  # deferred: waits in the heap for 300 s
    flying = one.enqueue("s@origin.test", ["f@b.test"], MSG)
    sched.pickup()
    assert len(conn.calls) == 2  # the second is in flight
    sched.stop(timeout=1)
    clock.advance(1)
    two = MemoryStore(backend, owner="two", lease_duration=60)
    assert [e.qid for e in two.pickup().entries] == [waiting]
    assert backend.leases[flying].owner == "one"
