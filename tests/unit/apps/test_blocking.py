"""twisted_mailout.blocking: a reactor in a thread, send() with a timeout,
submit() returning concurrent.futures.Future.

These tests never start the global reactor (the fast lane runs trial tests
in the same process, on the main thread): each runs a private reactor in a
ReactorThread. tests/integration/test_blocking_threads.py covers the global
reactor (in child processes): started on first use, stopped at exit, used
when the program runs it, refused in its own thread.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from twisted.internet import defer, task
from twisted.internet.selectreactor import SelectReactor

import twisted_mailout.blocking
from twisted_mailout.apps import blocking
from twisted_mailout.apps.blocking import (
    ReactorStopped,
    ReactorThread,
    ReactorThreadError,
    runner_for,
)
from twisted_mailout.envelope import AddressError
from twisted_mailout.outcome import DeliveryReport, Status

from tests.support.wait import wait_for

MSG = b"From: a@origin.test\r\nTo: b@dest.test\r\nSubject: hello\r\n\r\nbody\r\n"


@pytest.fixture
def runner():
    r = ReactorThread(SelectReactor(), grace=5.0).start()
    yield r
    r.shutdown(wait=True)
    assert not r.reactor.running


class SilentServer:
    """A TCP listener that accepts connections and never says a word; tells
    when a client closed its connection (a positive signal of an abort)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.connected.set()
        with conn:
            try:
                while conn.recv(1024):
                    pass
            except ConnectionResetError:  # an abort resets the connection
                pass
        self.closed.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def test_the_documented_path_is_the_same_module():
    assert twisted_mailout.blocking is blocking


def test_send_delivers_and_waits_for_the_report(runner, sink):
    report = blocking.send("a@origin.test", ["b@dest.test"], MSG, reactor=runner.reactor,
                           relay=f"127.0.0.1:{sink.port}", tls="none", timeout=20, linger=0)
    assert isinstance(report, DeliveryReport)
    assert [(r.recipient, r.status, r.code) for r in report] == [
        ("b@dest.test", Status.DELIVERED, 250)]
    assert [m["rcpt_tos"] for m in sink.messages] == [["b@dest.test"]]


def test_a_refused_recipient_is_a_result_not_an_exception(runner, sink):
    sink.rcpt_reply = lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("x") else None
    report = blocking.send("a@origin.test", ["x@dest.test", "b@dest.test"], MSG,
                           reactor=runner.reactor, relay=f"127.0.0.1:{sink.port}", tls="none",
                           timeout=20, linger=0)
    assert [(r.recipient, r.status) for r in report] == [
        ("x@dest.test", Status.BOUNCED), ("b@dest.test", Status.DELIVERED)]


def test_bad_arguments_raise_and_send_nothing(runner, sink):
    with pytest.raises(AddressError):
        blocking.send("a@origin.test", ["not an address"], MSG, reactor=runner.reactor,
                      relay=f"127.0.0.1:{sink.port}", tls="none", timeout=20, linger=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        blocking.send("a@origin.test", ["b@dest.test"], MSG, reactor=runner.reactor,
                      relay=f"127.0.0.1:{sink.port}", no_such_setting=1)
    with pytest.raises(ValueError, match="timeout"):
        blocking.send("a@origin.test", ["b@dest.test"], MSG, reactor=runner.reactor,
                      timeout=0)
    assert sink.messages == []


def test_submit_returns_a_future_of_the_report(runner, sink):
    future = blocking.submit("a@origin.test", "b@dest.test", MSG, reactor=runner.reactor,
                             relay=f"127.0.0.1:{sink.port}", tls="none", linger=0)
    assert isinstance(future, Future)
    report = future.result(20)
    assert report.all_delivered
    assert len(sink.messages) == 1


def test_threads_sending_at_once_share_connections_and_each_message_arrives_once(
        runner, sink):
    n = 20

    def one(i: int) -> DeliveryReport:
        return blocking.send("a@origin.test", [f"r{i}@dest.test"], MSG, reactor=runner.reactor,
                             relay=f"127.0.0.1:{sink.port}", tls="none", timeout=30,
                             linger=0, connections=2)

    with ThreadPoolExecutor(n) as pool:
        reports = list(pool.map(one, range(n)))
    assert all(r.all_delivered for r in reports)
    received = sorted(r for m in sink.messages for r in m["rcpt_tos"])
    assert received == sorted(f"r{i}@dest.test" for i in range(n))
    assert sink.peak_sessions <= 2


def test_a_timeout_cancels_the_delivery_and_closes_its_connection(runner, silent):
    with pytest.raises(TimeoutError, match="cancelled"):
        blocking.send("a@origin.test", ["b@dest.test"], MSG, reactor=runner.reactor,
                      relay=f"127.0.0.1:{silent.port}", tls="none", timeout=0.5, linger=0)
    assert silent.closed.wait(10), "the client did not abort its connection"


def test_cancelling_the_future_aborts_the_delivery(runner, silent):
    future = blocking.submit("a@origin.test", ["b@dest.test"], MSG, reactor=runner.reactor,
                             relay=f"127.0.0.1:{silent.port}", tls="none", linger=0)
    assert silent.connected.wait(10)
    assert future.cancel()
    assert future.cancelled()
    assert silent.closed.wait(10), "the client did not abort its connection"


def test_call_runs_in_the_reactor_thread_and_waits_for_deferreds(runner):
    seen = []

    def in_reactor() -> defer.Deferred[str]:
        seen.append(threading.get_ident())
        return task.deferLater(runner.reactor, 0.01, lambda: "done")

    assert runner.call(in_reactor, timeout=10) == "done"
    assert seen and seen[0] != threading.get_ident()
    assert runner.call(lambda: 42) == 42

    async def coro() -> int:
        await task.deferLater(runner.reactor, 0.01, lambda: None)
        return 7

    assert runner.call(coro, timeout=10) == 7
    with pytest.raises(ZeroDivisionError):
        runner.call(lambda: 1 / 0)


def test_blocking_in_the_reactor_thread_is_refused(runner):
    def nested() -> int:
        assert runner.in_reactor_thread()
        result: int = runner.call(lambda: 1)
        return result

    with pytest.raises(ReactorThreadError, match="reactor thread"):
        runner.call(nested, timeout=10)
    assert not runner.in_reactor_thread()


def test_shutdown_waits_for_calls_in_flight_then_stops_them(silent):
    r = ReactorThread(SelectReactor(), grace=0.5).start()
    future = blocking.submit("a@origin.test", ["b@dest.test"], MSG, reactor=r.reactor,
                             relay=f"127.0.0.1:{silent.port}", tls="none", linger=0)
    assert silent.connected.wait(10)
    r.shutdown(wait=True)
    assert not r.reactor.running
    with pytest.raises(ReactorStopped):
        future.result(0)
    assert silent.closed.wait(10)
    with pytest.raises(ReactorStopped):
        r.submit(lambda: 1)
    with pytest.raises(ReactorStopped):
        r.start()


def test_a_reactor_that_ran_cannot_be_started_again():
    reactor = SelectReactor()
    reactor.callWhenRunning(reactor.stop)
    reactor._registerAsIOThread = False
    reactor.run(installSignalHandlers=False)
    with pytest.raises(ReactorThreadError, match="cannot be restarted"):
        ReactorThread(reactor).start()


def test_a_reactor_the_program_runs_is_used_and_left_running():
    reactor = SelectReactor()
    reactor._registerAsIOThread = False
    started = threading.Event()
    reactor.callWhenRunning(started.set)
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        r = ReactorThread(reactor).start()
        assert not r.owned
        assert r.call(threading.get_ident, timeout=10) == thread.ident
        r.shutdown(wait=True)
        assert reactor.running  # not ours to stop
        with pytest.raises(ReactorStopped):
            r.submit(lambda: 1)
    finally:
        reactor.callFromThread(reactor.stop)
        thread.join(10)
    assert not thread.is_alive()


def test_runner_for():
    reactor = SelectReactor()
    assert runner_for(reactor) is None  # nobody drives it: its owner uses Deferreds
    assert runner_for(task.Clock()) is None
    r = ReactorThread(reactor)
    assert runner_for(reactor) is r
    with pytest.raises(ValueError, match="has a ReactorThread already"):
        ReactorThread(reactor)
    assert runner_for(None) is blocking.reactor_thread()
    assert blocking.reactor_thread() is blocking.reactor_thread()
    with pytest.raises(ValueError, match="not driven by a ReactorThread"):
        blocking.submit("a@origin.test", ["b@dest.test"], MSG, reactor=task.Clock())


def test_the_executor_interface(runner):
    assert list(runner.map(lambda x: x * 2, [1, 2, 3], timeout=10)) == [2, 4, 6]
    assert wait_for(lambda: runner.running)
