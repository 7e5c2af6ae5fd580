"""Delivering now from programs without a reactor: a blocking and a futures API.

Django views, Flask handlers, Celery tasks and plain scripts run no Twisted
reactor. This module runs one for them in a background thread that the
library owns: started on first use, stopped at interpreter exit (after the
mail in flight is finished, for up to L{ReactorThread.grace} seconds, and the
idle connections are closed with QUIT)::

    from twisted_mailout import blocking

    report = blocking.send("me@example.com", ["you@example.org"], message,
                           relay="smtp://smtp.example.com:587", timeout=60)
    future = blocking.submit("me@example.com", ["you@example.org"], message,
                             relay="smtp://smtp.example.com:587")
    report = future.result()          # a concurrent.futures.Future

C{send} blocks for at most C{timeout} seconds; C{submit} returns a
C{concurrent.futures.Future} of the same L{DeliveryReport} at once. Both take
the settings of L{twisted_mailout.api.SMTPClient} (C{relay}, C{tls}, C{auth},
...) and share its connections: calls in flight at the same time with the same
settings, from any number of threads, go over one connection pool (see
L{twisted_mailout.api.default_clients}).

When the program already runs the global reactor in another thread (a Twisted
application serving WSGI, or a library that started crochet), that reactor is
used and never stopped by this module. A program that is about to start its
reactor in a thread of its own after the first mail calls L{attach} first.
Calling the blocking API from the reactor's own thread would wait for itself:
it raises L{ReactorThreadError} (Twisted code uses the Deferred API:
L{twisted_mailout.api.SMTPClient.send}, L{twisted_mailout.api.sendmail}).

Other modules build on L{ReactorThread}: L{twisted_mailout.apps.mailer.Mailer}
(C{send}, C{send_blocking}, C{submit}) waits through L{runner_for} when it is
not called in the reactor thread, so that every delivery URL, C{smtp://} and
C{smtps://} included, works from any thread; the Django backend and the
managers (L{twisted_mailout.apps.managers}) go through the mailer. For other
Twisted APIs, L{call} and L{submit_call} run any function in the reactor thread
(a Deferred or coroutine it returns is waited for).

Why not crochet, which exists for this job: see C{docs/design.md} ("Programs
without a reactor"). In short, the futures it gives are not
C{concurrent.futures.Future}s, it reroutes all Twisted logging at setup, and at
exit it stops the reactor without waiting for mail in flight; this module uses
Twisted's own C{callFromThread} (the primitive under C{blockingCallFromThread})
and cooperates with crochet when both are used: a reactor crochet started is
used as it is, and one started here is announced to crochet (C{no_setup}).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Executor, Future, InvalidStateError
from typing import Any, TypeVar

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure

from twisted_mailout import api
from twisted_mailout.api import DeliveryReport, SMTPClient, default_reactor

__all__ = [
    "DEFAULT_TIMEOUT",
    "ReactorStopped",
    "ReactorThread",
    "ReactorThreadError",
    "attach",
    "call",
    "drain_at_exit",
    "reactor_thread",
    "runner_for",
    "send",
    "submit",
    "submit_call",
    "waiting_runner",
]

T = TypeVar("T")

log = Logger()

#: Seconds C{send} and C{submit} wait by default for a delivery (every
#: network step is capped by the same number).
DEFAULT_TIMEOUT = 120.0

#: Seconds connections stay open after the last call in flight, for the next
#: one (C{linger} of L{twisted_mailout.api.sendmail}).
DEFAULT_LINGER = 5.0


class ReactorThreadError(RuntimeError):
    """A blocking call was made in the reactor's own thread (it would wait
    for itself), or the reactor cannot be run for this process (it ran and
    stopped, or it was started by the parent before a C{fork()})."""


class ReactorStopped(RuntimeError):
    """The reactor stopped (interpreter exit, or L{ReactorThread.shutdown})
    before the call finished, or a call was made after it stopped."""


def _all_runners() -> list[ReactorThread]:
    """Every runner: the global reactor's and those of private reactors."""
    with _runners_lock:
        runners = list(_runners.values())
        if _default is not None:
            runners.append(_default)
    return runners


def _after_fork_in_child() -> None:
    global _runners_lock
    _runners_lock = threading.Lock()  # another thread may have held it at fork()
    for runner in _all_runners():
        runner._forked = True
        runner._lock = threading.Lock()  # it may have been held by another thread


#: reactor -> the L{ReactorThread} that drives it for other threads.
_runners: weakref.WeakKeyDictionary[Any, ReactorThread] = weakref.WeakKeyDictionary()
_runners_lock = threading.Lock()
os.register_at_fork(after_in_child=_after_fork_in_child)


#: Objects with C{shutdown(wait=True)} (the mailers' managers) to drain at
#: exit before the reactors stop, so that the mail they hold is sent.
_drains: weakref.WeakSet[Any] = weakref.WeakSet()


def drain_at_exit(obj: Any) -> None:
    """Have C{obj.shutdown(wait=True)} called when the main thread has
    finished, before the reactor threads of this module stop: a pool of
    threads that send through the reactor (a manager of
    L{twisted_mailout.apps.managers}) finishes its work first. Kept by a
    weak reference.

    @param obj: an object with C{shutdown(wait: bool)}.
    """
    _drains.add(obj)


def _at_exit() -> None:
    """The main thread finished: drain the managers, then stop the reactors
    this module runs (each waits up to its C{grace} for calls in flight)."""
    for obj in list(_drains):
        try:
            obj.shutdown(wait=True)
        except Exception:  # noqa: BLE001 - exit goes on
            log.failure("shutting down {obj!r} at exit", obj=obj)
    for runner in _all_runners():
        if runner.owned and not runner._stopped:
            runner.shutdown(wait=True)


def _register_exit(hook: Callable[[], None]) -> None:
    """Run C{hook} when the main thread has finished, before the interpreter
    waits for the other non-daemon threads: the reactor's thread pool has
    such threads, and they end only when the reactor stops. (This is how
    C{concurrent.futures} stops its workers; C{atexit} would run too late.)
    Registered at import, so that it runs after the hooks of thread pools
    made later (C{concurrent.futures} runs the last registered first)."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - CPython has had it since 3.9
        atexit.register(hook)
        return
    register(hook)


_register_exit(_at_exit)


class ReactorThread(Executor):
    """Runs a reactor for the other threads of a program: in a thread of its
    own (started by L{start}), or the program's when it already runs. An
    executor (C{concurrent.futures.Executor}): L{submit} runs a function in
    the reactor thread and gives a C{Future} of its result, waiting for a
    Deferred or coroutine it returns.

    There is one per reactor: L{reactor_thread} for the global reactor (the
    one every module here uses by default), and one made by hand for a
    private reactor (tests)::

        runner = ReactorThread(SelectReactor())
        runner.start()
        report = runner.call(client.send, sender, recipients, message, timeout=30)
        runner.shutdown()

    @param reactor: the reactor; the global one when L{None}.
    @param grace: seconds the reactor's shutdown waits for calls in flight
        (C{send}s, mostly) before cancelling them.
    @raise ValueError: this reactor has a runner already (see L{runner_for}).
    """

    def __init__(self, reactor: Any = None, *, grace: float = 30.0) -> None:
        self._reactor = reactor
        self.grace = grace
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._owned = False
        self._started = False
        self._stopping = False  # set in the reactor thread when its shutdown begins
        self._closed = False  # set by shutdown(): no new calls
        self._stopped = False
        self._forked = False
        self._pending: set[defer.Deferred[Any]] = set()  # touched in the reactor thread only
        if reactor is not None:
            with _runners_lock:
                if reactor in _runners:
                    raise ValueError(f"{reactor!r} has a ReactorThread already: use "
                                     "runner_for(reactor)")
                _runners[reactor] = self

    def __repr__(self) -> str:
        state = ("stopped" if self._stopped else "owned" if self._owned
                 else "attached" if self._started else "not started")
        return f"<ReactorThread {state} {self.reactor!r}>"

    @property
    def reactor(self) -> Any:
        """The reactor this runs (the global one when made with L{None})."""
        return default_reactor(self._reactor)

    @property
    def owned(self) -> bool:
        """Whether the reactor runs in a thread this object started (and so
        stops); C{False} for a reactor the program runs itself."""
        return self._owned

    @property
    def running(self) -> bool:
        """Whether calls can be made now: started and not stopped."""
        return self._started and not (self._stopped or self._stopping or self._closed)

    def in_reactor_thread(self) -> bool:
        """Whether the calling thread is the one running this reactor.

        @return: C{True} in the reactor's thread (for the global reactor,
            also the thread Twisted registered as its I/O thread).
        """
        if self._ident is not None and threading.get_ident() == self._ident:
            return True
        return self._reactor is None and threadable.isInIOThread()

    def start(self) -> ReactorThread:
        """Make the reactor run for other threads, if it does not yet: use it
        when it already runs (in a thread of the program), else run it in a
        daemon thread of this object's (signal handlers not installed), which
        is stopped when the main thread finishes. Idempotent and thread-safe.

        @return: C{self}.
        @raise ReactorThreadError: the reactor ran before and stopped (a
            reactor cannot be restarted), or it was started by the parent
            process of this C{fork()}ed child (start it after forking: in a
            pre-forking server, in each worker), or it did not start within
            30 s.
        @raise ReactorStopped: L{shutdown} was called.
        """
        with self._lock:
            if self._forked:
                raise ReactorThreadError(
                    "the reactor thread was started before this process was forked; it "
                    "does not run in the child: send only after the fork (in each worker)")
            if self._stopped or self._stopping or self._closed:
                raise ReactorStopped("the reactor of this ReactorThread has stopped")
            if self._started:
                return self
            reactor = self.reactor
            if reactor.running:
                self._attach(reactor)
            elif getattr(reactor, "_startedBefore", False):
                raise ReactorThreadError(
                    f"{reactor!r} ran and stopped; a Twisted reactor cannot be restarted")
            else:
                self._run_in_thread(reactor)
            self._started = True
        return self

    def _attach(self, reactor: Any) -> None:
        """Use a reactor that runs in another thread: learn its thread and
        hook its shutdown."""
        if self.in_reactor_thread():
            raise ReactorThreadError("start() was called in the reactor thread; the blocking "
                                     "API is for the program's other threads")
        learned = threading.Event()

        def hook() -> None:
            self._ident = threading.get_ident()
            reactor.addSystemEventTrigger("before", "shutdown", self._before_shutdown)
            learned.set()

        reactor.callFromThread(hook)
        if not learned.wait(30.0):
            raise ReactorThreadError(f"{reactor!r} is running but did not answer in 30 s")

    def _run_in_thread(self, reactor: Any) -> None:
        ready = threading.Event()

        def running() -> None:
            self._ident = threading.get_ident()
            if self._reactor is None:
                _announce_to_crochet()
            ready.set()

        if self._reactor is not None:
            # a private reactor must not make its thread Twisted's I/O thread:
            # the global reactor's code asks threadable.isInIOThread()
            reactor._registerAsIOThread = False
        reactor.callWhenRunning(running)
        reactor.addSystemEventTrigger("before", "shutdown", self._before_shutdown)
        thread = threading.Thread(target=self._run, args=(reactor,),
                                  name="twisted_mailout reactor", daemon=True)
        self._thread = thread
        self._owned = True
        thread.start()
        if not ready.wait(30.0):
            raise ReactorThreadError(f"{reactor!r} did not start in 30 s")

    def _run(self, reactor: Any) -> None:
        try:
            reactor.run(installSignalHandlers=False)
        finally:
            self._stopped = True

    def _before_shutdown(self) -> defer.Deferred[None] | None:
        """The reactor is stopping: no new calls; wait up to L{grace} seconds
        for those in flight, cancel the rest, and close idle connections."""
        self._stopping = True
        reactor = self.reactor
        pending = list(self._pending)

        def close_idle(_: Any) -> Any:
            for d in list(self._pending):
                d.cancel()
            # one more turn, so that the aborted connections are closed
            # (an abort closes the socket in a delayed call)
            turn: defer.Deferred[Any] = task.deferLater(reactor, 0, lambda: None)
            if self._reactor is None:
                turn.addCallback(lambda _: api.close_connections())
            return turn

        if not pending:
            return defer.maybeDeferred(close_idle, None)
        waiting: defer.Deferred[Any] = defer.DeferredList(pending, consumeErrors=True)
        waiting.addTimeout(self.grace, reactor)
        waiting.addErrback(lambda f: f.trap(defer.TimeoutError, defer.CancelledError))
        return waiting.addCallback(close_idle).addCallback(lambda _: None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls. A reactor this object runs is stopped (after
        the calls in flight finish, for up to L{grace} seconds; see
        L{owned}); the program's own reactor is left running.

        @param wait: wait for the reactor thread to end (up to C{grace + 10}
            seconds).
        @param cancel_futures: accepted for C{Executor}'s signature; calls in
            flight are cancelled at the end of the grace time either way.
        """
        with self._lock:
            if not self._started or self._stopped:
                self._stopped = True
                return
            self._closed = True
            if not self._owned:
                return
            thread = self._thread
        reactor = self.reactor
        if thread is not None and thread.is_alive():
            if reactor.running:
                reactor.callFromThread(reactor.stop)
            if wait and threading.current_thread() is not thread:
                thread.join(self.grace + 10.0)

    def _check(self) -> None:
        if self.in_reactor_thread():
            raise ReactorThreadError(
                "a blocking send (or another call through the reactor thread) was made in the "
                "reactor thread itself, which would wait for itself: in Twisted code use the "
                "Deferred API (Mailer.send, SMTPClient.send, sendmail)")
        self.start()
        if self._stopping or self._stopped or self._closed:
            raise ReactorStopped("the reactor has stopped; no mail can be sent through it")

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Call C{fn(*args, **kwargs)} in the reactor thread (starting it if
        needed) and return a C{Future} of its result: a Deferred (or
        coroutine) it returns is waited for, and its failure is the future's
        exception. The future stays pending until then, so C{cancel()} works
        until the result is in: it cancels the Deferred (a delivery aborts
        its sessions; whether a server took the message is then unknown).

        @return: a C{concurrent.futures.Future}; it fails with
            L{ReactorStopped} when the reactor stops first.
        @raise ReactorThreadError: called in the reactor thread, or the
            reactor cannot run (see L{start}).
        @raise ReactorStopped: the reactor has stopped.
        """
        self._check()
        future: Future[Any] = Future()
        reactor = self.reactor

        def run() -> None:
            if future.cancelled():
                return
            if self._stopping:
                _settle(future, Failure(ReactorStopped("the reactor is stopping")))
                return
            d = defer.maybeDeferred(fn, *args, **kwargs)
            self._pending.add(d)

            def settle(result: Any) -> None:
                self._pending.discard(d)
                if (self._stopping and isinstance(result, Failure)
                        and result.check(defer.CancelledError) and not future.cancelled()):
                    result = Failure(ReactorStopped(
                        "the reactor stopped before the call finished (it was cancelled)"))
                _settle(future, result)

            d.addBoth(settle)

            def cancelled(f: Future[Any]) -> None:
                if f.cancelled() and not d.called:
                    reactor.callFromThread(d.cancel)

            future.add_done_callback(cancelled)

        reactor.callFromThread(run)
        return future

    def call(self, fn: Callable[..., T], /, *args: Any, timeout: float | None = None,
             **kwargs: Any) -> Any:
        """L{submit} and wait for the result (C{blockingCallFromThread} with
        a timeout).

        @param timeout: seconds to wait; L{None} waits as long as it takes.
            At the timeout the call is cancelled (its Deferred is).
        @return: the result (a Deferred's result).
        @raise TimeoutError: no result in C{timeout} seconds.
        @raise ReactorThreadError, ReactorStopped: see L{submit}.
        @raise Exception: what C{fn} raised or its Deferred failed with.
        """
        future = self.submit(fn, *args, **kwargs)
        return _wait(future, timeout)


def _wait(future: Future[T], timeout: float | None) -> T:
    """C{future.result(timeout)}, cancelling it at the timeout."""
    try:
        return future.result(timeout)
    except TimeoutError:
        if future.cancel():
            raise TimeoutError(f"no result in {timeout} s: the call was cancelled") from None
        return future.result()  # it finished meanwhile


def _settle(future: Future[Any], result: Any) -> None:
    """Give a Future the result or failure of a Deferred (in the reactor
    thread); a cancelled future keeps its cancellation."""
    if future.cancelled():
        return
    try:
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                error: BaseException = FutureCancelled("the call was cancelled")
            else:
                error = result.value
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by its owner meanwhile
        pass


def _announce_to_crochet() -> None:
    """Tell crochet, when it is installed and not set up, that the global
    reactor runs already: a library using crochet then shares this thread
    instead of trying to run the reactor a second time."""
    try:
        import crochet
    except ImportError:
        return
    try:
        crochet.no_setup()
    except RuntimeError:  # crochet was set up already (then it runs the reactor)
        pass


_default: ReactorThread | None = None


def reactor_thread() -> ReactorThread:
    """The L{ReactorThread} of the global reactor (made, not started, on
    first use; L{ReactorThread.start} runs or attaches it).

    @return: the one runner of the global reactor.
    """
    global _default
    with _runners_lock:
        if _default is None:
            _default = ReactorThread()
        return _default


def _twisted_main_before_run() -> bool:
    """Whether this is the main thread of a Twisted program that has not run
    its reactor yet: the global reactor is installed (imported) but no
    reactor ever ran. Such a program runs it in this thread later (trial
    calls a test method before it runs the reactor), so waiting here through
    a thread of this module's would take the reactor away from it."""
    return (threadable.ioThread is None
            and threading.current_thread() is threading.main_thread()
            and "twisted.internet.reactor" in sys.modules)


def waiting_runner(reactor: Any = None) -> ReactorThread | None:
    """The L{ReactorThread} through which the calling thread waits for work
    on C{reactor}, or L{None} when the caller must use Deferreds instead:

    - this is the reactor's thread;
    - C{reactor} is driven by nobody but its owner (a test's fake or memory
      reactor: L{runner_for} gives L{None});
    - the global reactor, in the main thread of a Twisted program that has
      installed it and not run it yet (it will run it here).

    A program that never imported C{twisted.internet.reactor} (a script, a
    Django or Flask application) waits through the global reactor's runner,
    in any thread; so does every thread but the reactor's in a program whose
    reactor runs.

    @param reactor: a reactor, or L{None} for the global one.
    @return: the runner, or L{None}.
    """
    runner = runner_for(reactor)
    if runner is None or runner.in_reactor_thread():
        return None
    if runner._reactor is None and not runner._started and _twisted_main_before_run():
        return None
    return runner


def runner_for(reactor: Any = None) -> ReactorThread | None:
    """The L{ReactorThread} that drives C{reactor} for other threads: the
    global reactor's (L{reactor_thread}), or the one made for a private
    reactor; L{None} for a reactor no runner drives (a test's fake or
    memory reactor, driven by the test itself, where Deferreds are used).

    @param reactor: a reactor, or L{None} for the global one.
    @return: the runner, or L{None}.
    """
    if reactor is None or reactor is sys.modules.get("twisted.internet.reactor"):
        return reactor_thread()
    with _runners_lock:
        return _runners.get(reactor)


def attach() -> ReactorThread:
    """Tell this module that the program runs the global reactor itself, in
    a thread of its own that may not have started yet: calls made before it
    runs wait for it (within their timeouts) instead of starting it here.
    Call it before the first send; a reactor that already runs is found
    without it.

    @return: the global reactor's runner.
    @raise ReactorThreadError: called in the reactor thread.
    """
    runner = reactor_thread()
    with runner._lock:
        if not runner._started:
            reactor = runner.reactor
            if reactor.running:
                runner._attach(reactor)
            else:
                # the program will run it: learn its thread when it does
                def running() -> None:
                    runner._ident = threading.get_ident()

                reactor.callWhenRunning(running)
                reactor.addSystemEventTrigger("before", "shutdown", runner._before_shutdown)
            runner._started = True
    return runner


def call(fn: Callable[..., Any], /, *args: Any, timeout: float | None = None,
         **kwargs: Any) -> Any:
    """Call C{fn} in the global reactor's thread (started on first use) and
    wait for its result (see L{ReactorThread.call}).

    @param timeout: seconds to wait, then cancel; L{None}: no limit.
    @return: the result, a Deferred's or coroutine's result waited for.
    @raise TimeoutError: no result in C{timeout} seconds.
    @raise ReactorThreadError: called in the reactor thread.
    @raise ReactorStopped: the reactor stopped.
    """
    return reactor_thread().call(fn, *args, timeout=timeout, **kwargs)


def submit_call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
    """Call C{fn} in the global reactor's thread and return a C{Future} of
    its result (see L{ReactorThread.submit}).

    @raise ReactorThreadError: called in the reactor thread.
    """
    return reactor_thread().submit(fn, *args, **kwargs)


def _runner(reactor: Any) -> ReactorThread:
    runner = runner_for(reactor)
    if runner is None:
        raise ValueError(f"{reactor!r} is not driven by a ReactorThread: make one "
                         "(ReactorThread(reactor).start()) or use the global reactor")
    return runner


def submit(sender: str | None, recipients: str | Iterable[str], message: bytes | str | Any,
           *, timeout: float = DEFAULT_TIMEOUT, client: SMTPClient | None = None,
           reactor: Any = None, linger: float = DEFAULT_LINGER,
           **settings: Any) -> Future[DeliveryReport]:
    """Deliver a message now, from any thread but the reactor's, and return
    at once a C{concurrent.futures.Future} of its L{DeliveryReport} (one
    L{RecipientResult<twisted_mailout.outcome.RecipientResult>} per
    recipient, in order). The reactor thread starts on first use.

    @param sender: the envelope sender (RFC 5321 C{MAIL FROM}); C{""} or
        L{None} for the null sender.
    @param recipients: the envelope recipients (a C{str} is one).
    @param message: C{bytes}, C{str} or C{email.message.Message};
        Message-ID and Date added when missing.
    @param timeout: seconds after which the delivery is cancelled (its
        sessions aborted; the future fails with C{TimeoutError}); also the
        cap on each network step. A message a server took before that is
        not taken back: a timeout means "not known".
    @param client: an L{SMTPClient} (its reactor driven by a
        L{ReactorThread}) to send with instead of the shared clients; the
        C{settings} are then not allowed.
    @param reactor: the reactor of the shared clients; the global one when
        L{None} (another one needs a L{ReactorThread} of its own).
    @param linger: seconds a shared client keeps its idle connections after
        the last call in flight, for the next call.
    @param settings: the keyword arguments of L{SMTPClient} (C{relay},
        C{tls}, C{cafile}, C{auth}, C{helo}, C{resolver}, C{mx_port},
        C{connections}, C{dkim}, ...), as for L{twisted_mailout.api.sendmail};
        C{timeout} is the one above.
    @return: a C{Future}; its result is the L{DeliveryReport} (a refused or
        unreachable recipient is a result, not an exception). It fails with
        C{TimeoutError}, L{ReactorStopped}, or for bad arguments
        (L{AddressError<twisted_mailout.errors.AddressError>},
        C{MessageError}, C{ValueError}).
    @raise ReactorThreadError: called in the reactor thread (it would wait
        for itself), or the reactor cannot run (see L{ReactorThread.start}).
    @raise TypeError: a keyword that is not a setting, or settings with
        C{client}.
    @raise ValueError: C{timeout} not positive, or a reactor no runner drives.
    """
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if client is not None:
        if settings:
            raise TypeError(f"settings given with client=: {', '.join(sorted(settings))}")
        runner = _runner(client.reactor)
        the_client = client

        def start() -> defer.Deferred[DeliveryReport]:
            return the_client.send(sender, recipients, message)
    else:
        runner = _runner(reactor)
        settings["timeout"] = float(timeout)
        send_reactor = runner.reactor

        def start() -> defer.Deferred[DeliveryReport]:
            return api.sendmail(sender, recipients, message, reactor=send_reactor,
                                linger=linger, **settings)

    def deliver() -> defer.Deferred[DeliveryReport]:
        d = start()
        d.addTimeout(timeout, runner.reactor)

        def timed_out(f: Failure) -> Failure:
            if f.check(defer.TimeoutError):
                return Failure(TimeoutError(f"no report in {timeout} s: the delivery was "
                                            "cancelled"))
            return f

        return d.addErrback(timed_out)

    return runner.submit(deliver)


def send(sender: str | None, recipients: str | Iterable[str], message: bytes | str | Any,
         *, timeout: float = DEFAULT_TIMEOUT, client: SMTPClient | None = None,
         reactor: Any = None, linger: float = DEFAULT_LINGER,
         **settings: Any) -> DeliveryReport:
    """Deliver a message now and wait for the report: L{submit}, then its
    result, in at most C{timeout} seconds (plus a moment for the reactor to
    answer).

    @return: the L{DeliveryReport}.
    @raise TimeoutError: no report in C{timeout} seconds (the delivery was
        cancelled; a server may have taken the message).
    @raise ReactorThreadError: called in the reactor thread.
    @raise ReactorStopped: the reactor stopped first.
    @raise AddressError, MessageError, ValueError, TypeError: bad arguments;
        nothing sent.
    """
    future = submit(sender, recipients, message, timeout=timeout, client=client,
                    reactor=reactor, linger=linger, **settings)
    return _wait(future, timeout + 10.0)
