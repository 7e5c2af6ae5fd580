"""Automatic throttling: rules that suspend a destination when its replies
say the sender goes too fast (issue 12 item 3; KumoMTA's automation rules).

A L{Rule} is a regular expression over a reply (C{"CODE ENHANCED TEXT"}, as
the outcome events carry it), a threshold (C{"2/h"}: that many matching
replies from one destination within that period), and an action: suspend the
destination for a duration, with a reason. L{ThrottleRules} counts matching
replies per rule and destination over a sliding window and, past the
threshold, adds a suspension to the daemon's L{Suspensions}: its mail stays
queued (nothing is bounced, no attempt counted) and flows again by itself
when the suspension ends.

Pure and clock-driven: C{observe} is called with each outcome (a
L{RecipientResult} and its destination), no I/O.

Not yet wired into the daemon: the shaping file that will carry the rules
(C{--shaping FILE}, issue 12 item 2) does not exist yet; L{DEFAULT_RULES}
are the rules it will ship.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.logger import Logger

from twisted_mailout.delivery.suspend import Suspensions

__all__ = ["DEFAULT_RULES", "Rule", "ThrottleRules", "parse_rate"]

log = Logger()

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_rate(text: str) -> tuple[int, float]:
    """C{"2/h"} -> C{(2, 3600.0)}: a count per period.

    @param text: C{COUNT/UNIT} with UNIT one of s, m, h, d (or a number of
        seconds: C{"5/30"}).
    @return: C{(count, seconds)}.
    @raise ValueError: malformed, or a count or period not above 0.
    """
    count_s, _, unit = text.strip().partition("/")
    try:
        count = int(count_s)
        period = _UNITS[unit] if unit in _UNITS else float(unit)
    except (ValueError, KeyError):
        raise ValueError(f"a rate is COUNT/UNIT (s, m, h, d), such as '2/h', not {text!r}")
    if count < 1 or not period > 0:
        raise ValueError(f"a rate needs a count and a period above 0, not {text!r}")
    return count, period


@dataclass(frozen=True)
class Rule:
    """One throttling rule.

    @ivar name: for logs and the suspension's reason.
    @ivar pattern: a regular expression searched in C{"CODE ENHANCED TEXT"}.
    @ivar threshold: C{(count, seconds)}: that many matches within that many
        seconds from one destination trigger the action.
    @ivar duration: seconds the destination is suspended.
    @ivar reason: the suspension's reason (the rule's name when empty).
    """

    name: str
    pattern: re.Pattern[str]
    threshold: tuple[int, float]
    duration: float
    reason: str = ""

    @classmethod
    def make(cls, name: str, pattern: str, threshold: str, duration: float,
             reason: str = "") -> Rule:
        """A rule from its text form (as the shaping file will give it).

        @raise ValueError: a bad regular expression, rate or duration.
        """
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule {name!r}: bad pattern {pattern!r}: {e}") from None
        if not duration > 0:
            raise ValueError(f"rule {name!r}: the duration must be above 0 seconds")
        return cls(name, compiled, parse_rate(threshold), float(duration), reason)


#: The throttling replies of the large providers (their postmaster pages:
#: Google's "421 4.7.28 ... unusual rate of unsolicited mail", Microsoft's
#: "451 4.7.650 ... temporarily rate limited due to IP reputation", Yahoo's
#: "421 4.7.0 [TSS04] Messages from ... temporarily deferred due to unexpected
#: volume or user complaints").
DEFAULT_RULES = (
    Rule.make("google-rate", r"^421 4\.7\.28\b", "2/h", 3600.0,
              "Google: 421 4.7.28 (unusual rate), suspended for an hour"),
    Rule.make("microsoft-rate", r"^451 4\.7\.650\b", "2/h", 3600.0,
              "Microsoft: 451 4.7.650 (rate limited), suspended for an hour"),
    Rule.make("yahoo-tss04", r"^421 4\.7\.0 .*\[TSS04\]", "2/h", 3600.0,
              "Yahoo: 421 4.7.0 [TSS04], suspended for an hour"),
)


class _Clock(Protocol):
    def seconds(self) -> float: ...


class ThrottleRules:
    """Counts matching replies per rule and destination; suspends past the
    threshold.

    @param rules: the L{Rule}s, tried in order (the first that matches a
        reply counts it).
    @param suspensions: where a triggered rule adds its suspension (the
        scheduler's L{Suspensions}).
    @param clock: has C{seconds()}.
    """

    def __init__(self, rules: Iterable[Rule], suspensions: Suspensions, clock: _Clock) -> None:
        self.rules = list(rules)
        self.suspensions = suspensions
        self.clock = clock
        self._hits: dict[tuple[str, str], deque[float]] = {}

    def observe(self, destination: str, reply: str) -> Rule | None:
        """Count one reply from C{destination}.

        @param destination: the recipient domain (what a suspension names).
        @param reply: C{"CODE ENHANCED TEXT"} on one line.
        @return: the rule that suspended the destination now, or L{None}.
        """
        now = float(self.clock.seconds())
        for rule in self.rules:
            if not rule.pattern.search(reply):
                continue
            count, period = rule.threshold
            hits = self._hits.setdefault((rule.name, destination), deque())
            hits.append(now)
            while hits and hits[0] <= now - period:
                hits.popleft()
            if len(hits) < count or self.suspensions.until(destination, now) is not None:
                return None
            hits.clear()
            s = self.suspensions.new(destination, rule.duration, rule.reason or rule.name, now)
            log.warn("{destination}: throttled by rule {rule} ({reason}) until {until:.0f}",
                     destination=destination, rule=rule.name, reason=s.reason, until=s.until)
            return rule
        return None
