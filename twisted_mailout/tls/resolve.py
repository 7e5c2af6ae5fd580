"""The security decision for one destination and each of its hosts.

Before a connection to a next hop is opened, the delivery layer asks which
TLS level applies to that host and how the server is to be authenticated.
The answer combines, in this order of precedence:

  1. DANE (RFC 7672), for MX delivery at the C{may}, C{dane} and
     C{dane-only} levels when a validating resolver is configured: a
     DNSSEC-secure MX RRset and usable TLSA records for the host make TLS
     mandatory and authenticated by the TLSA records (RFC 7672 2.2);
  2. MTA-STS (RFC 8461), for MX delivery at the C{may} and C{dane} levels:
     an C{enforce} policy requires a verified certificate naming the MX host
     and refuses MX hosts the policy does not list (RFC 8461 4.1); a
     C{testing} policy changes nothing but what is reported (RFC 8461 5);
  3. the TLS policy table (L{twisted_mailout.tls.policy.PolicyTable}):
     an explicit C{none}, C{encrypt}, C{verify} or C{secure} stands.

Results are typed: L{DestinationSecurity} per destination, L{HostSecurity}
per host, L{ReportPolicy} for the RFC 8460 (TLS-RPT) policy the outcome of
a session is reported under. A requirement that cannot be met raises
L{SecurityRefused} with the local 4xx reply that defers the recipients.

This module decides; it opens no SMTP connection (it sits below the SMTP and
delivery layers and imports neither).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from twisted_mailout.envelope import Reply
from twisted_mailout.routing.dnssec import DNSSECLookupError
from twisted_mailout.routing.router import NextHop
from twisted_mailout.tls import dane as _dane
from twisted_mailout.tls import tlsrpt
from twisted_mailout.tls.creators import ClientTLS, name_checking_tls
from twisted_mailout.tls.policy import PolicyTable, TLSPolicy

__all__ = [
    "DestinationSecurity",
    "HostSecurity",
    "ReportPolicy",
    "SecurityRefused",
    "SecurityResolver",
    "TLSResult",
]

log = Logger()


@dataclass(frozen=True)
class ReportPolicy:
    """The RFC 8460 policy a TLS session's result is reported under.

    @ivar policy_type: C{"sts"} (MTA-STS) or C{"tlsa"} (DANE), RFC 8460 4.3.
    @ivar policy_strings: the policy's text lines (MTA-STS) or TLSA records
        in presentation form (DANE).
    @ivar mx_patterns: the MTA-STS policy's C{mx} patterns (empty for DANE).
    """

    policy_type: str
    policy_strings: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostSecurity:
    """How the connection to one host is secured.

    @ivar level: the session's TLS level (one of
        L{twisted_mailout.tls.levels.LEVELS}).
    @ivar creator: the connection creator
        (C{IOpenSSLClientConnectionCreator}) that authenticates the server,
        or L{None} for opportunistic TLS (encryption without a certificate
        check: the session's default creator).
    @ivar source: where the decision came from, for logs: C{"dane"},
        C{"mta-sts"}, C{"mta-sts testing"} or the policy table's source.
    @ivar report: the RFC 8460 policy to report the session's result
        under, or L{None} when no TLS-RPT policy applies.
    @ivar diagnose: the handshake is not checked, but what an enforcing
        policy would have refused must be reported (MTA-STS C{testing},
        RFC 8461 5): see L{SecurityResolver.diagnose}.
    """

    level: str
    creator: ClientTLS | None
    source: str
    report: ReportPolicy | None = None
    diagnose: bool = False


@dataclass(frozen=True)
class DestinationSecurity:
    """The part of the decision that holds for every host of a destination.

    @ivar destination: the destination key (a recipient domain, or the
        relay's key).
    @ivar domain: the recipient domain, or L{None} for a relay.
    @ivar policy: the policy table's L{TLSPolicy} for it.
    @ivar mx_secure: the MX RRset (or its absence) validated under DNSSEC,
        so DANE applies to its hosts (RFC 7672 2.2.1).
    @ivar sts: the domain's MTA-STS policy in C{enforce} or C{testing} mode,
        or L{None}.
    """

    destination: str
    domain: str | None
    policy: TLSPolicy
    mx_secure: bool = False
    sts: Any = None  # twisted_mailout.tls.mtasts.Policy


@dataclass(frozen=True)
class TLSResult:
    """An RFC 8460 result of one TLS session.

    @ivar result_type: an RFC 8460 result type (C{"certificate-expired"},
        C{"starttls-not-supported"}...), or L{None} for a success.
    @ivar detail: a human-readable reason (the C{failure-reason-code}).
    """

    result_type: str | None = None
    detail: str | None = None


class SecurityRefused(Exception):
    """A security requirement for a destination or host cannot be met.

    @ivar reply: the local 4xx reply that defers the recipients (the host
        is skipped; the next one may still do).
    @ivar mechanism: C{"dane"} or C{"mta-sts"}.
    """

    def __init__(self, reply: Reply, mechanism: str):
        super().__init__(reply.one_line())
        self.reply = reply
        self.mechanism = mechanism


def _refuse(text: str, mechanism: str) -> SecurityRefused:
    return SecurityRefused(Reply(451, text, local=True), mechanism)


class SecurityResolver:
    """Decides the TLS level and server authentication per destination and host.

    @param policy: the L{PolicyTable} of per-destination levels.
    @param trust_root: the C{IOpenSSLTrustRoot} for C{verify}, C{secure}
        and MTA-STS C{enforce}, or L{None} for the platform's.
    @param dane: a validating L{twisted_mailout.routing.dnssec.DNSSECResolver}
        enabling DANE for MX delivery, or L{None}.
    @param mta_sts: an L{twisted_mailout.tls.mtasts.MTASTS} applying MTA-STS
        policies to MX delivery, or L{None}.
    """

    def __init__(self, policy: PolicyTable, trust_root: Any = None, dane: Any = None,
                 mta_sts: Any = None):
        self.policy = policy
        self.trust_root = trust_root
        self.dane = dane
        self.mta_sts = mta_sts

    def for_destination(self, key: str, relay: str | None = None,
                        fallback: TLSPolicy | None = None
                        ) -> defer.Deferred[DestinationSecurity]:
        """The decision common to the hosts of one destination.

        @param key: the destination: an A-label recipient domain, or any key
            when delivering through a relay.
        @param relay: the relay's name as the operator wrote it (the policy
            table's key), or L{None} for MX delivery.
        @param fallback: the policy for a destination the policy table has
            no entry for, instead of the table's default (the shaping
            file's C{tls}), or L{None}.
        @return: a Deferred firing with a L{DestinationSecurity}, or failing
            with L{SecurityRefused} (a bogus MX RRset under DNSSEC; the
            C{dane-only} level without DNSSEC).
        """
        return defer.Deferred.fromCoroutine(self._for_destination(key, relay, fallback))

    async def _for_destination(self, key: str, relay: str | None,
                               fallback: TLSPolicy | None = None) -> DestinationSecurity:
        if relay is not None:
            policy = self.policy.lookup(relay)
            if fallback is not None and policy is self.policy.default:
                policy = fallback
            return DestinationSecurity(key, None, policy)
        policy = self.policy.lookup(key)
        if fallback is not None and policy is self.policy.default:
            policy = fallback
        mx_secure = False
        if self.dane is not None and policy.level in ("may", "dane", "dane-only"):
            mx_secure = await self._mx_secure(key, policy)
        elif policy.level == "dane-only":
            raise _refuse(f"4.7.5 TLS level dane-only for {key} needs a validating resolver "
                          "(--dnssec-resolver)", "dane")
        sts = None
        if self.mta_sts is not None and policy.level in ("may", "dane"):
            sts = await self.mta_sts.policy_for(key)
            if sts is not None and sts.mode == "none":
                sts = None
        return DestinationSecurity(key, key, policy, mx_secure, sts)

    async def _mx_secure(self, key: str, policy: TLSPolicy) -> bool:
        """Whether the MX RRset of C{key} (or its secure absence) validated."""
        try:
            lookup = await self.dane.mx(key)
        except DNSSECLookupError as e:
            # A bogus MX RRset is an attack or a broken zone: never fall back.
            raise _refuse(f"4.7.5 DNSSEC validation of the MX records of {key} failed: {e}",
                          "dane") from None
        if policy.level == "dane-only" and not lookup.secure:
            raise _refuse(f"4.7.5 TLS level dane-only but the MX records of {key} are not "
                          "DNSSEC-signed", "dane")
        return bool(lookup.secure)

    def for_host(self, dest: DestinationSecurity, hop: NextHop) -> defer.Deferred[HostSecurity]:
        """The TLS level and server authentication for one host.

        @param dest: from L{for_destination}.
        @param hop: the host.
        @return: a Deferred firing with a L{HostSecurity}, or failing with
            L{SecurityRefused} when the host must not be used (a failed
            DNSSEC lookup of its TLSA records; not an MX host of an
            enforced MTA-STS policy; no usable TLSA records at
            C{dane-only}). A refusal under DANE or MTA-STS is reported
            (RFC 8460) here.
        """
        return defer.Deferred.fromCoroutine(self._for_host(dest, hop))

    async def _for_host(self, dest: DestinationSecurity, hop: NextHop) -> HostSecurity:
        policy, domain = dest.policy, dest.domain
        if dest.mx_secure:
            try:
                dp = await _dane.host_policy(self.dane, hop.host, port=hop.port,
                                             mx_secure=True, domain=domain)
            except DNSSECLookupError as e:
                self.report(ReportPolicy("tlsa"), dest.destination, hop.host, None,
                            TLSResult("dnssec-invalid", str(e)))
                raise _refuse(f"4.7.5 DNSSEC lookup for {hop.host} failed: {e}",
                              "dane") from None
            report = ReportPolicy("tlsa", tuple(str(r) for r in dp.tlsa))
            if dp.mode == "dane":
                return HostSecurity("dane-only", dp.tls_creator(hop.host), "dane", report)
            if dp.mode == "encrypt":
                return HostSecurity("encrypt", None, "dane", report)
            if policy.level == "dane-only":
                raise _refuse(f"4.7.5 TLS level dane-only but {hop.host} has no usable DANE "
                              f"TLSA records ({dp.reason})", "dane")
        sts = dest.sts
        if sts is not None:
            report = ReportPolicy("sts", tuple(sts.lines()), tuple(sts.mx))
            if sts.mode == "enforce" and not sts.matches(hop.host):
                # RFC 8461 4.1: never connected to (DANE, above, would win).
                self.report(report, dest.destination, hop.host, None,
                            TLSResult("validation-failure",
                                      f"MX host {hop.host} does not match the policy"))
                raise _refuse(f"4.7.5 {hop.host} is not an MX host of the MTA-STS policy of "
                              f"{domain} (enforce; mx: {', '.join(sts.mx)})", "mta-sts")
            if sts.mode == "enforce":
                return HostSecurity("verify", name_checking_tls(
                    hop.host, (hop.host.lower(),), self.trust_root), "mta-sts", report)
            return HostSecurity("may", None, "mta-sts testing", report, diagnose=True)
        level = "may" if policy.level == "dane" else policy.level
        creator: ClientTLS | None = None
        if level in ("verify", "secure"):
            creator = name_checking_tls(hop.host, policy.names_for(domain, hop.host),
                                        self.trust_root)
        return HostSecurity(level, creator, policy.source)

    def diagnose(self, encrypted: bool, connection: Any, host: str) -> TLSResult:
        """What an MTA-STS C{enforce} policy would have said of a session
        made under C{testing} (RFC 8461 5, RFC 8460 4.3.1).

        @param encrypted: whether the session negotiated TLS.
        @param connection: the session's TLS transport (pyOpenSSL
            connection holder), for the peer's certificate chain.
        @param host: the MX host name the certificate should match.
        @return: a L{TLSResult}; its C{result_type} is L{None} when an
            enforcing policy would have accepted the session. Never raises.
        """
        if not encrypted:
            return TLSResult("starttls-not-supported", f"{host} did not offer STARTTLS")
        try:
            result = tlsrpt.diagnose_peer(connection, host, self.trust_root)
        except Exception as e:  # noqa: BLE001 - reporting never breaks delivery
            return TLSResult("validation-failure", f"cannot check the certificate: {e}")
        return TLSResult(result, f"certificate of {host}: {result}") if result else TLSResult()

    def report(self, report: ReportPolicy, domain: str, mx_host: str, addr: str | None,
               result: TLSResult) -> None:
        """Log one TLS session result in RFC 8460 terms (see L{tlsrpt}).
        Never raises: reporting must not break delivery.

        @param report: the policy reported under.
        @param domain: the policy domain (the recipient domain).
        @param mx_host: the receiving MX host name.
        @param addr: the receiving IP address, or L{None} when not connected.
        @param result: the outcome; an unknown result type is reported as
            C{"validation-failure"}.
        """
        try:
            if result.result_type is None:
                tlsrpt.log_success(report.policy_type, domain,
                                   policy_string=list(report.policy_strings),
                                   mx_host=list(report.mx_patterns))
                return
            result_type = result.result_type
            if result_type not in tlsrpt.RESULT_TYPES:
                result_type = "validation-failure"
            tlsrpt.log_failure(report.policy_type, domain, result_type,
                               policy_string=list(report.policy_strings),
                               mx_host=list(report.mx_patterns),
                               receiving_mx_hostname=mx_host, receiving_ip=addr,
                               failure_reason_code=result.detail)
        except Exception:  # noqa: BLE001
            log.failure("cannot log a TLS-RPT result for {domain}", domain=domain)
