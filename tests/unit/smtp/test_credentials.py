"""AUTH credentials: what an operator configures.

Secrets must never show in a repr, a log line or an error text. (The TLS
policy table is tested in tests/unit/tls/test_policy.py.)
"""

import base64
import hashlib
import hmac

import pytest

from twisted_mailout.smtp.auth import (
    AuthError,
    Credentials,
    Secret,
    choose_mechanism,
    cram_md5_response,
    credentials_from_options,
    plain_response,
    xoauth2_response,
)
from twisted_mailout.daemon.config import Config, ConfigError

PASSWORD = "pa55-w0rd-XYZ"


def test_secret_and_credentials_never_show_the_password():
    c = Credentials("user@example.com", PASSWORD)
    for text in (repr(c), str(c), repr(c.password), str(c.password), f"{c.password}"):
        assert PASSWORD not in text
    assert c.password.reveal() == PASSWORD
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(c.password)


def test_plain_response_follows_rfc4616():
    c = Credentials("tim", "tanstaaftanstaaf")
    assert base64.b64decode(plain_response(c)) == b"\0tim\0tanstaaftanstaaf"


def test_cram_md5_response_matches_rfc2195_example():
    # RFC 2195 section 2: the example exchange.
    c = Credentials("tim", "tanstaaftanstaaf")
    challenge = base64.b64encode(b"<1896.697170952@postoffice.reston.mci.net>").decode()
    answer = base64.b64decode(cram_md5_response(c, challenge))
    assert answer == b"tim b913a602c7eda7a495b4e6e7334d3890"
    expected = hmac.new(b"tanstaaftanstaaf", b"<1896.697170952@postoffice.reston.mci.net>",
                        hashlib.md5).hexdigest()
    assert answer.endswith(expected.encode())
    with pytest.raises(AuthError, match="not base64"):
        cram_md5_response(c, "***")


def test_xoauth2_response_shape():
    raw = base64.b64decode(xoauth2_response("me@example.com", Secret("ya29.tok")))
    assert raw == b"user=me@example.com\x01auth=Bearer ya29.tok\x01\x01"


def test_mechanism_choice_prefers_challenge_response_without_tls():
    c = Credentials("u", "p")
    assert choose_mechanism(c, "LOGIN PLAIN CRAM-MD5", encrypted=True) == "PLAIN"
    assert choose_mechanism(c, "LOGIN PLAIN CRAM-MD5", encrypted=False) == "CRAM-MD5"
    assert choose_mechanism(c, "LOGIN", encrypted=True) == "LOGIN"
    assert choose_mechanism(c, "GSSAPI", encrypted=True) is None
    only = Credentials("u", "p", mechanisms=("login",))
    assert choose_mechanism(only, "PLAIN LOGIN", encrypted=True) == "LOGIN"


@pytest.mark.parametrize("kwargs, message", [
    ({"username": ""}, "user name"),
    ({"username": "u\r\nRSET"}, "user name"),
    ({"username": "u"}, "exactly one"),
    ({"username": "u", "password": ""}, "empty"),
    ({"username": "u", "password": "p", "mechanisms": ("XOAUTH2",)}, "cannot be used"),
    ({"username": "u", "password": "p", "mechanisms": ("NTLM",)}, "unknown"),
])
def test_bad_credentials_are_refused_clearly(kwargs, message):
    with pytest.raises(AuthError, match=message):
        Credentials(**kwargs)


def test_credentials_from_a_file_and_from_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "pw"
    f.write_text(PASSWORD + "\n")
    c = credentials_from_options("u", password_file=str(f))
    assert c.password.reveal() == PASSWORD
    monkeypatch.setenv("MAILOUT_PW", PASSWORD)
    assert credentials_from_options("u", password_env="MAILOUT_PW").password.reveal() == PASSWORD
    with pytest.raises(AuthError, match="unset or empty"):
        credentials_from_options("u", password_env="MAILOUT_NOT_SET_ANYWHERE")
    with pytest.raises(AuthError, match="cannot read"):
        credentials_from_options("u", password_file=str(tmp_path / "missing"))
    with pytest.raises(AuthError, match="no --auth-user"):
        credentials_from_options(None, password_file=str(f))
    with pytest.raises(AuthError, match="exactly one"):
        credentials_from_options("u", password_file=str(f), password_env="MAILOUT_PW")
    assert credentials_from_options(None) is None


def test_config_refuses_auth_without_a_relay_and_keeps_the_password_out_of_errors(tmp_path):
    f = tmp_path / "pw"
    f.write_text(PASSWORD)
    with pytest.raises(ConfigError, match="--relay") as e:
        Config(queue=str(tmp_path / "q"), auth_user="u", auth_password_file=str(f))
    assert PASSWORD not in str(e.value)
    cfg = Config(queue=str(tmp_path / "q"), relay="smtps://relay.example.net",
                 auth_user="u", auth_password_file=str(f))
    assert PASSWORD not in repr(cfg)
    assert cfg.credentials().password.reveal() == PASSWORD


def _result(d):
    """The result of an already-fired Deferred (a failure is raised)."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_token_file_is_read_without_the_global_reactor(tmp_path):
    from twisted.internet.task import Clock

    path = tmp_path / "token"
    path.write_text("ya29.token\n")
    creds = Credentials("user@example.com", token_file=str(path))
    token = _result(creds.token(Clock()))  # a clock has no thread pool: read directly
    assert token.reveal() == "ya29.token"
    assert "ya29" not in repr(token)


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("x" * (64 * 1024 + 1), "larger than 64 KiB"),
])
def test_bad_token_files_are_refused(tmp_path, content, message):
    from twisted.internet.task import Clock

    path = tmp_path / "token"
    path.write_text(content)
    creds = Credentials("user@example.com", token_file=str(path))
    with pytest.raises(AuthError, match=message):
        _result(creds.token(Clock()))
    with pytest.raises(AuthError, match="cannot read"):
        _result(Credentials("u@example.com", token_file=str(tmp_path / "missing"))
                .token(Clock()))
