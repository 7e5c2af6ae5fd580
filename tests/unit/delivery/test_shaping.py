"""The shaping file: sections laid over the presets, providers matched by MX
host names, clear errors naming the file and section; the rate limiter's
spacing."""

from __future__ import annotations

from pathlib import Path

import pytest

from twisted_mailout.delivery.retry import RetryPolicy
from twisted_mailout.delivery.shaping import RateLimiter, ShapingConfig, ShapingError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "shaping.toml"
    p.write_text(text)
    return str(p)


def test_presets_recognise_the_providers_by_mx() -> None:
    c = ShapingConfig.presets()
    cases = {
        "gmail-smtp-in.l.google.com.": "google", "alt1.aspmx.l.google.com": "google",
        "mta5.am0.yahoodns.net": "yahoo",
        "outlook-com.olc.protection.outlook.com": "microsoft",
        "contoso-com.mail.protection.outlook.com": "microsoft365",
        "contoso-com.j-v1.mx.microsoft": "microsoft365",
        "mx01.mail.icloud.com": "apple",
        "mx.example.net": None, "google.com.evil.test": None,
    }
    for host, provider in cases.items():
        shape = c.shape("some-domain.test", [host])
        assert shape.provider == provider, host
        assert shape.key == (f"provider:{provider}" if provider else "some-domain.test")
    g = c.shape("workspace.test", ["aspmx.l.google.com"]).settings
    assert (g.connection_limit, g.max_deliveries_per_connection) == (5, 50)
    assert {r.name for r in c.rules} == {"google-rate", "microsoft-rate", "yahoo-tss04"}


def test_file_over_presets_default_provider_domain(tmp_path: Path) -> None:
    path = write(tmp_path, '''
[default]
connection_limit = 8
max_message_rate = "100/s"
retry_interval = "10m"

[provider.google]
max_message_rate = "2000/h"
source_address = ["192.0.2.7", "2001:db8::7"]
ehlo = "mta7.example.com"

[provider.corp]
mx_suffixes = [".mx.corp.test"]
connection_limit = 2

[domain."Special.Test"]
max_recipients_per_message = 10
tls = "verify"

[domain."gmail.com"]
connection_limit = 3
''')
    c = ShapingConfig.load(path)
    # default only
    s = c.shape("plain.test", ["mx.plain.test"])
    assert s.key == "plain.test" and s.settings.connection_limit == 8
    assert s.settings.max_message_rate == (100, 1.0)
    assert s.settings.retry_policy(RetryPolicy()).base == 600
    # a preset provider changed by the file: settings merged field by field
    g = c.shape("gmail.com", ["gmail-smtp-in.l.google.com"])
    assert g.key == "provider:google"
    assert g.settings.max_message_rate == (2000, 3600.0)
    assert g.settings.max_deliveries_per_connection == 50  # from the preset
    assert g.settings.connection_limit == 3  # the domain's own section wins
    assert g.settings.source_address == ("192.0.2.7", "2001:db8::7")
    assert g.settings.ehlo == "mta7.example.com"
    # the file's own provider, and a domain section (name normalised)
    assert c.shape("x.test", ["a.mx.corp.test"]).settings.connection_limit == 2
    sp = c.shape("special.test", []).settings
    assert (sp.max_recipients_per_message, sp.tls) == (10, "verify")


def test_presets_false_and_rules(tmp_path: Path) -> None:
    path = write(tmp_path, '''
presets = false

[[rule]]
name = "busy"
pattern = '^421 .*busy'
threshold = "3/10m"
duration = "15m"
reason = "busy"

[[rule]]
name = "slow-down"
pattern = '^452 4\\.7\\.0'
threshold = "1/h"
action = "rate"
max_message_rate = "10/m"
scope = "provider"
duration = 600
''')
    c = ShapingConfig.load(path)
    assert c.providers == []
    assert c.shape("gmail.com", ["gmail-smtp-in.l.google.com"]).provider is None
    busy, slow = c.rules
    assert busy.threshold == (3, 600.0) and busy.duration == 900 and busy.action == "suspend"
    assert slow.rate == (10, 60.0) and slow.scope == "provider"


def test_a_file_rule_replaces_the_preset_of_its_name(tmp_path: Path) -> None:
    path = write(tmp_path, '''
[[rule]]
name = "google-rate"
pattern = '^421 4\\.7\\.28'
threshold = "5/h"
duration = "30m"
''')
    rules = {r.name: r for r in ShapingConfig.load(path).rules}
    assert rules["google-rate"].threshold == (5, 3600.0) and len(rules) == 3


@pytest.mark.parametrize("text, message", [
    ("[default]\nconection_limit = 3\n", r"\[default\]: unknown setting 'conection_limit'"),
    ("[default]\nconnection_limit = 0\n", "connection_limit: a whole number of at least 1"),
    ("[default]\nconnection_limit = true\n", "connection_limit"),
    ("[default]\nmax_message_rate = 100\n", "max_message_rate: a rate such as"),
    ("[default]\nmax_message_rate = \"100/week\"\n", "max_message_rate"),
    ("[default]\ntls = \"maybe\"\n", "unknown TLS level 'maybe'"),
    ("[default]\nsource_address = \"not-an-ip\"\n", "source_address"),
    ("[default]\nsource_address = [\"192.0.2.1\", \"192.0.2.2\"]\n", "one IPv4 and one IPv6"),
    ("[default]\nretry_interval = \"soon\"\n", "retry_interval"),
    ("[provider.new]\nconnection_limit = 2\n", r"\[provider.new\]: a provider needs mx_suffixes"),
    ("[provider.new]\nmx_suffixes = \".x.test\"\n", "mx_suffixes must be a list"),
    ("[tenant.x]\na = 1\n", r"unknown section \[tenant\]"),
    ("presets = \"yes\"\n", "presets must be true or false"),
    ("[[rule]]\nname = \"r\"\npattern = \"(\"\nthreshold = \"1/h\"\nduration = 60\n",
     r"\[\[rule\]\] 1: rule 'r': bad pattern"),
    ("[[rule]]\nname = \"r\"\npattern = \"421\"\nduration = 60\n", "a rule needs threshold"),
    ("[[rule]]\nname = \"r\"\npattern = \"421\"\nthreshold = \"1/h\"\nduration = 60\n"
     "action = \"bounce\"\n", "unknown action"),
    ("[[rule]]\nname = \"r\"\npattern = \"421\"\nthreshold = \"1/h\"\nduration = 60\n"
     "colour = 1\n", "unknown setting"),
    ("[default\n", "not valid TOML"),
])
def test_errors_name_the_file_and_section(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ShapingError, match=message) as e:
        ShapingConfig.load(path)
    assert path in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ShapingError, match="cannot read shaping file"):
        ShapingConfig.load(str(tmp_path / "nope.toml"))


def test_rate_limiter_spaces_slots_per_key() -> None:
    r = RateLimiter()
    t = 1000.0
    slots = [r.reserve("k", (20, 1.0), t) for _ in range(5)]
    assert slots == pytest.approx([1000.0, 1000.05, 1000.1, 1000.15, 1000.2])
    assert r.reserve("other", (20, 1.0), t) == t  # keys apart
    assert r.next_free("k", t) == pytest.approx(1000.25)
    # after an idle spell, no credit is saved up: the next slot is now
    assert r.reserve("k", (20, 1.0), 2000.0) == 2000.0
    assert r.reserve("k", (20, 1.0), 2000.0) == pytest.approx(2000.05)
