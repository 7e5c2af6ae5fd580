"""Destination suspensions in memory: which recipient domains wait, and until when.

The operator suspends a destination (C{mailout queue suspend}, the API's
C{/api/v1/suspensions}, KumoMTA's C{suspend/v1}); the scheduler asks
L{Suspensions.until} before each attempt and leaves the recipients of a
suspended domain as they are (no attempt counted) until the suspension ends.
The admin layer keeps the saved copy in the queue store
(L{IQueueStore.save_suspensions}); this is the copy the scheduler reads, with
no I/O.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from twisted_mailout.queue.model import Suspension

__all__ = ["Suspensions", "domain_of"]


def domain_of(address: str) -> str:
    """The domain of a recipient address, lower case (C{""} for none).

    @param address: C{local@domain} as queued.
    """
    return address.rpartition("@")[2].lower().rstrip(".")


class Suspensions:
    """The destinations suspended now (no I/O; the reactor thread's copy).

    @param items: suspensions to start with (as loaded from the store).
    """

    def __init__(self, items: Iterable[Suspension] = ()) -> None:
        self._items: dict[str, Suspension] = {}
        for s in items:
            self._items[s.id] = s

    def until(self, domain: str, now: float) -> float | None:
        """When mail to C{domain} may be attempted again, or L{None} when it
        is not suspended at C{now}.

        @param domain: a recipient domain (any case).
        @param now: seconds since the epoch.
        """
        if not self._items:
            return None
        d = domain.lower().rstrip(".")
        end = None
        for s in self._items.values():
            if s.domain == d and s.until > now:
                end = s.until if end is None else max(end, s.until)
        return end

    def new(self, domain: str, duration: float, reason: str, now: float) -> Suspension:
        """Make and add a suspension of C{domain} for C{duration} seconds.

        @param domain: the recipient domain.
        @param duration: seconds, more than 0.
        @param reason: the operator's reason.
        @param now: seconds since the epoch.
        @return: the new L{Suspension}.
        @raise ValueError: an empty domain or a duration not above 0.
        """
        d = domain.strip().lower().rstrip(".")
        if not d or "@" in d or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in d):
            raise ValueError(f"not a domain: {domain!r}")
        if not duration > 0:
            raise ValueError(f"the duration must be more than 0 seconds, not {duration!r}")
        s = Suspension(secrets.token_hex(6), d, reason, now, now + duration)
        self._items[s.id] = s
        return s

    def add(self, s: Suspension) -> None:
        """Add (or replace, by id) a suspension."""
        self._items[s.id] = s

    def get(self, sid: str) -> Suspension | None:
        """The suspension with id C{sid}, or L{None}."""
        return self._items.get(sid)

    def cancel(self, sid: str) -> Suspension | None:
        """Remove the suspension C{sid}. @return: it, or L{None} when unknown."""
        return self._items.pop(sid, None)

    def active(self, now: float) -> list[Suspension]:
        """The suspensions in force at C{now}, in creation order; ended ones
        are forgotten."""
        for sid in [k for k, s in self._items.items() if s.until <= now]:
            del self._items[sid]
        return sorted(self._items.values(), key=lambda s: (s.created, s.id))

    def __len__(self) -> int:
        return len(self._items)
