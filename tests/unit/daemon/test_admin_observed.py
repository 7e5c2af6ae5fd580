"""An operator's actions as the metrics and the status page see them: an
admin bounce is a bounce of each recipient it returned (with the operator's
reply), and every action is counted by kind."""

import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.logger import globalLogPublisher

from twisted_mailout.admin import QueueAdmin, Selector
from twisted_mailout.daemon.history import History
from twisted_mailout.daemon.metrics import Metrics
from twisted_mailout.testing.memorystore import MemoryStore

MSG = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"


def fired(d):
    out = []
    d.addBoth(out.append)
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def value(metrics, name, **labels):
    for fam in text_string_to_metric_families(metrics.exposition().decode()):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def test_admin_bounce_and_hold_reach_metrics_and_history():
    clock = task.Clock()
    clock.advance(time.time())
    store = MemoryStore(clock=clock.seconds)
    admin = QueueAdmin(store, clock, source="api")
    history = History(clock)
    metrics = Metrics(process=False)
    seen = []
    globalLogPublisher.addObserver(history.log_observer)
    globalLogPublisher.addObserver(metrics.log_observer)
    globalLogPublisher.addObserver(seen.append)
    try:
        a = store.enqueue("a@example.com", ["x@example.org", "y@example.net"], MSG)
        b = store.enqueue("a@example.com", ["z@example.org"], MSG)
        res = fired(admin.bounce(Selector(ids=(a,)), reason="left the company"))
        fired(admin.hold(Selector(ids=(b,))))
    finally:
        for obs in (history.log_observer, metrics.log_observer, seen.append):
            globalLogPublisher.removeObserver(obs)
    assert res.bounced == {a: ["x@example.org", "y@example.net"]}
    [event] = [e for e in seen if e.get("action") == "bounce"]
    assert event["recipients"] == ["x@example.org", "y@example.net"]
    assert event["reply"] == "550 5.0.0 bounced by the operator: left the company"

    snap = history.snapshot()
    bounces = snap["bounces"]
    assert sorted(x["recipient"] for x in bounces) == ["x@example.org", "y@example.net"]
    assert all(x["queue_id"] == a and "left the company" in x["reply"] for x in bounces)
    assert history.since_start["bounced"] == 2

    assert value(metrics, "mailout_recipients_total", status="bounced") == 2
    assert value(metrics, "mailout_admin_actions_total", action="bounce") == 1
    assert value(metrics, "mailout_admin_actions_total", action="hold") == 1
