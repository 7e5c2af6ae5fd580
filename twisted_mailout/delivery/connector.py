"""Delivering one transaction to one destination: hosts, addresses, TLS, 452.

L{Connector.deliver} is the one operation both the queue's scheduler and the
programmatic C{sendmail()} use: get a ready session from the
L{ConnectionPool} (an idle one for the same destination, or a new
connection), run one transaction, and give the session back for reuse.

A new connection is opened by trying the destination's next hops (from the
L{IRouter}) in order, and each host's addresses in order, under the TLS
level and server check that L{SecurityResolver} decides per host (the
policy table, DANE, MTA-STS); the first host that completes the greeting,
EHLO and STARTTLS gets the transaction (RFC 5321 5.1).

Cancelling the Deferred of L{Connector.deliver} stops the delivery wherever
it is: a caller waiting for a connection leaves the queue, a connection
being opened is abandoned, a transaction in progress is aborted (the
connection is dropped at once, so the server never sees the end of the
data and does not take the message); the connection slot is free at once,
and one line is logged.

Two event streams are a contract for observers such as the daemon's metrics
(L{twisted_mailout.daemon.metrics}); their fields are stable:

  - namespace L{DNS_NAMESPACE} (C{twisted_mailout.dns}), one event per
    failed lookup that routing reported as a L{RouteError} (the MX lookup of
    a destination, or the address lookup of one of its hosts): C{kind} (one
    of L{DNS_FAILURE_KINDS}), C{destination}, C{host} (L{None} for the MX
    lookup), C{lookup} (C{"mx"} or C{"address"}), C{code}, C{reply} (the
    local reply, one line). Level C{info}.
  - namespace L{SESSION_NAMESPACE} (C{twisted_mailout.session}), one event
    per connection that reached the TLS decision (it completed EHLO and
    STARTTLS, or failed at STARTTLS or at the TLS handshake): C{host} (the
    host name), C{relay} (C{"host[ip]:port"}), C{tls_level} (the TLS level
    it ran under, L{twisted_mailout.tls.levels.LEVELS}; C{"none"} after the
    C{may} fallback to plaintext; not C{level}, which C{twisted.logger}
    reserves), C{tls} (the protocol version, e.g.
    C{"TLSv1.3"}, C{"TLS"} when encrypted but the version is unknown,
    L{None} in plaintext) and C{result}: C{"tls"}, C{"plaintext"}, or the
    RFC 8460 (4.3.1) result type of the failure
    (L{twisted_mailout.tls.tlsrpt.RESULT_TYPES}). Level C{info} (a failed
    host is also logged, as before, where the next host is tried).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mailout.delivery.pool import (
    ConnectionPool,
    DestinationDown,
    Opened,
    PoolClosed,
    PoolLimits,
)
from twisted_mailout.delivery.shaping import Shape, Shaper
from twisted_mailout.envelope import Reply
from twisted_mailout.routing.dnssec import DNSSECResolver
from twisted_mailout.routing.resolver import tcp_endpoint
from twisted_mailout.routing.router import IRouter, NextHop, RouteError
from twisted_mailout.smtp.auth import Credentials
from twisted_mailout.smtp.errors import Stage
from twisted_mailout.smtp.protocol import ESMTPSession, SessionError, Timeouts
from twisted_mailout.tls.creators import opportunistic_tls
from twisted_mailout.tls.mtasts import MTASTS
from twisted_mailout.tls.policy import PolicyTable, TLSPolicy
from twisted_mailout.tls.resolve import (
    HostSecurity,
    SecurityRefused,
    SecurityResolver,
    TLSResult,
)

__all__ = [
    "DNS_FAILURE_KINDS",
    "DNS_NAMESPACE",
    "SESSION_NAMESPACE",
    "Attempt",
    "Connector",
    "ConnectorSettings",
    "dns_failure_kind",
    "tls_version",
]

log = Logger()

#: Namespace of the one event per failed DNS lookup (module docstring).
DNS_NAMESPACE = "twisted_mailout.dns"
#: Namespace of the one event per connection's TLS outcome (module docstring).
SESSION_NAMESPACE = "twisted_mailout.session"
#: The C{kind} values of DNS failure events (L{dns_failure_kind}).
DNS_FAILURE_KINDS: tuple[str, ...] = ("nxdomain", "servfail", "timeout", "refused",
                                      "null_mx", "no_address", "other")

dns_log = Logger(namespace=DNS_NAMESPACE)
session_log = Logger(namespace=SESSION_NAMESPACE)

_T = TypeVar("_T")


@dataclass(frozen=True)
class ConnectorSettings:
    """How the connector opens and keeps connections; times in seconds.

    @ivar helo: the EHLO name.
    @ivar tls: the default TLS level (L{twisted_mailout.tls.levels.LEVELS}),
        used when C{policy} is L{None}.
    @ivar policy: a L{PolicyTable} of per-destination levels, or L{None}.
    @ivar trust_root: for C{verify}/C{secure} and MTA-STS: from
        L{twisted_mailout.tls.creators.load_trust_root}; L{None} for the
        platform's.
    @ivar credentials: L{Credentials} for AUTH at the relay, or L{None}.
    @ivar tls_fallback_memory: seconds a host whose handshake failed under
        C{may} is sent plaintext without trying TLS (0: never fall back).
    @ivar dane: a validating L{DNSSECResolver} enabling DANE for MX delivery
        at the C{may}, C{dane} and C{dane-only} levels, or L{None}.
    @ivar mta_sts: an L{MTASTS} applying MTA-STS policies to MX delivery at
        the C{may} and C{dane} levels, or L{None}.
    @ivar timeouts: per-command L{Timeouts} (RFC 5321 4.5.3.2).
    @ivar max_connections: open connections at most, all destinations.
    @ivar max_per_destination: open connections at most to one destination.
    @ivar idle_timeout: seconds an idle connection is kept for reuse.
    @ivar max_age: seconds after which a connection is not reused.
    @ivar max_messages: transactions per connection at most.
    @ivar failure_memory: seconds a destination whose every host failed is
        not tried again (its mail is deferred at once).
    @ivar pipelining: use PIPELINING (RFC 2920) when offered.
    @ivar source_addresses: local addresses to connect from, at most one
        IPv4 and one IPv6 (each connection uses the one of its
        destination's family; none: the system's choice).
    @ivar slow_start: connections a destination may have before one of them
        has carried a quick transaction, widened by one per transaction
        that ends within C{slow_transaction} seconds, narrowed back by a
        slower one while other destinations wait for a slot (L{PoolLimits});
        L{None}: its whole limit from the start.
    @ivar slow_transaction: seconds beyond which a transaction is slow.
    @ivar chunking: send BDAT (RFC 3030) when a server offers CHUNKING.
    """

    helo: str = "localhost"
    tls: str = "may"
    trust_root: Any = None  # an IOpenSSLTrustRoot
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: int = 20
    max_per_destination: int = 4
    idle_timeout: float = 2.0
    max_age: float = 300.0
    max_messages: int = 100
    failure_memory: float = 60.0
    pipelining: bool = True
    policy: PolicyTable | None = None
    credentials: Credentials | None = None
    tls_fallback_memory: float = 3600.0
    dane: DNSSECResolver | None = None
    mta_sts: MTASTS | None = None
    source_addresses: tuple[str, ...] = ()
    slow_start: int | None = 1
    slow_transaction: float = 2.0
    chunking: bool = True

    def pool_limits(self) -> PoolLimits:
        """The connection pool's share of these settings."""
        return PoolLimits(max_connections=self.max_connections,
                          max_per_destination=self.max_per_destination,
                          idle_timeout=self.idle_timeout, max_age=self.max_age,
                          max_messages=self.max_messages,
                          failure_memory=self.failure_memory,
                          slow_start=self.slow_start,
                          slow_transaction=self.slow_transaction)


@dataclass
class Attempt:
    """The outcome of one delivery attempt to one destination.

    @ivar replies: C{{recipient: Reply}} for every recipient given.
    @ivar relay: C{"host[ip]:port"} of the host that gave the replies, or
        L{None} when no host was reached.
    @ivar tls: how that session was protected: the TLS protocol version
        (L{tls_version}, e.g. C{"TLSv1.3"}), or L{None} for plaintext or
        when no host was reached.
    @ivar untried: recipients not tried because their destination was
        suspended while they waited (L{Connector.hold}); they have no reply.
    """

    replies: dict[str, Reply]
    relay: str | None
    tls: str | None = None
    untried: list[str] = field(default_factory=list)


def _shutting_down() -> Reply:
    return Reply(421, "4.3.2 mail service shutting down", local=True)


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, session: ESMTPSession):
        self._session = session

    def buildProtocol(self, addr: IAddress | None) -> ESMTPSession:
        return self._session


class _Opening:
    """One connection being opened; C{cancelled} once its caller withdrew."""

    def __init__(self) -> None:
        self.cancelled = False
        self.inner: defer.Deferred[Any] | None = None

    def check(self) -> None:
        """Stop here if the caller withdrew (each await may have been the
        one cancelled and turned the cancellation into an ordinary error)."""
        if self.cancelled:
            raise defer.CancelledError()


def _own(d: defer.Deferred[_T]) -> defer.Deferred[_T]:
    """A fresh Deferred with C{d}'s result, so that cancelling the wait does
    not fire C{d} itself (C{d} belongs to the session). C{d}'s result is
    consumed: this must be its only consumer."""
    out: defer.Deferred[_T] = defer.Deferred()

    def copy(result: object) -> None:
        if out.called:
            return  # the wait was cancelled; the result is not wanted
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)  # type: ignore[arg-type]

    d.addBoth(copy)
    return out


class Connector:
    """Delivers transactions to destinations over pooled connections.

    @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @param router: an L{IRouter} (L{MXRouter} or L{RelayRouter}).
    @param settings: L{ConnectorSettings}.
    @ivar pool: the L{ConnectionPool} of sessions (its counts are public:
        C{open_connections}, C{connections_to(key)}, C{idle_to(key)},
        C{waiting_for(key)}).
    @ivar security: the L{SecurityResolver} deciding each host's TLS level.
    @ivar shaper: the L{Shaper} of traffic shaping (C{--shaping}), or L{None}.
        With one, each destination is classified (its MX hosts decide its
        provider) before its first delivery, and its settings apply: the
        connection limit (its own, or its provider's across all the
        provider's domains), transactions per connection, recipients per
        transaction, message and connection rates (a rate delays, never
        defers), the TLS level where the policy table has no entry, and the
        source address and EHLO name.
    """

    def __init__(self, reactor: Any, router: IRouter, settings: ConnectorSettings,
                 shaper: Shaper | None = None):
        self.reactor = reactor
        # Any: mypy cannot see zope interfaces' methods (no mypy-zope plugin).
        self.router: Any = router
        self.settings = settings
        self.policy = (settings.policy if settings.policy is not None
                       else PolicyTable(TLSPolicy(settings.tls)))
        self.security = SecurityResolver(self.policy, settings.trust_root,
                                         dane=settings.dane, mta_sts=settings.mta_sts)
        self.pool: ConnectionPool[ESMTPSession] = ConnectionPool(
            reactor, self._opener, settings.pool_limits(),
            remember=(SessionError, RouteError))
        self._plaintext_until: dict[tuple[str, str, int], float] = {}
        self.shaper = shaper
        self._applied: dict[str, Shape] = {}
        #: C{hold(dest) -> bool}: whether C{dest} is suspended now (the
        #: scheduler sets it); a delivery that waited for its rate slot or a
        #: connection checks it before its transaction, and leaves its
        #: recipients untried when a suspension began meanwhile.
        self.hold: Callable[[str], bool] | None = None

    # -- public -------------------------------------------------------------

    def deliver(self, dest: str, sender: str, recipients: list[str],
                open_source: Callable[[], IO[bytes]], size: int | None = None,
                smtputf8: bool = False, eightbit: bool = False,
                paced: bool = False,
                may_finish: Callable[[], bool] | None = None) -> defer.Deferred[Attempt]:
        """Deliver one message to the recipients of one destination.

        @param dest: the destination key: an A-label domain (routed by MX) or
            any key when routing to a relay.
        @param sender: MAIL FROM address (validated), C{""} for null.
        @param recipients: RCPT TO addresses (validated), all for C{dest}.
        @param open_source: C{callable() -> binary file} giving the message
            bytes; called once per transaction, the file closed afterwards.
        @param size: message size in bytes for SIZE (RFC 1870), or L{None}.
        @param smtputf8: the envelope needs SMTPUTF8 (RFC 6531).
        @param eightbit: the message has 8-bit bytes (BODY=8BITMIME, RFC 6152).
        @param paced: the caller has already taken the message-rate slot of
            the first transaction (the scheduler does, so that mail waiting
            for its slot does not hold a place in flight); further
            transactions (recipients beyond C{max_recipients_per_message},
            452 continuations) still wait for theirs.
        @param may_finish: asked before each final dot (a shared queue's
            lease guard, L{twisted_mailout.delivery.lease.LeaseGuard}); see
            L{ESMTPSession.transaction}.
        @return: Deferred firing with an L{Attempt}; it does not fail for
            network, DNS or server trouble, which become replies. Recipients
            refused with 452 (too many recipients) while others were accepted
            are sent at once in a further transaction (RFC 5321 4.5.3.1.10).
            Cancelling it aborts the delivery (see the module docstring); it
            then fails with L{defer.CancelledError}, and the recipients'
            outcomes are unknown to the caller: whatever a server had
            accepted before is not reported.
        """
        return defer.Deferred.fromCoroutine(
            self._deliver(dest, sender, recipients, open_source, size, smtputf8, eightbit,
                          paced, may_finish))

    async def _deliver(self, dest: str, sender: str, recipients: list[str],
                       open_source: Callable[[], IO[bytes]], size: int | None,
                       smtputf8: bool, eightbit: bool, paced: bool = False,
                       may_finish: Callable[[], bool] | None = None) -> Attempt:
        replies: dict[str, Reply] = {}
        untried: list[str] = []
        relay = None
        tls = None
        shape = await self.shape(dest) if self.shaper is not None else None
        most = (shape.settings.max_recipients_per_message if shape is not None else None
                ) or len(recipients)
        queue = list(recipients)
        while queue:
            remaining, queue = queue[:most], queue[most:]
            if shape is not None and not paced:
                await self._pace(shape)
            paced = False
            try:
                lease = await self.pool.acquire(dest)
            except DestinationDown as e:
                # The opening failed (now, or within failure_memory seconds):
                # its reply stands for every recipient.
                assert isinstance(e.error, (SessionError, RouteError))
                replies.update((r, e.error.reply) for r in remaining + queue)
                break
            except PoolClosed:
                replies.update((r, _shutting_down()) for r in remaining + queue)
                break
            except defer.CancelledError:
                log.info("{dest}: delivery cancelled before a connection was ready; "
                         "{n} recipients not tried", dest=dest, n=len(remaining) + len(queue))
                raise
            if self.hold is not None and self.hold(dest):
                # suspended (a throttling rule) while this one waited
                self.pool.release(lease, lease.session.usable)
                untried += remaining + queue
                break
            session, relay = lease.session, lease.label
            tls = tls_version(session)
            try:
                source = open_source()
            except OSError as e:
                self.pool.release(lease, session.usable)
                r = Reply(451, f"4.3.0 cannot read the queued message: {e.strerror}",
                          local=True)
                replies.update((rc, r) for rc in remaining + queue)
                break
            try:
                result = await session.transaction(sender, remaining, source, size, smtputf8,
                                                   eightbit, may_finish)
            except BaseException as e:
                # Cancelled (or a bug): the dialogue is in an unknown state;
                # drop the connection so the server never takes the message
                # half-sent, and free its slot now.
                self._abort(session)
                self.pool.discard(lease)
                if isinstance(e, defer.CancelledError):
                    log.info("{dest}: delivery cancelled; connection to {relay} aborted, "
                             "{n} recipients not delivered", dest=dest, relay=relay,
                             n=len(remaining))
                raise
            finally:
                source.close()
            self.pool.release(lease, result.session_usable)
            replies.update(result.replies)
            # RFC 5321 4.5.3.1.10: "452 too many recipients" asks for the rest
            # in another transaction, at once; go on while each one makes progress.
            more = [r for r in remaining if result.replies[r].code == 452]
            if more and len(more) < len(remaining) and any(
                    result.replies[r].is_positive for r in remaining):
                queue = more + queue
        return Attempt(replies, relay, tls, untried)

    def shape(self, dest: str) -> defer.Deferred[Shape]:
        """The traffic shape of C{dest} (classified by its MX hosts on first
        use), with its connection limits given to the pool.

        @param dest: the destination key.
        @return: a Deferred firing with a L{Shape}; it does not fail.
        @raise AssertionError: no shaper.
        """
        assert self.shaper is not None
        cached = self.shaper.cached(dest)
        if cached is not None:
            if self._applied.get(dest) is not cached:
                self._apply(cached)
            return defer.succeed(cached)
        return self.shaper.classify(dest).addCallback(self._apply)

    def _apply(self, shape: Shape) -> Shape:
        s = shape.settings
        if shape.provider is not None and s.connection_limit is not None:
            self.pool.shape(shape.destination, None, shape.key, s.connection_limit,
                            s.max_deliveries_per_connection)
        else:
            self.pool.shape(shape.destination, s.connection_limit if shape.provider is None
                            else None, max_messages=s.max_deliveries_per_connection)
        self._applied[shape.destination] = shape
        return shape

    async def _pace(self, shape: Shape) -> None:
        """Wait for a message-rate slot of C{shape}'s key."""
        assert self.shaper is not None
        now = self.reactor.seconds()
        slot = self.shaper.message_slot(shape, now)
        if slot > now:
            await task.deferLater(self.reactor, slot - now, lambda: None)

    def forget(self, dest: str) -> None:
        """Forget what is cached about destination C{dest} (C{mailout queue
        requeue}, Postfix C{postsuper -r}): its MX and address answers, the
        pool's dead-destination memory and idle connections, the hosts
        remembered as failing TLS, and its MTA-STS TXT check. The next
        delivery to it routes and decides its security afresh.

        @param dest: the destination key (a domain, or the relay's key).
        """
        forget = getattr(self.router, "forget", None)
        hosts = set(forget(dest) if forget is not None else ()) | {dest}
        self.pool.forget(dest)
        if self.shaper is not None:
            self.shaper.forget(dest)
            self._applied.pop(dest, None)
        for memo in [m for m in self._plaintext_until if m[0] in hosts]:
            del self._plaintext_until[memo]
        mta_sts = getattr(self.security, "mta_sts", None)
        if mta_sts is not None:
            mta_sts.forget(dest)

    def close(self) -> defer.Deferred[None]:
        """QUIT idle connections and stop reusing any. Busy connections are
        left to finish their transaction and are then closed; callers
        waiting for a connection get a 421 for their recipients.

        @return: Deferred firing (with L{None}) when idle ones are closed.
        """
        return self.pool.close()

    @staticmethod
    def _abort(session: ESMTPSession) -> None:
        """Drop C{session}'s connection at once (no QUIT, buffered data
        discarded)."""
        transport = session.transport
        if transport is not None:
            transport.abortConnection()

    # -- opening connections ---------------------------------------------------

    def _opener(self, key: str) -> defer.Deferred[Opened[ESMTPSession]]:
        """The pool's opener: a connection to C{key}, cancellable."""
        opening = _Opening()

        def cancel(_d: defer.Deferred[Opened[ESMTPSession]]) -> None:
            opening.cancelled = True
            if opening.inner is not None:
                opening.inner.cancel()

        outer: defer.Deferred[Opened[ESMTPSession]] = defer.Deferred(cancel)
        inner = defer.Deferred.fromCoroutine(self._open_any_host(key, opening))
        opening.inner = inner

        def done(result: object) -> None:
            opening.inner = None
            if outer.called:  # cancelled; the coroutine normally aborted it
                if isinstance(result, Opened):
                    self._abort(result.session)
                return
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)  # type: ignore[arg-type]

        inner.addBoth(done)
        return outer

    async def _open_any_host(self, key: str, opening: _Opening) -> Opened[ESMTPSession]:
        try:
            hops: list[NextHop] = await self.router.route(key)
        except RouteError as e:
            _log_dns_failure(key, None, e)
            raise
        opening.check()
        shape = self.shaper.cached(key) if self.shaper is not None else None
        fallback = None
        if shape is not None:
            now = self.reactor.seconds()
            slot = self.shaper.connection_slot(shape, now)  # type: ignore[union-attr]
            if slot > now:
                await task.deferLater(self.reactor, slot - now, lambda: None)
                opening.check()
            if shape.settings.tls is not None:
                fallback = TLSPolicy(shape.settings.tls, source=f"shaping ({shape.key})")
        relay = self.router.name if self.router.relay else None
        try:
            dsec = await self.security.for_destination(key, relay, fallback)
        except SecurityRefused as e:
            raise SessionError(e.reply, Stage(e.mechanism)) from None
        opening.check()
        last: Reply | None = None
        tried: list[str] = []
        seen: set[tuple[str, int, str | None]] = set()
        for hop in hops:
            try:
                security = await self.security.for_host(dsec, hop)
            except SecurityRefused as e:
                opening.check()
                last = e.reply
                tried.append(f"{hop.host}: {e.reply.one_line()}")
                log.info("{host}: {reason}; trying the next host", host=hop.host,
                         reason=e.reply.one_line())
                continue
            opening.check()
            try:
                addrs = await self.router.addresses(hop)
            except RouteError as e:
                opening.check()
                _log_dns_failure(key, hop.host, e)
                if e.reply.is_permanent and hop.implicit:
                    raise
                last = e.reply
                tried.append(f"{hop.host}: {e.reply.text}")
                continue
            opening.check()
            for addr in addrs:
                # Another MX name for an address already tried is skipped,
                # unless its own DANE/MTA-STS rules make it a different try.
                tag = (addr, hop.port, hop.host if security.report else None)
                if tag in seen:
                    continue
                seen.add(tag)
                label = f"{hop.host}[{addr}]:{hop.port}"
                try:
                    session = await self._connect_secured(hop, addr, security, opening, shape)
                except SessionError as e:
                    if e.stage in (Stage.TLS, Stage.STARTTLS) and security.report is not None:
                        self.security.report(security.report, key, hop.host, addr, TLSResult(
                            e.tls_failure or ("starttls-not-supported" if e.stage == Stage.STARTTLS
                                              else "validation-failure"),
                            e.reply.one_line()))
                    last = e.reply
                    tried.append(f"{label}: {e.reply.one_line()}")
                    log.info("{label}: {reason}; trying the next host", label=label,
                             reason=e.reply.one_line())
                    continue
                if security.report is not None:
                    result = TLSResult()
                    if security.diagnose:
                        # Delivery goes on whatever the certificate (RFC 8461
                        # 5, testing); what enforce would refuse is reported.
                        result = self.security.diagnose(session.encrypted, session.transport,
                                                        hop.host)
                    self.security.report(security.report, key, hop.host, addr, result)
                return Opened(session, label)
        if last is None:
            last = Reply(451, f"4.4.4 no host to try for {key}", local=True)
        many = "" if len(tried) <= 1 else f" (all {len(tried)} hosts failed)"
        if last.is_transient:
            reply = Reply(last.code, last.text + many, local=last.local)
        else:
            # A host that refuses the session (554 greeting, EHLO and HELO
            # refused) is not a verdict on the recipients: try again later.
            reply = Reply(451, f"4.4.0 session refused: {last.one_line()}{many}", local=True)
        raise SessionError(reply, Stage.CONNECT)

    async def _connect_secured(self, hop: NextHop, addr: str, security: HostSecurity,
                               opening: _Opening, shape: Shape | None = None) -> ESMTPSession:
        """Connect under C{security}; under C{may}, a host whose TLS handshake
        fails is tried again at once in plaintext, and sent plaintext for
        C{tls_fallback_memory} seconds (Postfix does the same)."""
        level = security.level
        implicit = self.router.implicit_tls
        opportunistic = level == "may" and not implicit
        memo = (hop.host, addr, hop.port)
        now = self.reactor.seconds()
        if opportunistic and self._plaintext_until.get(memo, 0) > now:
            level = "none"
        try:
            return await self._connect_one(hop, addr, level, security, implicit, opening, shape)
        except SessionError as e:
            if not (opportunistic and level != "none" and e.stage == Stage.TLS
                    and self.settings.tls_fallback_memory > 0):
                raise
            log.warn("{host}[{addr}]:{port}: {why}; sending in plaintext (TLS level may) and "
                     "not trying TLS with it for {memory:g}s", host=hop.host, addr=addr,
                     port=hop.port, why=e.reply.one_line(),
                     memory=self.settings.tls_fallback_memory)
            self._plaintext_until[memo] = now + self.settings.tls_fallback_memory
            return await self._connect_one(hop, addr, "none", None, False, opening, shape)

    async def _connect_one(self, hop: NextHop, addr: str, level: str,
                           security: HostSecurity | None, implicit: bool,
                           opening: _Opening, shape: Shape | None = None) -> ESMTPSession:
        s = self.settings
        creator = security.creator if security is not None else None
        helo = s.helo
        sources = s.source_addresses
        if shape is not None:
            helo = shape.settings.ehlo or helo
            if shape.settings.source_address is not None:
                sources = shape.settings.source_address
        session = ESMTPSession(
            helo=helo, clock=self.reactor, tls=level,
            tls_creator=(lambda _host: creator) if creator is not None else None,
            hostname=hop.host, timeouts=s.timeouts, pipelining=s.pipelining,
            implicit_tls=implicit, chunking=s.chunking,
            credentials=s.credentials if self.router.relay else None)
        label = f"{hop.host}[{addr}]:{hop.port}"
        factory: Any = _Factory(session)
        tls: Any = (creator or opportunistic_tls(hop.host)) if implicit else None
        try:
            await self._tcp_connect(addr, hop.port, factory, tls=tls, sources=sources)
        except (defer.CancelledError, error.ConnectingCancelledError):
            raise defer.CancelledError() from None
        except Exception as e:  # noqa: BLE001 - every connect failure becomes a reply
            opening.check()
            raise SessionError(Reply(421, f"4.4.1 connect to {hop.host}[{addr}]:{hop.port}: "
                                     f"{_conn_error(e)}", local=True), Stage.CONNECT) from None
        try:
            ready = await _own(session.ready)
            opening.check()
        except BaseException as e:
            if opening.cancelled:
                self._abort(session)
                raise defer.CancelledError() from None
            if isinstance(e, SessionError) and e.stage in (Stage.TLS, Stage.STARTTLS):
                result = (e.tls_failure if e.stage == Stage.TLS else "starttls-not-supported")
                _log_session(hop.host, label, level, None, result or "validation-failure")
            raise
        version = tls_version(ready)
        _log_session(hop.host, label, level, version,
                     "plaintext" if version is None else "tls")
        return ready


    def _tcp_connect(self, addr: str, port: int, factory: Any,
                     tls: Any = None, sources: tuple[str, ...] | None = None
                     ) -> defer.Deferred[Any]:
        """Connect to C{addr}:C{port} (an address literal) with C{factory};
        cancelling the Deferred stops the attempt.

        @param tls: for implicit TLS (RFC 8314 "smtps"), the
            C{IOpenSSLClientConnectionCreator} the connection is wrapped with
            (C{wrapClientTLS}, as the MTA-STS fetch does); L{None} for TCP.
        """
        v6 = ":" in addr
        if sources is None:
            sources = self.settings.source_addresses
        source = next((s for s in sources if (":" in s) == v6), None)
        endpoint: Any = tcp_endpoint(self.reactor, addr, port,
                                     timeout=self.settings.timeouts.connect, source=source)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        d: defer.Deferred[Any] = endpoint.connect(factory)
        return d


def tls_version(session: Any) -> str | None:
    """How a session's connection is protected.

    @param session: an L{ESMTPSession} (anything with C{encrypted} and
        C{transport}).
    @return: the negotiated protocol version as OpenSSL names it
        (C{"TLSv1.2"}, C{"TLSv1.3"}), C{"TLS"} when the connection is
        encrypted but the version cannot be read (a transport without a
        pyOpenSSL handle, or a handshake not finished), or L{None} when it is
        not encrypted. Never raises.
    """
    if not getattr(session, "encrypted", False):
        return None
    try:
        name = session.transport.getHandle().get_protocol_version_name()
    except Exception:  # noqa: BLE001 - any transport: the version is optional
        return "TLS"
    return name if isinstance(name, str) and name.startswith("TLS") else "TLS"


def dns_failure_kind(reply: Reply) -> str:
    """Classify the reply routing made of a failed lookup (L{RouteError}'s
    C{reply}, from L{twisted_mailout.routing.router}) for the C{kind} field
    of the DNS failure event.

    @param reply: the local reply.
    @return: one of L{DNS_FAILURE_KINDS}: C{"nxdomain"}, C{"servfail"},
        C{"timeout"}, C{"refused"}, C{"null_mx"} (RFC 7505), C{"no_address"}
        (a host without A/AAAA records) or C{"other"}.
    """
    text = reply.text
    if "null MX" in text:
        return "null_mx"
    if "NXDOMAIN" in text:
        return "nxdomain"
    if "SERVFAIL" in text:
        return "servfail"
    if "timed out" in text:
        return "timeout"
    if "query refused" in text:
        return "refused"
    if "no A/AAAA record" in text or "no MX and no A/AAAA" in text:
        return "no_address"
    return "other"


def _log_dns_failure(destination: str, host: str | None, e: RouteError) -> None:
    """The one event per failed lookup (namespace L{DNS_NAMESPACE})."""
    reply = e.reply
    dns_log.info("{destination}: DNS failure ({kind}) looking up {what}: {reply}",
                 kind=dns_failure_kind(reply), destination=destination, host=host,
                 lookup="mx" if host is None else "address",
                 what=f"the MX of {destination}" if host is None else f"the address of {host}",
                 code=reply.code, reply=reply.one_line())


def _log_session(host: str, relay: str, level: str, tls: str | None,
                 result: str) -> None:
    """The one event per connection's TLS outcome (namespace L{SESSION_NAMESPACE})."""
    if result in ("tls", "plaintext"):
        how = f"{tls} encrypted connection" if tls else "plaintext connection"
    else:
        how = f"TLS failed ({result})"
    session_log.info("{relay}: {how} (TLS level {tls_level})", how=how, host=host,
                     relay=relay, tls_level=level, tls=tls, result=result)


def _conn_error(e: Exception) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TCPTimedOutError, error.TimeoutError)):
        return "connection timed out"
    if isinstance(e, error.NoRouteError):
        return "no route to host"
    return str(e) or e.__class__.__name__
