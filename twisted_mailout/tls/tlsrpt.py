"""TLS outcomes logged in the shape of SMTP TLS Reporting (RFC 8460).

Every TLS outcome the agent wants to report is one C{twisted.logger} event
(L{log_success}, L{log_failure}); L{build_report} aggregates such events, for
instance read back from a C{jsonFileLogObserver} file with
C{twisted.logger.eventsFromJSONLogFile}, into the JSON report of RFC 8460
section 4.  Nothing here sends reports (section 5); that is left to the
operator.

Event fields.  RFC 8460 names contain hyphens, which are not Python
identifiers (C{twisted.logger} formats fields by keyword), so events carry
the same names with C{_} for C{-}; L{FIELD_NAMES} is the mapping:

      - C{policy_type} -> C{policy-type}: C{"sts"}, C{"tlsa"}, C{"no-policy-found"}
      - C{policy_domain} -> C{policy-domain}: the recipient domain
      - C{policy_string} -> C{policy-string}: C{list[str]}, the policy's lines
        (STS) or TLSA records
      - C{mx_host} -> C{mx-host}: C{list[str]}, the policy's MX patterns
      - C{result_type} -> C{result-type}: one of L{RESULT_TYPES}
      - C{sending_mta_ip} -> C{sending-mta-ip}: our address
      - C{receiving_mx_hostname} -> C{receiving-mx-hostname}: the MX host name
      - C{receiving_mx_helo} -> C{receiving-mx-helo}: its greeting/EHLO name
      - C{receiving_ip} -> C{receiving-ip}: its address
      - C{failed_session_count} -> C{failed-session-count}: C{int}
      - C{additional_information} -> C{additional-information}: a URI
      - C{failure_reason_code} -> C{failure-reason-code}: free text

plus C{tlsrpt} (L{SUCCESS} or L{FAILURE}): the marker that makes an event a
TLS-RPT event, and C{successful_session_count} on success events (summed
into C{total-successful-session-count}).  Every value is JSON-serialisable,
so the events survive a JSON log file.  Successes are logged at level
C{info}, failures at C{warn}.  L{json_observer} writes only these events,
one JSON object a line, for L{build_report} to read back later:

    globalLogPublisher.addObserver(json_observer(open(path, "a")))
    ...
    report = build_report(eventsFromJSONLogFile(open(path)), ...)
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Iterable, Mapping
from typing import IO, Any, cast

from OpenSSL import crypto
from twisted.internet.ssl import platformTrust
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    PredicateResult,
    jsonFileLogObserver,
)

from twisted_mailout.tls.creators import client_context
from twisted_mailout.tls.errors import (
    CertificateNameError,
    result_type_for,
    result_type_for_verify_error,
)
from twisted_mailout.tls.names import check_names

__all__ = [
    "FAILURE",
    "FIELD_NAMES",
    "POLICY_TYPES",
    "RESULT_TYPES",
    "SUCCESS",
    "build_report",
    "diagnose_peer",
    "json_observer",
    "log_failure",
    "log_success",
    "report_filename",
    "result_type_for",
    "result_type_for_verify_error",
]

log = Logger(namespace="twisted_mailout.tlsrpt")

#: Value of the C{tlsrpt} marker field of a successful session event.
SUCCESS = "success"
#: Value of the C{tlsrpt} marker field of a failed session event.
FAILURE = "failure"

#: RFC 8460 section 4.3 policy types.
POLICY_TYPES = frozenset({"sts", "tlsa", "no-policy-found"})

#: RFC 8460 section 4.3 result types: negotiation failures (4.3.1), DANE
#: (4.3.2.1) and MTA-STS (4.3.2.2) policy failures.
RESULT_TYPES = frozenset({
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
})

#: Event field name -> RFC 8460 JSON member name.
FIELD_NAMES: dict[str, str] = {
    "policy_type": "policy-type",
    "policy_domain": "policy-domain",
    "policy_string": "policy-string",
    "mx_host": "mx-host",
    "result_type": "result-type",
    "sending_mta_ip": "sending-mta-ip",
    "receiving_mx_hostname": "receiving-mx-hostname",
    "receiving_mx_helo": "receiving-mx-helo",
    "receiving_ip": "receiving-ip",
    "failed_session_count": "failed-session-count",
    "additional_information": "additional-information",
    "failure_reason_code": "failure-reason-code",
}

# The failure-details members, in the order RFC 8460 4.4 lists them; a
# failure detail is aggregated over equal values of all but the count.
_DETAIL_FIELDS = ("result_type", "sending_mta_ip", "receiving_mx_hostname",
                  "receiving_mx_helo", "receiving_ip", "additional_information",
                  "failure_reason_code")


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of strings, not one string")
    out = list(value)
    for item in out:
        if not isinstance(item, str):
            raise TypeError(f"{what} items must be str, got {item!r}")
    return out


def _policy_fields(policy_type: str, policy_domain: str, policy_string: Any,
                   mx_host: Any) -> dict[str, Any]:
    if policy_type not in POLICY_TYPES:
        raise ValueError(f"policy_type must be one of {sorted(POLICY_TYPES)}, "
                         f"got {policy_type!r}")
    if not isinstance(policy_domain, str) or not policy_domain:
        raise ValueError(f"policy_domain must be a non-empty str, got {policy_domain!r}")
    return {
        "policy_type": policy_type,
        "policy_domain": policy_domain.rstrip(".").lower(),
        "policy_string": _str_list(policy_string, "policy_string"),
        "mx_host": _str_list(mx_host, "mx_host"),
    }


def _count(count: Any, what: str) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{what} must be a positive int, got {count!r}")
    return count


def _opt_ip(value: Any, what: str) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{what} must be an IP address, got {value!r}") from None


def log_success(policy_type: str, policy_domain: str, *, policy_string: Iterable[str] = (),
                mx_host: Iterable[str] = (),
                count: int = 1, logger: Logger | None = None) -> dict[str, Any]:
    """Log C{count} sessions that negotiated TLS as the policy requires.

    @param policy_type: C{"sts"}, C{"tlsa"} or C{"no-policy-found"} (RFC 8460
        4.3).
    @param policy_domain: the recipient domain the policy is for.
    @param policy_string: C{Sequence[str]}; for C{"sts"} the policy's lines
        (L{twisted_mailout.tls.mtasts.STSPolicy.lines}); empty for C{"no-policy-found"}.
    @param mx_host: C{Sequence[str]}: the policy's MX patterns (C{"sts"}).
    @param count: number of sessions, at least 1.
    @param logger: the C{Logger} to emit with (this module's by default).
    @return: the event's TLS-RPT fields (a new C{dict}).
    @raise ValueError: unknown C{policy_type}, empty domain, C{count} < 1.
    @raise TypeError: C{policy_string} or C{mx_host} not a sequence of str.
    """
    fields = _policy_fields(policy_type, policy_domain, policy_string, mx_host)
    fields["tlsrpt"] = SUCCESS
    fields["successful_session_count"] = _count(count, "count")
    (logger or log).info(
        "TLS-RPT {policy_type} {policy_domain}: {successful_session_count} "
        "successful session(s)", **fields)
    return fields


def log_failure(policy_type: str, policy_domain: str, result_type: str, *,
                policy_string: Iterable[str] = (), mx_host: Iterable[str] = (),
                sending_mta_ip: str | None = None,
                receiving_mx_hostname: str | None = None,
                receiving_mx_helo: str | None = None, receiving_ip: str | None = None,
                failure_reason_code: str | None = None,
                additional_information: str | None = None, count: int = 1,
                logger: Logger | None = None) -> dict[str, Any]:
    """Log C{count} sessions (or policy fetches) that failed, RFC 8460 4.3.

    Emitted at level C{warn}; the event carries the fields in the module
    docstring, with C{None} for what is unknown.

    @param policy_type: C{"sts"}, C{"tlsa"} or C{"no-policy-found"}.
    @param policy_domain: the recipient domain.
    @param result_type: one of L{RESULT_TYPES} (RFC 8460 4.3.1, 4.3.2).
    @param policy_string: C{Sequence[str]}, as for L{log_success}.
    @param mx_host: C{Sequence[str]}, as for L{log_success}.
    @param sending_mta_ip: our source address (text), if known.
    @param receiving_mx_hostname: the MX host name tried.
    @param receiving_mx_helo: the name in its greeting or EHLO reply.
    @param receiving_ip: the address tried (text).
    @param failure_reason_code: free text, e.g. the OpenSSL error.
    @param additional_information: a URI with more information.
    @param count: number of sessions, at least 1.
    @param logger: the C{Logger} to emit with (this module's by default).
    @return: the event's TLS-RPT fields (a new C{dict}).
    @raise ValueError: unknown C{policy_type} or C{result_type}, a malformed
        IP address, C{count} < 1.
    @raise TypeError: C{policy_string} or C{mx_host} not a sequence of str.
    """
    fields = _policy_fields(policy_type, policy_domain, policy_string, mx_host)
    if result_type not in RESULT_TYPES:
        raise ValueError(f"result_type must be one of {sorted(RESULT_TYPES)}, "
                         f"got {result_type!r}")
    fields.update(
        tlsrpt=FAILURE,
        result_type=result_type,
        sending_mta_ip=_opt_ip(sending_mta_ip, "sending_mta_ip"),
        receiving_mx_hostname=(receiving_mx_hostname.rstrip(".").lower()
                               if receiving_mx_hostname else None),
        receiving_mx_helo=receiving_mx_helo or None,
        receiving_ip=_opt_ip(receiving_ip, "receiving_ip"),
        failure_reason_code=failure_reason_code or None,
        additional_information=additional_information or None,
        failed_session_count=_count(count, "count"),
    )
    (logger or log).warn(
        "TLS-RPT {policy_type} {policy_domain}: {result_type} "
        "mx={receiving_mx_hostname} ip={receiving_ip}: {failure_reason_code}", **fields)
    return fields


def json_observer(out_file: IO[str]) -> ILogObserver:
    """A log observer that writes the TLS-RPT events (and nothing else) to
    C{out_file} as JSON text sequences (C{twisted.logger.jsonFileLogObserver}),
    which C{twisted.logger.eventsFromJSONLogFile} reads back.

    @param out_file: a text file open for writing (or appending).
    @return: an C{ILogObserver}; add it to C{globalLogPublisher}.
    """

    def only_tlsrpt(event: Mapping[str, Any]) -> PredicateResult:
        return PredicateResult.yes if "tlsrpt" in event else PredicateResult.no

    # (casts: mypy does not see zope.interface declarations)
    return cast(ILogObserver, FilteringLogObserver(
        cast(ILogObserver, jsonFileLogObserver(out_file)),
        [cast(ILogFilterPredicate, only_tlsrpt)]))


def _epoch(value: Any, what: str) -> float:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"{what} must be timezone-aware")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be epoch seconds or a datetime, got {value!r}")
    return float(value)


def _rfc3339(seconds: float) -> str:
    t = _dt.datetime.fromtimestamp(int(seconds), _dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(events: Iterable[Mapping[str, Any]], organization_name: str,
                 contact_info: str, report_id: str, start: Any, end: Any,
                 policy_domain: str | None = None) -> dict[str, Any]:
    """Aggregate TLS-RPT events into one RFC 8460 (section 4) report.

    Events without the C{tlsrpt} marker are ignored, so a whole log can be
    passed.  An event whose C{log_time} lies outside C{[start, end)} is
    ignored; one without C{log_time} is counted.  Events of the same policy
    (type, domain, policy strings, MX patterns) make one C{policies} entry,
    in order of first appearance; its C{summary} sums the session counts and
    its C{failure-details} sum C{failed-session-count} over events equal in
    every other detail field.  Unknown (C{None}) detail members are left
    out, and so are empty C{policy-string} and C{mx-host} lists.

    @param events: C{twisted.logger} event dicts (from L{log_success},
        L{log_failure}, or C{eventsFromJSONLogFile}).
    @param organization_name: the reporting organisation (C{organization-name}).
    @param contact_info: C{contact-info}, e.g. C{"mailto:tlsrpt@example.net"}.
    @param report_id: a unique C{report-id}.
    @param start: start of the range, epoch seconds or an aware C{datetime}.
    @param end: end of the range (excluded), same types.
    @param policy_domain: only events for this domain (a report is sent to
        one policy domain's C{rua}, RFC 8460 3); all domains when L{None}.
    @return: the report as a JSON-serialisable C{dict}; C{policies} is empty
        when no event matched.
    @raise ValueError: an empty name, contact or id, or C{end <= start}.
    @raise TypeError: C{start}/C{end} of the wrong type.
    """
    for value, what in ((organization_name, "organization_name"),
                        (contact_info, "contact_info"), (report_id, "report_id")):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} must be a non-empty str, got {value!r}")
    t0, t1 = _epoch(start, "start"), _epoch(end, "end")
    if t1 <= t0:
        raise ValueError(f"end ({end!r}) must be after start ({start!r})")
    want = policy_domain.rstrip(".").lower() if policy_domain else None
    policies: dict[tuple, dict[str, Any]] = {}
    for event in events:
        kind = event.get("tlsrpt")
        if kind not in (SUCCESS, FAILURE):
            continue
        when = event.get("log_time")
        if when is not None and not t0 <= when < t1:
            continue
        domain = str(event.get("policy_domain") or "").rstrip(".").lower()
        if want is not None and domain != want:
            continue
        strings = tuple(event.get("policy_string") or ())
        mx = tuple(event.get("mx_host") or ())
        key = (event.get("policy_type"), domain, strings, mx)
        entry = policies.get(key)
        if entry is None:
            policy: dict[str, Any] = {"policy-type": key[0]}
            if strings:
                policy["policy-string"] = list(strings)
            policy["policy-domain"] = domain
            if mx:
                policy["mx-host"] = list(mx)
            entry = policies[key] = {"policy": policy, "ok": 0, "failed": 0, "details": {}}
        if kind == SUCCESS:
            entry["ok"] += int(event.get("successful_session_count", 1))
            continue
        n = int(event.get("failed_session_count", 1))
        entry["failed"] += n
        dkey = tuple(event.get(f) for f in _DETAIL_FIELDS)
        entry["details"][dkey] = entry["details"].get(dkey, 0) + n
    out = []
    for entry in policies.values():
        item: dict[str, Any] = {
            "policy": entry["policy"],
            "summary": {"total-successful-session-count": entry["ok"],
                        "total-failure-session-count": entry["failed"]},
        }
        details = []
        for dkey, n in entry["details"].items():
            detail: dict[str, Any] = {}
            for name, value in zip(_DETAIL_FIELDS, dkey, strict=True):
                if value is not None:
                    detail[FIELD_NAMES[name]] = value
                if name == "receiving_ip":
                    detail["failed-session-count"] = n
            details.append(detail)
        if details:
            item["failure-details"] = details
        out.append(item)
    return {
        "organization-name": organization_name,
        "date-range": {"start-datetime": _rfc3339(t0), "end-datetime": _rfc3339(t1)},
        "contact-info": contact_info,
        "report-id": report_id,
        "policies": out,
    }


def report_filename(sender: str, policy_domain: str, start: Any, end: Any,
                    unique_id: str | None = None,
                    gzipped: bool = True) -> str:
    """The report file name RFC 8460 5.1 recommends:
    C{sender!policy-domain!begin!end[!unique-id].json[.gz]}.

    @param sender: our domain (A-labels).
    @param policy_domain: the domain reported on (A-labels).
    @param start: range start, epoch seconds or an aware C{datetime}.
    @param end: range end, same types.
    @param unique_id: letters and digits only, or L{None}.
    @param gzipped: C{.json.gz} rather than C{.json}.
    @return: the file name (C{str}).
    @raise ValueError: a name containing C{!} or C{/}, or a C{unique_id} that
        is not alphanumeric.
    """
    for value, what in ((sender, "sender"), (policy_domain, "policy_domain")):
        if not value or "!" in value or "/" in value:
            raise ValueError(f"bad {what} {value!r}")
    if unique_id is not None and not (unique_id.isascii() and unique_id.isalnum()):
        raise ValueError(f"unique_id must be letters and digits, got {unique_id!r}")
    parts = [sender, policy_domain, str(int(_epoch(start, "start"))),
             str(int(_epoch(end, "end")))]
    if unique_id:
        parts.append(unique_id)
    return "!".join(parts) + (".json.gz" if gzipped else ".json")


def diagnose_peer(connection: Any, hostname: str, trust_root: Any = None) -> str | None:
    """Check, after an I{unverified} handshake (MTA-STS C{testing} mode,
    opportunistic TLS), whether the peer's certificate would have passed
    verification, so that the failure can be reported (RFC 8460 4.3.1)
    while delivery goes on.

    @param connection: the C{OpenSSL.SSL.Connection}, or a TLS transport
        whose C{getHandle()} returns it (C{TLSMemoryBIOProtocol}), after the
        handshake completed.
    @param hostname: the name the certificate must match (the MX host
        name), checked by L{twisted_mailout.tls.names.check_names}.
    @param trust_root: an C{IOpenSSLTrustRoot} (e.g. from
        L{twisted_mailout.tls.creators.load_trust_root}); L{None} for the
        platform's store.
    @return: L{None} when the chain verifies and the name matches; else
        C{"certificate-expired"}, C{"certificate-not-trusted"},
        C{"certificate-host-mismatch"} or C{"validation-failure"} (other
        chain errors, or no certificate).
    @raise TypeError: C{connection} is neither.
    """
    conn = connection
    if not hasattr(conn, "get_peer_cert_chain"):
        handle = getattr(connection, "getHandle", None)
        if handle is None:
            raise TypeError(f"not a TLS connection or transport: {connection!r}")
        conn = handle()
    chain = conn.get_peer_cert_chain()
    if not chain:
        return "validation-failure"
    # Keep the context referenced while its store is used: pyOpenSSL's
    # store object does not keep the context alive.
    context = client_context(trust_root or platformTrust())
    store = context.get_cert_store()
    if store is None:  # a client context always has one
        return "validation-failure"
    try:
        crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
    except crypto.X509StoreContextError as e:
        return result_type_for_verify_error(int(e.errors[0]))
    try:
        check_names(chain[0], (hostname,))
    except CertificateNameError:
        return "certificate-host-mismatch"
    return None
