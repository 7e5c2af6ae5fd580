"""The signer: signatures made here verify with dkimpy's verifier against the
published keys; key choice, over-signing, line ends, required signing."""

from __future__ import annotations

import re
import time

import dkim
import dkim.crypto
import pytest

from twisted_mailout.dkim import SigningError
from twisted_mailout.dkim import signer as signer_module
from twisted_mailout.dkim.keys import KeyTable
from twisted_mailout.dkim.signer import Signer, wire_form

MESSAGE = (
    b"From: Alice <alice@example.com>\n"
    b"To: bob@example.org\n"
    b"Subject: hello\n"
    b"Date: Mon, 02 Feb 2026 10:00:00 +0000\n"
    b"Message-ID: <1@example.com>\n"
    b"\n"
    b"Hello Bob.\n"
)


def only(table: KeyTable, *types: str) -> KeyTable:
    """The table restricted to keys of C{types}."""
    return KeyTable([k for k in table.keys if k.type in types], {}, table.path)


def signatures(fields: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field in C{fields}."""
    out = []
    for part in re.split(rb"(?=^DKIM-Signature:)", fields, flags=re.M):
        if part:
            value = part.split(b":", 1)[1].decode()
            tags = {}
            for item in value.split(";"):
                name, _, v = item.partition("=")
                tags[name.strip()] = re.sub(r"\s+", "", v)
            out.append(tags)
    return out


def verify_all(signed: bytes, dnsfunc: object, count: int) -> None:
    """Every one of C{count} signatures of C{signed} verifies."""
    d = dkim.DKIM(signed)
    for idx in range(count):
        assert d.verify(idx=idx, dnsfunc=dnsfunc), f"signature {idx} fails"


@pytest.mark.parametrize("key_type", ["rsa", "ed25519"])
def test_sign_then_verify(table: KeyTable, dnsfunc: object, key_type: str) -> None:
    fields = Signer(only(table, key_type)).sign(MESSAGE)
    sig, = signatures(fields)
    assert sig["a"] == {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}[key_type]
    assert sig["c"] == "relaxed/relaxed"
    assert sig["d"] == "example.com"
    assert fields.endswith(b"\r\n") and b"\n" not in fields.replace(b"\r\n", b"")
    signed = fields + wire_form(MESSAGE)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    tampered = signed.replace(b"Hello Bob.", b"Hello Eve.")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_dual_signing(table: KeyTable, dnsfunc: object) -> None:
    fields = Signer(table).sign(MESSAGE)
    sigs = signatures(fields)
    assert sorted(s["a"] for s in sigs) == ["ed25519-sha256", "rsa-sha256"]
    assert {s["s"] for s in sigs} == {"r1", "e1"}
    verify_all(fields + wire_form(MESSAGE), dnsfunc, 2)


def test_signed_headers_and_over_signed_from(table: KeyTable, dnsfunc: object) -> None:
    msg = (b"From: alice@example.com\nTo: b@example.org\nCc: c@example.org\n"
           b"Reply-To: r@example.com\nSubject: s\nDate: Mon, 02 Feb 2026 10:00:00 +0000\n"
           b"Message-ID: <2@example.com>\nMIME-Version: 1.0\n"
           b"Content-Type: text/plain; charset=utf-8\nList-Unsubscribe: <https://example.com/u>\n"
           b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\nX-Other: not signed\n\nbody\n")
    fields = Signer(only(table, "rsa")).sign(msg)
    sig, = signatures(fields)
    assert sig["h"].split(":") == [
        "from", "from", "to", "cc", "subject", "date", "message-id", "mime-version",
        "content-type", "reply-to", "list-unsubscribe", "list-unsubscribe-post"]
    signed = fields + wire_form(msg)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    # a second From added on the way breaks the signature (over-signing)
    added = signed.replace(b"To: b@", b"From: mallory@example.org\r\nTo: b@")
    assert not dkim.verify(added, dnsfunc=dnsfunc)
    # an unsigned field may be added
    assert dkim.verify(signed.replace(b"X-Other:", b"X-New: 1\r\nX-Other:"), dnsfunc=dnsfunc)
    # a field absent at signing is not in h=
    plain = Signer(only(table, "rsa")).sign(MESSAGE)
    assert "list-unsubscribe" not in signatures(plain)[0]["h"]


def test_lf_and_crlf_input_sign_the_wire_form(table: KeyTable, dnsfunc: object) -> None:
    signer = Signer(only(table, "ed25519"))  # deterministic signatures
    crlf = MESSAGE.replace(b"\n", b"\r\n")
    lf_fields, crlf_fields = signer.sign(MESSAGE), signer.sign(crlf)
    assert signatures(lf_fields)[0]["bh"] == signatures(crlf_fields)[0]["bh"]
    # the LF message, sent with CRLF line ends, verifies
    assert dkim.verify(lf_fields + wire_form(MESSAGE), dnsfunc=dnsfunc)
    # a message without a final line end: the session adds it, so do we
    assert dkim.verify(signer.sign(MESSAGE.rstrip(b"\n")) + wire_form(MESSAGE.rstrip(b"\n")),
                       dnsfunc=dnsfunc)
    assert wire_form(b"a\rb\nc") == b"a\r\nb\r\nc\r\n"


def test_8bit_long_lines_and_multipart(table: KeyTable, dnsfunc: object) -> None:
    long_line = ("x" * 990 + "\n") * 3
    msg = (
        "From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.com>\n"
        "To: b@example.org\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\nMIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="BOUND"\n\n'
        "--BOUND\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        "Grüße aus Köln, 東京 ✓\n" + long_line +
        "--BOUND\nContent-Type: text/html; charset=utf-8\n\n<p>Grüße   \t</p>\n\n\n"
        "--BOUND--\n"
    ).encode("utf-8")
    fields = Signer(table).sign(msg)
    verify_all(fields + wire_form(msg), dnsfunc, 2)
    changed = (fields + wire_form(msg)).replace("Köln".encode(), b"Koln")
    assert not dkim.verify(changed, dnsfunc=dnsfunc)


def test_no_key_not_required_gives_nothing(table: KeyTable) -> None:
    other = MESSAGE.replace(b"alice@example.com", b"alice@elsewhere.org")
    assert Signer(table).sign(other) == b""
    with pytest.raises(SigningError, match="no key for the From domain elsewhere.org"):
        Signer(table, required=True).sign(other)


@pytest.mark.parametrize("header, why", [
    (b"", "no From header field"),
    (b"From: a@example.com\nFrom: b@example.com\n", "2 From header fields"),
    (b"From: a@example.com, b@example.net\n", "2 domains"),
    (b"From: undisclosed\n", "cannot be DKIM signed"),
])
def test_malformed_from(table: KeyTable, header: bytes, why: str) -> None:
    msg = header + b"To: b@example.org\nSubject: s\n\nbody\n"
    with pytest.raises(SigningError, match=why):
        Signer(table, required=True).sign(msg)
    assert Signer(table).sign(msg) == b""


def test_bounce_signed_for_reporting_domain(table: KeyTable, dnsfunc: object) -> None:
    dsn = (b"From: Mail Delivery System <MAILER-DAEMON@example.net>\nTo: a@example.org\n"
           b"Subject: Undelivered Mail\n\nsorry\n")
    fields = Signer(table).sign(dsn, sender="")
    assert {s["d"] for s in signatures(fields)} == {"example.net"}
    assert dkim.verify(fields + wire_form(dsn), dnsfunc=dnsfunc)


def test_signing_map_precedence(table: KeyTable, dnsfunc: object) -> None:
    t = KeyTable(table.keys, {
        "bulk@example.org": "example.net",    # envelope sender address
        "@example.org": "example.com",        # envelope sender domain
        "news@example.com": "example.net",    # From address
    }, table.path)
    signer = Signer(t)

    def domains(msg: bytes, sender: str | None) -> set[str]:
        return {s["d"] for s in signatures(signer.sign(msg, sender))}

    assert domains(MESSAGE, "bulk@example.org") == {"example.net"}
    assert domains(MESSAGE, "BULK@Example.ORG") == {"example.net"}
    assert domains(MESSAGE, "other@example.org") == {"example.com"}
    news = MESSAGE.replace(b"alice@example.com", b"news@example.com")
    assert domains(news, None) == {"example.net"}
    assert domains(news, "other@example.org") == {"example.com"}  # envelope first
    assert domains(MESSAGE, "x@unmapped.test") == {"example.com"}  # From domain's keys
    t2 = KeyTable(table.keys, {"@example.com": "example.net"}, table.path)
    assert {s["d"] for s in signatures(Signer(t2).sign(MESSAGE))} == {"example.net"}
    mapped = signer.sign(MESSAGE, "bulk@example.org")
    assert dkim.verify(mapped + wire_form(MESSAGE), dnsfunc=dnsfunc)


def test_envelope_map_with_malformed_from_is_an_error(table: KeyTable) -> None:
    t = KeyTable(table.keys, {"bulk@example.org": "example.net"}, table.path)
    with pytest.raises(SigningError, match="no From"):
        Signer(t).sign(b"To: x@example.org\n\nbody\n", "bulk@example.org")


# -- RSA through OpenSSL (signer._FastDKIM) ----------------------------------


def test_fast_rsa_is_active_for_this_dkimpy() -> None:
    # A dkimpy that no longer looks these names up would silently fall back
    # to its pure-Python RSA (about 12 times slower): say so here.
    assert signer_module.FAST_RSA


def test_openssl_rsa_gives_dkimpys_bytes(table: KeyTable, dnsfunc: object,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # the same t= for both
    msg = MESSAGE.replace(b"\n", b"\r\n")
    rsa_key, = [k for k in table.keys if k.type == "rsa" and k.domain == "example.com"]
    ours = Signer(only(table, "rsa")).sign(msg)
    theirs = dkim.sign(msg, rsa_key.selector.encode(), rsa_key.domain.encode(), rsa_key.private,
                       canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=b"rsa-sha256",
                       include_headers=Signer._header_list(msg), linesep=b"\r\n")
    assert ours == theirs  # PKCS#1 v1.5 is deterministic: the same signature, bit for bit
    assert dkim.verify(ours + msg, dnsfunc=dnsfunc)


def test_openssl_rsa_does_not_use_or_change_dkimpys_rsa(
        table: KeyTable, dnsfunc: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def pure_python(*args: object) -> bytes:
        raise AssertionError("dkimpy's pure-Python RSA was called")

    monkeypatch.setattr(dkim.crypto, "RSASSA_PKCS1_v1_5_sign", pure_python)
    monkeypatch.setattr(dkim.crypto, "parse_pem_private_key", pure_python)
    fields = Signer(only(table, "rsa")).sign(MESSAGE)
    monkeypatch.undo()
    assert dkim.verify(fields + wire_form(MESSAGE), dnsfunc=dnsfunc)
    # dkimpy's own names are untouched for its other users
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim.crypto.RSASSA_PKCS1_v1_5_sign
    assert dkim.DKIM.gen_header is not signer_module._FastDKIM.gen_header
    assert dkim.DKIM.gen_header.__globals__ is vars(dkim)


def test_the_fast_path_falls_back_for_pem_text(table: KeyTable, dnsfunc: object) -> None:
    # _FastDKIM given PEM text (not a loaded key) signs with dkimpy's own RSA
    key, = [k for k in table.keys if k.type == "rsa" and k.domain == "example.com"]
    d = signer_module._FastDKIM(wire_form(MESSAGE), signature_algorithm=b"rsa-sha256")
    field = d.sign(key.selector.encode(), key.domain.encode(), key.private,
                   canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from"])
    assert dkim.verify(field + wire_form(MESSAGE), dnsfunc=dnsfunc)


def test_the_from_field_is_parsed_once_per_distinct_field(table: KeyTable,
                                                          dnsfunc: object) -> None:
    signer = Signer(only(table, "ed25519"))
    signer_module._authors.cache_clear()
    for i in range(3):
        signer.sign(MESSAGE.replace(b"hello", f"hello {i}".encode()))
    assert signer_module._authors.cache_info().hits == 2
    # a folded From field is read whole (its continuation line too)
    folded = MESSAGE.replace(b"From: Alice <alice@example.com>\n",
                             b"From: Alice\n <alice@example.net>\n")
    fields = Signer(table).sign(folded)
    assert {s["d"] for s in signatures(fields)} == {"example.net"}
    assert dkim.verify(fields + wire_form(folded), dnsfunc=dnsfunc)
    # failures are not remembered as answers
    bad = MESSAGE.replace(b"From: Alice <alice@example.com>", b"From: a@x.org<b@y.org>")
    for _ in range(2):
        with pytest.raises(SigningError, match="cannot be DKIM signed"):
            Signer(table, required=True).sign(bad)
