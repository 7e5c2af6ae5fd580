"""DKIM signing (RFC 6376, RFC 8463): the key table, the signer, key
generation and the DNS check.

The layer sits above the queue and below routing: it imports only the core
modules (C{message}, C{envelope}, C{errors}), so the delivery layer can sign a
message before its first attempt. Signing is pure CPU work (the keys are read
when the table loads); callers run it off the reactor thread.

Public names: L{SigningError}, L{DNSUnavailable}, L{KeyTable}, L{KeyEntry},
L{Signer}, L{keygen} and L{check}; see C{docs/deliverability.md}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted_mailout.errors import MailoutError

__all__ = [
    "DNSUnavailable",
    "KeyEntry",
    "KeyTable",
    "Signer",
    "SigningError",
    "check",
    "keygen",
]


class SigningError(MailoutError):
    """A message that cannot be signed: its From field cannot be read, its
    domain has no key while signing is required, or the signing itself failed.

    The message (C{str(error)}) says why, in words fit for a deferral reason.
    """


class DNSUnavailable(MailoutError):
    """The DNS could not answer a DKIM key lookup (timeout, SERVFAIL, refused,
    no name server): nothing is known about the record."""


if TYPE_CHECKING:
    from twisted_mailout.dkim.keys import KeyEntry, KeyTable, check, keygen
    from twisted_mailout.dkim.signer import Signer


def __getattr__(name: str) -> Any:
    """Load the submodules' names on first use (PEP 562), so that importing
    the package for its errors costs nothing.

    @param name: an attribute of the package.
    @return: the named class or function.
    @raise AttributeError: for an unknown name.
    """
    if name in ("KeyEntry", "KeyTable", "check", "keygen"):
        from twisted_mailout.dkim import keys

        return getattr(keys, name)
    if name == "Signer":
        from twisted_mailout.dkim import signer

        return signer.Signer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
