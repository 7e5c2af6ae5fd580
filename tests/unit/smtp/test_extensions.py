"""parse_ehlo and the extension helpers (RFC 5321 4.1.1.1; 1870, 2920, 6152, 6531, 4954)."""

from __future__ import annotations

from twisted_mailout.smtp.extensions import (
    auth_mechanisms,
    mail_parameters,
    max_size,
    parse_ehlo,
    supports_8bitmime,
    supports_pipelining,
    supports_smtputf8,
    supports_starttls,
)


def test_parse_ehlo_skips_greeting_upper_cases_keywords():
    ext = parse_ehlo("mx.example greets you\nSIZE 35882577\n8bitmime\nPIPELINING\n"
                     "ENHANCEDSTATUSCODES\n  auth PLAIN login  \n")
    assert ext == {"SIZE": "35882577", "8BITMIME": "", "PIPELINING": "",
                   "ENHANCEDSTATUSCODES": "", "AUTH": "PLAIN login"}
    assert parse_ehlo("mx.example") == {}
    assert parse_ehlo("") == {}


def test_old_style_auth_fills_auth_only_when_missing():
    assert parse_ehlo("mx\nAUTH=PLAIN LOGIN")["AUTH"] == "PLAIN LOGIN"
    assert parse_ehlo("mx\nAUTH CRAM-MD5\nAUTH=PLAIN")["AUTH"] == "CRAM-MD5"
    assert auth_mechanisms(parse_ehlo("mx\nAUTH=login plain")) == ("LOGIN", "PLAIN")
    assert auth_mechanisms({}) == ()


def test_supports():
    ext = parse_ehlo("mx\nPIPELINING\n8BITMIME\nSMTPUTF8\nSTARTTLS")
    assert supports_pipelining(ext) and supports_8bitmime(ext)
    assert supports_smtputf8(ext) and supports_starttls(ext)
    assert not (supports_pipelining({}) or supports_8bitmime({}) or supports_smtputf8({})
                or supports_starttls({}))


def test_max_size():
    assert max_size({}) is None
    assert max_size({"SIZE": ""}) == 0
    assert max_size({"SIZE": "1000"}) == 1000
    assert max_size({"SIZE": "lots"}) == 0


def test_mail_parameters_only_what_is_offered():
    assert mail_parameters({}, size=10, eightbit=True) == ""
    assert mail_parameters({"SIZE": ""}, size=10) == " SIZE=10"
    assert mail_parameters({"SIZE": ""}, size=None) == ""
    assert mail_parameters({"8BITMIME": ""}, eightbit=True) == " BODY=8BITMIME"
    assert mail_parameters({"8BITMIME": "", "SMTPUTF8": ""}, smtputf8=True) == \
        " BODY=8BITMIME SMTPUTF8"
    assert mail_parameters({"SMTPUTF8": "", "SIZE": "9"}, size=5, smtputf8=True) == \
        " SIZE=5 SMTPUTF8"
