"""The status page's in-memory history (twisted_mailout.daemon.history): fed
with real outcome log events through a LogPublisher, on a task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet import task
from twisted.logger import Logger, LogPublisher

from twisted_mailout.daemon.history import History
from twisted_mailout.outcome import RecipientResult, Status

T0 = 1_800_000_000.0  # a whole minute (T0 % 60 == 0)


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(T0)
    return c


@pytest.fixture
def wired(clock):
    """A History observing a LogPublisher; emit(status, ...) logs one outcome
    event as Scheduler._emit does."""
    history = History(clock)
    publisher = LogPublisher(history.log_observer)
    outcome_log = Logger(namespace="twisted_mailout.outcome", observer=publisher)
    other_log = Logger(namespace="twisted_mailout.delivery.scheduler", observer=publisher)

    def emit(status, rcpt="a@example.org", code=None, text="ok", qid="Q1",
             destination=None, other=False):
        if code is None:
            code = {"delivered": 250, "deferred": 451, "bounced": 550, "expired": 451}[status]
        result = RecipientResult(rcpt, Status(status), code, text, "mx[192.0.2.1]:25",
                                 queue_id=qid, attempts=1, delay=1.0)
        fields = result.log_fields()
        extra = {"sender": "s@example.com",
                 "destination": destination or rcpt.rpartition("@")[2], "tls": None}
        (other_log if other else outcome_log).info("{text}", text="line", **fields, **extra)

    return history, emit


def test_counts_per_minute_with_expired_as_bounced(clock, wired):
    history, emit = wired
    emit("delivered")
    emit("delivered")
    emit("deferred")
    clock.advance(60)
    emit("bounced")
    emit("expired")
    snap = history.snapshot()
    out = snap["outcomes"]
    assert len(out["time"]) == 60
    assert out["time"][-1] == T0 + 60 and out["time"][-2] == T0
    assert out["time"][0] == T0 + 60 - 59 * 60
    assert out["delivered"][-2:] == [2, 0]
    assert out["deferred"][-2:] == [1, 0]
    assert out["bounced"][-2:] == [0, 2]
    assert sum(out["delivered"][:-2]) == 0
    assert snap["totals"] == {"delivered": 2, "deferred": 1, "bounced": 2}
    assert snap["since_start"] == {"delivered": 2, "deferred": 1, "bounced": 2}
    assert [b["outcome"] for b in snap["bounces"]] == ["expired", "bounced"]


def test_other_namespaces_and_statuses_ignored(wired):
    history, emit = wired
    emit("delivered", other=True)
    emit("queued", code=250)
    assert history.snapshot()["totals"] == {"delivered": 0, "deferred": 0, "bounced": 0}


def test_the_window_slides(clock, wired):
    history, emit = wired
    emit("delivered")
    clock.advance(59 * 60)
    assert history.snapshot()["outcomes"]["delivered"][0] == 1
    clock.advance(60)
    snap = history.snapshot()
    assert snap["totals"]["delivered"] == 0
    assert snap["since_start"]["delivered"] == 1
    # the old bucket is dropped once a newer one fills
    emit("deferred")
    assert len(history._counts) == 1


def test_events_older_than_the_window_are_ignored(clock):
    history = History(clock)
    assert history.record("delivered", when=T0)
    assert not history.record("delivered", when=T0 - 3600)
    assert history.record("delivered", when=T0 - 3540)
    assert history.snapshot()["totals"]["delivered"] == 2


def test_recent_bounces_newest_first_and_bounded(clock, wired):
    history, emit = wired
    for i in range(60):
        clock.advance(1)
        emit("bounced", rcpt=f"u{i}@dead.example", qid=f"Q{i}", text="5.1.1 no such user")
    bounces = history.snapshot()["bounces"]
    assert len(bounces) == 50
    assert bounces[0] == {"time": T0 + 60, "queue_id": "Q59", "recipient": "u59@dead.example",
                          "destination": "dead.example", "reply": "550 5.1.1 no such user",
                          "code": 550, "outcome": "bounced"}
    assert bounces[-1]["queue_id"] == "Q10"


def test_destinations_most_deferred_first_with_last_reply(clock, wired):
    history, emit = wired
    for _ in range(3):
        emit("deferred", rcpt="x@slow.example", text="4.7.0 greylisted")
    clock.advance(5)
    emit("deferred", rcpt="y@slow.example", code=421, text="4.4.2 timeout")
    emit("deferred", rcpt="z@other.example", text="4.3.0 later")
    emit("deferred", rcpt="r@relayed.example", destination="[smarthost]:587")
    emit("delivered", rcpt="x@slow.example")
    emit("delivered", rcpt="n@never-deferred.example")
    rows = history.snapshot()["destinations"]
    assert [r["destination"] for r in rows] == ["slow.example", "[smarthost]:587",
                                                "other.example"]
    slow = rows[0]
    assert slow == {"destination": "slow.example", "deferred": 4,
                    "last_reply": "421 4.4.2 timeout", "last_code": 421,
                    "last_time": T0 + 5, "last_delivered": T0 + 5}
    assert rows[2]["last_delivered"] is None


def test_destination_deferrals_leave_the_window(clock, wired):
    history, emit = wired
    emit("deferred", rcpt="x@slow.example")
    clock.advance(30 * 60)
    emit("deferred", rcpt="x@slow.example")
    assert history.snapshot()["destinations"][0]["deferred"] == 2
    clock.advance(30 * 60)
    assert history.snapshot()["destinations"][0]["deferred"] == 1
    clock.advance(30 * 60)
    assert history.snapshot()["destinations"] == []


def test_destinations_bounded_keeping_the_busiest(clock):
    history = History(clock, max_destinations=3)
    for _ in range(5):
        history.record("deferred", recipient="a@busy.example", reply="451 busy")
    for i in range(1000):
        history.record("deferred", recipient=f"a@d{i}.example", reply="451 x")
    assert len(history._destinations) <= 12
    rows = history.snapshot()["destinations"]
    assert len(rows) == 3
    assert rows[0]["destination"] == "busy.example"
    assert rows[0]["deferred"] == 5


def test_depth_sampled_on_the_clock(clock):
    counts = {"incoming": 1, "active": 2, "deferred": 3, "hold": 0}
    history = History(clock, depth=lambda: dict(counts), sample_interval=5)
    history.start()
    assert history.latest_depth() == {**counts, "total": 6}
    counts["deferred"] = 10
    clock.advance(5)
    counts["hold"] = 4
    clock.advance(5)
    depth = history.snapshot()["depth"]
    assert depth["interval"] == 5
    assert depth["time"] == [T0, T0 + 5, T0 + 10]
    assert depth["total"] == [6, 13, 17]
    assert depth["deferred"] == [3, 10, 10]
    assert depth["hold"] == [0, 0, 4]
    history.stop()
    clock.advance(5)
    assert len(history.snapshot()["depth"]["time"]) == 3
    assert clock.getDelayedCalls() == []


def test_depth_keeps_one_hour(clock):
    history = History(clock, depth=lambda: 7, sample_interval=5)
    history.start()
    clock.pump([5] * 2000)
    depth = history.snapshot()["depth"]
    assert len(depth["time"]) == 720
    assert depth["time"][0] > clock.seconds() - 3600
    assert depth["total"][-1] == 7 and depth["incoming"][-1] == 0
    assert len(history._depth) <= 722
    history.stop()


def test_a_failing_depth_source_does_not_stop_sampling(clock):
    calls = []

    def depth():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("gauge broken")
        return {"active": 1}

    history = History(clock, depth=depth, sample_interval=5)
    history.start()
    assert history.latest_depth() is None
    clock.advance(5)
    assert history.latest_depth() == {"incoming": 0, "active": 1, "deferred": 0, "hold": 0,
                                      "total": 1}
    history.stop()


def test_the_observer_never_raises(clock):
    history = History(clock)
    seen = []
    publisher = LogPublisher(history.log_observer, seen.append)
    broken = {"log_namespace": "twisted_mailout.outcome", "event": "deferred",
              "recipient": "a@b.example", "destination": 5}
    with pytest.raises(AttributeError):
        history.record("deferred", recipient="a@b.example", destination=5)
    publisher(broken)
    history.log_observer({"log_namespace": "twisted_mailout.outcome"})
    history.log_observer({"log_namespace": "twisted_mailout.outcome", "event": "deferred",
                          "recipient": "a@b.example"})
    # the observer was not removed by the publisher and still records
    publisher({"log_namespace": "twisted_mailout.outcome", "event": "deferred",
               "recipient": "c@d.example"})
    assert history.snapshot()["totals"]["deferred"] == 2
    assert seen[0] is broken


@pytest.mark.parametrize("kwargs", [{"sample_interval": 0}, {"window": 0},
                                    {"window": 90, "bucket": 60}])
def test_bad_arguments(clock, kwargs):
    with pytest.raises(ValueError):
        History(clock, **kwargs)
