"""sendgrid:// (twisted_mailout.apps.sendgrid): URL and key, the conversion
of messages into Mail Send bodies (each checked against the documented
schema of tests/support/sendgrid.py), and every mapping of an answer or a
failure to a result, against a twisted.web server on loopback in this
reactor (the threaded stand-in run is tests/integration/test_sendgrid_http.py)."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from email.message import EmailMessage
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web import resource, server

from tests.support.sendgrid import schema_errors, semantic_errors
from tests.support.trial import deferred_test
from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.deliveries import get_delivery, parse_url
from twisted_mailout.apps.sendgrid import SendGridDelivery, sendgrid_payload
from twisted_mailout.errors import ConfigError
from twisted_mailout.message import MessageError
from twisted_mailout.outcome import Status

KEY = "SG.unit-test-key-do-not-log"
MESSAGE = b"From: me@example.com\r\nTo: you@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def valid(body: dict[str, Any]) -> dict[str, Any]:
    """C{body}, after checking it against the documented schema and rules."""
    errors = schema_errors(body) or semantic_errors(body)
    assert not errors, errors
    return body


class KeyAndURLTests(unittest.TestCase):
    def setUp(self) -> None:
        self.old = os.environ.pop("SENDGRID_API_KEY", None)
        self.addCleanup(lambda: os.environ.__setitem__("SENDGRID_API_KEY", self.old)
                        if self.old is not None else os.environ.pop("SENDGRID_API_KEY", None))

    def test_key_from_the_environment(self) -> None:
        os.environ["SENDGRID_API_KEY"] = KEY
        d = get_delivery("sendgrid://")
        self.assertIsInstance(d, SendGridDelivery)
        self.assertEqual(d.endpoint, "https://api.sendgrid.com")
        self.assertEqual(d.url(), "sendgrid://")
        self.assertNotIn(KEY, repr(d) + str(d) + d.url() + repr(vars(d).get("relay")))

    def test_key_from_a_file(self) -> None:
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "key")
        with open(path, "w") as f:
            f.write(KEY + "\n")
        d = get_delivery(f"sendgrid://?api_key_file={path}&endpoint=http://127.0.0.1:9&timeout=5")
        self.assertEqual(d.timeout, 5.0)
        self.assertEqual(d.url(), f"sendgrid://?endpoint=http://127.0.0.1:9&api_key_file={path}")
        req = d.build_request(*_env(MESSAGE))
        self.assertEqual(req.headers["Authorization"], f"Bearer {KEY}")
        self.assertEqual(req.url, "http://127.0.0.1:9/v3/mail/send")
        self.assertNotIn(KEY, repr(req) + repr(d))

    def test_no_key_is_refused(self) -> None:
        with self.assertRaises(ConfigError):
            SendGridDelivery()
        with self.assertRaises(ConfigError) as e:
            SendGridDelivery(api_key_file="/nonexistent/key")
        self.assertIn("/nonexistent/key", str(e.exception))
        empty = os.path.join(tempfile.mkdtemp(), "empty")
        open(empty, "w").close()
        with self.assertRaises(ConfigError):
            SendGridDelivery(api_key_file=empty)

    def test_a_key_in_the_url_is_refused_without_echoing_it(self) -> None:
        for url in (f"sendgrid://{KEY}@api.sendgrid.com", f"sendgrid://apikey:{KEY}@x",
                    "sendgrid://host", "sendgrid:///path", "sendgrid://?api_key=x",
                    "sendgrid://?timeout=x", "sendgrid://?endpoint=a&endpoint=b"):
            with self.assertRaises(ValueError, msg=url) as e:
                parse_url(url)
            self.assertNotIn(KEY, str(e.exception))


def _env(message: bytes, sender: str = "me@example.com",
         recipients: tuple[str, ...] = ("you@example.org",)) -> tuple[Any, list[str]]:
    from twisted_mailout.apps.base import prepare

    env = prepare(sender, list(recipients), message)
    return env, env.recipients


class ConversionTests(unittest.TestCase):
    def test_a_full_message(self) -> None:
        msg = build_message(sender="Me Sender <me@example.com>",
                            to=["Ann <ann@example.org>", "zed@example.org"],
                            cc=["Bob <bob@example.org>"], bcc=["carl@example.net"],
                            subject="Grüße", text="plain text", html="<p>html</p>",
                            reply_to=["Help <help@example.com>"],
                            attachments=[("report.pdf", b"%PDF-1.4 data", "application/pdf")],
                            headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@x>"})
        data = bytes(msg.as_bytes()) if hasattr(msg, "as_bytes") else bytes(msg)
        body = valid(sendgrid_payload("me@example.com", ["ann@example.org", "zed@example.org",
                                                         "bob@example.org", "carl@example.net"],
                                      data))
        self.assertEqual(body["personalizations"], [{
            "to": [{"email": "ann@example.org", "name": "Ann"}, {"email": "zed@example.org"}],
            "cc": [{"email": "bob@example.org", "name": "Bob"}],
            "bcc": [{"email": "carl@example.net"}]}])
        self.assertEqual(body["from"], {"email": "me@example.com", "name": "Me Sender"})
        self.assertEqual(body["reply_to"], {"email": "help@example.com", "name": "Help"})
        self.assertEqual(body["subject"], "Grüße")
        self.assertEqual(body["content"], [{"type": "text/plain", "value": "plain text\n"},
                                           {"type": "text/html", "value": "<p>html</p>\n"}])
        [att] = body["attachments"]
        self.assertEqual((att["filename"], att["type"], att["disposition"]),
                         ("report.pdf", "application/pdf", "attachment"))
        self.assertEqual(base64.b64decode(att["content"]), b"%PDF-1.4 data")
        self.assertEqual(body["headers"]["X-Campaign"], "spring")
        self.assertEqual(body["headers"]["List-Unsubscribe"], "<mailto:u@x>")
        self.assertIn("Message-ID", body["headers"])
        for gone in ("Date", "MIME-Version", "Content-Type", "To", "Bcc"):
            self.assertNotIn(gone, body["headers"])

    def test_inline_image_with_content_id(self) -> None:
        m = EmailMessage()
        m["From"] = "me@example.com"
        m["To"] = "you@example.org"
        m["Subject"] = "pic"
        m.set_content("see the picture")
        m.add_alternative('<img src="cid:logo@x">', subtype="html")
        html = m.get_payload()[1]
        html.add_related(b"\x89PNG...", maintype="image", subtype="png", cid="<logo@x>")
        body = valid(sendgrid_payload("me@example.com", ["you@example.org"], m.as_bytes()))
        [img] = body["attachments"]
        self.assertEqual((img["type"], img["disposition"], img["content_id"]),
                         ("image/png", "inline", "logo@x"))
        self.assertTrue(img["filename"].startswith("part"))
        self.assertEqual([c["type"] for c in body["content"]], ["text/plain", "text/html"])

    def test_html_only_and_extra_text_parts(self) -> None:
        m = EmailMessage()
        m["From"] = "me@example.com"
        m["Subject"] = "s"
        m.set_content("<b>x</b>", subtype="html")
        m.add_attachment("second text", filename="notes.txt")
        body = valid(sendgrid_payload("me@example.com", ["you@example.org"], m.as_bytes()))
        self.assertEqual(body["content"], [{"type": "text/html", "value": "<b>x</b>\n"}])
        self.assertEqual(body["attachments"][0]["filename"], "notes.txt")

    def test_attached_message_is_one_attachment(self) -> None:
        inner = EmailMessage()
        inner["Subject"] = "inner"
        inner.set_content("inner body")
        m = EmailMessage()
        m["From"] = "me@example.com"
        m["To"] = "you@example.org"
        m["Subject"] = "fwd"
        m.set_content("outer body")
        m.add_attachment(inner)
        body = valid(sendgrid_payload("me@example.com", ["you@example.org"], m.as_bytes()))
        self.assertEqual(body["content"], [{"type": "text/plain", "value": "outer body\n"}])
        [att] = body["attachments"]
        self.assertEqual(att["type"], "message/rfc822")
        self.assertIn(b"inner body", base64.b64decode(att["content"]))

    def test_no_envelope_recipient_in_to_gives_one_copy_each(self) -> None:
        data = (b"From: me@example.com\r\nTo: undisclosed-recipients:;\r\nCc: c@example.org\r\n"
                b"Subject: s\r\n\r\nhi\r\n")
        body = valid(sendgrid_payload("me@example.com", ["a@example.org", "c@example.org",
                                                         "A@example.org"], data))
        self.assertEqual(body["personalizations"], [{"to": [{"email": "c@example.org"}]},
                                                    {"to": [{"email": "a@example.org"}]}])

    def test_no_from_uses_the_envelope_sender_or_refuses(self) -> None:
        data = b"To: you@example.org\r\nSubject: s\r\n\r\nhi\r\n"
        self.assertEqual(valid(sendgrid_payload("bounce@example.com", ["you@example.org"],
                                                data))["from"],
                         {"email": "bounce@example.com"})
        with self.assertRaises(MessageError):
            sendgrid_payload("", ["you@example.org"], data)

    def test_several_reply_to_and_no_text(self) -> None:
        data = (b"From: me@example.com\r\nTo: you@example.org\r\nSubject: s\r\n"
                b"Reply-To: a@example.com, B <b@example.com>\r\nContent-Type: image/gif\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\nR0lGODlh\r\n")
        body = valid(sendgrid_payload("me@example.com", ["you@example.org"], data))
        self.assertEqual(body["reply_to_list"], [{"email": "a@example.com"},
                                                 {"email": "b@example.com", "name": "B"}])
        self.assertEqual(body["content"], [{"type": "text/plain", "value": " "}])
        self.assertEqual(body["attachments"][0]["type"], "image/gif")

    def test_no_subject_is_left_out(self) -> None:
        body = sendgrid_payload("me@example.com", ["you@example.org"],
                                b"From: me@example.com\r\nTo: you@example.org\r\n\r\nhi\r\n")
        self.assertNotIn("subject", body)
        self.assertEqual(schema_errors(body), [])
        self.assertEqual(semantic_errors(body)[0]["field"], "subject")

    def test_repeated_and_folded_headers(self) -> None:
        data = (b"From: me@example.com\r\nTo: you@example.org\r\nSubject: s\r\n"
                b"X-Tag: one\r\nX-Tag: two\r\nX-Long: a\r\n b\r\nSender: s@example.com\r\n"
                b"\r\nhi\r\n")
        body = valid(sendgrid_payload("me@example.com", ["you@example.org"], data))
        self.assertEqual(body["headers"], {"X-Tag": "one", "X-Long": "a b"})


class FakeSendGrid(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answer: tuple[int, dict[str, str], bytes] = (202, {"X-Message-Id": "sg-1"}, b"")
        self.requests: list[tuple[dict[str, str], Any]] = []

    def render_POST(self, request: Any) -> bytes:
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((headers, json.loads(request.content.read())))
        code, extra, body = self.answer
        request.setResponseCode(code)
        for k, v in extra.items():
            request.setHeader(k, v)
        if code == 0:  # drop the connection without an answer
            request.transport.abortConnection()
            return server.NOT_DONE_YET  # type: ignore[return-value]
        return body


def errors(*pairs: tuple[str | None, str]) -> bytes:
    return json.dumps({"errors": [{"field": f, "message": m} for f, m in pairs]}).encode()


class MappingTests(unittest.TestCase):
    async def one(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None
                  ) -> Any:
        fake = FakeSendGrid()
        fake.answer = (code, headers or {}, body)
        port = reactor.listenTCP(0, server.Site(fake), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        d = SendGridDelivery(endpoint=f"http://127.0.0.1:{port.getHost().port}", api_key=KEY)
        self.addCleanup(d.disconnect)
        report = await d.send("me@example.com", ["you@example.org"], MESSAGE, message_id="MID")
        self.assertEqual(len(fake.requests), 1)
        headers_seen, body = fake.requests[0]
        self.assertEqual(headers_seen["authorization"], f"Bearer {KEY}")
        valid(body)
        return report.results[0]

    @deferred_test
    async def test_accepted(self) -> None:
        r = await self.one(202, headers={"X-Message-Id": "abc123"})
        self.assertEqual((r.status, r.code, r.text, r.queue_id),
                         (Status.DELIVERED, 250, "2.0.0 Ok abc123", "MID"))

    @deferred_test
    async def test_bad_request_bounces_with_the_error_list(self) -> None:
        r = await self.one(400, errors(("personalizations.0.to.0.email", "Does not contain a "
                                        "valid address."), (None, "second")))
        self.assertEqual((r.status, r.code, r.enhanced_status), (Status.BOUNCED, 554, "5.6.0"))
        self.assertIn("personalizations.0.to.0.email: Does not contain a valid address.; second",
                      r.text)

    @deferred_test
    async def test_forbidden_bounces(self) -> None:
        r = await self.one(403, errors((None, "The from address does not match a verified "
                                              "Sender Identity.")))
        self.assertEqual((r.status, r.code, r.enhanced_status), (Status.BOUNCED, 550, "5.7.1"))
        self.assertIn("verified Sender Identity", r.text)

    @deferred_test
    async def test_too_large_bounces(self) -> None:
        r = await self.one(413, errors((None, "content too large")))
        self.assertEqual((r.status, r.enhanced_status), (Status.BOUNCED, "5.3.4"))

    @deferred_test
    async def test_unauthorized_defers(self) -> None:
        r = await self.one(401, errors((None, "authorization required")))
        self.assertEqual((r.status, r.enhanced_status), (Status.DEFERRED, "4.7.0"))
        self.assertNotIn(KEY, r.text)

    @deferred_test
    async def test_throttled_defers(self) -> None:
        r = await self.one(429, errors((None, "too many requests")))
        self.assertEqual((r.status, r.code, r.enhanced_status), (Status.DEFERRED, 451, "4.7.0"))

    @deferred_test
    async def test_server_error_defers(self) -> None:
        r = await self.one(503, b"<html>unavailable</html>")
        self.assertEqual((r.status, r.enhanced_status), (Status.DEFERRED, "4.3.0"))
        self.assertIn("unavailable", r.text)

    @deferred_test
    async def test_connection_dropped_defers(self) -> None:
        r = await self.one(0)
        self.assertEqual((r.status, r.enhanced_status, r.local), (Status.DEFERRED, "4.4.2", True))

    @deferred_test
    async def test_a_message_that_cannot_be_converted_fails_the_deferred(self) -> None:
        d = SendGridDelivery(endpoint="http://127.0.0.1:9", api_key=KEY)
        with self.assertRaises(MessageError):
            await d.send("", ["you@example.org"], b"Subject: s\r\n\r\nno From\r\n")
