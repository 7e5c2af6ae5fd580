"""marrow.mailer's message features in build_message and the Mailer: bodies
given as callables (rendered when the message is serialised for sending),
notify, priority, organization and per-message retries (tried again by the
Mailer, for synchronous and direct deliveries, attempts counted)."""

from __future__ import annotations

import email
import email.policy
import functools

import pytest
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.support.peers import AiosmtpdSink
from twisted_mailout import MessageError
from twisted_mailout.apps.builder import (
    BuiltMessage,
    build_message,
    jinja2_body,
    message_retries,
)
from twisted_mailout.apps.deliveries import DeliveryError, MemoryDelivery
from twisted_mailout.apps.mailer import MailBounced, MailDeferred, MailDelivered, Mailer
from twisted_mailout.envelope import Reply


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def body_text(part) -> str:
    return part.get_content().replace("\r\n", "\n")


# -- callable bodies ------------------------------------------------------------

def test_callable_bodies_are_called_at_serialisation_each_time_not_at_build():
    calls = []

    def text():
        calls.append("text")
        return f"render {len(calls)}\n"

    msg = build_message(sender="a@origin.test", to="b@dest.test", subject="s", text=text)
    assert calls == []
    assert isinstance(msg, BuiltMessage) and msg.lazy
    first = parse(msg.as_bytes())
    second = parse(msg.as_bytes())
    assert calls == ["text", "text"]
    assert body_text(first) == "render 1\n" and body_text(second) == "render 2\n"
    # the header fields were made once, at build time
    assert first["Message-ID"] == second["Message-ID"] == msg["Message-ID"]
    assert first["Date"] == msg["Date"]
    assert "render 3" in str(msg)  # str() renders too


def test_callable_html_with_text_inline_part_and_attachment_keeps_the_structure():
    msg = build_message(sender="a@origin.test", to="b@dest.test", subject="s",
                        text=lambda: "plain\n",
                        html=functools.partial("<p>{}</p><img src='cid:logo'>\n".format, "rich"),
                        inline=[("logo", b"\x89PNG....", "image/png")],
                        attachments=[("a.txt", b"attached")])
    rendered = msg.render()
    assert not isinstance(rendered, BuiltMessage) or not rendered.lazy
    m = parse(msg.as_bytes())
    assert m.get_content_type() == "multipart/mixed"
    alt, att = m.get_payload()
    assert alt.get_content_type() == "multipart/alternative"
    plain, related = alt.get_payload()
    assert body_text(plain) == "plain\n"
    html, logo = related.get_payload()
    assert body_text(html) == "<p>rich</p><img src='cid:logo'>\n"
    assert logo["Content-ID"] == "<logo>"
    assert att.get_filename() == "a.txt" and att.get_payload(decode=True) == b"attached"
    # the same as an eagerly built message with the rendered texts
    eager = build_message(sender="a@origin.test", to="b@dest.test", subject="s",
                          text="plain\n", html="<p>rich</p><img src='cid:logo'>\n",
                          inline=[("logo", b"\x89PNG....", "image/png")],
                          attachments=[("a.txt", b"attached")], message_id=msg["Message-ID"])
    assert not eager.lazy
    assert [p.get_content_type() for p in parse(eager.as_bytes()).walk()] == \
        [p.get_content_type() for p in m.walk()]


def test_a_callable_returning_something_else_fails_at_send_time():
    msg = build_message(sender="a@origin.test", to="b@dest.test", text=lambda: b"bytes")
    with pytest.raises(MessageError, match="returned bytes, not str"):
        msg.as_bytes()
    with pytest.raises(ValueError, match="must be a str or a callable"):
        build_message(sender="a@origin.test", to="b@dest.test", text=42)  # type: ignore[arg-type]


def test_a_template_error_reaches_the_sender_and_nothing_is_delivered():
    def broken() -> str:
        raise KeyError("order")

    mailer = Mailer("memory://")
    with pytest.raises(KeyError):
        mailer.send(build_message(sender="a@origin.test", to="b@dest.test", text=broken))
    assert mailer.delivery.outbox == []


def test_mailer_sends_the_rendered_body():
    state = {"name": "Zoë"}
    mailer = Mailer("memory://")
    msg = build_message(sender="a@origin.test", to="b@dest.test", subject="hi",
                        text=lambda: f"Hello {state['name']}\n")
    state["name"] = "Ann"  # rendered at send time: the change shows
    mailer.send(msg)
    [sent] = mailer.delivery.outbox
    assert body_text(sent.message) == "Hello Ann\n"
    assert sent.recipients == ["b@dest.test"]


# -- Jinja2 ---------------------------------------------------------------------

def test_jinja2_body_from_source_renders_at_send_time_and_escapes_html_when_asked():
    pytest.importorskip("jinja2")
    context = {"name": "<Zoë>"}
    text = jinja2_body("Hello {{ name }}\n", context)
    html = jinja2_body("<p>Hello {{ name }}</p>\n", context, autoescape=True)
    msg = build_message(sender="a@origin.test", to="b@dest.test", text=text, html=html)
    text.context["name"] = "<Ann>"
    plain, rich = parse(msg.as_bytes()).get_payload()
    assert body_text(plain) == "Hello <Ann>\n"
    assert body_text(rich) == "<p>Hello &lt;Ann&gt;</p>\n"


def test_jinja2_body_by_name_in_an_environment():
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(loader=jinja2.DictLoader({"order.txt": "Order {{ n }}\n"}),
                             undefined=jinja2.StrictUndefined)
    msg = build_message(sender="a@origin.test", to="b@dest.test",
                        text=jinja2_body("order.txt", {"n": 7}, environment=env))
    assert body_text(parse(msg.as_bytes())) == "Order 7\n"
    missing = build_message(sender="a@origin.test", to="b@dest.test",
                            text=jinja2_body("order.txt", {}, environment=env))
    with pytest.raises(jinja2.UndefinedError):
        missing.as_bytes()
    with pytest.raises(jinja2.TemplateSyntaxError):
        jinja2_body("{% if %}")


# -- notify, priority, organization -----------------------------------------------

def test_notify_priority_and_organization_fields():
    msg = build_message(sender="a@origin.test", to="b@dest.test", text="x",
                        notify=["Receipts <receipts@origin.test>", "c@bücher.test"],
                        priority=1, organization="Ångström & Co")
    m = parse(msg.as_bytes())
    # (folded onto the next line: the parser keeps the folding white space)
    assert m["Disposition-Notification-To"].strip() == \
        "Receipts <receipts@origin.test>, c@xn--bcher-kva.test"
    assert m["X-Priority"] == "1"
    assert m["Organization"] == "Ångström & Co"
    assert msg.as_bytes().isascii()  # the organization is RFC 2047 encoded


@pytest.mark.parametrize("value,written", [
    (5, "5"), ("3", "3"), ("high", "2"), ("Lowest", "5"), ("urgent", "1"),
    ("1 (Highest)", "1 (Highest)"),
])
def test_priority_values(value, written):
    msg = build_message(sender="a@origin.test", to="b@dest.test", text="x", priority=value)
    assert parse(msg.as_bytes())["X-Priority"] == written


@pytest.mark.parametrize("value", [0, 6, True, "7", "top", "1\r\nBcc: x@evil.test", 2.0])
def test_bad_priorities_are_refused(value):
    with pytest.raises(ValueError, match="priority"):
        build_message(sender="a@origin.test", to="b@dest.test", text="x", priority=value)


def test_no_fields_when_not_given():
    m = parse(build_message(sender="a@origin.test", to="b@dest.test", text="x").as_bytes())
    for name in ("Disposition-Notification-To", "X-Priority", "Organization"):
        assert m[name] is None


def test_a_bad_notify_address_is_refused():
    from twisted_mailout import AddressError

    with pytest.raises(AddressError):
        build_message(sender="a@origin.test", to="b@dest.test", text="x", notify="not an address")


# -- retries ----------------------------------------------------------------------

def test_retries_is_kept_on_the_message_not_in_the_bytes():
    msg = build_message(sender="a@origin.test", to="b@dest.test", text="x", retries=2)
    assert msg.retries == 2 and message_retries(msg) == 2
    assert b"retr" not in msg.as_bytes().lower()
    assert message_retries(build_message(sender="a@origin.test", to="b@dest.test",
                                         text="x")) == 0
    assert message_retries(b"Subject: x\r\n\r\nbytes\r\n") == 0
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="retries"):
            build_message(sender="a@origin.test", to="b@dest.test", text="x", retries=bad)


class FlakyDelivery(MemoryDelivery):
    """A memory outbox that fails the first C{failures} sends with C{reply}."""

    scheme = "flaky"

    def __init__(self, failures: int, reply: Reply) -> None:
        super().__init__()
        self.failures = failures
        self.reply = reply
        self.calls = 0

    def send(self, sender, recipients, message, *, message_id=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise DeliveryError(self.reply, list(recipients))
        return super().send(sender, recipients, message, message_id=message_id)


def flaky_mailer(failures: int, code: int = 451) -> tuple[Mailer, FlakyDelivery, list]:
    delivery = FlakyDelivery(failures, Reply(code, f"{code // 100}.3.0 not now", local=True))
    events: list = []
    return Mailer(delivery, observers=[events.append]), delivery, events


def test_a_synchronous_delivery_is_tried_again_while_retries_last():
    mailer, delivery, events = flaky_mailer(failures=2)
    msg = build_message(sender="a@origin.test", to="b@dest.test", text="x", retries=2)
    mid = mailer.send(msg)
    assert delivery.calls == 3
    [sent] = delivery.outbox
    assert sent.message_id == mid
    [event] = events
    assert isinstance(event, MailDelivered) and event.attempts == 3


def test_a_synchronous_delivery_gives_up_after_retries_plus_one_attempts():
    mailer, delivery, events = flaky_mailer(failures=5)
    msg = build_message(sender="a@origin.test", to="b@dest.test", text="x", retries=2)
    with pytest.raises(DeliveryError) as e:
        mailer.send(msg)
    assert delivery.calls == 3 and e.value.attempts == 3
    [event] = events
    assert isinstance(event, MailDeferred) and event.attempts == 3 and event.code == 451


def test_without_retries_one_attempt_and_a_permanent_failure_is_never_retried():
    mailer, delivery, _ = flaky_mailer(failures=1)
    with pytest.raises(DeliveryError):
        mailer.send(build_message(sender="a@origin.test", to="b@dest.test", text="x"))
    assert delivery.calls == 1
    mailer, delivery, events = flaky_mailer(failures=1, code=554)
    with pytest.raises(DeliveryError):
        mailer.send(build_message(sender="a@origin.test", to="b@dest.test", text="x",
                                  retries=3))
    assert delivery.calls == 1
    [event] = events
    assert isinstance(event, MailBounced) and event.attempts == 1


def test_send_blocking_honours_retries():
    mailer, delivery, _ = flaky_mailer(failures=1)
    msg = build_message(sender="a@origin.test", to="b@dest.test", text="x", retries=1)
    mailer.send_blocking(msg)
    assert delivery.calls == 2 and len(delivery.outbox) == 1


class DeferredRetriesTests(unittest.TestCase):
    """Retries of Deferred deliveries: send_deferred of a synchronous one
    (in the reactor's thread pool) and direct SMTP against aiosmtpd."""

    timeout = 60

    def sink(self, **kw):
        s = AiosmtpdSink("127.0.0.1", **kw).start()
        self.addCleanup(lambda: threads.deferToThread(s.stop))
        return s

    @defer.inlineCallbacks
    def test_send_deferred_of_a_synchronous_delivery(self):
        mailer, delivery, events = flaky_mailer(failures=1)
        msg = build_message(sender="a@origin.test", to="b@dest.test", text="x", retries=1)
        yield mailer.send_deferred(msg)
        self.assertEqual(delivery.calls, 2)
        self.assertEqual([(type(e), e.attempts) for e in events], [(MailDelivered, 2)])

    @defer.inlineCallbacks
    def test_direct_smtp_sends_again_only_to_deferred_recipients(self):
        tries: dict[str, int] = {}

        def rcpt(address: str) -> str | None:
            tries[address] = tries.get(address, 0) + 1
            if address.startswith("slow@") and tries[address] <= 2:
                return "450 4.2.1 mailbox busy"
            if address.startswith("gone@"):
                return "550 5.1.1 no such user"
            return None

        sink = self.sink(rcpt_reply=rcpt)
        events: list = []
        mailer = Mailer(f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=10",
                        observers=[events.append])
        msg = build_message(sender="a@origin.test",
                            to=["ok@dest.test", "slow@dest.test", "gone@dest.test"],
                            text=lambda: "rendered\n", retries=3)
        report = yield mailer.send(msg)
        self.assertEqual([(r.recipient, r.status, r.attempts) for r in report],
                         [("ok@dest.test", "delivered", 1), ("slow@dest.test", "delivered", 3),
                          ("gone@dest.test", "bounced", 1)])
        self.assertEqual(tries, {"ok@dest.test": 1, "slow@dest.test": 3, "gone@dest.test": 1})
        self.assertEqual([m["rcpt_tos"] for m in sink.messages],
                         [["ok@dest.test"], ["slow@dest.test"]])
        self.assertTrue(all(body_text(parse(m["data"])) == "rendered\n" for m in sink.messages))
        self.assertEqual(sorted((e.recipient, e.attempts) for e in events),
                         [("gone@dest.test", 1), ("ok@dest.test", 1), ("slow@dest.test", 3)])

    @defer.inlineCallbacks
    def test_direct_smtp_reports_deferred_when_retries_run_out(self):
        sink = self.sink(data_reply=lambda rec: "451 4.3.0 try later")
        mailer = Mailer(f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=10")
        msg = build_message(sender="a@origin.test", to="b@dest.test", text="x", retries=1)
        report = yield mailer.send(msg)
        self.assertEqual([(r.status, r.code, r.attempts) for r in report],
                         [("deferred", 451, 2)])
        self.assertEqual(sink.messages, [])
