"""BDAT (RFC 3030 CHUNKING) against a real server: a private Postfix smtpd
(which offers CHUNKING) on loopback, relaying to Postfix's smtp-sink, which
stores what it receives (issue 14 item 2).

The same messages go once through a session sending BDAT and once through a
session made with C{chunking=False} (DATA): a message larger than a chunk,
bare LFs and bare CRs, lines starting with dots (and a line that is a lone
dot), 8-bit bytes, no line end at the end. The copies smtp-sink stored, less
the Received field Postfix adds, must be byte for byte the same for both,
and equal to the message with its line ends made CRLF. Postfix's log shows
which command carried each (its "disconnect" line counts bdat= and data=).

smtp-sink itself does not offer CHUNKING (Postfix 3.7's lists PIPELINING,
8BITMIME, AUTH, XCLIENT, XFORWARD, ENHANCEDSTATUSCODES, DSN); a session to it
sends DATA, which is checked here too.

Needs root (Postfix's master runs as root; the services drop to postfix).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
from twisted.internet import defer, endpoints, reactor, threads
from twisted.trial import unittest

from tests.support.peers import SmtpSink
from twisted_mailout.smtp.dotstuff import encode_bdat
from twisted_mailout.smtp.producers import BDAT_CHUNK, CHUNK
from twisted_mailout.smtp.protocol import ESMTPSession, Timeouts

_ROOT = Path(__file__).resolve().parents[2]


def _postfix_instance_class() -> type:
    spec = importlib.util.spec_from_file_location(
        "postfix_instance", _ROOT / "benchmarks" / "postfix_instance.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base: type = module.PostfixInstance

    class Instance(base):  # type: ignore[misc, valid-type]
        """The benchmarks' private Postfix, leaving header addresses as they
        are (no canonical rewriting for loopback clients)."""

        def _main_cf(self) -> str:
            return super()._main_cf() + "local_header_rewrite_clients =\n"

    return Instance


def _body_lines(n: int) -> bytes:
    out = []
    for i in range(n):
        end = (b"\n", b"\r\n", b"\r")[i % 3]
        dots = b"." * (i % 4)
        out.append(dots + b"line %d caf\xc3\xa9 \xe9\xff\x01 " % i + b"x" * (i % 70) + end)
    return b"".join(out)


def _head(name: str) -> bytes:
    return (f"Message-ID: <{name}@client.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"From: <f@client.test>\r\nTo: <{name}@dest.test>\r\nSubject: {name}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n").encode()


def _big() -> bytes:
    """Over three chunks, in lines Postfix never folds (under 998 octets),
    with a CR LF split across the first 64 KiB read boundary."""
    head = _head("big") + b"\n"
    line = b"y" * 77 + b"\r\n"
    filler = line * ((CHUNK - 1 - len(head)) // len(line))
    filler += b"z" * (CHUNK - 1 - len(head) - len(filler)) + b"\r\n"
    msg = head + filler + _body_lines(30000)
    assert msg[CHUNK - 1:CHUNK + 1] == b"\r\n"
    return msg


#: The messages, by name: headers with CRLF, bodies with mixed line ends.
MESSAGES = {
    "big": _big(),  # several chunks
    "small": _head("small") + b"\n.\n..\r\n.\r.x\r\n\r\n.\r\nQUIT\r\n\xc3\xa9 no end",
    "lf": _head("lf").replace(b"\r\n", b"\n") + b"\nbody\n.\n",
    "headers-only": _head("headers-only"),
}


def _without_postfix_received(data: bytes) -> bytes:
    """The stored copy less the first Received field (Postfix's, folded)."""
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", data)
    assert m, data[:200]
    return data[m.end():]


class BdatPostfixTests(unittest.TestCase):
    timeout = 180

    @classmethod
    def setUpClass(cls) -> None:
        if os.geteuid() != 0 or not Path("/usr/sbin/postfix").exists():
            raise unittest.SkipTest("needs root and Postfix (the private instance)")
        if not SmtpSink.available():
            if os.environ.get("CI") == "true":
                pytest.fail("smtp-sink is missing: install Debian's postfix")
            raise unittest.SkipTest("Postfix's smtp-sink is not installed")
        cls.sink = SmtpSink("127.0.0.1").start()
        try:
            cls.postfix = _postfix_instance_class()(cls.sink.port).start()
        except BaseException:
            cls.sink.stop()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            cls.postfix.stop()
        finally:
            cls.sink.stop()

    async def _send(self, port: int, chunking: bool, prefix: str,
                    names: list[str]) -> ESMTPSession:
        """Send C{names} over one session to 127.0.0.1:C{port}; each to
        C{PREFIX-NAME@dest.test}. @return: the session (closed)."""
        session = ESMTPSession("client.test", reactor, tls="none", hostname="mx.test",
                               timeouts=Timeouts.scaled(60), chunking=chunking)
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await endpoints.connectProtocol(ep, session)
        await session.ready
        for name in names:
            msg = MESSAGES[name]
            result = await session.transaction(
                "f@client.test", [f"{prefix}-{name}@dest.test"], _Source(msg),
                size=len(msg), eightbit=not msg.isascii())
            [reply] = result.replies.values()
            self.assertEqual(reply.code, 250, (prefix, name, reply))
            self.assertTrue(result.session_usable)
        await session.quit()
        return session

    @defer.inlineCallbacks
    def test_bdat_and_data_deliver_the_same_bytes(self):
        names = sorted(MESSAGES)
        assert len(MESSAGES["big"]) > 4 * BDAT_CHUNK
        bdat = yield defer.Deferred.fromCoroutine(
            self._send(self.postfix.port, True, "bdat", names))
        self.assertIn("CHUNKING", bdat.extensions)
        yield defer.Deferred.fromCoroutine(self._send(self.postfix.port, False, "data", names))
        records = yield threads.deferToThread(self.sink.wait_for_messages, 2 * len(names), 90)
        got = {}
        for rec in records:
            [rcpt] = rec["rcpt_tos"]
            got[rcpt.split("@")[0]] = _without_postfix_received(rec["data"])
        for name in names:
            expected = encode_bdat(MESSAGES[name])
            self.assertEqual(got[f"bdat-{name}"], expected, name)
            self.assertEqual(got[f"data-{name}"], got[f"bdat-{name}"], name)
        self.assertIn(b"\r\n.\r\nQUIT\r\n", got["bdat-small"])  # not the end of anything
        self.assertIn(b"\r\n...line 3 caf\xc3\xa9 \xe9\xff", got["bdat-big"])
        log = self.postfix.log()
        disconnects = re.findall(r"disconnect from \S+ (ehlo=.*)", log)
        self.assertEqual(len(disconnects), 2, log[-3000:])
        [bdat_counts] = [re.findall(r"bdat=(\d+)", d) for d in disconnects if "bdat=" in d]
        self.assertGreaterEqual(int(bdat_counts[0]), len(names) + 3)  # big: several chunks
        self.assertTrue(all("data=" not in d for d in disconnects if "bdat=" in d))
        self.assertTrue(any(f"data={len(names)}" in d and "bdat=" not in d
                            for d in disconnects), disconnects)

    @defer.inlineCallbacks
    def test_smtp_sink_offers_no_chunking_so_data_goes(self):
        before = len(self.sink.dump_files())
        session = yield defer.Deferred.fromCoroutine(
            self._send(self.sink.port, True, "direct", ["small"]))
        self.assertNotIn("CHUNKING", session.extensions)
        records = yield threads.deferToThread(self.sink.wait_for_messages, before + 1, 30)
        [rec] = [r for r in records if r["rcpt_tos"] == ["direct-small@dest.test"]]
        self.assertEqual(rec["data"], encode_bdat(MESSAGES["small"]))


class _Source:
    """A binary file over bytes (what the queue's open_body gives)."""

    def __init__(self, data: bytes):
        self._data = data
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        out = self._data[self._pos:end]
        self._pos += len(out)
        return out
