"""Connections to next hops: host fallback, limits, reuse.

L{Connector.deliver} is the one operation both the queue's scheduler and the
programmatic C{sendmail()} use: route the destination, get a ready session
(an idle one for the same destination, or a new connection trying each host
and address in order), run one transaction, and give the session back for
reuse.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from twisted_mailout.envelope import Reply
from twisted_mailout.routing.router import NextHop, RouteError
from twisted_mailout.smtp.protocol import ESMTPSession, SessionError, Timeouts
from twisted_mailout.tls.creators import name_checking_tls, opportunistic_tls
from twisted_mailout.tls.policy import PolicyTable, TLSPolicy

__all__ = ["Attempt", "Connector", "ConnectorSettings"]

log = Logger()


@dataclass(frozen=True)
class ConnectorSettings:
    """How the connector opens and keeps connections.

    @ivar helo: the EHLO name.
    @ivar tls: the default TLS level (L{tlspolicy.LEVELS}), used when
        C{policy} is L{None}.
    @ivar policy: a L{tlspolicy.PolicyTable} of per-destination levels.
    @ivar trust_root: for C{verify}/C{secure}: from L{session.load_trust_root}.
    @ivar credentials: L{auth.Credentials} for AUTH at the relay, or L{None}.
    @ivar tls_fallback_memory: seconds a host whose handshake failed under
        C{may} is sent plaintext without trying TLS (0: never fall back).
    @ivar dane: a L{dane.DNSSECResolver} (validating) enabling DANE for MX
        delivery at the C{may}, C{dane} and C{dane-only} levels, or L{None}.
    @ivar mta_sts: an L{mtasts.MTASTS} applying MTA-STS policies to MX
        delivery at the C{may} and C{dane} levels, or L{None}.
    @ivar timeouts: per-command L{Timeouts}.
    @ivar max_connections: open connections at most, all destinations.
    @ivar max_per_destination: open connections at most to one destination.
    @ivar idle_timeout: seconds an idle connection is kept for reuse.
    @ivar max_age: seconds after which a connection is not reused.
    @ivar max_messages: transactions per connection at most.
    @ivar failure_memory: seconds a destination whose every host failed is
        not tried again (its mail is deferred at once).
    @ivar pipelining: use PIPELINING when offered.
    """

    helo: str = "localhost"
    tls: str = "may"
    trust_root: object = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: int = 20
    max_per_destination: int = 4
    idle_timeout: float = 2.0
    max_age: float = 300.0
    max_messages: int = 100
    failure_memory: float = 60.0
    pipelining: bool = True
    policy: PolicyTable | None = None
    credentials: object = None
    tls_fallback_memory: float = 3600.0
    dane: object = None
    mta_sts: object = None


@dataclass
class Attempt:
    """The outcome of one delivery attempt to one destination.

    @ivar replies: C{{recipient: Reply}} for every recipient given.
    @ivar relay: C{"host[ip]:port"} of the host that gave the replies, or
        L{None} when no host was reached.
    """

    replies: dict[str, Reply]
    relay: str | None


@dataclass(frozen=True)
class _Security:
    """How one host is secured: the session's TLS level, the connection
    creator, where the decision came from (for logs) and the RFC 8460
    policy type to report TLS results under (C{"sts"}, C{"tlsa"}, or
    L{None} when no TLS-RPT policy applies), with the policy's strings and
    MX patterns: C{(policy_type, strings, patterns)}."""

    level: str
    creator: object
    source: str
    report: tuple | None


def _tlsrpt(report, domain, mx_host, addr, result_type, detail):
    """Log one TLS session result in RFC 8460 terms (see L{tlsrpt});
    C{result_type} L{None} is a success. Never raises: reporting must not
    break delivery.

    @param report: C{(policy_type, policy_strings, mx_patterns)}.
    """
    from twisted_mailout.tls import tlsrpt

    policy_type, strings, patterns = report
    try:
        if result_type is None:
            tlsrpt.log_success(policy_type, domain, policy_string=list(strings),
                               mx_host=list(patterns))
        else:
            if result_type not in tlsrpt.RESULT_TYPES:
                result_type = "validation-failure"
            tlsrpt.log_failure(policy_type, domain, result_type,
                               policy_string=list(strings), mx_host=list(patterns),
                               receiving_mx_hostname=mx_host, receiving_ip=addr,
                               failure_reason_code=detail)
    except Exception:  # noqa: BLE001
        log.failure("cannot log a TLS-RPT result for {domain}", domain=domain)


class _Dest:
    def __init__(self, key: str):
        self.key = key
        self.conns = 0
        self.idle: list = []  # (session, timer)
        self.waiters: deque = deque()
        self.failed_until = 0.0
        self.failed_reply: Reply | None = None


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, make):
        self._make = make

    def buildProtocol(self, addr):
        return self._make()


class Connector:
    """Delivers transactions to destinations over pooled connections.

    @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @param router: an L{MXRouter} or L{RelayRouter}.
    @param settings: L{ConnectorSettings}.
    @param connect: optional C{callable(addr, port, factory) -> Deferred}
        replacing TCP endpoints (tests).
    """

    def __init__(self, reactor, router, settings: ConnectorSettings, connect=None):
        self.reactor = reactor
        self.router = router
        self.settings = settings
        self._connect = connect or self._tcp_connect
        self._dests: dict[str, _Dest] = {}
        self._total = 0
        self._blocked: deque = deque()  # dests with waiters blocked by the global limit
        self._closing = False
        self.policy = (settings.policy if settings.policy is not None
                       else PolicyTable(TLSPolicy(settings.tls)))
        self._plaintext_until: dict[tuple[str, str, int], float] = {}

    # -- public -------------------------------------------------------------

    def deliver(self, dest: str, sender: str, recipients: list[str], open_source,
                size: int | None = None, smtputf8: bool = False,
                eightbit: bool = False) -> defer.Deferred:
        """Deliver one message to the recipients of one destination.

        @param dest: the destination key: an A-label domain (routed by MX) or
            any key when routing to a relay.
        @param sender: MAIL FROM address (validated), C{""} for null.
        @param recipients: RCPT TO addresses (validated), all for C{dest}.
        @param open_source: C{callable() -> binary file} giving the message
            bytes; called once per transaction, the file closed afterwards.
        @param size: message size in bytes for SIZE, or L{None}.
        @param smtputf8: the envelope needs SMTPUTF8.
        @param eightbit: the message has 8-bit bytes (BODY=8BITMIME).
        @return: Deferred firing with an L{Attempt}; it does not fail for
            network, DNS or server trouble, which become replies. Recipients
            refused with 452 (too many recipients) while others were accepted
            are sent at once in a further transaction (RFC 5321 4.5.3.1.10).
        """
        return defer.Deferred.fromCoroutine(
            self._deliver(dest, sender, recipients, open_source, size, smtputf8, eightbit))

    async def _deliver(self, dest, sender, recipients, open_source, size, smtputf8, eightbit):
        replies: dict[str, Reply] = {}
        relay = None
        remaining = list(recipients)
        while remaining:
            try:
                session = await self._acquire(dest)
            except (RouteError, SessionError) as e:
                replies.update((r, e.reply) for r in remaining)
                break
            relay = session.relay_label
            try:
                source = open_source()
            except OSError as e:
                self._release(dest, session, session.usable)
                r = Reply(451, f"4.3.0 cannot read the queued message: {e.strerror}", local=True)
                replies.update((rc, r) for rc in remaining)
                break
            try:
                result = await session.transaction(sender, remaining, source, size, smtputf8,
                                                   eightbit)
            finally:
                source.close()
            self._release(dest, session, result.session_usable)
            replies.update(result.replies)
            # RFC 5321 4.5.3.1.10: "452 too many recipients" asks for the rest
            # in another transaction, at once; go on while each one makes progress.
            more = [r for r in remaining if result.replies[r].code == 452]
            if not more or len(more) == len(remaining) or not any(
                    result.replies[r].is_positive for r in remaining):
                break
            remaining = more
        return Attempt(replies, relay)

    def close(self, timeout: float = 10.0) -> defer.Deferred:
        """QUIT idle connections and stop reusing any. Busy connections are
        left to finish their transaction and are then closed.

        @return: Deferred firing (with L{None}) when idle ones are closed.
        """
        self._closing = True
        ds = []
        for dest in self._dests.values():
            for session, timer in dest.idle:
                if timer.active():
                    timer.cancel()
                ds.append(session.quit())
            dest.idle = []
            while dest.waiters:
                dest.waiters.popleft().errback(SessionError(
                    Reply(421, "4.3.2 mail service shutting down", local=True), "shutdown"))
        return defer.DeferredList(ds).addCallback(lambda _: None)

    # -- acquiring sessions ---------------------------------------------------

    def _dest(self, key: str) -> _Dest:
        d = self._dests.get(key)
        if d is None:
            d = self._dests[key] = _Dest(key)
        return d

    def _acquire(self, key: str) -> defer.Deferred:
        dest = self._dest(key)
        now = self.reactor.seconds()
        if dest.failed_until > now and dest.failed_reply is not None:
            return defer.fail(SessionError(dest.failed_reply, "remembered"))
        s = self.settings
        if self._closing:
            return defer.fail(SessionError(
                Reply(421, "4.3.2 mail service shutting down", local=True), "shutdown"))
        while dest.idle:
            session, timer = dest.idle.pop()
            if timer.active():
                timer.cancel()
            if self._reusable(session):
                return defer.succeed(session)
            session.quit()
        if dest.conns < s.max_per_destination:
            if self._total >= s.max_connections:
                self._close_one_idle()
            if self._total < s.max_connections:
                return defer.Deferred.fromCoroutine(self._open(dest))
            self._blocked.append(dest)
        d = defer.Deferred()
        dest.waiters.append(d)
        return d

    def _reusable(self, session) -> bool:
        s = self.settings
        return (session.usable and not self._closing
                and session.transactions < s.max_messages
                and self.reactor.seconds() - session.created < s.max_age)

    def _close_one_idle(self):
        oldest = None
        for dest in self._dests.values():
            for item in dest.idle:
                if oldest is None or item[0].created < oldest[1][0].created:
                    oldest = (dest, item)
        if oldest is not None:
            dest, (session, timer) = oldest
            dest.idle.remove((session, timer))
            if timer.active():
                timer.cancel()
            session.quit()
            # The slot is counted free only once the connection is closed;
            # count it now so the caller can open its connection.
            session.counted = False
            dest.conns -= 1
            self._total -= 1

    def _release(self, key: str, session, usable: bool):
        dest = self._dest(key)
        if usable and self._reusable(session):
            if dest.waiters:
                dest.waiters.popleft().callback(session)
                return
            if self._someone_blocked():
                # Other destinations wait for a slot under the global limit:
                # give this one up now rather than keep it idle.
                self._give_up(dest, session)
                return
            timer = self.reactor.callLater(self.settings.idle_timeout, self._idle_expired,
                                           dest, session)
            dest.idle.append((session, timer))
            return
        session.quit()

    def _someone_blocked(self) -> bool:
        """Whether another destination waits for a slot (global limit);
        forgets destinations whose waiters were served meanwhile."""
        while self._blocked and not self._blocked[0].waiters:
            self._blocked.popleft()
        return any(d.waiters for d in self._blocked)

    def _give_up(self, dest: _Dest, session):
        """QUIT C{session} and count its slot free at once (its close,
        later, does not count again), starting a blocked waiter."""
        session.quit()
        if getattr(session, "counted", True):
            session.counted = False
            dest.conns -= 1
            self._total -= 1
        self._slot_freed(None)

    def _idle_expired(self, dest: _Dest, session):
        for item in list(dest.idle):
            if item[0] is session:
                dest.idle.remove(item)
        session.quit()

    def _closed(self, dest: _Dest, session):
        if getattr(session, "counted", True):
            session.counted = False
            dest.conns -= 1
            self._total -= 1
        for item in list(dest.idle):
            if item[0] is session:
                if item[1].active():
                    item[1].cancel()
                dest.idle.remove(item)
        self._slot_freed(dest)

    def _slot_freed(self, dest: _Dest | None):
        """A connection closed: start a waiter, same destination first."""
        s = self.settings
        candidates = ([dest] if dest is not None else []) + list(self._blocked)
        for cand in candidates:
            if self._total >= s.max_connections:
                return
            if cand.waiters and cand.conns < s.max_per_destination:
                waiter = cand.waiters.popleft()
                if cand in self._blocked and not cand.waiters:
                    self._blocked.remove(cand)
                defer.Deferred.fromCoroutine(self._open(cand)).chainDeferred(waiter)
                return

    async def _open(self, dest: _Dest):
        dest.conns += 1
        self._total += 1
        try:
            session = await self._open_any_host(dest.key)
        except BaseException as e:
            dest.conns -= 1
            self._total -= 1
            reply = getattr(e, "reply", None)
            if reply is not None and self.settings.failure_memory > 0:
                dest.failed_until = self.reactor.seconds() + self.settings.failure_memory
                dest.failed_reply = reply
            # Waiters for a destination that cannot be reached fail too.
            while dest.waiters:
                dest.waiters.popleft().errback(e)
            self._slot_freed(None)
            raise
        dest.failed_until = 0.0
        dest.failed_reply = None
        session.closed.addBoth(lambda _: self._closed(dest, session))
        return session

    async def _open_any_host(self, key: str):
        hops: list[NextHop] = await self.router.route(key)
        relay = getattr(self.router, "relay", False)
        domain = None if relay else key
        policy = self.policy.lookup(self.router.name if relay else key)
        last: Reply | None = None
        tried = []
        # DANE (RFC 7672) and MTA-STS (RFC 8461) raise opportunistic levels
        # for MX delivery; an explicit verify/secure/encrypt/none stands.
        mx_secure = False
        use_dane = (self.settings.dane is not None and not relay
                    and policy.level in ("may", "dane", "dane-only"))
        if use_dane:
            mx_secure = await self._mx_secure(key, policy)
        elif policy.level == "dane-only":
            raise SessionError(Reply(451, f"4.7.5 TLS level dane-only for {key} needs a "
                                     "validating resolver (--dnssec-resolver)", local=True),
                               "dane")
        sts = None
        if (self.settings.mta_sts is not None and not relay
                and policy.level in ("may", "dane")):
            sts = await self.settings.mta_sts.policy_for(key)
            if sts is not None and sts.mode == "none":
                sts = None
        seen: set[tuple] = set()
        for hop in hops:
            try:
                security = await self._hop_security(hop, policy, domain, mx_secure, sts)
            except SessionError as e:
                last = e.reply
                tried.append(f"{hop.host}: {e.reply.one_line()}")
                log.info("{host}: {reason}; trying the next host", host=hop.host,
                         reason=e.reply.one_line())
                continue
            try:
                addrs = await self.router.addresses(hop)
            except RouteError as e:
                if e.reply.is_permanent and hop.implicit:
                    raise
                last = e.reply
                tried.append(f"{hop.host}: {e.reply.text}")
                continue
            for addr in addrs:
                # Another MX name for an address already tried is skipped,
                # unless its own DANE/MTA-STS rules make it a different try.
                tag = (addr, hop.port, hop.host if security.report else None)
                if tag in seen:
                    continue
                seen.add(tag)
                label = f"{hop.host}[{addr}]:{hop.port}"
                try:
                    session = await self._connect_secured(hop, addr, security, domain)
                except SessionError as e:
                    if e.stage in ("tls", "starttls") and security.report is not None:
                        _tlsrpt(security.report, key, hop.host, addr,
                                e.tls_failure or ("starttls-not-supported"
                                                  if e.stage == "starttls"
                                                  else "validation-failure"),
                                e.reply.one_line())
                    last = e.reply
                    tried.append(f"{label}: {e.reply.one_line()}")
                    log.info("{label}: {reason}; trying the next host", label=label,
                             reason=e.reply.one_line())
                    continue
                if security.report is not None:
                    result, detail = None, None
                    if security.source == "mta-sts testing":
                        # Delivery goes on whatever the certificate (RFC 8461
                        # 5, testing); what enforce would refuse is reported.
                        result, detail = self._diagnose(session, hop.host)
                    _tlsrpt(security.report, key, hop.host, addr, result, detail)
                session.relay_label = label
                return session
        if last is None:
            last = Reply(451, f"4.4.4 no host to try for {key}", local=True)
        many = "" if len(tried) <= 1 else f" (all {len(tried)} hosts failed)"
        if last.is_transient:
            reply = Reply(last.code, last.text + many, local=last.local)
        else:
            # A host that refuses the session (554 greeting, EHLO and HELO
            # refused) is not a verdict on the recipients: try again later.
            reply = Reply(451, f"4.4.0 session refused: {last.one_line()}{many}", local=True)
        raise SessionError(reply, "connect")

    def _diagnose(self, session, host: str) -> tuple[str | None, str | None]:
        """What an MTA-STS enforce policy would have said of an established
        session: C{(result_type, detail)}, or C{(None, None)} when fine."""
        from twisted_mailout.tls import tlsrpt

        if not session.encrypted:
            return "starttls-not-supported", f"{host} did not offer STARTTLS"
        try:
            result = tlsrpt.diagnose_peer(session.transport, host, self.settings.trust_root)
        except Exception as e:  # noqa: BLE001 - reporting never breaks delivery
            return "validation-failure", f"cannot check the certificate: {e}"
        return (result, f"certificate of {host}: {result}") if result else (None, None)

    async def _mx_secure(self, key: str, policy: TLSPolicy) -> bool:
        """Whether the MX RRset of C{key} (or its secure absence) validated."""
        from twisted_mailout.tls.dane import DNSSECLookupError

        try:
            lookup = await self.settings.dane.mx(key)
        except DNSSECLookupError as e:
            # A bogus MX RRset is an attack or a broken zone: never fall back.
            raise SessionError(Reply(451, f"4.7.5 DNSSEC validation of the MX records of "
                                     f"{key} failed: {e}", local=True), "dane") from None
        if policy.level == "dane-only" and not lookup.secure:
            raise SessionError(Reply(451, f"4.7.5 TLS level dane-only but the MX records of "
                                     f"{key} are not DNSSEC-signed", local=True), "dane")
        return lookup.secure

    async def _hop_security(self, hop: NextHop, policy: TLSPolicy, domain: str | None,
                            mx_secure: bool, sts) -> _Security:
        """The TLS level and connection creator for one host."""
        if mx_secure:
            from twisted_mailout.tls import dane

            try:
                dp = await dane.host_policy(self.settings.dane, hop.host, port=hop.port,
                                            mx_secure=True, domain=domain)
            except dane.DNSSECLookupError as e:
                _tlsrpt(("tlsa", (), ()), domain, hop.host, None, "dnssec-invalid", str(e))
                raise SessionError(Reply(451, f"4.7.5 DNSSEC lookup for {hop.host} failed: {e}",
                                         local=True), "dane") from None
            report = ("tlsa", tuple(str(r) for r in dp.tlsa), ())
            if dp.mode == "dane":
                return _Security("dane-only", dp.tls_creator(hop.host), "dane", report)
            if dp.mode == "encrypt":
                return _Security("encrypt", opportunistic_tls(hop.host), "dane", report)
            if policy.level == "dane-only":
                raise SessionError(Reply(451, f"4.7.5 TLS level dane-only but {hop.host} has "
                                         f"no usable DANE TLSA records ({dp.reason})",
                                         local=True), "dane")
        if sts is not None:
            if sts.mode == "enforce" and not sts.matches(hop.host):
                # RFC 8461 4.1: never connected to (DANE, above, would win).
                _tlsrpt(("sts", sts.lines(), sts.mx), domain, hop.host, None,
                        "validation-failure", f"MX host {hop.host} does not match the policy")
                raise SessionError(Reply(451, f"4.7.5 {hop.host} is not an MX host of the "
                                         f"MTA-STS policy of {domain} (enforce; mx: "
                                         f"{', '.join(sts.mx)})", local=True), "mta-sts")
            if sts.mode == "enforce":
                return _Security("verify", name_checking_tls(hop.host, (hop.host.lower(),),
                                                             self.settings.trust_root),
                                 "mta-sts", ("sts", sts.lines(), sts.mx))
            return _Security("may", opportunistic_tls(hop.host), "mta-sts testing",
                             ("sts", sts.lines(), sts.mx))
        level = "may" if policy.level == "dane" else policy.level
        return _Security(level, self._creator(policy, domain, hop), policy.source, None)

    def _creator(self, policy: TLSPolicy, domain: str | None, hop: NextHop):
        """The TLS connection creator for C{hop} under C{policy}."""
        if policy.level in ("verify", "secure"):
            return name_checking_tls(hop.host, policy.names_for(domain, hop.host),
                                     self.settings.trust_root)
        return opportunistic_tls(hop.host)

    async def _connect_secured(self, hop: NextHop, addr: str, security: _Security,
                               domain: str | None):
        """Connect under C{security}; under C{may}, a host whose TLS handshake
        fails is tried again at once in plaintext, and sent plaintext for
        C{tls_fallback_memory} seconds (Postfix does the same)."""
        level = security.level
        implicit = getattr(self.router, "implicit_tls", False)
        opportunistic = level == "may" and not implicit
        memo = (hop.host, addr, hop.port)
        now = self.reactor.seconds()
        if opportunistic and self._plaintext_until.get(memo, 0) > now:
            level = "none"
        try:
            return await self._connect_one(hop, addr, level, security.creator, implicit)
        except SessionError as e:
            if not (opportunistic and level != "none" and e.stage == "tls"
                    and self.settings.tls_fallback_memory > 0):
                raise
            log.warn("{host}[{addr}]:{port}: {why}; sending in plaintext (TLS level may) and "
                     "not trying TLS with it for {memory:g}s", host=hop.host, addr=addr,
                     port=hop.port, why=e.reply.one_line(),
                     memory=self.settings.tls_fallback_memory)
            self._plaintext_until[memo] = now + self.settings.tls_fallback_memory
            return await self._connect_one(hop, addr, "none", None, False)

    async def _connect_one(self, hop: NextHop, addr: str, level: str, creator,
                           implicit: bool = False):
        s = self.settings
        session = ESMTPSession(
            helo=s.helo, clock=self.reactor, tls=level,
            tls_creator=(lambda _host: creator) if creator is not None else None,
            hostname=hop.host, timeouts=s.timeouts, pipelining=s.pipelining,
            implicit_tls=implicit,
            credentials=s.credentials if getattr(self.router, "relay", False) else None)
        factory = _Factory(lambda: session)
        if implicit:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(creator or opportunistic_tls(hop.host), True, factory)
            factory.noisy = False
        try:
            await self._connect(addr, hop.port, factory)
        except Exception as e:  # noqa: BLE001 - every connect failure becomes a reply
            raise SessionError(Reply(421, f"4.4.1 connect to {hop.host}[{addr}]:{hop.port}: "
                                     f"{_conn_error(e)}", local=True), "connect") from None
        return await session.ready

    def _tcp_connect(self, addr: str, port: int, factory):
        timeout = self.settings.timeouts.connect
        if ":" in addr:
            ep = endpoints.TCP6ClientEndpoint(self.reactor, addr, port, timeout=timeout)
        else:
            ep = endpoints.TCP4ClientEndpoint(self.reactor, addr, port, timeout=timeout)
        return ep.connect(factory)


def _conn_error(e: Exception) -> str:
    from twisted.internet import error

    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TCPTimedOutError, error.TimeoutError)):
        return "connection timed out"
    if isinstance(e, error.NoRouteError):
        return "no route to host"
    return str(e) or e.__class__.__name__
