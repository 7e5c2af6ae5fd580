"""The daemon's Prometheus metrics (twisted_mailout.daemon.metrics).

Events are made by the real emitters wherever one can run in memory (the
scheduler over a MemoryStore, the TLS-RPT functions, a real connector under
StubSMTP, the router's own failures), so a renamed field fails here; the
exposition is read back with prometheus_client's own parser. The Grafana
dashboard in docs/ is checked against the names the metrics expose.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.logger import Logger, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel

from tests.support.fakes import NXDOMAIN, SERVFAIL, TIMEOUT, FakeResolver, ScriptedConnector, mx
from twisted_mailout.daemon.metrics import (
    QUEUE_NAMES,
    BoundedLabels,
    Metrics,
)
from twisted_mailout.delivery.connector import (
    DNS_FAILURE_KINDS,
    dns_failure_kind,
    tls_version,
)
from twisted_mailout.delivery.pool import ConnectionPool, Opened, PoolLimits
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler
from twisted_mailout.envelope import Reply
from twisted_mailout.outcome import RecipientResult, Status
from twisted_mailout.routing.router import MXRouter, NextHop, RouteError
from twisted_mailout.testing.memory import StubSMTP
from twisted_mailout.testing.memorystore import MemoryStore
from twisted_mailout.tls import tlsrpt

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
MSG = b"From: a@origin.test\r\nSubject: s\r\nMessage-ID: <m@origin.test>\r\n\r\nbody\r\n"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    """Every sample of the exposition: {(name, labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics | Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when it is not exposed."""
    got = samples(metrics) if isinstance(metrics, Metrics) else metrics
    return got.get((name, frozenset(labels.items())))


def total(got: Samples, name: str, **match: str) -> float:
    """The sum of the samples of C{name} whose labels include C{match}."""
    return sum(v for (n, labels), v in got.items()
               if n == name and set(match.items()) <= set(labels))


@pytest.fixture
def observed() -> Iterator[Metrics]:
    """Metrics observing the global log publisher (every destination gets a
    label at its first outcome)."""
    m = Metrics(admit_after=1, process=False)
    globalLogPublisher.addObserver(m.log_observer)
    yield m
    globalLogPublisher.removeObserver(m.log_observer)


class FakeLive:
    """A LiveState whose values the test sets."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.oldest: float | None = None
        self.conns = (0, 0)
        self.suspensions = 0
        self.throttles = (0, 0)
        self.shared = None
        self.fail = False
        self.reads = 0

    def queue_counts(self) -> Mapping[str, int]:
        self.reads += 1
        if self.fail:
            raise RuntimeError("the scheduler is gone")
        return self.counts

    def oldest_arrival(self) -> float | None:
        return self.oldest

    def connections(self) -> tuple[int, int]:
        return self.conns

    def suspended(self) -> int:
        return self.suspensions

    def throttled(self) -> tuple[int, int]:
        return self.throttles

    def shared_counts(self):
        return self.shared


# -- outcomes, from the real scheduler ---------------------------------------


OK = Reply(250, "2.0.0 Ok: queued")
NOUSER = Reply(550, "5.1.1 no such user")
LATER = Reply(451, "4.3.0 try later")


def script(dest: str, rcpt: str) -> Reply:
    return {"ok": OK, "nouser": NOUSER, "later": LATER}[rcpt.split("@", maxsplit=1)[0]]


def test_a_scheduler_s_events_count_outcomes_pickups_replies_and_delays(observed: Metrics
                                                                        ) -> None:
    clock = task.Clock()
    clock.advance(1_800_000_000)
    store = MemoryStore(clock=clock.seconds)
    sched = Scheduler(store, ScriptedConnector(script), clock, reporting_mta="mx.mailout.test",
                      rng=random.Random(0), retry=RetryPolicy(base=300, max=300, lifetime=1000,
                                                              bounce_lifetime=1000, jitter=0))
    # The null sender: the bounce of nouser@ is dropped, not queued, so the
    # counts below are this message's alone.
    store.enqueue("", ["ok@a.test", "nouser@a.test", "later@b.test"], MSG)
    sched.start()
    got = samples(observed)
    assert value(got, "mailout_messages_enqueued_total") == 1
    assert value(got, "mailout_recipients_enqueued_total") == 3
    assert value(got, "mailout_recipients_total", status="delivered") == 1
    assert value(got, "mailout_recipients_total", status="bounced") == 1
    assert value(got, "mailout_recipients_total", status="deferred") == 1
    assert value(got, "mailout_recipients_total", status="expired") == 0
    assert value(got, "mailout_smtp_replies_total", code_class="2xx") == 1
    assert value(got, "mailout_smtp_replies_total", code_class="5xx") == 1
    assert value(got, "mailout_smtp_replies_total", code_class="4xx") == 1
    assert value(got, "mailout_destination_recipients_total", destination="a.test",
                 status="delivered") == 1
    assert value(got, "mailout_destination_recipients_total", destination="b.test",
                 status="deferred") == 1
    # Final outcomes only: the deferral is not a delay observation.
    assert value(got, "mailout_delivery_delay_seconds_count", status="delivered") == 1
    assert value(got, "mailout_delivery_delay_seconds_count", status="bounced") == 1
    assert total(got, "mailout_delivery_delay_seconds_count") == 2

    clock.advance(300)  # second attempt: deferred again
    clock.advance(300)  # 600 s
    clock.advance(300)  # 900 s
    clock.advance(300)  # 1200 s > lifetime: expired
    got = samples(observed)
    assert value(got, "mailout_recipients_total", status="expired") == 1
    assert value(got, "mailout_delivery_delay_seconds_count", status="expired") == 1
    # It waited 1200 s: in the 1800 s bucket, not in the 600 s one.
    assert value(got, "mailout_delivery_delay_seconds_bucket", status="expired",
                 le="600.0") == 0
    assert value(got, "mailout_delivery_delay_seconds_bucket", status="expired",
                 le="1800.0") == 1
    assert value(got, "mailout_delivery_delay_seconds_sum", status="expired") == pytest.approx(
        1200)
    assert total(got, "mailout_recipients_total") == total(
        got, "mailout_destination_recipients_total")


def test_observe_outcome_counts_a_value_like_its_event() -> None:
    m = Metrics(admit_after=1, process=False)
    m.observe_outcome(RecipientResult("x@c.test", Status.DEFERRED, 421, "4.4.1 connect failed",
                                      local=True, delay=5.0), destination="c.test")
    m.observe_outcome(RecipientResult("y@c.test", Status.DELIVERED, 250, "ok", delay=7.5))
    got = samples(m)
    assert value(got, "mailout_smtp_replies_total", code_class="local") == 1
    assert value(got, "mailout_smtp_replies_total", code_class="2xx") == 1
    assert value(got, "mailout_delivery_delay_seconds_sum", status="delivered") == 7.5
    # Without a destination it is left out of the per-destination counts.
    assert total(got, "mailout_destination_recipients_total") == 1


def test_the_observer_ignores_other_events_and_counts_unreadable_ones() -> None:
    m = Metrics(process=False)
    m.log_observer({"log_namespace": "twisted_mailout.queue.store", "outcome": "delivered"})
    m.log_observer({"log_namespace": "twisted_mailout.outcome", "outcome": "queued"})
    m.log_observer({"log_format": "no namespace"})
    # the scheduler's other lines carry a qid but no origin
    m.log_observer({"log_namespace": "twisted_mailout.delivery.scheduler", "qid": "Q"})
    got = samples(m)
    assert total(got, "mailout_recipients_total") == 0
    assert value(got, "mailout_messages_enqueued_total") == 0
    assert value(got, "mailout_metrics_errors_total", source="event") == 0
    m.log_observer({"log_namespace": "twisted_mailout.tlsrpt", "tlsrpt": "success",
                    "policy_type": ["not", "hashable"]})
    assert value(m, "mailout_metrics_errors_total", source="event") == 1


# -- TLS-RPT, DNS and sessions -------------------------------------------------


def test_tlsrpt_events_count_by_policy_type_and_result(observed: Metrics) -> None:
    tlsrpt.log_success("sts", "a.test", policy_string=["version: STSv1"], mx_host=["mx.a.test"])
    tlsrpt.log_success("tlsa", "b.test", count=2)
    tlsrpt.log_failure("sts", "a.test", "certificate-expired", count=3)
    got = samples(observed)
    assert value(got, "mailout_tlsrpt_sessions_total", policy_type="sts", result="success") == 1
    assert value(got, "mailout_tlsrpt_sessions_total", policy_type="tlsa",
                 result="success") == 2
    assert value(got, "mailout_tlsrpt_sessions_total", policy_type="sts",
                 result="certificate-expired") == 3


ZONE: dict[str, Any] = {"records": {
    "good.test": {"MX": [[10, "mx.good.test"]]},
    "mx.good.test": {"A": ["192.0.2.10"]},
    "broken.test": {"SERVFAIL": True},
    "nohost.test": {"MX": [[10, "mx.nohost.test"]]},
}}


def test_a_real_connector_s_dns_failures_and_sessions_are_counted(observed: Metrics) -> None:
    stub = StubSMTP(zone=ZONE, tls="may")
    report = stub.result(stub.send("s@origin.test", ["a@good.test", "b@gone.test",
                                                     "c@broken.test", "d@nohost.test"], MSG))
    assert [r.code for r in report] == [250, 550, 451, 451]
    got = samples(observed)
    assert value(got, "mailout_dns_failures_total", kind="nxdomain") == 2  # MX; MX host's A
    assert value(got, "mailout_dns_failures_total", kind="servfail") == 1
    assert total(got, "mailout_dns_failures_total") == 3
    # The stub server offers no STARTTLS: one plaintext session under "may".
    assert value(got, "mailout_tls_sessions_total", level="may", result="plaintext") == 1
    assert total(got, "mailout_tls_sessions_total") == 1
    stub.close()


def test_a_required_level_without_starttls_is_a_failed_tls_session(observed: Metrics) -> None:
    stub = StubSMTP(tls="encrypt")
    [r] = stub.result(stub.send("s@origin.test", ["a@good.test"], MSG))
    assert r.code // 100 == 4
    assert value(observed, "mailout_tls_sessions_total", level="encrypt",
                 result="starttls-not-supported") == 1


def route_error(d: defer.Deferred[Any]) -> RouteError:
    box: list[Any] = []
    d.addErrback(box.append)
    assert box, "the lookup did not fail"
    err = box[0].value
    assert isinstance(err, RouteError)
    return err


@pytest.mark.parametrize(("table", "lookup", "kind"), [
    ({("x.test", 15): NXDOMAIN}, "mx", "nxdomain"),
    ({("x.test", 15): SERVFAIL}, "mx", "servfail"),
    ({("x.test", 15): TIMEOUT}, "mx", "timeout"),
    ({("x.test", 15): [mx("x.test", 0, "")]}, "mx", "null_mx"),
    ({("mx.x.test", 1): []}, "address", "no_address"),
    ({("mx.x.test", 1): NXDOMAIN, ("mx.x.test", 28): NXDOMAIN}, "address", "nxdomain"),
    ({("mx.x.test", 1): SERVFAIL, ("mx.x.test", 28): SERVFAIL}, "address", "servfail"),
])
def test_every_routing_failure_has_its_kind(table: dict[Any, Any], lookup: str,
                                            kind: str) -> None:
    router = MXRouter(FakeResolver(table), task.Clock())
    if lookup == "mx":
        err = route_error(router.route("x.test"))
    else:
        err = route_error(router.addresses(NextHop("mx.x.test", 25)))
    assert dns_failure_kind(err.reply) == kind
    assert kind in DNS_FAILURE_KINDS


def test_an_unknown_dns_failure_is_other() -> None:
    assert dns_failure_kind(Reply(451, "4.4.3 something new", local=True)) == "other"


class _Handle:
    def __init__(self, version: str) -> None:
        self.version = version

    def get_protocol_version_name(self) -> str:
        return self.version


class _Transport:
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def getHandle(self) -> Any:
        if self.handle is None:
            raise AttributeError("no TLS handle")
        return self.handle


class _Session:
    def __init__(self, encrypted: bool, handle: Any = None) -> None:
        self.encrypted = encrypted
        self.transport = _Transport(handle)


def test_tls_version_names_the_protocol_or_says_tls_or_none() -> None:
    assert tls_version(_Session(True, _Handle("TLSv1.3"))) == "TLSv1.3"
    assert tls_version(_Session(True, _Handle("Unknown"))) == "TLS"
    assert tls_version(_Session(True, None)) == "TLS"
    assert tls_version(_Session(False, _Handle("TLSv1.3"))) is None


# -- cardinality ----------------------------------------------------------------


def test_at_most_n_destinations_get_a_label_and_keep_it() -> None:
    m = Metrics(destinations=3, admit_after=1, process=False)
    for i in range(10):
        m.observe_outcome(RecipientResult(f"u@d{i}.test", Status.DELIVERED, 250, "ok"),
                          destination=f"d{i}.test")
    got = samples(m)
    labels = {dict(lb)["destination"] for (n, lb) in got
              if n == "mailout_destination_recipients_total"}
    assert labels == {"d0.test", "d1.test", "d2.test", "other"}
    assert value(got, "mailout_destination_recipients_total", destination="other",
                 status="delivered") == 7
    # A labelled destination keeps its series; the others keep adding to other.
    before = got
    m.observe_outcome(RecipientResult("u@d0.test", Status.BOUNCED, 550, "no"),
                      destination="d0.test")
    m.observe_outcome(RecipientResult("u@d9.test", Status.DELIVERED, 250, "ok"),
                      destination="d9.test")
    after = samples(m)
    assert value(after, "mailout_destination_recipients_total", destination="d0.test",
                 status="bounced") == 1
    assert value(after, "mailout_destination_recipients_total", destination="other",
                 status="delivered") == 8
    for key, v in before.items():
        if key[0].endswith("_total"):
            assert after[key] >= v, key  # monotonic


def test_the_busiest_destinations_get_the_labels_not_a_flood_of_one_offs() -> None:
    labels = BoundedLabels(limit=2, admit_after=5, candidates=50)
    seen = []
    for i in range(2000):
        seen.append(labels.label(f"once{i}.test"))  # each seen once
        if i % 10 == 0:
            seen.append(labels.label("busy.test"))
        if i % 15 == 0:
            seen.append(labels.label("second.test"))
    assert labels.labelled == {"busy.test", "second.test"}
    assert set(seen) == {"other", "busy.test", "second.test"}
    assert len(labels._counts) <= 50  # bounded memory


def test_a_value_seen_rarely_among_many_loses_its_count() -> None:
    # Seen 3 times in 103 sightings: not among the busiest of a summary of 2.
    labels = BoundedLabels(limit=5, admit_after=3, candidates=2)
    labels.label("rare.test")
    labels.label("rare.test")
    for i in range(100):
        labels.label(f"once{i}.test")
    assert labels.label("rare.test") == "other"
    assert labels.labelled == frozenset()


def test_a_value_named_like_other_never_gets_a_label() -> None:
    labels = BoundedLabels(limit=5, admit_after=1)
    assert labels.label("other") == "other"
    assert labels.labelled == frozenset()


def test_bounded_labels_refuses_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        BoundedLabels(admit_after=0)


# -- live gauges --------------------------------------------------------------------


def test_live_gauges_are_read_at_every_scrape() -> None:
    live = FakeLive()
    now = [1_800_000_000.0]
    m = Metrics(live, seconds=lambda: now[0], process=False)
    live.counts = {"active": 3, "deferred": 7}
    live.oldest = now[0] - 90
    live.conns = (2, 5)
    live.suspensions = 1
    live.throttles = (2, 1)
    got = samples(m)
    assert {name: value(got, "mailout_queue_messages", queue_name=name)
            for name in QUEUE_NAMES} == {"incoming": 0, "active": 3, "deferred": 7, "hold": 0}
    assert value(got, "mailout_queue_oldest_age_seconds") == 90
    assert value(got, "mailout_connections", state="active") == 2
    assert value(got, "mailout_connections", state="idle") == 5
    assert value(got, "mailout_suspended_destinations") == 1
    assert value(got, "mailout_throttled_destinations", action="suspend") == 2
    assert value(got, "mailout_throttled_destinations", action="rate") == 1
    assert "mailout_shared_queue_messages" not in {name for name, _ in got}  # a folder
    live.shared = {"incoming": 7, "claimed": 5, "hold": 1, "owners": 3}
    got = samples(m)
    assert value(got, "mailout_shared_queue_messages", state="incoming") == 7
    assert value(got, "mailout_shared_queue_messages", state="claimed") == 5
    assert value(got, "mailout_shared_queue_daemons") == 3
    live.shared = None
    live.counts = {"hold": 4}
    live.oldest = None
    now[0] += 30
    got = samples(m)
    assert value(got, "mailout_queue_messages", queue_name="hold") == 4
    assert value(got, "mailout_queue_messages", queue_name="active") == 0
    assert value(got, "mailout_queue_oldest_age_seconds") == 0  # empty queue
    assert live.reads == 3  # one read a scrape


def test_a_failing_live_state_leaves_the_gauges_out_and_is_counted() -> None:
    live = FakeLive()
    m = Metrics(live, process=False)
    live.fail = True
    got = samples(m)
    assert value(got, "mailout_queue_messages", queue_name="active") is None
    assert value(got, "mailout_metrics_errors_total", source="live") == 1
    assert value(got, "mailout_recipients_total", status="delivered") == 0  # still answers
    live.fail = False
    assert value(m, "mailout_queue_messages", queue_name="active") == 0


def test_without_a_live_state_the_live_gauges_are_left_out() -> None:
    m = Metrics(process=False)
    got = samples(m)
    assert not [k for k in got if k[0].startswith(("mailout_queue", "mailout_connections"))]
    m.live = FakeLive()
    assert value(m, "mailout_suspended_destinations") == 0


def test_the_pool_counts_idle_connections_over_all_destinations() -> None:
    clock = task.Clock()

    class Session:
        usable = True
        transactions = 0
        created = 0.0

        def __init__(self) -> None:
            self.closed: defer.Deferred[None] = defer.Deferred()

        def quit(self) -> defer.Deferred[None]:
            self.closed.callback(None)
            return defer.succeed(None)

    def opener(key: str) -> defer.Deferred[Opened[Session]]:
        return defer.succeed(Opened(Session(), key))

    pool: ConnectionPool[Session] = ConnectionPool(clock, opener, PoolLimits(idle_timeout=5))
    leases = []
    for key in ("a.test", "a.test", "b.test"):
        pool.acquire(key).addCallback(leases.append)
    assert pool.idle_connections() == 0 and pool.open_connections == 3
    for lease in leases:
        pool.release(lease, reusable=True)
    assert pool.idle_connections() == 3
    pool.acquire("a.test")
    assert pool.idle_connections() == 2
    clock.advance(5)  # the idle ones time out
    assert pool.idle_connections() == 0


# -- exposition -----------------------------------------------------------------------


def feed_every_kind(m: Metrics) -> None:
    """One event of every kind the metrics read, through the observer."""
    for status, code in (("delivered", 250), ("deferred", 451), ("bounced", 550),
                         ("expired", 451)):
        m.observe_outcome(RecipientResult(f"{status}@x.test", Status(status), code, "t",
                                          delay=12.0), destination="x.test")
    Log = Logger  # noqa: N806 - the emitters' own namespaces
    for namespace, fields in (
            ("twisted_mailout.delivery.scheduler",
             {"qid": "Q1", "sender": "s@o.test", "n": 2, "origin": "mailout"}),
            ("twisted_mailout.session", {"host": "mx.x.test", "relay": "mx.x.test[192.0.2.1]:25",
                                         "tls_level": "may", "tls": "TLSv1.3",
                                         "result": "tls"}),
            ("twisted_mailout.dns", {"kind": "servfail", "destination": "x.test",
                                     "host": None, "lookup": "mx", "code": 451,
                                     "reply": "451 4.4.3 SERVFAIL"})):
        events: list[dict[str, Any]] = []
        Log(namespace=namespace, observer=events.append).info("e", **fields)
        for event in events:
            m.log_observer(event)
    events = []
    tlsrpt.log_success("sts", "x.test", logger=Logger(namespace="twisted_mailout.tlsrpt",
                                                        observer=events.append))
    for event in events:
        m.log_observer(event)


def test_the_exposition_parses_and_every_name_is_announced() -> None:
    live = FakeLive()
    m = Metrics(live, admit_after=1)
    feed_every_kind(m)
    got = samples(m)
    names = {n for n, _ in got}
    assert names <= m.sample_names()
    assert value(got, "mailout_messages_enqueued_total") == 1
    assert value(got, "mailout_tls_sessions_total", level="may", result="tls") == 1
    assert value(got, "mailout_dns_failures_total", kind="servfail") == 1
    assert value(got, "mailout_tlsrpt_sessions_total", policy_type="sts", result="success") == 1
    for required in ("mailout_recipients_total", "mailout_messages_enqueued_total",
                     "mailout_queue_messages", "mailout_queue_oldest_age_seconds",
                     "mailout_delivery_delay_seconds_bucket", "mailout_smtp_replies_total",
                     "mailout_connections", "mailout_tls_sessions_total",
                     "mailout_dns_failures_total", "mailout_suspended_destinations",
                     "mailout_destination_recipients_total"):
        assert required in names, required


def test_two_metrics_never_share_counts() -> None:
    one, two = Metrics(process=False), Metrics(process=False)
    one.observe_outcome(RecipientResult("x@a.test", Status.DELIVERED, 250, "ok"))
    assert value(one, "mailout_recipients_total", status="delivered") == 1
    assert value(two, "mailout_recipients_total", status="delivered") == 0


class _InlineThreads:
    """A reactor and thread pool that run everything at once, in this thread."""

    def getThreadPool(self) -> _InlineThreads:
        return self

    def callInThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def test_the_resource_reads_the_live_state_and_serves_the_text() -> None:
    live = FakeLive()
    live.counts = {"deferred": 9}
    m = Metrics(live, process=False)
    root = Resource()
    root.putChild(b"metrics", m.resource(_InlineThreads()))
    channel = DummyChannel()
    channel.site = Site(root)
    request = Request(channel)
    request.gotLength(0)
    request.requestReceived(b"GET", b"/metrics", b"HTTP/1.1")
    assert live.reads == 1
    assert request.finished
    head, _, body = channel.transport.written.getvalue().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: text/plain; version=0.0.4" in head.lower()
    assert b'mailout_queue_messages{queue_name="deferred"} 9.0' in body


# -- the Grafana dashboard -------------------------------------------------------------


def _exprs(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: targets and variable queries."""
    if isinstance(node, dict):
        for key, v in node.items():
            if key == "expr" and isinstance(v, str):
                yield v
            elif key == "query" and isinstance(v, dict) and isinstance(v.get("query"), str):
                yield v["query"]
            else:
                yield from _exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _exprs(v)


_METRIC = re.compile(r"\b(?:mailout|process|python)_[a-zA-Z0-9_]*")


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["schemaVersion"] >= 36
    exprs = list(_exprs(dashboard))
    assert len(exprs) >= 10
    exposed = Metrics().sample_names()
    used: set[str] = set()
    for expr in exprs:
        names = set(_METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))
        assert names, f"no metric in {expr!r}"
        assert names <= exposed, f"{expr!r} uses {sorted(names - exposed)}"
        used |= names
    for required in ("mailout_recipients_total", "mailout_queue_messages",
                     "mailout_queue_oldest_age_seconds", "mailout_delivery_delay_seconds_bucket",
                     "mailout_smtp_replies_total", "mailout_connections",
                     "mailout_tls_sessions_total", "mailout_dns_failures_total",
                     "mailout_suspended_destinations", "mailout_messages_enqueued_total"):
        assert required in used, f"no panel shows {required}"
    for panel in dashboard["panels"]:
        if panel.get("type") != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
