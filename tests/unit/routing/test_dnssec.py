"""The DNSSEC-aware stub resolver (twisted_mailout.routing.dnssec) against a
scripted name server in this process, on loopback: what it asks (RD, AD, EDNS0),
how it reads the AD bit, CNAME chains, TLSA records, truncation (TCP retry),
replies it must ignore, and failing over to the next server. The real
validating resolver (Unbound) is exercised in tests/integration/test_dane.py."""

from __future__ import annotations

import struct

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.names import dns
from twisted.trial import unittest

from twisted_mailout.routing.dnssec import (
    TLSA,
    TLSA_TYPE,
    DNSSECLookupError,
    DNSSECResolver,
    tlsa_name,
)


def _reply(query: dns.Message, *answers: dns.RRHeader, ad: bool = True, rcode: int = dns.OK,
           trunc: bool = False, msg_id: int | None = None) -> dns.Message:
    m = dns.Message(id=query.id if msg_id is None else msg_id, answer=1, recDes=1, recAv=1,
                    authenticData=int(ad), rCode=rcode, trunc=int(trunc))
    m.queries = query.queries
    m.answers = list(answers)
    return m


class ScriptedServer(protocol.DatagramProtocol):
    """Answers each UDP query with C{script(query, "udp")}: a C{dns.Message},
    a list of them (sent in order), or L{None} (no answer); TCP the same way
    with C{"tcp"}."""

    def __init__(self, script):
        self.script = script
        self.queries: list[tuple[str, dns.Message]] = []

    def _answer(self, data: bytes, how: str) -> list[dns.Message]:
        q = dns.Message()
        q.fromStr(data)
        self.queries.append((how, q))
        out = self.script(q, how)
        if out is None:
            return []
        return out if isinstance(out, list) else [out]

    def datagramReceived(self, data, addr):
        for m in self._answer(data, "udp"):
            self.transport.write(m.toStr(), addr)


class _TCPHandler(protocol.Protocol):
    def __init__(self, server: ScriptedServer):
        self.server = server
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        if len(self.buf) >= 2:
            (n,) = struct.unpack("!H", self.buf[:2])
            if len(self.buf) >= 2 + n:
                for m in self.server._answer(self.buf[2:2 + n], "tcp"):
                    wire = m.toStr()
                    self.transport.write(struct.pack("!H", len(wire)) + wire)
                self.transport.loseConnection()


class DNSSECResolverTests(unittest.TestCase):
    timeout = 20

    def serve(self, script) -> tuple[ScriptedServer, tuple[str, int]]:
        server = ScriptedServer(script)
        factory = protocol.Factory.forProtocol(lambda: _TCPHandler(server))
        for _ in range(20):  # UDP and TCP on one port number: retry if TCP's is taken
            udp = reactor.listenUDP(0, server, interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self.addCleanup(udp.stopListening)
            self.addCleanup(tcp.stopListening)
            return server, ("127.0.0.1", port)
        raise RuntimeError("no free port for both UDP and TCP")

    @defer.inlineCallbacks
    def test_asks_with_ad_and_edns0_and_reports_the_ad_bit(self):
        def script(q, how):
            name = q.queries[0].name.name
            return _reply(q, dns.RRHeader(name, dns.A, ttl=300,
                                          payload=dns.Record_A("192.0.2.1")),
                          ad=name == b"signed.example.test")

        server, addr = self.serve(script)
        resolver = DNSSECResolver(reactor, [addr], timeout=5)
        signed = yield resolver.query("Signed.Example.TEST.", dns.A)
        self.assertEqual((signed.name, signed.secure, signed.records, signed.ttl),
                         ("signed.example.test", True, ("192.0.2.1",), 300))
        unsigned = yield resolver.query("unsigned.example.test", dns.A)
        self.assertFalse(unsigned.secure)
        how, q = server.queries[0]
        self.assertEqual(how, "udp")
        self.assertTrue(q.recDes and q.authenticData)  # RFC 6840 5.7: AD in the query
        opt = [rr for rr in q.additional if rr.type == dns.OPT]
        self.assertEqual(len(opt), 1)
        self.assertEqual(opt[0].cls, 1232)  # the advertised UDP payload size

    @defer.inlineCallbacks
    def test_cname_chain_tlsa_records_and_nxdomain(self):
        host = b"_25._tcp.mx.example.test"

        def script(q, how):
            name = q.queries[0].name.name
            if name == host:
                return _reply(q,
                              dns.RRHeader(host, dns.CNAME, ttl=600,
                                           payload=dns.Record_CNAME(b"tlsa.example.test")),
                              dns.RRHeader(b"tlsa.example.test", TLSA_TYPE, ttl=120,
                                           payload=dns.UnknownRecord(b"\x03\x01\x01" + b"a" * 32)))
            return _reply(q, rcode=dns.ENAME)

        resolver = DNSSECResolver(reactor, [self.serve(script)[1]], timeout=5)
        self.assertEqual(tlsa_name("MX.example.test.", 25), host.decode())
        found = yield resolver.tlsa("mx.example.test")
        self.assertEqual(found.records, (TLSA(3, 1, 1, b"a" * 32),))
        self.assertEqual(found.canonical, "tlsa.example.test")
        self.assertEqual(found.ttl, 120)
        missing = yield resolver.query("nothing.example.test", dns.MX)
        self.assertTrue(missing.nxdomain)
        self.assertEqual(missing.records, ())

    @defer.inlineCallbacks
    def test_truncated_reply_is_asked_again_over_tcp(self):
        def script(q, how):
            if how == "udp":
                return _reply(q, trunc=True)
            return _reply(q, dns.RRHeader(q.queries[0].name.name, dns.A, ttl=60,
                                          payload=dns.Record_A("192.0.2.7")))

        server, addr = self.serve(script)
        found = yield DNSSECResolver(reactor, [addr], timeout=5).query("big.example.test", dns.A)
        self.assertEqual(found.records, ("192.0.2.7",))
        self.assertEqual([how for how, _ in server.queries], ["udp", "tcp"])

    @defer.inlineCallbacks
    def test_replies_that_do_not_match_the_query_are_ignored(self):
        def script(q, how):
            good = _reply(q, dns.RRHeader(q.queries[0].name.name, dns.A, ttl=60,
                                          payload=dns.Record_A("192.0.2.2")))
            forged = _reply(q, dns.RRHeader(q.queries[0].name.name, dns.A, ttl=60,
                                            payload=dns.Record_A("203.0.113.66")),
                            msg_id=(q.id + 1) % 65536)
            return [forged, good]  # a forged ID first: only the real reply counts

        _, addr = self.serve(script)
        found = yield DNSSECResolver(reactor, [addr], timeout=5).query("mx.example.test", dns.A)
        self.assertEqual(found.records, ("192.0.2.2",))

    @defer.inlineCallbacks
    def test_servfail_tries_the_next_server_then_fails(self):
        _, failing = self.serve(lambda q, how: _reply(q, rcode=dns.ESERVER, ad=False))
        _, working = self.serve(lambda q, how: _reply(q))
        found = yield DNSSECResolver(reactor, [failing, working], timeout=5).query(
            "example.test", dns.MX)
        self.assertTrue(found.secure)
        with self.assertRaises(DNSSECLookupError) as cm:
            yield DNSSECResolver(reactor, [failing], timeout=5).query("example.test", dns.MX)
        self.assertEqual(cm.exception.rcode, dns.ESERVER)
        self.assertIn("SERVFAIL", str(cm.exception))
        self.assertIn("MX lookup for example.test failed", str(cm.exception))

    def test_servers_must_be_addresses(self):
        with self.assertRaises(ValueError):
            DNSSECResolver(reactor, [])
        with self.assertRaises(ValueError):
            DNSSECResolver(reactor, [("resolver.example.test", 53)])
        with self.assertRaises(ValueError):
            DNSSECResolver(reactor, [("127.0.0.1", 0)])
