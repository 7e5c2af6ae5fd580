"""Connector limits: a connection slot is handed to a waiting destination
as soon as a transaction ends, not after the idle timeout."""

from __future__ import annotations

import io

from tests.support.peers import AiosmtpdSink
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from twisted_mailout.daemon.config import Config
from twisted_mailout.testing.loopback import start_dns_server
from twisted_mailout.daemon.service import build_connector

MSG = b"Subject: slot\r\n\r\nbody\r\n"


class GlobalLimitTests(unittest.TestCase):
    # The idle timeout (120 s) is far beyond this test's limit (20 s): a
    # connector that parks a finished connection while other destinations
    # wait for the only slot cannot pass.
    timeout = 20

    @defer.inlineCallbacks
    def test_waiting_destinations_get_the_slot_when_a_transaction_ends(self):
        sink = AiosmtpdSink("127.0.0.1").start()
        self.addCleanup(lambda: threads.deferToThread(sink.stop))
        domains = [f"d{i}.test" for i in range(4)]
        records = {"mx.test": {"A": ["127.0.0.1"]}}
        records.update({d: {"MX": [[10, "mx.test"]]} for d in domains})
        udp, tcp, port = start_dns_server(
            {"ttl": 300, "records": records, "authoritative_for": ["test"]}, reactor)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        config = Config(queue="-", resolvers=(f"127.0.0.1:{port}",), mx_port=sink.port,
                        helo="client.test", max_connections=1, connection_idle=120,
                        command_timeout=10, tls="none")
        connector = build_connector(config, reactor)
        self.addCleanup(connector.close)
        attempts = yield defer.gatherResults([
            connector.deliver(d, "a@origin.test", [f"u@{d}"], lambda: io.BytesIO(MSG), len(MSG))
            for d in domains])
        self.assertEqual([a.replies[f"u@{d}"].code for a, d in zip(attempts, domains)],
                         [250] * 4)
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in sink.messages),
                         [f"u@{d}" for d in domains])
        self.assertLessEqual(connector.pool.open_connections, 1)
