"""Selectors as the command line and the API give them; the postqueue -j row;
the hold fields of a queue entry round-tripping through the state JSON."""

import io

import pytest

from twisted_mailout.admin.selector import Selector, SelectorError
from twisted_mailout.admin.views import AGE_BUCKETS, queue_name, row, summary
from twisted_mailout.envelope import RecipientState, Reply
from twisted_mailout.queue.model import ListedEntry, QueueEntry, RecipientStatus

QA = "660EB01CB8E502051127233"
QB = "660EB01CB8E502051127234"


def entry(qid=QA, sender="a@example.com", rcpts=("b@example.org",), arrival=1000.0):
    return QueueEntry(qid, sender, arrival, 10, recipients=[RecipientStatus(r) for r in rcpts])


def test_parse_words_stdin_and_filters():
    stdin = io.StringIO(f"# from jq\n{QA}\n\n" + f'{{"queue_id": "{QB}", "x": 1}}\n')
    s = Selector.parse(["-"], stdin=stdin, domain="example.org")
    assert s.ids == (QA, QB) and s.domain == "example.org"
    assert Selector.parse(["ALL"]).all
    assert Selector.parse([QA, QA]).ids == (QA,)
    assert Selector.parse([], older_than="3600").older_than == 3600.0
    for bad in [dict(older_than="soon"), dict(state="frozen"), dict(older_than=-1)]:
        with pytest.raises(SelectorError):
            Selector.parse([], **bad)
    with pytest.raises(SelectorError):
        Selector.parse(["ALL", QA])
    with pytest.raises(SelectorError):
        Selector.parse(["-"], stdin=io.StringIO("{not json\n"))
    with pytest.raises(SelectorError, match="say which messages"):
        Selector().require("delete")


def test_json_round_trip_and_refusals():
    s = Selector(ids=(QA,), domain="example.org", older_than=60)
    assert Selector.from_json(s.to_json()) == s
    for bad in [[], {"ids": QA}, {"colour": "red"}, {"older_than": "1"}, {"all": "yes"},
                {"domain": 5}, {"older_than": True}]:
        with pytest.raises(SelectorError):
            Selector.from_json(bad)


def test_matching():
    e = entry(rcpts=("x@Sub.Example.org", "y@example.net"))
    assert Selector(domain=".example.org").matches(e, "active", 2000)
    assert not Selector(domain="example.org").matches(e, "active", 2000)
    assert Selector(domain="sub.example.org").matches(e, "active", 2000)
    e.recipients[0].state = RecipientState.DELIVERED  # finished recipients do not count
    assert not Selector(domain="sub.example.org").matches(e, "active", 2000)
    assert Selector(sender="A@EXAMPLE.COM").matches(e, "active", 2000)
    assert not Selector(sender="<>").matches(e, "active", 2000)
    assert Selector(sender="<>").matches(entry(sender=""), "active", 2000)
    assert Selector(older_than=1000).matches(e, "active", 2000)
    assert not Selector(older_than=1001).matches(e, "active", 2000)
    assert not Selector(state="hold").matches(e, "active", 2000)


def test_queue_names_and_row():
    e = entry()
    assert queue_name(ListedEntry(e, "incoming", "new/x")) == "incoming"
    assert queue_name(ListedEntry(e, "active")) == "active"
    e.recipients[0].move(RecipientState.DEFERRED, Reply(451, "4.3.0 later"), 5000.0)
    assert queue_name(ListedEntry(e, "active")) == "deferred"
    assert queue_name(ListedEntry(e, "active"), {QA}) == "active"
    e.hold(1500.0)
    assert queue_name(ListedEntry(e, "active"), {QA}) == "hold"
    e.size = 123
    r = row(ListedEntry(e, "active"), "hold")
    assert r["queue_id"] == QA and r["arrival_time"] == 1000 and r["message_size"] == 123
    assert r["recipients"] == [{"address": "b@example.org", "state": "deferred", "attempts": 0,
                                "next_attempt": 5000.0, "last_reply": "451 4.3.0 later",
                                "relay": None}]
    assert r["held_since"] == 1500.0


def test_hold_round_trips_and_release_moves_lifetime():
    e = entry()
    e.recipients[0].move(RecipientState.DEFERRED, Reply(451, "4.3.0 later"), 5000.0)
    assert e.hold(2000.0) and not e.hold(2100.0)
    assert e.next_attempt() is None and e.due(10**10) == []
    back = QueueEntry.from_json(e.to_json())
    assert back.held and back.held_since == 2000.0
    assert back.release(2600.0) and not back.release(2700.0)
    assert back.held_total == 600.0 and back.lifetime_start == 1600.0
    assert back.next_attempt() == 2600.0  # due at once
    assert QueueEntry.from_json(back.to_json()).held_total == 600.0


def test_history_is_bounded():
    r = RecipientStatus("b@example.org")
    for i in range(30):
        r.record(float(i), Reply(451, f"4.3.0 try {i}"), "mx[192.0.2.1]:25")
    assert len(r.history) == 20 and r.history[0]["text"] == "4.3.0 try 10"
    assert RecipientStatus.from_json(r.to_json()).history == r.history


def test_summary_columns():
    entries = [ListedEntry(entry(arrival=10_000 - m * 60), "active") for m in
               (0, 4.9, 5, 1279, 1280, 5000)]
    s = summary(entries, 10_000)
    assert len(s["total"]["counts"]) == len(AGE_BUCKETS) + 1
    assert s["total"]["counts"] == [2, 1, 0, 0, 0, 0, 0, 0, 1, 2]
    with pytest.raises(ValueError):
        summary([], 0, by="colour")
