"""capture_mail / mail_outbox: the configured delivery is replaced, and the
assertions say what was sent when they fail."""

from __future__ import annotations

import os
import threading

import pytest

from twisted_mailout.apps.builder import build_message
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.testing import capture_mail, mail_outbox  # noqa: F401 - the fixture

PNG = b"\x89PNG\r\n\x1a\n\x00"


def welcome(mailer, to="zoe@dest.test"):
    return mailer.send(build_message(
        sender="Shop <shop@origin.test>", to=to, bcc="audit@origin.test",
        subject="Welcome, Zoë", text="Your account is ready.",
        html='<p>Your account is ready.</p><img src="cid:logo">',
        inline=[("logo", PNG, "image/png")], attachments=[("terms.pdf", b"%PDF-1")]))


def test_capture_replaces_the_configured_delivery(tmp_path):
    mailer = Mailer(f"queue://{tmp_path}/q")
    with capture_mail() as outbox:
        mid = welcome(mailer)
    assert os.listdir(tmp_path / "q" / "new") == []  # nothing reached the queue
    [m] = outbox.messages
    assert m.message_id == mid
    assert m.sender == "shop@origin.test"
    assert m.recipients == ["zoe@dest.test", "audit@origin.test"]
    assert m.to == ["zoe@dest.test"] and m.cc == []
    assert m.subject == "Welcome, Zoë"
    assert m.text == "Your account is ready.\n"
    assert "cid:logo" in m.html
    assert m.attachments == [("terms.pdf", "application/pdf", b"%PDF-1")]
    assert m.inline == {"logo": ("image/png", PNG)}
    assert b"audit@origin.test" not in m.data
    # after the block, the configured delivery is used again
    welcome(mailer)
    assert len(os.listdir(tmp_path / "q" / "new")) == 1


def test_assert_sent_filters_and_counts():
    mailer = Mailer("null://")
    with capture_mail() as outbox:
        welcome(mailer, "a@dest.test")
        welcome(mailer, "b@dest.test")
    assert len(outbox.assert_sent(2, subject_contains="Welcome")) == 2
    [m] = outbox.assert_sent(1, to="b@dest.test", sender="shop@origin.test",
                             text_contains="ready", html_contains="<p>",
                             attachment="terms.pdf", header=("Subject", "Welcome, Zoë"))
    assert m.recipients[0] == "b@dest.test"
    assert outbox.find(to=["a@dest.test", "audit@origin.test"])
    assert outbox.find(subject="Welcome") == []  # equality, not containment


def test_failed_assertions_say_what_was_sent():
    with capture_mail() as outbox:
        outbox.assert_nothing_sent()
        with pytest.raises(AssertionError, match="nothing was sent"):
            outbox.assert_sent()
        welcome(Mailer("null://"))
    with pytest.raises(AssertionError) as e:
        outbox.assert_sent(to="nobody@dest.test")
    assert "to=zoe@dest.test,audit@origin.test" in str(e.value)
    assert "subject='Welcome, Zoë'" in str(e.value)
    with pytest.raises(AssertionError, match="expected 2 message"):
        outbox.assert_sent(2)
    with pytest.raises(AssertionError, match="expected no mail"):
        outbox.assert_nothing_sent()
    outbox.clear()
    outbox.assert_nothing_sent()


def test_nested_captures_and_other_threads():
    mailer = Mailer("null://")
    with capture_mail() as outer:
        with capture_mail() as inner:
            t = threading.Thread(target=welcome, args=(mailer,))
            t.start()
            t.join(30)
        welcome(mailer)
    assert len(inner) == 1 and len(outer) == 1


def test_the_pytest_fixture(mail_outbox):  # noqa: F811
    welcome(Mailer("null://"))
    mail_outbox.assert_sent(1, to="zoe@dest.test")
