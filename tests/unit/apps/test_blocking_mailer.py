"""Mailer.send, send_blocking and submit over a direct delivery from threads
other than the reactor's: they wait through the ReactorThread instead of
raising (a private reactor here; tests/integration/test_blocking_threads.py
does the same with the global one in child processes)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor

from twisted_mailout.apps.blocking import ReactorThread, ReactorThreadError
from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.outcome import DeliveryReport, Status


@pytest.fixture
def runner():
    r = ReactorThread(SelectReactor(), grace=5.0).start()
    yield r
    r.shutdown(wait=True)


def mailer_for(runner, sink, **kwargs):
    return Mailer({"url": f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=10",
                   "reactor": runner.reactor}, **kwargs)


def message(i=0):
    return build_message(sender="a@origin.test", to=f"r{i}@dest.test", subject="s", text="t")


def test_send_from_a_plain_thread_waits_for_the_report(runner, sink):
    events = []
    mailer = mailer_for(runner, sink, observers=[events.append])
    report = mailer.send(message())
    assert isinstance(report, DeliveryReport)
    assert [(r.recipient, r.status) for r in report] == [("r0@dest.test", Status.DELIVERED)]
    assert [e.recipient for e in events] == ["r0@dest.test"]
    assert mailer.send_blocking(message(1)).all_delivered
    assert len(sink.messages) == 2


def test_submit_gives_a_future(runner, sink):
    mailer = mailer_for(runner, sink)
    future = mailer.submit(message())
    assert isinstance(future, Future)
    assert future.result(20).all_delivered


def test_in_the_reactor_thread_send_returns_a_deferred_and_send_blocking_refuses(runner, sink):
    mailer = mailer_for(runner, sink)

    def in_reactor():
        d = mailer.send(message())
        assert isinstance(d, defer.Deferred)
        with pytest.raises(ReactorThreadError, match="reactor thread"):
            mailer.send_blocking(message())
        return d

    assert runner.call(in_reactor, timeout=20).all_delivered


def test_fifty_threads_share_the_mailers_connections(runner, sink):
    mailer = mailer_for(runner, sink)
    with ThreadPoolExecutor(50) as pool:
        reports = list(pool.map(lambda i: mailer.send(message(i)), range(50)))
    assert all(r.all_delivered for r in reports)
    received = sorted(r for m in sink.messages for r in m["rcpt_tos"])
    assert received == sorted(f"r{i}@dest.test" for i in range(50))
    assert sink.peak_sessions <= 4  # SMTPClient's connections per destination


def test_smtp_delivery_send_blocking_waits_through_the_runner(runner, sink):
    from twisted_mailout.apps.deliveries import SMTPDelivery

    delivery = SMTPDelivery(f"127.0.0.1:{sink.port}", tls="none", timeout=10,
                            reactor=runner.reactor)
    report = delivery.send_blocking("a@origin.test", ["b@dest.test"],
                                    b"Subject: s\r\n\r\nt\r\n")
    assert report.all_delivered
    with pytest.raises(ReactorThreadError, match="reactor thread"):
        runner.call(delivery.send_blocking, "a@origin.test", ["c@dest.test"], b"x\r\n",
                    timeout=10)
    assert [m["rcpt_tos"] for m in sink.messages] == [["b@dest.test"]]


def test_send_on_commit_over_smtp_from_a_thread_without_the_reactor(runner, sink):
    import transaction

    from tests.support.wait import wait_for

    manager = transaction.TransactionManager()
    events = []
    mailer = mailer_for(runner, sink, transaction_manager=manager, observers=[events.append])
    manager.begin()
    mid = mailer.send(message(7))
    assert isinstance(mid, str) and sink.messages == []
    manager.commit()
    wait_for(lambda: events, what="the outcome of the mail sent after commit")
    assert [(e.recipient, e.status) for e in events] == [("r7@dest.test", "delivered")]
    assert [m["rcpt_tos"] for m in sink.messages] == [["r7@dest.test"]]
