"""Mailer: defaults, envelope from the header fields, Bcc, outcome events
(from synchronous deliveries, from direct SMTP against aiosmtpd, from the
daemon's per-recipient results)."""

from __future__ import annotations

import email
import email.policy

import pytest
from tests.support.peers import AiosmtpdSink
from twisted.internet import defer, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from twisted_mailout import AddressError, RecipientResult
from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.deliveries import DeliveryError, MemoryDelivery, SendmailDelivery
from twisted_mailout.envelope import Reply
from twisted_mailout.apps.mailer import (
    MailBounced,
    MailDeferred,
    MailDelivered,
    Mailer,
    MailEvent,
    MailQueued,
    event_from_log,
    event_from_outcome,
    event_from_result,
    log_observer,
    make_event,
    outcome_observer,
)
from twisted_mailout.queue.store import Queue
from twisted_mailout.outcome import Status


def parsed(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def test_envelope_comes_from_the_header_fields_and_bcc_leaves_the_bytes():
    outbox = MemoryDelivery()
    mailer = Mailer(outbox)
    msg = build_message(sender="Ann <ann@origin.test>", to=["b@dest.test"],
                        cc="c@dest.test", bcc=["hidden@dest.test"], subject="s", text="t")
    mailer.send(msg)
    [m] = outbox.outbox
    assert m.sender == "ann@origin.test"
    assert m.recipients == ["b@dest.test", "c@dest.test", "hidden@dest.test"]
    assert b"hidden@dest.test" not in m.data and b"Bcc" not in m.data
    # the caller's message object is not changed
    assert msg["Bcc"] == "hidden@dest.test"


def test_sender_header_wins_over_from_and_explicit_envelope_wins_over_both():
    outbox = MemoryDelivery()
    mailer = Mailer(outbox)
    data = (b"From: a@origin.test, b@origin.test\r\nSender: list@origin.test\r\n"
            b"To: x@dest.test\r\nBcc: y@dest.test\r\n\r\nbody\r\n")
    mailer.send(data)
    mailer.send(data, sender="bounces@origin.test", recipients="only@dest.test")
    first, second = outbox.outbox
    assert first.sender == "list@origin.test"
    assert first.recipients == ["x@dest.test", "y@dest.test"]
    assert (second.sender, second.recipients) == ("bounces@origin.test", ["only@dest.test"])
    assert b"Bcc" not in second.data  # removed even when recipients are given


def test_default_sender_and_headers_fill_what_is_missing():
    outbox = MemoryDelivery()
    mailer = Mailer(outbox, sender="Zoë Support <support@exämple.test>",
                    headers={"Reply-To": "help@origin.test", "X-Mailer": "app"})
    mailer.send(b"To: b@dest.test\r\nSubject: hi\r\n\r\nbody\r\n")
    mailer.send(b"From: own@origin.test\r\nReply-To: mine@origin.test\r\n"
                b"To: b@dest.test\r\n\r\nbody\r\n")
    first, second = outbox.outbox
    assert first.sender == "support@xn--exmple-cua.test"
    m = parsed(first.data)
    assert m["From"].addresses[0].display_name == "Zoë Support"
    assert m["Reply-To"] == "help@origin.test" and m["X-Mailer"] == "app"
    m2 = parsed(second.data)
    assert second.sender == "own@origin.test"
    assert m2.get_all("Reply-To") == ["mine@origin.test"]  # not added twice
    assert m2["X-Mailer"] == "app"


def test_missing_envelope_is_a_clear_error():
    mailer = Mailer("memory://")
    with pytest.raises(AddressError, match="no envelope sender"):
        mailer.send(b"To: b@dest.test\r\n\r\nbody\r\n")
    with pytest.raises(AddressError, match="no recipients"):
        mailer.send(b"From: a@origin.test\r\n\r\nbody\r\n")
    with pytest.raises(ValueError, match="CR or LF"):
        Mailer("memory://", headers={"X-A": "a\r\nBcc: evil@x.test"})
    with pytest.raises(ValueError, match="unknown delivery"):
        Mailer("carrier-pigeon://")


def test_events_for_synchronous_deliveries(tmp_path):
    events = []
    mailer = Mailer(f"queue://{tmp_path}/q", observers=[events.append])
    qid = mailer.send(b"From: a@origin.test\r\nTo: b@dest.test, c@dest.test\r\n\r\nx\r\n")
    assert Queue(str(tmp_path / "q")).incoming() == [f"new/{qid}"]
    assert [type(e) for e in events] == [MailQueued, MailQueued]
    assert [(e.queue_id, e.recipient, e.code) for e in events] == [
        (qid, "b@dest.test", 250), (qid, "c@dest.test", 250)]
    assert events[0].will_retry and events[0].sender == "a@origin.test"

    events.clear()
    mailer = Mailer("memory://", observers=[events.append])
    mid = mailer.send(b"From: a@origin.test\r\nTo: b@dest.test\r\n\r\nx\r\n")
    [e] = events
    assert isinstance(e, MailDelivered) and e.queue_id == mid and e.status == "delivered"


def test_a_failing_delivery_reports_then_raises(tmp_path):
    script = tmp_path / "sendmail"
    script.write_text("#!/bin/sh\ncat >/dev/null\necho 'no such user' >&2\nexit 67\n")
    script.chmod(0o755)
    events = []
    mailer = Mailer(SendmailDelivery(str(script)), observers=[events.append])
    with pytest.raises(DeliveryError):
        mailer.send(b"From: a@origin.test\r\nTo: b@dest.test\r\n\r\nx\r\n")
    [e] = events
    assert isinstance(e, MailBounced) and e.code == 550 and "no such user" in e.text
    assert e.enhanced_status == "5.1.1" and e.local


def test_an_observer_that_raises_never_breaks_delivery_nor_other_observers():
    seen, logged = [], []

    def bad(event):
        raise RuntimeError("observer bug")

    globalLogPublisher.addObserver(logged.append)
    try:
        mailer = Mailer("memory://", observers=[bad, seen.append])
        mid = mailer.send(b"From: a@origin.test\r\nTo: b@dest.test\r\n\r\nx\r\n")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert mid and [e.queue_id for e in seen] == [mid]
    assert any("observer bug" in str(e.get("log_failure", "")) for e in logged)
    with pytest.raises(TypeError):
        mailer.add_observer("not callable")


def test_events_from_the_daemons_outcomes():
    cases = [
        ("delivered", Reply(250, "2.0.0 Ok: queued as X"), MailDelivered, False, False),
        ("deferred", Reply(451, "4.3.0 busy"), MailDeferred, True, False),
        ("bounced", Reply(550, "5.1.1 no such user"), MailBounced, False, False),
        ("expired", Reply(451, "4.3.0 busy (delivery time expired after 5.0 days)"),
         MailBounced, False, True),
    ]
    for status, reply, cls, retry, expired in cases:
        o = RecipientResult.from_reply("b@dest.test", reply, status,
                                       relay="mx.dest.test[192.0.2.7]:25", queue_id="QID1",
                                       attempts=3, delay=0.5)
        e = event_from_outcome(o, sender="a@origin.test")
        assert type(e) is cls
        assert (e.queue_id, e.recipient, e.code, e.text, e.relay, e.attempts, e.delay) == (
            "QID1", "b@dest.test", reply.code, reply.text, "mx.dest.test[192.0.2.7]:25", 3, 0.5)
        assert (e.will_retry, e.expired, e.source) == (retry, expired, "daemon")
        assert e.result.status == status  # the event reads back as the same result
    o = RecipientResult.from_reply("b@dest.test", Reply(421, "no route", True), queue_id="Q")
    assert event_from_outcome(o).relay is None and event_from_outcome(o).local


def test_outcome_observer_adapts_for_the_delivery_service():
    got = []
    adapted = outcome_observer(got.append)
    adapted(RecipientResult("b@dest.test", Status.DELIVERED, 250, "ok", "h[1.2.3.4]:25",
                            queue_id="Q"))
    assert isinstance(got[0], MailDelivered)


def test_log_fields_are_stable_and_named_as_the_daemon_names_them():
    e = make_event("bounced", queue_id="Q", recipient="b@dest.test", code=550,
                   text="5.1.1 unknown", sender="a@origin.test")
    assert e.log_fields() == {
        "qid": "Q", "recipient": "b@dest.test", "event": "bounced", "outcome": "bounced",
        "status": "bounced", "code": 550, "dsn": "5.1.1", "reply": "550 5.1.1 unknown",
        "relay": "none",
        "delay": None, "attempts": 1, "local": False, "sender": "a@origin.test",
        "will_retry": False, "source": ""}
    # a log event made from these fields reads back as the same event
    back = event_from_log({**e.log_fields(), "log_namespace": "twisted_mailout.outcome"})
    assert (type(back), back.queue_id, back.code, back.text) == (MailBounced, "Q", 550,
                                                                 "5.1.1 unknown")
    assert event_from_log({"log_namespace": "other", "qid": "Q"}) is None
    assert event_from_log({**e.log_fields(), "log_namespace": "twisted_mailout"}) == back
    with pytest.raises(ValueError, match="unknown outcome status"):
        make_event("lost", queue_id="Q", recipient="b@dest.test", code=1, text="")
    r = RecipientResult("b@dest.test", "deferred", 451, "4.3.0 later", "h[1.2.3.4]:25", False)
    e = event_from_result("M1", r, "a@origin.test", "smtp://h")
    assert isinstance(e, MailDeferred) and not e.will_retry and isinstance(e, MailEvent)


class DirectMailerTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_direct_delivery_reports_per_recipient_events(self):
        sink = AiosmtpdSink("127.0.0.1", rcpt_reply=lambda r: "550 5.1.1 no such user"
                            if r.startswith("nobody@") else None).start()
        self.addCleanup(lambda: threads.deferToThread(sink.stop))
        events = []
        mailer = Mailer(f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=10",
                        observers=[events.append])
        msg = build_message(sender="a@origin.test", to="b@dest.test", bcc="nobody@dest.test",
                            subject="direct", text="hello")
        report = yield mailer.send(msg)
        self.assertEqual([r.status for r in report], ["delivered", "bounced"])
        self.assertEqual([(type(e), e.recipient, e.code) for e in events], [
            (MailDelivered, "b@dest.test", 250), (MailBounced, "nobody@dest.test", 550)])
        self.assertEqual(events[0].queue_id, events[1].queue_id)
        self.assertEqual(events[0].relay, f"127.0.0.1[127.0.0.1]:{sink.port}")
        [m] = sink.messages
        self.assertNotIn(b"nobody@dest.test", m["data"])


class DaemonObserverTests(unittest.TestCase):
    """One event type end to end: a transactional mailer queues, the daemon's
    DeliveryService delivers to aiosmtpd and its observers (adapted with
    outcome_observer) receive MailDelivered / MailBounced with the queue id
    the mailer returned."""

    timeout = 60

    @defer.inlineCallbacks
    def test_delivery_service_observers_get_typed_events(self):
        import tempfile

        import transaction
        from twisted.internet import reactor

        from twisted_mailout.daemon.config import Config
        from twisted_mailout.daemon.service import DeliveryService

        sink = AiosmtpdSink("127.0.0.1", rcpt_reply=lambda r: "550 5.1.1 no such user"
                            if r.startswith("nobody@") else None).start()
        self.addCleanup(lambda: threads.deferToThread(sink.stop))
        path = tempfile.mkdtemp(prefix="mailer-daemon-")
        tm = transaction.TransactionManager(explicit=True)
        mailer = Mailer(f"queue://{path}", transactional=True, transaction_manager=tm)
        tm.begin()
        qid = mailer.send(build_message(sender="a@origin.test", to="b@dest.test",
                                        cc="nobody@dest.test", subject="s", text="t"))
        tm.commit()

        events, logged = [], []
        observer = log_observer(logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        service = DeliveryService(
            Config(queue=path, relay=f"127.0.0.1:{sink.port}", tls="none",
                   poll_interval=0.2, command_timeout=10),
            reactor, observers=[outcome_observer(events.append)])
        service.startService()
        try:
            for _ in range(200):
                if len([e for e in events if e.queue_id == qid]) >= 2:
                    break
                d = defer.Deferred()
                reactor.callLater(0.05, d.callback, None)
                yield d
        finally:
            yield service.stopService()
        mine = [e for e in events if e.queue_id == qid]
        self.assertEqual({(type(e), e.recipient, e.code) for e in mine}, {
            (MailDelivered, "b@dest.test", 250), (MailBounced, "nobody@dest.test", 550)})
        self.assertTrue(all(e.source == "daemon" and e.attempts == 1 for e in mine))
        # the other events are for the bounce (RFC 3464) the daemon sent the sender
        others = [e for e in events if e.queue_id != qid]
        self.assertTrue(all(e.recipient == "a@origin.test" for e in others))
        # the daemon's twisted.logger outcome events read back as the same events
        self.assertEqual(
            {(type(e), e.queue_id, e.recipient, e.code, e.text) for e in logged},
            {(type(e), e.queue_id, e.recipient, e.code, e.text) for e in events})
