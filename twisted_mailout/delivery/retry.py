"""Retries: when deferred mail is tried again, and the one writer of a
recipient's state after an attempt (L{outcome_for}: delivered, bounced,
deferred with its next attempt, or expired at the end of the queue lifetime).

Pure: no store, no clock (the caller gives C{now}), no reactor.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Protocol

from twisted_mailout.envelope import FINAL_STATES, RecipientState, Reply, check_transition
from twisted_mailout.outcome import Status
from twisted_mailout.queue.model import RecipientStatus

__all__ = ["RetryPolicy", "outcome_for"]


class _Random(Protocol):
    """A source of random numbers in [0, 1): the C{random} module or a
    C{random.Random}."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """When deferred mail is tried again, and when it gives up.

    @ivar base: seconds before the first retry.
    @ivar max: the longest wait between attempts, in seconds.
    @ivar lifetime: seconds after arrival when deferred mail is bounced.
    @ivar bounce_lifetime: the same for bounces (null sender), which are then
        dropped with a log line.
    @ivar jitter: fraction by which a delay is randomly shortened (0..1), so
        retries of many messages spread out.
    """

    base: float = 300.0
    max: float = 4000.0
    lifetime: float = 5 * 86400.0
    bounce_lifetime: float = 5 * 86400.0
    jitter: float = 0.1

    def delay(self, attempts: int, rng: _Random = _random) -> float:
        """Seconds to wait after the C{attempts}-th failed attempt (1-based):
        C{base * 2**(attempts-1)}, at most C{max}, less up to C{jitter}.

        @param attempts: failed attempts so far, 1-based.
        @param rng: the C{random} module or a C{random.Random}.
        """
        d = min(self.max, self.base * (2 ** max(0, min(attempts - 1, 30))))
        return d * (1.0 - self.jitter * rng.random())


def outcome_for(rs: RecipientStatus, reply: Reply, now: float, arrival: float,
                policy: RetryPolicy, null_sender: bool, rng: _Random = _random) -> Status:
    """Apply one reply to one recipient (the state machine's only writer).

    2xx: delivered. 5xx: bounced. Anything else: deferred with the next
    attempt time from C{policy}, or bounced when the queue lifetime is over.

    @return: the L{Status}: C{DELIVERED}, C{BOUNCED}, C{DEFERRED} or
        C{EXPIRED} (bounced because the lifetime is over).
    @raise InvalidTransition: the recipient was already final.
    """
    if rs.state in FINAL_STATES:
        check_transition(rs.state, RecipientState.DEFERRED)  # raises: nothing changes
    rs.attempts += 1
    if reply.is_positive:
        rs.move(RecipientState.DELIVERED, reply)
        return Status.DELIVERED
    if reply.is_permanent:
        rs.move(RecipientState.BOUNCED, reply)
        return Status.BOUNCED
    lifetime = policy.bounce_lifetime if null_sender else policy.lifetime
    if now - arrival >= lifetime:
        expired = Reply(reply.code, f"{reply.text} (delivery time expired after "
                        f"{(now - arrival) / 86400:.1f} days)", reply.local)
        rs.move(RecipientState.BOUNCED, expired)
        return Status.EXPIRED
    rs.move(RecipientState.DEFERRED, reply, now + policy.delay(rs.attempts, rng))
    return Status.DEFERRED
