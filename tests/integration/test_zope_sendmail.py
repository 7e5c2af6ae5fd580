"""twisted_mailout.contrib.zope over SMTP: zope.sendmail's DirectMailDelivery
with a MailoutMailer on smtp:// against aiosmtpd on loopback. The commit runs
in a thread, as a Zope request's does; the reactor runs in trial's."""

from __future__ import annotations

import pytest

pytest.importorskip("zope.sendmail")

import transaction
import zope.event
from twisted.internet import defer, threads
from twisted.trial import unittest
from zope.sendmail.delivery import DirectMailDelivery

from tests.support.trial import start_sink
from twisted_mailout.contrib.zope import IMailEvent, MailErrorEvent, MailoutMailer, MailSentEvent

MSG = (b"From: a@origin.test\r\nTo: b@dest.test\r\nSubject: zope smtp\r\n"
       b"Message-Id: <zope-smtp@origin.test>\r\n\r\nbody\r\n")


class ZopeSMTPTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.events: list = []

        def mail_events(event):
            if IMailEvent.providedBy(event):
                self.events.append(event)

        zope.event.subscribers.append(mail_events)
        self.addCleanup(zope.event.subscribers.remove, mail_events)

    def commit_in_thread(self, mailer, recipients, abort=False):
        def request():
            tm = transaction.manager
            tm.begin()
            DirectMailDelivery(mailer).send("a@origin.test", recipients, MSG)
            if abort:
                tm.abort()
            else:
                tm.commit()

        return threads.deferToThread(request)

    @defer.inlineCallbacks
    def test_commit_sends_abort_sends_nothing(self):
        sink = start_sink(self)
        mailer = MailoutMailer(f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=10")
        yield self.commit_in_thread(mailer, ["b@dest.test"], abort=True)
        self.assertEqual((sink.messages, self.events), ([], []))
        yield self.commit_in_thread(mailer, ["b@dest.test", "c@dest.test"])
        [m] = sink.messages
        self.assertEqual((m["mail_from"], m["rcpt_tos"]),
                         ("a@origin.test", ["b@dest.test", "c@dest.test"]))
        self.assertIn(b"Message-Id: <zope-smtp@origin.test>", m["data"])
        [event] = self.events
        self.assertIsInstance(event, MailSentEvent)
        self.assertEqual(event.messageId, "zope-smtp@origin.test")
        self.assertEqual([(r.recipient, r.status, r.code) for r in event.results],
                         [("b@dest.test", "delivered", 250), ("c@dest.test", "delivered", 250)])

    @defer.inlineCallbacks
    def test_a_refused_recipient_fires_the_error_event(self):
        sink = start_sink(self, rcpt_reply=lambda r: "550 5.1.1 no such user"
                          if r.startswith("gone@") else None)
        mailer = MailoutMailer(f"smtp://127.0.0.1:{sink.port}?tls=none&timeout=10")
        yield self.commit_in_thread(mailer, ["gone@dest.test"])
        self.assertEqual(sink.messages, [])
        [event] = self.events
        self.assertIsInstance(event, MailErrorEvent)
        self.assertTrue(event.permanent)
        self.assertIn("gone@dest.test: 550", event.errorMessage)
        # some delivered, some refused: one error event listing the refused one
        yield self.commit_in_thread(mailer, ["b@dest.test", "gone@dest.test"])
        [m] = sink.messages
        self.assertEqual(m["rcpt_tos"], ["b@dest.test"])
        partial = self.events[1]
        self.assertIsInstance(partial, MailErrorEvent)
        self.assertEqual([r.status for r in partial.results], ["delivered", "bounced"])
