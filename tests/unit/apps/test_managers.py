"""marrow.mailer's managers on the Mailer: immediate, futures, dynamic; the
transport pool (pipeline exhaustion, a delivery's TransportExhausted, failed
transports) and the scaling executor (workers, divisor, starvation timeout).

Direct SMTP runs against aiosmtpd through a private reactor in a
ReactorThread (never the global reactor: see test_blocking.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
from twisted.internet.selectreactor import SelectReactor

from twisted_mailout.apps.blocking import ReactorThread
from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.deliveries import MemoryDelivery
from twisted_mailout.apps.mailer import MailDelivered, Mailer
from twisted_mailout.apps.managers import (
    DynamicManager,
    FuturesManager,
    ImmediateManager,
    ScalingExecutor,
    make_manager,
)
from twisted_mailout.errors import DeliveryError
from twisted_mailout.outcome import DeliveryReport

from tests.support.wait import wait_for


def message(i: int = 0, **kwargs):
    return build_message(sender="a@origin.test", to=f"r{i}@dest.test", subject=f"m{i}",
                         text="body", **kwargs)


@pytest.fixture
def runner():
    r = ReactorThread(SelectReactor(), grace=5.0).start()
    yield r
    r.shutdown(wait=True)


def smtp(runner, sink):
    return {"url": f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=10",
            "reactor": runner.reactor}


# -- choosing a manager ----------------------------------------------------------


def test_managers_by_name_and_by_marrow_configuration():
    mailer = Mailer("memory://")
    assert mailer.manager is None
    assert isinstance(make_manager("immediate", mailer), ImmediateManager)
    futures = make_manager({"use": "futures", "workers": 4}, mailer)
    assert isinstance(futures, FuturesManager) and futures.workers == 4
    dynamic = make_manager({"manager.use": "dynamic", "manager.workers": 3,
                            "manager.divisor": 5, "manager.timeout": 2.5}, mailer)
    assert isinstance(dynamic, DynamicManager)
    assert (dynamic.workers, dynamic.divisor, dynamic.timeout) == (3, 5, 2.5)
    assert make_manager({}, mailer).name == "immediate"  # marrow's default
    assert (DynamicManager(mailer).workers, DynamicManager(mailer).divisor,
            DynamicManager(mailer).timeout) == (10, 10, 60.0)
    assert FuturesManager(mailer).workers == 1


def test_bad_manager_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown manager 'threads'"):
        Mailer("memory://", manager="threads")
    with pytest.raises(TypeError, match="futures manager: .*divisor"):
        Mailer("memory://", manager={"use": "futures", "divisor": 3})
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        Mailer("memory://", manager={"use": "futures", "workers": 0})
    with pytest.raises(ValueError, match="pipeline"):
        Mailer("memory://", manager={"use": "immediate", "pipeline": 0})
    with pytest.raises(ValueError, match="timeout"):
        Mailer("memory://", manager={"use": "dynamic", "timeout": -1})
    with pytest.raises(ValueError, match="transactional"):
        Mailer("memory://", manager="futures", transactional=True)
    with pytest.raises(TypeError, match="manager must be"):
        Mailer("memory://", manager=3)  # type: ignore[arg-type]


# -- immediate ---------------------------------------------------------------------


def test_immediate_delivers_in_the_calling_thread():
    events = []
    mailer = Mailer("memory://", manager="immediate",
                    observers=[lambda e: events.append((e, threading.get_ident()))])
    mid = mailer.send(message(1))
    assert isinstance(mid, str)
    assert [m.recipients for m in mailer.delivery.outbox] == [["r1@dest.test"]]
    assert [(type(e), t) for e, t in events] == [(MailDelivered, threading.get_ident())]
    future = mailer.submit(message(2))
    assert future.done() and future.result() == mailer.delivery.outbox[1].message_id


def test_immediate_raises_what_the_delivery_raises():
    mailer = Mailer("mock://?success=0", manager="immediate")
    with pytest.raises(DeliveryError, match="bounced"):
        mailer.send(message())
    future = mailer.submit(message())
    assert isinstance(future.exception(), DeliveryError)


def test_without_a_manager_submit_gives_a_done_future_for_a_synchronous_delivery():
    mailer = Mailer("memory://")
    future = mailer.submit(message())
    assert future.done() and future.result() == mailer.delivery.outbox[0].message_id
    failing = Mailer("mock://?success=0").submit(message())
    assert isinstance(failing.exception(), DeliveryError)


# -- futures -----------------------------------------------------------------------


def test_futures_returns_futures_and_uses_at_most_workers_threads():
    threads: set[int] = set()
    lock = threading.Lock()

    def seen(event):
        with lock:
            threads.add(threading.get_ident())

    mailer = Mailer("memory://", manager={"use": "futures", "workers": 3}, observers=[seen])
    futures = [mailer.send(message(i)) for i in range(30)]
    assert all(isinstance(f, Future) for f in futures)
    ids = [f.result(10) for f in futures]
    mailer.stop()
    assert sorted(ids) == sorted(m.message_id for m in mailer.delivery.outbox)
    assert sorted(r for m in mailer.delivery.outbox for r in m.recipients) == sorted(
        f"r{i}@dest.test" for i in range(30))
    assert 1 <= len(threads) <= 3
    assert threading.get_ident() not in threads


def test_a_failure_is_the_futures_exception():
    mailer = Mailer("mock://?success=0", manager="futures")
    with pytest.raises(DeliveryError, match="bounced"):
        mailer.send(message()).result(10)
    mailer.stop()


def test_stop_sends_the_queued_mail_first():
    gate = threading.Event()
    outbox = MemoryDelivery()

    class Gated(MemoryDelivery):
        def send(self, *args, **kwargs):
            gate.wait(10)
            return outbox.send(*args, **kwargs)

    mailer = Mailer(Gated(), manager={"use": "futures", "workers": 1})
    futures = [mailer.send(message(i)) for i in range(5)]
    gate.set()
    mailer.stop(wait=True)
    assert all(f.done() for f in futures)
    assert len(outbox.outbox) == 5
    # a stopped manager starts again on the next message
    assert mailer.send(message(9)).result(10)
    mailer.stop()


def test_send_blocking_waits_for_the_managers_future():
    with Mailer("memory://", manager="futures") as mailer:
        mid = mailer.send_blocking(message())
        assert mid == mailer.delivery.outbox[0].message_id


# -- transports --------------------------------------------------------------------


def test_pipeline_exhausts_a_smtp_transport_after_n_messages(runner, sink):
    mailer = Mailer(smtp(runner, sink), manager={"use": "futures", "workers": 1,
                                                 "pipeline": 2})
    reports = [mailer.send(message(i)).result(20) for i in range(5)]
    assert all(isinstance(r, DeliveryReport) and r.all_delivered for r in reports)
    assert mailer.manager.pool.made == 3
    peers = [m["peer"] for m in sink.messages]
    assert len(peers) == 5
    # one connection per transport: two messages each, then a new one
    assert peers[0] == peers[1] != peers[2] == peers[3] != peers[4]
    mailer.stop()
    wait_for(lambda: sink.open_sessions == 0, what="every transport's connection closed")


def test_a_transport_is_kept_between_messages_without_pipeline(runner, sink):
    mailer = Mailer(smtp(runner, sink), manager="immediate")
    for i in range(3):
        assert mailer.send(message(i)).all_delivered
    assert mailer.manager.pool.made == 1
    assert len({m["peer"] for m in sink.messages}) == 1
    mailer.stop()
    wait_for(lambda: sink.open_sessions == 0, what="the connection closed at stop")


def test_workers_threads_use_at_most_workers_connections(runner, sink):
    mailer = Mailer(smtp(runner, sink), manager={"use": "futures", "workers": 3})
    futures = [mailer.send(message(i)) for i in range(15)]
    assert all(f.result(30).all_delivered for f in futures)
    assert sorted(r for m in sink.messages for r in m["rcpt_tos"]) == sorted(
        f"r{i}@dest.test" for i in range(15))
    assert sink.peak_sessions <= 3
    assert mailer.manager.pool.made <= 3
    mailer.stop()


def test_a_delivery_that_says_it_is_exhausted_is_replaced():
    mailer = Mailer("mock://?exhaustion=1", manager="immediate")
    events = []
    mailer.add_observer(events.append)
    ids = [mailer.send(message(i)) for i in range(3)]
    deliveries = mailer.manager.pool.deliveries
    assert len(deliveries) == 4  # the first, and a new one after each exhaustion
    assert all(d.exhausted for d in deliveries[:3]) and not deliveries[3].exhausted
    assert [m.message_id for d in deliveries for m in d.outbox] == ids
    assert [type(e) for e in events] == [MailDelivered] * 3


def test_a_failed_transport_is_replaced_and_the_message_tried_once_more():
    calls = []

    class FailsOnce(MemoryDelivery):
        def send(self, sender, recipients, message, *, message_id=None):
            calls.append(message_id)
            if len(calls) == 1:
                from twisted_mailout.envelope import Reply

                raise DeliveryError(Reply(451, "4.3.0 try again", True), recipients)
            return super().send(sender, recipients, message, message_id=message_id)

    mailer = Mailer(FailsOnce(), manager="immediate")
    assert mailer.send(message()) == mailer.delivery.outbox[0].message_id
    assert len(calls) == 2 and mailer.manager.pool.made == 2

    always = Mailer("mock://?failure=1", manager={"use": "immediate", "transport_retries": 2})
    with pytest.raises(DeliveryError, match="deferred"):
        always.send(message())
    assert always.manager.pool.made == 3


def test_the_capture_outbox_bypasses_the_pool():
    from twisted_mailout.testing import capture_mail

    mailer = Mailer("mock://?success=0", manager="futures")
    with capture_mail() as outbox:
        assert mailer.send(message(1)).result(10)
    outbox.assert_sent(1, to="r1@dest.test")
    assert mailer.manager.pool.made == 0
    mailer.stop()


# -- the dynamic pool ----------------------------------------------------------------


def test_dynamic_threads_retire_after_divisor_messages():
    executor = ScalingExecutor(workers=1, divisor=2, timeout=30)
    names = [executor.submit(lambda: threading.current_thread().name).result(10)
             for _ in range(5)]
    executor.shutdown(wait=True)
    assert executor.started == 3
    assert names[0] == names[1] != names[2] == names[3] != names[4]


def test_dynamic_threads_retire_when_starved():
    executor = ScalingExecutor(workers=2, divisor=100, timeout=0.2)
    assert executor.submit(lambda: 1).result(10) == 1
    wait_for(lambda: executor.thread_count == 0, what="the idle thread retired")
    assert executor.started == 1
    assert executor.submit(lambda: 2).result(10) == 2  # a new thread for new work
    assert executor.started == 2
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(lambda: 3)


def test_dynamic_scales_up_to_workers():
    gate = threading.Event()
    executor = ScalingExecutor(workers=3, divisor=1, timeout=30)
    futures = [executor.submit(lambda i=i: gate.wait(10) and i) for i in range(9)]
    wait_for(lambda: executor.thread_count == 3, what="three threads for nine tasks")
    gate.set()
    assert [f.result(10) for f in futures] == list(range(9))
    assert executor.peak == 3
    executor.shutdown(wait=True)
    assert executor.thread_count == 0


def test_dynamic_manager_on_the_mailer(runner, sink):
    mailer = Mailer(smtp(runner, sink), manager={"use": "dynamic", "workers": 4,
                                                 "divisor": 2, "timeout": 5})
    futures = [mailer.send(message(i)) for i in range(12)]
    assert all(f.result(30).all_delivered for f in futures)
    assert len(sink.messages) == 12
    assert mailer.manager.executor.peak <= 4
    mailer.stop()
    assert mailer.manager.executor.thread_count == 0
