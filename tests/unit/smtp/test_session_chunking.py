"""The driver under any chunking of the server's bytes: the same outcome as
when every reply arrives whole (the state machine's batches never split or
shift a pipelined group, a serial dialogue or the STARTTLS guard), with DATA
and with BDAT (CHUNKING)."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.protocol import ESMTPSession
from twisted_mailout.smtp.replies import encode_reply

BODY = b"Subject: t\r\n\r\n.dot\r\nbody\r\n"
RCPTS = ["a@b.example", "c@b.example", "d@b.example"]
RCPT_REPLIES = [encode_reply(250, "ok"), encode_reply(550, "5.1.1 unknown\nreally"),
                encode_reply(451, "later")]


class Transport(StringTransport):
    def startTLS(self, creator):
        self.tls = creator


def session():
    s = ESMTPSession("c.example", Clock(), tls="may", tls_creator=lambda h: "tls",
                     hostname="mx.example")
    t = Transport(peerAddress=IPv4Address("TCP", "192.0.2.1", 25))
    s.makeConnection(t)
    return s, t


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if a != b]


def feed(s, data: bytes, cuts: list[int]) -> None:
    for piece in chunks(data, cuts):
        s.dataReceived(piece)


def pump(t) -> None:
    while t.producer is not None:
        t.producer.resumeProducing()


def dialogue(pipelining: bool, cuts: list[int], chunking: bool = False):
    s, t = session()
    ext = ("\nPIPELINING" if pipelining else "") + ("\nCHUNKING" if chunking else "")
    feed(s, b"220 mx ESMTP\r\n", cuts)
    feed(s, encode_reply(250, "mx\nSTARTTLS" + ext), cuts)
    assert t.value().endswith(b"STARTTLS\r\n")
    feed(s, b"220 go ahead\r\n", cuts)  # nothing may follow it in the same bytes
    assert t.tls == "tls"
    feed(s, encode_reply(250, "mx\nSIZE 100000" + ext), cuts)
    assert s.ready.called and s.encrypted
    d = s.transaction("f@a.example", RCPTS, io.BytesIO(BODY))
    go = [] if chunking else [encode_reply(354, "go")]  # BDAT: no 354
    if pipelining:
        feed(s, encode_reply(250, "sender ok") + b"".join(RCPT_REPLIES) + b"".join(go), cuts)
    else:
        for reply in [encode_reply(250, "sender ok"), *RCPT_REPLIES, *go]:
            feed(s, reply, cuts)
    pump(t)
    assert (b"BDAT " in t.value()) is chunking
    feed(s, encode_reply(250, "2.0.0 queued\nas X"), cuts)
    assert d.called
    return d.result, t.value()


@settings(max_examples=60, deadline=None)
@given(st.booleans(), st.lists(st.integers(0, 200), max_size=6), st.booleans())
def test_any_chunking_same_outcome(pipelining, cuts, bdat):
    whole = dialogue(pipelining, [], bdat)
    result, wire = dialogue(pipelining, cuts, bdat)
    assert (result, wire) == whole
    assert result.replies == {"a@b.example": Reply(250, "2.0.0 queued\nas X"),
                              "c@b.example": Reply(550, "5.1.1 unknown\nreally"),
                              "d@b.example": Reply(451, "later")}
    assert result.session_usable
