"""The explicit client (twisted_mailout.api.SMTPClient), sendmail()'s registry of
shared clients, and the in-memory double applications test with
(twisted_mailout.testing.memory.StubSMTP): the real client, connector and session
run against a scripted ESMTP server over twisted.test.iosim, in memory."""

from __future__ import annotations

import pytest
from twisted.internet import defer

import twisted_mailout
from twisted_mailout.api import ClientRegistry, SMTPClient, group_by_destination
from twisted_mailout.apps.mailer import MailBounced, MailDelivered, Mailer
from twisted_mailout.envelope import AddressError, parse_address
from twisted_mailout.outcome import DeliveryReport, Status
from twisted_mailout.testing.loopback import ZoneResolver
from twisted_mailout.testing.memory import STUB_RELAY, StubSMTP

MSG = (b"Message-ID: <stub@test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
       b"Subject: stub\r\n\r\n.dot line\r\nbody\r\n")


def test_scripted_refusals_come_back_per_recipient_and_the_bytes_arrive_unchanged():
    stub = StubSMTP(rcpt_replies={"gone@dest.test": (550, "5.1.1 no such user"),
                                  "busy@dest.test": (450, "4.2.1 mailbox busy")})
    report = stub.result(stub.send("a@origin.test",
                                   ["b@dest.test", "gone@dest.test", "busy@dest.test"], MSG))
    assert isinstance(report, DeliveryReport)
    assert [(r.recipient, r.status, r.code) for r in report] == [
        ("b@dest.test", Status.DELIVERED, 250), ("gone@dest.test", Status.BOUNCED, 550),
        ("busy@dest.test", Status.DEFERRED, 450)]
    # twisted.mail.smtp.sendmail()'s per-address shape
    assert [tuple(r) for r in report][1] == ("gone@dest.test", 550, "5.1.1 no such user")
    assert report["busy@dest.test"].enhanced_status == "4.2.1"
    assert report["b@dest.test"].relay == f"{STUB_RELAY}[{STUB_RELAY}]:25"
    [message] = stub.messages  # the relay: one transaction, refused recipients left out
    assert message["mail_from"] == "a@origin.test"
    assert message["rcpt_tos"] == ["b@dest.test"]
    assert message["data"] == MSG  # dot-stuffed on the wire, unstuffed by the server
    assert [r["rcpt"] for r in stub.refused] == ["gone@dest.test", "busy@dest.test"]


def test_mx_routing_from_a_zone_one_transaction_per_domain_and_a_null_mx_bounces():
    stub = StubSMTP(zone={"records": {
        "one.test": {"MX": [[10, "mx.one.test"]]}, "mx.one.test": {"A": ["192.0.2.1"]},
        "two.test": {"MX": [[10, "mx.two.test"]]}, "mx.two.test": {"AAAA": ["2001:db8::2"]},
        "nullmx.test": {"MX": [[0, "."]]}}})
    report = stub.result(stub.send("a@origin.test",
                                   ["x@one.test", "y@two.test", "z@one.test", "n@nullmx.test"],
                                   MSG))
    assert [r.status for r in report] == [Status.DELIVERED, Status.DELIVERED,
                                          Status.DELIVERED, Status.BOUNCED]
    assert (report["n@nullmx.test"].code, report["n@nullmx.test"].local) == (556, True)
    assert sorted(stub.connections) == [("192.0.2.1", 25), ("2001:db8::2", 25)]
    assert sorted(m["rcpt_tos"] for m in stub.messages) == [["x@one.test", "z@one.test"],
                                                            ["y@two.test"]]
    assert report["y@two.test"].relay == "mx.two.test[2001:db8::2]:25"


def test_one_client_reuses_its_connection_and_close_ends_it():
    stub = StubSMTP()
    for i in range(3):
        report = stub.result(stub.send("a@origin.test", f"r{i}@dest.test", MSG))
        assert report.all_delivered
    assert len(stub.connections) == 1
    assert len(stub.messages) == 3
    stub.close()
    assert stub.receiver.connections == 1
    assert stub._pumps == []  # both ends saw the connection closed


def test_bad_arguments_fail_the_deferred_and_nothing_connects():
    stub = StubSMTP()
    for args in [("a@origin.test", [], MSG), ("a@origin.test", ["b@x\r\n.test"], MSG),
                 ("bad sender", ["b@dest.test"], MSG), ("a@origin.test", ["b@dest.test"], b"")]:
        with pytest.raises(ValueError):
            stub.result(stub.send(*args))
    with pytest.raises(AddressError):
        stub.result(stub.send("a@origin.test", [], MSG))
    assert stub.connections == []


def test_a_bad_client_setting_is_refused_when_the_client_is_made():
    with pytest.raises(ValueError, match="tls must be one of"):
        SMTPClient(StubSMTP().reactor, relay=STUB_RELAY, tls="bogus")
    with pytest.raises(ValueError, match="auth is for a relay"):
        SMTPClient(StubSMTP().reactor, auth=("u", "p"))
    with pytest.raises(TypeError, match="auth must be"):
        SMTPClient(StubSMTP().reactor, relay=STUB_RELAY, auth="user:pw")


def test_a_mailer_over_the_stub_reports_each_recipient_to_its_observers():
    stub = StubSMTP(rcpt_replies=lambda rcpt: (550, "5.7.1 no") if rcpt.startswith("x") else None)
    events = []
    mailer = Mailer(stub.delivery(), observers=[events.append])
    d = mailer.send(b"From: a@origin.test\r\nTo: b@dest.test, x@dest.test\r\n\r\nhi\r\n")
    report = stub.result(d)
    assert [r.status for r in report] == ["delivered", "bounced"]
    assert [(type(e), e.recipient) for e in events] == [(MailDelivered, "b@dest.test"),
                                                         (MailBounced, "x@dest.test")]
    assert stub.messages[0]["rcpt_tos"] == ["b@dest.test"]


def test_a_silent_server_is_timed_out_on_the_stub_clock():
    # Time passes only when the test says so; the session's timeouts then fire.
    stub = StubSMTP(timeout=5)
    stub.silent = True
    d = stub.send("a@origin.test", "b@dest.test", MSG)
    assert not d.called
    stub.reactor.advance(5)
    r = stub.result(d)["b@dest.test"]
    assert (r.status, r.local) == (Status.DEFERRED, True)
    assert "timeout" in r.text
    assert stub.messages == []


def test_the_stub_servers_idle_timeout_runs_on_the_stub_clock():
    # The scripted server (twisted.mail's SMTP, 600 s idle timeout) drops a
    # quiet connection when the stub's clock says so, not the global reactor's.
    stub = StubSMTP(idle_timeout=3600)
    assert stub.result(stub.send("a@origin.test", "b@dest.test", MSG)).all_delivered
    pool = stub.client.connector.pool
    stub.reactor.advance(599)
    stub.flush()
    assert pool.open_connections == 1
    stub.reactor.advance(1)
    stub.flush()
    assert pool.open_connections == 0


def test_sendmail_shares_one_client_per_reactor_and_settings_and_linger_closes_it():
    stub = StubSMTP()
    registry = ClientRegistry()
    resolver = ZoneResolver({"records": {}})
    kw = {"reactor": stub.reactor, "relay": STUB_RELAY, "resolver": resolver,
          "helo": "client.test"}
    ds = [registry.sendmail("a@origin.test", f"r{i}@dest.test", MSG, linger=30, **kw)
          for i in range(3)]
    assert len(registry) == 1  # in flight together: one client
    stub.flush()
    assert all(stub.result(d).all_delivered for d in ds)
    assert 1 <= len(stub.connections) <= 3  # opened at once for calls made at once
    assert len(registry) == 1  # kept for linger
    stub.reactor.advance(30)
    stub.flush()
    assert len(registry) == 0
    assert stub._pumps == []  # its connection was closed (QUIT)
    d = registry.sendmail("a@origin.test", "r@dest.test", MSG, tls="bogus", **kw)
    with pytest.raises(ValueError):
        stub.result(d)
    assert len(registry) == 0


def test_the_module_function_is_the_default_registry():
    assert twisted_mailout.sendmail is twisted_mailout.api.sendmail
    assert isinstance(twisted_mailout.api.default_clients, ClientRegistry)


def test_recipients_are_grouped_by_a_label_domain_or_all_to_the_relay():
    addrs = [parse_address(a) for a in ("a@Bücher.example", "b@x.test", "c@xn--bcher-kva.example")]
    assert {k: [str(a) for a in v] for k, v in group_by_destination(
        addrs, lambda a: a, relay=False).items()} == {
        "xn--bcher-kva.example": ["a@Bücher.example", "c@xn--bcher-kva.example"],
        "x.test": ["b@x.test"]}
    assert list(group_by_destination(addrs, lambda a: a, relay=True)) == ["relay"]


def test_cancelling_a_send_ends_it_and_the_client_goes_on():
    stub = StubSMTP(connections=1)
    stub.silent = True  # the server says nothing: the send is stuck in the session
    d = stub.client.send("a@origin.test", "b@dest.test", MSG)
    stub.flush()
    assert not d.called
    d.cancel()
    with pytest.raises(defer.CancelledError):
        stub.result(d)
    stub.silent = False
    report = stub.result(stub.send("a@origin.test", "c@dest.test", MSG))  # the slot is free
    assert report.all_delivered
    assert [m["rcpt_tos"] for m in stub.messages] == [["c@dest.test"]]


def test_cancelling_sendmail_releases_the_shared_client():
    stub = StubSMTP()
    registry = ClientRegistry()
    stub.silent = True
    d = registry.sendmail("a@origin.test", "b@dest.test", MSG, reactor=stub.reactor,
                          relay=STUB_RELAY, resolver=ZoneResolver({"records": {}}))
    stub.flush()
    assert len(registry) == 1
    d.cancel()
    with pytest.raises(defer.CancelledError):
        stub.result(d)
    assert len(registry) == 0


def test_a_mistyped_setting_of_sendmail_is_a_type_error_at_the_call():
    with pytest.raises(TypeError, match="relai"):
        twisted_mailout.sendmail("a@origin.test", "b@dest.test", MSG, relai=STUB_RELAY)
    with pytest.raises(TypeError, match="idle_timeout"):  # linger= says how long
        ClientRegistry().sendmail("a@origin.test", "b@dest.test", MSG, idle_timeout=5)
