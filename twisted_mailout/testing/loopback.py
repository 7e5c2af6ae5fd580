"""Loopback network peers for the C{mailout demo} command and for tests.

This module provides two in-process servers that only ever listen on loopback
addresses (C{127.0.0.0/8} or C{::1}):

* a DNS server built on L{twisted.names} that serves an in-memory zone
  described by a plain, JSON-serialisable C{dict} (see L{Zone}), started
  with L{start_dns_server};
* an SMTP receiver built on the server side of L{twisted.mail.smtp} that
  records every message it accepts, started with L{start_smtp_receiver}.

It can also be run as a program so that the DNS server lives in its own
process::

    python -m twisted_mailout.testing.loopback dns --zone ZONE.json --port-file FILE \\
        [--interface 127.0.0.1] [--port 0] [--max-lifetime SECONDS]

The program writes the bound port number to C{FILE} (atomically) once both the
UDP and the TCP socket are listening, and runs until it receives SIGTERM or
SIGINT (or until C{--max-lifetime} seconds have passed, if given).

Zone description
----------------

::

    {
      "ttl": 60,                         # default TTL in seconds (optional, default 60)
      "authoritative_for": ["test"],     # optional, see below
      "records": {
        "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]],
                         "A": ["127.0.0.1"]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"], "ttl": 5},
        "alias.test": {"CNAME": "example.test"},
        "nullmx.test": {"MX": [[0, "."]]},
        "broken.test": {"SERVFAIL": true},
        "slow.test": {"TIMEOUT": true}
      }
    }

Supported record types: C{A} and C{AAAA} (list of address strings), C{MX}
(list of C{[preference, exchange]} pairs; exchange C{"."} is the null MX of
RFC 7505), C{CNAME} (one target name), C{TXT} (list of strings, or list of
lists of strings for multi-string records), C{NS} and C{PTR} (list of names).
A single value may be given instead of a one-element list.

Answers:

* a listed name with records of the asked type: C{NOERROR} with those records;
* a listed name without records of the asked type: C{NOERROR} and an empty
  answer section (NODATA); the same holds for an unlisted name that is the
  parent of a listed name (an "empty non-terminal");
* a C{CNAME} name: the CNAME record, followed (like a recursive resolver would)
  by the target's records of the asked type when the target is in the zone
  (chains are followed up to 8 links; a query of type CNAME returns only the
  CNAME record);
* C{"SERVFAIL": true}: C{SERVFAIL} (rcode 2) for every query of that name;
* C{"TIMEOUT": true}: the query is silently dropped, never answered;
* an unlisted name under one of the C{authoritative_for} suffixes:
  C{NXDOMAIN} (rcode 3);
* any other unlisted name: C{REFUSED} (rcode 5).  When C{authoritative_for}
  is absent the server is authoritative for every name, so every unlisted name
  is C{NXDOMAIN}.

Names compare case-insensitively and a trailing dot is ignored.  Record TTLs
are the zone C{ttl} unless the name has its own C{ttl}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.mail import smtp
from twisted.names import common, dns, error, server
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mailout.delivery.pool import Clock, DelayedCall

__all__ = [
    "DEFAULT_TTL",
    "LoopbackDNSServerFactory",
    "SMTPReceiver",
    "Zone",
    "ZoneNameError",
    "ZoneRefusedError",
    "ZoneResolver",
    "ZoneServerFailure",
    "ZoneTimeoutError",
    "main",
    "start_dns_server",
    "start_smtp_receiver",
]

#: Default record TTL in seconds when the zone has no C{"ttl"} key.
DEFAULT_TTL = 60

_MAX_CNAME_CHAIN = 8

#: A lookup's result: C{(answers, authority, additional)}, lists of C{dns.RRHeader}.
_Answer = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]
#: The protocol a DNS query came in on: UDP or TCP.
_DNSProto = dns.DNSDatagramProtocol | dns.DNSProtocol
#: The address a query came from: C{(host, port)} over UDP, L{None} over TCP.
_Peer = tuple[str, int] | None

_TYPE_CODES: dict[str, int] = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "CNAME": dns.CNAME,
    "TXT": dns.TXT,
    "NS": dns.NS,
    "PTR": dns.PTR,
}

_FLAG_KEYS = ("SERVFAIL", "TIMEOUT", "ttl")


def _require_loopback(interface: str) -> None:
    """Raise ValueError unless C{interface} is a loopback IP address literal."""
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        raise ValueError(
            f"interface must be a loopback IP address literal, got {interface!r}"
        ) from None
    if not address.is_loopback:
        raise ValueError(f"refusing to listen on non-loopback address {interface!r}")


def _normalise_name(name: str | bytes) -> str:
    """Return C{name} as a lower-case text domain name without a trailing dot."""
    if isinstance(name, bytes):
        name = name.decode("ascii", errors="replace")
    if not isinstance(name, str):
        raise TypeError(f"domain name must be a string, got {name!r}")
    return name.strip().lower().removesuffix(".")


def _wire_name(name: str) -> bytes:
    """Encode a normalised text name for twisted.names (root is C{b""}, not C{b"."})."""
    return _normalise_name(name).encode("ascii")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _ttl_value(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
        raise ValueError(f"{where}: ttl must be an integer 0..2147483647, got {value!r}")
    return value


class ZoneNameError(error.DNSNameError):
    """The queried name does not exist in an authoritative part of the zone (NXDOMAIN)."""


class ZoneServerFailure(error.DNSServerError):
    """The zone marks the queried name C{"SERVFAIL": true} (SERVFAIL)."""


class ZoneRefusedError(error.DNSQueryRefusedError):
    """The queried name is outside the names the zone is authoritative for (REFUSED)."""


class ZoneTimeoutError(error.DNSQueryTimeoutError):
    """The zone marks the queried name C{"TIMEOUT": true}: a server never answers it."""


@dataclass
class _Entry:
    ttl: int
    servfail: bool = False
    timeout: bool = False
    cname: str | None = None
    records: dict[int, list[Any]] = field(default_factory=dict)


class Zone:
    """An in-memory DNS zone built from a JSON-serialisable description.

    @param description: the zone C{dict} described in this module's docstring.
    @raise TypeError: if the description, its C{records} or a name's records
        are not mappings.
    @raise ValueError: if the description is malformed (unknown key or record
        type, bad address, bad TTL, CNAME mixed with other records, ...).
    """

    def __init__(self, description: Mapping[str, Any]) -> None:
        if not isinstance(description, Mapping):
            raise TypeError("zone description must be a mapping")
        unknown = set(description) - {"ttl", "records", "authoritative_for"}
        if unknown:
            raise ValueError(f"unknown zone keys: {sorted(unknown)}")
        self.default_ttl: int = _ttl_value(description.get("ttl", DEFAULT_TTL), "zone")
        authoritative = description.get("authoritative_for")
        if authoritative is None:
            self.authoritative_for: tuple[str, ...] = ("",)
        else:
            if isinstance(authoritative, str):
                authoritative = [authoritative]
            self.authoritative_for = tuple(_normalise_name(s) for s in authoritative)
        records = description.get("records", {})
        if not isinstance(records, Mapping):
            raise TypeError("zone 'records' must be a mapping of name -> records")
        self._entries: dict[str, _Entry] = {}
        for name, spec in records.items():
            key = _normalise_name(name)
            if key in self._entries:
                raise ValueError(f"name {name!r} is listed twice (names are case-insensitive)")
            self._entries[key] = self._parse_entry(key, spec)

    def _parse_entry(self, name: str, spec: Any) -> _Entry:
        if not isinstance(spec, Mapping):
            raise TypeError(f"{name}: records must be a mapping of TYPE -> value")
        entry = _Entry(ttl=_ttl_value(spec.get("ttl", self.default_ttl), name))
        entry.servfail = bool(spec.get("SERVFAIL", False))
        entry.timeout = bool(spec.get("TIMEOUT", False))
        for rtype, value in spec.items():
            if rtype in _FLAG_KEYS:
                continue
            code = _TYPE_CODES.get(str(rtype).upper())
            if code is None:
                raise ValueError(f"{name}: unsupported record type {rtype!r}")
            entry.records[code] = self._parse_records(name, code, value, entry.ttl)
        if dns.CNAME in entry.records:
            if len(entry.records) > 1:
                raise ValueError(f"{name}: CNAME cannot coexist with other record types")
            if len(entry.records[dns.CNAME]) != 1:
                raise ValueError(f"{name}: exactly one CNAME target is allowed")
            entry.cname = _normalise_name(entry.records[dns.CNAME][0].name.name)
        return entry

    @staticmethod
    def _parse_records(name: str, code: int, value: Any, ttl: int) -> list[Any]:
        out: list[Any] = []
        for item in _as_list(value):
            try:
                if code == dns.A:
                    out.append(dns.Record_A(str(ipaddress.IPv4Address(item)), ttl))
                elif code == dns.AAAA:
                    out.append(dns.Record_AAAA(str(ipaddress.IPv6Address(item)), ttl))
                elif code == dns.MX:
                    preference, exchange = item
                    if isinstance(preference, bool) or not isinstance(preference, int):
                        raise ValueError("MX preference must be an integer")
                    if not 0 <= preference <= 65535:
                        raise ValueError("MX preference must be 0..65535")
                    out.append(dns.Record_MX(preference, _wire_name(exchange), ttl))
                elif code == dns.TXT:
                    strings = [s.encode("utf-8") for s in _as_list(item)]
                    out.append(dns.Record_TXT(*strings, ttl=ttl))
                elif code == dns.CNAME:
                    out.append(dns.Record_CNAME(_wire_name(item), ttl))
                elif code == dns.NS:
                    out.append(dns.Record_NS(_wire_name(item), ttl))
                elif code == dns.PTR:
                    out.append(dns.Record_PTR(_wire_name(item), ttl))
            except (TypeError, ValueError, AttributeError) as exc:
                kind = dns.QUERY_TYPES[code]
                raise ValueError(f"{name}: bad {kind} record {item!r}: {exc}") from None
        return out

    def is_authoritative(self, name: str | bytes) -> bool:
        """Return whether C{name} (str or bytes) is under an C{authoritative_for} suffix."""
        key = _normalise_name(name)
        return any(
            suffix in ("", key) or key.endswith("." + suffix) for suffix in self.authoritative_for
        )

    def is_timeout(self, name: str | bytes) -> bool:
        """Return whether queries for C{name} (str or bytes) must never be answered."""
        entry = self._entries.get(_normalise_name(name))
        return entry is not None and entry.timeout

    def _exists(self, key: str) -> bool:
        if key in self._entries:
            return True
        suffix = "." + key
        return any(other.endswith(suffix) for other in self._entries) if key else True

    def resolve(
        self, name: str | bytes, qtype: int
    ) -> tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]:
        """Answer one query from the zone, as a recursive resolver in front of it would.

        @param name: the queried name (str or bytes); its spelling is kept in answers.
        @param qtype: the query type code, e.g. C{twisted.names.dns.MX};
            C{dns.ALL_RECORDS} returns every record of the name.
        @return: C{(answers, authority, additional)} lists of C{dns.RRHeader};
            C{([], [], [])} means NODATA.  Authority and additional are always empty.
        @raise ZoneTimeoutError: the name is marked C{TIMEOUT}.
        @raise ZoneServerFailure: the name is marked C{SERVFAIL}.
        @raise ZoneNameError: the name does not exist and the zone is authoritative for it.
        @raise ZoneRefusedError: the name does not exist and is outside the zone's authority.
        """
        owner = name.decode("ascii", errors="replace") if isinstance(name, bytes) else name
        owner = owner.rstrip(".")
        key = _normalise_name(owner)
        entry = self._entries.get(key)
        if entry is None:
            if self._exists(key):
                return [], [], []
            if self.is_authoritative(key):
                raise ZoneNameError(key)
            raise ZoneRefusedError(key)
        if entry.timeout:
            raise ZoneTimeoutError(key)
        if entry.servfail:
            raise ZoneServerFailure(key)
        answers: list[dns.RRHeader] = []
        seen = {key}
        for _ in range(_MAX_CNAME_CHAIN + 1):
            auth = self.is_authoritative(key)
            if entry.cname is not None and qtype not in (dns.CNAME, dns.ALL_RECORDS):
                answers.extend(self._headers(owner, entry, dns.CNAME, auth))
                target = self._entries.get(entry.cname)
                if target is None or target.servfail or target.timeout or entry.cname in seen:
                    break
                seen.add(entry.cname)
                owner, key, entry = entry.cname, entry.cname, target
                continue
            if qtype == dns.ALL_RECORDS:
                for code in entry.records:
                    answers.extend(self._headers(owner, entry, code, auth))
            else:
                answers.extend(self._headers(owner, entry, qtype, auth))
            break
        return answers, [], []

    @staticmethod
    def _headers(owner: str, entry: _Entry, code: int, auth: bool) -> list[dns.RRHeader]:
        return [
            dns.RRHeader(
                name=owner.encode("ascii", errors="replace"),
                type=code,
                cls=dns.IN,
                ttl=entry.ttl,
                payload=payload,
                auth=auth,
            )
            for payload in entry.records.get(code, [])
        ]


class ZoneResolver(common.ResolverBase):
    """A twisted.names C{IResolver} answering from a L{Zone}.

    Usable both as the authority of L{LoopbackDNSServerFactory} and directly,
    in process, as a resolver.  Lookups fire with C{(answers, authority,
    additional)} or fail with L{ZoneNameError}, L{ZoneServerFailure},
    L{ZoneRefusedError} or L{ZoneTimeoutError} (the latter fails at once:
    used in process, it does not wait for the caller's timeout).

    @param zone: a L{Zone} or a zone description C{dict}.
    :raises TypeError, ValueError: if the description is malformed (see L{Zone}).
    """

    def __init__(self, zone: Zone | Mapping[str, Any]) -> None:
        super().__init__()
        self.zone = zone if isinstance(zone, Zone) else Zone(zone)

    def _lookup(self, name: str | bytes, cls: int, type: int,
                timeout: Sequence[int] | None) -> defer.Deferred[_Answer]:
        if cls not in (dns.IN, dns.ANY):
            return defer.succeed(([], [], []))
        return defer.maybeDeferred(self.zone.resolve, name, type)

    def lookupAllRecords(self, name: str | bytes,
                         timeout: Sequence[int] | None = None) -> defer.Deferred[_Answer]:
        """Look up every record of C{name}; see L{Zone.resolve}.

        @param name: the queried name.
        @param timeout: ignored (the zone answers at once).
        @return: a Deferred firing with C{(answers, authority, additional)},
            or failing with a zone error (see L{Zone.resolve}).
        """
        return self._lookup(name, dns.IN, dns.ALL_RECORDS, timeout)


class LoopbackDNSServerFactory(server.DNSServerFactory):
    """A C{DNSServerFactory} serving a L{ZoneResolver}, usable for UDP and TCP.

    Differences from the stock factory: names marked C{TIMEOUT} are never
    answered; C{SERVFAIL} and C{REFUSED} are sent without logging an error (the
    stock factory maps any C{DomainError}, including C{DNSServerError}, to
    NXDOMAIN and logs every other failure); NXDOMAIN and NODATA answers for
    authoritative names carry the AA bit; nothing is cached; the RA bit is set,
    since CNAMEs are followed.

    @param resolver: the L{ZoneResolver} to answer from.
    @param verbose: twisted.names verbosity (0 silent, 2 logs full messages).

    Attributes: C{queries} is a list of C{(name: str, qtype: int)} received, in
    order (including dropped ones); C{dropped} counts queries left unanswered.
    """

    def __init__(self, resolver: ZoneResolver, verbose: int = 0) -> None:
        super().__init__(authorities=[resolver], verbose=verbose)
        self.zone_resolver = resolver
        self.canRecurse = True
        self.queries: list[tuple[str, int]] = []
        self.dropped = 0

    def handleQuery(self, message: dns.Message, protocol: _DNSProto,
                    address: _Peer) -> defer.Deferred[None] | None:
        """Answer the first query of C{message} unless its name is marked TIMEOUT.

        @param message: the query received.
        @param protocol: the UDP or TCP protocol it came in on.
        @param address: C{(host, port)} of the client over UDP, L{None} over TCP.
        @return: the Deferred of the answer, or L{None} when it is dropped.
        """
        query = message.queries[0]
        self.queries.append((query.name.name.decode("ascii", errors="replace"), query.type))
        if self.zone_resolver.zone.is_timeout(query.name.name):
            self.dropped += 1
            return None
        return super().handleQuery(message, protocol, address)

    def gotResolverResponse(self, response: _Answer, protocol: _DNSProto,
                            message: dns.Message, address: _Peer) -> None:
        """Send the zone's answer; NODATA answers for authoritative names carry the AA bit.

        @param response: C{(answers, authority, additional)} from the zone.
        @param protocol: the protocol the query came in on.
        @param message: the query.
        @param address: the client's C{(host, port)} over UDP, L{None} over TCP.
        """
        answers, authority, additional = response
        reply = self._responseFromMessage(
            message=message,
            rCode=dns.OK,
            answers=answers,
            authority=authority,
            additional=additional,
        )
        if not answers and self.zone_resolver.zone.is_authoritative(message.queries[0].name.name):
            reply.auth = True
        self.sendReply(protocol, reply, address)

    def gotResolverError(self, failure: Failure, protocol: _DNSProto,
                         message: dns.Message, address: _Peer) -> None:
        """Send SERVFAIL/REFUSED/NXDOMAIN for zone failures; defer to the base class otherwise.

        @param failure: the zone's error (see L{Zone.resolve}).
        @param protocol: the protocol the query came in on.
        @param message: the query.
        @param address: the client's C{(host, port)} over UDP, L{None} over TCP.
        """
        codes = (
            (ZoneServerFailure, dns.ESERVER),
            (ZoneRefusedError, dns.EREFUSED),
            (ZoneNameError, dns.ENAME),
        )
        for exc_type, rcode in codes:
            if failure.check(exc_type):
                response = self._responseFromMessage(message=message, rCode=rcode)
                if rcode == dns.ENAME:
                    response.auth = True
                self.sendReply(protocol, response, address)
                return None
        return super().gotResolverError(failure, protocol, message, address)


def start_dns_server(
    zone: Mapping[str, Any] | Zone,
    reactor: Any,
    interface: str = "127.0.0.1",
    port: int = 0,
    *,
    attempts: int = 5,
    verbose: int = 0,
) -> tuple[Any, Any, int]:
    """Start a DNS server for C{zone} listening on UDP and TCP on the same port.

    @param zone: zone description C{dict} (see the module docstring) or a L{Zone}.
    @param reactor: the Twisted reactor (C{IReactorUDP} and C{IReactorTCP}).
    @param interface: loopback IP address literal to bind, e.g. C{"127.0.0.1"} or C{"::1"}.
    @param port: port number, or 0 to let the kernel choose (UDP chooses, TCP follows).
    @param attempts: how many UDP/TCP bind pairs to try when C{port} is 0 and the
        TCP bind of the UDP-chosen port fails (someone else holds it).
    @param verbose: twisted.names logging verbosity.
    @return: C{(udp_port, tcp_port, port_number)}: the two C{IListeningPort}
        objects (stop both with C{stopListening()}) and the bound port number.
        C{tcp_port.factory} is the L{LoopbackDNSServerFactory}.
    :raises TypeError, ValueError: bad zone description (see L{Zone}), or
        C{interface} not a loopback IP address literal (ValueError).
    :raises twisted.internet.error.CannotListenError: the port could not be bound.
    """
    _require_loopback(interface)
    factory = LoopbackDNSServerFactory(ZoneResolver(zone), verbose=verbose)
    last_error: CannotListenError | None = None
    for _ in range(max(1, attempts)):
        udp_port = reactor.listenUDP(
            port, dns.DNSDatagramProtocol(controller=factory, reactor=reactor), interface=interface
        )
        number = udp_port.getHost().port
        try:
            tcp_port = reactor.listenTCP(number, factory, interface=interface)
        except CannotListenError as exc:
            udp_port.stopListening()
            if port != 0:
                raise
            last_error = exc
            continue
        return udp_port, tcp_port, number
    assert last_error is not None
    raise last_error


class _Transaction:
    """Collects one mail transaction's envelope and message lines."""

    def __init__(self, mail_from: str, rcpt_tos: list[str]) -> None:
        self.mail_from = mail_from
        self.rcpt_tos = rcpt_tos
        self.lines: list[bytes] = []
        self._handed_out = False

    def new_message(self, receiver: SMTPReceiver) -> _RecordingMessage:
        primary = not self._handed_out
        self._handed_out = True
        return _RecordingMessage(receiver, self, primary)


@implementer(smtp.IMessage)
class _RecordingMessage:
    """One C{IMessage} per accepted recipient; only the first one records the data."""

    def __init__(self, receiver: SMTPReceiver, txn: _Transaction, primary: bool) -> None:
        self._receiver = receiver
        self._txn = txn
        self._primary = primary

    def lineReceived(self, line: bytes) -> None:
        if self._primary:
            self._txn.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        if self._primary:
            data = b"".join(line + b"\r\n" for line in self._txn.lines)
            self._receiver._record(
                {
                    "mail_from": self._txn.mail_from,
                    "rcpt_tos": list(self._txn.rcpt_tos),
                    "data": data,
                }
            )
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self._txn.lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    """Minimal C{IMessageDelivery}: accept every sender, ask the policy about recipients."""

    def __init__(self, receiver: SMTPReceiver, proto: _ReceiverESMTP) -> None:
        self._receiver = receiver
        self._proto = proto

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: smtp.Address,
                       recipients: list[smtp.User]) -> bytes | None:
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], _RecordingMessage]:
        address = str(user.dest)
        verdict = self._receiver.policy(address) if self._receiver.policy else None
        if verdict is not None:
            code, text = verdict
            code = int(code)
            if not 400 <= code <= 599:
                raise ValueError(f"policy reply code must be 4xx or 5xx, got {code}")
            self._receiver.refused.append({"rcpt": address, "code": code, "text": str(text)})
            raise smtp.SMTPBadRcpt(user.dest, code, str(text))
        return lambda: self._proto.current_transaction.new_message(self._receiver)


class _ReceiverESMTP(smtp.ESMTP):
    """ESMTP server protocol recording whole transactions (one record per DATA)."""

    receiver: SMTPReceiver
    current_transaction: _Transaction
    #: the clock of the idle timeout, or L{None} for the global reactor.
    clock: Clock | None = None

    def callLater(self, period: float, func: Callable[[], object]) -> DelayedCall:
        """Schedule the idle timeout (C{TimeoutMixin}'s hook) on C{clock}.

        @param period: seconds.
        @param func: called when the time comes.
        @return: the delayed call.
        """
        if self.clock is None:
            return cast(DelayedCall, super().callLater(period, func))
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        self.receiver.connections += 1
        super().connectionMade()

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext = super().extensions()
        ext[b"8BITMIME"] = None
        ext[b"PIPELINING"] = None
        return ext

    def do_DATA(self, rest: bytes) -> None:
        if self._from is not None and self._to:
            self.current_transaction = _Transaction(
                str(self._from), [str(user.dest) for user, _ in self._to]
            )
        super().do_DATA(rest)
        if self.mode == smtp.DATA:
            # twisted.mail.smtp.SMTP inserts an empty line before a message whose
            # first line has no ":" (meant to separate a Received: header we do not
            # add); pretend we are already inside the header so data is kept as sent.
            self._SMTP__inheader = 1


class _ReceiverFactory(smtp.SMTPFactory):
    protocol = _ReceiverESMTP

    def __init__(self, receiver: SMTPReceiver, tls_context_factory: Any = None,
                 clock: Clock | None = None) -> None:
        super().__init__()
        self.receiver = receiver
        self.clock = clock
        self.domain = receiver.name.encode("ascii")
        self.tls_context_factory = tls_context_factory

    def buildProtocol(self, addr: object) -> _ReceiverESMTP:
        proto = _ReceiverESMTP(contextFactory=self.tls_context_factory)
        proto.factory = self
        proto.host = self.domain
        proto.receiver = self.receiver
        proto.clock = self.clock
        # twisted.mail.smtp.SMTP declares C{delivery = None} unannotated, so its
        # inferred type is None; the attribute is meant to hold an IMessageDelivery.
        proto.delivery = _Delivery(self.receiver, proto)  # type: ignore[assignment]
        return proto


class SMTPReceiver:
    """Records the messages accepted by a receiver started with L{start_smtp_receiver}.

    Attributes:

    * C{name} (str): host name used in the greeting and EHLO reply;
    * C{policy}: C{None} or C{policy(rcpt_address: str) -> None | (code: int, text: str)};
      may be replaced at any time;
    * C{messages}: list of C{{"mail_from": str, "rcpt_tos": [str], "data": bytes}},
      one per completed DATA, in arrival order; C{mail_from} is C{""} for the
      null sender; C{data} is the unstuffed message with CRLF line endings;
    * C{refused}: list of C{{"rcpt": str, "code": int, "text": str}} refused RCPTs;
    * C{connections}: number of SMTP connections accepted (int).
    """

    def __init__(
        self,
        name: str = "mx",
        policy: Callable[[str], tuple[int, str] | None] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.messages: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        self.connections = 0
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def _record(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        ready = [(n, d) for n, d in self._waiters if len(self.messages) >= n]
        self._waiters = [(n, d) for n, d in self._waiters if len(self.messages) < n]
        for _, waiter in ready:
            waiter.callback(list(self.messages))

    def when_messages(self, count: int) -> defer.Deferred:
        """Return a Deferred firing with C{messages} once at least C{count} arrived.

        The Deferred has no time limit of its own: add one, e.g.
        C{d.addTimeout(10, reactor)}.
        """
        if len(self.messages) >= count:
            return defer.succeed(list(self.messages))
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((count, waiter))
        return waiter


def start_smtp_receiver(
    reactor: Any,
    interface: str = "127.0.0.1",
    port: int = 0,
    name: str = "mx",
    policy: Callable[[str], tuple[int, str] | None] | None = None,
    *,
    tls_context_factory: Any = None,
) -> tuple[Any, SMTPReceiver]:
    """Start an ESMTP receiver that accepts and records every message.

    @param reactor: the Twisted reactor (C{IReactorTCP}).
    @param interface: loopback IP address literal, e.g. C{"127.0.0.1"} or C{"::1"}.
    @param port: TCP port number, 0 to let the kernel choose (read it back with
        C{listening_port.getHost().port}).
    @param name: host name (ASCII) announced in the greeting and EHLO reply.
    @param policy: optional C{policy(rcpt_address: str) -> None | (code, text)}; a
        tuple refuses that RCPT with C{code} (int, 4xx or 5xx) and C{text} (str,
        e.g. C{"5.1.1 No such user"}).  Exceptions raised by the policy (and codes
        outside 400..599) are logged by Twisted and answered with 451.
    @param tls_context_factory: optional Twisted TLS context factory (e.g.
        C{twisted.internet.ssl.CertificateOptions}); when given, STARTTLS is offered.
    @return: C{(listening_port, receiver)}: an C{IListeningPort} (stop it with
        C{stopListening()}) and the L{SMTPReceiver} recording messages.
        8BITMIME and PIPELINING are advertised; MAIL/RCPT parameters are ignored.
    @raise ValueError: C{interface} is not a loopback address.
    :raises twisted.internet.error.CannotListenError: the port could not be bound.
    """
    _require_loopback(interface)
    receiver = SMTPReceiver(name=name, policy=policy)
    factory = _ReceiverFactory(receiver, tls_context_factory)
    listening_port = reactor.listenTCP(port, factory, interface=interface)
    return listening_port, receiver


def _write_port_file(path: str, port: int) -> None:
    """Write C{port} followed by a newline to C{path} atomically (tmp file + rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="ascii") as handle:
        handle.write(f"{port}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m twisted_mailout.testing.loopback",
        description="Run a loopback peer in its own process.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    dns_cmd = commands.add_parser("dns", help="serve an in-memory zone over UDP and TCP")
    dns_cmd.add_argument("--zone", required=True, help="zone description JSON file")
    dns_cmd.add_argument("--interface", default="127.0.0.1", help="loopback address to bind")
    dns_cmd.add_argument("--port", type=int, default=0, help="port number (0: any free port)")
    dns_cmd.add_argument("--port-file", required=True, help="file receiving the bound port")
    dns_cmd.add_argument(
        "--max-lifetime",
        type=float,
        default=None,
        help="stop after this many seconds (default: run until SIGTERM)",
    )
    dns_cmd.add_argument("--verbose", type=int, default=0, help="twisted.names verbosity")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    """Command-line entry point: C{dns --zone ZONE.json --port-file FILE [...]}.

    @param argv: arguments without the program name (default C{sys.argv[1:]}).
    @return: process exit status: 0 after a clean stop (SIGTERM, SIGINT or
        C{--max-lifetime}), 2 for a bad zone or unusable interface/port.
    @raise SystemExit: on command-line usage errors (from argparse).
    """
    args = _build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from twisted.internet import reactor as _reactor  # the process's reactor, at its entry point

    reactor: Any = _reactor

    try:
        with open(args.zone, encoding="utf-8") as handle:
            zone = Zone(json.load(handle))
        _udp_port, _tcp_port, number = start_dns_server(
            zone, reactor, interface=args.interface, port=args.port, verbose=args.verbose
        )
    except (OSError, TypeError, ValueError, CannotListenError) as exc:
        print(f"loopback dns: {exc}", file=sys.stderr)
        return 2
    _write_port_file(args.port_file, number)
    print(
        f"loopback dns: listening on {args.interface} port {number} (udp+tcp)",
        file=sys.stderr,
        flush=True,
    )
    if args.max_lifetime is not None:
        reactor.callLater(args.max_lifetime, reactor.stop)
    reactor.run()  # installs SIGTERM/SIGINT handlers that stop the reactor
    return 0


if __name__ == "__main__":
    sys.exit(main())
