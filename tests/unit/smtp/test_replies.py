"""ReplyParser and encode_reply: the reply syntax, limits and byte offsets
the session relies on, under any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.errors import MalformedReply
from twisted_mailout.smtp.replies import MAX_LINE, MAX_REPLY_LINES, ReplyParser, encode_reply


def parse_all(*chunks: bytes) -> list[tuple[Reply, int]]:
    p = ReplyParser()
    out = []
    for c in chunks:
        p.feed(c)
        while (r := p.next_reply()) is not None:
            out.append(r)
    return out


def test_single_and_multiline_with_offsets():
    data = b"220 hi there\r\n250-mx.example\r\n250-SIZE 10\r\n250 PIPELINING\r\n"
    assert parse_all(data) == [
        (Reply(220, "hi there"), 0),
        (Reply(250, "mx.example\nSIZE 10\nPIPELINING"), 14),
    ]


def test_bare_lf_and_code_only_lines():
    assert parse_all(b"220\n250-a\n250\n") == [(Reply(220, ""), 0), (Reply(250, "a\n"), 4)]


@pytest.mark.parametrize("bad", [b"hello\r\n", b"25 x\r\n", b"2500 x\r\n", b"250x\r\n",
                                 b"abc ok\r\n", b"\r\n", b"25\r\n", b"150 info\r\n",
                                 b"650 no\r\n"])
def test_malformed_lines(bad):
    with pytest.raises(MalformedReply, match="malformed"):
        parse_all(bad)


def test_code_change_inside_multiline():
    with pytest.raises(MalformedReply, match="code changed"):
        parse_all(b"250-a\r\n251 b\r\n")


def test_line_limits_whatever_the_chunking():
    line = b"220 " + b"z" * (MAX_LINE - 4)
    for packets in ([line + b"\r\n"], [line + b"\r", b"\n"], [line, b"\r\n"],
                    [line[:100], line[100:] + b"\r", b"\n"]):
        [(reply, start)] = parse_all(*packets)
        assert reply.code == 220 and start == 0
    with pytest.raises(MalformedReply, match="longer than"):
        parse_all(b"220 " + b"x" * MAX_LINE + b"\r\n")
    p = ReplyParser()
    p.feed(b"220 " + b"x" * (MAX_LINE // 2))
    assert p.next_reply() is None
    p.feed(b"x" * (MAX_LINE // 2))
    with pytest.raises(MalformedReply, match="longer than"):
        p.next_reply()


def test_too_many_lines():
    with pytest.raises(MalformedReply, match="lines"):
        parse_all(b"250-x\r\n" * MAX_REPLY_LINES + b"250 end\r\n")
    [(r, _)] = parse_all(b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 end\r\n")
    assert r.text.count("\n") == MAX_REPLY_LINES - 1


def test_discard_drops_buffer_and_partial_reply_and_keeps_offsets():
    p = ReplyParser()
    p.feed(b"220 go ahead\r\n250-INJECTED\r\n250 parti")
    assert p.next_reply() == (Reply(220, "go ahead"), 0)
    assert p.discard() == len(b"250-INJECTED\r\n250 parti")
    assert p.next_reply() is None
    p.feed(b"250 real\r\n")
    assert p.next_reply() == (Reply(250, "real"), len(b"220 go ahead\r\n250-INJECTED\r\n250 parti"))
    assert p.received == len(b"220 go ahead\r\n250-INJECTED\r\n250 parti250 real\r\n")


def test_invalid_utf8_is_replaced_not_fatal():
    [(r, _)] = parse_all(b"250 caf\xe9\r\n")
    assert r.code == 250 and "caf" in r.text


texts = st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                         max_size=30), min_size=1, max_size=5).map("\n".join)


@given(st.lists(st.tuples(st.integers(200, 599), texts), min_size=1, max_size=6),
       st.data())
def test_encode_then_parse_round_trips_under_any_chunking(replies, data):
    wire = b"".join(encode_reply(c, t) for c, t in replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    got = parse_all(*chunks)
    assert [r for r, _ in got] == [Reply(c, t) for c, t in replies]
    starts = [s for _, s in got]
    assert starts[0] == 0 and starts == sorted(starts)


def test_encode_reply_shapes():
    assert encode_reply(250, "mx\nSIZE 1") == b"250-mx\r\n250 SIZE 1\r\n"
    assert encode_reply(Reply(354, "go")) == b"354 go\r\n"
    assert encode_reply(221) == b"221\r\n"
    with pytest.raises(ValueError):
        encode_reply(99, "x")
    with pytest.raises(ValueError):
        encode_reply(250, "a\rb")
