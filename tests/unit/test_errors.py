"""One error hierarchy (review finding F15): every exception the package
raises on purpose is a MailoutError, and the classes users already catch keep
their names, their documented import paths and their old bases."""

from __future__ import annotations

import pytest

import twisted_mailout
from twisted_mailout import errors
from twisted_mailout.envelope import Reply, parse_address


def test_the_documented_classes_are_the_hierarchys_classes():
    from twisted_mailout.envelope import AddressError
    from twisted_mailout.message import MessageError

    assert AddressError is errors.AddressError is twisted_mailout.AddressError
    assert MessageError is errors.MessageError is twisted_mailout.MessageError
    assert twisted_mailout.QueueError is errors.QueueError
    assert twisted_mailout.QueueLocked is errors.QueueLocked


@pytest.mark.parametrize("cls", [errors.AddressError, errors.MessageError, errors.ConfigError])
def test_input_errors_are_still_value_errors(cls):
    assert issubclass(cls, errors.MailoutError)
    assert issubclass(cls, ValueError)


def test_a_bad_address_is_caught_as_a_mailout_error_and_as_a_value_error():
    for base in (errors.MailoutError, ValueError, errors.AddressError):
        with pytest.raises(base):
            parse_address("no at sign")


def test_queue_locked_is_a_queue_error():
    assert issubclass(errors.QueueLocked, errors.QueueError)
    assert issubclass(errors.QueueError, errors.MailoutError)


def test_delivery_error_says_whether_to_try_again():
    e = errors.DeliveryError(Reply(554, "5.0.0 refused", True), ["a@x.test"])
    assert (e.status, e.recipients, str(e)) == ("bounced", ["a@x.test"],
                                                "bounced: 554 5.0.0 refused")
    assert errors.DeliveryError(Reply(451, "4.3.0 later", True)).status == "deferred"
    assert isinstance(e, errors.MailoutError)


def test_every_layers_own_errors_sit_under_the_matching_base():
    from twisted_mailout.delivery.pool import DestinationDown, PoolClosed
    from twisted_mailout.envelope import InvalidTransition
    from twisted_mailout.queue.model import CorruptEntry, EntryNotFound, LeaseLost
    from twisted_mailout.routing.dnssec import DNSSECLookupError
    from twisted_mailout.routing.router import RouteError
    from twisted_mailout.smtp.auth import AuthError
    from twisted_mailout.smtp.errors import LocalProtocolError, RemoteProtocolError, SessionError
    from twisted_mailout.smtp.sasl import SASLError
    from twisted_mailout.tls.dane import DANEVerificationError
    from twisted_mailout.tls.errors import CertificateVerifyError
    from twisted_mailout.tls.mtasts import FetchError, PolicyError
    from twisted_mailout.tls.policy import PolicyFileError

    expected = {
        errors.RoutingError: [RouteError, DNSSECLookupError],
        errors.ProtocolError: [SessionError, SASLError, DestinationDown, PoolClosed],
        errors.TLSError: [CertificateVerifyError, DANEVerificationError, FetchError,
                          PolicyError],
        errors.ConfigError: [AuthError, PolicyFileError],
        errors.QueueError: [LeaseLost, EntryNotFound, CorruptEntry],
        errors.MailoutError: [InvalidTransition, LocalProtocolError, RemoteProtocolError],
    }
    for base, classes in expected.items():
        for cls in classes:
            assert issubclass(cls, base), (cls, base)
    # the bases they had stay: what callers catch today still catches them
    for cls in (AuthError, PolicyFileError, SASLError, PolicyError, LocalProtocolError):
        assert issubclass(cls, ValueError), cls
    from OpenSSL import SSL

    assert issubclass(DANEVerificationError, SSL.Error)
    assert issubclass(EntryNotFound, LookupError)
