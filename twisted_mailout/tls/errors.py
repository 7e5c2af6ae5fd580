"""Certificate verification failures: the one table from OpenSSL's verify
error codes to their text and RFC 8460 result type, and the exception types
a verifying TLS level raises.

The table merges what used to be two drifting copies (the TLS policy's and
TLS-RPT's). Its RFC 8460 4.3.1 result types follow the RFC's definitions
literally:

  - C{certificate-expired} is "the certificate has expired": code 10 only.
    Code 9 (I{not yet valid}) is C{validation-failure}: the certificate is
    not expired, and the usual causes (a clock that is wrong, on our side or
    the issuer's, or a certificate deployed before its start date) are not
    what a receiving domain's operator would look for when told "expired".
  - C{certificate-not-trusted} is "a trust anchor could not be found":
    unknown, self-signed or invalid issuers (2, 18, 19, 20, 21, 24, 27, 28).
  - C{certificate-host-mismatch}: OpenSSL's own host and IP checks (62,
    64); our name check raises L{CertificateNameError} instead.
  - everything else, revocation (23) and a bad signature (7) included, is
    C{validation-failure}, the RFC's "general failure".

The exception types are named C{Certificate...Error} after what they are
about, and are distinct from C{service_identity}'s C{CertificateError}
(which means "the certificate holds malformed identities"):
L{CertificateVerifyError} is the common base, L{CertificateChainError} a
chain OpenSSL refused, L{CertificateNameError} a chain that verified but
names none of the expected hosts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from OpenSSL import SSL
from service_identity.exceptions import CertificateError, VerificationError
from twisted.python.failure import Failure

from twisted_mailout.errors import TLSError

__all__ = [
    "CERTIFICATE_RESULT_TYPES",
    "VERIFY_ERRORS",
    "CertificateChainError",
    "CertificateNameError",
    "CertificateVerifyError",
    "describe_verify_error",
    "result_type_for",
    "result_type_for_verify_error",
]

#: The RFC 8460 4.3.1 result types a certificate check can give.
CERTIFICATE_RESULT_TYPES: Final[frozenset[str]] = frozenset({
    "certificate-expired", "certificate-not-trusted", "certificate-host-mismatch",
    "validation-failure"})

#: OpenSSL C{X509_V_ERR_*} codes (C{x509_vfy.h}) -> C{(text, RFC 8460 result
#: type)}. Codes not listed are C{validation-failure}, with a generic text.
VERIFY_ERRORS: Final[dict[int, tuple[str, str]]] = {
    2: ("unable to get the issuer certificate (unknown CA)", "certificate-not-trusted"),
    7: ("certificate signature failure", "validation-failure"),
    9: ("certificate is not yet valid", "validation-failure"),
    10: ("certificate has expired", "certificate-expired"),
    18: ("self-signed certificate", "certificate-not-trusted"),
    19: ("self-signed certificate in the chain", "certificate-not-trusted"),
    20: ("unable to get the local issuer certificate (unknown CA)",
         "certificate-not-trusted"),
    21: ("unable to verify the first certificate (unknown CA)", "certificate-not-trusted"),
    23: ("certificate revoked", "validation-failure"),
    24: ("invalid CA certificate", "certificate-not-trusted"),
    27: ("certificate not trusted", "certificate-not-trusted"),
    28: ("certificate rejected", "certificate-not-trusted"),
    62: ("host name mismatch", "certificate-host-mismatch"),
    64: ("IP address mismatch", "certificate-host-mismatch"),
}


def describe_verify_error(code: int) -> tuple[str, str]:
    """The text and RFC 8460 result type of an OpenSSL verify error.

    @param code: an C{X509_V_ERR_*} code, as passed to a verify callback.
    @return: C{(text, result_type)}; an unknown code gives
        C{("certificate verify error CODE", "validation-failure")}.
    """
    return VERIFY_ERRORS.get(code, (f"certificate verify error {code}", "validation-failure"))


def result_type_for_verify_error(code: int) -> str:
    """The RFC 8460 4.3.1 result type of an OpenSSL verify error code.

    @param code: an C{X509_V_ERR_*} code.
    @return: one of L{CERTIFICATE_RESULT_TYPES} (C{"validation-failure"} for codes
        not in L{VERIFY_ERRORS}).
    """
    return describe_verify_error(code)[1]


class CertificateVerifyError(TLSError):
    """A server certificate refused by a verifying TLS level (C{verify},
    C{secure}, MTA-STS C{enforce}, the MTA-STS policy fetch).

    The connection creator hands it to C{failVerification}, so it is the
    reason the TLS connection was lost.

    @ivar result_type: the RFC 8460 4.3.1 result type (one of
        L{CERTIFICATE_RESULT_TYPES}).
    """

    result_type: str = "validation-failure"

    def __init__(self, text: str, result_type: str | None = None) -> None:
        super().__init__(text)
        if result_type is not None:
            self.result_type = result_type


class CertificateChainError(CertificateVerifyError):
    """OpenSSL refused the chain (expired, self-signed, unknown CA, ...).

    @ivar code: the C{X509_V_ERR_*} code.
    @ivar depth: the position in the chain of the certificate refused
        (0 is the server's own).
    """

    def __init__(self, code: int, depth: int) -> None:
        text, kind = describe_verify_error(code)
        super().__init__(f"certificate verify failed: {text} (depth {depth})", kind)
        self.code = code
        self.depth = depth


class CertificateNameError(CertificateVerifyError):
    """The chain verified but the server's certificate names none of the
    expected hosts; the text lists what it names and what was expected."""

    result_type = "certificate-host-mismatch"


def _leaves(exc: BaseException, depth: int = 0) -> Iterable[BaseException]:
    """The exception and those it wraps (C{reasons} of twisted.web's
    wrapper exceptions, C{Failure}s, C{__cause__}), depth first."""
    if depth > 8:
        return
    yield exc
    for reason in getattr(exc, "reasons", None) or ():
        inner = reason.value if isinstance(reason, Failure) else reason
        if isinstance(inner, BaseException):
            yield from _leaves(inner, depth + 1)
    if exc.__cause__ is not None:
        yield from _leaves(exc.__cause__, depth + 1)


def result_type_for(error: BaseException | Failure,
                    verify_errors: Iterable[tuple[int, int]] = ()) -> str | None:
    """Map a TLS failure to its RFC 8460 4.3.1 result type.

    @param error: a C{Failure} or exception: a L{CertificateVerifyError},
        C{service_identity}'s C{VerificationError}/C{CertificateError} (a
        name mismatch found by C{optionsForClientTLS}), an
        C{OpenSSL.SSL.Error}, or a twisted.web wrapper
        (C{ResponseNeverReceived}, C{ResponseFailed}, ...) holding one.
    @param verify_errors: C{[(depth, X509_V_ERR code)]} recorded by the
        caller; tells expired from untrusted when C{error} is a bare
        C{SSL.Error} (our own creators raise L{CertificateChainError}, which
        carries its result type, so they need none).
    @return: one of L{CERTIFICATE_RESULT_TYPES}, or L{None} when C{error} is not a TLS
        failure (refused connection, timeout, ...).
    @raise TypeError: C{error} is neither a C{Failure} nor an exception.
    """
    exc = error.value if isinstance(error, Failure) else error
    if not isinstance(exc, BaseException):
        raise TypeError(f"error must be a Failure or an exception, got {error!r}")
    recorded = list(verify_errors)
    found = None
    for leaf in _leaves(exc):
        if isinstance(leaf, CertificateVerifyError):
            return leaf.result_type
        if isinstance(leaf, (VerificationError, CertificateError)):
            return "certificate-host-mismatch"
        if isinstance(leaf, SSL.Error) and found is None:
            found = leaf
    if found is None:
        return None
    if recorded:
        return result_type_for_verify_error(recorded[0][1])
    return "validation-failure"
