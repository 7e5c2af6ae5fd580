"""The one table from OpenSSL verify errors to text and RFC 8460 result type,
and the certificate error types (twisted_mailout.tls.errors)."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from service_identity.exceptions import CertificateError as ServiceIdentityCertificateError
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived

from twisted_mailout.tls import errors, tlsrpt
from twisted_mailout.tls.errors import (
    CERTIFICATE_RESULT_TYPES,
    VERIFY_ERRORS,
    CertificateChainError,
    CertificateNameError,
    CertificateVerifyError,
    describe_verify_error,
    result_type_for,
    result_type_for_verify_error,
)


@pytest.mark.parametrize("code, result_type", [
    (10, "certificate-expired"),
    (9, "validation-failure"),  # not yet valid is not "expired" (RFC 8460 4.3.1)
    (23, "validation-failure"),  # revoked: not a missing trust anchor
    (7, "validation-failure"),
    (2, "certificate-not-trusted"), (18, "certificate-not-trusted"),
    (19, "certificate-not-trusted"), (20, "certificate-not-trusted"),
    (21, "certificate-not-trusted"), (24, "certificate-not-trusted"),
    (27, "certificate-not-trusted"), (28, "certificate-not-trusted"),
    (62, "certificate-host-mismatch"), (64, "certificate-host-mismatch"),
    (9999, "validation-failure"),
])
def test_verify_error_result_types(code, result_type):
    assert result_type_for_verify_error(code) == result_type
    assert tlsrpt.result_type_for_verify_error(code) == result_type  # one table, re-exported
    assert result_type in CERTIFICATE_RESULT_TYPES
    assert CERTIFICATE_RESULT_TYPES <= tlsrpt.RESULT_TYPES


def test_every_code_has_a_text():
    for code, (text, kind) in VERIFY_ERRORS.items():
        assert text and kind in CERTIFICATE_RESULT_TYPES, code
    assert describe_verify_error(9999) == ("certificate verify error 9999", "validation-failure")


def test_chain_error_names_the_failure():
    e = CertificateChainError(10, 0)
    assert str(e) == "certificate verify failed: certificate has expired (depth 0)"
    assert (e.code, e.depth, e.result_type) == (10, 0, "certificate-expired")
    assert isinstance(e, CertificateVerifyError)
    # not service_identity's CertificateError (a malformed identity in a certificate)
    assert not issubclass(CertificateVerifyError, ServiceIdentityCertificateError)
    assert errors.CertificateNameError("x").result_type == "certificate-host-mismatch"


def test_result_type_for_unwraps_http_client_failures():
    expired = CertificateChainError(10, 0)
    assert result_type_for(expired) == "certificate-expired"
    assert result_type_for(Failure(CertificateNameError("names x"))) == \
        "certificate-host-mismatch"
    wrapped = ResponseNeverReceived([Failure(ConnectionError()), Failure(expired)])
    assert result_type_for(wrapped) == "certificate-expired"
    ssl_error = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert result_type_for(ssl_error, [(0, 18)]) == "certificate-not-trusted"
    assert result_type_for(ConnectionRefusedError()) is None
    assert tlsrpt.result_type_for is result_type_for
