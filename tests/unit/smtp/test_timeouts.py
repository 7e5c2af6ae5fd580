"""Timeouts: RFC 5321 4.5.3.2 defaults, scaling, lookup by the state machine's keys."""

from __future__ import annotations

import pytest

from twisted_mailout.smtp.state import TIMEOUT_KEYS, Verb
from twisted_mailout.smtp.timeouts import QUIT_LIMIT, Timeouts


def test_rfc_5321_minimums_by_default():
    t = Timeouts()
    assert (t.greeting, t.mail, t.rcpt, t.data, t.data_block, t.data_done) == \
        (300, 300, 300, 120, 180, 600)


def test_scaled_caps_every_timeout():
    t = Timeouts.scaled(10)
    assert all(getattr(t, k) <= 10 for k in ("connect", "greeting", "helo", "mail", "rcpt",
                                             "data", "data_block", "data_done"))
    assert Timeouts.scaled(1000) == Timeouts()


def test_every_awaited_verb_has_a_timeout():
    t = Timeouts(helo=3)
    for verb in Verb:
        assert t.get(TIMEOUT_KEYS[verb]) > 0
    assert t.get("quit") == 3
    assert Timeouts().quit == QUIT_LIMIT
    with pytest.raises(AttributeError):
        t.get("nonsense")
