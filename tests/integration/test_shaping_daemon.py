"""Traffic shaping and throttling rules in the running daemon (issue 12 items
2 and 3), against an SMTP server nobody here wrote (aiosmtpd) that records
each message's arrival time and the connection it came on, with MX routing
through a loopback DNS zone:

- a provider's connection limit holds across all its domains together;
- max_deliveries_per_connection is honoured;
- a "20/s" message rate holds over 10 seconds of a 1,000-message burst, and
  the mail waiting for its slot is neither deferred nor bounced;
- a server answering 421 4.7.28 past a rule's threshold gets its destination
  suspended for the rule's duration; nothing is bounced, and delivery resumes
  by itself afterwards.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tests.support.daemon import Daemon, queue_list
from tests.support.peers import AiosmtpdSink, free_port, zone
from tests.support.wait import wait_for
from twisted_mailout import enqueue

MSG = b"From: a@origin.test\r\nTo: u@dest.test\r\nSubject: shaping\r\n\r\nbody\r\n"


def _setup(tmp_path: Path, dns_server, mx: dict[str, str], shaping: str, **sink_kw):
    port = free_port("127.0.0.2")
    sink = AiosmtpdSink("127.0.0.2", port, **sink_kw).start()
    records: dict = {"origin.test": {"MX": [[10, "mx.origin.test"]]}}
    for domain, host in mx.items():
        records[domain] = {"MX": [[10, host]]}
        records[host] = {"A": ["127.0.0.2"]}
    records.setdefault("mx.origin.test", {"A": ["127.0.0.2"]})
    dns = dns_server(zone(records))
    shaping_file = tmp_path / "shaping.toml"
    shaping_file.write_text(shaping)
    args = [f"--resolver=127.0.0.1:{dns}", f"--mx-port={port}", "--tls=none",
            f"--shaping={shaping_file}", "--no-http"]
    return sink, args


def test_provider_connection_limit_holds_across_its_domains(tmp_path, dns_server):
    sink, args = _setup(tmp_path, dns_server,
                        {"a.test": "mx1.bigmail.test", "b.test": "mx2.bigmail.test",
                         "c.test": "mx3.bigmail.test"},
                        "presets = false\n[provider.big]\nmx_suffixes = [\".bigmail.test\"]\n"
                        "connection_limit = 2\n")
    q = tmp_path / "q"
    n = 90
    for i in range(n):
        enqueue(str(q), "a@origin.test", [f"u{i}@{'abc'[i % 3]}.test"], MSG)
    # without the shaping file each domain could have 4 connections (12 in all);
    # many messages a connection, so no connection closes (and reopens) meanwhile
    d = Daemon(q, *args, "--max-per-destination=4", "--max-messages-per-connection=1000",
               log=tmp_path / "daemon.log").start()
    try:
        got = sink.wait_for_messages(n, timeout=60)
    finally:
        d.stop()
        sink.stop()
    assert len(got) == n
    # one connection serves one domain: each peer port's messages go to one domain
    assert sink.peak_sessions == 2, sink.peak_sessions
    by_peer = {m["peer"]: m["rcpt_tos"][0].split("@")[1] for m in got}
    assert len(set(by_peer.values())) == 3  # all three domains were served


def test_max_deliveries_per_connection(tmp_path, dns_server):
    sink, args = _setup(tmp_path, dns_server, {"few.test": "mx.few.test"},
                        "presets = false\n[domain.\"few.test\"]\n"
                        "max_deliveries_per_connection = 5\nconnection_limit = 2\n")
    q = tmp_path / "q"
    n = 40
    for i in range(n):
        enqueue(str(q), "a@origin.test", [f"u{i}@few.test"], MSG)
    d = Daemon(q, *args, log=tmp_path / "daemon.log").start()
    try:
        got = sink.wait_for_messages(n, timeout=60)
    finally:
        d.stop()
        sink.stop()
    per_connection = Counter(m["peer"] for m in got)
    assert sum(per_connection.values()) == n
    assert max(per_connection.values()) == 5, per_connection
    assert len(per_connection) >= n // 5


def test_message_rate_holds_over_a_burst_and_delays_only(tmp_path, dns_server):
    sink, args = _setup(tmp_path, dns_server, {"rate.test": "mx.rate.test"},
                        "presets = false\n[domain.\"rate.test\"]\nmax_message_rate = \"20/s\"\n")
    q = tmp_path / "q"
    burst = 1000
    for i in range(burst):
        enqueue(str(q), "a@origin.test", [f"u{i}@rate.test"], MSG)
    d = Daemon(q, *args, log=tmp_path / "daemon.log").start()
    try:
        # 10 seconds of the burst: 200 messages at 20 a second
        got = sink.wait_for_messages(201, timeout=60)
        rows = queue_list(q)
    finally:
        d.stop()
        sink.stop()
    times = sorted(m["time"] for m in got)[:201]
    # no window of one second holds more than 20 (+1 for the window's edge,
    # +1 of slack for timer granularity)
    for i, t in enumerate(times):
        in_window = sum(1 for u in times[i:] if u < t + 1.0)
        assert in_window <= 22, (i, in_window)
    # 201 messages are 200 intervals of 50 ms: 10 s (less timer slack)
    assert times[-1] - times[0] >= 9.5, times[-1] - times[0]
    # the mail still waiting was delayed, never deferred or bounced
    waiting = [r for r in rows for rc in r["recipients"]]
    assert waiting and all(rc["state"] == "pending" and rc["attempts"] == 0
                           for r in rows for rc in r["recipients"]
                           if rc["state"] != "delivered"), rows[:3]
    assert "status=deferred" not in d.log() and "status=bounced" not in d.log()


def test_throttling_reply_suspends_the_destination_then_delivery_resumes(tmp_path,
                                                                       dns_server):
    refused: list[float] = []

    def data_reply(record):
        if len(refused) < 2:  # the provider throttles the first two
            import time
            refused.append(time.monotonic())
            return ("421 4.7.28 [127.0.0.2] Our system has detected an unusual rate of "
                    "unsolicited mail originating from your IP address.")
        return None

    sink, args = _setup(
        tmp_path, dns_server, {"g.test": "gmail-smtp-in.l.g.test"},
        "presets = false\n[domain.\"g.test\"]\nconnection_limit = 1\n"
        "[[rule]]\nname = \"google-rate\"\npattern = '^421 4\\.7\\.28\\b'\n"
        "threshold = \"2/h\"\nduration = \"4s\"\nreason = \"Google says slow down\"\n",
        data_reply=data_reply)
    q = tmp_path / "q"
    n = 5
    for i in range(n):
        enqueue(str(q), "a@origin.test", [f"u{i}@g.test"], MSG)
    d = Daemon(q, *args, "--retry-base=2", "--retry-max=2", "--retry-jitter=0",
               log=tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: len(refused) == 2, 30, what="two throttling replies")
        # the suspension is written for the operator (and a restart) to see
        saved = wait_for(lambda: (q / "suspensions.json").exists()
                         and json.loads((q / "suspensions.json").read_text()), 10,
                         what="the rule's suspension saved")
        got = sink.wait_for_messages(n, timeout=60)
    finally:
        d.stop()
        sink.stop()
    log = d.log()
    [s] = saved if isinstance(saved, list) else saved["suspensions"]
    assert s["domain"] == "g.test" and s["reason"] == "Google says slow down"
    assert s["until"] - s["created"] == 4
    assert "throttled by rule google-rate" in log
    # nothing arrived while the destination was suspended: the first message
    # after the second refusal came when the suspension ended (4 s, less slack)
    first = min(m["time"] for m in got)
    assert first - refused[1] >= 3.5, first - refused[1]
    assert len(got) == n and "status=bounced" not in log
    assert queue_list(q) == []


def test_per_provider_source_address_and_ehlo(tmp_path, dns_server):
    sink, args = _setup(tmp_path, dns_server,
                        {"big.test": "mx.bigmail.test", "plain.test": "mx.plain.test"},
                        "presets = false\n[provider.big]\nmx_suffixes = [\".bigmail.test\"]\n"
                        "source_address = \"127.0.0.3\"\nehlo = \"mta3.mailout.test\"\n")
    q = tmp_path / "q"
    enqueue(str(q), "a@origin.test", ["u@big.test"], MSG)
    enqueue(str(q), "a@origin.test", ["u@plain.test"], MSG)
    d = Daemon(q, *args, "--source-address=127.0.0.4", log=tmp_path / "daemon.log").start()
    try:
        got = sink.wait_for_messages(2, timeout=30)
    finally:
        d.stop()
        sink.stop()
    seen = {m["rcpt_tos"][0]: (m["peer"][0], m["helo"]) for m in got}
    assert seen == {"u@big.test": ("127.0.0.3", "mta3.mailout.test"),
                    "u@plain.test": ("127.0.0.4", "mailout.test")}


def test_recipients_per_transaction_and_connection_rate(tmp_path, dns_server):
    sink, args = _setup(tmp_path, dns_server, {"many.test": "mx.many.test"},
                        "presets = false\n[domain.\"many.test\"]\n"
                        "max_recipients_per_message = 2\nmax_deliveries_per_connection = 1\n"
                        "max_connection_rate = \"2/s\"\n")
    q = tmp_path / "q"
    enqueue(str(q), "a@origin.test", [f"u{i}@many.test" for i in range(5)], MSG)
    d = Daemon(q, *args, log=tmp_path / "daemon.log").start()
    try:
        got = sink.wait_for_messages(3, timeout=30)
        wait_for(lambda: queue_list(q) == [], 10, what="the message finished")
    finally:
        d.stop()
        sink.stop()
    # five recipients in transactions of at most two, one transaction a connection
    assert sorted(len(m["rcpt_tos"]) for m in got) == [1, 2, 2]
    assert len({m["peer"] for m in got}) == 3
    # connections opened at most two a second: three of them span at least 1 s
    times = sorted(m["time"] for m in got)
    assert times[-1] - times[0] >= 0.9, times
