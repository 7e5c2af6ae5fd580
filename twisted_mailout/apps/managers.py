"""marrow.mailer's delivery managers for L{Mailer<twisted_mailout.apps.mailer.Mailer>}:
C{immediate}, C{futures} and C{dynamic}.

A manager decides which thread hands a message to the delivery, and over
which I{transport}: one use of the delivery by one thread at a time, kept for
the next message (marrow.mailer's C{TransportPool}). Chosen with
C{Mailer(delivery, manager=...)}, by name or with marrow.mailer's
configuration dict::

    mailer = Mailer("smtp://smtp.example.com:587", manager="futures")
    mailer = Mailer("smtp://smtp.example.com:587",
                    manager={"use": "dynamic", "workers": 10, "divisor": 10, "timeout": 60})
    future = mailer.send(message)        # futures, dynamic: a concurrent.futures.Future
    report = future.result()

- C{immediate}: C{Mailer.send} returns the result, delivered in the
  calling thread.
- C{futures}: C{send} returns a C{Future}; C{workers=1}: the threads (and
  so transports) at most.
- C{dynamic}: C{send} returns a C{Future}; C{workers=10}: threads at most;
  C{divisor=10}: one thread per C{divisor} queued messages, and a thread
  retires after C{divisor} messages (exhaustion); C{timeout=60}: seconds a
  thread waits for work before it retires (starvation).
- Every manager: C{pipeline} (messages per transport), C{transport_retries}
  and C{transport} (below).

The result (of C{send}, or of the future) is what the mailer's C{send} gives
without a manager: the message id for a synchronous delivery, the
L{DeliveryReport} for a direct one (C{smtp://}, C{smtps://}, the HTTP APIs),
waited for through L{twisted_mailout.apps.blocking} (the reactor thread is
started on first use). A failure is the future's exception
(C{DeliveryError}, C{AddressError}, ...). C{Mailer.submit} gives a C{Future}
with every manager (done at once with C{immediate}).

Transports:

- C{smtp://} and C{smtps://}: each transport has an L{SMTPClient} of its
  own with one connection, kept open between messages (QUIT after
  L{IDLE_TIMEOUT} seconds idle); C{workers} threads use at most C{workers}
  connections, as with marrow.mailer's SMTP transport.
- Every other delivery (files, the queue, C{mock://}, ...) is one object
  shared by the transports (they hold no connection).
- C{pipeline=N} (marrow.mailer's SMTP transport option; here for every
  delivery): a transport is I{exhausted} after N messages: it is shut down
  (its connection closed) and the next message gets a new one. L{None} (the
  default): used until it fails. (marrow.mailer's SMTP default, one
  connection per message, is C{pipeline=1}.)
- A delivery that raises L{TransportExhausted} (C{mock://}) took the message
  and is replaced by a new instance (made from its URL, or by C{transport=}).
- A transport that fails (a synchronous delivery's L{DeliveryError} with
  status C{deferred}, or a direct report in which every recipient is deferred
  by a local reply: no server answered) is shut down and the message is tried
  once more on a new transport (marrow.mailer's C{TransportFailedException};
  marrow.mailer tries again without end, here C{transport_retries} times, 1 by
  default). A message's own C{retries} (the builder's) are tried first, on
  the same transport.
- C{transport=CALLABLE} (any manager): make each new transport's delivery
  with it (C{CALLABLE() -> Delivery}) instead.

The managers' threads are stopped by C{Mailer.stop()}, and at interpreter exit
after their queued mail is sent (before the reactor thread of
L{twisted_mailout.apps.blocking} stops, see
L{blocking.drain_at_exit<twisted_mailout.apps.blocking.drain_at_exit>}).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from twisted_mailout.api import SMTPClient
from twisted_mailout.apps import blocking
from twisted_mailout.apps.base import Delivery
from twisted_mailout.apps.blocking import ReactorThread, ReactorThreadError
from twisted_mailout.apps.deliveries import SMTPDelivery, get_delivery
from twisted_mailout.apps.mock import TransportExhausted
from twisted_mailout.errors import DeliveryError
from twisted_mailout.outcome import DeliveryReport, Status

__all__ = [
    "IDLE_TIMEOUT",
    "MANAGERS",
    "DynamicManager",
    "FuturesManager",
    "ImmediateManager",
    "Job",
    "Manager",
    "ScalingExecutor",
    "Transport",
    "TransportExhausted",
    "TransportPool",
    "deliver_now",
    "make_manager",
    "waiting_runner",
]

log = Logger()

#: Seconds a transport's idle SMTP connection is kept open for its next message.
IDLE_TIMEOUT = 60.0


class MailerLike(Protocol):
    """What a manager needs of a L{Mailer<twisted_mailout.apps.mailer.Mailer>}
    (the mailer imports this module, not the other way round)."""

    delivery: Delivery

    def deliver(self, delivery: Delivery, sender: str, recipients: list[str], data: bytes,
                message_id: str | None = None,
                retries: int = 0) -> str | defer.Deferred[DeliveryReport]:
        """Hand a prepared message to C{delivery} now; see the mailer."""

    def notify_accepted(self, delivery: Delivery, mid: str, sender: str,
                        recipients: list[str], attempts: int = 1) -> None:
        """Report a message a synchronous delivery took; see the mailer."""


@dataclass(frozen=True)
class Job:
    """One prepared message for a manager.

    @ivar delivery: the delivery to use: the mailer's (then a transport of the
        pool is used) or another one (the test outbox of C{capture_mail}),
        used as it is.
    @ivar sender: the envelope sender.
    @ivar recipients: the envelope recipients.
    @ivar data: the message bytes, Bcc removed.
    @ivar retries: the message's own C{retries}.
    """

    delivery: Delivery
    sender: str
    recipients: list[str]
    data: bytes
    retries: int = 0


def waiting_runner(delivery: Delivery) -> ReactorThread | None:
    """The L{ReactorThread} through which the calling thread waits for a
    direct delivery, or L{None} when it must use the Deferred (see
    L{blocking.waiting_runner<twisted_mailout.apps.blocking.waiting_runner>}).

    @param delivery: an asynchronous delivery (its C{reactor} attribute, the
        global reactor when absent or L{None}).
    @return: the runner, or L{None}.
    """
    return blocking.waiting_runner(getattr(delivery, "reactor", None))


def deliver_now(mailer: MailerLike, delivery: Delivery, sender: str, recipients: list[str],
                data: bytes, retries: int = 0,
                message_id: str | None = None) -> str | DeliveryReport:
    """Hand a prepared message to C{delivery} through C{mailer.deliver} (so
    signing, retries and observers apply) and wait for the outcome: a
    synchronous delivery in this thread, a direct one in the reactor thread
    (L{twisted_mailout.apps.blocking}, started on first use).

    @return: the message id, or a direct delivery's L{DeliveryReport}.
    @raise ReactorThreadError: a direct delivery, called in the reactor
        thread (it would wait for itself: use C{Mailer.send}, which returns
        the Deferred there).
    @raise DeliveryError, AddressError, MessageError, QueueError: as
        C{mailer.deliver}.
    """
    if not delivery.asynchronous:
        result = mailer.deliver(delivery, sender, recipients, data, message_id, retries=retries)
        assert isinstance(result, str)
        return result
    runner = waiting_runner(delivery)
    if runner is None:
        raise ReactorThreadError(
            f"{delivery.url()}: waiting for a direct delivery in the reactor thread (or with a "
            "reactor nobody runs for other threads) would wait for itself; use send(), "
            "which returns a Deferred there")
    report: DeliveryReport = runner.call(mailer.deliver, delivery, sender, recipients, data,
                                         message_id, retries=retries)
    return report


# -- transports ----------------------------------------------------------------


class Transport:
    """One use of a delivery by one thread at a time (marrow.mailer's
    transport instance).

    @ivar delivery: the delivery it sends with.
    @ivar client: its own L{SMTPClient} (an SMTP transport), else L{None}.
    @ivar sent: messages it took.
    @ivar ephemeral: shut it down after this use (exhausted or failed).
    """

    def __init__(self, delivery: Delivery, client: SMTPClient | None = None) -> None:
        """
        @param delivery: the delivery.
        @param client: its private client, closed at L{shutdown}.
        """
        self.delivery = delivery
        self.client = client
        self.sent = 0
        self.ephemeral = False

    def __repr__(self) -> str:
        return f"<Transport {self.delivery.url()} sent={self.sent}>"

    def shutdown(self) -> None:
        """Close its connection (QUIT), if it has one of its own; waits up
        to 30 s. Never raises."""
        client = self.client
        if client is None:
            return
        self.client = None
        runner = blocking.runner_for(client.reactor)
        try:
            if runner is not None and runner.running and not runner.in_reactor_thread():
                runner.call(client.close, timeout=30.0)
            else:
                client.reactor.callFromThread(client.close)
        except Exception:  # noqa: BLE001 - a transport that cannot QUIT is dropped
            log.failure("closing {transport!r}", transport=self)


def smtp_transport(delivery: SMTPDelivery) -> Transport:
    """A transport for an C{smtp://}/C{smtps://} delivery: a copy of it with
    an L{SMTPClient} of its own (one connection, kept L{IDLE_TIMEOUT} seconds
    idle), so that each transport is one connection; a delivery made with
    C{client=} is shared as it is.

    @param delivery: the mailer's SMTP delivery.
    @return: a new L{Transport}.
    """
    if delivery.client is not None:
        return Transport(delivery)
    kwargs: dict[str, Any] = {"relay": delivery.relay, "tls": delivery.tls,
                              "cafile": delivery.cafile, "timeout": delivery.timeout,
                              "connections": 1, "idle_timeout": IDLE_TIMEOUT,
                              "dkim": delivery.signer}
    auth = getattr(delivery, "_auth", None)
    if auth is not None:
        kwargs["auth"] = auth
    if delivery.helo:
        kwargs["helo"] = delivery.helo
    if delivery.resolver:
        kwargs["resolver"] = delivery.resolver
    if delivery.relay is None:
        kwargs["mx_port"] = delivery.mx_port
    # made in this (worker) thread: it reads files (cafile, resolv.conf), and
    # touches the reactor only when it sends
    client = SMTPClient(delivery.reactor, **kwargs)
    copy = SMTPDelivery(client=client)
    copy.scheme = delivery.scheme
    copy.tls = delivery.tls
    return Transport(copy, client)


class TransportPool:
    """The transports of a manager: a thread takes one (or makes one) for a
    message and gives it back (marrow.mailer's C{TransportPool}).

    @param mailer: the mailer (its C{delivery} is the template).
    @param pipeline: messages per transport before it is exhausted and
        replaced; L{None}: no limit.
    @param factory: C{factory() -> Delivery} for each new transport's
        delivery, instead of the defaults (see the module docstring).
    @ivar made: how many transports were made (C{int}).
    @ivar deliveries: the shared deliveries used so far, in order (a
        C{mock://} delivery is replaced when exhausted), for tests.
    """

    def __init__(self, mailer: MailerLike, pipeline: int | None = None,
                 factory: Callable[[], Delivery] | None = None) -> None:
        if pipeline is not None and (isinstance(pipeline, bool) or int(pipeline) < 1):
            raise ValueError(f"pipeline must be a positive number of messages, not {pipeline!r}")
        self.mailer = mailer
        self.pipeline = int(pipeline) if pipeline is not None else None
        self.factory = factory
        self._idle: queue.SimpleQueue[Transport] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.made = 0
        self.deliveries: list[Delivery] = [mailer.delivery]

    def _make(self) -> Transport:
        with self._lock:
            self.made += 1
            shared = self.deliveries[-1]
        if self.factory is not None:
            delivery = self.factory()
            if isinstance(delivery, SMTPDelivery):
                return smtp_transport(delivery)
            return Transport(delivery)
        if isinstance(shared, SMTPDelivery):
            return smtp_transport(shared)
        return Transport(shared)

    def replace_shared(self, exhausted: Delivery) -> None:
        """A shared delivery said it is exhausted (L{TransportExhausted}):
        later transports use a new one, made from its URL (or by the
        factory).

        @param exhausted: the delivery that raised it.
        """
        with self._lock:
            if self.deliveries[-1] is exhausted and self.factory is None:
                self.deliveries.append(get_delivery(exhausted.url()))

    @contextmanager
    def lease(self) -> Iterator[Transport]:
        """A transport for one message: an idle one, else a new one. It goes
        back to the pool afterwards, unless it is exhausted (C{pipeline}),
        marked C{ephemeral}, or an exception other than the delivery's own
        results escaped (then it is shut down)."""
        try:
            transport = self._idle.get_nowait()
        except queue.Empty:
            transport = self._make()
        try:
            yield transport
        except BaseException:
            transport.shutdown()
            raise
        if self.pipeline is not None and transport.sent >= self.pipeline:
            transport.ephemeral = True
        if transport.ephemeral:
            transport.shutdown()
        else:
            self._idle.put(transport)

    def shutdown(self) -> None:
        """Shut down the idle transports."""
        while True:
            try:
                transport = self._idle.get_nowait()
            except queue.Empty:
                return
            transport.shutdown()


def _transport_failed(result: Any) -> bool:
    """A direct report in which every recipient was deferred by a local
    reply: no server answered (the transport's connection failed)."""
    return (isinstance(result, DeliveryReport) and len(result) > 0
            and all(r.status is Status.DEFERRED and r.local for r in result))


# -- managers ------------------------------------------------------------------


class Manager:
    """The base of the managers: a transport pool and the worker function
    (marrow.mailer's C{worker}). Made by L{make_manager}; the mailer calls
    L{send} and L{submit} with a L{Job}.

    @param mailer: the mailer.
    @param pipeline: messages per transport (see the module docstring).
    @param transport_retries: how many times a message whose transport
        failed is tried again on a new transport.
    @param transport: C{() -> Delivery} for new transports' deliveries.
    @ivar pool: the L{TransportPool}.
    """

    #: The name given to C{manager=} (marrow.mailer's entry point name).
    name = ""
    #: Whether L{send} returns a C{Future}.
    returns_future = False

    def __init__(self, mailer: MailerLike, *, pipeline: int | None = None,
                 transport_retries: int = 1,
                 transport: Callable[[], Delivery] | None = None) -> None:
        if isinstance(transport_retries, bool) or int(transport_retries) < 0:
            raise ValueError(f"transport_retries must be an int from 0, not "
                             f"{transport_retries!r}")
        self.mailer = mailer
        self.transport_retries = int(transport_retries)
        self.pool = TransportPool(mailer, pipeline, transport)
        self.running = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def startup(self) -> None:
        """Start (idempotent); C{send} starts a manager that is not running."""
        with self._lock:
            if not self.running:
                self._start()
                self.running = True
                blocking.drain_at_exit(self)

    def _start(self) -> None:
        pass

    def shutdown(self, wait: bool = True) -> None:
        """Stop: no new messages; with C{wait}, the queued ones are sent
        first. Then the idle transports are shut down (QUIT).

        @param wait: wait for the queued messages.
        """
        with self._lock:
            running, self.running = self.running, False
        if running:
            self._stop(wait)
        self.pool.shutdown()

    def _stop(self, wait: bool) -> None:
        pass

    def work(self, job: Job) -> str | DeliveryReport:
        """Deliver one message over a transport of the pool (in the calling
        thread): marrow.mailer's C{worker}.

        @return: the message id, or a direct delivery's L{DeliveryReport}.
        @raise DeliveryError: a synchronous delivery refused it, or failed for
            now on every transport tried.
        @raise AddressError, MessageError, QueueError, ReactorThreadError:
            as L{deliver_now}.
        """
        mailer = self.mailer
        if job.delivery is not mailer.delivery:  # the capture_mail outbox
            return deliver_now(mailer, job.delivery, job.sender, job.recipients, job.data,
                               job.retries)
        tries = 0
        while True:
            with self.pool.lease() as transport:
                try:
                    result = deliver_now(mailer, transport.delivery, job.sender,
                                         job.recipients, job.data, job.retries)
                except TransportExhausted as e:
                    # it took the message, and must not be used again
                    transport.ephemeral = True
                    transport.sent += 1
                    self.pool.replace_shared(e.delivery)
                    mailer.notify_accepted(transport.delivery, e.message_id, job.sender,
                                           job.recipients)
                    return e.message_id
                except DeliveryError as e:
                    if e.status != Status.DEFERRED:
                        raise
                    transport.ephemeral = True
                    if tries >= self.transport_retries:
                        raise
                    tries += 1
                    log.info("{delivery}: {error}; trying again on a new transport",
                             delivery=transport.delivery.url(), error=str(e))
                    continue
                transport.sent += 1
                if _transport_failed(result):
                    transport.ephemeral = True
                    if tries < self.transport_retries:
                        tries += 1
                        continue
                return result

    def send(self, job: Job) -> str | DeliveryReport | Future[str | DeliveryReport]:
        """Hand a message over (what C{Mailer.send} returns with this manager).

        @return: the result (L{ImmediateManager}) or a C{Future} of it.
        """
        raise NotImplementedError

    def submit(self, job: Job) -> Future[str | DeliveryReport]:
        """Hand a message over and return a C{Future} of its result (done at
        once for L{ImmediateManager}).

        @raise RuntimeError: the manager was shut down (a threaded one).
        """
        raise NotImplementedError


class ImmediateManager(Manager):
    """Deliver in the calling thread, blocking until the outcome
    (marrow.mailer's C{immediate}; no options but those of every manager).
    """

    name = "immediate"

    def send(self, job: Job) -> str | DeliveryReport:
        """Deliver now, in this thread.

        @return: the message id, or a direct delivery's L{DeliveryReport}.
        @raise DeliveryError, AddressError, MessageError, QueueError: as L{Manager.work}.
        """
        self.startup()
        return self.work(job)

    def submit(self, job: Job) -> Future[str | DeliveryReport]:
        """L{send}, its outcome in a C{Future} that is done when this returns."""
        future: Future[str | DeliveryReport] = Future()
        try:
            future.set_result(self.send(job))
        except Exception as e:  # noqa: BLE001 - the future carries it
            future.set_exception(e)
        return future


class _ThreadedManager(Manager):
    """A manager whose workers are the threads of an executor."""

    returns_future = True
    executor: Executor | None = None

    def _make_executor(self) -> Executor:
        raise NotImplementedError

    def _start(self) -> None:
        self.executor = self._make_executor()

    def _stop(self, wait: bool) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=wait)

    def send(self, job: Job) -> Future[str | DeliveryReport]:
        """Queue the message for a worker thread.

        @return: a C{Future} of the message id or L{DeliveryReport}; its
            exception is what L{Manager.work} raised.
        """
        return self.submit(job)

    def submit(self, job: Job) -> Future[str | DeliveryReport]:
        """As L{send}.

        @raise RuntimeError: the manager was shut down.
        """
        self.startup()
        executor = self.executor
        assert executor is not None
        return executor.submit(self.work, job)


class FuturesManager(_ThreadedManager):
    """A fixed pool of C{workers} threads (marrow.mailer's C{futures}):
    C{send} returns a C{concurrent.futures.Future} at once.

    @param workers: the threads (each with its transport), 1 by default.
    """

    name = "futures"

    def __init__(self, mailer: MailerLike, *, workers: int = 1, **options: Any) -> None:
        super().__init__(mailer, **options)
        self.workers = _positive_int(workers, "workers")

    def _make_executor(self) -> Executor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="mailout-futures")


class DynamicManager(_ThreadedManager):
    """A pool that grows and shrinks with the work (marrow.mailer's
    C{dynamic}, TurboMail 3's C{ondemand}): see L{ScalingExecutor}.

    @param workers: threads at most (10).
    @param divisor: one thread per C{divisor} queued messages, and a thread
        retires after C{divisor} messages (10).
    @param timeout: seconds a thread waits for work before it retires
        (starvation; 60).
    """

    name = "dynamic"

    def __init__(self, mailer: MailerLike, *, workers: int = 10, divisor: int = 10,
                 timeout: float = 60.0, **options: Any) -> None:
        super().__init__(mailer, **options)
        self.workers = _positive_int(workers, "workers")
        self.divisor = _positive_int(divisor, "divisor")
        if isinstance(timeout, bool) or not float(timeout) > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.timeout = float(timeout)

    def _make_executor(self) -> Executor:
        return ScalingExecutor(self.workers, self.divisor, self.timeout)


class ScalingExecutor(Executor):
    """A thread pool that scales with its queue (marrow.mailer's
    C{ScalingPoolExecutor}, as its documentation describes it).

    On each C{submit} it starts threads up to C{min(workers, ceil(queued /
    divisor))}. A thread retires after C{divisor} tasks (exhaustion; a
    replacement starts when work is waiting) or after C{timeout} seconds
    without a task (starvation).

    @param workers: threads at most.
    @param divisor: queued tasks per thread, and tasks per thread's life.
    @param timeout: seconds of idleness before a thread retires.
    @ivar started: threads started so far (C{int}).
    @ivar peak: the most threads alive at once (C{int}).
    """

    def __init__(self, workers: int, divisor: int, timeout: float) -> None:
        self.workers = workers
        self.divisor = divisor
        self.timeout = timeout
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...],
                                             dict[str, Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._shutdown = False
        self.started = 0
        self.peak = 0

    @property
    def thread_count(self) -> int:
        """Threads alive now."""
        with self._lock:
            return len(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Queue C{fn(*args, **kwargs)}.

        @return: its C{Future}.
        @raise RuntimeError: after L{shutdown}.
        """
        future: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, fn, args, kwargs))
            self._adjust()
        return future

    def _adjust(self) -> None:
        """Start the threads the queue calls for (under the lock)."""
        if self._shutdown:
            return
        wanted = min(self.workers, math.ceil(self._queue.qsize() / self.divisor))
        for _ in range(wanted - len(self._threads)):
            self.started += 1
            thread = threading.Thread(target=self._work, name=f"mailout-dynamic-{self.started}",
                                      daemon=True)
            self._threads.add(thread)
            thread.start()
        self.peak = max(self.peak, len(self._threads))

    def _work(self) -> None:
        me = threading.current_thread()
        done = 0
        try:
            while done < self.divisor:
                try:
                    item = self._queue.get(timeout=self.timeout)
                except queue.Empty:
                    with self._lock:
                        if self._queue.qsize() == 0:
                            log.debug("dynamic manager: a thread retires (starvation)")
                            return
                    continue
                if item is None:
                    return
                future, fn, args, kwargs = item
                done += 1
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001 - the future carries it
                    future.set_exception(e)
                else:
                    future.set_result(result)
                del item, future
            log.debug("dynamic manager: a thread retires (exhaustion)")
        finally:
            with self._lock:
                self._threads.discard(me)
                self._adjust()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more tasks; the queued ones are still run (unless
        C{cancel_futures}), then the threads end.

        @param wait: wait for the threads to end.
        @param cancel_futures: cancel the tasks not started.
        """
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, not {value!r}") from None
    if number < 1 or number != float(value):
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return number


#: The managers by name (marrow.mailer's entry points).
MANAGERS: dict[str, type[Manager]] = {
    "immediate": ImmediateManager,
    "futures": FuturesManager,
    "dynamic": DynamicManager,
}


def make_manager(spec: str | dict[str, Any] | Manager, mailer: MailerLike) -> Manager:
    """The manager C{Mailer(manager=...)} names.

    @param spec: a name (C{"immediate"}, C{"futures"}, C{"dynamic"}), a
        marrow.mailer manager configuration (C{{"use": NAME, **options}}; the
        options of the module docstring; marrow.mailer's dotted keys
        C{"manager.use"}, C{"manager.workers"}, ... work too), or a
        L{Manager} made for this mailer.
    @param mailer: the mailer.
    @return: the manager (not started).
    @raise ValueError: an unknown name or bad option value.
    @raise TypeError: an unknown option, or another type.
    """
    if isinstance(spec, Manager):
        return spec
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict):
        options = {str(k).removeprefix("manager."): v for k, v in spec.items()}
        name = options.pop("use", "immediate")
    else:
        raise TypeError(f"manager must be a name, a dict or a Manager, not "
                        f"{type(spec).__name__}")
    cls = MANAGERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown manager {name!r}; one of {', '.join(MANAGERS)}")
    try:
        return cls(mailer, **options)
    except TypeError as e:
        raise TypeError(f"{name} manager: {e}") from None
