"""C{imap://} and C{imaps://}: put each message into a folder of an IMAP
mailbox with C{APPEND} (RFC 3501 6.3.11), through Twisted's own
C{twisted.mail.imap4} client. The transport of marrow.mailer's
C{IMAPTransport}, asynchronous like L{SMTPDelivery}.

URL::

    imap://USER:PASSWORD@HOST[:PORT]/FOLDER?flags=\\Seen&tls=verify&cafile=...
    imaps://USER:PASSWORD@HOST[:PORT]/FOLDER

  - the port is 143 for C{imap://} and 993 for C{imaps://} (RFC 8314);
  - C{FOLDER} is the rest of the path, percent-decoded, with the server's
    hierarchy separator (C{/Archive/2026} or C{/Archive.2026}); C{INBOX}
    when there is none; non-ASCII names are sent in modified UTF-7
    (RFC 3501 5.1.3);
  - C{USER} and C{PASSWORD} are percent-decoded; without a user nothing is
    sent to log in (a server that greets with C{PREAUTH});
  - C{flags}: the flags the message gets, separated by spaces or commas,
    the parameter may be repeated: system flags C{\\Seen}, C{\\Answered},
    C{\\Flagged}, C{\\Deleted}, C{\\Draft} (any case) and keywords such as
    C{$Forwarded} (RFC 3501 2.3.2); in a URL the backslash may be written
    as it is or as C{%5C}: C{?flags=%5CSeen+%5CFlagged};
  - C{tls}: C{verify} by default: C{imap://} requires STARTTLS (RFC 2595)
    and both verify the server's certificate: a chain to C{cafile} (PEM,
    the platform's store when not given) and the host's name in it.
    C{secure} is the same here. C{encrypt}: TLS required, the certificate
    not checked. C{may} (C{imap://} only): STARTTLS when offered, not
    checked. C{none} (C{imap://} only): no TLS, even when offered;
  - C{timeout}: seconds, the cap on connecting and on each wait for the
    server (default 60);
  - C{create}: C{yes} creates a missing folder (C{CREATE}) and appends
    again; by default a missing folder is an error, as in marrow.mailer,
    whose APPEND failure is its C{MessageFailedException}.

What L{IMAPDelivery.send} gives: a C{Deferred} firing with a
L{DeliveryReport}, one result per envelope recipient, all the same:
delivered (C{250 2.0.0 appended to FOLDER at HOST:PORT}, with C{UIDVALIDITY}
and C{UID} when the server reports them, RFC 4315), or deferred or bounced
with the reply of the table below. Like L{SMTPDelivery}'s (and as the
design's outcome contract says), a failure is a result, not an exception:
the L{Mailer}'s events, a message's C{retries} and the managers read it.
The envelope is validated and then not used: the one copy goes into the
folder. The message is stored as
given, with CRLF line ends (bare LF become CRLF, RFC 3501 requires them);
its internal date is its C{Date} field (the time of arrival when that is
missing or unparseable).

The failures (C{status} as RFC 3463 suggests; C{local} and no C{relay}
when the server said nothing, else the server's words in the text; the
password is never in a result, C{repr}, C{url()} or a log):

| what | reply | status |
| --- | --- | --- |
| connection refused, timeout, DNS | 451 4.4.1 / 4.4.3 | deferred |
| TLS: STARTTLS not offered, handshake failed | 454 4.7.0 | deferred |
| TLS: certificate not verified | 454 4.7.5 | deferred |
| greeting C{BYE}, connection lost | 421 4.3.2 / 451 4.4.2 | deferred |
| authentication refused (C{NO}, C{BAD}) | 454 4.7.8 | deferred |
| C{NO [TRYCREATE]} without C{create=yes} | 550 5.1.1 | bounced |
| C{NO [OVERQUOTA]} | 452 4.2.2 | deferred |
| C{NO [TOOBIG]} / C{[LIMIT]} | 552 5.3.4 | bounced |
| C{NO [NOPERM]} | 550 5.7.1 | bounced |
| C{NO [CANNOT]} / C{[PARSE]} | 554 5.6.0 | bounced |
| C{NO} with any other or no response code | 451 4.3.0 | deferred |
| C{BAD} to APPEND or CREATE | 554 5.5.2 | bounced |

A connection lost after the message was sent but before the server's
answer is deferred: the message may be in the folder, and sending again may
store it twice (an IMAP APPEND has no transaction to roll back).
"""

from __future__ import annotations

import datetime
import email.utils
import imaplib
import io
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from OpenSSL import SSL
from twisted.internet import defer, endpoints, error, protocol
from twisted.mail import imap4
from twisted.python.failure import Failure

from twisted_mailout.api import DeliveryReport, RecipientResult, blocking_call, default_reactor
from twisted_mailout.apps.base import Delivery, MessageInput, Recipients, prepare
from twisted_mailout.envelope import AddressError, Reply
from twisted_mailout.message import MessageError, header_values
from twisted_mailout.tls.creators import load_trust_root, name_checking_tls, opportunistic_tls
from twisted_mailout.tls.errors import CertificateVerifyError, TLSError

__all__ = ["IMAPDelivery", "SYSTEM_FLAGS", "TLS_CHOICES", "parse_flags"]

#: The TLS levels C{imap://} takes (C{imaps://} takes the last three).
TLS_CHOICES = ("none", "may", "encrypt", "verify", "secure")

#: The levels that require TLS; the last two verify the certificate.
_REQUIRED = ("encrypt", "verify", "secure")
_VERIFYING = ("verify", "secure")

#: The system flags a client may set (RFC 3501 2.3.2; C{\\Recent} is the server's).
SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")

#: atom-specials of RFC 3501 9 (with the controls and the space): not in a keyword.
_ATOM_SPECIALS = re.compile(r'[(){ %*"\\\]\x00-\x1f\x7f]')

#: RFC 5530 response codes of a tagged NO to APPEND: (code, text, status).
_APPEND_CODES = {
    "OVERQUOTA": (452, "4.2.2", "deferred"),
    "TOOBIG": (552, "5.3.4", "bounced"),
    "LIMIT": (552, "5.3.4", "bounced"),
    "NOPERM": (550, "5.7.1", "bounced"),
    "CANNOT": (554, "5.6.0", "bounced"),
    "PARSE": (554, "5.6.0", "bounced"),
}

_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.I)
_CODE = re.compile(r"^\[([A-Za-z-]+)")


def parse_flags(values: str | Iterable[str]) -> tuple[str, ...]:
    """The flags of C{flags=}: system flags in their canonical case, keywords as given.

    @param values: one C{str} or several; each is split on spaces and commas.
    @return: the flags, duplicates removed, in order (C{tuple[str, ...]}).
    @raise ValueError: an unknown system flag (C{\\Recent} included) or a
        keyword with a character an IMAP atom cannot hold (RFC 3501 9), or a
        non-ASCII one.
    """
    if isinstance(values, str):
        values = [values]
    canonical = {f.lower(): f for f in SYSTEM_FLAGS}
    out: list[str] = []
    for value in values:
        for flag in re.split(r"[\s,]+", value.strip()):
            if not flag:
                continue
            if flag.startswith("\\"):
                if flag.lower() not in canonical:
                    raise ValueError(f"unknown IMAP system flag {flag!r}; one of "
                                     f"{', '.join(SYSTEM_FLAGS)} (or a keyword without \\)")
                name = canonical[flag.lower()]
            elif not flag.isascii() or _ATOM_SPECIALS.search(flag):
                raise ValueError(f"{flag!r} is not an IMAP keyword (RFC 3501 atom)")
            else:
                name = flag
            if name not in out:
                out.append(name)
    return tuple(out)


def _crlf(data: bytes) -> bytes:
    """Every line end as CRLF (RFC 3501 APPEND takes RFC 5322 messages)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def _internal_date(data: bytes) -> str | None:
    """The message's Date field as an IMAP date-time (RFC 3501 9, without the
    quotes Twisted adds), or L{None} when missing or unparseable."""
    for value in header_values(data, "Date"):
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": the time is UTC (RFC 5322 3.3)
            when = when.replace(tzinfo=datetime.UTC)
        return imaplib.Time2Internaldate(when).strip('"')
    return None


def _text(exc: BaseException) -> str:
    """An exception's text for a reply: an IMAP4Exception's server line decoded."""
    arg = exc.args[0] if exc.args else exc
    if isinstance(arg, bytes):
        return arg.decode("utf-8", "replace")
    return str(arg) or type(exc).__name__


class _Stage(Exception):
    """Internal: a failed step, with the reply and status to report."""

    def __init__(self, reply: Reply, status: str | None = None) -> None:
        super().__init__(reply.one_line())
        self.reply = reply
        self.status = status


def _guard(d: defer.Deferred[Any], abort: Any) -> defer.Deferred[Any]:
    """A Deferred with C{d}'s result whose cancellation aborts the connection
    (C{abort()}) and leaves C{d} to fail on its own, unobserved."""
    outer: defer.Deferred[Any] = defer.Deferred(lambda _: abort())

    def fire(result: Any) -> None:
        if outer.called:
            return None  # cancelled: the connection is being aborted
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)
        return None

    d.addBoth(fire)
    return outer


class _Client(imap4.IMAP4Client):
    """Twisted's IMAP4 client, plus what a delivery needs to know: the
    greeting (L{greeted}), the end of the connection (L{closed}), the status
    word of the last tagged reply (C{NO} or C{BAD}, which Twisted's
    C{IMAP4Exception} does not keep) and a greeting C{BYE}'s text."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        # TimeoutMixin: idle seconds before giving up (declared int; a float works)
        self.timeout = timeout  # type: ignore[assignment]
        self.greeted: defer.Deferred[Any] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.last_status = b""
        self.bye: str | None = None
        self.timed_out = False

    def serverGreeting(self, caps: Any) -> None:
        """Fire L{greeted} with the capabilities of the greeting (or L{None})."""
        if not self.greeted.called:
            self.greeted.callback(caps)

    def response_UNAUTH(self, tag: bytes, rest: bytes) -> None:
        """Keep the text of a C{* BYE} greeting, then Twisted's handling."""
        if self.state is None and tag == b"*" and rest[:3].upper() == b"BYE":
            self.bye = rest[3:].strip().decode("utf-8", "replace")
            self.close()
            return
        super().response_UNAUTH(tag, rest)

    def _defaultHandler(self, tag: bytes, rest: bytes) -> None:
        """Note the status word of a tagged reply, then Twisted's handling."""
        if tag not in (b"*", b"+"):
            words = rest.split(None, 1)
            self.last_status = words[0].upper() if words else b""
        super()._defaultHandler(tag, rest)

    def abort(self) -> None:
        """Abort the connection now (no LOGOUT, no TLS close)."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def close(self) -> None:
        """Close the connection once what was written is sent."""
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def timeoutConnection(self) -> None:
        """The server was silent for C{timeout} seconds: fail the command, abort."""
        self.timed_out = True
        super().timeoutConnection()
        self.abort()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Fail what waits (greeting, commands), then fire L{closed}."""
        if self.queued:  # commands whose Deferred was cancelled: nobody listens
            self.queued = [c for c in self.queued if c.defer is not None and not c.defer.called]
        tags: dict[bytes, Any] = self.tags or {}
        for cmd in tags.values():
            if cmd is not None and cmd.defer is not None and cmd.defer.called:
                cmd.defer = None
        super().connectionLost(reason)
        if not self.greeted.called:
            self.greeted.errback(reason)
        if not self.closed.called:
            self.closed.callback(None)


class _Factory(protocol.ClientFactory):
    """Builds one L{_Client} with the delivery's timeout."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> _Client:
        """A new L{_Client}."""
        client = _Client(self.timeout)
        client.factory = self
        return client


class IMAPDelivery(Delivery):
    """APPEND each message to a folder of an IMAP mailbox (see the module
    docstring for the URL, the TLS levels and the errors).

    L{send} must be called in the reactor thread and returns a C{Deferred};
    from another thread while the reactor runs, use L{send_blocking}. One
    connection per message: connect, STARTTLS, log in, APPEND, LOGOUT.

    @param host: the server's host name or address literal.
    @param port: the TCP port; 143, or 993 with C{implicit_tls}, when L{None}.
    @param folder: the folder (mailbox name) to append to.
    @param auth: C{(user, password)} to log in with (C{AUTHENTICATE PLAIN}
        when offered, else C{LOGIN}), or L{None} not to log in; the password
        never appears in C{repr}, C{str}, errors or logs.
    @param flags: the message's flags (see L{parse_flags}: a C{str} or
        C{str}s).
    @param tls: one of L{TLS_CHOICES} (see the module docstring).
    @param cafile: CA certificates (PEM) for C{verify}/C{secure}; read here,
        once; the platform's store when L{None}.
    @param timeout: seconds: the cap on connecting and on each wait for the server.
    @param create: create a missing folder (on C{NO [TRYCREATE]}) and append again.
    @param implicit_tls: TLS from the first byte (C{imaps://}, RFC 8314).
    @param reactor: the reactor; the global one when L{None}.
    @raise ValueError: a bad TLS level (or C{none}/C{may} with implicit
        TLS), flag, timeout, port or folder, or an C{auth} that is not two
        C{str} with a non-empty password.
    @raise OSError: C{cafile} cannot be read.
    """

    scheme = "imap"
    asynchronous = True

    def __init__(self, host: str, port: int | None = None, *, folder: str = "INBOX",
                 auth: tuple[str, str] | None = None, flags: str | Iterable[str] = (),
                 tls: str = "verify", cafile: str | None = None, timeout: float = 60.0,
                 create: bool = False, implicit_tls: bool = False,
                 reactor: Any = None) -> None:
        if not host:
            raise ValueError("an IMAP delivery needs a host (imap://user@host/Folder)")
        if tls not in TLS_CHOICES:
            raise ValueError(f"tls must be one of {', '.join(TLS_CHOICES)}, not {tls!r}")
        if implicit_tls and tls not in _REQUIRED:
            raise ValueError(f"imaps:// is TLS from the start: tls must be one of "
                             f"{', '.join(_REQUIRED)}, not {tls!r}")
        if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if port is None:
            port = 993 if implicit_tls else 143
        if isinstance(port, bool) or not (isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"port must be from 1 to 65535, not {port!r}")
        if not folder or any(c in folder for c in "\r\n\x00"):
            raise ValueError(f"bad IMAP folder name {folder!r}")
        if auth is not None:
            if not (isinstance(auth, (tuple, list)) and len(auth) == 2
                    and all(isinstance(x, str) for x in auth)):
                raise ValueError("auth must be (username, password), two str")
            if not auth[0] or not auth[1]:
                raise ValueError("auth needs a user name and a password (imap://user:password@"
                                 "host/..., or auth=(user, password))")
            auth = (auth[0], auth[1])
        self.host = host.strip("[]")
        self.port = port
        self.folder = folder
        self._auth = auth
        self.flags = parse_flags(flags)
        self.tls = tls
        self.cafile = cafile
        self.timeout = float(timeout)
        self.create = bool(create)
        self.implicit_tls = bool(implicit_tls)
        self.reactor = reactor
        self._trust = load_trust_root(cafile) if tls in _VERIFYING else None
        # one creator for every connection (it builds its TLS context now, not per message)
        self._tls = (name_checking_tls(self.host, [self.host], self._trust)
                     if tls in _VERIFYING else opportunistic_tls(self.host))
        if self.implicit_tls:
            self.scheme = "imaps"

    @property
    def username(self) -> str | None:
        """The user name it logs in as, or L{None}."""
        return self._auth[0] if self._auth else None

    @classmethod
    def url_arguments(cls, url: str) -> dict[str, Any]:
        """The constructor's keyword arguments from an C{imap://} or C{imaps://} URL.

        @param url: see the module docstring.
        @return: C{host}, C{port}, C{folder}, C{implicit_tls} and those of
            C{auth}, C{flags}, C{tls}, C{cafile}, C{timeout}, C{create} the
            URL gives. A user without a password gives C{auth=(user, "")},
            which the constructor refuses unless a dict configuration
            replaces it (C{{"url": ..., "auth": (user, password)}}).
        @raise ValueError: no host, a bad port, an unknown or repeated
            parameter, a bad value; the message never holds the password.
        """
        safe = _safe(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"bad IMAP URL {safe!r}: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("imap", "imaps"):
            raise ValueError(f"{safe}: not an imap:// or imaps:// URL")
        if not parts.hostname:
            raise ValueError(f"{safe}: {scheme}:// needs a host ({scheme}://user@host/Folder)")
        if parts.fragment:
            raise ValueError(f"{safe}: a delivery URL has no #fragment")
        out: dict[str, Any] = {"host": parts.hostname, "port": port,
                               "implicit_tls": scheme == "imaps"}
        folder = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
        if folder:
            out["folder"] = folder
        if parts.username is not None:
            out["auth"] = (unquote(parts.username), unquote(parts.password or ""))
        params = parse_qs(parts.query, keep_blank_values=True)
        for key, values in params.items():
            if key in ("flags", "flag"):
                try:
                    out["flags"] = (*out.get("flags", ()), *parse_flags(values))
                except ValueError as e:
                    raise ValueError(f"{safe}: {e}") from None
                continue
            if key not in ("tls", "cafile", "timeout", "create"):
                raise ValueError(f"{safe}: unknown parameter {key!r} for {scheme}:// "
                                 "(flags, tls, cafile, timeout, create)")
            if len(values) != 1:
                raise ValueError(f"{safe}: {key} given {len(values)} times")
            value = values[0]
            if key == "tls":
                allowed = _REQUIRED if scheme == "imaps" else TLS_CHOICES
                if value not in allowed:
                    raise ValueError(f"{safe}: tls must be one of {', '.join(allowed)}, "
                                     f"not {value!r}")
                out["tls"] = value
            elif key == "cafile":
                if not value:
                    raise ValueError(f"{safe}: cafile needs a path")
                out["cafile"] = value
            elif key == "timeout":
                try:
                    out["timeout"] = float(value)
                except ValueError:
                    out["timeout"] = -1.0
                if not out["timeout"] > 0:
                    raise ValueError(f"{safe}: timeout must be a positive number, "
                                     f"not {value!r}")
            else:
                word = value.strip().lower()
                if word not in ("yes", "true", "on", "1", "no", "false", "off", "0"):
                    raise ValueError(f"{safe}: create must be yes or no, not {value!r}")
                out["create"] = word in ("yes", "true", "on", "1")
        if "flags" in out and not out["flags"]:
            del out["flags"]
        return out

    def url(self) -> str:
        """The URL of this delivery, with C{***} for the password."""
        user = f"{quote(self._auth[0], safe='')}:***@" if self._auth else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?tls={self.tls}"
        if self.flags:
            query += "&flags=" + quote(" ".join(self.flags), safe="")
        if self.create:
            query += "&create=yes"
        return f"{self.scheme}://{user}{host}:{self.port}/{quote(self.folder)}{query}"

    def __str__(self) -> str:
        """The URL (without the password)."""
        return self.url()

    # -- delivering ---------------------------------------------------------

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> defer.Deferred[DeliveryReport]:
        """APPEND the message to the folder.

        @param sender: envelope sender (validated, then not used).
        @param recipients: envelope recipients (validated; each is reported).
        @param message: C{bytes}, C{str} or C{email.message.Message}.
        @param message_id: unused (the report names the recipients).
        @return: a C{Deferred} firing with a L{DeliveryReport}: every
            recipient delivered, or every one deferred or bounced (see the
            module docstring); it fails only for bad input (L{AddressError},
            L{MessageError}). Cancelling it aborts the connection.
        """
        try:
            env = prepare(sender, recipients, message)
        except (AddressError, MessageError) as e:
            return defer.fail(e)
        return defer.Deferred.fromCoroutine(self._deliver(env.recipients, _crlf(env.data)))

    def send_blocking(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
                      message_id: str | None = None) -> DeliveryReport:
        """L{send} from a thread other than the reactor's, waiting for the
        report. The reactor must be running in another thread.

        @return: the L{DeliveryReport}.
        @raise AddressError, MessageError: bad input.
        @raise RuntimeError: called in the reactor thread or with no reactor running.
        """
        report: DeliveryReport = blocking_call(
            default_reactor(self.reactor), self.send, sender, recipients, message)
        return report

    def _where(self) -> str:
        """C{host:port} for reply texts."""
        return f"{self.host}:{self.port}"

    def _creator(self) -> Any:
        """The TLS connection creator for this delivery's level (made once)."""
        return self._tls

    async def _deliver(self, recipients: list[str], data: bytes) -> DeliveryReport:
        """Connect, then run the session; every failure becomes a result."""
        reactor = default_reactor(self.reactor)
        endpoint: Any = endpoints.HostnameEndpoint(reactor, self.host, self.port,
                                                   timeout=self.timeout)
        if self.implicit_tls:
            endpoint = endpoints.wrapClientTLS(self._creator(), endpoint)
        try:
            client = await endpoint.connect(_Factory(self.timeout))
        except (defer.CancelledError, error.ConnectingCancelledError):
            raise defer.CancelledError() from None
        except error.DNSLookupError as e:
            return self._report(recipients, Reply(
                451, f"4.4.3 cannot resolve IMAP server {self.host}: {e}", True))
        except Exception as e:  # noqa: BLE001 - refused, timeout, unreachable
            return self._report(recipients, Reply(
                451, f"4.4.1 cannot connect to IMAP server {self._where()}: {_text(e)}", True))
        done = False
        try:
            text = await self._session(client, data)
            done = True
        except _Stage as stage:
            return self._report(recipients, stage.reply, stage.status)
        finally:
            await self._close(client, reactor, polite=done)
        return self._report(recipients, Reply(250, text))

    def _report(self, recipients: list[str], reply: Reply,
                status: str | None = None) -> DeliveryReport:
        """The same result for every recipient; C{relay} when the server said it."""
        relay = None if reply.local else self._where()
        return DeliveryReport([RecipientResult.from_reply(r, reply, status, relay=relay)
                               for r in recipients])

    async def _close(self, client: _Client, reactor: Any, polite: bool) -> None:
        """Close the connection and wait until it is closed: after a LOGOUT
        politely (bounded by the timeout, then aborted), else aborted."""
        if client.closed.called:
            return
        if not polite:
            client.abort()
        else:
            client.close()
            if await _fired_within(client.closed, self.timeout, reactor):
                return
            client.abort()
        await _fired_within(client.closed, self.timeout, reactor)  # an abort is quick

    async def _session(self, client: _Client, data: bytes) -> str:
        """Greeting, TLS, login, APPEND (CREATE first when asked), LOGOUT.

        @return: the text of the delivered reply.
        @raise _Stage: a step failed.
        """

        def wait(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
            return _guard(d, client.abort)

        await self._step(client, "greeting", wait(client.greeted))
        caps = await self._step(client, "CAPABILITY", wait(client.getCapabilities()))
        if client.state != "unauth" and not self.implicit_tls and self.tls in _REQUIRED:
            raise _Stage(Reply(454, f"4.7.0 IMAP server {self._where()} greeted with PREAUTH: "
                               f"no STARTTLS possible (tls={self.tls})", True))
        if client.state == "unauth" and not self.implicit_tls and self.tls != "none":
            if b"STARTTLS" in caps:
                caps = await self._step(client, "STARTTLS",
                                        wait(client.startTLS(self._creator())))
            elif self.tls in _REQUIRED:
                raise _Stage(Reply(454, f"4.7.0 IMAP server {self._where()} does not offer "
                                   f"STARTTLS (tls={self.tls})", True))
        if self._auth is not None and client.state == "unauth":
            await self._login(client, caps, wait)
        text = await self._append(client, data, wait)
        try:
            await wait(client.logout())
        except defer.CancelledError:
            raise
        except Exception:  # noqa: BLE001, S110 - the message is in: a failed LOGOUT changes nothing
            pass
        return text

    async def _step(self, client: _Client, what: str, d: defer.Deferred[Any]) -> Any:
        """Wait for a step before login; its failure becomes a L{_Stage}."""
        try:
            return await d
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a reply
            raise _Stage(self._failure_reply(client, what, e)) from None

    def _failure_reply(self, client: _Client, what: str, e: BaseException) -> Reply:
        """The reply for a failure of the connection at step C{what}."""
        where = self._where()
        if client.bye is not None:
            return Reply(421, f"4.3.2 IMAP server {where} said BYE: {client.bye}", False)
        if isinstance(e, CertificateVerifyError):
            return Reply(454, f"4.7.5 IMAP server {where}: certificate not verified: {e}", True)
        if isinstance(e, (SSL.Error, TLSError)) or (what == "STARTTLS"
                                                     and not client.timed_out):
            return Reply(454, f"4.7.0 TLS with IMAP server {where} failed: {_text(e)}", True)
        if client.timed_out or isinstance(e, error.TimeoutError):
            return Reply(451, f"4.4.2 IMAP server {where} did not answer in "
                         f"{self.timeout:g} s ({what})", True)
        if isinstance(e, imap4.IMAP4Exception):
            return Reply(451, f"4.3.0 IMAP server {where} refused {what}: {_text(e)}", False)
        return Reply(451, f"4.4.2 connection to IMAP server {where} lost ({what}): "
                     f"{_text(e)}", True)

    async def _login(self, client: _Client, caps: dict[bytes, Any],
                     wait: Any) -> None:
        """C{AUTHENTICATE PLAIN} when offered, else C{LOGIN} (RFC 3501 6.2.3).

        @raise _Stage: refused (454 4.7.8, deferred) or impossible.
        """
        assert self._auth is not None
        user, password = self._auth
        where = self._where()
        mechanisms = [m.upper() for m in (caps.get(b"AUTH") or ()) if m]
        if b"PLAIN" in mechanisms:
            client.registerAuthenticator(imap4.PLAINAuthenticator(user.encode("utf-8")))
            d = client.authenticate(password.encode("utf-8"))
            how = "AUTHENTICATE PLAIN"
        elif b"LOGINDISABLED" in caps:
            raise _Stage(Reply(454, f"4.7.0 IMAP server {where} disables LOGIN and offers no "
                               "AUTH=PLAIN (use TLS)", True))
        else:
            if not (user.isascii() and password.isascii()) or any(
                    c in user + password for c in "\r\n\x00"):
                raise _Stage(Reply(454, f"4.7.0 IMAP server {where} offers no AUTH=PLAIN and "
                                   "LOGIN takes only ASCII user names and passwords", True))
            d = client.sendCommand(imap4.Command(b"LOGIN", _quoted(user) + b" " +
                                                 _quoted(password)))
            how = "LOGIN"
        try:
            await wait(d)
        except defer.CancelledError:
            raise
        except imap4.IMAP4Exception as e:
            raise _Stage(Reply(454, f"4.7.8 IMAP authentication as {user} failed at {where} "
                               f"({how}): {_text(e)[:200]}", False)) from None
        except Exception as e:  # noqa: BLE001 - connection lost, timeout
            raise _Stage(self._failure_reply(client, how, e)) from None

    async def _append(self, client: _Client, data: bytes, wait: Any) -> str:
        """APPEND, and on C{[TRYCREATE]} with L{create}: CREATE, APPEND again.

        @return: the delivered reply's text.
        @raise _Stage: refused or failed (see the module docstring).
        """
        date = _internal_date(data)
        created = False
        while True:
            try:
                _, tagline = await wait(client.append(self.folder, io.BytesIO(data),
                                                      self.flags, date))
            except defer.CancelledError:
                raise
            except imap4.IMAP4Exception as e:
                text, status = _text(e), client.last_status
                if (status == b"NO" and _code(text) == "TRYCREATE" and self.create
                        and not created):
                    await self._create(client, wait)
                    created = True
                    continue
                raise _Stage(self._append_reply(status, text)) from None
            except Exception as e:  # noqa: BLE001 - connection lost, timeout
                raise _Stage(self._failure_reply(client, "APPEND", e)) from None
            break
        done = f"2.0.0 appended to {self.folder} at {self._where()}"
        uid = _APPENDUID.search(tagline or b"")
        if uid:
            done += f" (UIDVALIDITY {int(uid.group(1))} UID {int(uid.group(2))})"
        return done

    async def _create(self, client: _Client, wait: Any) -> None:
        """CREATE the folder; one that exists already (a race) is fine.

        @raise _Stage: refused (bounced) or the connection failed (deferred).
        """
        try:
            await wait(client.create(self.folder))
        except defer.CancelledError:
            raise
        except imap4.IMAP4Exception as e:
            text = _text(e)
            if _code(text) == "ALREADYEXISTS":
                return
            if client.last_status == b"BAD":
                raise _Stage(Reply(554, f"5.5.2 IMAP server {self._where()} rejected CREATE "
                                   f"{self.folder}: {text}", False)) from None
            raise _Stage(Reply(550, f"5.2.0 IMAP server {self._where()} cannot create folder "
                               f"{self.folder}: {text}", False), "bounced") from None
        except Exception as e:  # noqa: BLE001 - connection lost, timeout
            raise _Stage(self._failure_reply(client, "CREATE", e)) from None

    def _append_reply(self, status: bytes, text: str) -> Reply:
        """The reply for a tagged C{NO} or C{BAD} to APPEND (the module's table)."""
        where = self._where()
        if status == b"BAD":
            return Reply(554, f"5.5.2 IMAP server {where} rejected APPEND to {self.folder}: "
                         f"{text}", False)
        code = _code(text)
        if code == "TRYCREATE":
            return Reply(550, f"5.1.1 IMAP folder {self.folder} does not exist at {where} "
                         f"(create=yes creates it): {text}", False)
        if code in _APPEND_CODES:
            number, enhanced, _ = _APPEND_CODES[code]
            return Reply(number, f"{enhanced} IMAP server {where} refused APPEND to "
                         f"{self.folder}: {text}", False)
        return Reply(451, f"4.3.0 IMAP server {where} refused APPEND to {self.folder}: "
                     f"{text}", False)


async def _fired_within(d: defer.Deferred[Any], seconds: float | None, reactor: Any) -> bool:
    """Wait until C{d} fires, at most C{seconds} (forever when L{None}),
    without changing its result.

    @return: C{True} when it fired, C{False} at the deadline.
    """
    waiter: defer.Deferred[bool] = defer.Deferred()

    def fired(result: Any) -> Any:
        if not waiter.called:
            waiter.callback(True)
        return result

    d.addBoth(fired)
    timer = None
    if seconds is not None:
        def expire() -> None:
            if not waiter.called:
                waiter.callback(False)

        timer = reactor.callLater(seconds, expire)
    try:
        return await waiter
    finally:
        if timer is not None and timer.active():
            timer.cancel()


def _code(text: str) -> str | None:
    """The RFC 5530 response code at the start of a reply text (upper case), or L{None}."""
    m = _CODE.match(text)
    return m.group(1).upper() if m else None


def _quoted(text: str) -> bytes:
    """An IMAP quoted string (RFC 3501 4.3): backslash and double quote escaped."""
    return b'"' + text.encode("ascii").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _safe(url: str) -> str:
    """C{url} with any password replaced by C{***}, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<unparseable URL>"
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}").geturl()
