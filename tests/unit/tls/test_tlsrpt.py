"""TLS-RPT (RFC 8460): the logged events, the aggregate report built from
them (also read back from a JSON log file), and the mapping of TLS failures
to result types, with real handshakes against loopback TLS servers."""

from __future__ import annotations

import datetime
import io
import json

import trustme
from tests.support.https_peer import _ServerTLS
from OpenSSL import SSL
from service_identity.exceptions import VerificationError
from twisted.internet import defer, endpoints, error, protocol, reactor, ssl
from twisted.logger import (
    LogLevel,
    Logger,
    eventsFromJSONLogFile,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web._newclient import ResponseNeverReceived

from twisted_mailout.tls import tlsrpt
from twisted_mailout.tls.creators import name_checking_tls, opportunistic_tls
from twisted_mailout.tls.mtasts import parse_policy

POLICY = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmx: *.example.net\nmax_age: 86400\n"
START = datetime.datetime(2026, 11, 22, tzinfo=datetime.UTC)
END = datetime.datetime(2026, 11, 23, tzinfo=datetime.UTC)
T = START.timestamp() + 3600  # an instant inside the range


def capture():
    events = []
    return events, Logger(namespace="test.tlsrpt", observer=events.append)


class LogTests(unittest.SynchronousTestCase):
    def test_failure_event_fields(self):
        events, logger = capture()
        policy = parse_policy(POLICY, domain="example.com", id="x")
        fields = tlsrpt.log_failure(
            result_type="certificate-expired", sending_mta_ip="2001:db8::1",
            receiving_mx_hostname="MX.Example.com.", receiving_mx_helo="mx.example.com",
            receiving_ip="192.0.2.7", failure_reason_code="X509_V_ERR_CERT_HAS_EXPIRED",
            count=2, logger=logger, **policy.report_fields())
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        for key, value in fields.items():
            self.assertEqual(event[key], value)
        self.assertEqual(fields, {
            "tlsrpt": "failure", "policy_type": "sts", "policy_domain": "example.com",
            "policy_string": POLICY.splitlines(),
            "mx_host": ["mx.example.com", "*.example.net"],
            "result_type": "certificate-expired", "sending_mta_ip": "2001:db8::1",
            "receiving_mx_hostname": "mx.example.com", "receiving_mx_helo": "mx.example.com",
            "receiving_ip": "192.0.2.7", "failure_reason_code": "X509_V_ERR_CERT_HAS_EXPIRED",
            "additional_information": None, "failed_session_count": 2})
        json.dumps(fields)  # serialisable as it is
        self.assertIn("certificate-expired", event["log_format"].format(**event))

    def test_success_event_fields(self):
        events, logger = capture()
        fields = tlsrpt.log_success("no-policy-found", "Example.ORG.", count=3, logger=logger)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(fields, {"tlsrpt": "success", "policy_type": "no-policy-found",
                                  "policy_domain": "example.org", "policy_string": [],
                                  "mx_host": [], "successful_session_count": 3})

    def test_default_logger_namespace(self):
        from twisted.logger import globalLogPublisher

        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        tlsrpt.log_success("sts", "example.com")
        self.assertEqual([e["log_namespace"] for e in seen if "tlsrpt" in e],
                         ["twisted_mailout.tlsrpt"])

    def test_bad_arguments(self):
        _, logger = capture()
        bad = [
            (ValueError, dict(policy_type="dane")),
            (ValueError, dict(policy_domain="")),
            (ValueError, dict(result_type="certificate-invalid")),
            (ValueError, dict(count=0)),
            (ValueError, dict(count=True)),
            (ValueError, dict(receiving_ip="mx.example.com")),
            (ValueError, dict(sending_mta_ip="300.1.1.1")),
            (TypeError, dict(policy_string="version: STSv1")),
            (TypeError, dict(mx_host=[b"mx.example.com"])),
        ]
        for exc, kw in bad:
            args = dict(policy_type="sts", policy_domain="example.com",
                        result_type="validation-failure", logger=logger)
            args.update(kw)
            with self.assertRaises(exc, msg=kw):
                tlsrpt.log_failure(**args)
        with self.assertRaises(ValueError):
            tlsrpt.log_success("sts", "example.com", count=-1, logger=logger)

    def test_field_names_cover_every_detail(self):
        self.assertEqual(set(tlsrpt.FIELD_NAMES.values()) - {
            "policy-type", "policy-domain", "policy-string", "mx-host"}, {
            "result-type", "sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo",
            "receiving-ip", "failed-session-count", "additional-information",
            "failure-reason-code"})
        for name, rfc in tlsrpt.FIELD_NAMES.items():
            self.assertEqual(name.replace("_", "-"), rfc)


def sts_events():
    """Two policies' worth of events, plus noise."""
    events, logger = capture()
    policy = parse_policy(POLICY, domain="example.com", id="x").report_fields()
    tlsrpt.log_success(logger=logger, count=5, **policy)
    tlsrpt.log_success(logger=logger, **policy)
    for _ in range(2):
        tlsrpt.log_failure(result_type="certificate-expired",
                           receiving_mx_hostname="mx.example.com", receiving_ip="192.0.2.7",
                           sending_mta_ip="198.51.100.1", logger=logger, **policy)
    tlsrpt.log_failure(result_type="starttls-not-supported",
                       receiving_mx_hostname="a.example.net", receiving_ip="192.0.2.8",
                       count=3, logger=logger, **policy)
    tlsrpt.log_success("no-policy-found", "example.org", logger=logger)
    tlsrpt.log_failure("sts", "example.org", "sts-policy-fetch-error",
                       failure_reason_code="HTTP status 404", logger=logger)
    logger.info("an unrelated event {x}", x=1)
    for e in events:
        e["log_time"] = T
    return events


class ReportTests(unittest.SynchronousTestCase):
    def test_aggregates_by_policy_and_failure_detail(self):
        report = tlsrpt.build_report(sts_events(), "Sender Org", "mailto:tls@sender.test",
                                     "r-1", START, END)
        self.assertEqual(report["organization-name"], "Sender Org")
        self.assertEqual(report["contact-info"], "mailto:tls@sender.test")
        self.assertEqual(report["report-id"], "r-1")
        self.assertEqual(report["date-range"], {"start-datetime": "2026-11-22T00:00:00Z",
                                                "end-datetime": "2026-11-23T00:00:00Z"})
        sts, none, fetch = report["policies"]
        self.assertEqual(sts["policy"], {
            "policy-type": "sts", "policy-string": POLICY.splitlines(),
            "policy-domain": "example.com", "mx-host": ["mx.example.com", "*.example.net"]})
        self.assertEqual(sts["summary"], {"total-successful-session-count": 6,
                                          "total-failure-session-count": 5})
        self.assertEqual(sts["failure-details"], [
            {"result-type": "certificate-expired", "sending-mta-ip": "198.51.100.1",
             "receiving-mx-hostname": "mx.example.com", "receiving-ip": "192.0.2.7",
             "failed-session-count": 2},
            {"result-type": "starttls-not-supported", "receiving-mx-hostname": "a.example.net",
             "receiving-ip": "192.0.2.8", "failed-session-count": 3},
        ])
        self.assertEqual(none, {"policy": {"policy-type": "no-policy-found",
                                           "policy-domain": "example.org"},
                                "summary": {"total-successful-session-count": 1,
                                            "total-failure-session-count": 0}})
        self.assertEqual(fetch["policy"], {"policy-type": "sts", "policy-domain": "example.org"})
        self.assertEqual(fetch["failure-details"], [
            {"result-type": "sts-policy-fetch-error", "failed-session-count": 1,
             "failure-reason-code": "HTTP status 404"}])
        json.dumps(report)

    def test_time_range_and_domain_filters(self):
        events = sts_events()
        events[0]["log_time"] = END.timestamp()  # end is excluded: 5 successes dropped
        events[1]["log_time"] = START.timestamp()  # start is included
        report = tlsrpt.build_report(events, "o", "c", "i", START.timestamp(),
                                     END.timestamp(), policy_domain="Example.COM")
        [sts] = report["policies"]
        self.assertEqual(sts["summary"]["total-successful-session-count"], 1)
        empty = tlsrpt.build_report(events, "o", "c", "i", 0, 1)
        self.assertEqual(empty["policies"], [])

    def test_report_from_a_json_log_file(self):
        for make in (jsonFileLogObserver, tlsrpt.json_observer):
            out = io.StringIO()
            observer = make(out)
            for event in sts_events():
                observer(event)
            events = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
            self.assertEqual(
                tlsrpt.build_report(events, "o", "c", "i", START, END),
                tlsrpt.build_report(sts_events(), "o", "c", "i", START, END))
            if make is tlsrpt.json_observer:  # only the TLS-RPT events are written
                self.assertEqual(len(events), len(sts_events()) - 1)
                self.assertTrue(all("tlsrpt" in e for e in events))

    def test_bad_arguments(self):
        for args in [("", "c", "i", 0, 1), ("o", "", "i", 0, 1), ("o", "c", "", 0, 1),
                     ("o", "c", "i", 1, 1), ("o", "c", "i", 2, 1),
                     ("o", "c", "i", datetime.datetime(2026, 1, 1), END)]:
            with self.assertRaises(ValueError, msg=args):
                tlsrpt.build_report([], *args)
        with self.assertRaises(TypeError):
            tlsrpt.build_report([], "o", "c", "i", "yesterday", 1)

    def test_report_filename(self):
        self.assertEqual(
            tlsrpt.report_filename("mail.sender.test", "example.net", 1470013207, 1470186007,
                                   "ABC123"),
            "mail.sender.test!example.net!1470013207!1470186007!ABC123.json.gz")
        self.assertEqual(tlsrpt.report_filename("s.test", "d.test", START, END, gzipped=False),
                         f"s.test!d.test!{int(START.timestamp())}!{int(END.timestamp())}.json")
        for bad in [("a!b", "d", 0, 1), ("s", "d/x", 0, 1), ("s", "d", 0, 1, "a-b")]:
            with self.assertRaises(ValueError, msg=bad):
                tlsrpt.report_filename(*bad)


class ResultTypeTests(unittest.SynchronousTestCase):
    def test_verify_error_codes(self):
        self.assertEqual(tlsrpt.result_type_for_verify_error(10), "certificate-expired")
        for code in (2, 18, 19, 20, 21, 27):
            self.assertEqual(tlsrpt.result_type_for_verify_error(code),
                             "certificate-not-trusted", code)
        self.assertEqual(tlsrpt.result_type_for_verify_error(62), "certificate-host-mismatch")
        for code in (9, 23, 7, 9999):  # not yet valid, revoked, bad signature, unknown
            self.assertEqual(tlsrpt.result_type_for_verify_error(code), "validation-failure")

    def test_exceptions(self):
        ssl_error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        mismatch = VerificationError(errors=[])
        self.assertEqual(tlsrpt.result_type_for(mismatch), "certificate-host-mismatch")
        self.assertEqual(tlsrpt.result_type_for(Failure(mismatch)), "certificate-host-mismatch")
        self.assertEqual(tlsrpt.result_type_for(ssl_error), "validation-failure")
        self.assertEqual(tlsrpt.result_type_for(ssl_error, [(0, 10)]), "certificate-expired")
        wrapped = ResponseNeverReceived([Failure(error.ConnectionLost()), Failure(ssl_error)])
        self.assertEqual(tlsrpt.result_type_for(wrapped, [(0, 20)]), "certificate-not-trusted")
        self.assertEqual(tlsrpt.result_type_for(ResponseNeverReceived([Failure(mismatch)])),
                         "certificate-host-mismatch")
        # not TLS failures: no result type, whatever a recorder saw before
        self.assertIsNone(tlsrpt.result_type_for(error.ConnectionRefusedError()))
        self.assertIsNone(tlsrpt.result_type_for(error.TimeoutError(), [(0, 10)]))
        with self.assertRaises(TypeError):
            tlsrpt.result_type_for("certificate verify failed")


class _Closer(protocol.Protocol):
    def __init__(self, done):
        self.done = done

    def connectionMade(self):
        self.transport.write(b"hello")

    def dataReceived(self, data):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback([reason])


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class HandshakeTests(unittest.TestCase):
    """result_type_for on real handshakes over loopback sockets, through the
    one verifying creator wrapped around a TCP endpoint (as the MTA-STS
    policy fetch does)."""

    timeout = 30

    def setUp(self):
        self.ca = trustme.CA()
        self.root = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(self.ca.cert_pem.bytes())])

    @defer.inlineCallbacks
    def handshake(self, cert, name="mx.example.test"):
        port = reactor.listenSSL(0, protocol.Factory.forProtocol(_Echo), _ServerTLS(cert),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = endpoints.wrapClientTLS(
            name_checking_tls(name, (name,), self.root),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        done = defer.Deferred()
        yield endpoint.connect(protocol.Factory.forProtocol(lambda: _Closer(done)))
        return (yield done)  # [reason]: a bare Failure would fail this Deferred

    @defer.inlineCallbacks
    def test_good_certificates(self):
        intermediate = trustme.CA(parent_cert=self.ca)
        for cert in (self.ca.issue_cert("mx.example.test"),
                     intermediate.issue_cert("mx.example.test")):
            [reason] = yield self.handshake(cert)
            self.assertTrue(reason.check(error.ConnectionDone), reason)
            self.assertIsNone(tlsrpt.result_type_for(reason))

    @defer.inlineCallbacks
    def test_failures(self):
        past = datetime.datetime(2020, 1, 1), datetime.datetime(2021, 1, 1)
        cases = [
            (self.ca.issue_cert("mx.example.test", not_before=past[0], not_after=past[1]),
             "certificate-expired"),
            (trustme.CA().issue_cert("mx.example.test"), "certificate-not-trusted"),
            (self.ca.issue_cert("other.example.test"), "certificate-host-mismatch"),
        ]
        for cert, expected in cases:
            [reason] = yield self.handshake(cert)
            self.assertFalse(reason.check(error.ConnectionDone), expected)
            self.assertEqual(tlsrpt.result_type_for(reason), expected)


class _Diagnose(protocol.Protocol):
    """After the (unverified) handshake, diagnose the peer, then close."""

    def __init__(self, done, name, root):
        self.done, self.name, self.root = done, name, root

    def connectionMade(self):
        self.transport.write(b"hello")

    def dataReceived(self, data):
        try:
            self.result = ("ok", tlsrpt.diagnose_peer(self.transport, self.name, self.root))
        except Exception as e:
            self.result = ("error", e)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(getattr(self, "result", ("lost", reason)))


class DiagnoseTests(unittest.TestCase):
    """diagnose_peer after opportunistic (unverified) handshakes: what the
    connector reports in MTA-STS testing mode while delivering anyway."""

    timeout = 30

    @defer.inlineCallbacks
    def diagnose(self, cert, name="mx.example.test", root=None):
        port = reactor.listenSSL(0, protocol.Factory.forProtocol(_Echo), _ServerTLS(cert),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = endpoints.wrapClientTLS(
            opportunistic_tls(name),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        done = defer.Deferred()
        yield endpoint.connect(protocol.Factory.forProtocol(
            lambda: _Diagnose(done, name, root)))
        kind, value = yield done
        self.assertEqual(kind, "ok", value)
        return value

    @defer.inlineCallbacks
    def test_results(self):
        ca = trustme.CA()
        root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.cert_pem.bytes())])
        past = datetime.datetime(2020, 1, 1), datetime.datetime(2021, 1, 1)
        cases = [
            (ca.issue_cert("mx.example.test"), "mx.example.test", root, None),
            (ca.issue_cert("*.example.test"), "mx.example.test", root, None),
            (ca.issue_cert("127.0.0.1"), "127.0.0.1", root, None),
            (trustme.CA(parent_cert=ca).issue_cert("mx.example.test"), "mx.example.test",
             root, None),
            (ca.issue_cert("mx.example.test"), "other.example.test", root,
             "certificate-host-mismatch"),
            (ca.issue_cert("127.0.0.2"), "127.0.0.1", root, "certificate-host-mismatch"),
            (ca.issue_cert("mx.example.test", not_before=past[0], not_after=past[1]),
             "mx.example.test", root, "certificate-expired"),
            (trustme.CA().issue_cert("mx.example.test"), "mx.example.test", root,
             "certificate-not-trusted"),
            # the platform store does not know the test CA
            (ca.issue_cert("mx.example.test"), "mx.example.test", None,
             "certificate-not-trusted"),
        ]
        for cert, name, trust, expected in cases:
            self.assertEqual((yield self.diagnose(cert, name, trust)), expected,
                             (name, expected))

    def test_not_a_connection(self):
        self.assertRaises(TypeError, tlsrpt.diagnose_peer, object(), "mx.example.test")
