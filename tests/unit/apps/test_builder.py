"""build_message: structures and encodings checked by parsing the bytes back
with the standard library, as a receiving client would."""

from __future__ import annotations

import email
import email.policy
import email.utils
from datetime import UTC, datetime

import pytest

from twisted_mailout import AddressError, MessageError
from twisted_mailout.apps.builder import Attachment, build_message, format_address

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def content(part) -> str:
    return part.get_content().replace("\r\n", "\n")


def roundtrip(msg):
    data = msg.as_bytes()
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF line ends only
    return data, email.message_from_bytes(data, policy=email.policy.default)


def test_plain_text():
    data, m = roundtrip(build_message(sender="a@origin.test", to="b@dest.test",
                                      subject="Hello", text="Hi there\n"))
    assert m.get_content_type() == "text/plain"
    assert content(m) == "Hi there\n"
    assert m["Subject"] == "Hello" and m["To"] == "b@dest.test"
    assert email.utils.parsedate_to_datetime(m["Date"]) is not None
    assert m["Message-ID"].endswith("@origin.test>")
    assert data.isascii()


def test_html_with_text_alternative_and_attachments(tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.4 fake")
    _, m = roundtrip(build_message(
        sender="a@origin.test", to=["b@dest.test"], subject="s", text="plain", html="<p>h</p>",
        attachments=[path, ("data.csv", b"a,b\n1,2\n"), ("blob", b"\x00\x01", "image/png"),
                     Attachment("x.unknownext", b"zz")]))
    assert m.get_content_type() == "multipart/mixed"
    alt = m.get_payload()[0]
    assert alt.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in alt.get_payload()] == ["text/plain", "text/html"]
    assert content(m.get_body(("plain",))) == "plain\n"
    assert content(m.get_body(("html",))) == "<p>h</p>\n"
    atts = [(a.get_filename(), a.get_content_type(), a.get_payload(decode=True))
            for a in m.iter_attachments()]
    assert atts == [("report.pdf", "application/pdf", b"%PDF-1.4 fake"),
                    ("data.csv", "text/csv", b"a,b\n1,2\n"),
                    ("blob", "image/png", b"\x00\x01"),
                    ("x.unknownext", "application/octet-stream", b"zz")]


def test_inline_image_by_content_id_is_multipart_related(tmp_path):
    logo = tmp_path / "logo.png"
    logo.write_bytes(PNG)
    _, m = roundtrip(build_message(
        sender="a@origin.test", to="b@dest.test", text="see logo",
        html='<img src="cid:logo@origin.test"><img src="cid:dot">',
        inline=[("logo@origin.test", logo), ("dot", b"GIF89a", "image/gif")]))
    alt = m
    assert alt.get_content_type() == "multipart/alternative"
    related = alt.get_payload()[1]
    assert related.get_content_type() == "multipart/related"
    html, img, gif = related.get_payload()
    assert html.get_content_type() == "text/html"
    assert img["Content-ID"] == "<logo@origin.test>" and img.get_payload(decode=True) == PNG
    assert img.get_content_type() == "image/png"
    assert gif["Content-ID"] == "<dot>" and gif.get_content_type() == "image/gif"
    assert m.get_body(("html",)) is html


def test_html_only_with_inline_image():
    _, m = roundtrip(build_message(sender="a@origin.test", to="b@dest.test",
                                   html='<img src="cid:i1">', inline=[("i1", PNG, "image/png")]))
    assert m.get_content_type() == "multipart/related"
    assert m.get_body(("html", "plain")).get_content_type() == "text/html"


def test_non_ascii_names_subject_and_internationalised_domains():
    data, m = roundtrip(build_message(
        sender=("Zoë Ångström", "zoe@bücher.example"), to="Jörg <j@münchen.example>",
        cc=["c@dest.test"], bcc="hidden@dest.test", reply_to="Ré <reply@dest.test>",
        subject="Grüße – naïve ☃", text="Ünïcode body ☃"))
    assert data.isascii()  # RFC 2047 words, A-labels, a transfer encoding
    assert m["Subject"] == "Grüße – naïve ☃"
    frm = m["From"].addresses[0]
    assert (frm.display_name, frm.addr_spec) == ("Zoë Ångström", "zoe@xn--bcher-kva.example")
    assert m["To"].addresses[0].addr_spec == "j@xn--mnchen-3ya.example"
    assert m["Reply-To"].addresses[0].display_name == "Ré"
    assert m["Bcc"] == "hidden@dest.test" and m["Cc"] == "c@dest.test"
    assert content(m) == "Ünïcode body ☃\n"
    assert m["Message-ID"].endswith("@xn--bcher-kva.example>")


def test_smtputf8_keeps_unicode_and_allows_unicode_local_parts():
    data = build_message(sender="zoë@bücher.example", to="b@dest.test", text="x",
                         smtputf8=True).as_bytes()
    assert "From: zoë@bücher.example".encode() in data
    with pytest.raises(AddressError, match="SMTPUTF8"):
        build_message(sender="zoë@bücher.example", to="b@dest.test", text="x")


def test_custom_headers_message_id_and_date():
    when = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    _, m = roundtrip(build_message(sender="a@origin.test", to="b@dest.test", text="x",
                                   headers=[("X-Campaign", "42"), ("List-Id", "<l.origin.test>")],
                                   message_id="<fixed@origin.test>", date=when))
    assert m["X-Campaign"] == "42" and m["List-Id"] == "<l.origin.test>"
    assert m["Message-ID"] == "<fixed@origin.test>"
    assert m["Date"] == "Mon, 23 Nov 2026 10:00:00 +0000"
    _, m = roundtrip(build_message(sender="a@origin.test", to="b@dest.test", text="x",
                                   message_id=False, date=False))
    assert "Message-ID" not in m and "Date" not in m
    assert format_address(("Ann", "ann@bücher.example")) == "Ann <ann@xn--bcher-kva.example>"


@pytest.mark.parametrize("kwargs,exc,words", [
    ({}, MessageError, "text=, html="),
    ({"text": "x", "inline": [("i", b"x", "image/png")]}, MessageError, "give html="),
    ({"html": "x", "inline": [Attachment("a.png", b"x")]}, MessageError, "no Content-ID"),
    ({"text": "x", "attachments": [("a", "not bytes")]}, MessageError, "an attachment"),
    ({"text": "x", "attachments": [("a", b"x", "nonsense")]}, MessageError, "content type"),
    ({"text": "x", "to": "not an address"}, AddressError, "not an address"),
    ({"text": "x", "to": "a@b.test, c@d.test"}, AddressError, "not one address"),
    ({"text": "x", "to": "a@b.test\r\nBcc: x@y.test"}, AddressError, "CR or LF"),
    ({"text": "x", "subject": "hi\r\nBcc: x@y.test"}, ValueError, "linefeed"),
    ({"text": "x", "headers": {"X-A": "v\nBcc: x@y.test"}}, ValueError, "linefeed"),
    ({"text": "x", "headers": {"Bad:Name": "v"}}, ValueError, "field name"),
])
def test_bad_input_is_refused(kwargs, exc, words):
    kwargs = {"sender": "a@origin.test", "to": "b@dest.test", **kwargs}
    with pytest.raises(exc, match=words):
        build_message(**kwargs)


def test_missing_attachment_path(tmp_path):
    with pytest.raises(OSError):
        build_message(sender="a@origin.test", to="b@dest.test", text="x",
                      attachments=[tmp_path / "nope.pdf"])


def test_one_click_unsubscribe_fields_rfc_8058():
    url = "https://example.com/unsub?u=" + "a" * 80
    msg = build_message(sender="news@example.com", to="b@example.org", text="hi",
                        unsubscribe_url=url, unsubscribe_mailto="unsub@example.com")
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert parsed["List-Unsubscribe"] == f"<{url}>, <mailto:unsub@example.com>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert all(len(line) <= 998 for line in msg.as_bytes().split(b"\r\n"))

    only_mail = build_message(sender="a@example.com", to="b@example.org", text="hi",
                              unsubscribe_mailto="mailto:u@example.com?subject=stop")
    assert only_mail["List-Unsubscribe"] == "<mailto:u@example.com?subject=stop>"
    assert only_mail["List-Unsubscribe-Post"] is None  # one-click needs an HTTPS URI

    for bad in [dict(unsubscribe_url="http://example.com/u"),
                dict(unsubscribe_url="https://"),
                dict(unsubscribe_url="https://example.com/a b"),
                dict(unsubscribe_url="https://example.com/>\r\nBcc: x@evil.test"),
                dict(unsubscribe_mailto="nobody")]:
        with pytest.raises(MessageError):
            build_message(sender="a@example.com", to="b@example.org", text="hi", **bad)
