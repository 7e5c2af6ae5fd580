"""The throttling rule engine on a task.Clock: past its threshold a rule
suspends the destination (or its provider) for its duration, or lowers its
message rate, nothing else; both end by themselves; replies that do not match
count nothing. The rules are the shipped presets'."""

import pytest
from twisted.internet import task

from twisted_mailout.delivery.shaping import Shape, ShapeSettings, Shaper, ShapingConfig
from twisted_mailout.delivery.suspend import Suspensions
from twisted_mailout.delivery.throttle import Rule, ThrottleRules, parse_duration, parse_rate

DEFAULT_RULES = ShapingConfig.presets().rules

GMAIL = "421 4.7.28 Our system has detected an unusual rate of unsolicited mail"


def engine():
    clock = task.Clock()
    clock.advance(1_800_000_000)
    s = Suspensions()
    return clock, s, ThrottleRules(DEFAULT_RULES, s, clock)


def test_threshold_suspends_for_the_duration_then_it_ends():
    clock, s, rules = engine()
    assert rules.observe("gmail.com", GMAIL) is None  # 1 of 2
    clock.advance(600)
    # without a provider (shaping off, or no MX matched) the destination itself
    fired = rules.observe("gmail.com", GMAIL)
    assert fired is not None and fired.name == "google-rate"
    now = clock.seconds()
    assert s.until("gmail.com", now) == now + 3600
    assert s.until("example.org", now) is None  # only that destination
    clock.advance(3600)
    assert s.until("gmail.com", clock.seconds()) is None


def test_hits_outside_the_window_do_not_add_up():
    clock, s, rules = engine()
    rules.observe("gmail.com", GMAIL)
    clock.advance(3601)
    assert rules.observe("gmail.com", GMAIL) is None
    assert len(s) == 0


def test_other_replies_and_destinations_count_apart():
    clock, s, rules = engine()
    for reply in ("451 4.3.0 try later", "550 5.1.1 no such user", "421 4.7.0 busy"):
        assert rules.observe("gmail.com", reply) is None
    rules.observe("gmail.com", GMAIL)
    assert rules.observe("googlemail.com", GMAIL) is None
    assert rules.observe("outlook.com", "451 4.7.650 The mail server [192.0.2.1] has been "
                         "temporarily rate limited due to IP reputation") is None
    assert rules.observe("outlook.com", "451 4.7.650 again") is None  # a rate rule: no shaper
    assert rules.observe("yahoo.com", "421 4.7.0 [TSS04] Messages from 192.0.2.1 "
                         "temporarily deferred") is None
    assert rules.observe("yahoo.com", "421 4.7.0 [TSS04] Messages from 192.0.2.1 "
                         "temporarily deferred").name == "yahoo-tss04"
    assert len(s) == 1


def test_rates_and_bad_rules():
    assert parse_rate("2/h") == (2, 3600.0) and parse_rate("100/s") == (100, 1.0)
    assert parse_rate("5/30") == (5, 30.0)
    for bad in ("h", "0/h", "2/", "2/week", "-1/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError, match="bad pattern"):
        Rule.make("x", "(", "1/h", 60)
    with pytest.raises(ValueError, match="duration"):
        Rule.make("x", "421", "1/h", 0)


def test_provider_scope_suspends_every_domain_of_the_provider():
    clock, s, rules = engine()
    google = Shape("example.org", "provider:google", "google", ShapeSettings())
    rules.observe("example.org", GMAIL, google)
    # another Workspace domain counts with it: the threshold is per provider
    fired = rules.observe("gmail.com", GMAIL, Shape("gmail.com", "provider:google", "google",
                                                    ShapeSettings()))
    assert fired is not None and fired.name == "google-rate"
    now = clock.seconds()
    assert s.until("provider:google", now) == now + 3600
    assert s.until("gmail.com", now) is None and s.until("example.org", now) is None


def test_rate_rule_lowers_the_rate_then_it_comes_back():
    clock, s, _ = engine()
    config = ShapingConfig.presets()
    shaper = Shaper(config, router=None, clock=clock)
    saved = []
    rules = ThrottleRules(config.rules, s, clock, shaper=shaper, on_suspend=saved.append)
    ms = config.shape("outlook.com", ["outlook-com.olc.protection.outlook.com"])
    assert ms.key == "provider:microsoft" and shaper.message_rate(ms, clock.seconds()) is None
    reply = "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited"
    assert rules.observe("outlook.com", reply, ms) is None
    fired = rules.observe("outlook.com", reply, ms)
    assert fired is not None and fired.action == "rate"
    now = clock.seconds()
    assert shaper.message_rate(ms, now) == (1, 60.0)
    assert [t.key for t in shaper.throttles(now)] == ["provider:microsoft"]
    [held] = rules.in_force(now)
    assert held == {"key": "provider:microsoft", "kind": "rate", "rule": "microsoft-rate",
                    "reason": fired.reason, "until": now + 5400, "rate": "1/60s"}
    assert len(s) == 0 and saved == []  # a rate rule suspends nothing
    # slots are a minute apart while it lasts
    assert shaper.message_slot(ms, now) == now
    assert shaper.message_slot(ms, now) == now + 60
    clock.advance(90 * 60)
    assert shaper.message_rate(ms, clock.seconds()) is None
    assert shaper.throttles(clock.seconds()) == []


def test_a_suspending_rule_reports_the_suspension():
    clock, s, _ = engine()
    saved = []
    rules = ThrottleRules(DEFAULT_RULES, s, clock, on_suspend=saved.append)
    rules.observe("gmail.com", GMAIL)
    rules.observe("gmail.com", GMAIL)
    assert [x.domain for x in saved] == ["gmail.com"]
    # shown as throttled while it lasts; an operator's suspension is not
    s.new("other.test", 60, "operator", clock.seconds())
    [held] = rules.in_force(clock.seconds())
    assert (held["key"], held["kind"], held["rule"]) == ("gmail.com", "suspend", "google-rate")
    clock.advance(3600)
    assert rules.in_force(clock.seconds()) == [] and rules.made == {}


def test_durations_and_rule_forms():
    assert parse_duration("90m") == 5400 and parse_duration(30) == 30
    assert parse_duration("2h") == 7200 and parse_duration("1d") == 86400
    for bad in ("", "0s", "-1", "x", True, "5w"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError, match="unknown action"):
        Rule.make("x", "421", "1/h", 60, action="bounce")
    with pytest.raises(ValueError, match="unknown scope"):
        Rule.make("x", "421", "1/h", 60, scope="tenant")
    with pytest.raises(ValueError, match="max_message_rate"):
        Rule.make("x", "421", "1/h", 60, action="rate")
    with pytest.raises(ValueError, match="max_message_rate"):
        Rule.make("x", "421", "1/h", 60, rate="1/m")
