"""The one poller of the test suite: wait, boundedly, for a positive signal.

Tests never sleep to prove that something did not happen; they wait for an
event that shows the moment has passed (a later message arriving, an outcome
line in the daemon's log, the server closing every session) and then look.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import task

T = TypeVar("T")

#: The first pause between two calls of the predicate, in seconds; it doubles
#: after each false result, up to the caller's C{interval}.
FIRST_PAUSE = 0.005


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    *,
    interval: float = 0.1,
    what: str | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call C{predicate()} until it returns a truthy value; return that value.

    The pause between calls starts at 5 ms and doubles up to C{interval}, so a
    condition that is true almost at once is seen at once, and a slow one (a
    predicate that runs a subprocess, say) is not polled in a busy loop.

    @param predicate: callable with no arguments; its exceptions propagate.
    @param timeout: the longest wait, in seconds.
    @param interval: the longest pause between two calls, in seconds.
    @param what: what is being waited for, for the failure message (for
        example C{"an empty queue"}); default: the predicate's repr.
    @param detail: called once on timeout; its text ends the failure message
        (for example C{daemon.log}, the log as it is at the deadline).
    @return: the first truthy value C{predicate()} returned.
    @raise TimeoutError: no call returned a truthy value within C{timeout}
        seconds (the predicate is called at least once, and once more at the
        deadline); the message says what was awaited, for how long, and the
        last value returned.
    """
    deadline = time.monotonic() + timeout
    pause = min(FIRST_PAUSE, interval)
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = repr(value)
            if len(last) > 300:
                last = last[:300] + "..."
            message = (f"timed out after {timeout} s waiting for {what or repr(predicate)}"
                       f" (last value: {last})")
            if detail is not None:
                message += "\n" + detail()
            raise TimeoutError(message)
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, interval)


async def wait_for_reactor(reactor: Any, predicate: Callable[[], T], timeout: float = 10.0, *,
                           what: str | None = None) -> T:
    """L{wait_for} for code running in the reactor thread (trial tests on the
    real reactor): the pauses are C{deferLater}s, so the reactor runs the
    code being waited for in between.

    @param reactor: the running reactor (C{IReactorTime}).
    @return: the first truthy value C{predicate()} returned.
    @raise TimeoutError: as L{wait_for}.
    """
    deadline = reactor.seconds() + timeout
    pause = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for "
                               f"{what or repr(predicate)} (last value: {value!r})")
        await task.deferLater(reactor, pause, lambda: None)
        pause = min(pause * 2, 0.1)
