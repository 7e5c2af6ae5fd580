"""Property tests for the SMTP DATA encoder (DotStuffer / encode_data) and
the BDAT line-end normaliser (LineEnds / encode_bdat).

A message must never be able to end DATA early (SMTP smuggling,
CVE-2023-51764), whatever its bytes and whatever the chunking of the file it
is read from; and a receiver un-stuffing the wire bytes must get the message
back with normalised (CRLF) line ends.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted_mailout.smtp.dotstuff import DotStuffer, LineEnds, encode_bdat, encode_data
from twisted_mailout.smtp.protocol import CHUNK

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Pieces that matter for SMTP framing, mixed with arbitrary bytes.
_PIECES = st.sampled_from([
    b"\r", b"\n", b".", b"..", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\0",
    b"a", b"Subject: x", b" ", b"\xff",
])
MESSAGES = st.one_of(
    st.binary(max_size=300),
    st.lists(_PIECES, max_size=60).map(b"".join),
    st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=40).map(b"".join),
)


def feed_chunks(chunks: list[bytes]) -> bytes:
    s = DotStuffer()
    return b"".join(s.feed(c) for c in chunks) + s.finish()


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({min(max(p, 0), len(data)) for p in points})
    out, prev = [], 0
    for c in cuts:
        out.append(data[prev:c])
        prev = c
    out.append(data[prev:])
    return out


@st.composite
def chunked_messages(draw):
    data = draw(MESSAGES)
    points = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return data, split_at(data, points)


def normalise(data: bytes) -> bytes:
    """The message as a receiver must see it: CRLF line ends, a final CRLF."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def unstuff(wire: bytes) -> bytes:
    """Decode a DATA payload the way an SMTP server does (RFC 5321 4.5.2)."""
    assert wire.endswith(b".\r\n"), wire[-20:]
    lines = wire.split(b"\r\n")
    assert lines[-1] == b"" and lines[-2] == b"."
    body = lines[:-2]
    out = []
    for ln in body:
        if ln.startswith(b"."):
            # A stuffed line: every line starting with a dot got one more.
            assert ln.startswith(b".."), ln
            ln = ln[1:]
        out.append(ln + b"\r\n")
    return b"".join(out)


def assert_wire_ok(wire: bytes):
    # As the server sees it right after "DATA\r\n": the end-of-data sequence
    # occurs exactly once, at the very end.
    stream = b"\r\n" + wire
    assert stream.count(b"\r\n.\r\n") == 1, wire
    assert stream.endswith(b"\r\n.\r\n"), wire
    # Every line end is CRLF: no bare CR, no bare LF.
    rest = wire.replace(b"\r\n", b"")
    assert b"\r" not in rest and b"\n" not in rest, wire


@SETTINGS
@given(chunked_messages())
def test_chunking_does_not_change_output(msg):
    data, chunks = msg
    assert b"".join(chunks) == data
    assert feed_chunks(chunks) == encode_data(data)


@SETTINGS
@given(chunked_messages())
def test_single_terminator_only_at_end(msg):
    _, chunks = msg
    assert_wire_ok(feed_chunks(chunks))


@SETTINGS
@given(chunked_messages())
def test_receiver_gets_normalised_message_back(msg):
    data, chunks = msg
    assert unstuff(feed_chunks(chunks)) == normalise(data)


@SETTINGS
@given(st.lists(_PIECES, max_size=40).map(b"".join))
def test_byte_by_byte_equals_one_go(data):
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert feed_chunks(chunks) == encode_data(data)


@SETTINGS
@given(MESSAGES)
def test_empty_chunks_are_harmless(data):
    s = DotStuffer()
    out = s.feed(b"")
    for i in range(len(data)):
        out += s.feed(data[i : i + 1]) + s.feed(b"")
    out += s.finish()
    assert out == encode_data(data)


# -- explicit examples -------------------------------------------------------


def test_empty_message():
    assert encode_data(b"") == b".\r\n"


def test_smuggling_sequences_are_neutralised():
    # CVE-2023-51764 style: bare-LF / bare-CR "end of data" attempts.
    for evil in [b"a\r\n.\r\nMAIL FROM:<x@y>\r\n", b"a\n.\nRCPT", b"a\r.\rX",
                 b"a\n.\r\nX", b"a\r\n.\nX", b".\r\n", b"."]:
        wire = encode_data(evil)
        assert_wire_ok(wire)
        assert unstuff(wire) == normalise(evil)
    assert encode_data(b"a\r\n.\r\nQUIT\r\n") == b"a\r\n..\r\nQUIT\r\n.\r\n"
    assert encode_data(b"a\n.\nb") == b"a\r\n..\r\nb\r\n.\r\n"


def test_examples():
    assert encode_data(b"hello") == b"hello\r\n.\r\n"
    assert encode_data(b"hello\r\n") == b"hello\r\n.\r\n"
    assert encode_data(b".hidden\r\n..two\r\n") == b"..hidden\r\n...two\r\n.\r\n"
    assert encode_data(b"a\rb\nc\r\n") == b"a\r\nb\r\nc\r\n.\r\n"
    assert encode_data(b"nul\0byte") == b"nul\0byte\r\n.\r\n"
    assert encode_data(b"\r") == b"\r\n.\r\n"
    assert encode_data(b"\r\r") == b"\r\n\r\n.\r\n"


def test_cr_then_lf_in_next_chunk_is_one_line_end():
    s = DotStuffer()
    out = s.feed(b"line one\r") + s.feed(b"\nline two\r\n") + s.finish()
    assert out == b"line one\r\nline two\r\n.\r\n"


def test_cr_at_chunk_end_then_dot_line():
    s = DotStuffer()
    out = s.feed(b"a\r") + s.feed(b"\n.b\r") + s.feed(b"\n") + s.finish()
    assert out == b"a\r\n..b\r\n.\r\n"
    # A bare CR at a chunk end followed by a dot is a line end too.
    s = DotStuffer()
    assert s.feed(b"a\r") + s.feed(b".b") + s.finish() == b"a\r\n..b\r\n.\r\n"


def test_dot_line_at_chunk_boundary():
    s = DotStuffer()
    out = s.feed(b"first\r\n") + s.feed(b".\r\n") + s.feed(b"after") + s.finish()
    assert out == b"first\r\n..\r\nafter\r\n.\r\n"
    s = DotStuffer()
    out = s.feed(b"first\n") + s.feed(b".") + s.feed(b"\n") + s.finish()
    assert out == b"first\r\n..\r\n.\r\n"
    # A dot that does not start a line is not stuffed, even at a boundary.
    s = DotStuffer()
    assert s.feed(b"ab") + s.feed(b".c") + s.finish() == b"ab.c\r\n.\r\n"


def _boundary_message(boundary: int, split_crlf: bool) -> bytes:
    """Lines of text where a CRLF ends exactly at C{boundary} (or straddles
    it when C{split_crlf}), followed by a line starting with a dot."""
    end = boundary + 1 if split_crlf else boundary
    head = b"x" * (end - 2) + b"\r\n"
    assert len(head) == end
    return head + b".\r\n" + b".dot line\r\n" + b"tail\r\n" + b"y" * 100


def _expected(message: bytes) -> bytes:
    lines = message.split(b"\r\n")
    last = lines.pop()
    out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    if last:
        out += (b"." + last if last.startswith(b".") else last) + b"\r\n"
    return out + b".\r\n"


def test_crlf_at_16k_and_64k_chunk_boundaries():
    for boundary in (16384, 65536):
        for split_crlf in (False, True):
            msg = _boundary_message(boundary, split_crlf)
            expected = _expected(msg)
            for size in (16384, CHUNK, 1, 4096, 16383, 65537):
                if size == 1 and boundary == 65536:
                    continue  # byte-by-byte covered by the properties
                chunks = [msg[i : i + size] for i in range(0, len(msg), size)]
                wire = feed_chunks(chunks)
                assert wire == expected, (boundary, split_crlf, size)
                assert_wire_ok(wire)


# -- BDAT (RFC 3030): line ends only ---------------------------------------


def feed_lineends(chunks: list[bytes]) -> bytes:
    s = LineEnds()
    return b"".join(s.feed(c) for c in chunks) + s.finish()


@SETTINGS
@given(chunked_messages())
def test_bdat_bytes_are_what_data_delivers(msg):
    # What a server keeps from BDAT chunks is what it keeps from DATA once
    # it un-stuffs: the same bytes, whatever the chunking of the file.
    data, chunks = msg
    assert feed_lineends(chunks) == encode_bdat(data) == normalise(data)
    assert encode_bdat(data) == unstuff(encode_data(data))


@SETTINGS
@given(MESSAGES)
def test_bdat_byte_by_byte_and_empty_chunks(data):
    s = LineEnds()
    out = s.feed(b"")
    for i in range(len(data)):
        out += s.feed(data[i : i + 1]) + s.feed(b"")
    assert out + s.finish() == encode_bdat(data)


def test_bdat_examples():
    assert encode_bdat(b"") == b""
    assert encode_bdat(b".\r\n") == b".\r\n"  # no stuffing
    assert encode_bdat(b"a\n.\nb") == b"a\r\n.\r\nb\r\n"
    assert encode_bdat(b"a\r\n.\r\nQUIT\r\n") == b"a\r\n.\r\nQUIT\r\n"
    assert encode_bdat(b"\r\r") == b"\r\n\r\n"
    assert encode_bdat(b"8-bit \xe9\0\xff") == b"8-bit \xe9\0\xff\r\n"


def test_bdat_crlf_input_is_not_copied():
    chunk = b"Subject: x\r\n\r\nbody\r\n" * 100
    assert LineEnds().feed(chunk) is chunk
