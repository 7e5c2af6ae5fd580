"""twisted_mailout.contrib.pyramid over SMTP: pyramid_mailer's SMTP settings
(mail.host, mail.port, mail.tls) against aiosmtpd on loopback; the view runs
in a thread, as a WSGI server's do, the reactor in trial's."""

from __future__ import annotations

import pytest

pytest.importorskip("pyramid_mailer")

import transaction
from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response
from pyramid_mailer import get_mailer
from pyramid_mailer.message import Message
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.support.trial import start_sink
from tests.support.wait import wait_for_reactor
from twisted_mailout.apps.deliveries import DeliveryError
from twisted_mailout.contrib.pyramid import PyramidMailer


class PyramidSMTPTests(unittest.TestCase):
    timeout = 60

    def app(self, port: int, fail: bool = False):
        def view(request):
            mailer = get_mailer(request)
            report = mailer.send_immediately(Message(
                subject="now", recipients=["zoe@dest.test"], body="immediately"))
            mailer.send(Message(subject="on commit", recipients=["ann@dest.test"],
                                body="after the commit"))
            if fail:
                raise RuntimeError("view failed")
            return Response(str(report.accepted))

        config = Configurator(settings={"mail.host": "127.0.0.1", "mail.port": str(port),
                                        "mail.tls": "none",
                                        "mail.default_sender": "Shop <shop@origin.test>"})
        config.include("twisted_mailout.contrib.pyramid")
        config.add_route("v", "/v")
        config.add_view(view, route_name="v")
        return config.make_wsgi_app()

    def request(self, app):
        def run():
            with transaction.manager:
                return Request.blank("/v").get_response(app)
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_send_immediately_and_send_on_commit(self):
        sink = start_sink(self)
        response = yield self.request(self.app(sink.port))
        self.assertEqual(response.text, "1")
        # the message sent on commit goes out after the commit, in the reactor
        yield defer.Deferred.fromCoroutine(
            wait_for_reactor(reactor, lambda: len(sink.messages) == 2, timeout=20))
        self.assertEqual([(m["mail_from"], m["rcpt_tos"]) for m in sink.messages],
                         [("shop@origin.test", ["zoe@dest.test"]),
                          ("shop@origin.test", ["ann@dest.test"])])

    @defer.inlineCallbacks
    def test_a_failed_view_sent_only_the_immediate_message(self):
        sink = start_sink(self)
        with self.assertRaises(RuntimeError):
            yield self.request(self.app(sink.port, fail=True))
        self.assertEqual([m["rcpt_tos"] for m in sink.messages], [["zoe@dest.test"]])

    @defer.inlineCallbacks
    def test_a_refused_immediate_message_raises_unless_fail_silently(self):
        sink = start_sink(self, rcpt_reply=lambda r: "550 5.1.1 no such user")
        app = self.app(sink.port)
        with self.assertRaises(DeliveryError):
            yield self.request(app)
        mailer = PyramidMailer(f"smtp://127.0.0.1:{sink.port}?tls=none",
                               default_sender="shop@origin.test")
        result = yield threads.deferToThread(
            mailer.send_immediately,
            Message(subject="s", recipients=["x@dest.test"], body="b"), True)
        self.assertIsNone(result)
