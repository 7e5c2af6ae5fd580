"""Automatic throttling: rules that act when a destination's replies say the
sender goes too fast (issue 12 item 3; KumoMTA's automation rules).

A L{Rule} is a regular expression over a reply (C{"CODE ENHANCED TEXT"}, as
the outcome events carry it), a threshold (C{"2/h"}: that many matching
replies from one destination within that period), and an action for a
duration, with a reason:

  - C{suspend}: add a suspension of the destination (C{scope =
    "destination"}) or of its whole provider (C{scope = "provider"}) to the
    daemon's L{Suspensions}: its mail stays queued (nothing is bounced, no
    attempt counted) and flows again by itself when the suspension ends;
  - C{rate}: lower the message rate of the destination's shaping key
    (L{twisted_mailout.delivery.shaping.Shaper.lower_rate}) for the duration.

L{ThrottleRules} counts matching replies per rule and destination over a
sliding window. Pure and clock-driven: C{observe} is called with each
outcome, no I/O. The rules come from the shaping file (C{[[rule]]}; the
shipped presets hold the rules for Google's, Microsoft's and Yahoo's
throttling replies).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.logger import Logger

from twisted_mailout.delivery.suspend import Suspensions
from twisted_mailout.queue.model import Suspension

__all__ = ["Rule", "ThrottleRules", "parse_duration", "parse_rate"]

log = Logger()

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ALIASES = {"sec": "s", "second": "s", "min": "m", "minute": "m", "hr": "h", "hour": "h",
            "day": "d"}


def parse_rate(text: str) -> tuple[int, float]:
    """C{"2/h"} -> C{(2, 3600.0)}: a count per period.

    @param text: C{COUNT/PERIOD}; PERIOD is a unit (s, m, h, d, or sec,
        min, hour, day), a duration (C{"10m"}) or a number of seconds
        (C{"5/30"}).
    @return: C{(count, seconds)}.
    @raise ValueError: malformed, or a count or period not above 0.
    """
    count_s, _, unit = text.strip().partition("/")
    unit = _ALIASES.get(unit, unit)
    try:
        count = int(count_s)
        period = _UNITS[unit] if unit in _UNITS else parse_duration(unit)
    except (ValueError, KeyError):
        raise ValueError(f"a rate is COUNT/PERIOD (s, m, h, d, or a duration such as 10m), "
                         f"such as '2/h', not {text!r}") from None
    if count < 1:
        raise ValueError(f"a rate needs a count and a period above 0, not {text!r}")
    return count, period


def parse_duration(value: object) -> float:
    """A duration: a number of seconds, or text such as C{"90m"}, C{"2h"},
    C{"30s"}, C{"1d"}, C{"45"}.

    @return: seconds, above 0.
    @raise ValueError: malformed, or not above 0.
    """
    if isinstance(value, bool):
        raise ValueError(f"a duration such as \"90m\" or a number of seconds, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        unit = text[-1] if text[-1] in _UNITS else ""
        try:
            seconds = float(text[:-1] if unit else text) * (_UNITS[unit] if unit else 1.0)
        except ValueError:
            raise ValueError(f"a duration such as \"90m\" or a number of seconds, "
                             f"not {value!r}") from None
    else:
        raise ValueError(f"a duration such as \"90m\" or a number of seconds, not {value!r}")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"a duration must be above 0 seconds, not {value!r}")
    return seconds


ACTIONS = ("suspend", "rate")
SCOPES = ("destination", "provider")


@dataclass(frozen=True)
class Rule:
    """One throttling rule.

    @ivar name: for logs and the suspension's reason.
    @ivar pattern: a regular expression searched in C{"CODE ENHANCED TEXT"}.
    @ivar threshold: C{(count, seconds)}: that many matches within that many
        seconds from one destination trigger the action.
    @ivar duration: seconds the action lasts.
    @ivar reason: the suspension's or throttle's reason (the rule's name
        when empty).
    @ivar action: C{"suspend"} or C{"rate"}.
    @ivar scope: C{"destination"} (the recipient domain) or C{"provider"}
        (every domain of the destination's provider; the destination alone
        when it has none).
    @ivar rate: for C{action = "rate"}: the lowered message rate,
        C{(count, seconds)}.
    """

    name: str
    pattern: re.Pattern[str]
    threshold: tuple[int, float]
    duration: float
    reason: str = ""
    action: str = "suspend"
    scope: str = "destination"
    rate: tuple[int, float] | None = None

    @classmethod
    def make(cls, name: str, pattern: str, threshold: str, duration: float,
             reason: str = "", action: str = "suspend", scope: str = "destination",
             rate: str | None = None) -> Rule:
        """A rule from its text form (as the shaping file gives it).

        @param rate: C{"10/m"}: the lowered rate, required with
            C{action = "rate"} and refused otherwise.
        @raise ValueError: a bad regular expression, rate, duration, action
            or scope.
        """
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule {name!r}: bad pattern {pattern!r}: {e}") from None
        if not duration > 0:
            raise ValueError(f"rule {name!r}: the duration must be above 0 seconds")
        if action not in ACTIONS:
            raise ValueError(f"rule {name!r}: unknown action {action!r}; expected one of "
                             f"{', '.join(ACTIONS)}")
        if scope not in SCOPES:
            raise ValueError(f"rule {name!r}: unknown scope {scope!r}; expected one of "
                             f"{', '.join(SCOPES)}")
        if (action == "rate") != (rate is not None):
            raise ValueError(f"rule {name!r}: max_message_rate goes with action = \"rate\" "
                             f"(and only with it)")
        return cls(name, compiled, parse_rate(threshold), float(duration), reason, action,
                   scope, parse_rate(str(rate)) if rate is not None else None)


class _Clock(Protocol):
    def seconds(self) -> float: ...


class _Shape(Protocol):
    key: str
    provider: str | None


class _Shaper(Protocol):
    def lower_rate(self, key: str, rate: tuple[int, float], until: float, rule: str,
                   reason: str) -> None: ...


class ThrottleRules:
    """Counts matching replies per rule and destination; acts past the
    threshold.

    @param rules: the L{Rule}s, tried in order (the first that matches a
        reply counts it).
    @param suspensions: where a triggered C{suspend} rule adds its
        suspension (the scheduler's L{Suspensions}).
    @param clock: has C{seconds()}.
    @param shaper: the L{twisted_mailout.delivery.shaping.Shaper} a C{rate}
        rule lowers rates in (L{None}: C{rate} rules do nothing).
    @param on_suspend: called with each L{Suspension} a rule makes (the
        daemon saves it so it outlives a restart).
    """

    def __init__(self, rules: Iterable[Rule], suspensions: Suspensions, clock: _Clock,
                 shaper: _Shaper | None = None,
                 on_suspend: Callable[[Suspension], object] | None = None) -> None:
        self.rules = list(rules)
        self.suspensions = suspensions
        self.clock = clock
        self.shaper = shaper
        self.on_suspend = on_suspend
        self._hits: dict[tuple[str, str], deque[float]] = {}
        #: C{{key: until}} of the C{rate} rules in force (to act once each).
        self._lowered: dict[str, float] = {}
        #: C{{suspension id: rule name}} of the suspensions rules made.
        self.made: dict[str, str] = {}

    def in_force(self, now: float) -> list[dict[str, object]]:
        """What the rules hold in force at C{now}, for the status page and
        metrics: C{[{"key", "kind", "rule", "reason", "until"}]} with
        C{kind} C{"suspend"} (C{key} the suspended domain or
        C{"provider:NAME"}) or C{"rate"} (also C{"rate"}: C{"COUNT/SECONDSs"}),
        ordered by C{until}.
        """
        out: list[dict[str, object]] = []
        for s in self.suspensions.active(now):
            rule = self.made.get(s.id)
            if rule is not None:
                out.append({"key": s.domain, "kind": "suspend", "rule": rule,
                            "reason": s.reason, "until": s.until})
        throttles = getattr(self.shaper, "throttles", None)
        for t in throttles(now) if throttles is not None else ():
            out.append({"key": t.key, "kind": "rate", "rule": t.rule, "reason": t.reason,
                        "until": t.until, "rate": f"{t.rate[0]}/{t.rate[1]:g}s"})
        for sid in [k for k in self.made if self.suspensions.get(k) is None]:
            del self.made[sid]  # ended or cancelled
        return sorted(out, key=lambda d: float(d["until"]))  # type: ignore[arg-type]

    def observe(self, destination: str, reply: str, shape: _Shape | None = None) -> Rule | None:
        """Count one reply from C{destination}.

        @param destination: the recipient domain (what a suspension names).
        @param reply: C{"CODE ENHANCED TEXT"} on one line.
        @param shape: the destination's shape (its provider and shaping
            key), or L{None} when shaping is off.
        @return: the rule that acted now, or L{None}.
        """
        now = float(self.clock.seconds())
        for rule in self.rules:
            if not rule.pattern.search(reply):
                continue
            target = destination
            if rule.scope == "provider" and shape is not None and shape.provider:
                target = shape.key
            count, period = rule.threshold
            hits = self._hits.setdefault((rule.name, target), deque())
            hits.append(now)
            while hits and hits[0] <= now - period:
                hits.popleft()
            if len(hits) < count:
                return None
            reason = rule.reason or rule.name
            if rule.action == "rate":
                key = shape.key if shape is not None else destination
                if self.shaper is None or self._lowered.get(key, 0.0) > now:
                    return None
                assert rule.rate is not None
                hits.clear()
                until = now + rule.duration
                self._lowered[key] = until
                self.shaper.lower_rate(key, rule.rate, until, rule.name, reason)
                log.warn("{destination}: throttled by rule {rule} ({reason}): message rate "
                         "of {key} lowered to {count}/{period:g}s until {until:.0f}",
                         destination=destination, rule=rule.name, reason=reason, key=key,
                         count=rule.rate[0], period=rule.rate[1], until=until,
                         throttled=True)
                return rule
            if self.suspensions.until(target, now) is not None:
                return None
            hits.clear()
            s = self.suspensions.new(target, rule.duration, reason, now)
            self.made[s.id] = rule.name
            log.warn("{destination}: throttled by rule {rule} ({reason}): {target} suspended "
                     "until {until:.0f}", destination=destination, rule=rule.name,
                     reason=s.reason, target=target, until=s.until, throttled=True)
            if self.on_suspend is not None:
                try:
                    self.on_suspend(s)
                except Exception:  # noqa: BLE001 - an observer must not stop delivery
                    log.failure("saving the suspension {sid} failed", sid=s.id)
            return rule
        return None
