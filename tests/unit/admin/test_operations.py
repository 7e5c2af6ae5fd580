"""QueueAdmin over a real queue folder, with and without a running scheduler
(driven by a task.Clock and a scripted connector): what the operator relies on."""

import random
import time

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from tests.support.fakes import ScriptedConnector
from twisted_mailout.admin import AdminConflict, QueueAdmin, Selector, SelectorError
from twisted_mailout.delivery.connector import Attempt
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler
from twisted_mailout.envelope import Reply
from twisted_mailout.queue.model import EntryNotFound
from twisted_mailout.queue.store import Queue
from twisted_mailout.testing.memorystore import MemoryStore

MSG = b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m1@example.com>\r\n\r\nbody\r\n"
OK = Reply(250, "2.0.0 Ok")
LATER = Reply(451, "4.3.0 try later")


def result_of(d):
    """The result of a fired Deferred (inline I/O fires at once)."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class Harness:
    def __init__(self, store, script=None, live=True):
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.store = store
        self.replies = {}
        self.connector = ScriptedConnector(script or self.reply)
        self.outcomes = []
        self.sched = None
        if live:
            self.sched = Scheduler(store, self.connector, self.clock,
                                   retry=RetryPolicy(base=300, max=4000, lifetime=86400,
                                                     bounce_lifetime=3600, jitter=0),
                                   observers=[self.outcomes.append],
                                   reporting_mta="mx.mailout.test", rng=random.Random(0))
        self.admin = QueueAdmin(store, self.clock, scheduler=self.sched,
                                reporting_mta="mx.mailout.test", source="api")

    def reply(self, dest, rcpt):
        return self.replies.get(dest, OK)

    def start(self):
        result_of(self.admin.start())
        if self.sched is not None:
            result_of(self.sched.start())

    def delivered(self):
        return [o.recipient for o in self.outcomes if o.status.value == "delivered"]

    def row(self, qid):
        rows = result_of(self.admin.list_messages(Selector(ids=(qid,))))
        assert len(rows) == 1
        return rows[0]


@pytest.fixture(params=["folder", "memory"])
def store(request, tmp_path):
    if request.param == "folder":
        q = Queue(str(tmp_path / "q"))
        q.lock()
        yield q
        q.unlock()
    else:
        yield MemoryStore()


@pytest.fixture
def admin_events():
    seen = []

    def obs(e):
        if e.get("log_namespace") == "twisted_mailout.admin":
            seen.append(e)

    globalLogPublisher.addObserver(obs)
    yield seen
    globalLogPublisher.removeObserver(obs)


def test_hold_before_start_keeps_mail_until_release(store):
    qid = store.enqueue("a@example.com", ["b@example.org"], MSG)
    offline = Harness(store, live=False)
    res = result_of(offline.admin.hold(Selector(ids=(qid,)), reason="check"))
    assert res.changed == [qid] and res.matched == 1
    assert offline.row(qid)["queue_name"] == "hold"

    h = Harness(store)
    h.start()
    h.clock.advance(10 * 86400)  # far past every retry and the lifetime
    assert h.connector.calls == []
    assert h.row(qid)["queue_name"] == "hold"

    res = result_of(h.admin.release(Selector(ids=(qid,))))
    assert res.changed == [qid]
    h.clock.advance(0)
    assert h.delivered() == ["b@example.org"]
    with pytest.raises(EntryNotFound):
        h.row(qid)


def test_live_hold_of_deferred_mail_and_no_expiry_while_held(store):
    h = Harness(store)
    h.replies["example.org"] = LATER
    h.start()
    qid = store.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(h.sched.pickup())
    assert [o.status.value for o in h.outcomes] == ["deferred"]
    assert h.row(qid)["queue_name"] == "deferred"

    result_of(h.admin.hold(Selector(domain="example.org")))
    h.clock.advance(3 * 86400)  # the lifetime is one day: held time does not count
    assert len(h.connector.calls) == 1
    result_of(h.admin.release(Selector(ids=(qid,))))
    h.clock.advance(0)
    assert len(h.connector.calls) == 2
    # deferred again, not expired: the days on hold are off its lifetime
    assert [o.status.value for o in h.outcomes] == ["deferred", "deferred"]


def test_flush_makes_deferred_mail_due_now(store):
    h = Harness(store)
    h.replies["example.org"] = LATER
    h.start()
    qid = store.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(h.sched.pickup())
    h.replies["example.org"] = OK
    h.clock.advance(10)  # the retry is 300 s away
    assert len(h.connector.calls) == 1
    res = result_of(h.admin.flush())
    assert res.changed == [qid]
    h.clock.advance(0)
    assert h.delivered() == ["b@example.org"]


def test_delete_removes_without_bounce_and_logs_reason(store, admin_events):
    h = Harness(store, live=False)
    a = store.enqueue("a@example.com", ["b@example.org"], MSG)
    b = store.enqueue("a@example.com", ["c@example.net"], MSG)
    res = result_of(h.admin.delete(Selector(domain="example.org"), reason="spam run"))
    assert res.changed == [a]
    assert [r["queue_id"] for r in result_of(h.admin.list_messages())] == [b]
    assert [(e["action"], e["qid"], e["reason"], e["source"]) for e in admin_events] == [
        ("delete", a, "spam run", "api")]


def test_bounce_queues_a_report_to_the_sender_with_the_reason(store):
    h = Harness(store, live=False)
    qid = store.enqueue("a@example.com", ["b@example.org", "c@example.org"], MSG)
    res = result_of(h.admin.bounce(Selector(ids=(qid,)), reason="mailbox migration"))
    assert res.changed == [qid] and len(res.dsns) == 1
    rows = result_of(h.admin.list_messages())
    assert [r["queue_id"] for r in rows] == res.dsns
    dsn = rows[0]
    assert dsn["sender"] == "" and [r["address"] for r in dsn["recipients"]] == ["a@example.com"]
    assert dsn["queue_name"] == "incoming"  # queued, not yet picked up
    store.pickup()
    entry = store.load(res.dsns[0])
    with store.open_body(entry) as f:
        text = f.read()
    assert b"mailbox migration" in text and b"Action: failed" in text
    assert b"b@example.org" in text and b"c@example.org" in text


def test_bounce_of_a_bounce_only_removes_it(store):
    h = Harness(store, live=False)
    qid = store.enqueue("", ["a@example.com"], MSG)
    res = result_of(h.admin.bounce(Selector(ids=(qid,))))
    assert res.changed == [qid] and res.dsns == []
    assert result_of(h.admin.list_messages()) == []


def test_action_waits_for_work_in_flight(store):
    gate = defer.Deferred()

    class Gated(ScriptedConnector):
        def deliver(self, dest, sender, recipients, open_source, *a, **kw):
            self.calls.append(dest)
            return gate.addCallback(lambda _: Attempt({r: LATER for r in recipients},
                                                      "mx[192.0.2.1]:25"))

    h = Harness(store)
    h.connector = Gated(None)
    h.sched.connector = h.connector
    h.start()
    qid = store.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(h.sched.pickup())
    assert h.sched.in_flight() == {qid}
    assert h.row(qid)["queue_name"] == "active"
    d = h.admin.hold(Selector(ids=(qid,)))
    assert not d.called  # waits for the attempt: its outcome must be saved first
    gate.callback(None)
    res = result_of(d)
    assert res.changed == [qid]
    row = h.row(qid)
    assert row["queue_name"] == "hold"
    assert row["recipients"][0]["state"] == "deferred"
    assert row["recipients"][0]["attempts"] == 1
    h.clock.advance(86400)
    assert h.connector.calls == ["example.org"]


def test_unknown_id_and_empty_selector_change_nothing(store):
    h = Harness(store, live=False)
    qid = store.enqueue("a@example.com", ["b@example.org"], MSG)
    with pytest.raises(EntryNotFound, match="0123ABC"):
        result_of(h.admin.hold(Selector(ids=(qid, "0123ABC"))))
    assert h.row(qid)["queue_name"] != "hold"
    with pytest.raises(SelectorError):
        result_of(h.admin.delete(Selector()))
    with pytest.raises(SelectorError):
        Selector(state="frozen")
    with pytest.raises(SelectorError):
        Selector(ids=("../etc",))
    assert [r["queue_id"] for r in result_of(h.admin.list_messages())] == [qid]


def test_filters_combine(store):
    h = Harness(store, live=False)
    a = store.enqueue("news@shop.example", ["x@example.org"], MSG)
    b = store.enqueue("news@shop.example", ["y@example.net"], MSG)
    c = store.enqueue("ops@corp.example", ["z@example.org"], MSG)

    def ids(**kw):
        return [r["queue_id"] for r in result_of(h.admin.list_messages(Selector(**kw)))]

    assert ids(domain="example.org") == [a, c]
    assert ids(domain="example.org", sender="@shop.example") == [a]
    assert ids(recipient="Y@Example.NET") == [b]
    assert ids(sender="ops@corp.example", domain="example.net") == []
    assert ids(older_than=3600) == []


def test_suspend_holds_a_destination_and_cancel_releases_it(store):
    h = Harness(store)
    h.start()
    res = result_of(h.admin.suspend("Example.ORG", 3600, "provider asked"))
    assert res["domain"] == "example.org"
    with pytest.raises(AdminConflict):
        result_of(h.admin.suspend("example.org", 60))
    qid = store.enqueue("a@example.com", ["b@example.org", "c@example.net"], MSG)
    result_of(h.sched.pickup())
    # the other domain is delivered; the suspended one is not attempted
    assert h.delivered() == ["c@example.net"]
    row = h.row(qid)
    state = {r["address"]: (r["state"], r["attempts"]) for r in row["recipients"]}
    assert state["b@example.org"] == ("pending", 0)

    # saved: a daemon started later on the same store finds it
    h2 = Harness(store, live=False)
    result_of(h2.admin.start())
    assert [s["id"] for s in h2.admin.list_suspensions()] == [res["id"]]

    result_of(h.admin.cancel_suspension(res["id"]))
    h.clock.advance(0)
    assert sorted(h.delivered()) == ["b@example.org", "c@example.net"]
    assert h.admin.list_suspensions() == []
    with pytest.raises(EntryNotFound):
        result_of(h.admin.cancel_suspension(res["id"]))


def test_suspension_ends_by_itself(store):
    h = Harness(store)
    h.start()
    result_of(h.admin.suspend("example.org", 600, ""))
    store.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(h.sched.pickup())
    assert h.delivered() == []
    h.clock.advance(599)
    assert h.delivered() == []
    h.clock.advance(1)
    assert h.delivered() == ["b@example.org"]


def test_bad_suspension_requests(store):
    h = Harness(store, live=False)
    for domain, duration in [("", 60), ("a b", 60), ("x@example.org", 60), ("a\0b", 60),
                             ("a\x7fb", 60),
                             ("example.org", 0), ("example.org", -5)]:
        with pytest.raises(SelectorError):
            result_of(h.admin.suspend(domain, duration))
    assert h.admin.list_suspensions() == []


def test_show_gives_history_and_headers(store):
    h = Harness(store)
    h.replies["example.org"] = LATER
    h.start()
    qid = store.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(h.sched.pickup())
    h.clock.advance(400)
    shown = result_of(h.admin.show(qid, body=True))
    hist = shown["recipients"][0]["history"]
    assert [x["code"] for x in hist] == [451, 451]
    assert ["Subject", "s"] in shown["headers"]
    assert "body" in shown["message"]
    with pytest.raises(EntryNotFound):
        result_of(h.admin.show("0123ABC"))


def test_summary_is_qshape(store):
    h = Harness(store, live=False)
    for rcpt in ["x@example.org", "y@example.org", "z@example.net"]:
        store.enqueue("a@example.com", [rcpt], MSG)
    h.clock.advance(30 * 60)  # 30 minutes old: the 40-minute column
    s = result_of(h.admin.summary())
    assert s["buckets"][-1] == "1280+"
    assert s["total"]["total"] == 3 and s["total"]["counts"][3] == 3
    assert [(r["domain"], r["total"]) for r in s["rows"]] == [("example.org", 2),
                                                               ("example.net", 1)]
    by_sender = result_of(h.admin.summary(by="sender"))
    assert [(r["domain"], r["total"]) for r in by_sender["rows"]] == [("example.com", 3)]


def test_requeue_forgets_destinations_and_retries_now(store):
    h = Harness(store)
    forgotten = []
    h.admin.connector = type("C", (), {"forget": lambda self, d: forgotten.append(d)})()
    h.replies["example.org"] = LATER
    h.start()
    store.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(h.sched.pickup())
    h.replies["example.org"] = OK
    result_of(h.admin.requeue(Selector(domain="example.org")))
    h.clock.advance(0)
    assert forgotten == ["example.org"]
    assert h.delivered() == ["b@example.org"]


def test_scheduler_shape_counts_what_metrics_show(store):
    h = Harness(store)
    h.replies["example.org"] = LATER
    h.start()
    a = store.enqueue("a@example.com", ["b@example.org"], MSG)
    b = store.enqueue("a@example.com", ["c@example.org"], MSG)
    result_of(h.sched.pickup())
    now = h.clock.seconds()
    shape = h.sched.shape(now, max_age=0)
    assert shape["deferred"] == 2 and shape["active"] == 0 and shape["hold"] == 0
    assert abs(shape["oldest_arrival"] - int(a[:13], 16) / 1e6) < 1e-6
    result_of(h.admin.hold(Selector(ids=(b,))))
    assert h.sched.shape(now, max_age=0) | {"oldest_arrival": None} == {
        "active": 0, "deferred": 1, "hold": 1, "oldest_arrival": None}
    # a daemon started later counts the held message from recovery
    h2 = Harness(store)
    h2.start()
    assert h2.sched.shape(h2.clock.seconds(), max_age=0)["hold"] == 1
    result_of(h.admin.delete(Selector(ids=(b,))))
    assert h.sched.shape(now, max_age=0)["hold"] == 0


def test_flush_without_selector_touches_only_deferred_mail(store):
    h = Harness(store)
    h.replies["example.org"] = LATER
    h.start()
    deferred = store.enqueue("a@example.com", ["b@example.org"], MSG)
    result_of(h.sched.pickup())
    held = store.enqueue("a@example.com", ["c@example.org"], MSG)
    result_of(h.sched.pickup())
    result_of(h.admin.hold(Selector(ids=(held,))))
    for sel in (None, Selector()):
        res = result_of(h.admin.flush(sel))
        assert res.changed == [deferred] and res.matched == 1 and res.skipped == {}
