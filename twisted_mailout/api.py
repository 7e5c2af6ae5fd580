"""The application-facing API: put mail in the queue, or deliver it now."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer

from twisted_mailout.daemon.config import Config
from twisted_mailout.envelope import AddressError, Reply, parse_address, parse_sender
from twisted_mailout.message import coerce_message, prepare_message
from twisted_mailout.queue.store import enqueue
from twisted_mailout.smtp.auth import Credentials
from twisted_mailout.routing.router import parse_relay
from twisted_mailout.tls.levels import LEVELS as TLS_LEVELS

__all__ = ["DeliveryReport", "RecipientResult", "close_connections", "enqueue", "sendmail"]


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome of L{sendmail}.

    @ivar recipient: the address. @ivar status: C{"delivered"}, C{"bounced"}
    (5xx: permanent) or C{"deferred"} (4xx or no server reached: try later).
    @ivar code: the SMTP reply code. @ivar text: the reply text.
    @ivar relay: C{"host[ip]:port"} that answered, or L{None}.
    @ivar local: C{True} when no server gave the reply (DNS, connect, timeout).
    """

    recipient: str
    status: str
    code: int
    text: str
    relay: str | None
    local: bool


@dataclass(frozen=True)
class DeliveryReport:
    """What L{sendmail} did, per recipient, in the order given.

    @ivar results: C{list[RecipientResult]}.
    """

    results: list

    def __getitem__(self, recipient: str) -> RecipientResult:
        for r in self.results:
            if r.recipient == recipient:
                return r
        raise KeyError(recipient)

    def __iter__(self):
        return iter(self.results)

    @property
    def all_delivered(self) -> bool:
        """Every recipient got a 2xx reply."""
        return all(r.status == "delivered" for r in self.results)


def _status(reply: Reply) -> str:
    if reply.is_positive:
        return "delivered"
    return "bounced" if reply.is_permanent else "deferred"


def sendmail(sender, recipients, message, *, relay=None, resolver=None, mx_port=25, helo=None,
             tls="may", cafile=None, reactor=None, timeout=60.0, tls_match=None,
             tls_policy=None, auth=None, auth_plaintext=False, connections=4,
             linger=0.0, dnssec_resolver=None, mta_sts=False) -> defer.Deferred:
    """Deliver a message now, without the queue, through the same router and
    session code as the daemon.

    Recipients are grouped by destination (one transaction per domain, or
    one for the relay); each destination's hosts are tried in MX order.

    @param sender: envelope sender; C{""}/L{None} for the null sender.
    @param recipients: an iterable of addresses (a C{str} is one recipient).
    @param message: C{bytes}, C{str} or C{email.message.Message}; Message-ID
        and Date are added when missing.
    @param relay: a smarthost, C{"HOST[:PORT]"} (port 25),
        C{"smtp://HOST[:PORT]"} (port 587) or C{"smtps://HOST[:PORT]"} (port
        465, implicit TLS, RFC 8314); L{None} for MX routing.
    @param resolver: C{"HOST[:PORT]"} of the only DNS server to ask (or a
        list of them), or L{None} for resolv.conf.
    @param mx_port: port for MX hosts.
    @param helo: EHLO name (this host's name by default).
    @param tls: the TLS level: C{"none"}, C{"may"}, C{"encrypt"},
        C{"verify"} or C{"secure"} (see L{tlspolicy}); a level that cannot be
        met defers the recipients (4xx), it never sends in plaintext.
    @param cafile: CA certificates (PEM) for C{verify}/C{secure}; the
        system store by default.
    @param tls_match: for C{verify}/C{secure}: names the certificate may
        match (C{".example.com"}: any subdomain); by default the host name
        (verify) or the recipient domain and its subdomains (secure).
    @param tls_policy: a policy file of per-destination levels (see
        L{tlspolicy.PolicyTable}); C{tls} is then the default.
    @param auth: C{(username, password)} or L{auth.Credentials} for AUTH at
        the relay (RFC 4954); the password never appears in logs or errors.
    @param auth_plaintext: allow AUTH without TLS (off: such a relay gets
        no credentials and the recipients are deferred).
    @param reactor: the reactor; the global one when L{None}.
    @param timeout: cap in seconds on each network step (connect, each
        command, DNS); nothing waits longer, so the Deferred always fires.
    @param dnssec_resolver: C{"HOST[:PORT]"} (or a list) of validating
        resolvers trusted to set the AD bit: DANE (RFC 7672) then applies to
        MX delivery at the C{may}, C{dane} and C{dane-only} levels.
    @param mta_sts: C{True} to apply recipient domains' MTA-STS policies
        (RFC 8461) to MX delivery (cached in memory), or an
        L{mtasts.MTASTS} to use.
    @param connections: open connections per destination at most.
    @param linger: seconds idle connections stay open after the last call
        in flight finishes, for later calls with the same settings. Calls
        in flight at the same time with the same settings always share
        connections (and DNS answers); with C{0} everything is closed
        when none is in flight. See L{close_connections}.
    @return: a Deferred firing with a L{DeliveryReport}. It fails only for
        bad arguments (L{AddressError}, L{MessageError}, C{ValueError}); a
        refused or unreachable recipient is a result, not a failure.
    """
    try:
        snd = parse_sender(sender)
        if isinstance(recipients, str):
            recipients = [recipients]
        addrs = [parse_address(r) for r in recipients]
        if not addrs:
            raise AddressError("no recipients")
        data = prepare_message(coerce_message(message), snd.ascii_domain if snd else None)
        if tls not in TLS_LEVELS:
            raise ValueError(f"tls must be one of {TLS_LEVELS}, not {tls!r}")
        if relay is not None:
            parse_relay(relay)
        credentials = None
        if isinstance(auth, Credentials):
            credentials = auth
        elif auth is not None:
            try:
                user, password = auth
            except (TypeError, ValueError):
                raise TypeError("auth must be (username, password) or Credentials") from None
            credentials = Credentials(user, password, allow_plaintext=auth_plaintext)
        if credentials is not None and relay is None:
            raise ValueError("auth is for a relay: give relay= too")
        resolvers = [resolver] if isinstance(resolver, str) else list(resolver or ())
        dnssec = ([dnssec_resolver] if isinstance(dnssec_resolver, str)
                  else list(dnssec_resolver or ()))
        config = Config(queue="-", relay=relay, resolvers=tuple(resolvers), mx_port=mx_port,
                        helo=helo, tls=tls, cafile=cafile, command_timeout=timeout,
                        connect_timeout=min(timeout, 30.0), dns_timeout=min(timeout, 15.0),
                        connection_idle=max(linger, 1.0),
                        max_connections=max(10, connections),
                        max_per_destination=connections, tls_policy=tls_policy,
                        dnssec_resolvers=tuple(dnssec), mta_sts=mta_sts is True)
        if linger < 0:
            raise ValueError("linger must not be negative")
        from twisted_mailout.tls.policy import TLSPolicy

        policy = config.policy_table()
        if tls_match:
            if isinstance(tls_match, str):
                tls_match = [tls_match]
            policy.default = TLSPolicy(tls, tuple(m.lower() for m in tls_match), "tls_match")
    except Exception as e:  # noqa: BLE001 - returned as the Deferred's failure
        return defer.fail(e)
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from twisted_mailout.daemon.service import build_connector

    key = (id(reactor), relay, tuple(resolvers), mx_port, helo, tls, cafile, tls_policy,
           tuple(tls_match or ()), _credentials_key(credentials), timeout, connections,
           tuple(dnssec), mta_sts if mta_sts is True or not mta_sts else id(mta_sts))
    pool = _POOLS.get(key)
    if pool is None:
        try:
            connector = build_connector(
                config, reactor, credentials=credentials, policy=policy,
                mta_sts=None if isinstance(mta_sts, bool) else mta_sts)
        except Exception as e:  # noqa: BLE001
            return defer.fail(e)
        pool = _POOLS[key] = _Pool(key, connector, reactor)
    pool.enter()
    return defer.Deferred.fromCoroutine(_send(pool, linger, snd, addrs, data, bool(relay)))


#: Connectors shared by sendmail() calls with the same settings.
_POOLS: dict = {}


def _credentials_key(c):
    if c is None:
        return None
    import hashlib

    secret = c.password.reveal() if c.password is not None else repr(
        (c.token_file, c.token_command))
    return (c.username, hashlib.sha256(secret.encode()).hexdigest(), c.mechanisms,
            c.allow_plaintext)


class _Pool:
    """One shared connector and the calls using it."""

    def __init__(self, key, connector, reactor):
        self.key = key
        self.connector = connector
        self.reactor = reactor
        self.users = 0
        self.timer = None

    def enter(self):
        self.users += 1
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def leave(self, linger: float) -> defer.Deferred:
        self.users -= 1
        if self.users:
            return defer.succeed(None)
        if linger > 0:
            self.timer = self.reactor.callLater(linger, self.close)
            return defer.succeed(None)
        return self.close()

    def close(self) -> defer.Deferred:
        self.timer = None
        if _POOLS.get(self.key) is self:
            del _POOLS[self.key]
        return self.connector.close()


def close_connections() -> defer.Deferred:
    """Close the connections that L{sendmail} keeps open for C{linger}.

    @return: a Deferred firing (with L{None}) once they are closed.
    """
    pools = [p for p in _POOLS.values() if p.users == 0]
    for p in pools:
        if p.timer is not None and p.timer.active():
            p.timer.cancel()
    return defer.DeferredList([p.close() for p in pools]).addCallback(lambda _: None)


async def _send(pool, linger, snd, addrs, data: bytes, relay: bool) -> DeliveryReport:
    import io

    connector = pool.connector

    groups: dict[str, list] = {}
    for a in addrs:
        groups.setdefault("relay" if relay else a.ascii_domain, []).append(a)
    sender = snd.smtp_form() if snd else ""
    utf8 = bool(snd and snd.needs_smtputf8)
    keys = list(groups)
    try:
        attempts = await defer.gatherResults([
            connector.deliver(k, sender, [a.smtp_form() for a in groups[k]],
                              lambda: io.BytesIO(data), len(data),
                              utf8 or any(a.needs_smtputf8 for a in groups[k]),
                              not data.isascii())
            for k in keys])
    finally:
        await pool.leave(linger)
    results = {}
    for k, attempt in zip(keys, attempts, strict=True):
        for a in groups[k]:
            reply = attempt.replies[a.smtp_form()]
            results[id(a)] = RecipientResult(str(a), _status(reply), reply.code, reply.text,
                                             attempt.relay, reply.local)
    return DeliveryReport([results[id(a)] for a in addrs])
