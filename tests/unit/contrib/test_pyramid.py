"""twisted_mailout.contrib.pyramid with a real Pyramid Configurator and
pyramid_mailer's Message: includeme, settings (mail.url or pyramid_mailer's
keys), get_mailer / request.mailer bound to the request's transaction manager
(as pyramid_tm binds it), send on commit, send_to_queue, send_immediately."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("pyramid_mailer")

import transaction
from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response
from pyramid_mailer import get_mailer as pyramid_mailers_get_mailer
from pyramid_mailer.interfaces import IMailer
from pyramid_mailer.message import Message

from twisted_mailout.apps.deliveries import DeliveryError, QueueDelivery, SMTPDelivery
from twisted_mailout.contrib.pyramid import PyramidMailer, get_mailer, smtp_url
from twisted_mailout.queue.store import Queue


def queued(path) -> list:
    entries, _ = Queue(str(path)).pickup_all()
    return entries


def make_app(settings: dict, fail: bool = False):
    """A Pyramid app whose view sends with request.mailer; request.tm is a
    transaction manager committed after the view (aborted when it raises),
    which is what pyramid_tm does."""
    managers: list = []

    def tm(request):
        manager = transaction.TransactionManager(explicit=True)
        manager.begin()
        managers.append(manager)
        return manager

    def order(request):
        assert get_mailer(request) is not None
        mid = request.mailer.send(Message(subject="Order", recipients=["zoe@dest.test"],
                                          cc=["ann@dest.test"], bcc=["audit@origin.test"],
                                          body="Thanks"))
        queued_id = request.mailer.send_to_queue(
            Message(subject="Queued", recipients=["zoe@dest.test"], body="Later"))
        if fail:
            raise RuntimeError("the order failed")
        return Response(f"{mid} {queued_id}")

    config = Configurator(settings=settings)
    config.include("twisted_mailout.contrib.pyramid")
    config.add_request_method(tm, "tm", reify=True)
    config.add_tween("tests.unit.contrib.test_pyramid.TM_TWEEN")
    config.add_route("order", "/order")
    config.add_view(order, route_name="order")
    return config.make_wsgi_app(), config


def TM_TWEEN(handler, registry):
    """Commit request.tm after the view, abort it when the view raises (pyramid_tm's job)."""
    def tween(request):
        try:
            response = handler(request)
        except Exception:
            request.tm.abort()
            raise
        request.tm.commit()
        return response
    return tween


def test_includeme_registers_our_mailer_under_pyramid_mailers_interface(tmp_path):
    app, config = make_app({"mail.url": f"queue://{tmp_path / 'q'}",
                            "mail.default_sender": "Shop <shop@origin.test>"})
    mailer = config.registry.getUtility(IMailer)
    assert isinstance(mailer, PyramidMailer)
    request = Request.blank("/")
    request.registry = config.registry
    assert isinstance(pyramid_mailers_get_mailer(request), PyramidMailer)
    assert isinstance(get_mailer(config.registry), PyramidMailer)


def test_a_view_sends_on_commit(tmp_path):
    path = tmp_path / "q"
    app, _ = make_app({"mail.url": f"queue://{path}",
                       "mail.default_sender": "Shop <shop@origin.test>"})
    response = Request.blank("/order").get_response(app)
    assert response.status_code == 200
    mid, queue_id = response.text.split()
    with open(os.path.join(path, "new", mid), "rb") as f:
        data = f.read()
    entries = {e.qid: e for e in queued(path)}
    assert set(entries) == {mid, queue_id}
    order = entries[mid]
    assert order.sender == "shop@origin.test"
    assert [r.address for r in order.recipients] == \
        ["zoe@dest.test", "ann@dest.test", "audit@origin.test"]
    assert b"Subject: Order" in data and b"audit@origin.test" not in data.split(b"\n", 1)[1]


def test_a_failed_view_sends_nothing(tmp_path):
    path = tmp_path / "q"
    app, _ = make_app({"mail.url": f"queue://{path}",
                       "mail.default_sender": "shop@origin.test"}, fail=True)
    with pytest.raises(RuntimeError, match="the order failed"):
        Request.blank("/order").get_response(app)
    assert queued(path) == []
    assert sorted(os.listdir(path / "tmp")) == []


def test_pyramid_mailers_smtp_settings_make_an_smtp_url():
    mailer = PyramidMailer.from_settings({
        "mail.host": "relay.test", "mail.port": "2525", "mail.username": "app@x.test",
        "mail.password": "p@ss:word", "mail.tls": "true", "mail.queue_path": "/tmp/q-unused",
        "mail.default_sender": "shop@origin.test", "mail.sendmail_app": "/usr/lib/sendmail",
        "other.key": "ignored"})
    assert isinstance(mailer.delivery, SMTPDelivery)
    assert mailer.delivery.url() == "smtp://app@x.test:***@relay.test:2525?tls=encrypt"
    assert isinstance(mailer.queue_delivery, QueueDelivery)
    assert mailer.sendmail_delivery.url().startswith("sendmail:///usr/lib/sendmail")
    assert mailer.default_sender == "shop@origin.test"


@pytest.mark.parametrize("kw,url", [
    ({}, "smtp://localhost:25?tls=may"),
    ({"tls": "false"}, "smtp://localhost:25?tls=may"),
    ({"tls": "verify", "port": 587}, "smtp://localhost:587?tls=verify"),
    ({"ssl": "true"}, "smtps://localhost:465"),
    ({"ssl": True, "tls": "encrypt", "port": "4650"}, "smtps://localhost:4650?tls=encrypt"),
    ({"username": "u", "password": "p/w"}, "smtp://u:p%2Fw@localhost:25?tls=may"),
])
def test_smtp_url(kw, url):
    assert smtp_url(**kw) == url


def test_client_certificates_are_refused_and_a_prefix_is_honoured(tmp_path):
    with pytest.raises(ValueError, match="client certificates"):
        PyramidMailer.from_settings({"mail.certfile": "/x.pem"})
    config = Configurator(settings={"pyramid_mailer.prefix": "email.",
                                    "email.url": f"queue://{tmp_path / 'q'}"})
    config.include("twisted_mailout.contrib.pyramid")
    assert isinstance(config.registry.getUtility(IMailer).delivery, QueueDelivery)


def test_send_to_queue_without_a_queue_raises_as_pyramid_mailer():
    mailer = PyramidMailer("memory://")
    with pytest.raises(RuntimeError, match="No queue_path"):
        mailer.send_to_queue(Message(subject="s", sender="a@origin.test",
                                     recipients=["b@dest.test"], body="x"))


def test_send_immediately_and_bind(tmp_path):
    mailer = PyramidMailer("memory://", default_sender="shop@origin.test")
    mid = mailer.send_immediately(Message(subject="now", recipients=["b@dest.test"],
                                          body="x"))
    [sent] = mailer.delivery.outbox
    assert (sent.message_id, sent.sender, sent.recipients) == \
        (mid, "shop@origin.test", ["b@dest.test"])
    bound = mailer.bind(default_sender="other@origin.test")
    assert bound.delivery is mailer.delivery and bound.default_sender == "other@origin.test"
    with pytest.raises(ValueError, match="invalid options"):
        mailer.bind(host="x")


def test_send_immediately_fail_silently(tmp_path):
    script = tmp_path / "sendmail"
    script.write_text("#!/bin/sh\ncat >/dev/null\nexit 75\n")
    script.chmod(0o755)
    mailer = PyramidMailer("memory://", sendmail=str(script),
                           default_sender="shop@origin.test")
    message = Message(subject="s", recipients=["b@dest.test"], body="x")
    with pytest.raises(DeliveryError):
        mailer.send_immediately_sendmail(message)
    assert mailer.send_immediately_sendmail(message, fail_silently=True) is None


def test_our_own_messages_work_too(tmp_path):
    from twisted_mailout.apps.builder import build_message

    path = tmp_path / "q"
    mailer = PyramidMailer(f"queue://{path}")
    tm = transaction.TransactionManager(explicit=True)
    bound = mailer.bind(transaction_manager=tm)
    tm.begin()
    qid = bound.send(build_message(sender="a@origin.test", to="b@dest.test", text="x"))
    assert queued(path) == []
    tm.commit()
    assert [e.qid for e in queued(path)] == [qid]
