"""ses:// against moto in server mode (moto.server.ThreadedMotoServer on
127.0.0.1): the sender identity is verified through the SES v2 API
(botocore's client, in a thread), the message goes through SESDelivery
(treq on this reactor, SigV4 with credentials from the environment), and is
read back from moto's SES backend and compared byte for byte."""

from __future__ import annotations

import os
import urllib.request
from typing import Any

import pytest
from twisted.internet import threads
from twisted.trial import unittest

from tests.support.trial import deferred_test
from twisted_mailout.apps.deliveries import get_delivery
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.outcome import Status

moto_server = pytest.importorskip("moto.server")

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account
ENV = {"AWS_ACCESS_KEY_ID": "AKIDMOTO", "AWS_SECRET_ACCESS_KEY": "moto-secret",
       "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None, "AWS_EC2_METADATA_DISABLED": "true"}


class SESMotoTests(unittest.TestCase):
    def setUp(self) -> Any:
        for name, value in ENV.items():
            old = os.environ.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
            self.addCleanup(lambda n=name, o=old: os.environ.__setitem__(n, o)
                            if o is not None else os.environ.pop(n, None))
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0,
                                                     verbose=False)
        self.server.start()
        self.addCleanup(lambda: threads.deferToThread(self.server.stop))
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self.reset()

    @property
    def backend(self) -> Any:
        """moto's SES backend of the region (the server runs in this process)."""
        from moto.ses.models import ses_backends

        return ses_backends[ACCOUNT][REGION]

    def reset(self) -> Any:
        """Forget identities and messages (moto's backends are process-wide)."""

        def reset() -> None:
            request = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
            urllib.request.urlopen(request, timeout=10).read()

        return threads.deferToThread(reset)

    def verify(self, identity: str) -> Any:
        """Create a verified identity through the SES v2 API (in a thread)."""
        import botocore.session

        def call() -> None:
            client = botocore.session.get_session().create_client(
                "sesv2", region_name=REGION, endpoint_url=self.endpoint)
            client.create_email_identity(EmailIdentity=identity)

        return threads.deferToThread(call)

    def delivery(self, url_tail: str = "") -> Any:
        d = get_delivery(f"ses://{REGION}?endpoint={self.endpoint}{url_tail}")
        self.addCleanup(d.disconnect)
        return d

    @deferred_test
    async def test_raw_message_arrives_unchanged(self) -> None:
        await self.verify("me@example.com")
        data = (b"From: Me <me@example.com>\r\nTo: you@example.org\r\nSubject: moto\r\n"
                b"Message-ID: <1@example.com>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
                b"\r\nhello through SES\r\n")
        report = await self.delivery().send("me@example.com",
                                            ["you@example.org", "hidden@example.net"], data)
        self.assertEqual([r.status for r in report], [Status.DELIVERED] * 2)
        [sent] = self.backend.sent_messages
        self.assertEqual(report.results[0].text, f"2.0.0 Ok {sent.id}")
        self.assertEqual(sent.raw_data.encode(), data)
        self.assertEqual(sent.source, "me@example.com")
        # moto adds the header's addresses to the envelope's; ours are there
        self.assertTrue({"you@example.org", "hidden@example.net"} <= set(sent.destinations))

    @deferred_test
    async def test_unverified_sender_is_bounced(self) -> None:
        report = await self.delivery().send("stranger@example.com", ["you@example.org"],
                                            b"Subject: x\r\n\r\nhi\r\n")
        r = report.results[0]
        self.assertEqual((r.status, r.code, r.enhanced_status), (Status.BOUNCED, 554, "5.7.1"))
        self.assertIn("MessageRejected", r.text)
        self.assertFalse(r.local)
        self.assertEqual(self.backend.sent_messages, [])

    @deferred_test
    async def test_120_recipients_in_three_sends(self) -> None:
        await self.verify("example.com")  # a verified domain covers its addresses
        rcpts = [f"r{i}@example.org" for i in range(120)]
        # no To: moto adds the header's addresses to the 50 of a request and
        # refuses 51 (SES itself takes the Destination only)
        report = await self.delivery().send("list@example.com", rcpts,
                                            b"Subject: many\r\n\r\nx\r\n")
        self.assertEqual(report.accepted, 120)
        sent = self.backend.sent_messages
        self.assertEqual(len(sent), 3)
        self.assertEqual(len({r.text for r in report}), 3)
        got = [a for m in sent for a in m.destinations]
        self.assertEqual(sorted(got), sorted(rcpts))

    @deferred_test
    async def test_mailer_and_send_blocking_from_a_thread(self) -> None:
        await self.verify("me@example.com")
        d = self.delivery()
        report = await threads.deferToThread(
            d.send_blocking, "me@example.com", ["you@example.org"],
            b"From: me@example.com\r\nSubject: blocking\r\n\r\nx\r\n")
        self.assertTrue(report.all_delivered)
        mailer = Mailer(d, sender="me@example.com")
        report = await mailer.send(b"From: me@example.com\r\nTo: b@example.org\r\n"
                                   b"Subject: mailer\r\n\r\ny\r\n")
        self.assertTrue(report.all_delivered)
        self.assertEqual(len(self.backend.sent_messages), 2)
        self.assertIn("Subject: mailer", self.backend.sent_messages[1].raw_data)
