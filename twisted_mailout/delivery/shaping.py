"""Traffic shaping per destination and per provider (issue 12 item 2;
KumoMTA's shaping.toml, Postfix's per-transport concurrency and rate delay).

A shaping file (TOML, read with the standard library's C{tomllib}) has a
C{[default]} section, C{[domain."example.com"]} sections and
C{[provider.NAME]} sections; a provider is recognised by its MX host names
(C{mx_suffixes = [".google.com", ".googlemail.com"]}), whatever the
recipient domain. The settings a destination gets are the defaults, then its
provider's, then its domain's (later ones win, field by field).

Limits hold per I{shaping key}: the provider (C{"provider:google"}) for
every domain that provider serves, so all of Google's domains together stay
under Google's limits, and the domain itself otherwise. C{[[rule]]} tables
are the throttling rules (L{twisted_mailout.delivery.throttle}).

The presets for Google, Yahoo, Microsoft and Apple ship in C{presets.toml}
beside this module, with their sources; a shaping file builds on them unless
it says C{presets = false}.

Pure: parsing and matching do no I/O besides reading the file; the runtime
part (L{Shaper}) takes its clock and router as arguments.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from twisted_mailout.delivery.retry import RetryPolicy
from twisted_mailout.delivery.throttle import Rule, parse_duration, parse_rate
from twisted_mailout.tls.levels import LEVELS

__all__ = [
    "PRESETS",
    "Provider",
    "RateLimiter",
    "Shape",
    "ShapeSettings",
    "Shaper",
    "ShapingConfig",
    "ShapingError",
    "Throttle",
]

log = Logger()

#: The presets file shipped with the package.
PRESETS = "presets.toml"

Rate = tuple[int, float]


class ShapingError(ValueError):
    """A shaping file that cannot be used; the message names the file and
    the section or setting."""


@dataclass(frozen=True)
class ShapeSettings:
    """The shaping settings of a destination; L{None} means "not set here"
    (the next layer down, or the daemon's own option, applies).

    @ivar connection_limit: connections open at once, all of the daemon's
        connections together, per shaping key.
    @ivar max_message_rate: C{(count, seconds)}: transactions started at
        most, per shaping key (a rate delays mail, never defers it).
    @ivar max_connection_rate: C{(count, seconds)}: connections opened at
        most, per shaping key.
    @ivar max_deliveries_per_connection: transactions per connection at most.
    @ivar max_recipients_per_message: RCPT TO per transaction at most (more
        recipients go in further transactions at once).
    @ivar tls: the TLS level (L{twisted_mailout.tls.levels.LEVELS}) when the
        TLS policy table has no entry for the destination.
    @ivar retry_interval: seconds before the first retry.
    @ivar max_retry_interval: the longest wait between retries, seconds.
    @ivar source_address: local addresses to connect from (one IPv4, one
        IPv6 at most).
    @ivar ehlo: the EHLO name that belongs with C{source_address}.
    """

    connection_limit: int | None = None
    max_message_rate: Rate | None = None
    max_connection_rate: Rate | None = None
    max_deliveries_per_connection: int | None = None
    max_recipients_per_message: int | None = None
    tls: str | None = None
    retry_interval: float | None = None
    max_retry_interval: float | None = None
    source_address: tuple[str, ...] | None = None
    ehlo: str | None = None

    def over(self, below: ShapeSettings) -> ShapeSettings:
        """These settings laid over C{below}: each field set here wins."""
        return replace(below, **{f.name: getattr(self, f.name) for f in fields(self)
                                 if getattr(self, f.name) is not None})

    def retry_policy(self, base: RetryPolicy) -> RetryPolicy:
        """C{base} with this destination's retry schedule, when it has one."""
        if self.retry_interval is None and self.max_retry_interval is None:
            return base
        first = self.retry_interval if self.retry_interval is not None else base.base
        most = self.max_retry_interval if self.max_retry_interval is not None else base.max
        return replace(base, base=first, max=max(first, most))

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str,
                   extra: Iterable[str] = ()) -> ShapeSettings:
        """Settings from one TOML table.

        @param table: the section's keys and values.
        @param where: names the section in errors (C{"FILE [provider.google]"}).
        @param extra: further keys the caller reads itself (ignored here).
        @raise ShapingError: an unknown setting or a bad value.
        """
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in table.items():
            if name in extra:
                continue
            if name not in known:
                raise ShapingError(f"{where}: unknown setting {name!r}; expected one of "
                                   f"{', '.join(sorted(known | set(extra)))}")
            try:
                values[name] = _convert(name, value)
            except (TypeError, ValueError) as e:
                raise ShapingError(f"{where}: {name}: {e}") from None
        return cls(**values)


def _convert(name: str, value: Any) -> Any:
    if name in ("connection_limit", "max_deliveries_per_connection",
                "max_recipients_per_message"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"a whole number of at least 1, not {value!r}")
        return value
    if name in ("max_message_rate", "max_connection_rate"):
        if not isinstance(value, str):
            raise TypeError(f"a rate such as \"100/s\" or \"2000/h\", not {value!r}")
        return parse_rate(value)
    if name in ("retry_interval", "max_retry_interval"):
        return parse_duration(value)
    if name == "tls":
        if value not in LEVELS:
            raise ValueError(f"unknown TLS level {value!r}; expected one of {', '.join(LEVELS)}")
        return value
    if name == "source_address":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
            raise TypeError("an address or a list of addresses")
        from ipaddress import ip_address
        parsed = [ip_address(a) for a in items]
        if len(parsed) > 2 or len({p.version for p in parsed}) != len(parsed):
            raise ValueError("at most one IPv4 and one IPv6 address")
        return tuple(str(p) for p in parsed)
    if name == "ehlo":
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            raise ValueError(f"a host name, not {value!r}")
        return value
    raise AssertionError(name)  # pragma: no cover - from_table checked the name


@dataclass(frozen=True)
class Provider:
    """A mailbox provider recognised by its MX host names.

    @ivar name: as in C{[provider.NAME]}.
    @ivar mx_suffixes: lower-case suffixes (C{".google.com"}); an MX host
        ending in one of them (or equal to it without the dot) belongs here.
    @ivar settings: its L{ShapeSettings}.
    """

    name: str
    mx_suffixes: tuple[str, ...]
    settings: ShapeSettings

    def matches(self, host: str) -> bool:
        """Whether MX host C{host} belongs to this provider."""
        h = host.lower().rstrip(".")
        return any(h.endswith(s) or h == s.lstrip(".") for s in self.mx_suffixes)


@dataclass(frozen=True)
class Shape:
    """What shaping decides for one destination.

    @ivar destination: the destination key (recipient domain or relay key).
    @ivar key: the shaping key its limits are counted under:
        C{"provider:NAME"} or the destination itself.
    @ivar provider: the provider's name, or L{None}.
    @ivar settings: the merged L{ShapeSettings}.
    """

    destination: str
    key: str
    provider: str | None
    settings: ShapeSettings


@dataclass
class ShapingConfig:
    """A loaded shaping file (with the presets under it unless disabled).

    @ivar default: the C{[default]} settings.
    @ivar domains: C{{domain: ShapeSettings}}, keys lower case.
    @ivar providers: the providers, in file order (the first that matches
        an MX host wins).
    @ivar rules: the throttling L{Rule}s.
    @ivar sources: the files read, for logs.
    """

    default: ShapeSettings = field(default_factory=ShapeSettings)
    domains: dict[str, ShapeSettings] = field(default_factory=dict)
    providers: list[Provider] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str) -> ShapingConfig:
        """Read a shaping file, on top of the shipped presets unless it says
        C{presets = false}.

        @param path: the file.
        @raise ShapingError: unreadable file, bad TOML, unknown section or
            setting, bad value; the message names the file and the section.
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ShapingError(f"cannot read shaping file {path}: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ShapingError(f"shaping file {path}: not valid TOML: {e}") from None
        use_presets = data.pop("presets", True)
        if not isinstance(use_presets, bool):
            raise ShapingError(f"{path}: presets must be true or false")
        config = cls.presets() if use_presets else cls()
        config.add(data, path)
        return config

    @classmethod
    def presets(cls) -> ShapingConfig:
        """The shipped presets alone (Google, Yahoo, Microsoft, Apple and their
        throttling rules)."""
        text = resources.files(__package__).joinpath(PRESETS).read_text("utf-8")
        config = cls()
        config.add(tomllib.loads(text), f"{__package__}/{PRESETS}")
        return config

    def add(self, data: Mapping[str, Any], source: str) -> None:
        """Lay one parsed file over this configuration: settings field by
        field, providers by name, rules by name (a rule with the name of an
        earlier one replaces it).

        @raise ShapingError: as L{load}.
        """
        self.sources.append(source)
        for section, body in data.items():
            if section == "default":
                self.default = ShapeSettings.from_table(_table(body, source, section),
                                                        f"{source} [default]").over(self.default)
            elif section == "domain":
                for name, table in _table(body, source, section).items():
                    d = name.strip().lower().rstrip(".")
                    s = ShapeSettings.from_table(_table(table, source, f"domain.{name}"),
                                                 f"{source} [domain.\"{name}\"]")
                    self.domains[d] = s.over(self.domains.get(d, ShapeSettings()))
            elif section == "provider":
                for name, table in _table(body, source, section).items():
                    self._add_provider(name, _table(table, source, f"provider.{name}"), source)
            elif section == "rule":
                if not isinstance(body, list):
                    raise ShapingError(f"{source}: rules are [[rule]] tables")
                for i, table in enumerate(body, 1):
                    rule = _rule(_table(table, source, f"rule {i}"), f"{source} [[rule]] {i}")
                    self.rules = [r for r in self.rules if r.name != rule.name] + [rule]
            else:
                raise ShapingError(f"{source}: unknown section [{section}]; expected "
                                   f"presets, [default], [domain.\"NAME\"], [provider.NAME] "
                                   f"or [[rule]]")

    def _add_provider(self, name: str, table: dict[str, Any], source: str) -> None:
        where = f"{source} [provider.{name}]"
        settings = ShapeSettings.from_table(table, where, extra=("mx_suffixes",))
        old = next((p for p in self.providers if p.name == name), None)
        suffixes: tuple[str, ...]
        if "mx_suffixes" in table:
            raw = table["mx_suffixes"]
            if (not isinstance(raw, list) or not raw
                    or not all(isinstance(s, str) and s.strip(". ") for s in raw)):
                raise ShapingError(f"{where}: mx_suffixes must be a list of host name "
                                   f"suffixes such as [\".google.com\"]")
            suffixes = tuple(s.strip().lower().rstrip(".") for s in raw)
        elif old is not None:
            suffixes = old.mx_suffixes
        else:
            raise ShapingError(f"{where}: a provider needs mx_suffixes")
        if old is not None:
            settings = settings.over(old.settings)
        provider = Provider(name, suffixes, settings)
        self.providers = ([provider if p.name == name else p for p in self.providers]
                          if old is not None else [*self.providers, provider])

    def provider_for(self, mx_hosts: Iterable[str]) -> Provider | None:
        """The provider the first matching MX host belongs to, or L{None}."""
        for host in mx_hosts:
            for p in self.providers:
                if p.matches(host):
                    return p
        return None

    def provider_named(self, name: str) -> Provider | None:
        """The provider called C{name}, or L{None}."""
        return next((p for p in self.providers if p.name == name), None)

    def shape(self, destination: str, mx_hosts: Sequence[str]) -> Shape:
        """The settings of one destination.

        @param destination: the recipient domain (A-label) or relay key.
        @param mx_hosts: its next hops' host names, in order (may be empty
            when routing failed: then only the default and domain apply).
        @return: a L{Shape}.
        """
        d = destination.lower().rstrip(".")
        settings = self.default
        provider = self.provider_for(mx_hosts)
        if provider is not None:
            settings = provider.settings.over(settings)
        own = self.domains.get(d)
        if own is not None:
            settings = own.over(settings)
        key = f"provider:{provider.name}" if provider is not None else d
        return Shape(d, key, provider.name if provider else None, settings)


def _table(body: Any, source: str, where: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ShapingError(f"{source}: [{where}] must be a table")
    return body


def _rule(table: dict[str, Any], where: str) -> Rule:
    known = {"name", "pattern", "threshold", "action", "scope", "duration", "reason",
             "max_message_rate"}
    unknown = set(table) - known
    if unknown:
        raise ShapingError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; "
                           f"expected {', '.join(sorted(known))}")
    for need in ("name", "pattern", "threshold", "duration"):
        if need not in table:
            raise ShapingError(f"{where}: a rule needs {need}")
    try:
        return Rule.make(str(table["name"]), str(table["pattern"]), str(table["threshold"]),
                         parse_duration(table["duration"]), str(table.get("reason", "")),
                         action=str(table.get("action", "suspend")),
                         scope=str(table.get("scope", "destination")),
                         rate=table.get("max_message_rate"))
    except (TypeError, ValueError) as e:
        raise ShapingError(f"{where}: {e}") from None


# -- the runtime part ------------------------------------------------------------


class _Clock(Protocol):
    def seconds(self) -> float: ...


class RateLimiter:
    """Spacing per key (the generic cell rate algorithm with no burst): a
    rate of C{count} per C{seconds} lets one event through every
    C{seconds / count} seconds, so no window of any length holds more than
    its share plus one. Callers reserve a slot and wait until it comes.
    """

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    def reserve(self, key: str, rate: Rate, now: float) -> float:
        """Take the next slot of C{key}.

        @param rate: C{(count, seconds)}.
        @param now: seconds.
        @return: when the slot comes (C{now} or later), seconds.
        """
        count, period = rate
        slot = max(now, self._next.get(key, 0.0))
        self._next[key] = slot + period / count
        return slot

    def next_free(self, key: str, now: float) -> float:
        """When the next slot of C{key} comes, without taking it."""
        return max(now, self._next.get(key, 0.0))


@dataclass(frozen=True)
class Throttle:
    """A rule's lowered message rate in force for a shaping key.

    @ivar key: the shaping key.
    @ivar rate: C{(count, seconds)}.
    @ivar until: when it ends, seconds since the epoch.
    @ivar rule: the rule's name.
    @ivar reason: the rule's reason.
    """

    key: str
    rate: Rate
    until: float
    rule: str
    reason: str


class Shaper:
    """Shaping at run time: classifies destinations (by routing them), keeps
    the rate slots of every shaping key, and the rates lowered by rules.

    @param config: the L{ShapingConfig}.
    @param router: an L{IRouter}: C{route(destination)} gives the next hops
        (MX answers are cached by the router).
    @param clock: has C{seconds()}.
    """

    def __init__(self, config: ShapingConfig, router: Any, clock: _Clock) -> None:
        self.config = config
        self.router = router
        self.clock = clock
        self.messages = RateLimiter()
        self.connections = RateLimiter()
        self._shapes: dict[str, Shape] = {}
        self._throttles: dict[str, Throttle] = {}

    def cached(self, destination: str) -> Shape | None:
        """The shape found for C{destination} before, or L{None}."""
        return self._shapes.get(destination)

    def classify(self, destination: str) -> defer.Deferred[Shape]:
        """The L{Shape} of C{destination}: its MX hosts decide the provider.

        @return: a Deferred that never fails: when routing fails the shape
            has no provider (and is not remembered, so the next call tries
            again).
        """
        shape = self._shapes.get(destination)
        if shape is not None:
            return defer.succeed(shape)
        return defer.Deferred.fromCoroutine(self._classify(destination))

    async def _classify(self, destination: str) -> Shape:
        try:
            hops = await self.router.route(destination)
        except Exception:  # noqa: BLE001 - routing errors are the connector's to report
            return self.config.shape(destination, ())
        shape = self.config.shape(destination, [h.host for h in hops])
        self._shapes[destination] = shape
        return shape

    def destinations_of(self, key: str) -> list[str]:
        """The destinations classified under shaping key C{key} so far (a
        provider's domains), sorted."""
        return sorted(d for d, s in self._shapes.items() if s.key == key)

    def forget(self, destination: str) -> None:
        """Classify C{destination} afresh next time (its MX may have changed)."""
        self._shapes.pop(destination, None)

    def message_rate(self, shape: Shape, now: float) -> Rate | None:
        """The message rate in force for C{shape}'s key: a rule's lowered
        rate while it lasts, else the setting."""
        t = self._throttles.get(shape.key)
        if t is not None:
            if t.until > now:
                return t.rate
            del self._throttles[shape.key]
            log.info("{key}: throttle by rule {rule} ended; normal rates again",
                     key=shape.key, rule=t.rule)
        return shape.settings.max_message_rate

    def message_slot(self, shape: Shape, now: float) -> float:
        """Take a message slot for C{shape}: when the transaction may start
        (C{now} when there is no rate)."""
        rate = self.message_rate(shape, now)
        return now if rate is None else self.messages.reserve(shape.key, rate, now)

    def connection_slot(self, shape: Shape, now: float) -> float:
        """Take a connection slot: when a new connection may be opened."""
        rate = shape.settings.max_connection_rate
        return now if rate is None else self.connections.reserve(shape.key, rate, now)

    def lower_rate(self, key: str, rate: Rate, until: float, rule: str, reason: str) -> None:
        """A rule lowers C{key}'s message rate to C{rate} until C{until}."""
        self._throttles[key] = Throttle(key, rate, until, rule, reason)

    def throttles(self, now: float) -> list[Throttle]:
        """The lowered rates in force at C{now} (ended ones are dropped)."""
        for key in [k for k, t in self._throttles.items() if t.until <= now]:
            del self._throttles[key]
        return sorted(self._throttles.values(), key=lambda t: t.key)
