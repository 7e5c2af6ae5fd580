"""End to end: the real daemon, a real DNS server (twisted.names on loopback)
and SMTP servers nobody here wrote (aiosmtpd, Postfix's smtp-sink)."""

from __future__ import annotations

import email
import os
import signal
import time

import pytest
from tests.support.peers import AiosmtpdSink, free_port, zone

from tests.support.daemon import Daemon, queue_list
from tests.support.wait import wait_for
from twisted_mailout import enqueue


def message(i: int, sender: str, rcpts: list[str], size: int = 0) -> bytes:
    """A message with its own Message-ID and Date, so the bytes arrive unchanged."""
    head = (f"Message-ID: <m{i}.{time.monotonic_ns()}@test>\r\nDate: Mon, 23 Nov 2026 10:00:00 "
            f"+0000\r\nFrom: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: message {i}\r\n\r\n")
    body = f"Body of message {i}.\r\n.A line starting with a dot\r\n".encode()
    while len(body) < size:
        body += b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n"
    return head.encode() + body


def message_id(data: bytes) -> str:
    return email.message_from_bytes(data)["Message-ID"]


def start_sinks(hosts: dict[str, str], port: int, **kw) -> dict[str, AiosmtpdSink]:
    """One aiosmtpd sink per loopback address, all on `port`."""
    sinks = {}
    try:
        for name, ip in hosts.items():
            sinks[name] = AiosmtpdSink(ip, port, server_hostname=name, **kw.get(name, {})).start()
    except BaseException:
        for s in sinks.values():
            s.stop()
        raise
    return sinks


def stop_sinks(sinks):
    for s in sinks.values():
        s.stop()


def received(sinks) -> list[dict]:
    return [m for s in sinks.values() for m in s.messages]


def test_thousand_messages_three_domains_first_mx_of_one_down(tmp_path, dns_server):
    port = free_port("127.0.0.2")
    hosts = {"mx1.one.test": "127.0.0.2", "mx.two.test": "127.0.0.3",
             "mx.three.test": "127.0.0.4"}
    dns = dns_server(zone({
        # one.test's preferred MX has an address where nothing listens
        "one.test": {"MX": [[10, "dead.one.test"], [20, "mx1.one.test"]]},
        "dead.one.test": {"A": ["127.0.0.9"]},
        "two.test": {"MX": [[10, "mx.two.test"]]},
        "three.test": {"MX": [[10, "mx.three.test"]]},
        **{h: {"A": [ip]} for h, ip in hosts.items()},
    }))
    sinks = start_sinks(hosts, port)
    q = tmp_path / "q"
    sent = {}
    domains = ["one.test", "two.test", "three.test"]
    t0 = time.monotonic()
    for i in range(1000):
        rcpts = [f"user{i}@{domains[i % 3]}"]
        if i % 10 == 0:
            rcpts.append(f"other{i}@{domains[i % 3]}")
        data = message(i, "sender@origin.test", rcpts, size=(i % 7) * 3000)
        enqueue(str(q), "sender@origin.test", rcpts, data)
        sent[message_id(data)] = (data, rcpts)
    t_enqueue = time.monotonic() - t0
    d = Daemon(q, f"--resolver=127.0.0.1:{dns}", f"--mx-port={port}", "--max-connections=12",
               "--max-per-destination=4")
    try:
        t1 = time.monotonic()
        d.start()
        wait_for(lambda: len(received(sinks)) >= 1000, 180, what="1000 messages")
        elapsed = time.monotonic() - t1
        got = received(sinks)
        assert len(got) == 1000, "no duplicates"
        for m in got:
            data, rcpts = sent[message_id(m["data"])]
            assert m["data"] == data  # byte for byte
            assert m["mail_from"] == "sender@origin.test"
            assert sorted(m["rcpt_tos"]) == sorted(rcpts)
        by_host = {name: len(s.messages) for name, s in sinks.items()}
        assert by_host == {"mx1.one.test": 334, "mx.two.test": 333, "mx.three.test": 333}
        wait_for(lambda: queue_list(q) == [], 30, what="an empty queue")
        log = d.log()
        assert log.count("status=sent") == 1100
        assert "dead.one.test[127.0.0.9]" in log  # it was tried, and the backup took the mail
        print(f"\n1000 messages: enqueue {t_enqueue:.2f}s; daemon delivered in {elapsed:.2f}s "
              f"({1000 / elapsed:.0f} msg/s) to {by_host}")
    finally:
        d.stop()
        stop_sinks(sinks)


def test_accepted_refused_and_deferred_recipients_and_the_bounce(tmp_path, dns_server):
    port = free_port("127.0.0.2")
    hosts = {"mx.dest.test": "127.0.0.2", "mx.origin.test": "127.0.0.3"}

    def policy(rcpt):
        if rcpt.startswith("refused@"):
            return "550 5.1.1 <refused@dest.test>: no such user"
        if rcpt.startswith("later@"):
            return "451 4.3.0 try again later"
        return None

    dns = dns_server(zone({"dest.test": {"MX": [[10, "mx.dest.test"]]},
                           "origin.test": {"MX": [[10, "mx.origin.test"]]},
                           **{h: {"A": [ip]} for h, ip in hosts.items()}}))
    sinks = start_sinks(hosts, port, **{"mx.dest.test": {"rcpt_reply": policy}})
    q = tmp_path / "q"
    rcpts = ["ok@dest.test", "refused@dest.test", "later@dest.test"]
    data = message(1, "author@origin.test", rcpts)
    qid = enqueue(str(q), "author@origin.test", rcpts, data)
    d = Daemon(q, f"--resolver=127.0.0.1:{dns}", f"--mx-port={port}")
    try:
        d.start()
        bounce = wait_for(lambda: sinks["mx.origin.test"].messages, 60, what="the bounce")[0]
        delivered = sinks["mx.dest.test"].messages
        assert [m["rcpt_tos"] for m in delivered] == [["ok@dest.test"]]
        assert delivered[0]["data"] == data
        # the bounce: null sender, to the author, an RFC 3464 report for refused@ only
        assert bounce["mail_from"] == ""
        assert bounce["rcpt_tos"] == ["author@origin.test"]
        report = email.message_from_bytes(bounce["data"])
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload()[1]
        blocks = status.get_payload()
        assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; refused@dest.test"]
        assert blocks[1]["Status"] == "5.1.1"
        assert blocks[1]["Action"] == "failed"
        assert "550 5.1.1" in blocks[1]["Diagnostic-Code"]
        headers = report.get_payload()[2].get_payload()
        assert message_id(data) in headers
        # the queue keeps the message for the deferred recipient, with its state
        # (views.detail: each recipient's last reply as an object)
        entries = wait_for(
            lambda: [e for e in queue_list(q, detail=True) if e["queue_id"] == qid], 10)
        states = {r["address"]: r for r in entries[0]["recipients"]}
        assert states["ok@dest.test"]["state"] == "delivered"
        assert states["refused@dest.test"]["state"] == "bounced"
        later = states["later@dest.test"]
        assert later["state"] == "deferred" and later["attempts"] == 1
        assert later["reply"]["code"] == 451 and later["next_attempt"]
        assert later["last_reply"].startswith("451 ")  # the row's one-line form
        log = d.log()
        assert "to=<ok@dest.test>" in log and "status=sent" in log
        assert "to=<refused@dest.test>" in log and "status=bounced" in log
        assert "to=<later@dest.test>" in log and "status=deferred" in log
        assert f"relay=mx.dest.test[127.0.0.2]:{port}" in log
    finally:
        d.stop()
        stop_sinks(sinks)


def test_relay_to_postfix_smtp_sink_byte_for_byte(tmp_path, smtp_sink):
    sink = smtp_sink()
    q = tmp_path / "q"
    sent = {}
    # sizes around the 16 KiB and 64 KiB chunk boundaries, with CRLF and dot lines
    for i, size in enumerate([0, 100, 16383, 16384, 16385, 32768, 65535, 65536, 65537, 200000]):
        data = message(i, "s@origin.test", ["r@dest.test"])
        pad = size - len(data)
        if pad > 0:
            line = b".dot-led line that must be stuffed\r\n"
            data += (line * (pad // len(line) + 1))[:pad]
            data = data[:-2] + b"\r\n" if not data.endswith(b"\r\n") else data
        enqueue(str(q), "s@origin.test", ["r@dest.test"], data)
        sent[message_id(data)] = data
    d = Daemon(q, f"--relay=127.0.0.1:{sink.port}")
    try:
        d.start()
        msgs = sink.wait_for_messages(len(sent), timeout=60)
        assert len(msgs) == len(sent)
        for m in msgs:
            original = sent[message_id(m["data"])]
            # smtp-sink's dump adds its own Received header first
            assert m["data"].endswith(original)
            assert m["mail_from"] == "s@origin.test"
    finally:
        d.stop()
        sink.stop()


def test_ipv6_mx_host(tmp_path, dns_server):
    sink = AiosmtpdSink("::1").start()
    dns = dns_server(zone({"six.test": {"MX": [[10, "mx.six.test"]]},
                           "mx.six.test": {"AAAA": ["::1"]}}))
    q = tmp_path / "q"
    data = message(1, "s@origin.test", ["r@six.test"])
    enqueue(str(q), "s@origin.test", ["r@six.test"], data)
    d = Daemon(q, f"--resolver=127.0.0.1:{dns}", f"--mx-port={sink.port}")
    try:
        d.start()
        [m] = sink.wait_for_messages(1, timeout=30)
        assert m["data"] == data
        assert f"relay=mx.six.test[::1]:{sink.port}" in wait_for(
            lambda: "status=sent" in d.log() and d.log(), 10)
    finally:
        d.stop()
        sink.stop()


def test_null_mx_and_nxdomain_bounce_at_once_servfail_defers(tmp_path, dns_server):
    port = free_port("127.0.0.3")
    sinks = start_sinks({"mx.origin.test": "127.0.0.3"}, port)
    dns = dns_server(zone({"origin.test": {"MX": [[10, "mx.origin.test"]]},
                           "mx.origin.test": {"A": ["127.0.0.3"]},
                           "nullmx.test": {"MX": [[0, "."]]},
                           "broken.test": {"SERVFAIL": True}}))
    q = tmp_path / "q"
    rcpts = ["a@nullmx.test", "b@nowhere.test", "c@broken.test"]
    qid = enqueue(str(q), "author@origin.test", rcpts, message(1, "author@origin.test", rcpts))
    d = Daemon(q, f"--resolver=127.0.0.1:{dns}", f"--mx-port={port}")
    try:
        d.start()
        [bounce] = wait_for(lambda: sinks["mx.origin.test"].messages, 30, what="the bounce")
        blocks = email.message_from_bytes(bounce["data"]).get_payload()[1].get_payload()
        got = {b["Final-Recipient"]: b["Status"] for b in blocks[1:]}
        assert got == {"rfc822; a@nullmx.test": "5.1.10", "rfc822; b@nowhere.test": "5.1.2"}
        [entry] = [e for e in queue_list(q, detail=True) if e["queue_id"] == qid]
        c = [r for r in entry["recipients"] if r["address"] == "c@broken.test"][0]
        assert c["state"] == "deferred" and "SERVFAIL" in c["reply"]["text"]
    finally:
        d.stop()
        stop_sinks(sinks)


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_redelivers_nothing_lost(tmp_path, sig):
    sink = AiosmtpdSink("127.0.0.1").start()
    q = tmp_path / "q"
    ids = set()
    for i in range(200):
        data = message(i, "s@origin.test", [f"r{i}@dest.test"])
        enqueue(str(q), "s@origin.test", [f"r{i}@dest.test"], data)
        ids.add(message_id(data))
    try:
        d = Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--max-connections=2",
                   log=tmp_path / "a.log").start()
        wait_for(lambda: len(sink.messages) >= 50, 60, interval=0.005)
        d.signal(sig)
        # twistd re-raises the signal once shut down, as daemons conventionally do
        assert d.proc.wait(30) in (0, -sig)
        d.stop()
        assert "mailout stopped" in d.log() and "Server Shut Down" in d.log()
        d2 = Daemon(q, f"--relay=127.0.0.1:{sink.port}", log=tmp_path / "b.log").start()
        try:
            wait_for(lambda: {message_id(m["data"]) for m in sink.messages} >= ids, 60)
        finally:
            d2.stop()
        got = [message_id(m["data"]) for m in sink.messages]
        assert len(got) == len(ids), "a graceful stop duplicates nothing"
        assert not os.listdir(q / "messages")
    finally:
        sink.stop()
