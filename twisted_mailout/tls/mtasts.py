"""SMTP MTA Strict Transport Security (MTA-STS, RFC 8461).

L{MTASTS.policy_for} finds the policy of a recipient domain: the
C{_mta-sts.<domain>} TXT record (section 3.1) through the C{twisted.names}
resolver it is given, then, when its id is new, the policy at
C{https://mta-sts.<domain>/.well-known/mta-sts.txt} (3.2, 3.3) over verified
HTTPS with treq.  Policies are cached for their C{max_age} in memory and as
JSON files (one per domain) in a folder, so a restart keeps them (5.1).

Name resolution: C{mta-sts.<domain>} is resolved with A and AAAA queries
through the same C{twisted.names} resolver (never C{getaddrinfo};
L{twisted_mailout.routing.resolver.lookup_addresses}), and the HTTPS client
(a C{twisted.web.client.Agent} with our own endpoint factory) connects to
those IP addresses (L{twisted_mailout.routing.resolver.tcp_endpoint}), TLS
wrapped around them with the one verifying connection creator,
L{twisted_mailout.tls.creators.name_checking_tls}: SNI, the chain and the
host name (L{twisted_mailout.tls.names}, RFC 6125) are checked against
C{mta-sts.<domain>}.

What the connector does with a policy (section 4, 5): in C{enforce} mode
only MX hosts that L{STSPolicy.matches} are tried, with STARTTLS required and
the certificate verified against the MX host name; in C{testing} mode
failures are logged (L{twisted_mailout.tls.tlsrpt}) and delivery goes on as
without a policy; C{none} is no policy.

The policy and TXT syntax (parsing, checking, MX matching) is
L{twisted_mailout.tls.stspolicy}; its names are importable from here too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, cast

import treq
from twisted.internet import defer, ssl, threads
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from twisted_mailout.errors import TLSError
from twisted_mailout.routing.resolver import follow_cnames, lookup_addresses, tcp_endpoint
from twisted_mailout.tls import tlsrpt
from twisted_mailout.tls.creators import ClientTLS, TrustRoot, load_trust_root, name_checking_tls
from twisted_mailout.tls.errors import result_type_for
from twisted_mailout.tls.stspolicy import (
    MAX_AGE_LIMIT,
    MAX_POLICY_SIZE,
    Policy,
    PolicyError,
    STSMode,
    STSPolicy,
    _domain,
    _ID_RE,
    _txt_id,
    parse_policy,
    parse_txt,
    policy_url,
)

__all__ = [
    "MAX_AGE_LIMIT",
    "MAX_POLICY_SIZE",
    "MTASTS",
    "FetchError",
    "Policy",
    "PolicyError",
    "STSMode",
    "STSPolicy",
    "parse_policy",
    "parse_txt",
    "policy_url",
]

log = Logger(namespace="twisted_mailout.mtasts")

_CACHE_FORMAT = 1
# Bound on each in-memory table (policies, TXT answers, failed fetches);
# when full it is emptied: policies are read again from their files.
_MAX_ENTRIES = 10000


class FetchError(TLSError):
    """The policy could not be fetched or was not valid.

    @ivar result_type: the RFC 8460 result type: C{"sts-policy-fetch-error"}
        (DNS, connection, HTTP status, media type, size, timeout),
        C{"sts-webpki-invalid"} (the HTTPS certificate did not verify) or
        C{"sts-policy-invalid"} (the body is not a valid policy).
    @ivar reason: a short text for logs and C{failure-reason-code}.
    """

    def __init__(self, result_type: str, reason: str):
        super().__init__(f"{result_type}: {reason}")
        self.result_type = result_type
        self.reason = reason


@implementer(IStreamClientEndpoint)
class _AddressesEndpoint:
    """Connects to the first of several IP addresses that accepts, wrapping
    TLS around it; remembers the protocols it connected so the fetch can
    abort them."""

    def __init__(self, reactor: Any, addresses: Sequence[str], port: int, creator: ClientTLS,
                 timeout: float, connected: list[Any]) -> None:
        self._reactor = reactor
        self._addresses = list(addresses)
        self._port = port
        self._creator = creator
        self._timeout = timeout
        self._connected = connected

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: Any) -> Any:
        last: BaseException | None = None
        for addr in self._addresses:
            tcp = tcp_endpoint(self._reactor, addr, self._port, timeout=max(1, int(self._timeout)))
            try:
                # (casts: mypy does not see zope.interface declarations)
                endpoint: Any = wrapClientTLS(cast(Any, self._creator), cast(Any, tcp))
                proto = await endpoint.connect(protocolFactory)
            except defer.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - try the next address
                last = e
                continue
            self._connected.append(proto)
            return proto
        assert last is not None
        raise last


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(self, endpoint: _AddressesEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> _AddressesEndpoint:
        return self._endpoint


class MTASTS:
    """Finds, fetches, caches and persists MTA-STS policies (RFC 8461).

    @param reactor: provides C{IReactorTCP} and C{IReactorTime}; the HTTPS
        client and its timeout run on it.
    @param resolver: a C{twisted.names} C{IResolver} (from
        L{twisted_mailout.routing.resolver.make_resolver}); the only resolver asked, for
        the TXT record and for the addresses of C{mta-sts.<domain>}.
    @param cache_dir: folder for the persisted policies (one
        C{<domain>.json} file each, written atomically, mode 0600, removed
        when found expired; the folder is created with mode 0700), e.g.
        C{<queue>/mta-sts}; L{None} keeps them in memory only.  Files are
        not fsynced: a policy lost in a crash is fetched again.
    @param trust_root: an C{IOpenSSLTrustRoot}, or the path of a PEM CA file
        (L{twisted_mailout.tls.creators.load_trust_root}); L{None} for the
        platform's store.
    @param https_port: the port of the policy host (443; tests use others).
    @param timeout: limit on one HTTPS fetch (connect, TLS, request, body),
        in seconds; DNS queries are bounded by the resolver's own timeouts.
    @param clock: C{IReactorTime} for policy ages, the TXT cache and the
        back-off (the reactor by default).
    @param fetch_backoff: after a failed fetch, seconds during which the
        same TXT id is not fetched again (a cached policy, or none, is used
        meanwhile; a new id is fetched at once).
    @param max_txt_ttl: cap on how long a TXT answer is reused, in seconds
        (its TTL otherwise; 0 asks DNS on every call).
    @param run_blocking: C{run_blocking(f) -> Deferred} runs the blocking
        callable C{f} (reading or writing a cache file) away from the
        reactor thread; by default in the reactor's thread pool. Only used
        with a C{cache_dir}.
    @raise OSError: C{cache_dir} cannot be created (the folder is made, and
        files left by a crash removed, here: build this at start-up).
    @raise ValueError: C{timeout} not positive, C{https_port} out of range.
    """

    def __init__(self, reactor: Any, resolver: Any, cache_dir: str | os.PathLike[str] | None = None,
                 trust_root: TrustRoot | str | os.PathLike[str] | None = None,
                 https_port: int = 443, timeout: float = 10.0, clock: Any = None,
                 fetch_backoff: float = 300.0, max_txt_ttl: float = 300.0,
                 run_blocking: Callable[[Callable[[], Any]], defer.Deferred[Any]] | None = None
                 ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        if not 0 < https_port < 65536:
            raise ValueError(f"https_port out of range: {https_port!r}")
        self.reactor = reactor
        self.resolver = resolver
        self.clock = clock or reactor
        self._run_blocking = run_blocking or self._in_thread
        self.https_port = https_port
        self.timeout = timeout
        self.fetch_backoff = fetch_backoff
        self.max_txt_ttl = max_txt_ttl
        if isinstance(trust_root, (str, os.PathLike)):
            trust_root = load_trust_root(os.fspath(trust_root))
        self.trust_root = trust_root if trust_root is not None else ssl.platformTrust()
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
            for entry in os.listdir(self.cache_dir):  # left by a crash during a write
                if entry.startswith(".tmp-") and entry.endswith(".json"):
                    try:
                        os.unlink(os.path.join(self.cache_dir, entry))
                    except OSError:
                        pass
        self._policies: dict[str, STSPolicy | None] = {}  # None: no file on disk
        self._txt: dict[str, tuple[float, str | None]] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._inflight: dict[str, list[defer.Deferred]] = {}

    # -- public ------------------------------------------------------------

    def forget(self, domain: str) -> None:
        """Forget the TXT record and any fetch failure remembered for
        C{domain}, so its policy id is checked (and a changed policy fetched)
        at its next delivery. The cached policy itself is kept: RFC 8461 5.1
        has it protect the domain until it expires.

        @param domain: the policy domain (A-label form).
        """
        d = domain.lower()
        self._txt.pop(d, None)
        self._failed.pop(d, None)

    def policy_for(self, domain: str) -> defer.Deferred[STSPolicy | None]:
        """The policy to apply to mail for C{domain} (RFC 8461 5.1).

        Looks up the TXT record (reusing an answer for its TTL, at most
        C{max_txt_ttl}); fetches the policy when its id differs from the
        cached policy's, or when the cached one expired; otherwise returns
        the cached policy.  A cached, unexpired policy is also returned when
        the TXT record is missing or its lookup fails, or the fetch fails.
        Concurrent calls for one domain share one lookup and fetch.  Fetch
        failures are logged as RFC 8460 events (L{twisted_mailout.tls.tlsrpt}).

        @param domain: the recipient domain (A-labels or U-labels; a trailing
            dot is ignored).  An address literal (C{[192.0.2.1]}) or a
            malformed name has no policy.
        @return: a Deferred that never fails, firing with a L{STSPolicy} (check
            its C{mode}: C{"none"} means no policy applies) or L{None} when
            the domain has no usable policy.
        @raise TypeError: C{domain} is not a C{str}.
        """
        if not isinstance(domain, str):
            raise TypeError(f"domain must be str, got {domain!r}")
        try:
            name = _domain(domain)
        except PolicyError:
            return defer.succeed(None)
        waiters = self._inflight.get(name)
        d: defer.Deferred = defer.Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        self._inflight[name] = [d]
        work = defer.Deferred.fromCoroutine(self._policy_for(name))

        def done(result: STSPolicy | Failure | None) -> None:
            if isinstance(result, Failure):
                log.failure("MTA-STS lookup for {domain} failed unexpectedly", result,
                            domain=name)
                result = self._in_memory(name)
            for w in self._inflight.pop(name, []):
                w.callback(result)

        work.addBoth(done)
        return d

    def cached(self, domain: str) -> STSPolicy | None:
        """The cached, unexpired policy of C{domain} (memory, else its file).

        Reads the file the first time a domain is asked: call it from a
        thread or at start-up (L{policy_for} reads files in the thread pool).

        @raise PolicyError: a malformed domain.
        """
        name = _domain(domain)
        if name not in self._policies:
            policy, warning = self._load(name, self.clock.seconds())
            self._remember(name, policy, warning)
        return self._in_memory(name)

    def _in_memory(self, name: str) -> STSPolicy | None:
        policy = self._policies.get(name)
        if policy is not None and policy.expired(self.clock.seconds()):
            return None
        return policy

    async def _cached(self, name: str) -> STSPolicy | None:
        """L{cached}, with the file read by C{run_blocking}."""
        if name not in self._policies:
            if self.cache_dir is None:
                self._remember(name, None, None)
            else:
                now = self.clock.seconds()
                policy, warning = await self._run_blocking(lambda: self._load(name, now))
                self._remember(name, policy, warning)
        return self._in_memory(name)

    def _remember(self, name: str, policy: STSPolicy | None, warning: str | None) -> None:
        if warning:
            log.warn("{warning}", warning=warning)
        if name in self._policies:  # stored while the file was being read
            return
        if len(self._policies) >= _MAX_ENTRIES:
            self._policies.clear()
        self._policies[name] = policy

    def _in_thread(self, f: Callable[[], Any]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f)

    def fetch_policy(self, domain: str, policy_id: str = "") -> defer.Deferred[STSPolicy]:
        """Fetch and parse C{https://mta-sts.<domain>/.well-known/mta-sts.txt}
        (RFC 8461 3.3), without the cache or the TXT record.

        Only status 200 with media type C{text/plain} is accepted; redirects
        are not followed; the body may have at most L{MAX_POLICY_SIZE} bytes;
        the whole fetch is limited to C{timeout} seconds.

        @param domain: the policy domain.
        @param policy_id: stored as the policy's C{id}.
        @return: Deferred firing with a L{STSPolicy}, or failing with
            L{FetchError} (or L{PolicyError} for a malformed domain).
        """
        try:
            name = _domain(domain)
        except PolicyError:
            return defer.fail()
        return defer.Deferred.fromCoroutine(self._fetch(name, policy_id))

    # -- lookup ------------------------------------------------------------

    async def _policy_for(self, name: str) -> STSPolicy | None:
        now = self.clock.seconds()
        cached = await self._cached(name)
        ident, why, status = await self._lookup_txt(name)
        if ident is None:
            if status in ("failed", "invalid"):
                # RFC 8460 4.3.2.2; the policy is the one still applied, if any
                self._report(name, cached,
                             "sts-policy-fetch-error" if status == "failed"
                             else "sts-policy-invalid", f"_mta-sts.{name} TXT: {why}")
                log.info("MTA-STS {domain}: TXT {why}; {what}", domain=name, why=why,
                         what="using the cached policy" if cached else "no policy")
            return cached
        if cached is not None and cached.id == ident:
            return cached
        failed = self._failed.get(name)
        if failed is not None and failed[1] == ident and now < failed[0]:
            return cached
        try:
            policy = await self._fetch(name, ident)
        except FetchError as e:
            if len(self._failed) >= _MAX_ENTRIES:
                self._failed.clear()
            self._failed[name] = (now + self.fetch_backoff, ident)
            self._report(name, cached, e.result_type, e.reason)
            log.info("MTA-STS {domain}: policy id {id} not fetched ({reason}); {what}",
                     domain=name, id=ident, reason=str(e),
                     what="using the cached policy" if cached else "no policy")
            return cached
        self._failed.pop(name, None)
        await self._store(policy)
        log.info("MTA-STS {domain}: policy id {id}, mode {mode}, max_age {max_age}",
                 domain=name, id=policy.id, mode=policy.mode.value, max_age=policy.max_age)
        return policy

    def _report(self, name: str, cached: STSPolicy | None, result_type: str,
                reason: str) -> None:
        fields = cached.report_fields() if cached else {
            "policy_type": "sts", "policy_domain": name}
        tlsrpt.log_failure(result_type=result_type, failure_reason_code=reason, **fields)

    async def _lookup_txt(self, name: str) -> tuple[str | None, str, str]:
        """C{(id or None, why, status)} for C{_mta-sts.<name>}; status is
        C{"ok"}, C{"none"} (no STS record), C{"invalid"} (STS records
        breaking RFC 8461 3.1), C{"failed"} (DNS failure) or C{"cached"}."""
        now = self.clock.seconds()
        hit = self._txt.get(name)
        if hit is not None and now < hit[0]:
            return hit[1], "cached answer", "cached"
        qname = "_mta-sts." + name
        try:
            answers = (await self.resolver.lookupText(qname))[0]
        except dnserror.DNSNameError:
            self._remember_txt(name, None, 60)
            return None, "NXDOMAIN", "none"
        except Exception as e:  # noqa: BLE001 - SERVFAIL, timeouts, refusals
            return None, f"lookup failed: {e.__class__.__name__}: {e}", "failed"
        chain = follow_cnames(answers, qname, dns.TXT)
        ident, why, invalid = _txt_id([rr.payload.data for rr in chain.records])
        self._remember_txt(name, ident, chain.ttl if chain.ttl is not None else 60)
        return ident, why, "ok" if ident else "invalid" if invalid else "none"

    def _remember_txt(self, name: str, ident: str | None, ttl: float) -> None:
        ttl = min(ttl, self.max_txt_ttl)
        if ttl > 0:
            if len(self._txt) >= _MAX_ENTRIES:
                self._txt.clear()
            self._txt[name] = (self.clock.seconds() + ttl, ident)

    # -- HTTPS -------------------------------------------------------------

    async def _addresses(self, host: str) -> list[str]:
        answer = await lookup_addresses(self.resolver, host)
        if not answer.addresses:
            why = answer.describe_failures() or "no A/AAAA record"
            raise FetchError("sts-policy-fetch-error", f"{host}: {why}")
        return answer.addresses

    async def _fetch(self, name: str, ident: str) -> STSPolicy:
        host = "mta-sts." + name
        addrs = await self._addresses(host)
        # The chain and the name mta-sts.DOMAIN are checked (RFC 8461 3.3)
        # by the one verifying creator; a refusal carries its RFC 8460 type.
        creator = name_checking_tls(host, (host,), self.trust_root)
        connected: list = []
        endpoint = _AddressesEndpoint(self.reactor, addrs, self.https_port, creator,
                                      self.timeout, connected)
        agent = Agent.usingEndpointFactory(
            self.reactor, _EndpointFactory(endpoint),
            pool=HTTPConnectionPool(self.reactor, persistent=False))
        client = treq.client.HTTPClient(agent)
        work = defer.Deferred.fromCoroutine(
            self._get(client, policy_url(name, self.https_port), name, ident))
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            work.cancel()

        timer = self.reactor.callLater(self.timeout, expire)
        try:
            return await work
        except FetchError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure maps to a result type
            if timed_out:
                raise FetchError("sts-policy-fetch-error",
                                 f"no policy within {self.timeout:g} s") from None
            kind = result_type_for(e)
            if kind is not None:
                raise FetchError("sts-webpki-invalid",
                                 f"{host}: {kind}: {_describe(e)}") from None
            raise FetchError("sts-policy-fetch-error", f"{host}: {_describe(e)}") from None
        finally:
            if timer.active():
                timer.cancel()
            for proto in connected:  # a stalled body or a timeout leaves one open
                transport = getattr(proto, "transport", None)
                if transport is not None and getattr(proto, "state", "") != "CONNECTION_LOST":
                    transport.abortConnection()

    async def _get(self, client: Any, url: str, name: str, ident: str) -> STSPolicy:
        response = await client.get(url, allow_redirects=False, unbuffered=True,
                                    headers={"Accept": ["text/plain"]})
        if response.code != 200:
            what = f"HTTP status {response.code}"
            if 300 <= response.code < 400:
                what += " (redirects are not followed, RFC 8461 3.3)"
            raise FetchError("sts-policy-fetch-error", what)
        ctype = response.headers.getRawHeaders("content-type", [""])[0]
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "text/plain":
            raise FetchError("sts-policy-fetch-error",
                             f"media type {ctype!r}, not text/plain (RFC 8461 3.2)")
        length = response.length
        if isinstance(length, int) and length > MAX_POLICY_SIZE:
            raise FetchError("sts-policy-fetch-error",
                             f"policy of {length} bytes exceeds {MAX_POLICY_SIZE}")
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_POLICY_SIZE:
                raise FetchError("sts-policy-fetch-error",
                                 f"policy exceeds {MAX_POLICY_SIZE} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        try:
            return parse_policy(b"".join(chunks), domain=name, id=ident,
                                fetched=self.clock.seconds())
        except PolicyError as e:
            raise FetchError("sts-policy-invalid", str(e)) from None

    # -- persistence -------------------------------------------------------

    def _path(self, name: str) -> str | None:
        if self.cache_dir is None:
            return None
        return os.path.join(self.cache_dir, name + ".json")

    def _load(self, name: str, now: float) -> tuple[STSPolicy | None, str | None]:
        """Read C{name}'s cache file (blocking: runs in a thread).

        @param now: the clock's time, epoch seconds (an expired file is removed).
        @return: C{(policy or None, warning or None)}.
        """
        path = self._path(name)
        if path is None:
            return None, None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != _CACHE_FORMAT or data.get("domain") != name:
                raise ValueError("not a policy cache file for this domain")
            ident = data["id"]
            if not isinstance(ident, str) or not _ID_RE.match(ident):
                raise ValueError(f"bad id {ident!r}")
            fetched = data["fetched"]
            if isinstance(fetched, bool) or not isinstance(fetched, (int, float)):
                raise ValueError(f"bad fetched {fetched!r}")
            policy = parse_policy(data["text"], domain=name, id=ident, fetched=fetched)
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return None, f"MTA-STS cache {path} ignored: {e}"
        if policy.expired(now):
            try:
                os.unlink(path)
            except OSError:
                pass
            return None, None
        return policy, None

    async def _store(self, policy: STSPolicy) -> None:
        self._policies[policy.domain] = policy
        path = self._path(policy.domain)
        if path is None:
            return
        data = {"format": _CACHE_FORMAT, "domain": policy.domain, "id": policy.id,
                "fetched": policy.fetched, "text": policy.text}
        warning = await self._run_blocking(lambda: self._write(path, data))
        if warning:
            log.warn("{warning}", warning=warning)

    def _write(self, path: str, data: dict[str, Any]) -> str | None:
        """Write one cache file atomically (blocking: runs in a thread).

        @return: L{None}, or a warning for the log.
        """
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.cache_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            return f"MTA-STS cache {path} not written: {e}"
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return None


def _describe(e: BaseException) -> str:
    """A one-line description of a failure, unwrapping twisted.web's wrappers."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        inner = reasons[0].value if isinstance(reasons[0], Failure) else reasons[0]
        if isinstance(inner, BaseException):
            return _describe(inner)
    text = str(e) or e.__class__.__name__
    return f"{e.__class__.__name__}: {text}" if text != e.__class__.__name__ else text
