"""The per-host security decision: which TLS level and which server check
each next hop gets from the policy table, MTA-STS and DANE."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from twisted_mailout.routing.dnssec import DNSSECLookupError
from twisted_mailout.routing.router import NextHop
from twisted_mailout.tls.creators import ClientTLS
from twisted_mailout.tls.policy import PolicyTable, TLSPolicy
from twisted_mailout.tls.resolve import (
    DestinationSecurity,
    HostSecurity,
    ReportPolicy,
    SecurityRefused,
    SecurityResolver,
)

HOP = NextHop("mx1.example.org", 25, 10)


def fired(d: defer.Deferred) -> object:
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def refused(d: defer.Deferred) -> SecurityRefused:
    with pytest.raises(SecurityRefused) as info:
        fired(d)
    return info.value


@dataclass
class StsPolicy:
    mode: str
    mx: tuple[str, ...] = ("mx1.example.org",)

    def matches(self, host: str) -> bool:
        return host in self.mx

    def lines(self) -> list[str]:
        return ["version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx)]


class FakeMTASTS:
    def __init__(self, policy: StsPolicy | None):
        self.policy = policy
        self.asked: list[str] = []

    def policy_for(self, domain: str) -> defer.Deferred:
        self.asked.append(domain)
        return defer.succeed(self.policy)


class BogusDNSSEC:
    def mx(self, domain: str) -> defer.Deferred:
        return defer.fail(DNSSECLookupError(domain, 15, 2, "SERVFAIL (bogus)"))


def host(resolver: SecurityResolver, key: str = "example.org",
         relay: str | None = None, hop: NextHop = HOP) -> HostSecurity:
    dest = fired(resolver.for_destination(key, relay))
    assert isinstance(dest, DestinationSecurity)
    result = fired(resolver.for_host(dest, hop))
    assert isinstance(result, HostSecurity)
    return result


@pytest.mark.parametrize("level", ["none", "may", "encrypt"])
def test_levels_without_a_certificate_check_get_no_creator(level: str) -> None:
    sec = host(SecurityResolver(PolicyTable(TLSPolicy(level))))
    assert (sec.level, sec.creator, sec.report, sec.diagnose) == (level, None, None, False)


@pytest.mark.parametrize("level", ["verify", "secure"])
def test_verify_and_secure_get_a_name_checking_creator(level: str) -> None:
    sec = host(SecurityResolver(PolicyTable(TLSPolicy(level))))
    assert sec.level == level and isinstance(sec.creator, ClientTLS)


def test_a_relay_uses_the_relay_entry_of_the_policy_table_and_no_mta_sts() -> None:
    table = PolicyTable(TLSPolicy("may"), {"[relay.example.net]:587": TLSPolicy("encrypt")})
    sts = FakeMTASTS(StsPolicy("enforce", ("other.example.org",)))
    resolver = SecurityResolver(table, mta_sts=sts)
    sec = host(resolver, "relay", relay="[relay.example.net]:587")
    assert sec.level == "encrypt" and sts.asked == []


def test_dane_only_without_a_validating_resolver_is_refused() -> None:
    resolver = SecurityResolver(PolicyTable(TLSPolicy("dane-only")))
    e = refused(resolver.for_destination("example.org"))
    assert e.mechanism == "dane" and e.reply.code == 451 and "--dnssec-resolver" in e.reply.text


def test_a_bogus_mx_rrset_is_refused_never_downgraded() -> None:
    resolver = SecurityResolver(PolicyTable(TLSPolicy("may")), dane=BogusDNSSEC())
    e = refused(resolver.for_destination("example.org"))
    assert e.mechanism == "dane" and "DNSSEC validation" in e.reply.text


def test_mta_sts_enforce_verifies_listed_hosts_and_refuses_others() -> None:
    resolver = SecurityResolver(PolicyTable(TLSPolicy("may")),
                                mta_sts=FakeMTASTS(StsPolicy("enforce")))
    sec = host(resolver)
    assert sec.level == "verify" and isinstance(sec.creator, ClientTLS)
    assert sec.report == ReportPolicy("sts", tuple(StsPolicy("enforce").lines()),
                                      ("mx1.example.org",))
    dest = fired(resolver.for_destination("example.org"))
    e = refused(resolver.for_host(dest, NextHop("rogue.example.net", 25, 20)))
    assert e.mechanism == "mta-sts" and "not an MX host" in e.reply.text


def test_mta_sts_testing_delivers_opportunistically_and_asks_for_a_diagnosis() -> None:
    resolver = SecurityResolver(PolicyTable(TLSPolicy("may")),
                                mta_sts=FakeMTASTS(StsPolicy("testing")))
    sec = host(resolver, hop=NextHop("rogue.example.net", 25, 20))
    assert (sec.level, sec.creator, sec.diagnose) == ("may", None, True)
    assert sec.report is not None and sec.report.policy_type == "sts"


def test_an_explicit_level_is_not_changed_by_mta_sts() -> None:
    sts = FakeMTASTS(StsPolicy("enforce", ("other.example.org",)))
    resolver = SecurityResolver(PolicyTable(TLSPolicy("encrypt")), mta_sts=sts)
    assert host(resolver).level == "encrypt" and sts.asked == []


def test_a_session_without_starttls_is_diagnosed_as_such() -> None:
    resolver = SecurityResolver(PolicyTable())
    result = resolver.diagnose(False, None, "mx1.example.org")
    assert result.result_type == "starttls-not-supported"
