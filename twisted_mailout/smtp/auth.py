"""SMTP AUTH (RFC 4954) credentials and mechanisms, with secrets kept out of
every log line, exception text and C{repr}.

Credentials come from a file or an environment variable, never from the
command line (argv is world-readable in C{/proc}). An XOAUTH2 bearer token
is read again for each connection, from a file or from the output of a
command, because providers' tokens expire within the hour.

Mechanisms: C{PLAIN} (RFC 4616), C{LOGIN} (draft-murchison-sasl-login),
C{CRAM-MD5} (RFC 2195) and C{XOAUTH2} (Google's and Microsoft's SASL
profile of OAuth 2.0 bearer tokens).
"""

from __future__ import annotations

import hmac
import os
from typing import Any, NoReturn

from twisted.internet import defer, threads, utils
from twisted.internet.interfaces import IReactorThreads

from twisted_mailout.errors import ConfigError
from twisted_mailout.smtp import sasl

__all__ = [
    "MECHANISMS",
    "AuthError",
    "Credentials",
    "Secret",
    "choose_mechanism",
    "credentials_from_options",
]

#: Every mechanism we speak, strongest first for an unencrypted channel.
MECHANISMS = ("XOAUTH2", "CRAM-MD5", "PLAIN", "LOGIN")


class AuthError(ConfigError):
    """Credentials that cannot be used (bad file, empty secret, unknown
    mechanism). Its text never contains a secret."""


class Secret:
    """A password or token whose value never shows in C{str}, C{repr} or
    tracebacks' local-variable dumps of this object.

    @param value: the secret (C{str}).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str):
        if not isinstance(value, str):
            raise TypeError("a secret must be str")
        self._value = value

    def reveal(self) -> str:
        """The secret itself: only for building the AUTH exchange."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(
            self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)

    def __reduce__(self) -> NoReturn:
        """Refuse pickling: a pickle would hold the secret in clear.

        @raise TypeError: always.
        """
        raise TypeError("a Secret is not pickled")


class Credentials:
    """Who we are to a relay: a user name and a password, or a source of
    XOAUTH2 bearer tokens.

    @param username: the SASL authentication identity (C{str}).
    @param password: a L{Secret} (or C{str}, wrapped), or L{None} with
        C{token_file}/C{token_command}.
    @param token_file: a file holding the current OAuth 2.0 access token,
        read for each connection (XOAUTH2).
    @param token_command: a command (argv list) printing the current token
        on its standard output, run for each connection (XOAUTH2); run
        without a shell, off the reactor thread.
    @param mechanisms: mechanisms allowed, in our order of preference; by
        default every one the credentials can serve (see L{MECHANISMS}).
    @param allow_plaintext: send credentials over a connection that is not
        encrypted (off unless the operator says so explicitly).
    @raise AuthError: no user name, no secret, or an unknown mechanism.
    """

    def __init__(self, username: str, password: Secret | str | None = None, *,
                 token_file: str | None = None, token_command: list[str] | None = None,
                 mechanisms: tuple[str, ...] | None = None, allow_plaintext: bool = False):
        if not username or any(c in username for c in "\r\n\0"):
            raise AuthError("AUTH needs a user name without CR, LF or NUL")
        if isinstance(password, str):
            password = Secret(password)
        sources = [password is not None, token_file is not None, token_command is not None]
        if sum(sources) != 1:
            raise AuthError("AUTH needs exactly one of: a password, a token file, "
                            "a token command")
        if password is not None and not password.reveal():
            raise AuthError("the AUTH password is empty")
        self.username = username
        self.password = password
        self.token_file = token_file
        self.token_command = list(token_command) if token_command else None
        self.allow_plaintext = allow_plaintext
        usable = ("XOAUTH2",) if password is None else ("PLAIN", "LOGIN", "CRAM-MD5")
        if mechanisms is None:
            mechanisms = usable
        mechanisms = tuple(m.upper() for m in mechanisms)
        unknown = [m for m in mechanisms if m not in MECHANISMS]
        if unknown:
            raise AuthError(f"unknown AUTH mechanism(s) {unknown}; known: {list(MECHANISMS)}")
        wrong = [m for m in mechanisms if m not in usable]
        if wrong:
            kind = "a token" if password is None else "a password"
            raise AuthError(f"AUTH mechanism(s) {wrong} cannot be used with {kind}")
        if not mechanisms:
            raise AuthError("no AUTH mechanism allowed")
        self.mechanisms = mechanisms

    def __repr__(self) -> str:
        src = ("password" if self.password is not None
               else "token_file" if self.token_file else "token_command")
        return f"<Credentials {self.username!r} ({src}, {'/'.join(self.mechanisms)})>"

    def token(self, reactor: Any) -> defer.Deferred[Secret]:
        """The current XOAUTH2 token, as a Deferred firing with a L{Secret}.

        The token file (at most 64 KiB) is read in the reactor's thread pool
        when C{reactor} has one (C{IReactorThreads}), directly otherwise (a
        test clock); the token command runs as a child process through
        C{reactor} (never blocking it), with a 30-second limit.

        @param reactor: the reactor: C{IReactorTime}, and C{IReactorProcess}
            for a token command.
        @return: a Deferred firing with the token as a L{Secret}.
        @raise AuthError: (as the Deferred's failure) the file cannot be
            read, the command fails, or the token is empty.
        """
        if self.token_file is not None:
            if IReactorThreads.providedBy(reactor):
                d = threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                              _read_token_file, self.token_file)
            else:
                d = defer.maybeDeferred(_read_token_file, self.token_file)
            return d
        return defer.Deferred.fromCoroutine(self._run_token_command(reactor))

    async def _run_token_command(self, reactor: Any) -> Secret:
        cmd = self.token_command
        assert cmd is not None
        d = utils.getProcessOutputAndValue(cmd[0], cmd[1:], env=dict(os.environ),
                                           reactor=reactor)
        timer = reactor.callLater(30, d.cancel)
        try:
            out, _err, code = await d
        except defer.CancelledError:
            raise AuthError(f"the AUTH token command {cmd[0]} ran for more than 30 s") from None
        except Exception as e:  # noqa: BLE001 - e.g. the command does not exist
            raise AuthError(f"the AUTH token command {cmd[0]} could not run: "
                            f"{type(e).__name__}") from None
        finally:
            if timer.active():
                timer.cancel()
        if code != 0:
            raise AuthError(f"the AUTH token command {cmd[0]} exited with status {code}")
        value = out.decode("utf-8", "replace").strip()
        if not value:
            raise AuthError(f"the AUTH token command {cmd[0]} printed no token")
        return Secret(value)


_TOKEN_FILE_LIMIT = 64 * 1024


def _read_token_file(path: str) -> Secret:
    """Read an XOAUTH2 token file (blocking; run in a thread by L{Credentials.token}).

    @raise AuthError: unreadable, larger than 64 KiB, or empty.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read(_TOKEN_FILE_LIMIT + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"cannot read the AUTH token file {path}: "
                        f"{getattr(e, 'strerror', None) or e}") from None
    if len(value) > _TOKEN_FILE_LIMIT:
        raise AuthError(f"the AUTH token file {path} is larger than 64 KiB")
    value = value.strip()
    if not value:
        raise AuthError(f"the AUTH token file {path} is empty")
    return Secret(value)


def choose_mechanism(credentials: Credentials, offered: str, encrypted: bool) -> str | None:
    """The mechanism to use with a server.

    Over TLS our order is the credentials' own; without TLS (only when
    allowed) a challenge-response mechanism (CRAM-MD5) is preferred, since it
    never sends the password itself.

    @param offered: the AUTH line's argument from EHLO (C{"PLAIN LOGIN"}).
    @param encrypted: the channel is under TLS.
    @return: a mechanism name, or L{None} when none in common.
    """
    have = {m.upper() for m in offered.split()}
    order = list(credentials.mechanisms)
    if not encrypted and "CRAM-MD5" in order:
        order.remove("CRAM-MD5")
        order.insert(0, "CRAM-MD5")
    for m in order:
        if m in have:
            return m
    return None


# The SASL encodings live in smtp.sasl (pure step objects the session
# uses); these keep their documented names and signatures.
b64 = sasl.b64
xoauth2_response = sasl.xoauth2_response


def plain_response(credentials: Credentials) -> str:
    """The initial response of PLAIN (RFC 4616 2): authzid empty, authcid,
    password, separated by NUL, base64."""
    assert credentials.password is not None
    return sasl.plain_response(credentials.username, credentials.password)


def cram_md5_response(credentials: Credentials, challenge_b64: str) -> str:
    """The answer to a CRAM-MD5 challenge (RFC 2195 2): the user name, a
    space, and the hex HMAC-MD5 of the challenge keyed with the password.

    @raise AuthError: the challenge is not base64.
    """
    assert credentials.password is not None
    try:
        return sasl.cram_md5_answer(credentials.username, credentials.password, challenge_b64)
    except sasl.SASLError as e:
        raise AuthError(str(e)) from None


def credentials_from_options(username: str | None, password_file: str | None = None,
                             password_env: str | None = None, token_file: str | None = None,
                             token_command: str | None = None, mechanisms: str | None = None,
                             allow_plaintext: bool = False) -> Credentials | None:
    """Build L{Credentials} from the daemon's options.

    @param username: C{--auth-user}; L{None} means no AUTH (then every
        other option must be unset).
    @param password_file: a file whose first line is the password
        (trailing newline removed); it should be mode 0600.
    @param password_env: the name of an environment variable holding it.
    @param token_file: see L{Credentials}.
    @param token_command: a command line, split with L{shlex.split}.
    @param mechanisms: comma- or space-separated mechanism names.
    @param allow_plaintext: C{--auth-plaintext}.
    @return: L{Credentials} or L{None}.
    @raise AuthError: incomplete or contradictory options, an unreadable or
        empty password file, an unset variable.
    """
    import shlex

    given = [x is not None for x in (password_file, password_env, token_file, token_command)]
    if username is None:
        if any(given):
            raise AuthError("an AUTH password or token is given but no --auth-user")
        return None
    if sum(given) != 1:
        raise AuthError("--auth-user needs exactly one of --auth-password-file, "
                        "--auth-password-env, --auth-token-file, --auth-token-command")
    password = None
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise AuthError(f"cannot read the AUTH password file {password_file}: "
                            f"{e.strerror}") from None
        if not password:
            raise AuthError(f"the AUTH password file {password_file} is empty")
    elif password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise AuthError(f"the environment variable {password_env} (AUTH password) "
                            "is unset or empty")
    command = shlex.split(token_command) if token_command is not None else None
    if command is not None and not command:
        raise AuthError("--auth-token-command is empty")
    mechs = tuple(m for m in (mechanisms or "").replace(",", " ").split()) or None
    return Credentials(username, Secret(password) if password is not None else None,
                       token_file=token_file, token_command=command, mechanisms=mechs,
                       allow_plaintext=allow_plaintext)
