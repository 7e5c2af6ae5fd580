"""The connection pool: how many connections are open, to whom, and who waits.

L{ConnectionPool} is what Postfix splits between qmgr(8) (concurrency per
destination, dead-destination memory) and scache(8) (keeping idle sessions
for reuse). It knows nothing of SMTP: it opens connections through a
callable it is given, hands them out as L{Lease}s, and is told when a lease
comes back. Time comes from the clock it is given, so every rule here can be
tested with C{twisted.internet.task.Clock}.

The rules:

  - At most C{max_connections} connections are open in all, and at most
    C{max_per_destination} to one destination (or the destination's own
    limit, L{ConnectionPool.shape}); destinations put in a group (a
    provider's domains, issue 12's traffic shaping) share the group's limit
    too. A connection counts from the
    moment its opening starts until it is closed (or, when the pool gives it
    up on purpose, until it is told to go).
  - A connection given back in a reusable state goes, in this order: to a
    caller waiting for the same destination; closed at once when another
    destination waits for a slot under the global limit; otherwise kept
    idle for C{idle_timeout} seconds for the next caller.
  - A caller that finds the global limit reached while its destination has
    room closes the oldest idle connection of any destination and opens its
    own.
  - With C{slow_start} (L{PoolLimits}), a destination opens that many
    connections at first and one more per transaction that ends within
    C{slow_transaction} seconds (or that ends while nobody else waits); a
    slower transaction while other destinations wait for a slot under the
    global limit takes it back to C{slow_start}, and a connection given back
    beyond that goes to them rather than to its own next caller. So a
    destination whose replies all come late (a tarpit) holds one connection,
    not its whole limit, while others wait (issue 14).
  - When opening a connection fails, the destination is remembered as down
    for C{failure_memory} seconds: callers then fail at once with
    L{DestinationDown}, and the callers that were waiting for it fail with the
    same error.
  - Every L{Deferred} from L{ConnectionPool.acquire} can be cancelled: a
    waiting caller leaves the queue; a caller whose connection is being
    opened cancels the opening (if the connection arrives anyway, it goes to
    the next caller or is kept idle). A cancelled opening is not a failure of
    the destination.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mailout.delivery.limits import SharedLimits
from twisted_mailout.errors import ProtocolError

__all__ = [
    "ConnectionPool",
    "DestinationDown",
    "Lease",
    "Opened",
    "PoolClosed",
    "PoolLimits",
    "PooledSession",
]

log = Logger()


class DelayedCall(Protocol):
    """What a clock's C{callLater} returns (C{IDelayedCall}), as far as the
    pool and the scheduler use it."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    """The part of C{IReactorTime} the pool uses (a reactor or a
    C{twisted.internet.task.Clock})."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., object], *args: object,
                  **kw: object) -> DelayedCall: ...


class PooledSession(Protocol):
    """What the pool needs of a connection (L{ESMTPSession} provides it).

    @ivar usable: whether the connection can carry another transaction now.
    @ivar transactions: how many transactions it has carried.
    @ivar created: when it was opened, in the clock's seconds.
    @ivar closed: a Deferred firing (with anything) once the connection is
        gone, for whatever reason. The pool adds a callback that passes the
        result through unchanged.
    """

    usable: bool
    transactions: int
    created: float
    closed: defer.Deferred[None]

    def quit(self) -> defer.Deferred[None]:
        """End the connection politely; the Deferred never fails."""


S = TypeVar("S", bound=PooledSession)


@dataclass(frozen=True)
class PoolLimits:
    """The pool's limits; times in seconds.

    @ivar max_connections: open connections at most, all destinations.
    @ivar max_per_destination: open connections at most to one destination.
    @ivar idle_timeout: seconds an idle connection is kept for reuse.
    @ivar max_age: seconds after its opening when a connection is no longer
        reused.
    @ivar max_messages: transactions per connection at most.
    @ivar failure_memory: seconds a destination whose opening failed is not
        tried again (0: never remembered).
    @ivar slow_start: connections a destination may have open before one of
        them has carried a transaction (Postfix's
        C{initial_destination_concurrency}); each transaction that ends
        within C{slow_transaction} seconds lets it have one more, up to its
        limit, and one slower than that, while other destinations wait for
        a slot under C{max_connections}, takes it back to C{slow_start}
        (connections open are not closed for it). So a destination whose
        every reply is late (a tarpit) holds one connection, not its whole
        limit, while others wait. L{None}: no window, the limit from the
        start.
    @ivar slow_transaction: seconds from handing a connection out to getting
        it back beyond which a transaction is slow (see C{slow_start}).
    """

    max_connections: int = 20
    max_per_destination: int = 4
    idle_timeout: float = 2.0
    max_age: float = 300.0
    max_messages: int = 100
    failure_memory: float = 60.0
    slow_start: int | None = None
    slow_transaction: float = 2.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_destination < 1 or (
                self.slow_start is not None and self.slow_start < 1):
            raise ValueError("connection limits must be at least 1")


@dataclass(frozen=True)
class Opened(Generic[S]):
    """What the pool's opener gives back: the connection and its name.

    @ivar session: the connection, ready for a transaction.
    @ivar label: how logs and results name it, e.g. C{"mx.example.org[192.0.2.1]:25"}.
    """

    session: S
    label: str


class DestinationDown(ProtocolError):
    """Opening a connection to the destination failed recently; it is not
    tried again before C{until}.

    @ivar key: the destination.
    @ivar error: the exception the failed opening raised.
    @ivar until: when the destination will be tried again (clock seconds).
    """

    def __init__(self, key: str, error: BaseException, until: float):
        super().__init__(f"{key}: down until {until:g}: {error}")
        self.key = key
        self.error = error
        self.until = until


class PoolClosed(ProtocolError):
    """The pool is closing: no connection is handed out any more."""


class Lease(Generic[S]):
    """One open connection, as the pool keeps it; handed to one caller at a time.

    @ivar key: the destination it belongs to.
    @ivar session: the connection.
    @ivar label: its name for logs (see L{Opened}).
    """

    def __init__(self, key: str, opened: Opened[S]):
        self.key = key
        self.session: S = opened.session
        self.label = opened.label
        self._counted = True  # holds one slot in the pool's counts
        self._idle_timer: DelayedCall | None = None
        self._handed: float | None = None  # when it was last handed to a caller

    def __repr__(self) -> str:
        return f"<Lease {self.key} {self.label}>"


class _Waiter:
    """One caller of L{ConnectionPool.acquire}."""

    def __init__(self, dest: _Dest):
        self.dest = dest
        self.opening: defer.Deferred[Any] | None = None
        self.d: defer.Deferred[Any] = defer.Deferred(self._cancel)

    def _cancel(self, _d: defer.Deferred[Any]) -> None:
        if self in self.dest.waiters:
            self.dest.waiters.remove(self)
        elif self.opening is not None:
            self.opening.cancel()

    def give(self, lease: Lease[Any]) -> bool:
        """Hand over C{lease}; L{False} when the caller is gone (cancelled)."""
        if self.d.called:
            return False
        self.d.callback(lease)
        return True

    def fail(self, exc: BaseException) -> None:
        if not self.d.called:
            self.d.errback(Failure(exc))


class _Group:
    """Destinations sharing one connection limit (a provider's domains)."""

    def __init__(self, key: str, limit: int):
        self.key = key
        self.limit = limit
        self.conns = 0  # the members' counted connections together
        self.members: list[_Dest] = []


class _Dest:
    """The pool's record of one destination."""

    def __init__(self, key: str):
        self.key = key
        self.conns = 0  # counted connections: opening, busy or idle
        self.idle: list[Lease[Any]] = []
        self.waiters: deque[_Waiter] = deque()
        self.down: DestinationDown | None = None
        self.limit: int | None = None  # its own limit (None: max_per_destination)
        self.max_messages: int | None = None  # (None: the pool's max_messages)
        self.group: _Group | None = None
        #: connections it may have now (PoolLimits.slow_start), or None
        self.window: int | None = None


class ConnectionPool(Generic[S]):
    """Connections to many destinations under global and per-destination limits.

    @param clock: the C{IReactorTime} for idle timers, connection ages and
        the dead-destination memory.
    @param opener: C{callable(key) -> Deferred[Opened]}: opens a connection
        to the destination C{key} (trying its hosts as it sees fit). It is
        called when a caller needs a new connection; cancelling its
        Deferred should stop the attempt.
    @param limits: L{PoolLimits}.
    @param remember: exception types of a failed opening that mark the
        destination down for C{limits.failure_memory} seconds (others,
        such as programming errors and L{defer.CancelledError}, do not).
    @param shared: the connection table of the worker processes of one queue
        (L{SharedLimits}), or L{None} for a single process. With it every
        limit holds across the workers: a connection is counted there before
        it is opened; a caller whose slot another worker holds waits, and is
        looked at again every L{SHARED_TICK} seconds; a finished or idle
        connection that another worker waits for is closed, not kept.
    """

    #: Seconds between two looks at the shared table while a caller waits
    #: for a slot another worker holds, or other workers wait for ours.
    SHARED_TICK = 0.05

    def __init__(self, clock: Clock,
                 opener: Callable[[str], defer.Deferred[Opened[S]]],
                 limits: PoolLimits,
                 remember: tuple[type[BaseException], ...] = (Exception,),
                 shared: SharedLimits | None = None):
        self.clock = clock
        self.shared = shared
        self._remote: dict[str, _Dest] = {}  # waiting for a slot another worker holds
        self._tick: Any = None
        self.limits = limits
        self._opener = opener
        self._remember = remember
        self._dests: dict[str, _Dest] = {}
        self._total = 0
        self._blocked: deque[_Dest] = deque()  # destinations waiting on the global limit
        self._groups: dict[str, _Group] = {}
        self._closing = False

    # -- what tests and operators may read ------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections counted against C{max_connections} (opening, busy or idle)."""
        return self._total

    def connections_to(self, key: str) -> int:
        """Connections counted against the limit of destination C{key}."""
        dest = self._dests.get(key)
        return dest.conns if dest is not None else 0

    def limit_for(self, key: str) -> int:
        """The connections destination C{key} may have open at once: its own
        limit (L{shape}) or C{max_per_destination}, at most its group's.
        Cheap, never blocks (the scheduler asks it for each message).

        @param key: a destination key (an unknown one has the default).
        @return: a count, at least 1.
        """
        dest = self._dests.get(key)
        if dest is None:
            return self.limits.max_per_destination
        own = dest.limit if dest.limit is not None else self.limits.max_per_destination
        return own if dest.group is None else min(own, dest.group.limit)

    def idle_to(self, key: str) -> int:
        """Idle connections kept for destination C{key}."""
        dest = self._dests.get(key)
        return len(dest.idle) if dest is not None else 0

    def idle_connections(self) -> int:
        """Idle connections kept for reuse, all destinations together (they
        count in L{open_connections} too). Cheap and non-blocking: a sum over
        the destinations the pool has seen, for metrics read at scrape time.

        @return: a count (C{int}, at least 0).
        """
        return sum(len(dest.idle) for dest in self._dests.values())

    def waiting_for(self, key: str) -> int:
        """Callers waiting for a connection to C{key}."""
        dest = self._dests.get(key)
        return len(dest.waiters) if dest is not None else 0

    def group_connections(self, group: str) -> int:
        """Connections counted against the limit of group C{group}."""
        g = self._groups.get(group)
        return g.conns if g is not None else 0

    def shape(self, key: str, limit: int | None = None, group: str | None = None,
              group_limit: int | None = None, max_messages: int | None = None) -> None:
        """Set destination C{key}'s own limits (traffic shaping); callers
        set them before L{acquire}, and may set them again at any time.

        @param limit: connections to C{key} at most (L{None}:
            C{max_per_destination}).
        @param group: a group C{key} belongs to (a provider's shaping key),
            or L{None}; its connections count in the group's.
        @param group_limit: the group's connections at most, all members
            together (required with C{group}; the last value given wins).
        @param max_messages: transactions per connection to C{key} at most
            (L{None}: the pool's C{max_messages}).
        @raise ValueError: a limit below 1, or a group without a limit.
        """
        if (limit is not None and limit < 1) or (group is not None and (
                group_limit is None or group_limit < 1)):
            raise ValueError("connection limits must be at least 1")
        dest = self._dest(key)
        dest.limit, dest.max_messages = limit, max_messages
        old = dest.group
        new = None
        if group is not None:
            assert group_limit is not None
            new = self._groups.get(group)
            if new is None:
                new = self._groups[group] = _Group(group, group_limit)
            new.limit = group_limit
        if new is not old:
            if old is not None:
                old.conns -= dest.conns
                old.members.remove(dest)
            if new is not None:
                new.conns += dest.conns
                new.members.append(dest)
            dest.group = new
            if dest.waiters:
                self._slot_freed(dest)  # a larger limit may let a waiter open now

    def _room(self, dest: _Dest) -> bool:
        """Whether C{dest} may open one more connection (its own and its
        group's limits; the global limit is checked apart)."""
        own = dest.limit if dest.limit is not None else self.limits.max_per_destination
        if dest.window is not None and dest.window < own:
            own = dest.window
        return dest.conns < own and (dest.group is None or dest.group.conns < dest.group.limit)

    # -- acquire ----------------------------------------------------------------

    def acquire(self, key: str) -> defer.Deferred[Lease[S]]:
        """A connection to destination C{key}: an idle one, a new one, or the
        next one given back when the limits are reached.

        @param key: the destination.
        @return: a Deferred firing with a L{Lease}, to be given back with
            L{release} or L{discard}. It fails with L{DestinationDown} while
            the destination is remembered as down or when the opening this
            caller waited for failed (with the opener's own error for an
            error not in C{remember}), and with L{PoolClosed} once the pool
            is closing. Cancelling it withdraws the caller (see the module
            docstring); it then fails with L{defer.CancelledError}.
        """
        if self._closing:
            return defer.fail(PoolClosed("the connection pool is closing"))
        dest = self._dest(key)
        if dest.down is not None:
            if dest.down.until > self.clock.seconds():
                return defer.fail(dest.down)
            dest.down = None
        while dest.idle:
            lease = dest.idle.pop()  # the most recently used one
            self._stop_idle_timer(lease)
            if self._reusable(lease):
                lease._handed = self.clock.seconds()
                return defer.succeed(lease)
            self._quit(lease)
        waiter = _Waiter(dest)
        d: defer.Deferred[Lease[S]] = waiter.d
        limits = self.limits
        if self._room(dest):
            if self._total >= limits.max_connections:
                self._close_one_idle()
            if self._total < limits.max_connections:
                if self._take(dest):
                    self._open(dest, waiter)
                    return d
                dest.waiters.append(waiter)
                self._wait_remote(dest)
                return d
            if dest not in self._blocked:
                self._blocked.append(dest)
        dest.waiters.append(waiter)
        return d

    # -- give back -------------------------------------------------------------

    def release(self, lease: Lease[S], reusable: bool) -> None:
        """Give a connection back after a transaction.

        @param lease: from L{acquire}.
        @param reusable: whether the connection can carry another transaction
            (the session's own C{usable} and the pool's age and message
            limits are checked too). A connection that is not reused is
            QUIT; its slot stays counted until it is closed.
        """
        dest = self._dest(lease.key)
        if dest.window is not None and lease._handed is not None:
            self._window(dest, self.clock.seconds() - lease._handed)
        lease._handed = None
        if not (reusable and self._reusable(lease)):
            self._quit(lease)
            return
        now = self.clock.seconds()
        # Over its window (slow while others wait): not to its own callers;
        # the slot goes to a destination blocked by the global limit below.
        over = (dest.window is not None and dest.conns > dest.window
                and self._someone_blocked())
        while dest.waiters and not over:
            lease._handed = now
            if dest.waiters.popleft().give(lease):
                return
        lease._handed = None
        if self._group_waits(dest):
            # Another domain of its group waits at the group's limit: this
            # one goes, and stays counted until it is closed (so the server
            # never sees more than the limit), then its slot goes over.
            self._quit(lease)
            return
        if self.shared is not None and (self.shared.others_waiting(lease.key)
                                        or self.shared.others_waiting()):
            # another worker waits for a slot this one holds: give it up
            self._quit(lease)
            self._uncount(lease)
            self._slot_freed(None)
            return
        if self._someone_blocked():
            # Other destinations wait for a slot under the global limit:
            # give this one up now rather than keep it idle.
            self._quit(lease)
            self._uncount(lease)
            self._slot_freed(None)
            return
        lease._idle_timer = self.clock.callLater(self.limits.idle_timeout,
                                                 self._idle_expired, lease)
        dest.idle.append(lease)
        self._start_tick()  # with workers: give it up if another one waits

    def _window(self, dest: _Dest, took: float) -> None:
        """A transaction of C{dest} took C{took} seconds: widen its window
        (and open for a waiting caller if that gives room), or narrow it
        back when it was slow and others wait (L{PoolLimits.slow_start})."""
        assert dest.window is not None and self.limits.slow_start is not None
        limits = self.limits
        own = dest.limit if dest.limit is not None else limits.max_per_destination
        if took <= limits.slow_transaction or not self._someone_blocked():
            # quick, or nobody else wants the slot: one more connection
            if dest.window < own:
                dest.window += 1
                # (the connection given back serves the first waiting caller)
                if len(dest.waiters) > 1 and self._room(dest):
                    if self._total < limits.max_connections:
                        self._slot_freed(dest)  # one more for a caller waiting now
                    elif dest not in self._blocked:
                        self._blocked.append(dest)
        else:
            dest.window = limits.slow_start

    def discard(self, lease: Lease[S]) -> None:
        """Forget a connection its caller has aborted (for example because the
        delivery was cancelled): its slot is free at once, and the next
        waiting caller gets a connection.

        @param lease: from L{acquire}; its connection must already be
            aborted (it is not touched here).
        """
        if self._uncount(lease):
            self._slot_freed(self._dests.get(lease.key))

    def close(self) -> defer.Deferred[None]:
        """QUIT idle connections and hand out none any more. Busy connections
        are QUIT when they are given back. Waiting callers fail with
        L{PoolClosed}.

        @return: a Deferred firing (with L{None}) when the idle ones are closed.
        """
        self._closing = True
        self._stop_tick()
        for dest in self._remote.values():
            self._want(dest, False)
        self._remote.clear()
        ds: list[defer.Deferred[None]] = []
        for dest in self._dests.values():
            idle, dest.idle = dest.idle, []
            for lease in idle:
                self._stop_idle_timer(lease)
                ds.append(self._quit(lease))
            waiters, dest.waiters = dest.waiters, deque()
            for w in waiters:
                w.fail(PoolClosed("the connection pool is closing"))
        self._blocked.clear()
        return defer.gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)

    # -- internals -------------------------------------------------------------

    def _dest(self, key: str) -> _Dest:
        d = self._dests.get(key)
        if d is None:
            d = self._dests[key] = _Dest(key)
            d.window = self.limits.slow_start
        return d

    def _reusable(self, lease: Lease[S]) -> bool:
        limits, session = self.limits, lease.session
        dest = self._dests.get(lease.key)
        most = (dest.max_messages if dest is not None and dest.max_messages is not None
                else limits.max_messages)
        return (session.usable and not self._closing
                and session.transactions < most
                and self.clock.seconds() - session.created < limits.max_age)

    def _quit(self, lease: Lease[S]) -> defer.Deferred[None]:
        return lease.session.quit()

    def _uncount(self, lease: Lease[S]) -> bool:
        """Stop counting C{lease}'s slot; L{False} if it no longer counted."""
        if not lease._counted:
            return False
        lease._counted = False
        dest = self._dests[lease.key]
        self._count(dest, -1)
        return True

    def _count(self, dest: _Dest, n: int) -> None:
        dest.conns += n
        self._total += n
        if dest.group is not None:
            dest.group.conns += n
        if n < 0 and self.shared is not None:
            self.shared.closed(dest.key, dest.group.key if dest.group is not None else None)

    # -- the worker processes' shared table ---------------------------------------

    def _take(self, dest: _Dest) -> bool:
        """Count a slot for C{dest} in the shared table (always granted
        without one); the local limits were checked by the caller."""
        if self.shared is None:
            return True
        own = dest.limit if dest.limit is not None else self.limits.max_per_destination
        g = dest.group
        if self.shared.try_open(dest.key, own, self.limits.max_connections,
                                g.key if g is not None else None,
                                g.limit if g is not None else None):
            if dest.key in self._remote and not dest.waiters:
                del self._remote[dest.key]
                self._want(dest, False)
            return True
        return False

    def _want(self, dest: _Dest, waiting: bool) -> None:
        assert self.shared is not None
        self.shared.want(dest.key, waiting)

    def _wait_remote(self, dest: _Dest) -> None:
        """C{dest} has waiters that only another worker's slots keep back."""
        if dest.key not in self._remote:
            self._remote[dest.key] = dest
            self._want(dest, True)
        self._start_tick()

    def _start_tick(self) -> None:
        if self.shared is not None and self._tick is None and not self._closing:
            self._tick = self.clock.callLater(self.SHARED_TICK, self._shared_tick)

    def _stop_tick(self) -> None:
        tick, self._tick = self._tick, None
        if tick is not None and tick.active():
            tick.cancel()

    def _shared_tick(self) -> None:
        """Look at the shared table again: open for callers whose slot is
        free now, and give up idle connections other workers wait for."""
        self._tick = None
        if self._closing or self.shared is None:
            return
        for key, dest in list(self._remote.items()):
            if not dest.waiters:
                del self._remote[key]
                self._want(dest, False)
                continue
            if self._room(dest) and self._total < self.limits.max_connections and \
                    self._take(dest):
                self._open(dest, dest.waiters.popleft())
                if not dest.waiters:
                    self._remote.pop(key, None)
                    self._want(dest, False)
        others = self.shared.others_waiting()
        idle = False
        for dest in list(self._dests.values()):
            if not dest.idle:
                continue
            idle = True
            if others and (self.shared.others_waiting(dest.key) or
                           self.shared.connections() >= self.limits.max_connections):
                lease = dest.idle.pop(0)  # the oldest
                self._stop_idle_timer(lease)
                lease.session.quit()
                self._uncount(lease)
        if self._remote or (idle and others):
            self._start_tick()
        elif idle:
            # idle connections: look again now and then, in case another
            # worker starts waiting for one of them
            self._tick = self.clock.callLater(self.SHARED_TICK * 4, self._shared_tick)

    def _stop_idle_timer(self, lease: Lease[S]) -> None:
        timer, lease._idle_timer = lease._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _close_one_idle(self) -> None:
        """Close the oldest idle connection, of any destination, and count
        its slot free at once so the caller can open its own."""
        oldest: Lease[Any] | None = None
        for dest in self._dests.values():
            for lease in dest.idle:
                if oldest is None or lease.session.created < oldest.session.created:
                    oldest = lease
        if oldest is None:
            return
        self._dests[oldest.key].idle.remove(oldest)
        self._stop_idle_timer(oldest)
        log.debug("closing idle {label} to make room", label=oldest.label)
        oldest.session.quit()
        self._uncount(oldest)

    def forget(self, key: str) -> int:
        """Forget what the pool remembers of destination C{key}: its
        dead-destination memory, and its idle connections (closed with
        QUIT), so the next delivery opens afresh (C{mailout queue requeue}).
        Busy connections are left alone.

        @param key: the destination key.
        @return: the idle connections closed.
        """
        dest = self._dests.get(key)
        if dest is None:
            return 0
        dest.down = None
        idle, dest.idle = dest.idle, []
        for lease in idle:
            self._stop_idle_timer(lease)
            lease.session.quit()
            self._uncount(lease)
        if idle:
            self._slot_freed(dest)
        return len(idle)

    def _group_waits(self, dest: _Dest) -> bool:
        """Whether another member of C{dest}'s group waits while the group
        is at its limit (a connection given back should then go)."""
        g = dest.group
        return (g is not None and g.conns >= g.limit
                and any(m.waiters for m in g.members if m is not dest))

    def _someone_blocked(self) -> bool:
        """Whether a destination waits for a slot under the global limit;
        forgets destinations whose waiters were served or withdrew."""
        while self._blocked and not self._blocked[0].waiters:
            self._blocked.popleft()
        return any(d.waiters for d in self._blocked)

    def _idle_expired(self, lease: Lease[S]) -> None:
        lease._idle_timer = None
        dest = self._dests[lease.key]
        if lease in dest.idle:
            dest.idle.remove(lease)
        self._quit(lease)

    def _closed(self, lease: Lease[S]) -> None:
        """The connection is gone (for whatever reason)."""
        dest = self._dests[lease.key]
        if lease in dest.idle:
            dest.idle.remove(lease)
        self._stop_idle_timer(lease)
        self._uncount(lease)
        self._slot_freed(dest)

    def _slot_freed(self, dest: _Dest | None) -> None:
        """A slot is free: start an opening for a waiting caller, the same
        destination first, then those blocked by the global limit."""
        limits = self.limits
        if self._closing:
            return
        candidates = ([dest] if dest is not None else [])
        if dest is not None and dest.group is not None:
            candidates += [m for m in dest.group.members if m is not dest and m.waiters]
        candidates += list(self._blocked)
        if dest is None:  # a slot of some group may be free: any waiting member
            candidates += [m for g in self._groups.values() if g.conns < g.limit
                           for m in g.members if m.waiters]
        for cand in candidates:
            if self._total >= limits.max_connections:
                return
            if cand.waiters and self._room(cand):
                if not self._take(cand):
                    self._wait_remote(cand)
                    continue
                waiter = cand.waiters.popleft()
                if not cand.waiters and cand in self._blocked:
                    self._blocked.remove(cand)
                self._open(cand, waiter)
                return

    def _open(self, dest: _Dest, waiter: _Waiter) -> None:
        """Count a slot for C{dest} and open a connection for C{waiter}."""
        self._count(dest, 1)
        try:
            opening = self._opener(dest.key)
        except BaseException:  # noqa: BLE001 - becomes the Deferred's failure
            opening = defer.fail()
        waiter.opening = opening
        opening.addCallbacks(self._opened, self._open_failed,
                             callbackArgs=(dest, waiter), errbackArgs=(dest, waiter))

    def _opened(self, opened: Opened[S], dest: _Dest, waiter: _Waiter) -> None:
        waiter.opening = None
        dest.down = None
        lease: Lease[S] = Lease(dest.key, opened)
        lease.session.closed.addBoth(self._passthrough_closed, lease)
        lease._handed = self.clock.seconds()
        if waiter.give(lease):
            return
        lease._handed = None
        # The caller withdrew while the connection was being opened, and the
        # opening could not be stopped: the next caller gets it, or it idles.
        self.release(lease, reusable=True)

    def _passthrough_closed(self, result: object, lease: Lease[S]) -> object:
        self._closed(lease)
        return result

    def _open_failed(self, failure: Failure, dest: _Dest, waiter: _Waiter) -> None:
        waiter.opening = None
        self._count(dest, -1)
        exc = failure.value
        if failure.check(defer.CancelledError) or waiter.d.called:
            # The caller withdrew: not a verdict on the destination.
            waiter.fail(exc)
            self._slot_freed(dest)
            return
        error: BaseException = exc
        if isinstance(exc, self._remember):
            until = self.clock.seconds() + self.limits.failure_memory
            error = DestinationDown(dest.key, exc, until)
            if self.limits.failure_memory > 0:
                dest.down = error
        waiter.fail(error)
        # Callers waiting for a destination that cannot be reached fail too.
        waiters, dest.waiters = dest.waiters, deque()
        for w in waiters:
            w.fail(error)
        self._slot_freed(None)
