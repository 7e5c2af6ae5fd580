"""The application-facing API: put mail in the queue, or deliver it now.

L{SMTPClient} is the explicit client, like treq's C{HTTPClient}: it owns its
reactor, resolver, connection pool (a L{Connector}) and TLS settings, and
delivers with L{SMTPClient.send} over the same router and ESMTP session as the
daemon. L{sendmail} is a thin function over shared clients kept in
L{default_clients} (one per reactor and settings), like C{treq.get} over its
default pool::

    client = SMTPClient(reactor, relay="smtp://relay.example.net", auth=(user, pw),
                        tls="verify")
    report = await client.send("me@example.com", ["you@example.org"], message)
    for recipient, code, text in report:     # twisted.mail.smtp.sendmail()'s shape
        ...
    await client.close()

With C{dkim=} (a key table path, the file C{twistd mailout --dkim-keys}
reads, or a loaded L{Signer<twisted_mailout.dkim.Signer>}) the client signs
each message once, in the reactor's thread pool, before its first
transaction; every destination gets the same signed bytes (RFC 6376, see
C{docs/deliverability.md}).

L{enqueue} (re-exported from the queue layer) needs no reactor at all; queued
mail is signed by the daemon that delivers it.
"""

from __future__ import annotations

import inspect
import io
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, TypeAlias

from twisted.internet import defer, threads
from twisted.python import threadable

from twisted_mailout.delivery.build import build_connector
from twisted_mailout.delivery.connector import Attempt, Connector, ConnectorSettings
from twisted_mailout.delivery.destinations import RELAY_KEY, group_by_destination
from twisted_mailout.delivery.signing import MessageSigner
from twisted_mailout.envelope import Address, AddressError, Reply, parse_address, parse_sender
from twisted_mailout.message import coerce_message, prepare_message
from twisted_mailout.outcome import DeliveryReport, RecipientResult, Status
from twisted_mailout.queue.store import enqueue
from twisted_mailout.routing.router import make_resolver, parse_relay
from twisted_mailout.smtp.auth import Credentials
from twisted_mailout.smtp.timeouts import Timeouts
from twisted_mailout.tls.creators import load_trust_root
from twisted_mailout.tls.levels import LEVELS
from twisted_mailout.tls.policy import PolicyTable, TLSPolicy

__all__ = [
    "RELAY_KEY",
    "ClientRegistry",
    "DKIMSetting",
    "DeliveryReport",
    "RecipientResult",
    "SMTPClient",
    "Status",
    "blocking_call",
    "close_connections",
    "default_clients",
    "default_reactor",
    "enqueue",
    "group_by_destination",
    "load_signer",
    "sendmail",
    "sign_in_thread",
    "unsigned_reply",
]

#: What C{dkim=} takes: the path of a DKIM key table (the TOML file of
#: C{twistd mailout --dkim-keys}), a loaded signer (an object with
#: C{sign(message, sender) -> bytes}, such as L{Signer}), or L{None} for no
#: signing.
DKIMSetting: TypeAlias = "str | os.PathLike[str] | MessageSigner | None"

def default_reactor(reactor: Any = None) -> Any:
    """C{reactor}, or the global reactor when it is L{None} (treq's
    C{default_reactor}). The one fallback of the API edge: the client, the
    deliveries, the mailer, send-on-commit and the daemon's service use it;
    nothing below this layer reaches for the global reactor.

    @param reactor: a reactor or L{None}.
    @return: a reactor.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def blocking_call(reactor: Any, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call C{f} in the reactor thread from another thread and wait for its
    result (a Deferred's result is waited for): behind
    L{SMTPClient.send_blocking}, and behind C{SMTPDelivery.send_blocking} and
    C{Mailer.send_blocking} for a reactor that no
    C{twisted_mailout.apps.blocking.ReactorThread} drives (those wait through
    it, starting a reactor thread when none runs).

    @param reactor: the reactor, running in another thread.
    @param f: the function; it may return a Deferred.
    @return: the result.
    @raise RuntimeError: the reactor is not running, or this is its thread
        (it would wait for itself).
    """
    in_reactor_thread = threadable.isInIOThread()
    if in_reactor_thread or not reactor.running:
        where = "in the reactor thread" if in_reactor_thread else "with no reactor running"
        raise RuntimeError(
            f"a blocking send was called {where}: delivering now needs a running Twisted "
            "reactor in another thread (in the reactor thread, use send(), which returns a "
            "Deferred); from a program without one, use twisted_mailout.blocking (or a "
            "Mailer, which waits through it): it runs a reactor in a thread of its own")
    return threads.blockingCallFromThread(reactor, f, *args, **kwargs)


def load_signer(dkim: DKIMSetting, required: bool = False) -> MessageSigner | None:
    """The signer a C{dkim=} setting names: the one place where the API and
    the applications turn a key table path into a L{Signer}. Blocking (it
    reads the table and the keys): call it where blocking is fine.

    @param dkim: see L{DKIMSetting}.
    @param required: refuse to pass a message no key applies to (as
        C{--dkim-required}). With a L{Signer} that is not required, a
        required copy of it is returned.
    @return: the signer, or L{None} for C{dkim=None}.
    @raise ConfigError: the table or a key is unusable (the message names the
        file and the line); a C{ValueError}.
    @raise ValueError: C{required} without C{dkim}, or a signer that
        cannot be made required.
    @raise TypeError: C{dkim} is of another type.
    """
    from twisted_mailout.dkim.signer import Signer  # dkimpy loads on first use

    if dkim is None:
        if required:
            raise ValueError("dkim_required needs dkim= (a key table path or a Signer)")
        return None
    if isinstance(dkim, (str, os.PathLike)):
        from twisted_mailout.dkim.keys import KeyTable

        return Signer(KeyTable.load(dkim), required=required)
    if not callable(getattr(dkim, "sign", None)):
        raise TypeError(f"dkim must be a key table path or a Signer, not "
                        f"{type(dkim).__name__}")
    if required and not getattr(dkim, "required", False):
        if isinstance(dkim, Signer):
            return Signer(dkim.table, required=True)
        raise ValueError("dkim_required=True with a signer that has no 'required' attribute "
                         "set: make the signer refuse unsigned mail itself")
    return dkim


def unsigned_reply(error: BaseException | str) -> Reply:
    """The reply given for every recipient of a message that could not be
    signed (the daemon defers such mail with the same text).

    @param error: the signer's error, or its text.
    @return: a local C{451 4.7.0 message not signed: ...}.
    """
    return Reply(451, f"4.7.0 message not signed: {error}", local=True)


def sign_in_thread(reactor: Any, signer: MessageSigner, message: bytes,
                   sender: str | None) -> defer.Deferred[bytes]:
    """Sign a message off the reactor thread: C{signer.sign} runs in the
    reactor's thread pool (a reactor without threads, such as the memory
    reactor of L{twisted_mailout.testing.memory}, signs at once).

    @param reactor: the reactor (C{IReactorThreads} when it has
        C{getThreadPool}).
    @param signer: the signer.
    @param message: the message bytes, LF or CRLF line ends.
    @param sender: the envelope sender (C{""}/L{None} for the null sender),
        for the signing map.
    @return: a Deferred firing with the message with its DKIM-Signature
        fields in front (L{prepend_signature}; the message as it is when no
        key applies), or failing with the signer's error (C{SigningError}).
    """
    from twisted_mailout.dkim.signer import prepend_signature

    def sign() -> bytes:
        return prepend_signature(signer.sign(message, sender), message)

    get_pool = getattr(reactor, "getThreadPool", None)
    if get_pool is None:
        return defer.maybeDeferred(sign)
    return threads.deferToThreadPool(reactor, get_pool(), sign)


class SMTPClient:
    """Delivers messages now, without the queue, over pooled connections.

    One object owns its reactor, its DNS resolver, its connection pool and its
    TLS and AUTH settings; calls in flight at the same time share connections
    and DNS answers, idle connections are kept C{idle_timeout} seconds for the
    next call, and L{close} ends them. Recipients are grouped by destination
    (one transaction per domain, or one for the relay); each destination's
    hosts are tried in MX order. Build it where blocking is fine (at start-up,
    or in a thread): it reads C{cafile}, C{tls_policy} and, without
    C{resolver}, resolv.conf and the hosts file.

    @param reactor: the reactor (C{IReactorTCP}, C{IReactorTime}); the
        global one when L{None}.
    @param relay: a smarthost, C{"HOST[:PORT]"} (port 25),
        C{"smtp://HOST[:PORT]"} (port 587) or C{"smtps://HOST[:PORT]"} (port
        465, implicit TLS, RFC 8314); L{None} for MX routing.
    @param resolver: C{"HOST[:PORT]"} of the only DNS server to ask (or a
        list of them), a C{twisted.names} C{IResolver}, or L{None} for
        resolv.conf.
    @param mx_port: the TCP port of MX hosts.
    @param helo: the EHLO name (this host's name by default).
    @param tls: the TLS level (L{twisted_mailout.tls.levels.LEVELS}: C{none},
        C{may}, C{encrypt}, C{verify}, C{secure}, C{dane}, C{dane-only}); a
        level that cannot be met defers the recipients (4xx), it never sends
        in plaintext.
    @param cafile: CA certificates (PEM) for C{verify}/C{secure}; the
        system store by default.
    @param tls_match: for C{verify}/C{secure}: names the certificate may
        match (C{".example.com"}: any subdomain); by default the host name
        (verify) or the recipient domain and its subdomains (secure).
    @param tls_policy: a policy file of per-destination levels (see
        L{PolicyTable}); C{tls} is then the default.
    @param auth: C{(username, password)} or a L{Credentials} for AUTH at the
        relay (RFC 4954); the password never appears in logs or errors.
    @param auth_plaintext: allow AUTH without TLS (off: such a relay gets no
        credentials and the recipients are deferred).
    @param timeout: cap in seconds on each network step (connect, each
        command, DNS); nothing waits longer, so every Deferred fires.
    @param connections: open connections per destination at most.
    @param idle_timeout: seconds an idle connection is kept for the next call.
    @param dnssec_resolver: C{"HOST[:PORT]"} (or a list) of validating
        resolvers trusted to set the AD bit: DANE (RFC 7672) then applies to
        MX delivery at the C{may}, C{dane} and C{dane-only} levels.
    @param mta_sts: C{True} to apply recipient domains' MTA-STS policies
        (RFC 8461) to MX delivery (cached in memory), or an C{MTASTS} to use.
    @param connector: a ready L{Connector} to deliver through instead of one
        built from the arguments above (tests, L{twisted_mailout.testing.memory}).
    @param dkim: DKIM signing (RFC 6376, RFC 8463): the path of a key table
        (the file of C{twistd mailout --dkim-keys}; read here, with its keys)
        or a loaded L{Signer<twisted_mailout.dkim.Signer>}; see
        L{DKIMSetting}. Each message is signed once, in the reactor's thread
        pool, before its first transaction, and every destination gets the
        same bytes.
    @param dkim_required: a message that cannot be signed (no key for its
        From domain, an unreadable From field) is not sent: every recipient
        gets L{unsigned_reply} (451 4.7.0, deferred). Without it such a
        message is sent unsigned.
    @ivar signer: the L{MessageSigner}, or L{None}.
    @raise ValueError: a bad TLS level, relay, resolver, timeout or policy file.
    @raise ConfigError: an unusable DKIM key table or key (a C{ValueError}).
    @raise TypeError: C{auth} of another shape.
    @raise AuthError: unusable credentials (a C{ConfigError}, a C{ValueError}).
    @raise OSError: an unreadable C{cafile}.
    """

    def __init__(self, reactor: Any = None, *, relay: str | None = None,
                 resolver: str | Sequence[str] | Any = None, mx_port: int = 25,
                 helo: str | None = None, tls: str = "may", cafile: str | None = None,
                 tls_match: str | Sequence[str] | None = None, tls_policy: str | None = None,
                 auth: tuple[str, str] | Credentials | None = None,
                 auth_plaintext: bool = False, timeout: float = 60.0, connections: int = 4,
                 idle_timeout: float = 2.0, dnssec_resolver: str | Sequence[str] | None = None,
                 mta_sts: Any = False, connector: Connector | None = None,
                 dkim: DKIMSetting = None, dkim_required: bool = False) -> None:
        self.reactor = default_reactor(reactor)
        self.relay = relay
        self.signer = load_signer(dkim, dkim_required)
        if connector is not None:
            self.connector = connector
            return
        if tls not in LEVELS:
            raise ValueError(f"tls must be one of {', '.join(LEVELS)}, not {tls!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        if relay is not None:
            parse_relay(relay)
        credentials = _credentials(auth, auth_plaintext)
        if credentials is not None and relay is None:
            raise ValueError("auth is for a relay: give relay= too")
        default = TLSPolicy(tls, (), "--tls")
        policy = (PolicyTable.from_file(tls_policy, default) if tls_policy is not None
                  else PolicyTable(default))
        if tls_match:
            names = [tls_match] if isinstance(tls_match, str) else list(tls_match)
            policy.default = TLSPolicy(tls, tuple(m.lower() for m in names), "tls_match")
        dns_timeout = min(timeout, 15.0)
        if resolver is None or isinstance(resolver, (str, list, tuple)):
            servers = [resolver] if isinstance(resolver, str) else list(resolver or ())
            resolver = make_resolver(servers, self.reactor,
                                     (dns_timeout / 7, 2 * dns_timeout / 7, 4 * dns_timeout / 7))
        dnssec = ([dnssec_resolver] if isinstance(dnssec_resolver, str)
                  else list(dnssec_resolver or ()))
        settings = ConnectorSettings(
            helo=helo or socket.gethostname() or "localhost",
            tls=tls,
            policy=policy,
            credentials=credentials,
            trust_root=load_trust_root(cafile),
            timeouts=replace(Timeouts.scaled(timeout), connect=min(timeout, 30.0)),
            max_connections=max(10, connections),
            max_per_destination=connections,
            idle_timeout=idle_timeout,
        )
        self.connector = build_connector(
            self.reactor, resolver, settings, relay=relay, mx_port=mx_port,
            dnssec_resolvers=dnssec, dns_timeout=dns_timeout, mta_sts=mta_sts,
            mta_sts_timeout=min(dns_timeout + settings.timeouts.connect, 60.0))

    def __repr__(self) -> str:
        return f"<SMTPClient {'relay ' + self.relay if self.relay else 'MX routing'}>"

    def send(self, sender: str | None, recipients: str | Iterable[str],
             message: bytes | str | Any) -> defer.Deferred[DeliveryReport]:
        """Deliver one message now.

        @param sender: the envelope sender (RFC 5321 C{MAIL FROM});
            C{""}/C{"<>"}/L{None} for the null sender.
        @param recipients: the envelope recipients (C{RCPT TO}); a C{str} is
            one recipient.
        @param message: C{bytes}, C{str} or C{email.message.Message}; its
            bytes are sent as given, Message-ID and Date added when missing.
        @return: a Deferred firing with a L{DeliveryReport}, one
            L{RecipientResult} per recipient in the order given: delivered
            (2xx), bounced (5xx) or deferred (4xx, or no server reached, or
            with C{dkim_required} not signable: L{unsigned_reply}; not
            retried). It fails only for bad arguments (L{AddressError},
            C{MessageError}); a refused or unreachable recipient is a result,
            not a failure. Cancelling it ends the transactions in flight.
        """
        try:
            snd = parse_sender(sender)
            if isinstance(recipients, str):
                recipients = [recipients]
            addrs = [parse_address(r) for r in recipients]
            if not addrs:
                raise AddressError("no recipients")
            data = prepare_message(coerce_message(message), snd.ascii_domain if snd else None)
        except Exception as e:  # noqa: BLE001 - bad arguments fail the Deferred
            return defer.fail(e)
        return defer.Deferred.fromCoroutine(self._send(snd, addrs, data))

    #: C{twisted.mail.smtp.sendmail}'s name for L{send}.
    sendmail = send

    def send_blocking(self, sender: str | None, recipients: str | Iterable[str],
                      message: bytes | str | Any) -> DeliveryReport:
        """L{send} from a thread other than the reactor's (the reactor running
        in another thread), waiting for the report.

        @return: the L{DeliveryReport}.
        @raise RuntimeError: called in the reactor thread, or the reactor is
            not running (see L{blocking_call}).
        """
        report: DeliveryReport = blocking_call(self.reactor, self.send, sender, recipients,
                                               message)
        return report

    def close(self) -> defer.Deferred[None]:
        """QUIT idle connections and stop reusing any; transactions in flight
        finish first.

        @return: a Deferred firing with L{None} once idle connections are closed.
        """
        return self.connector.close()

    async def _send(self, snd: Address | None, addrs: list[Address],
                    data: bytes) -> DeliveryReport:
        sender = snd.smtp_form() if snd else ""
        if self.signer is not None:
            try:
                data = await sign_in_thread(self.reactor, self.signer, data, sender)
            except defer.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any signing failure: nothing is sent
                reply = unsigned_reply(e)
                return DeliveryReport([RecipientResult.from_reply(str(a), reply)
                                       for a in addrs])
        groups = group_by_destination(addrs, lambda a: a, self.relay is not None)
        utf8 = bool(snd and snd.needs_smtputf8)
        eightbit = not data.isascii()
        keys = list(groups)
        try:
            attempts: list[Attempt] = await defer.gatherResults([
                self.connector.deliver(k, sender, [a.smtp_form() for a in groups[k]],
                                       lambda: io.BytesIO(data), len(data),
                                       utf8 or any(a.needs_smtputf8 for a in groups[k]),
                                       eightbit)
                for k in keys], consumeErrors=True)
        except defer.FirstError as e:
            # Cancelled (send()'s Deferred then fails with CancelledError, as
            # Twisted's convention is), or a bug: the first error, unwrapped.
            e.subFailure.raiseException()
        results: dict[int, RecipientResult] = {}
        for k, attempt in zip(keys, attempts, strict=True):
            for a in groups[k]:
                results[id(a)] = RecipientResult.from_reply(
                    str(a), attempt.replies[a.smtp_form()], relay=attempt.relay)
        return DeliveryReport([results[id(a)] for a in addrs])


def _credentials(auth: tuple[str, str] | Credentials | None,
                 plaintext: bool) -> Credentials | None:
    if auth is None or isinstance(auth, Credentials):
        return auth
    try:
        user, password = auth
    except (TypeError, ValueError):
        raise TypeError("auth must be (username, password) or Credentials") from None
    return Credentials(user, password, allow_plaintext=plaintext)


def _key_part(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_key_part(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


#: The keyword arguments of L{SMTPClient} that L{sendmail} passes on.
_SETTINGS = frozenset(inspect.signature(SMTPClient).parameters) - {
    "reactor", "connector", "idle_timeout"}  # linger decides how long a shared client stays


class _Shared:
    def __init__(self, key: tuple, client: SMTPClient, keep: Any) -> None:
        self.key = key
        self.client = client
        self.keep = keep  # the objects whose id() is in the key stay alive
        self.users = 0
        self.timer: Any = None


class ClientRegistry:
    """The L{SMTPClient}s that L{sendmail} shares: one per reactor and
    settings. Calls in flight at the same time with the same settings share
    one client (its connections and DNS answers); a client stays C{linger}
    seconds after its last call finishes, then is closed. This is the one
    module-level pool of the package, L{default_clients}; applications that
    want to own their pool make an L{SMTPClient} instead.
    """

    def __init__(self) -> None:
        self._shared: dict[tuple, _Shared] = {}

    def __len__(self) -> int:
        """How many clients are kept (in use or lingering)."""
        return len(self._shared)

    def sendmail(self, sender: str | None, recipients: str | Iterable[str],
                 message: bytes | str | Any, *, reactor: Any = None, linger: float = 0.0,
                 **settings: Any) -> defer.Deferred[DeliveryReport]:
        """L{SMTPClient.send} on the shared client for C{reactor} and
        C{settings} (the keyword arguments of L{SMTPClient}).

        @param linger: seconds the client (and its idle connections) is kept
            after the last call in flight finishes; C{0} closes it at once.
        @return: as L{SMTPClient.send}; bad settings fail the Deferred too.
        @raise TypeError: a keyword that is not a setting of L{SMTPClient}
            (as a mistyped keyword argument of any function).
        """
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise TypeError(f"sendmail() got unexpected keyword argument(s) {', '.join(unknown)}")
        try:
            if linger < 0:
                raise ValueError("linger must not be negative")
            reactor = default_reactor(reactor)
            key = (reactor, tuple(sorted((k, _key_part(v)) for k, v in settings.items())))
            shared = self._shared.get(key)
            if shared is None:
                client = SMTPClient(reactor, idle_timeout=max(linger, 1.0), **settings)
                shared = self._shared[key] = _Shared(key, client, list(settings.values()))
        except Exception as e:  # noqa: BLE001 - returned as the Deferred's failure
            return defer.fail(e)
        self._enter(shared)
        d = shared.client.send(sender, recipients, message)

        def leave(result: Any) -> Any:
            return self._leave(shared, linger).addCallback(lambda _: result)

        return d.addBoth(leave)

    def _enter(self, shared: _Shared) -> None:
        shared.users += 1
        if shared.timer is not None and shared.timer.active():
            shared.timer.cancel()
        shared.timer = None

    def _leave(self, shared: _Shared, linger: float) -> defer.Deferred[None]:
        shared.users -= 1
        if shared.users:
            return defer.succeed(None)
        if linger > 0:
            shared.timer = shared.client.reactor.callLater(linger, self._close, shared)
            return defer.succeed(None)
        return self._close(shared)

    def _close(self, shared: _Shared) -> defer.Deferred[None]:
        shared.timer = None
        if self._shared.get(shared.key) is shared:
            del self._shared[shared.key]
        return shared.client.close()

    def close_idle(self) -> defer.Deferred[None]:
        """Close the clients no call is using (those kept for C{linger}).

        @return: a Deferred firing with L{None} once their connections are closed.
        """
        idle = [s for s in self._shared.values() if s.users == 0]
        for s in idle:
            if s.timer is not None and s.timer.active():
                s.timer.cancel()
        d = defer.DeferredList([self._close(s) for s in idle], consumeErrors=True)
        return d.addCallback(lambda _: None)


#: The clients L{sendmail} shares (see L{ClientRegistry}).
default_clients = ClientRegistry()


def sendmail(sender: str | None, recipients: str | Iterable[str], message: bytes | str | Any,
             *, reactor: Any = None, linger: float = 0.0,
             **settings: Any) -> defer.Deferred[DeliveryReport]:
    """Deliver a message now, without the queue, through the same router and
    session code as the daemon: L{SMTPClient.send} on a client shared by
    calls with the same reactor and settings (L{default_clients}).

    @param sender: the envelope sender; C{""}/L{None} for the null sender.
    @param recipients: an iterable of addresses (a C{str} is one recipient).
    @param message: C{bytes}, C{str} or C{email.message.Message}; Message-ID
        and Date are added when missing.
    @param reactor: the reactor; the global one when L{None}.
    @param linger: seconds idle connections stay open after the last call in
        flight finishes, for later calls with the same settings. Calls in
        flight at the same time with the same settings always share
        connections (and DNS answers); with C{0} everything is closed when
        none is in flight. See L{close_connections}.
    @param settings: the keyword arguments of L{SMTPClient}: C{relay},
        C{resolver}, C{mx_port}, C{helo}, C{tls}, C{cafile}, C{tls_match},
        C{tls_policy}, C{auth}, C{auth_plaintext}, C{timeout},
        C{connections}, C{dnssec_resolver}, C{mta_sts}, C{dkim},
        C{dkim_required}. A C{dkim} key table path is read when the shared
        client is made, on the calling (reactor) thread, so with C{linger=0}
        on every call: load a L{Signer} once at start-up
        (C{Signer(KeyTable.load(path))}) and pass that instead.
    @return: a Deferred firing with a L{DeliveryReport}. It fails only for
        bad arguments (L{AddressError}, C{MessageError}, C{ValueError}); a
        refused or unreachable recipient is a result, not a failure.
    """
    return default_clients.sendmail(sender, recipients, message, reactor=reactor,
                                    linger=linger, **settings)


def close_connections() -> defer.Deferred[None]:
    """Close the connections that L{sendmail} keeps open for C{linger}
    (L{ClientRegistry.close_idle} of L{default_clients}).

    @return: a Deferred firing (with L{None}) once they are closed.
    """
    return default_clients.close_idle()
