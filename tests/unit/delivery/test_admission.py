"""Traffic shaping in the scheduler, on a task.Clock: a message rate spaces
transactions and only delays mail (no attempt counted, nothing deferred),
mail waiting for its slot holds no place in flight, a provider's suspension
holds every domain of the provider, and a destination suspended while its
mail waited leaves that mail untried."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

from twisted.internet import defer, task

from twisted_mailout.delivery.connector import Attempt
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler
from twisted_mailout.delivery.shaping import Shaper, ShapingConfig
from twisted_mailout.envelope import Reply
from twisted_mailout.outcome import Status
from twisted_mailout.queue.store import Queue

MSG = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"
OK = Reply(250, "2.0.0 Ok")


class Router:
    """MX answers from a table: {domain: host}."""

    def __init__(self, mx: dict[str, str]):
        self.mx = mx

    def route(self, domain: str) -> defer.Deferred:
        return defer.succeed([SimpleNamespace(host=self.mx.get(domain, f"mx.{domain}"))])


class ShapedConnector:
    """A connector with a real Shaper; each delivery is answered at once (or
    held until the test answers it) and recorded with the clock's time."""

    def __init__(self, clock: task.Clock, config: ShapingConfig, mx: dict[str, str],
                 hold_answers: bool = False):
        self.clock = clock
        self.shaper = Shaper(config, Router(mx), clock)
        self.hold = None  # set by the scheduler
        self.calls: list[tuple[float, str, list[str], bool]] = []
        self.held: list[tuple[str, list[str], defer.Deferred]] = []
        self.hold_answers = hold_answers

    def deliver(self, dest, sender, recipients, open_source, size=None, smtputf8=False,
                eightbit=False, paced=False):
        open_source().close()
        self.calls.append((self.clock.seconds(), dest, list(recipients), paced))
        if self.hold_answers:
            d: defer.Deferred = defer.Deferred()
            self.held.append((dest, list(recipients), d))
            return d
        return defer.succeed(Attempt({r: OK for r in recipients}, f"mx.{dest}[192.0.2.1]:25"))

    def close(self):
        return defer.succeed(None)


def config(text: str) -> ShapingConfig:
    c = ShapingConfig()
    import tomllib

    c.add(tomllib.loads(text), "test")
    return c


def harness(tmp_path, shaping: str, mx=None, **kw):
    clock = task.Clock()
    clock.advance(time.time())
    queue = Queue(str(tmp_path / "q"))
    conn = ShapedConnector(clock, config(shaping), mx or {}, kw.pop("hold_answers", False))
    outcomes: list = []
    sched = Scheduler(queue, conn, clock, observers=[outcomes.append],
                      retry=RetryPolicy(base=300, jitter=0), rng=random.Random(0), **kw)
    return clock, queue, conn, sched, outcomes


def test_a_message_rate_spaces_transactions_and_only_delays(tmp_path):
    clock, queue, conn, sched, outcomes = harness(
        tmp_path, '[domain."r.test"]\nmax_message_rate = "2/s"\n')
    for i in range(6):
        queue.enqueue("a@example.com", [f"u{i}@r.test"], MSG)
    t0 = clock.seconds()
    sched.start()
    clock.advance(0)
    for _ in range(12):
        clock.advance(0.25)
    times = [round(t - t0, 3) for t, *_ in conn.calls]
    assert times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert all(paced for *_, paced in conn.calls)  # the scheduler took each slot
    # one attempt each, the delivered one: waiting for a slot is not an attempt
    assert [o.status for o in outcomes] == [Status.DELIVERED] * 6
    assert all(o.attempts == 1 for o in outcomes)


def test_mail_waiting_for_its_slot_holds_no_place_in_flight(tmp_path):
    clock, queue, conn, sched, outcomes = harness(
        tmp_path, '[domain."slow.test"]\nmax_message_rate = "1/m"\n', max_inflight=2)
    for i in range(10):
        queue.enqueue("a@example.com", [f"u{i}@slow.test"], MSG)
    for i in range(10):
        queue.enqueue("a@example.com", [f"v{i}@free.test"], MSG)
    sched.start()
    clock.advance(0)
    clock.advance(0.1)
    free = [c for c in conn.calls if c[1] == "free.test"]
    slow = [c for c in conn.calls if c[1] == "slow.test"]
    assert len(free) == 10 and len(slow) == 1  # the rest of slow.test waits its minute
    assert not sched._inflight
    clock.advance(60)
    assert len([c for c in conn.calls if c[1] == "slow.test"]) == 2


def test_a_provider_suspension_holds_every_domain_of_the_provider(tmp_path):
    clock, queue, conn, sched, outcomes = harness(
        tmp_path, '[provider.big]\nmx_suffixes = [".big.test"]\n',
        mx={"a.test": "mx1.big.test", "b.test": "mx2.big.test"})
    now = clock.seconds()
    sched.suspensions.new("provider:big", 60, "rule", now)
    for rcpt in ("u@a.test", "u@b.test", "u@other.test"):
        queue.enqueue("a@example.com", [rcpt], MSG)
    sched.start()
    clock.advance(0)
    clock.advance(1)
    assert [c[1] for c in conn.calls] == ["other.test"]
    clock.advance(60)
    assert sorted(c[1] for c in conn.calls) == ["a.test", "b.test", "other.test"]
    assert all(o.attempts == 1 for o in outcomes)


def test_suspended_while_waiting_leaves_recipients_untried(tmp_path):
    clock, queue, conn, sched, outcomes = harness(tmp_path, "", hold_answers=True)
    queue.enqueue("a@example.com", ["u@g.test"], MSG)
    sched.start()
    clock.advance(0)
    [(dest, rcpts, d)] = conn.held
    # while this one waited for a connection, a rule suspended g.test
    sched.suspensions.new("g.test", 30, "rule", clock.seconds())
    assert conn.hold("g.test") is True
    d.callback(Attempt({}, None, untried=rcpts))
    assert outcomes == []  # no attempt counted, nothing deferred
    [entry] = [x.entry for x in queue.list_entries()]
    assert entry.recipients[0].attempts == 0
    conn.hold_answers = False
    clock.advance(30)
    assert [o.status for o in outcomes] == [Status.DELIVERED]


def test_a_destination_retry_schedule(tmp_path):
    later = Reply(451, "4.3.0 try later")

    class Deferring(ShapedConnector):
        def deliver(self, dest, sender, recipients, open_source, *a, **kw):
            open_source().close()
            return defer.succeed(Attempt({r: later for r in recipients}, "mx[192.0.2.1]:25"))

    clock = task.Clock()
    clock.advance(time.time())
    queue = Queue(str(tmp_path / "q"))
    conn = Deferring(clock, config('[domain."soon.test"]\nretry_interval = "1m"\n'
                                   'max_retry_interval = "2m"\n'), {})
    outcomes: list = []
    sched = Scheduler(queue, conn, clock, observers=[outcomes.append],
                      retry=RetryPolicy(base=300, max=4000, jitter=0), rng=random.Random(0))
    queue.enqueue("a@example.com", ["u@soon.test"], MSG)
    queue.enqueue("a@example.com", ["u@other.test"], MSG)
    t0 = clock.seconds()
    sched.start()
    clock.advance(0)
    entries = {x.entry.recipients[0].address: x.entry for x in queue.list_entries()}
    assert entries["u@soon.test"].recipients[0].next_attempt == t0 + 60
    assert entries["u@other.test"].recipients[0].next_attempt == t0 + 300
    clock.advance(60)
    clock.advance(0)
    entries = {x.entry.recipients[0].address: x.entry for x in queue.list_entries()}
    assert entries["u@soon.test"].recipients[0].next_attempt == t0 + 60 + 120  # at most 2m


def test_cancelling_a_provider_suspension_sends_its_domains_mail_at_once(tmp_path):
    from twisted_mailout.admin.operations import QueueAdmin

    clock, queue, conn, sched, outcomes = harness(
        tmp_path, '[provider.big]\nmx_suffixes = [".big.test"]\n',
        mx={"a.test": "mx1.big.test", "b.test": "mx2.big.test"})
    s = sched.suspensions.new("provider:big", 3600, "rule", clock.seconds())
    for rcpt in ("u@a.test", "u@b.test"):
        queue.enqueue("a@example.com", [rcpt], MSG)
    sched.start()
    clock.advance(0)
    assert conn.calls == []
    admin = QueueAdmin(queue, clock, scheduler=sched)
    done = admin.cancel_suspension(s.id)
    clock.advance(0)
    assert done.called
    clock.advance(0)
    assert sorted(c[1] for c in conn.calls) == ["a.test", "b.test"]


def test_many_messages_waiting_for_slots_do_not_recurse(tmp_path):
    """A message set aside for its slot finishes without I/O; thousands of
    them in one dispatch pass once overflowed the stack (found by
    benchmarks/shaping.py)."""
    from twisted_mailout.testing.memorystore import MemoryStore

    clock = task.Clock()
    clock.advance(time.time())
    store = MemoryStore(clock=clock.seconds)
    conn = ShapedConnector(clock, config('[default]\nmax_message_rate = "100/s"\n'), {})
    outcomes: list = []
    sched = Scheduler(store, conn, clock, observers=[outcomes.append], max_inflight=5000,
                      retry=RetryPolicy(base=300, jitter=0), rng=random.Random(0))
    store.enqueue_many([("a@example.com", [f"u{i}@r.test"], MSG) for i in range(3000)])
    sched.start()
    clock.advance(0)
    for _ in range(31):
        clock.advance(1.0)
    assert len(outcomes) == 3000
    assert all(o.status is Status.DELIVERED and o.attempts == 1 for o in outcomes)
    times = sorted(t for t, *_ in conn.calls)
    assert times[-1] - times[0] >= 29.9  # 100 a second
