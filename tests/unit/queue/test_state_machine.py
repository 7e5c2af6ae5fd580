"""Lose nothing, double nothing: property tests of the
recipient state machine and of the scheduler over a real queue folder.

(a) ``outcome_for`` with arbitrary replies (any class, local or not), times
    and retry policies: a final state is never left, every applied reply is
    counted, a deferral is always in the future and at most ``policy.max``
    ahead, and after the lifetime every transient reply bounces ("expired").

(b) A hypothesis state machine drives the real ``Scheduler`` with a
    ``task.Clock``, inline file work and a scripted connector whose reply to
    each recipient attempt is drawn by hypothesis, over a real temporary queue
    folder. Rules: enqueue (1-4 recipients, null sender or not), pick up,
    advance the clock, restart (a new Scheduler on the same folder, the old
    one simply abandoned, as after SIGKILL), and crash (the process "dies" at
    the k-th file operation from now: that operation and every later one
    never happen, and then it restarts).

    Invariants, checked against the disk after every step:
    - no recipient is lost: each one is either still queued in a non-final
      state (and has no final outcome), or has exactly one final outcome
      reported to the observer;
    - a message leaves the queue only when all its recipients are final, and
      a finished message does not linger; nothing is left due and unworked;
    - the attempts on disk equal the outcomes reported;
    - each bounced recipient of a message with a non-null sender is named in
      exactly one DSN, sent with the null sender to that sender; no DSN ever
      names a null-sender message; at most one delay warning per message;
    - nothing is moved to corrupt/, no "internal error" is logged.

    The only repetitions allowed are those docs/reliability.md allows for a
    crash: outcomes reported but not yet written when the process died
    (recognised from what is on disk at the restart) are reported again, and
    a DSN queued but not yet recorded in the state is queued again.

    At the end of every example the clock runs until the queue is empty.
"""

from __future__ import annotations

import email
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from twisted_mailout.queue import store as queue_module
from twisted_mailout.delivery.connector import Attempt
from twisted_mailout.envelope import FINAL_STATES, InvalidTransition, RecipientState, Reply
from twisted_mailout.queue.store import CorruptEntry, Queue, RecipientStatus
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler, outcome_for
from twisted_mailout.testing.memorystore import MemoryBackend, MemoryStore

# --------------------------------------------------------------------------- (a) outcome_for

CODES = st.one_of(st.integers(200, 299), st.integers(400, 499), st.integers(500, 599),
                  st.sampled_from([101, 354, 334, 399]))
REPLIES = st.builds(Reply, code=CODES, text=st.sampled_from(["", "4.3.0 later", "5.1.1 no",
                                                             "2.0.0 ok", "x y z"]),
                    local=st.booleans())
POLICIES = st.builds(RetryPolicy, base=st.floats(1, 5000), max=st.floats(1, 20000),
                     lifetime=st.floats(0, 10 * 86400), bounce_lifetime=st.floats(0, 10 * 86400),
                     jitter=st.floats(0, 0.99))


@settings(max_examples=300, deadline=None)
@given(policy=POLICIES, arrival=st.floats(1e9, 2e9), null_sender=st.booleans(),
       seed=st.integers(0, 2**32),
       steps=st.lists(st.tuples(REPLIES, st.floats(0, 200000)), min_size=1, max_size=25))
def test_outcome_for_properties(policy, arrival, null_sender, seed, steps):
    rng = random.Random(seed)
    rs = RecipientStatus("x@dest.test")
    lifetime = policy.bounce_lifetime if null_sender else policy.lifetime
    now = arrival
    applied = 0
    for reply, dt in steps:
        now += dt
        before = (rs.state, rs.reply, rs.next_attempt, rs.attempts)
        if rs.state in FINAL_STATES:
            with pytest.raises(InvalidTransition):
                outcome_for(rs, reply, now, arrival, policy, null_sender, rng)
            # never leaves a final state; a refused reply changes nothing
            assert (rs.state, rs.reply, rs.next_attempt, rs.attempts) == before
            continue
        status = outcome_for(rs, reply, now, arrival, policy, null_sender, rng)
        applied += 1
        assert rs.attempts == applied  # every reply is counted
        if reply.is_positive:
            assert (status, rs.state, rs.reply) == ("delivered", RecipientState.DELIVERED, reply)
            assert rs.next_attempt is None
        elif reply.is_permanent:
            assert (status, rs.state, rs.reply) == ("bounced", RecipientState.BOUNCED, reply)
            assert rs.next_attempt is None
        elif now - arrival >= lifetime:
            assert (status, rs.state) == ("expired", RecipientState.BOUNCED)
            assert rs.reply.code == reply.code and rs.reply.local == reply.local
            assert rs.reply.text.startswith(reply.text) and "expired" in rs.reply.text
            assert rs.next_attempt is None
        else:
            assert (status, rs.state, rs.reply) == ("deferred", RecipientState.DEFERRED, reply)
            assert now < rs.next_attempt <= now + policy.max


def test_a_refused_reply_leaves_a_final_recipient_unchanged():
    """(Found by this test: outcome_for used to count the refused reply in
    attempts before raising.)"""
    rs = RecipientStatus("x@dest.test")
    policy = RetryPolicy()
    outcome_for(rs, Reply(250, "2.0.0 ok"), 10.0, 0.0, policy, False)
    with pytest.raises(InvalidTransition):
        outcome_for(rs, Reply(451, "4.3.0 later"), 11.0, 0.0, policy, False)
    assert rs.attempts == 1


# --------------------------------------------------------------------------- (b) scheduler

POLICY = RetryPolicy(base=60, max=600, lifetime=3000, bounce_lifetime=1500, jitter=0.1)
DELAY_WARNING = 1000.0
MSG = (b"Message-ID: <sm@state.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
       b"Subject: state machine\r\n\r\nbody\r\n.dot\r\n")
FINAL_STATUS = {"delivered", "bounced", "expired"}
BOUNCED_STATUS = {"bounced", "expired"}
SMTP_REPLIES = st.builds(
    Reply,
    code=st.sampled_from([250, 251, 421, 450, 451, 452, 550, 551, 552, 553, 554]),
    text=st.just("scripted"), local=st.booleans())
SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@dataclass
class Life:
    """One incarnation of the daemon: dies at the k-th file operation."""

    number: int
    countdown: int | None = None
    crash_on: str | None = None  # or: die at the first call of this function
    dead: bool = False


@dataclass
class Msg:
    sender: str
    rcpts: list[str]
    dsn_of: str | None = None  # the original's queue id, for a DSN


@dataclass
class Rec:
    life: int
    qid: str
    rcpt: str
    status: str
    voided: bool = False


@dataclass
class Dsn:
    qid: str
    of: str
    names: list[str]
    action: str
    sender: str
    to: list[str]
    #: queued, but the state did not record it when the process died: it
    #: will be queued again (docs/reliability.md allows this one repetition)
    unrecorded: bool = False


class _FakeTime:
    """queue.py's C{time}: arrival times follow the test clock."""

    def __init__(self, machine):
        self.machine = machine

    def time(self):
        return self.machine.clock.seconds()

    def __getattr__(self, name):
        return getattr(time, name)


class _Connector:
    """Answers every recipient from the scripts hypothesis drew; a dead
    incarnation's connections never answer."""

    def __init__(self, machine, life: Life):
        self.machine = machine
        self.life = life

    def deliver(self, dest, sender, recipients, open_source, *flags, **kw):
        if self.life.dead:
            return defer.Deferred()
        with open_source() as f:
            f.read()
        replies = {r: self.machine.next_reply(r) for r in recipients}
        return defer.succeed(Attempt(replies, f"mx.{dest}[192.0.2.1]:25"))

    def close(self):
        return defer.succeed(None)


class QueueMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="mailout-sm-", dir=SHM)
        self.scripts: dict[str, list[Reply]] = {}
        self.model: dict[str, Msg] = {}
        self.recs: list[Rec] = []
        self.dsns: list[Dsn] = []
        self.errors: list[str] = []
        self.counter = 0
        self.lives = 0
        self.clock = task.Clock()
        self.clock.advance(float(int(time.time())))
        self._real_time = queue_module.time
        queue_module.time = _FakeTime(self)
        globalLogPublisher.addObserver(self._log_event)
        self._ok = True
        self._boot()

    # -- plumbing ---------------------------------------------------------

    def _log_event(self, event):
        fmt = event.get("log_format") or ""
        if ("internal error" in fmt or ("observer" in fmt and "failed" in fmt)
                or "Unhandled error" in fmt):
            self.errors.append(f"{fmt} {event.get('qid', '')} {event.get('log_failure', '')}")

    def _boot(self):
        self.lives += 1
        life = self.life = Life(self.lives)
        now = self.clock.seconds()
        self.clock = task.Clock()
        self.clock.advance(now)
        self.queue = self._open_store()
        real_enqueue = self.queue.enqueue

        def enqueue(sender, recipients, message):
            qid = real_enqueue(sender, recipients, message)
            self._record_dsn(qid, sender, list(recipients), message)
            return qid

        self.queue.enqueue = enqueue

        def io(f, *args, **kw):
            # A dead process does nothing more: the operation never happens and
            # never returns (a Deferred that never fires), nor does anything after it.
            if life.dead:
                return defer.Deferred()
            if (life.crash_on is not None and getattr(f, "__name__", "") == life.crash_on) or \
                    life.countdown == 0:
                life.dead = True
                return defer.Deferred()
            if life.countdown is not None:
                life.countdown -= 1
            return defer.maybeDeferred(f, *args, **kw)

        def observe(o):
            self.recs.append(Rec(life.number, o.qid, o.recipient, o.status))

        self.sched = Scheduler(self.queue, _Connector(self, life), self.clock, run_blocking=io,
                               retry=POLICY, reporting_mta="mx.state.test",
                               observers=[observe], rng=random.Random(life.number),
                               delay_warning=DELAY_WARNING)
        self.sched.start()

    def _record_dsn(self, qid, sender, recipients, message):
        msg = email.message_from_bytes(message)
        blocks = msg.get_payload()[1].get_payload()
        of = blocks[0]["X-Mailout-Queue-ID"]
        names = [b["Final-Recipient"].split(";", 1)[1].strip() for b in blocks[1:]]
        self.dsns.append(Dsn(qid, of, names, blocks[1]["Action"], sender, recipients))
        self.model[qid] = Msg("", list(recipients), dsn_of=of)

    def next_reply(self, rcpt: str) -> Reply:
        replies = self.scripts[rcpt]
        return replies.pop(0) if len(replies) > 1 else replies[0]

    # -- the store: the queue folder here; the in-memory store in a subclass --

    def _open_store(self):
        """The store of a new incarnation of the daemon."""
        return Queue(self.dir)

    def _producer(self):
        """A store object of another process that enqueues (or inspects)."""
        return Queue(self.dir)

    def _active_qids(self) -> list[str]:
        return [q for q in os.listdir(os.path.join(self.dir, "messages"))
                if not q.startswith(".")]

    def _has_state(self, qid: str) -> bool:
        return os.path.exists(os.path.join(self.dir, "state", qid + ".json"))

    def _quarantined(self) -> list[str]:
        return os.listdir(os.path.join(self.dir, "corrupt"))

    def _cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def _disk(self) -> dict:
        """qid -> (where, QueueEntry, has_state) for every queued message."""
        q = self._producer()
        out = {}
        for qid in self._active_qids():
            try:
                out[qid] = ("messages", q.load(qid), self._has_state(qid))
            except CorruptEntry as e:
                raise AssertionError(f"{qid} unreadable: {e}") from None
        for listed in q.list_entries():
            if listed.where == "incoming":
                out[listed.name.split("/", 1)[-1]] = ("new", listed.entry, False)
        return out

    def _kept(self, qid, rcpt) -> list[Rec]:
        return [r for r in self.recs if r.qid == qid and r.rcpt == rcpt and not r.voided]

    def _restart(self):
        """A new incarnation on the same folder. After a crash, what the disk
        does not record of the dead one's outcomes is voided (it will be
        reported again), as docs/reliability.md allows."""
        crashed = self.life.dead
        disk = self._disk()
        voided = 0
        for qid, m in self.model.items():
            if qid not in disk:
                continue
            _, entry, _ = disk[qid]
            attempts = {rs.address: rs.attempts for rs in entry.recipients}
            for rcpt in m.rcpts:
                for rec in self._kept(qid, rcpt)[attempts[rcpt]:]:
                    rec.voided = True
                    voided += 1
            for dsn in self.dsns:
                if dsn.of != qid or dsn.unrecorded:
                    continue
                if dsn.action == "failed":
                    dsn.unrecorded = not set(dsn.names) <= set(entry.bounced_reported)
                else:
                    dsn.unrecorded = not entry.delay_warned
                voided += dsn.unrecorded
        assert crashed or voided == 0, "a clean restart must find everything on disk"
        self._boot()

    def _settle(self):
        if self.life.dead:
            self._restart()

    # -- rules ----------------------------------------------------------------

    @initialize()
    def _started(self):
        self._check()

    @rule(data=st.data(), n=st.integers(1, 4), null=st.sampled_from([False, False, False, True]),
          pickup=st.booleans())
    def enqueue(self, data, n, null, pickup):
        self.counter += 1
        c = self.counter
        sender = "" if null else f"s{c}@origin.test"
        rcpts = [f"r{c}x{i}@{data.draw(st.sampled_from(['a.test', 'b.test']))}"
                 for i in range(n)]
        for addr in rcpts + ([sender] if sender else []):
            self.scripts[addr] = data.draw(st.lists(SMTP_REPLIES, min_size=1, max_size=4))
        # another process enqueues: a Queue object of its own
        qid = self._producer().enqueue(sender, rcpts, MSG)
        self.model[qid] = Msg(sender, rcpts)
        if pickup:  # inotify; else the next poll
            self.sched.pickup()
        self._settle()

    @rule(dt=st.one_of(st.sampled_from([0, 1, 54, 60, 120, 540, 600, 1000, 1500, 3000, 3600]),
                       st.floats(0, 4000)))
    def advance(self, dt):
        self.sched.pickup()  # the poll loop
        self.clock.advance(dt)
        self._settle()

    @rule()
    def restart(self):
        self._restart()

    @rule(k=st.integers(0, 15), dt=st.sampled_from([0, 60, 600, 1000, 3000]))
    def crash_while_working(self, k, dt):
        """Die at the k-th file operation of a pickup and a clock advance
        (if there are that many), then restart."""
        self.life.countdown = k
        self.advance(dt)
        self.life.countdown = None

    # -- invariants -------------------------------------------------------------

    @invariant()
    def consistent(self):
        if not self.life.dead:
            self._check()

    def _check(self):
        self._ok = False
        now = self.clock.seconds()
        assert self._quarantined() == []
        assert self.errors == []
        disk = self._disk()
        assert set(disk) <= set(self.model), set(disk) - set(self.model)
        failed = Counter((d.of, n) for d in self.dsns if d.action == "failed" for n in d.names)
        delayed = Counter(d.of for d in self.dsns if d.action == "delayed")
        failed_extra = Counter((d.of, n) for d in self.dsns if d.action == "failed"
                               and d.unrecorded for n in d.names)
        delayed_extra = Counter(d.of for d in self.dsns if d.action == "delayed" and d.unrecorded)
        for d in self.dsns:
            orig = self.model[d.of]
            assert orig.sender, f"a DSN about null-sender message {d.of}"
            assert (d.sender, d.to) == ("", [orig.sender])
            assert d.action in ("failed", "delayed")
            assert set(d.names) <= set(orig.rcpts)
            if d.action == "failed":  # it names only recipients that did bounce
                for n in d.names:
                    assert [r.status for r in self._kept(d.of, n)][-1:] in (
                        ["bounced"], ["expired"]), (d, self._kept(d.of, n))
        for qid, m in self.model.items():
            where, entry, has_state = disk.get(qid, (None, None, False))
            if where == "messages":  # picked up: worked on at once, then when due
                assert not entry.done, f"{qid}: finished but still queued"
                for rs in entry.recipients:
                    assert rs.state is not RecipientState.PENDING, f"{qid}: never tried"
                    if rs.state is RecipientState.DEFERRED:
                        assert now < rs.next_attempt <= now + POLICY.max, (qid, rs, now)
            states = {rs.address: rs for rs in entry.recipients} if entry else {}
            for rcpt in m.rcpts:
                kept = self._kept(qid, rcpt)
                finals = [r for r in kept if r.status in FINAL_STATUS]
                assert len(finals) <= 1, (qid, rcpt, [r.status for r in kept])
                assert not finals or kept[-1] is finals[0], "a final state was left"
                if entry is None:
                    assert len(finals) == 1, f"{qid} left the queue; {rcpt}: {kept}"
                else:
                    rs = states[rcpt]
                    assert rs.attempts == len(kept), (qid, rcpt, rs, kept)
                    if rs.state in FINAL_STATES:
                        assert len(finals) == 1
                        word = "delivered" if rs.state is RecipientState.DELIVERED else "bounced"
                        assert {"expired": "bounced"}.get(finals[0].status,
                                                          finals[0].status) == word
                    else:
                        assert finals == [], (qid, rcpt, rs, kept)
                n = failed[(qid, rcpt)]
                extra = failed_extra[(qid, rcpt)]
                if m.sender and finals and finals[0].status in BOUNCED_STATUS:
                    reported = entry is None or rcpt in entry.bounced_reported
                    if reported:
                        assert 1 <= n <= 1 + extra, (qid, rcpt, n, extra)
                    else:
                        assert n <= extra, (qid, rcpt, n, extra)
                else:
                    assert n == 0, (qid, rcpt, n, m.sender, kept)
            if not m.sender:
                assert delayed[qid] == 0
            else:
                assert delayed[qid] <= 1 + delayed_extra[qid], (qid, delayed[qid])
                if entry is not None and entry.delay_warned:
                    assert delayed[qid] >= 1
        self._ok = True

    def teardown(self):
        try:
            if self._ok:
                self._drain()
        finally:
            queue_module.time = self._real_time
            globalLogPublisher.removeObserver(self._log_event)
            self._cleanup()

    def _drain(self):
        """Run the clock until everything is final, then check once more."""
        self.life.countdown = None
        self._settle()
        for _ in range(40):
            if not self._disk():
                break
            self.sched.pickup()
            self.clock.advance(POLICY.max)
        assert self._disk() == {}, "the queue never drained"
        self._check()
        for qid, m in self.model.items():
            for rcpt in m.rcpts:
                finals = [r for r in self._kept(qid, rcpt) if r.status in FINAL_STATUS]
                assert len(finals) == 1, (qid, rcpt)


QueueMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_scheduler_state_machine = QueueMachine.TestCase


class MemoryQueueMachine(QueueMachine):
    """The same machine over the in-memory store: a
    restart is a new store object, with a new owner, over the same backend."""

    def __init__(self):
        self.backend = MemoryBackend(clock=lambda: self.clock.seconds())
        super().__init__()

    def _open_store(self):
        return MemoryStore(self.backend)

    def _producer(self):
        return MemoryStore(self.backend)

    def _active_qids(self) -> list[str]:
        return sorted(set(self.backend.messages) - set(self.backend.incoming))

    def _has_state(self, qid: str) -> bool:
        return qid in self.backend.states

    def _quarantined(self) -> list[str]:
        return list(self.backend.quarantined)


MemoryQueueMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_scheduler_state_machine_on_the_memory_store = MemoryQueueMachine.TestCase


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("crash_on,reply,statuses,dsns", [
    # final dot accepted, the process dies before removing the finished message:
    # the one duplicate delivery docs/reliability.md allows
    ("remove_many", 250, [("delivered", True), ("delivered", False)], 0),
    # bounced and recorded, dies before queueing the DSN: it is queued after the restart
    ("enqueue_dsn", 550, [("bounced", False)], 1),
    # bounced, DSN queued, dies before the message is removed: one duplicate DSN
    ("remove_many", 550, [("bounced", False)], 2),
])
def test_crash_points_of_reliability_md(crash_on, reply, statuses, dsns):
    """Three rows of docs/reliability.md, on one message, by name of the
    file operation at which the process dies."""
    state = QueueMachine()
    try:
        state.scripts.update({"r1@a.test": [Reply(reply, "scripted")],
                              "s1@origin.test": [Reply(250, "ok")]})
        qid = Queue(state.dir).enqueue("s1@origin.test", ["r1@a.test"], MSG)
        state.model[qid] = Msg("s1@origin.test", ["r1@a.test"])
        state.life.crash_on = crash_on
        state.sched.pickup()
        assert state.life.dead
        state._settle()  # restart on the same folder
        state._check()
        assert [(r.status, r.voided) for r in state.recs if r.qid == qid] == statuses
        assert len([d for d in state.dsns if d.of == qid]) == dsns
        assert all(d.names == ["r1@a.test"] for d in state.dsns)
        assert os.listdir(os.path.join(state.dir, "messages")) == []
    finally:
        state.teardown()
