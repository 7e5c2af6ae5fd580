"""The daemon signs (issue 12 item 1): with --dkim-keys, mail is signed with
rsa-sha256 and ed25519-sha256 before its first attempt; the copy received by
aiosmtpd after a real SMTP hop verifies, and a message deferred once is sent
again with the very same signature."""

from __future__ import annotations

import email
import re

import dkim

from tests.support.daemon import Daemon
from tests.support.peers import AiosmtpdSink
from tests.support.wait import wait_for
from twisted_mailout import enqueue
from twisted_mailout.dkim import keygen

MSG = ("From: News <news@example.test>\r\nTo: u@dest.test\r\nSubject: Grüße\r\n"
       "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
       "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln.\r\n" + "x" * 900 + "\r\n"
       ).encode()


def test_signed_mail_verifies_after_a_real_hop_and_keeps_its_signature(tmp_path):
    table = tmp_path / "keys" / "keys.toml"
    table.parent.mkdir(mode=0o700)
    records = {}
    for kind, selector in (("rsa", "r1"), ("ed25519", "e1")):
        _, record = keygen(table, "example.test", selector, kind)
        name = f"{selector}._domainkey.example.test."
        records[name.encode()] = "".join(re.findall(r'"([^"]*)"', record)).encode()

    def dnsfunc(qname, timeout=5):
        return records.get(qname if qname.endswith(b".") else qname + b".")

    refused = []

    def data_reply(envelope):
        if not refused:  # the first attempt is deferred
            refused.append(envelope["data"])
            return "451 4.3.0 try again later"
        return None

    sink = AiosmtpdSink("127.0.0.1", data_reply=data_reply).start()
    q = tmp_path / "q"
    try:
        enqueue(str(q), "news@example.test", ["u@dest.test"], MSG)
        d = Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--tls=none",
                   "--resolver=127.0.0.1:53", f"--dkim-keys={table}", "--dkim-required",
                   "--retry-base=1", "--retry-max=1", "--retry-jitter=0", "--no-http",
                   log=tmp_path / "daemon.log").start()
        try:
            [got] = sink.wait_for_messages(1, timeout=30)
            wait_for(lambda: "status=sent" in d.log(), 10, what="the sent line",
                     detail=d.log)
        finally:
            d.stop()
    finally:
        sink.stop()
    data = got["data"]
    assert refused == [data]  # deferred once, then sent again byte for byte (one signing)
    sigs = email.message_from_bytes(data).get_all("DKIM-Signature")
    assert sorted(re.search(r"a=([\w-]+)", s).group(1) for s in sigs) == [
        "ed25519-sha256", "rsa-sha256"]
    # every signature verifies (dkim.verify checks the first; drop each in turn)
    for i in range(len(sigs)):
        assert dkim.DKIM(data).verify(idx=i, dnsfunc=dnsfunc), f"signature {i} failed"
    assert b"x" * 900 in data
