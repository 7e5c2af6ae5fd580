"""sendgrid:// against a loopback stand-in of SendGrid's Mail Send API
(tests/support/sendgrid.py: http.server in a thread) that checks the bearer
key and every request body against the documented schema and rules, and
answers as SendGrid does: 202 with X-Message-Id, 400 with its error list,
401 for a wrong key."""

from __future__ import annotations

import base64
import os
import tempfile
from typing import Any

from twisted.internet import threads
from twisted.trial import unittest

from tests.support.sendgrid import SendGridServer
from tests.support.trial import deferred_test
from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.deliveries import get_delivery
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.outcome import Status

KEY = "SG.integration-key"


class SendGridHTTPTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = SendGridServer(api_key=KEY).start()
        self.addCleanup(lambda: threads.deferToThread(self.server.stop))
        folder = tempfile.mkdtemp()
        self.key_file = os.path.join(folder, "sendgrid.key")
        with open(self.key_file, "w") as f:
            f.write(KEY + "\n")
        os.chmod(self.key_file, 0o600)

    def delivery(self, key_file: str | None = None) -> Any:
        d = get_delivery(f"sendgrid://?endpoint={self.server.endpoint}"
                         f"&api_key_file={key_file or self.key_file}")
        self.addCleanup(d.disconnect)
        return d

    @deferred_test
    async def test_a_built_message_is_accepted_as_documented(self) -> None:
        msg = build_message(sender="Shop <shop@example.com>", to=["Ann <ann@example.org>"],
                            cc=["bob@example.org"], subject="Your order", text="Thanks!",
                            html="<p>Thanks!</p>", reply_to=["help@example.com"],
                            attachments=[("invoice.pdf", b"%PDF invoice", "application/pdf")],
                            headers={"X-Order": "42"})
        report = await self.delivery().send(
            "shop@example.com", ["ann@example.org", "bob@example.org", "audit@example.net"],
            bytes(msg.as_bytes()))
        self.assertEqual([r.status for r in report], [Status.DELIVERED] * 3)
        [got] = self.server.received
        self.assertEqual(report.results[0].text, f"2.0.0 Ok {got.message_id}")
        self.assertEqual(got.headers["Authorization"], f"Bearer {KEY}")
        body = got.body
        self.assertEqual(body["personalizations"][0]["bcc"], [{"email": "audit@example.net"}])
        self.assertEqual(body["subject"], "Your order")
        self.assertEqual(body["headers"]["X-Order"], "42")
        self.assertEqual(base64.b64decode(body["attachments"][0]["content"]), b"%PDF invoice")

    @deferred_test
    async def test_refused_by_the_schema_rules_is_bounced_with_the_errors(self) -> None:
        report = await self.delivery().send(
            "shop@example.com", ["ann@example.org"],
            b"From: shop@example.com\r\nTo: ann@example.org\r\n\r\nno subject\r\n")
        r = report.results[0]
        self.assertEqual((r.status, r.code), (Status.BOUNCED, 554))
        self.assertIn("subject: The subject is required", r.text)

    @deferred_test
    async def test_wrong_key_is_deferred(self) -> None:
        wrong = os.path.join(tempfile.mkdtemp(), "wrong.key")
        with open(wrong, "w") as f:
            f.write("SG.wrong\n")
        report = await self.delivery(wrong).send(
            "shop@example.com", ["ann@example.org"], b"Subject: s\r\n\r\nx\r\n")
        r = report.results[0]
        self.assertEqual((r.status, r.code, r.enhanced_status), (Status.DEFERRED, 451, "4.7.0"))
        self.assertNotIn("SG.wrong", r.text)
        self.assertEqual(self.server.received, [])

    @deferred_test
    async def test_throttled_and_server_errors_are_deferred(self) -> None:
        self.server.answer_next(429, {"errors": [{"message": "too many requests"}]})
        self.server.answer_next(500, {"errors": [{"message": "internal server error"}]})
        d = self.delivery()
        for expected in ("4.7.0", "4.3.0"):
            report = await d.send("shop@example.com", ["ann@example.org"],
                                  b"Subject: s\r\n\r\nx\r\n")
            r = report.results[0]
            self.assertEqual((r.status, r.enhanced_status), (Status.DEFERRED, expected))

    @deferred_test
    async def test_blocking_and_mailer(self) -> None:
        d = self.delivery()
        report = await threads.deferToThread(d.send_blocking, "shop@example.com",
                                             ["ann@example.org"], b"Subject: s\r\n\r\nx\r\n")
        self.assertTrue(report.all_delivered)
        mailer = Mailer(d, sender="shop@example.com")
        report = await mailer.send(build_message(sender="shop@example.com",
                                                 to=["ann@example.org"], subject="m",
                                                 text="via the mailer"))
        self.assertTrue(report.all_delivered)
        self.assertEqual(self.server.received[1].body["content"],
                         [{"type": "text/plain", "value": "via the mailer\n"}])
