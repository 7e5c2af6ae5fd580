"""The shaping file's TLS level applies where the policy table has no entry
for the destination; an entry in the table wins."""

from twisted_mailout.tls.policy import PolicyTable, TLSPolicy
from twisted_mailout.tls.resolve import SecurityResolver


def decide(table: PolicyTable, key: str, fallback: TLSPolicy | None, relay=None):
    d = SecurityResolver(table, None).for_destination(key, relay, fallback)
    box: list = []
    d.addBoth(box.append)
    return box[0].policy


def test_the_fallback_replaces_the_default_only() -> None:
    table = PolicyTable(TLSPolicy("may"), {"listed.test": TLSPolicy("encrypt")})
    shaped = TLSPolicy("verify", source="shaping")
    assert decide(table, "other.test", shaped).level == "verify"
    assert decide(table, "listed.test", shaped).level == "encrypt"
    assert decide(table, "other.test", None).level == "may"
    assert decide(table, "relay", shaped, relay="smtp.relay.test").level == "verify"
