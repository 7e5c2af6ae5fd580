"""The lease guard of a shared queue: is this daemon's claim still good
enough to finish a transaction?

With a store whose leases expire (the PostgreSQL queue), another daemon takes
over a message once its lease runs out. A daemon whose renewals fail (the
database unreachable, the daemon stalled) must therefore not complete a
delivery it can no longer vouch for: L{LeaseGuard.may_finish} is asked just
before the final dot of DATA (the session then drops the connection
instead, so the server never takes the message, RFC 5321 4.1.1.4).

Times are this host's clock: a renewal that succeeds at local time C{t} is
taken to hold until C{t + duration} (the database computes a later expiry,
after the round trip), so clock skew between hosts does not matter.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["LeaseGuard"]


class _Clock(Protocol):
    def seconds(self) -> float: ...


class LeaseGuard:
    """When this owner's leases end, as far as this daemon knows.

    @param clock: has C{seconds()}.
    @param duration: the store's C{lease_duration}, seconds.
    @param margin: seconds before the end when no transaction may finish
        any more (the final dot and its reply need time); a tenth of the
        duration by default.
    """

    def __init__(self, clock: _Clock, duration: float, margin: float | None = None) -> None:
        self.clock = clock
        self.duration = duration
        self.margin = duration / 10.0 if margin is None else margin
        self.until = clock.seconds() + duration

    def renewing(self) -> float:
        """Call just before a renewal starts. @return: the local time to
        give L{renewed} when it succeeds."""
        return float(self.clock.seconds())

    def renewed(self, started: float) -> None:
        """A renewal that started at C{started} succeeded."""
        self.until = max(self.until, started + self.duration)

    def may_finish(self) -> bool:
        """Whether a transaction may send its final dot now."""
        return self.clock.seconds() < self.until - self.margin
