"""Relay specifications (twisted_mailout.routing.router.parse_relay): the
--relay and sendmail(relay=) forms and their default ports (RFC 6409, RFC 8314)."""

from __future__ import annotations

import pytest

from twisted_mailout.routing.router import parse_relay


@pytest.mark.parametrize("text, expected", [
    ("relay.example.net", ("relay.example.net", 25, False)),
    ("relay.example.net:2525", ("relay.example.net", 2525, False)),
    ("smtp://relay.example.net", ("relay.example.net", 587, False)),
    ("smtps://relay.example.net", ("relay.example.net", 465, True)),
    ("SMTPS://[::1]:1465", ("::1", 1465, True)),
])
def test_relay_forms(text, expected):
    assert parse_relay(text) == expected


@pytest.mark.parametrize("text", ["http://x", "smtp://u:p@relay", "smtp://relay/path", "smtps://"])
def test_bad_relay_forms(text):
    with pytest.raises(ValueError):
        parse_relay(text)
