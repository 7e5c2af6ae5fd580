"""DKIM signing without the queue (issue 12 item 1): SMTPClient, sendmail(),
SMTPDelivery and the Mailer take dkim= (a key table path or a loaded Signer)
and dkim_required=. Each message is signed once, off the reactor thread,
before its first transaction; every destination gets the same bytes; a
message that cannot be signed while required is sent to nobody. Signatures
are checked with dkimpy's verifier against the table's public keys."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import dkim
import pytest
from tests.support.peers import AiosmtpdSink
from twisted.internet import defer, threads
from twisted.python import threadable
from twisted.trial import unittest

from twisted_mailout.api import ClientRegistry, SMTPClient, load_signer, sign_in_thread
from twisted_mailout.apps.deliveries import (
    DeliveryError,
    MemoryDelivery,
    QueueDelivery,
    SMTPDelivery,
    get_delivery,
    parse_url,
)
from twisted_mailout.apps.mailer import MailDeferred, MailDelivered, Mailer
from twisted_mailout.dkim import KeyTable, Signer, SigningError, keygen
from twisted_mailout.dkim.signer import prepend_signature, wire_form
from twisted_mailout.errors import ConfigError
from twisted_mailout.outcome import Status
from twisted_mailout.testing.loopback import ZoneResolver
from twisted_mailout.testing.memory import STUB_RELAY, StubSMTP

MSG = (b"From: News <news@origin.test>\r\nTo: a@one.test, b@two.test\r\n"
       b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
       b"Message-ID: <dkim-api@origin.test>\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
       + "Grüße aus Köln.\r\n".encode() + b"y" * 990 + b"\r\n.leading dot\r\n")
#: A From domain the table has no key for.
NO_KEY = MSG.replace(b"news@origin.test", b"news@elsewhere.test")

ZONE = {"records": {
    "one.test": {"MX": [[10, "mx.one.test"]]}, "mx.one.test": {"A": ["192.0.2.1"]},
    "two.test": {"MX": [[10, "mx.two.test"]]}, "mx.two.test": {"A": ["192.0.2.2"]}}}


def make_keys(folder: Path) -> Path:
    """An rsa and an ed25519 key of origin.test in C{folder}/keys/keys.toml."""
    table = folder / "keys" / "keys.toml"
    table.parent.mkdir(mode=0o700)
    keygen(table, "origin.test", "r1", "rsa")
    keygen(table, "origin.test", "e1", "ed25519")
    return table


def dnsfunc_for(table: KeyTable) -> Any:
    """A dkimpy dnsfunc serving the table's public keys."""
    records = {f"{k.selector}._domainkey.{k.domain}.".encode():
               f"v=DKIM1; k={k.type}; p={k.public}".encode() for k in table.keys}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name if name.endswith(b".") else name + b".")

    return dnsfunc


def assert_signed(data: bytes, table: KeyTable) -> None:
    """C{data} carries an rsa-sha256 and an ed25519-sha256 signature of
    origin.test, and both verify."""
    algorithms = sorted(re.findall(rb"\ba=([\w-]+);", data.split(b"\r\n\r\n", 1)[0]))
    assert algorithms == [b"ed25519-sha256", b"rsa-sha256"]
    for idx in range(2):
        assert dkim.DKIM(data).verify(idx=idx, dnsfunc=dnsfunc_for(table)), f"signature {idx}"


class CountingSigner:
    """A L{Signer} that counts its calls and the threads they ran in."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.required = signer.required
        self.calls: list[bool] = []  # True: called in the reactor thread

    def sign(self, message: bytes, sender: str | None = None) -> bytes:
        self.calls.append(threadable.isInIOThread())
        return self.signer.sign(message, sender)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("dkim-api"))


@pytest.fixture(scope="module")
def table(table_path: Path) -> KeyTable:
    return KeyTable.load(table_path)


# -- SMTPClient and sendmail() ------------------------------------------------


def test_the_client_signs_once_and_every_destination_gets_the_same_bytes(table_path, table):
    counting = CountingSigner(load_signer(table_path))
    stub = StubSMTP(zone=ZONE, dkim=counting)
    report = stub.result(stub.send("news@origin.test", ["a@one.test", "b@two.test"], MSG))
    assert report.all_delivered
    assert len(counting.calls) == 1  # once, for two destinations
    assert sorted(stub.connections) == [("192.0.2.1", 25), ("192.0.2.2", 25)]
    first, second = (m["data"] for m in stub.messages)
    assert first == second
    assert first.endswith(MSG)  # the message as given, the signature fields in front
    assert_signed(first, table)


def test_a_key_table_path_is_read_by_the_client(table_path, table):
    stub = StubSMTP(dkim=str(table_path))
    assert isinstance(stub.client.signer, Signer)
    report = stub.result(stub.send("news@origin.test", ["a@one.test"], MSG))
    assert report.all_delivered
    assert_signed(stub.messages[0]["data"], table)


def test_required_and_not_signable_is_sent_to_nobody_with_the_reason(table_path):
    stub = StubSMTP(zone=ZONE, dkim=table_path, dkim_required=True)
    report = stub.result(stub.send("news@elsewhere.test", ["a@one.test", "b@two.test"],
                                   NO_KEY))
    assert [(r.status, r.code, r.local) for r in report] == [(Status.DEFERRED, 451, True)] * 2
    for r in report:
        assert r.text.startswith("4.7.0 message not signed: cannot be DKIM signed: no key "
                                 "for the From domain elsewhere.test")
    assert stub.connections == [] and stub.messages == []


def test_not_required_and_no_key_is_sent_unsigned(table_path):
    stub = StubSMTP(dkim=table_path)
    report = stub.result(stub.send("news@elsewhere.test", ["a@one.test"], NO_KEY))
    assert report.all_delivered
    assert stub.messages[0]["data"] == NO_KEY


def test_sendmail_passes_the_signing_settings_to_its_shared_client(table_path, table):
    stub = StubSMTP()
    registry = ClientRegistry()
    signer = load_signer(table_path)
    kw = {"reactor": stub.reactor, "relay": STUB_RELAY,
          "resolver": ZoneResolver({"records": {}}), "dkim": signer}
    ds = [registry.sendmail("news@origin.test", f"r{i}@dest.test", MSG, **kw) for i in range(2)]
    assert len(registry) == 1  # the same Signer: one shared client
    assert all(stub.result(d).all_delivered for d in ds)
    for m in stub.messages:
        assert_signed(m["data"], table)
    d = registry.sendmail("news@elsewhere.test", "r@dest.test", NO_KEY,
                          **{**kw, "dkim": table_path, "dkim_required": True})
    [result] = stub.result(d)
    assert (result.status, result.code) == (Status.DEFERRED, 451)
    assert len(stub.messages) == 2


def test_load_signer_settings(table_path, table):
    assert load_signer(None) is None
    signer = load_signer(table_path)
    assert isinstance(signer, Signer) and not signer.required
    assert load_signer(signer) is signer
    required = load_signer(signer, required=True)
    assert isinstance(required, Signer) and required.required and required.table is signer.table
    assert load_signer(str(table_path), required=True).required
    with pytest.raises(ValueError, match="dkim_required needs dkim="):
        load_signer(None, required=True)
    with pytest.raises(TypeError, match="key table path or a Signer"):
        load_signer(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot be read"):
        load_signer(table_path.parent / "missing.toml")
    with pytest.raises(ConfigError):
        SMTPClient(relay=STUB_RELAY, resolver="127.0.0.1:53", dkim=table_path.parent / "x")


def test_prepend_signature_keeps_the_message_line_ends(table):
    signer = Signer(table)
    lf = MSG.replace(b"\r\n", b"\n")
    signed = prepend_signature(signer.sign(lf), lf)
    assert b"\r" not in signed and signed.endswith(lf)
    assert_signed(wire_form(signed), table)
    assert prepend_signature(b"", lf) is lf
    crlf = prepend_signature(signer.sign(MSG), MSG)
    assert crlf.count(b"\r\n") == crlf.count(b"\n")


# -- the deliveries ----------------------------------------------------------


def test_smtp_delivery_url_and_dict_take_the_signing_settings(table_path, tmp_path):
    kw = parse_url(f"smtp://relay.test:25?tls=none&dkim={table_path}&dkim_required=yes")
    assert kw["dkim"] == str(table_path) and kw["dkim_required"] is True
    assert parse_url(f"smtp://relay.test?dkim={table_path}&dkim_required=off")[
        "dkim_required"] is False
    with pytest.raises(ValueError, match="dkim_required must be yes or no"):
        parse_url("smtp://relay.test?dkim_required=maybe")
    delivery = get_delivery(f"smtp://relay.test?dkim={table_path}&dkim_required=1")
    assert isinstance(delivery, SMTPDelivery) and delivery.signer.required
    assert delivery.url().endswith("&dkim=on")
    delivery = get_delivery({"url": "smtp://relay.test", "dkim": table_path})
    assert isinstance(delivery.signer, Signer) and not delivery.signer.required
    with pytest.raises(ValueError, match="dkim= with client="):
        SMTPDelivery(client=StubSMTP().client, dkim=table_path)
    # the daemon signs queued mail: the queue refuses the setting, with where it goes
    with pytest.raises(ValueError, match="twistd mailout --dkim-keys"):
        parse_url(f"queue:///{tmp_path}/q?dkim={table_path}")
    with pytest.raises(ValueError, match="twistd mailout --dkim-keys"):
        QueueDelivery(str(tmp_path / "q"), dkim=table_path)
    with pytest.raises(ValueError, match="twistd mailout --dkim-keys"):
        Mailer(f"queue://{tmp_path}/q", dkim=table_path)
    with pytest.raises(ValueError, match="signs already"):
        Mailer(SMTPDelivery("relay.test", dkim=table_path), dkim=table_path)


def test_smtp_delivery_signs_through_sendmail(table_path, table):
    stub = StubSMTP()
    delivery = SMTPDelivery(STUB_RELAY, tls="none", reactor=stub.reactor, dkim=table_path)
    d = delivery.send("news@origin.test", ["a@dest.test"], MSG)
    assert stub.result(d).all_delivered
    assert_signed(stub.messages[0]["data"], table)


# -- the Mailer ---------------------------------------------------------------


def test_the_mailer_signs_for_a_synchronous_delivery(table_path, table):
    outbox = MemoryDelivery()
    events: list[Any] = []
    mailer = Mailer(outbox, dkim=table_path, dkim_required=True, observers=[events.append])
    mailer.send(MSG.replace(b"\r\n", b"\n"))
    [sent] = outbox.outbox
    assert b"\r" not in sent.data  # the outbox keeps the message's own line ends
    assert_signed(wire_form(sent.data), table)
    with pytest.raises(DeliveryError, match="message not signed"):
        mailer.send(NO_KEY)
    assert len(outbox.outbox) == 1
    assert [(type(e), e.code) for e in events[-2:]] == [(MailDeferred, 451)] * 2


def test_the_mailer_signs_for_a_direct_delivery(table_path, table):
    stub = StubSMTP(zone=ZONE)
    events: list[Any] = []
    mailer = Mailer(stub.delivery(), dkim=table_path, dkim_required=True,
                    observers=[events.append])
    report = stub.result(mailer.send_deferred(MSG))
    assert report.all_delivered
    first, second = (m["data"] for m in stub.messages)
    assert first == second
    assert_signed(first, table)
    report = stub.result(mailer.send_deferred(NO_KEY))
    assert [(r.status, r.code) for r in report] == [(Status.DEFERRED, 451)] * 2
    assert len(stub.messages) == 2  # nothing more sent
    assert [type(e) for e in events] == [MailDelivered] * 2 + [MailDeferred] * 2
    assert "message not signed" in events[-1].text


def test_a_signing_error_is_not_a_crash_of_the_thread_helper(table):
    stub = StubSMTP()
    d = sign_in_thread(stub.reactor, Signer(table, required=True), NO_KEY, "")
    with pytest.raises(SigningError, match="no key for the From domain"):
        stub.result(d)


# -- a real reactor, a real socket: aiosmtpd -----------------------------------


class SignedOverTheWireTests(unittest.TestCase):
    """The mailer and sendmail() sign in the reactor's thread pool (never on
    the reactor thread) and what aiosmtpd received verifies."""

    timeout = 60

    def setUp(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="mailout-dkim-api-"))
        self.addCleanup(shutil.rmtree, folder, True)
        self.table = KeyTable.load(make_keys(folder))
        self.sink = AiosmtpdSink("127.0.0.1").start()
        self.addCleanup(lambda: threads.deferToThread(self.sink.stop))

    @defer.inlineCallbacks
    def test_signed_off_the_reactor_thread_and_verified_as_received(self):
        counting = CountingSigner(Signer(self.table, required=True))
        mailer = Mailer(f"smtp://127.0.0.1:{self.sink.port}?tls=none&timeout=10",
                        dkim=counting)
        report = yield mailer.send(MSG)
        self.assertTrue(report.all_delivered)
        client = SMTPClient(relay=f"127.0.0.1:{self.sink.port}", tls="none", timeout=10,
                            resolver="127.0.0.1:9", dkim=counting)
        self.addCleanup(client.close)
        report = yield client.send("news@origin.test", ["c@dest.test"], MSG)
        self.assertTrue(report.all_delivered)
        self.assertEqual(counting.calls, [False, False])  # twice, in pool threads
        self.assertEqual(len(self.sink.messages), 2)
        for m in self.sink.messages:
            assert_signed(m["data"], self.table)
            self.assertTrue(m["data"].endswith(MSG))
