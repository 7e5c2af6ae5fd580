"""The TLS policy file and levels (twisted_mailout.tls.policy, tls.levels):
lookup order, the names a certificate must match per level, mistakes named
with their line, and the one list of levels every layer checks against."""

from __future__ import annotations

import pytest

from twisted_mailout.apps.deliveries import TLS_CHOICES
from twisted_mailout.daemon.config import Config, ConfigError
from twisted_mailout.smtp.protocol import TLS_LEVELS
from twisted_mailout.tls.levels import LEVELS, REQUIRED, check_level
from twisted_mailout.tls.policy import PolicyFileError, PolicyTable, TLSPolicy


def test_policy_file_lookup_order(tmp_path):
    f = tmp_path / "policy"
    f.write_text("""
# comment
example.com        secure
.example.com       verify   # every subdomain
.sub.example.com   encrypt
bank.example       secure match=mx.bankhost.net:.bank.example
[relay.example.net]:587  verify
legacy.example     none
""")
    t = PolicyTable.from_file(str(f), TLSPolicy("may"))
    assert t.lookup("example.com").level == "secure"
    assert t.lookup("EXAMPLE.COM.").level == "secure"
    assert t.lookup("a.example.com").level == "verify"
    assert t.lookup("x.sub.example.com").level == "encrypt"
    assert t.lookup("other.example").level == "may"
    assert t.lookup("relay.example.net:587").level == "verify"
    assert t.lookup("smtp://relay.example.net:587").level == "verify"
    bank = t.lookup("bank.example")
    assert bank.names_for("bank.example", "mx1.attacker.test") == ("mx.bankhost.net",
                                                                   ".bank.example")
    assert t.lookup("legacy.example").source.endswith(":8")  # the text starts with a newline


@pytest.mark.parametrize("content, message", [
    ("example.com\n", ":1: expected"),
    ("example.com strict\n", "unknown TLS level 'strict'"),
    ("example.com may match=x\n", "match= applies only"),
    ("example.com verify cipher=high\n", "unknown option"),
    ("example.com may\nEXAMPLE.com verify\n", ":2: EXAMPLE.com is listed twice"),
])
def test_policy_file_mistakes_name_the_line(tmp_path, content, message):
    f = tmp_path / "policy"
    f.write_text(content)
    with pytest.raises(PolicyFileError, match=message):
        PolicyTable.from_file(str(f))
    with pytest.raises(ConfigError, match="--tls-policy"):
        Config(queue=str(tmp_path / "q"), tls_policy=str(f))


def test_secure_names_default_to_the_recipient_domain_and_its_subdomains():
    p = TLSPolicy("secure")
    assert p.names_for("example.com", "mx.attacker.test") == ("example.com", ".example.com")
    assert TLSPolicy("verify").names_for("example.com", "MX.Example.com") == ("mx.example.com",)
    assert p.names_for(None, "relay.example.net") == ("relay.example.net",)


def test_one_list_of_levels():
    assert LEVELS == ("none", "may", "encrypt", "verify", "secure", "dane", "dane-only")
    assert REQUIRED == {"encrypt", "verify", "secure", "dane-only"}
    # the session's and the deliveries' lists are the same object (deliveries'
    # own copy used to lack dane and dane-only)
    assert TLS_LEVELS is LEVELS and TLS_CHOICES is LEVELS
    assert check_level("dane-only") == "dane-only"
    with pytest.raises(ValueError, match="unknown --tls 'strict'; expected one of none, may"):
        check_level("strict", "--tls")
    with pytest.raises(ValueError, match="unknown TLS level"):
        TLSPolicy("strict")
    assert TLSPolicy("encrypt").required and not TLSPolicy("dane").required
