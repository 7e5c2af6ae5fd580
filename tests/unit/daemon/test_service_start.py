"""The delivery service's start (review F14): the lock names the process
that runs, and a failed start stops the service and releases the lock."""

import os

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from twisted_mailout.daemon.config import Config
from twisted_mailout.daemon.service import DeliveryService
from twisted_mailout.queue import Queue, QueueLocked


class Reactor(MemoryReactorClock):
    """A memory reactor with the thread pool accessor the service asks for
    (nothing is run in it here)."""

    def getThreadPool(self):
        return None


class StubScheduler:
    def __init__(self, start_result):
        self.start_result = start_result
        self.counts = {}
        self.stopped = False

    def start(self):
        return self.start_result

    def pickup(self):
        return defer.succeed(0)

    def stop(self, timeout):
        self.stopped = True
        return defer.succeed(None)


class StubAdmin:
    """Stands in for the service's QueueAdmin, whose start (loading the saved
    suspensions) would need the thread pool."""

    def start(self):
        return defer.succeed(0)


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def make_service(tmp_path, start_result, **kwargs):
    config = Config(queue=str(tmp_path / "q"), relay="127.0.0.1:2525", tls="none",
                    resolvers=("127.0.0.1:53",), poll_interval=60)
    service = DeliveryService(config, Reactor(), **kwargs)
    service.scheduler = StubScheduler(start_result)
    service.admin = StubAdmin()
    return service


def test_the_lock_names_the_process_that_starts_the_service(tmp_path):
    service = make_service(tmp_path, defer.succeed(0))
    lock = tmp_path / "q" / "lock"
    lock.write_text("1\n")  # as if written by twistd's parent before it daemonized
    service.startService()
    try:
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(QueueLocked):
            Queue(str(tmp_path / "q")).lock()
    finally:
        service.stopService()


def test_a_failed_start_is_logged_stops_the_service_and_releases_the_lock(tmp_path, logged):
    service = make_service(tmp_path, defer.fail(OSError(5, "Input/output error")))
    service.startService()
    assert not service.running
    assert service.scheduler.stopped
    assert not service.reactor.getDelayedCalls()  # no pickup poller left behind
    [line] = [formatEvent(e) for e in logged if "failed to start" in formatEvent(e)]
    assert "the service stops" in line
    assert any("Input/output error" in str(e.get("log_failure", "")) for e in logged)
    other = Queue(str(tmp_path / "q"))
    other.lock()  # released: a fixed daemon can start
    other.unlock()


def test_an_embedded_service_leaves_the_reactor_running_after_a_failed_start(tmp_path):
    service = make_service(tmp_path, defer.fail(OSError(5, "Input/output error")))
    service.startService()
    assert not service.running
    assert not service.reactor.hasStopped  # the application around it goes on


def test_the_daemon_stops_the_reactor_after_a_failed_start(tmp_path, logged):
    """twistd's service (makeService) ends the process when the queue cannot
    be recovered, after releasing the lock, instead of idling."""
    service = make_service(tmp_path, defer.fail(OSError(5, "Input/output error")),
                           stop_reactor_on_failure=True)
    service.startService()
    assert not service.running
    assert service.reactor.hasStopped
    assert any("stopping the process" in formatEvent(e) for e in logged)
    other = Queue(str(tmp_path / "q"))
    other.lock()
    other.unlock()


def test_make_service_is_the_daemon(tmp_path):
    from twisted_mailout.daemon.service import makeService

    config = Config(queue=str(tmp_path / "q"), relay="127.0.0.1:2525", tls="none",
                    resolvers=("127.0.0.1:53",))
    service = makeService(config, Reactor())
    try:
        assert service.stop_reactor_on_failure
    finally:
        service.queue.unlock()
