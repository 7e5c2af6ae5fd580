"""ses:// (twisted_mailout.apps.ses): URL, request, credentials, and every
mapping of an answer or a failure to a result, against a twisted.web server
on loopback in this reactor that answers as SES does (moto's run is in
tests/integration/test_ses_moto.py)."""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
from typing import Any

from botocore.credentials import Credentials
from twisted.internet import defer, reactor
from twisted.python import threadable
from twisted.trial import unittest
from twisted.web import resource, server

from tests.support.trial import deferred_test
from twisted_mailout.apps.base import prepare
from twisted_mailout.apps.deliveries import get_delivery, parse_url
from twisted_mailout.apps.httpapi import HTTPAnswer
from twisted_mailout.apps.ses import SESDelivery, ses_endpoint
from twisted_mailout.message import MessageError
from twisted_mailout.outcome import Status

MESSAGE = b"From: me@example.com\r\nTo: you@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


class FakeSES(resource.Resource):
    """Answers C{POST /v2/email/outbound-emails} with scripted answers (one
    per request, the last repeated) and records each request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[int, dict[str, str], Any]] = [(200, {}, {"MessageId": "m-1"})]
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.hang = False

    def render_POST(self, request: Any) -> Any:
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.path.decode(), headers,
                              json.loads(request.content.read())))
        if self.hang:
            return server.NOT_DONE_YET
        code, extra, body = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        request.setResponseCode(code)
        request.setHeader("Content-Type", "application/json")
        for k, v in extra.items():
            request.setHeader(k, v)
        return json.dumps(body).encode()


def error(code: int, kind: str, message: str) -> tuple[int, dict[str, str], Any]:
    """An SES v2 (REST-JSON) error answer."""
    return (code, {"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/"},
            {"message": message})


class Base(unittest.TestCase):
    def serve(self) -> FakeSES:
        fake = FakeSES()
        port = reactor.listenTCP(0, server.Site(fake), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.endpoint = f"http://127.0.0.1:{port.getHost().port}"
        return fake

    def delivery(self, **kwargs: Any) -> SESDelivery:
        kwargs.setdefault("endpoint", self.endpoint)
        kwargs.setdefault("credentials", Credentials("AKIDTEST", "secret-key"))
        d = SESDelivery("eu-west-1", **kwargs)
        self.addCleanup(d.disconnect)
        return d

    def env(self, **values: str | None) -> None:
        """Set (or with L{None} unset) environment variables for this test."""
        for name, value in values.items():
            old = os.environ.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
            self.addCleanup(lambda n=name, o=old: os.environ.__setitem__(n, o) if o is not None
                            else os.environ.pop(n, None))


class URLTests(unittest.TestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_url("ses://eu-west-1?endpoint=http://127.0.0.1:9&"
                                   "configuration_set=cs&timeout=5&profile=p"),
                         {"scheme": "ses", "region": "eu-west-1",
                          "endpoint": "http://127.0.0.1:9", "configuration_set": "cs",
                          "timeout": 5.0, "profile": "p"})

    def test_refused(self) -> None:
        for url in ("ses://user:pw@eu-west-1", "ses://eu-west-1:99", "ses://eu-west-1/path",
                    "ses://eu-west-1?nope=1", "ses://eu-west-1?timeout=x",
                    "ses://eu-west-1?profile=a&profile=b"):
            with self.assertRaises(ValueError, msg=url) as e:
                parse_url(url)
            self.assertNotIn("pw", str(e.exception))

    def test_bad_region_and_endpoint(self) -> None:
        with self.assertRaises(ValueError):
            SESDelivery("Europe")
        with self.assertRaises(ValueError):
            SESDelivery("eu-west-1", endpoint="ftp://x")
        with self.assertRaises(ValueError):
            SESDelivery("eu-west-1", endpoint="http://127.0.0.1:9/path?q=1")

    def test_endpoint_and_url(self) -> None:
        self.assertEqual(ses_endpoint("eu-west-1"), "https://email.eu-west-1.amazonaws.com")
        self.assertEqual(ses_endpoint("cn-north-1"), "https://email.cn-north-1.amazonaws.com.cn")
        d = get_delivery("ses://eu-west-1?configuration_set=cs")
        self.assertIsInstance(d, SESDelivery)
        self.assertEqual(d.endpoint, "https://email.eu-west-1.amazonaws.com")
        self.assertEqual(d.relay, "email.eu-west-1.amazonaws.com:443")
        self.assertEqual(d.url(), "ses://eu-west-1?configuration_set=cs")
        self.assertTrue(d.asynchronous)

    def test_region_from_the_environment(self) -> None:
        old = os.environ.get("AWS_DEFAULT_REGION")
        os.environ["AWS_DEFAULT_REGION"] = "ap-south-1"
        try:
            self.assertEqual(get_delivery("ses://").region, "ap-south-1")
        finally:
            if old is None:
                del os.environ["AWS_DEFAULT_REGION"]
            else:
                os.environ["AWS_DEFAULT_REGION"] = old


class RequestTests(Base):
    def test_body_and_signature(self) -> None:
        self.endpoint = "http://127.0.0.1:9"
        d = self.delivery(configuration_set="cs",
                          credentials=Credentials("AKIDTEST", "secret-key", "session-token"))
        env = prepare("me@example.com", ["you@example.org", "b@example.net"], MESSAGE)
        req = d.build_request(env, env.recipients)
        body = json.loads(req.body)
        self.assertEqual(base64.b64decode(body["Content"]["Raw"]["Data"]), env.data)
        self.assertEqual(body["Destination"], {"ToAddresses": ["you@example.org", "b@example.net"]})
        self.assertEqual(body["FromEmailAddress"], "me@example.com")
        self.assertEqual(body["ConfigurationSetName"], "cs")
        self.assertEqual(req.url, "http://127.0.0.1:9/v2/email/outbound-emails")
        auth = req.headers["Authorization"]
        self.assertTrue(auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/"))
        self.assertIn("/eu-west-1/ses/aws4_request", auth)
        self.assertEqual(req.headers["X-Amz-Security-Token"], "session-token")
        self.assertNotIn("secret-key", repr(req) + repr(d) + d.url())

    def test_null_sender_leaves_from_out(self) -> None:
        self.endpoint = "http://127.0.0.1:9"
        env = prepare("", ["you@example.org"], MESSAGE)
        self.assertNotIn("FromEmailAddress", self.delivery().body(env, env.recipients))

    def test_credentials_from_the_environment(self) -> None:
        self.endpoint = "http://127.0.0.1:9"
        self.env(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY="env-secret",
                 AWS_SESSION_TOKEN=None, AWS_PROFILE=None)
        d = SESDelivery("eu-west-1", endpoint=self.endpoint)
        env = prepare("me@example.com", ["you@example.org"], MESSAGE)
        self.assertIn("Credential=AKIDENV/", d.build_request(env, env.recipients)
                      .headers["Authorization"])

    def test_credentials_from_a_profile_in_the_shared_file(self) -> None:
        self.endpoint = "http://127.0.0.1:9"
        folder = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(folder))
        path = os.path.join(folder, "credentials")
        with open(path, "w") as f:
            f.write("[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = a\n"
                    "[mail]\naws_access_key_id = AKIDFILE\naws_secret_access_key = b\n")
        self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None,
                 AWS_PROFILE=None, AWS_SHARED_CREDENTIALS_FILE=path,
                 AWS_CONFIG_FILE=os.path.join(folder, "none"))
        d = get_delivery(f"ses://eu-west-1?profile=mail&endpoint={self.endpoint}")
        env = prepare("me@example.com", ["you@example.org"], MESSAGE)
        self.assertIn("Credential=AKIDFILE/", d.build_request(env, env.recipients)
                      .headers["Authorization"])

    @deferred_test
    async def test_credentials_and_signing_run_off_the_reactor_thread(self) -> None:
        self.serve()
        where: list[bool] = []

        class Watched:
            def get_frozen_credentials(self) -> Any:
                where.append(threadable.isInIOThread())
                return Credentials("AKIDTEST", "secret-key")

        report = await self.delivery(credentials=Watched()).send(
            "me@example.com", ["you@example.org"], MESSAGE)
        self.assertTrue(report.all_delivered)
        self.assertEqual(where, [False])

    @deferred_test
    async def test_no_credentials_defers_every_recipient(self) -> None:
        fake = self.serve()
        folder = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(folder))
        self.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None,
                 AWS_PROFILE=None, AWS_SHARED_CREDENTIALS_FILE=os.path.join(folder, "c"),
                 AWS_CONFIG_FILE=os.path.join(folder, "none"), AWS_EC2_METADATA_DISABLED="true",
                 AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=None,
                 AWS_CONTAINER_CREDENTIALS_FULL_URI=None, AWS_WEB_IDENTITY_TOKEN_FILE=None)
        d = SESDelivery("eu-west-1", endpoint=self.endpoint)
        self.addCleanup(d.disconnect)
        report = await d.send("me@example.com", ["a@example.org", "b@example.org"], MESSAGE)
        self.assertEqual([r.status for r in report], [Status.DEFERRED] * 2)
        self.assertIn("no AWS credentials", report.results[0].text)
        self.assertTrue(report.results[0].local)
        self.assertEqual(fake.requests, [])
        self.flushLoggedErrors(LookupError)


class MappingTests(Base):
    async def one(self, answer: tuple[int, dict[str, str], Any]) -> Any:
        fake = self.serve()
        fake.answers = [answer]
        report = await self.delivery().send("me@example.com", ["you@example.org"], MESSAGE,
                                            message_id="ABC")
        self.assertEqual(len(fake.requests), 1)
        return report.results[0]

    @deferred_test
    async def test_accepted_gives_the_message_id(self) -> None:
        r = await self.one((200, {}, {"MessageId": "0102-abc"}))
        self.assertEqual((r.status, r.code, r.text), (Status.DELIVERED, 250, "2.0.0 Ok 0102-abc"))
        self.assertEqual(r.relay, self.endpoint.split("//")[1])
        self.assertEqual(r.queue_id, "ABC")
        self.assertFalse(r.local)

    @deferred_test
    async def test_message_rejected_bounces(self) -> None:
        r = await self.one(error(400, "MessageRejected", "Email address is not verified."))
        self.assertEqual((r.status, r.code), (Status.BOUNCED, 554))
        self.assertEqual(r.enhanced_status, "5.7.1")
        self.assertIn("MessageRejected: Email address is not verified.", r.text)

    @deferred_test
    async def test_mail_from_not_verified_bounces(self) -> None:
        r = await self.one(error(400, "MailFromDomainNotVerifiedException", "no"))
        self.assertEqual((r.status, r.code, r.enhanced_status), (Status.BOUNCED, 550, "5.7.1"))

    @deferred_test
    async def test_bad_request_bounces(self) -> None:
        r = await self.one(error(400, "BadRequestException", "Illegal address"))
        self.assertEqual((r.status, r.enhanced_status), (Status.BOUNCED, "5.6.0"))

    @deferred_test
    async def test_throttling_defers(self) -> None:
        r = await self.one(error(429, "TooManyRequestsException", "Maximum sending rate exceeded"))
        self.assertEqual((r.status, r.code, r.enhanced_status), (Status.DEFERRED, 451, "4.7.0"))
        self.assertIn("Maximum sending rate exceeded", r.text)

    @deferred_test
    async def test_quota_and_paused_account_defer(self) -> None:
        for kind in ("LimitExceededException", "SendingPausedException",
                     "AccountSuspendedException"):
            r = await self.one(error(400, kind, "account"))
            self.assertEqual((r.status, r.enhanced_status), (Status.DEFERRED, "4.7.0"), kind)

    @deferred_test
    async def test_server_error_defers(self) -> None:
        r = await self.one(error(500, "InternalFailure", "oops"))
        self.assertEqual((r.status, r.enhanced_status), (Status.DEFERRED, "4.3.0"))
        r = await self.one((503, {}, {}))
        self.assertEqual(r.status, Status.DEFERRED)

    @deferred_test
    async def test_bad_credentials_defer(self) -> None:
        r = await self.one(error(403, "UnrecognizedClientException", "The security token ..."))
        self.assertEqual((r.status, r.enhanced_status), (Status.DEFERRED, "4.7.0"))

    @deferred_test
    async def test_missing_configuration_set_defers(self) -> None:
        r = await self.one(error(404, "NotFoundException", "Configuration set does not exist"))
        self.assertEqual((r.status, r.enhanced_status), (Status.DEFERRED, "4.3.5"))

    def test_error_type_from_the_body(self) -> None:
        d = SESDelivery("eu-west-1", credentials=Credentials("a", "b"))
        reply = d.interpret(HTTPAnswer(400, {}, b'{"__type": "MessageRejected", '
                                               b'"Message": "Did not have authority"}'))
        self.assertEqual(reply.code, 554)
        self.assertIn("Did not have authority", reply.text)

    @deferred_test
    async def test_connection_refused_defers(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.endpoint = f"http://127.0.0.1:{port}"
        report = await self.delivery().send("me@example.com", ["you@example.org"], MESSAGE)
        r = report.results[0]
        self.assertEqual((r.status, r.enhanced_status, r.local, r.relay),
                         (Status.DEFERRED, "4.4.1", True, None))

    @deferred_test
    async def test_no_answer_in_time_defers(self) -> None:
        fake = self.serve()
        fake.hang = True
        report = await self.delivery(timeout=0.3).send("me@example.com", ["you@example.org"],
                                                       MESSAGE)
        r = report.results[0]
        self.assertEqual((r.status, r.enhanced_status, r.local), (Status.DEFERRED, "4.4.2", True))
        self.assertIn("may have accepted", r.text)

    @deferred_test
    async def test_more_than_50_recipients_go_in_several_requests(self) -> None:
        fake = self.serve()
        fake.answers = [(200, {}, {"MessageId": "first"}),
                        error(400, "MessageRejected", "second refused"),
                        (200, {}, {"MessageId": "third"})]
        rcpts = [f"r{i}@example.org" for i in range(120)]
        report = await self.delivery().send("me@example.com", rcpts, MESSAGE)
        self.assertEqual([len(b["Destination"]["ToAddresses"]) for _, _, b in fake.requests],
                         [50, 50, 20])
        self.assertEqual([r.recipient for r in report], rcpts)
        self.assertEqual({r.text for r in report.results[:50]}, {"2.0.0 Ok first"})
        self.assertEqual({r.status for r in report.results[50:100]}, {Status.BOUNCED})
        self.assertEqual({r.text for r in report.results[100:]}, {"2.0.0 Ok third"})

    @deferred_test
    async def test_bad_input_fails_the_deferred(self) -> None:
        self.serve()
        with self.assertRaises(ValueError):
            await self.delivery().send("me@example.com", [], MESSAGE)
        with self.assertRaises(MessageError):
            await self.delivery().send("me@example.com", ["you@example.org"], b"")

    @deferred_test
    async def test_cancel_aborts_the_request(self) -> None:
        fake = self.serve()
        fake.hang = True
        d = self.delivery().send("me@example.com", ["you@example.org"], MESSAGE)
        while not fake.requests:
            await _tick()
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d


def _tick() -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d
