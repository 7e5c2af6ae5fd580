"""Deterministic stand-ins for unit tests: a scripted resolver and connector."""

from __future__ import annotations

from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dnserror

from twisted_mailout.delivery.connector import Attempt


def rr(name, payload, ttl=300):
    return dns.RRHeader(name=name, type=payload.TYPE, ttl=ttl, payload=payload, auth=False)


def mx(name, pref, exchange, ttl=300):
    return rr(name, dns.Record_MX(pref, exchange, ttl=ttl), ttl)


def a(name, ip, ttl=300):
    return rr(name, dns.Record_A(ip, ttl=ttl), ttl)


def aaaa(name, ip, ttl=300):
    return rr(name, dns.Record_AAAA(ip, ttl=ttl), ttl)


def cname(name, target, ttl=300):
    return rr(name, dns.Record_CNAME(target, ttl=ttl), ttl)


class FakeResolver:
    """Answers from a table; counts queries.

    table: {(name, qtype): list of RRHeader | Exception class}
    Missing entries answer NODATA (empty answer, NOERROR).
    """

    def __init__(self, table):
        self.table = {(n.lower(), t): v for (n, t), v in table.items()}
        self.queries = []

    def _answer(self, name, qtype):
        self.queries.append((name, qtype))
        v = self.table.get((name.lower(), qtype), [])
        if isinstance(v, type) and issubclass(v, Exception):
            return defer.fail(v(name))
        if isinstance(v, defer.Deferred):
            return v
        return defer.succeed((list(v), [], []))

    def lookupMailExchange(self, name, timeout=None):
        return self._answer(name, dns.MX)

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, dns.AAAA)


NXDOMAIN = dnserror.DNSNameError
SERVFAIL = dnserror.DNSServerError
TIMEOUT = dnserror.DNSQueryTimeoutError


class ScriptedConnector:
    """Stands in for Connector: answers each recipient from `script`.

    script(dest, rcpt) -> Reply. Records every call.
    """

    def __init__(self, script):
        self.script = script
        self.calls = []
        self.closed = False

    def deliver(self, dest, sender, recipients, open_source, size=None, smtputf8=False,
                eightbit=False, paced=False, may_finish=None):
        f = open_source()
        body = f.read()
        f.close()
        self.calls.append((dest, sender, list(recipients), body))
        return defer.succeed(Attempt({r: self.script(dest, r) for r in recipients},
                                     f"mx.{dest}[192.0.2.1]:25"))

    def close(self):
        self.closed = True
        return defer.succeed(None)
