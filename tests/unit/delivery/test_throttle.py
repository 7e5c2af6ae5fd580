"""The throttling rule engine on a task.Clock: past its threshold a rule
suspends the destination for its duration, nothing else; the suspension ends
by itself; replies that do not match count nothing."""

import pytest
from twisted.internet import task

from twisted_mailout.delivery.suspend import Suspensions
from twisted_mailout.delivery.throttle import DEFAULT_RULES, Rule, ThrottleRules, parse_rate

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
