"""twisted_mailout.contrib.zope: the IMailer utility with zope.sendmail's real
DirectMailDelivery, QueuedMailDelivery and queue processor, the transaction
package, zope.event and ZCML (queue folder, memory and sendmail deliveries;
SMTP against aiosmtpd is in tests/integration/test_zope_sendmail.py)."""

from __future__ import annotations

import os
import smtplib
import stat

import pytest

pytest.importorskip("zope.sendmail")

import transaction
import zope.component
import zope.event
from zope.component.testing import setUp as component_setup
from zope.component.testing import tearDown as component_teardown
from zope.configuration import xmlconfig
from zope.interface.verify import verifyObject
from zope.sendmail.delivery import DirectMailDelivery, QueuedMailDelivery
from zope.sendmail.interfaces import IMailDelivery, IMailer
from zope.sendmail.queue import QueueProcessorThread

from twisted_mailout import AddressError
from twisted_mailout.contrib.zope import (
    IMailErrorEvent,
    IMailEvent,
    IMailSentEvent,
    MailErrorEvent,
    MailFailedEvent,
    MailoutMailer,
    MailoutSendError,
    MailSentEvent,
)
from twisted_mailout.queue.store import Queue

MSG = (b"From: a@origin.test\r\nTo: b@dest.test, c@dest.test\r\nSubject: zope\r\n"
       b"Message-Id: <zope-1@origin.test>\r\n\r\nbody\r\n")


@pytest.fixture
def events():
    seen: list = []

    def mail_events(event):
        if IMailEvent.providedBy(event):  # not ZCML's own events
            seen.append(event)

    zope.event.subscribers.append(mail_events)
    transaction.abort()  # a fresh transaction in this thread
    yield seen
    transaction.abort()
    zope.event.subscribers.remove(mail_events)


def folders(path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(os.path.join(path, sub))) for sub in ("tmp", "new")}


def queued(path) -> list:
    entries, _ = Queue(str(path)).pickup_all()
    return entries


def test_the_mailer_provides_zope_sendmails_imailer():
    mailer = MailoutMailer("memory://")
    assert verifyObject(IMailer, mailer)
    sent = MailSentEvent("x@y")
    failed = MailErrorEvent("x@y", "550 no")
    assert IMailSentEvent.providedBy(sent) and IMailErrorEvent.providedBy(failed)
    assert MailFailedEvent is MailErrorEvent
    assert (sent.messageId, failed.errorMessage) == ("x@y", "550 no")


def test_direct_delivery_to_the_queue_commit_publishes_abort_discards(tmp_path, events):
    path = tmp_path / "queue"
    delivery = DirectMailDelivery(MailoutMailer(f"queue://{path}"))

    mid = delivery.send("a@origin.test", ["b@dest.test", "c@dest.test"], MSG)
    assert mid == "zope-1@origin.test"
    transaction.abort()
    assert events == []
    assert folders(path) == {"tmp": [], "new": []}

    delivery.send("a@origin.test", ["b@dest.test", "c@dest.test"], MSG)
    transaction.commit()
    [entry] = queued(path)
    assert [r.address for r in entry.recipients] == ["b@dest.test", "c@dest.test"]
    assert entry.sender == "a@origin.test"
    [event] = events
    assert isinstance(event, MailSentEvent) and event.queued
    assert event.messageId == "zope-1@origin.test"
    assert [(r.recipient, r.status, r.queue_id) for r in event.results] == [
        ("b@dest.test", "queued", entry.qid), ("c@dest.test", "queued", entry.qid)]


class FailingVote:
    """A resource whose vote fails after the mail voted (it sorts last)."""

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_abort = tpc_finish = abort

    def tpc_vote(self, txn):
        raise RuntimeError("another resource refuses to commit")

    def sortKey(self):
        return "~~~~ after the mail"


def test_the_vote_stages_and_syncs_and_a_later_failed_vote_removes_it(tmp_path, events):
    path = tmp_path / "queue"
    mailer = MailoutMailer(f"queue://{path}")
    delivery = DirectMailDelivery(mailer)
    delivery.send("a@origin.test", ["b@dest.test"], MSG)
    txn = transaction.get()
    staged_during_vote: list = []

    class Watch(FailingVote):
        def tpc_vote(self, txn):
            staged_during_vote.append(folders(path))
            raise RuntimeError("another resource refuses to commit")

    txn.join(Watch())
    with pytest.raises(RuntimeError, match="refuses"):
        transaction.commit()
    # the mail had voted: its file was in tmp/, invisible to the daemon
    [seen] = staged_during_vote
    assert len(seen["tmp"]) == 1 and seen["new"] == []
    transaction.abort()
    assert folders(path) == {"tmp": [], "new": []}
    assert events == []


def test_a_bad_address_fails_the_vote_and_nothing_is_queued(tmp_path, events):
    path = tmp_path / "queue"
    delivery = DirectMailDelivery(MailoutMailer(f"queue://{path}"))
    delivery.send("a@origin.test", ["not an address"], MSG)
    with pytest.raises(AddressError):
        transaction.commit()
    transaction.abort()
    assert folders(path) == {"tmp": [], "new": []}
    assert events == []


def test_direct_delivery_to_memory_sends_at_commit(events):
    mailer = MailoutMailer("memory://")
    delivery = DirectMailDelivery(mailer)
    delivery.send("a@origin.test", ["b@dest.test"], b"Subject: no id\r\n\r\nbody\r\n")
    assert mailer.mailer.delivery.outbox == []
    transaction.commit()
    [sent] = mailer.mailer.delivery.outbox
    assert sent.recipients == ["b@dest.test"]
    [event] = events
    assert isinstance(event, MailSentEvent) and not event.queued
    # zope.sendmail added the Message-Id it returned; the event carries it
    assert sent.message["Message-Id"] == f"<{event.messageId}>"


def sendmail_exiting(tmp_path, status: int) -> str:
    script = tmp_path / f"sendmail-{status}"
    script.write_text(f"#!/bin/sh\ncat >/dev/null\necho 'refused' >&2\nexit {status}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return f"sendmail://{script}"


def test_a_failed_delivery_after_commit_fires_the_error_event(tmp_path, events):
    delivery = DirectMailDelivery(MailoutMailer(sendmail_exiting(tmp_path, 67)))  # EX_NOUSER
    delivery.send("a@origin.test", ["b@dest.test"], MSG)
    transaction.commit()  # zope.sendmail logs the send's exception; the commit stands
    [event] = events
    assert isinstance(event, MailErrorEvent) and event.permanent
    assert event.messageId == "zope-1@origin.test"
    assert "b@dest.test" in event.errorMessage
    assert [(r.recipient, r.status) for r in event.results] == [("b@dest.test", "bounced")]


def test_send_raises_as_smtplib_so_the_queue_processor_keeps_or_rejects(tmp_path, events):
    bounced = MailoutMailer(sendmail_exiting(tmp_path, 67))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        bounced.send("a@origin.test", ["b@dest.test"], MSG)
    assert list(refused.value.recipients) == ["b@dest.test"]
    deferred = MailoutMailer(sendmail_exiting(tmp_path, 75))  # EX_TEMPFAIL
    with pytest.raises(MailoutSendError) as later:
        deferred.send("a@origin.test", ["b@dest.test"], MSG)
    assert 400 <= later.value.smtp_code < 500
    assert isinstance(later.value, smtplib.SMTPResponseException)
    assert [e.permanent for e in events] == [True, False]


def test_queued_mail_delivery_with_the_queue_processor(tmp_path, events):
    maildir = str(tmp_path / "zope-queue")
    QueuedMailDelivery(maildir).send("a@origin.test", ["b@dest.test", "c@dest.test"], MSG)
    transaction.commit()
    mailer = MailoutMailer("memory://")
    processor = QueueProcessorThread()
    processor.setMailer(mailer)
    processor.setQueuePath(maildir)
    processor.run(forever=False)
    [sent] = mailer.mailer.delivery.outbox
    assert (sent.sender, sent.recipients) == ("a@origin.test", ["b@dest.test", "c@dest.test"])
    assert b"X-Zope-From" not in sent.data and sent.data.endswith(b"body\r\n")
    assert os.listdir(os.path.join(maildir, "new")) == []
    [event] = events
    assert isinstance(event, MailSentEvent) and event.messageId == "zope-1@origin.test"


def test_the_queue_processor_sets_aside_a_permanently_refused_message(tmp_path, events):
    maildir = str(tmp_path / "zope-queue")
    QueuedMailDelivery(maildir).send("a@origin.test", ["b@dest.test"], MSG)
    transaction.commit()
    processor = QueueProcessorThread()
    processor.setMailer(MailoutMailer(sendmail_exiting(tmp_path, 67)))
    processor.setQueuePath(maildir)
    processor.run(forever=False)
    assert [f for f in os.listdir(os.path.join(maildir, "new")) if not f.startswith(".")] == []
    assert any(f.startswith(".rejected-") for f in os.listdir(os.path.join(maildir, "new")))
    assert [type(e) for e in events] == [MailErrorEvent]


@pytest.fixture
def component_registry():
    component_setup()
    yield
    component_teardown()


def test_zcml_directive_registers_the_mailer_for_direct_delivery(tmp_path, events,
                                                                  component_registry):
    path = tmp_path / "queue"
    xmlconfig.string(f"""
        <configure xmlns="http://namespaces.zope.org/zope"
                   xmlns:mail="http://namespaces.zope.org/mail"
                   xmlns:mailout="http://namespaces.twisted-mailout.org/mailout">
          <include package="twisted_mailout.contrib" file="zope.zcml" />
          <mailout:mailer name="mailout" delivery="queue://{path}" />
          <mail:directDelivery name="Mail" mailer="mailout" />
        </configure>""")
    mailer = zope.component.getUtility(IMailer, "mailout")
    assert isinstance(mailer, MailoutMailer)
    zope.component.getUtility(IMailDelivery, "Mail").send(
        "a@origin.test", ["b@dest.test"], MSG)
    transaction.commit()
    assert len(queued(path)) == 1
    assert [type(e) for e in events] == [MailSentEvent]


def test_zcml_refuses_a_bad_delivery_url(component_registry):
    from zope.configuration.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="mailout:mailer"):
        xmlconfig.string("""
            <configure xmlns="http://namespaces.zope.org/zope"
                       xmlns:mailout="http://namespaces.twisted-mailout.org/mailout">
              <include package="twisted_mailout.contrib" file="zope.zcml" />
              <mailout:mailer name="mailout" delivery="nosuchscheme://x" />
            </configure>""")
