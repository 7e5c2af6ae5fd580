"""The SASL step objects: the lines each mechanism sends (RFC 4616, 2195, 4954)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from twisted_mailout.smtp.auth import Secret
from twisted_mailout.smtp.sasl import (
    CANCEL,
    CramMD5,
    Login,
    Plain,
    SASLError,
    XOAuth2,
    mechanism_for,
)

PW = Secret("s3cret")


def b64d(s: str) -> bytes:
    return base64.b64decode(s)


def test_plain_initial_response_and_own_line_retry():
    m = Plain("user", PW)
    line = m.initial()
    assert line.startswith("AUTH PLAIN ")
    assert b64d(line.split()[2]) == b"\0user\0s3cret"
    assert b64d(m.respond("")) == b"\0user\0s3cret"  # a server wanting it on its own line
    assert m.respond("") is None  # still asking: nothing more to say


def test_login_user_then_password():
    m = Login("user", PW)
    assert m.initial() == "AUTH LOGIN"
    assert b64d(m.respond("VXNlcm5hbWU6")) == b"user"
    assert b64d(m.respond("UGFzc3dvcmQ6")) == b"s3cret"
    assert m.respond("") is None


def test_cram_md5_answers_the_challenge():
    m = CramMD5("user", PW)
    assert m.initial() == "AUTH CRAM-MD5"
    challenge = b"<1896.697170952@postoffice.example.net>"
    answer = b64d(m.respond(base64.b64encode(challenge).decode()))
    digest = hmac.new(b"s3cret", challenge, hashlib.md5).hexdigest()
    assert answer == f"user {digest}".encode()
    assert m.respond("") is None
    with pytest.raises(SASLError, match="not base64"):
        CramMD5("user", PW).respond("not base64!")


def test_xoauth2_token_then_empty_line_for_error_report():
    m = XOAuth2("user@example.org", Secret("tok"))
    line = m.initial()
    assert b64d(line.split()[2]) == b"user=user@example.org\x01auth=Bearer tok\x01\x01"
    assert m.respond("eyJzdGF0dXMiOiI0MDEifQ==") == ""
    assert m.respond("") is None


def test_mechanism_for_and_no_secret_in_repr():
    assert isinstance(mechanism_for("cram-md5", "u", PW), CramMD5)
    with pytest.raises(KeyError):
        mechanism_for("GSSAPI", "u", PW)
    for cls in (Plain, Login, CramMD5, XOAuth2):
        assert "s3cret" not in repr(cls("u", PW))
    assert CANCEL == "*"
