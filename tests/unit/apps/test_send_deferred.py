"""Always a Deferred for Twisted code: Mailer.send_deferred and
Delivery.send_deferred return a Deferred whatever the delivery, and run a
synchronous delivery (the queue's fsyncs, files) off the reactor thread."""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import defer
from twisted.python import threadable
from twisted.trial import unittest

from twisted_mailout import AddressError
from twisted_mailout.apps.deliveries import MemoryDelivery, QueueDelivery
from twisted_mailout.apps.mailer import MailDelivered, MailQueued, Mailer
from twisted_mailout.queue.store import Queue
from twisted_mailout.testing.memory import StubSMTP

MSG = b"From: a@origin.test\r\nTo: b@dest.test\r\nSubject: x\r\n\r\nhello\r\n"


class SendDeferredTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_queue_delivery_is_a_deferred_and_its_fsyncs_run_off_the_reactor_thread(self):
        where = []

        def watch(event):
            where.append((type(event), threadable.isInIOThread()))

        path = tempfile.mkdtemp(prefix="mailout-send-deferred-")
        self.addCleanup(shutil.rmtree, path, True)
        mailer = Mailer(QueueDelivery(path), observers=[watch])
        d = mailer.send_deferred(MSG)
        self.assertIsInstance(d, defer.Deferred)
        qid = yield d
        self.assertEqual([e.entry.qid for e in Queue(path).list_entries()], [qid])
        self.assertEqual(where, [(MailQueued, False)])  # observed in the pool thread

    @defer.inlineCallbacks
    def test_bad_input_fails_the_deferred_instead_of_raising(self):
        mailer = Mailer(MemoryDelivery())
        d = mailer.send_deferred(b"From: a@origin.test\r\n\r\nno recipients\r\n")
        with self.assertRaises(AddressError):
            yield d
        d = MemoryDelivery().send_deferred("a@origin.test", ["not an address"], MSG)
        with self.assertRaises(AddressError):
            yield d

    @defer.inlineCallbacks
    def test_a_synchronous_delivery_gives_its_message_id(self):
        outbox = MemoryDelivery()
        mid = yield outbox.send_deferred("a@origin.test", ["b@dest.test"], MSG)
        self.assertEqual([m.message_id for m in outbox.outbox], [mid])

    def test_a_direct_delivery_gives_its_report_through_the_same_call(self):
        stub = StubSMTP()
        events = []
        mailer = Mailer(stub.delivery(), observers=[events.append])
        report = stub.result(mailer.send_deferred(MSG))
        self.assertTrue(report.all_delivered)
        self.assertEqual([type(e) for e in events], [MailDelivered])
