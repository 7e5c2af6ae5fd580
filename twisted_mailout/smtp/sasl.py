"""The SASL dialogues of SMTP AUTH (RFC 4954) as pure step objects.

Each mechanism gives the C{AUTH} command line (L{Mechanism.initial}) and then
answers each 334 challenge with one line (L{Mechanism.respond}); when it has
nothing more to say it returns L{None}, and the client cancels the exchange
with L{CANCEL} (RFC 4954 4). No I/O: the driver sends the lines and feeds the
challenges. Secrets stay inside the objects: no C{repr} or error text shows
them.

Mechanisms: C{PLAIN} (RFC 4616), C{LOGIN} (draft-murchison-sasl-login),
C{CRAM-MD5} (RFC 2195) and C{XOAUTH2} (Google's and Microsoft's SASL profile
of OAuth 2.0 bearer tokens).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Protocol

from twisted_mailout.errors import ProtocolError

__all__ = [
    "CANCEL",
    "CramMD5",
    "Login",
    "Mechanism",
    "Plain",
    "SASLError",
    "XOAuth2",
    "b64",
    "cram_md5_answer",
    "mechanism_for",
    "plain_response",
    "xoauth2_response",
]

#: The line that cancels an AUTH exchange (RFC 4954 4).
CANCEL = "*"


class SASLError(ProtocolError, ValueError):
    """A challenge we cannot answer (e.g. not base64); the exchange must be
    cancelled. Its text never holds a secret."""


class _Secret(Protocol):
    def reveal(self) -> str: ...


def b64(data: bytes) -> str:
    """Base64 without line breaks, as SASL in SMTP wants (RFC 4954 4)."""
    return base64.b64encode(data).decode("ascii")


def plain_response(username: str, password: _Secret) -> str:
    """The initial response of PLAIN (RFC 4616 2): authzid empty, authcid,
    password, separated by NUL, base64."""
    return b64(b"\0" + username.encode() + b"\0" + password.reveal().encode())


def cram_md5_answer(username: str, password: _Secret, challenge_b64: str) -> str:
    """The answer to a CRAM-MD5 challenge (RFC 2195 2): the user name, a
    space, and the hex HMAC-MD5 of the challenge keyed with the password,
    base64.

    @param challenge_b64: the 334 reply's text (base64).
    @raise SASLError: the challenge is not base64.
    """
    try:
        challenge = base64.b64decode(challenge_b64.strip(), validate=True)
    except ValueError:
        raise SASLError("the server's CRAM-MD5 challenge is not base64") from None
    digest = hmac.new(password.reveal().encode(), challenge, hashlib.md5).hexdigest()
    return b64(f"{username} {digest}".encode())


def xoauth2_response(username: str, token: _Secret) -> str:
    """The initial response of XOAUTH2: C{user=U^Aauth=Bearer T^A^A}, base64."""
    return b64(f"user={username}\x01auth=Bearer {token.reveal()}\x01\x01".encode())


class Mechanism:
    """One AUTH exchange.

    @ivar name: the mechanism name (C{"PLAIN"}...).
    """

    name = ""

    def __init__(self, username: str, secret: _Secret):
        """
        @param username: the SASL authentication identity.
        @param secret: an object whose C{reveal()} gives the password or
            token (L{twisted_mailout.smtp.auth.Secret}).
        """
        self.username = username
        self._secret = secret
        self._steps = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.username!r}>"

    def initial(self) -> str:
        """The AUTH command line, with an initial response when the
        mechanism has one (RFC 4954 4)."""
        return f"AUTH {self.name}"

    def respond(self, challenge: str) -> str | None:
        """The answer to a 334 challenge.

        @param challenge: the 334 reply's text (first line; base64 or empty).
        @return: the line to send, or L{None} when the mechanism has nothing
            more to say (the client then sends L{CANCEL}).
        @raise SASLError: a challenge that cannot be answered (the client
            then sends L{CANCEL}).
        """
        self._steps += 1
        return self._respond(self._steps, challenge)

    def _respond(self, step: int, challenge: str) -> str | None:
        return None


class Plain(Mechanism):
    """PLAIN (RFC 4616), with the initial response; a server that wants the
    response on its own line (a 334 to the command) gets it again."""

    name = "PLAIN"

    def initial(self) -> str:
        return f"AUTH PLAIN {plain_response(self.username, self._secret)}"

    def _respond(self, step: int, challenge: str) -> str | None:
        return plain_response(self.username, self._secret) if step == 1 else None


class Login(Mechanism):
    """LOGIN: the user name, then the password, each after a 334."""

    name = "LOGIN"

    def _respond(self, step: int, challenge: str) -> str | None:
        if step == 1:
            return b64(self.username.encode())
        if step == 2:
            return b64(self._secret.reveal().encode())
        return None


class CramMD5(Mechanism):
    """CRAM-MD5 (RFC 2195): one answer to the server's challenge."""

    name = "CRAM-MD5"

    def _respond(self, step: int, challenge: str) -> str | None:
        if step == 1:
            return cram_md5_answer(self.username, self._secret, challenge)
        return None


class XOAuth2(Mechanism):
    """XOAUTH2 with the bearer token as initial response; a 334 carries an
    error report (base64 JSON), answered with an empty line."""

    name = "XOAUTH2"

    def initial(self) -> str:
        return f"AUTH XOAUTH2 {xoauth2_response(self.username, self._secret)}"

    def _respond(self, step: int, challenge: str) -> str | None:
        return "" if step == 1 else None


_MECHANISMS: dict[str, type[Mechanism]] = {
    m.name: m for m in (Plain, Login, CramMD5, XOAuth2)
}


def mechanism_for(name: str, username: str, secret: _Secret) -> Mechanism:
    """The step object for mechanism C{name}.

    @param name: C{"PLAIN"}, C{"LOGIN"}, C{"CRAM-MD5"} or C{"XOAUTH2"}
        (any case).
    @param secret: the password, or for XOAUTH2 the token.
    @raise KeyError: an unknown mechanism.
    """
    return _MECHANISMS[name.upper()](username, secret)
