"""Broken DNS: each fault defers, bounces or delivers as it should, within the
DNS timeout, and no message is lost or sent twice.

Every case runs against the real loopback DNS server of
``twisted_mailout.testing.loopback`` (twisted.names over UDP and TCP): in process for
``twisted_mailout.sendmail(..., resolver="127.0.0.1:PORT", timeout=...)``,
and as a subprocess (the ``dns_server`` fixture) for the daemon runs.

What a user relies on:

- SERVFAIL, a query that is never answered, a resolver that is down, an MX
  host without an address: the mail is *deferred* (4xx, local), within the
  DNS timeout, with a reply text (and daemon log line) that says what failed;
- NXDOMAIN for the recipient domain: *bounced* at once (550 5.1.2);
- an MX target that is a CNAME, or a first MX that cannot be used while a
  second one works: *delivered*;
- 300 MX records, almost all of them dead: delivered to the one that works,
  in a time bounded by (number of hosts that time out) x (connect timeout);
  all 300 dead: deferred at once ("all 300 hosts failed"); many MX names on
  one address: that address is tried once per attempt.

Everything listens on loopback only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections import Counter

from tests.support.peers import AiosmtpdSink, free_port, zone
from tests.support.trial import start_dns, start_sink
from twisted.internet import defer
from twisted.trial import unittest

import twisted_mailout
from tests.support.daemon import Daemon, queue_list
from tests.support.wait import wait_for
from twisted_mailout.delivery import connector as connector_module
from twisted_mailout import enqueue

MSG = (b"Message-ID: <dns@test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
       b"Subject: broken dns\r\n\r\nbody\r\n")

#: How many of the 300 MX hosts are "black holes" (the TCP connect times out).
BLACKHOLES = 2


@contextlib.contextmanager
def blackhole(host: str, port: int):
    """A loopback address where a TCP connect hangs until the client's timeout.

    A listening socket with a backlog of 0 whose one accept-queue slot is
    taken by a connection nobody accepts: Linux then drops further SYNs, so a
    connect neither succeeds nor is refused (like a firewalled host).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((host, port))
        listener.listen(0)
        filler.settimeout(5)
        filler.connect((host, port))
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect((host, port))
        except TimeoutError:
            pass  # as intended: the connect hangs
        else:
            raise RuntimeError(f"{host}:{port} accepts connections; not a black hole")
        finally:
            probe.close()
        yield
    finally:
        filler.close()
        listener.close()


def many_mx_records(good_host: str, good_ip: str, blackholes: list[str]) -> dict:
    """many.test with 300 MX records.

    297 hosts have an address on loopback where nothing listens (connection
    refused), ``len(blackholes)`` have an address where the connect hangs, and
    the one that works has the highest preference number (tried last).
    Preferences 0..49 are spread over the dead hosts (equal ones shuffled).
    """
    recs: dict = {}
    mx = []
    dead = 300 - 1 - len(blackholes)
    for i in range(dead):
        name = f"dead{i}.many.test"
        recs[name] = {"A": [f"127.0.{10 + i // 200}.{2 + i % 200}"]}
        mx.append([i % 50, name])
    for i, ip in enumerate(blackholes):
        name = f"hole{i}.many.test"
        recs[name] = {"A": [ip]}
        mx.append([25 + i, name])
    recs[good_host] = {"A": [good_ip]}
    mx.append([1000, good_host])
    recs["many.test"] = {"MX": mx}
    assert len(mx) == 300
    return recs


class SendmailBrokenDNSTests(unittest.TestCase):
    """sendmail() in process, the DNS server in process, aiosmtpd sinks."""

    timeout = 120



    @defer.inlineCallbacks
    def send(self, rcpt, port, mx_port, timeout=3):
        start = time.monotonic()
        report = yield twisted_mailout.sendmail(
            "author@origin.test", rcpt, MSG, resolver=f"127.0.0.1:{port}", mx_port=mx_port,
            timeout=timeout)
        return report[rcpt], time.monotonic() - start

    @defer.inlineCallbacks
    def test_servfail_defers_and_says_servfail(self):
        sink = start_sink(self)
        port, server = start_dns(self, {"broken.test": {"SERVFAIL": True}})
        r, elapsed = yield self.send("x@broken.test", port, sink.port)
        self.assertEqual((r.status, r.code, r.local, r.relay), ("deferred", 451, True, None))
        self.assertIn("SERVFAIL", r.text)
        self.assertTrue(r.text.startswith("4.4.3 MX lookup for broken.test"), r.text)
        self.assertLess(elapsed, 3)  # answered: no timeout involved
        self.assertIn(("broken.test", 15), server.queries)
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_unanswered_query_defers_within_the_dns_timeout(self):
        sink = start_sink(self)
        port, server = start_dns(self, {"slow.test": {"TIMEOUT": True},
                                 "slowmx.test": {"MX": [[10, "slow.test"]]}})
        r, elapsed = yield self.send("x@slow.test", port, sink.port, timeout=3)
        self.assertEqual((r.status, r.code, r.local), ("deferred", 451, True))
        self.assertIn("MX lookup for slow.test: DNS query timed out", r.text)
        # sendmail(timeout=3): the DNS tries add up to 3 s, and nothing waits longer
        self.assertGreaterEqual(elapsed, 2.5)
        self.assertLess(elapsed, 6)
        self.assertGreaterEqual(server.dropped, 1)
        # the same when only the MX host's address query goes unanswered
        r, elapsed = yield self.send("x@slowmx.test", port, sink.port, timeout=3)
        self.assertEqual((r.status, r.code, r.local), ("deferred", 451, True))
        self.assertIn("address lookup for slow.test: DNS query timed out", r.text)
        self.assertLess(elapsed, 6)
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_nxdomain_bounces_with_5_1_2(self):
        sink = start_sink(self)
        port, _ = start_dns(self, {"other.test": {"A": ["127.0.0.1"]}})
        r, elapsed = yield self.send("x@nowhere.test", port, sink.port)
        self.assertEqual((r.status, r.code, r.local), ("bounced", 550, True))
        self.assertTrue(r.text.startswith("5.1.2 "), r.text)
        self.assertIn("NXDOMAIN", r.text)
        self.assertLess(elapsed, 3)

    @defer.inlineCallbacks
    def test_mx_target_that_is_a_cname_is_followed(self):
        # RFC 2181 10.3 says an MX must not point at an alias; real zones do it
        # anyway, and resolvers follow it: so do we.
        sink = start_sink(self, "127.0.0.2")
        port, server = start_dns(self, {
            "alias.test": {"MX": [[10, "mail.alias.test"]]},
            "mail.alias.test": {"CNAME": "real-host.alias.test"},
            "real-host.alias.test": {"A": ["127.0.0.2"]},
        })
        r, _ = yield self.send("x@alias.test", port, sink.port)
        self.assertEqual((r.status, r.code), ("delivered", 250), r)
        self.assertEqual(r.relay, f"mail.alias.test[127.0.0.2]:{sink.port}")
        [m] = sink.messages
        self.assertEqual(m["data"], MSG)
        self.assertEqual(m["rcpt_tos"], ["x@alias.test"])
        self.assertIn(("mail.alias.test", 1), server.queries)

    @defer.inlineCallbacks
    def test_mx_host_without_address_defers_unless_another_mx_works(self):
        sink = start_sink(self, "127.0.0.2")
        port, _ = start_dns(self, {
            "noaddr.test": {"MX": [[10, "empty.noaddr.test"]]},
            "empty.noaddr.test": {"TXT": ["no A, no AAAA"]},
            "backup.test": {"MX": [[10, "empty.noaddr.test"], [20, "mx2.backup.test"]]},
            "mx2.backup.test": {"A": ["127.0.0.2"]},
        })
        r, _ = yield self.send("x@noaddr.test", port, sink.port)
        self.assertEqual((r.status, r.code, r.local), ("deferred", 451, True))
        self.assertEqual(r.text, "4.4.4 MX host empty.noaddr.test has no A/AAAA record, "
                                 "will retry")
        r, _ = yield self.send("y@backup.test", port, sink.port)
        self.assertEqual((r.status, r.relay), ("delivered", f"mx2.backup.test[127.0.0.2]:"
                                                            f"{sink.port}"))
        self.assertEqual([m["rcpt_tos"] for m in sink.messages], [["y@backup.test"]])

    @defer.inlineCallbacks
    def test_three_hundred_mx_records_most_dead_delivered_in_bounded_time(self):
        """300 MX records (one 9 KB answer: the loopback server does not
        truncate UDP): 297 hosts refuse the connection, 2 are black holes (the
        connect times out), the last one works. Outcome: delivered to the
        last one, after one attempt at every other host; the time is the
        black holes' connect timeouts plus a fraction of a second."""
        port_number = free_port("127.0.0.2")
        sink = start_sink(self, "127.0.0.2", port=port_number)
        holes = [f"127.0.20.{i + 1}" for i in range(BLACKHOLES)]
        port, server = start_dns(self, many_mx_records("good.many.test", "127.0.0.2", holes))
        with contextlib.ExitStack() as stack:
            for ip in holes:
                stack.enter_context(blackhole(ip, port_number))
            r, elapsed = yield self.send("x@many.test", port, port_number, timeout=2)
        self.assertEqual((r.status, r.code), ("delivered", 250), r)
        self.assertEqual(r.relay, f"good.many.test[127.0.0.2]:{port_number}")
        self.assertEqual(len(sink.messages), 1)
        # two connect timeouts of 2 s; the 297 refusals and 600 queries are quick
        self.assertGreaterEqual(elapsed, BLACKHOLES * 2 - 0.5)
        self.assertLess(elapsed, BLACKHOLES * 2 + 6)
        asked = Counter(t for _, t in server.queries)
        self.assertEqual(asked[15], 1)  # one MX query
        self.assertEqual(asked[1], 300)  # one A query per MX host
        print(f"\n300 MX records, {BLACKHOLES} black holes: delivered in {elapsed:.2f}s")

    @defer.inlineCallbacks
    def test_three_hundred_mx_records_all_dead_defers_in_bounded_time(self):
        port_number = free_port("127.0.0.2")
        recs = many_mx_records("good.many.test", "127.0.0.2", [])
        port, _ = start_dns(self, recs)  # nothing listens on the "good" host either
        r, elapsed = yield self.send("x@many.test", port, port_number, timeout=2)
        self.assertEqual((r.status, r.code, r.local), ("deferred", 421, True))
        self.assertIn("connection refused", r.text)
        self.assertIn("(all 300 hosts failed)", r.text)
        self.assertLess(elapsed, 10)

    @defer.inlineCallbacks
    def test_an_address_shared_by_many_mx_hosts_is_tried_once(self):
        """50 MX names on one dead address: it is connected to once per
        attempt, not 50 times (50 connect timeouts were it a black hole).
        Found by this test; fixed in Connector._open_any_host (48737c2)."""
        port_number = free_port("127.0.0.2")
        start_sink(self, "127.0.0.2", port=port_number)
        recs = {f"alias{i}.shared.test": {"A": ["127.0.30.1"]} for i in range(50)}
        recs["good.shared.test"] = {"A": ["127.0.0.2"]}
        recs["shared.test"] = {"MX": [[10, f"alias{i}.shared.test"] for i in range(50)]
                               + [[20, "good.shared.test"]]}
        port, _ = start_dns(self, recs)
        tried = Counter()
        original = connector_module.Connector._tcp_connect

        def counting(connector, addr, port, factory, **kw):
            tried[(addr, port)] += 1
            return original(connector, addr, port, factory, **kw)

        self.patch(connector_module.Connector, "_tcp_connect", counting)
        r, _ = yield self.send("x@shared.test", port, port_number)
        self.assertEqual(r.status, "delivered")
        self.assertEqual(tried, Counter({("127.0.30.1", port_number): 1,
                                         ("127.0.0.2", port_number): 1}))

    @defer.inlineCallbacks
    def test_resolver_down_defers_within_the_dns_timeout(self):
        sink = start_sink(self)
        down = free_port("127.0.0.1", socket.SOCK_DGRAM)  # nothing listens there
        r, elapsed = yield self.send("x@example.test", down, sink.port, timeout=3)
        self.assertEqual((r.status, r.code, r.local, r.relay), ("deferred", 451, True, None))
        self.assertEqual(r.text, "4.4.3 MX lookup for example.test: DNS query timed out, "
                                 "will retry")
        self.assertGreaterEqual(elapsed, 2.5)
        self.assertLess(elapsed, 6)


# --------------------------------------------------------------------------- the daemon


def outcome_line(log: str, rcpt: str) -> str:
    """The last outcome log line for C{rcpt} (AssertionError when none)."""
    lines = [ln for ln in log.splitlines() if f"to=<{rcpt}>" in ln]
    assert lines, f"no outcome line for {rcpt}:\n{log}"
    return lines[-1]


def test_daemon_broken_dns_outcomes_and_log_lines(tmp_path, dns_server):
    """One daemon run, one recipient per DNS fault: each outcome is logged
    with the recipient, the status and the reason; the deferred ones stay
    queued with that reply, the NXDOMAIN one is bounced to the author."""
    port = free_port("127.0.0.2")
    holes = [f"127.0.21.{i + 1}" for i in range(BLACKHOLES)]
    sink = AiosmtpdSink("127.0.0.2", port).start()
    records = {
        "origin.test": {"MX": [[10, "mx.origin.test"]]},
        "mx.origin.test": {"A": ["127.0.0.2"]},
        "broken.test": {"SERVFAIL": True},
        "slow.test": {"TIMEOUT": True},
        "alias.test": {"MX": [[10, "mail.alias.test"]]},
        "mail.alias.test": {"CNAME": "mx.origin.test"},
        "noaddr.test": {"MX": [[10, "empty.noaddr.test"]]},
        "empty.noaddr.test": {"TXT": ["nothing"]},
        "backup.test": {"MX": [[10, "empty.noaddr.test"], [20, "mx.origin.test"]]},
        **many_mx_records("good.many.test", "127.0.0.2", holes),
    }
    dns = dns_server(zone(records))
    q = tmp_path / "q"
    rcpts = ["a@broken.test", "b@slow.test", "c@nowhere.test", "d@alias.test",
             "e@noaddr.test", "f@backup.test", "g@many.test"]
    qid = enqueue(str(q), "author@origin.test", rcpts, MSG)
    d = Daemon(q, f"--resolver=127.0.0.1:{dns}", f"--mx-port={port}", "--dns-timeout=2",
               "--connect-timeout=1", "--command-timeout=5")
    with contextlib.ExitStack() as stack:
        for ip in holes:
            stack.enter_context(blackhole(ip, port))
        try:
            start = time.monotonic()
            d.start()
            wait_for(lambda: all(f"to=<{r}>" in d.log() for r in rcpts), 60,
                     what="an outcome line for every recipient")
            elapsed = time.monotonic() - start
            # the bounce for c@nowhere.test reaches the author
            wait_for(lambda: any(m["mail_from"] == "" for m in sink.messages), 30,
                     what="the bounce")
            log = d.log()
            entry = wait_for(lambda: [e for e in queue_list(q, detail=True)
                                      if e["queue_id"] == qid], 10)[0]
        finally:
            d.stop()
            sink.stop()
    expect = {
        "a@broken.test": ("deferred", "451 4.4.3 MX lookup for broken.test: DNS server "
                                      "failure (SERVFAIL), will retry"),
        "b@slow.test": ("deferred", "451 4.4.3 MX lookup for slow.test: DNS query timed "
                                    "out, will retry"),
        "c@nowhere.test": ("bounced", "550 5.1.2 MX lookup for nowhere.test: host or domain "
                                      "name not found (NXDOMAIN)"),
        "e@noaddr.test": ("deferred", "451 4.4.4 MX host empty.noaddr.test has no A/AAAA "
                                      "record, will retry"),
    }
    for rcpt, (status, reason) in expect.items():
        line = outcome_line(log, rcpt)
        assert f"status={status} ({reason})" in line, line
        assert "relay=none" in line, line
    for rcpt, relay in [("d@alias.test", "mail.alias.test"), ("f@backup.test", "mx.origin.test"),
                        ("g@many.test", "good.many.test")]:
        line = outcome_line(log, rcpt)
        assert f"relay={relay}[127.0.0.2]:{port}" in line and "status=sent" in line, line
    assert re.search(r"dsn=4\.4\.3, status=deferred", outcome_line(log, "a@broken.test"))
    delivered = [m for m in sink.messages if m["mail_from"] == "author@origin.test"]
    assert sorted(r for m in delivered for r in m["rcpt_tos"]) == [
        "d@alias.test", "f@backup.test", "g@many.test"]
    assert all(m["data"] == MSG for m in delivered)
    # 297 refused hosts and 2 black holes were each tried once, then the good one
    skipped = [ln for ln in log.splitlines()
               if ".many.test[127.0." in ln and ln.endswith("; trying the next host")]
    assert len(skipped) == 299, len(skipped)
    assert sum("connection timed out" in ln for ln in skipped) == BLACKHOLES
    assert sum("connection refused" in ln for ln in skipped) == 299 - BLACKHOLES
    # the deferred ones wait in the queue with the reason an operator reads there
    states = {r["address"]: r for r in entry["recipients"]}
    assert {a for a, r in states.items() if r["state"] == "deferred"} == {
        "a@broken.test", "b@slow.test", "e@noaddr.test"}
    assert "SERVFAIL" in states["a@broken.test"]["reply"]["text"]
    assert states["b@slow.test"]["reply"]["local"] is True
    # bounded: the DNS timeout (2 s) and 2 connect timeouts (1 s), run side by side
    assert elapsed < 20, elapsed
    print(f"\ndaemon, 7 DNS cases incl. 300 MX: every outcome logged after {elapsed:.2f}s")


def test_daemon_resolver_down_defers_within_the_dns_timeout(tmp_path):
    down = free_port("127.0.0.1", socket.SOCK_DGRAM)  # no DNS server there
    q = tmp_path / "q"
    enqueue(str(q), "author@origin.test", ["x@example.test"], MSG)
    d = Daemon(q, f"--resolver=127.0.0.1:{down}", "--mx-port=2525", "--dns-timeout=2")
    try:
        start = time.monotonic()
        d.start()
        wait_for(lambda: "to=<x@example.test>" in d.log(), 30, what="the outcome line")
        elapsed = time.monotonic() - start
        log = d.log()

        def saved():  # the outcome is logged first, then written (group commit)
            rows = queue_list(q, detail=True)
            return (len(rows) == 1 and rows[0]["recipients"][0]["state"] != "pending"
                    and rows)

        [entry] = wait_for(saved, 10, what="the outcome written", detail=d.log)
    finally:
        d.stop()
    line = outcome_line(log, "x@example.test")
    assert "status=deferred (451 4.4.3 MX lookup for example.test: DNS query timed out, " \
           "will retry)" in line, line
    assert "relay=none" in line and "attempts=1" in line, line
    # twistd start-up (about 1-2 s) plus the 2 s DNS timeout
    assert elapsed < 12, elapsed
    [r] = entry["recipients"]
    assert r["state"] == "deferred" and r["next_attempt"]
    assert r["reply"] == {"code": 451, "text": "4.4.3 MX lookup for example.test: DNS query "
                                               "timed out, will retry", "local": True}
