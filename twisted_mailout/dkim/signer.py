"""The DKIM signer: which keys sign a message, and the DKIM-Signature fields.

L{Signer.sign} is pure CPU work over keys loaded already (no I/O), so the
delivery layer runs it in a thread. It signs the message as it goes on the
wire: every line end CRLF (the SMTP session converts bare LF and CR, see
C{smtp/dotstuff.py}), relaxed/relaxed (RFC 6376 3.4.2, 3.4.4).

dkimpy builds the header field, canonicalizes and hashes; the RSA signature
itself (RFC 8017 8.2.1, RSASSA-PKCS1-v1_5) is computed by the C{cryptography}
package (OpenSSL) rather than by dkimpy's pure-Python C{pow}, which cost about
6 ms of CPU per rsa-2048 signature, under the GIL. See L{_FastDKIM}.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Callable
from typing import Any

import dkim as dkimpy
import dkim.crypto as dkimpy_crypto
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from twisted_mailout.dkim import SigningError
from twisted_mailout.dkim.keys import KeyEntry, KeyTable
from twisted_mailout.message import MessageError, header_addresses, split_headers

__all__ = ["FAST_RSA", "SIGNED_HEADERS", "Signer", "prepend_signature", "wire_form"]

#: The header fields signed when present, in this order (RFC 6376 5.4.1);
#: From is also signed once more than it occurs (over-signed), so that no
#: From field can be added without breaking the signature.
SIGNED_HEADERS: tuple[str, ...] = (
    "From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
    "Reply-To", "List-Unsubscribe", "List-Unsubscribe-Post",
)

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def wire_form(message: bytes) -> bytes:
    """The message as the SMTP session sends it (before dot-stuffing, which
    the receiver undoes): every CRLF, bare LF or bare CR becomes CRLF, and a
    last line without a line end gets one (RFC 5321 2.3.8, 4.1.1.4).

    @param message: the message bytes, any line ends.
    @return: the CRLF form.
    """
    out = _LINE_END.sub(b"\r\n", message)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def prepend_signature(fields: bytes, message: bytes) -> bytes:
    """The message with its DKIM-Signature fields in front, written with the
    message's own line ends: CRLF fields before a message that has CRLF line
    ends, LF fields before one that has only LF. The signature covers the
    wire form (L{wire_form}), which is the same either way, so a message kept
    in a file or an outbox stays in one line-end convention and still
    verifies once sent.

    @param fields: what L{Signer.sign} returned (CRLF line ends; C{b""}
        when no key applied).
    @param message: the message that was signed.
    @return: the signed message (C{message} itself when C{fields} is empty).
    """
    if not fields:
        return message
    if b"\r\n" not in message and b"\n" in message:
        fields = fields.replace(b"\r\n", b"\n")
    return fields + message


# -- RSA through OpenSSL, for this signer only ---------------------------------
#
# dkimpy 1.1 has no signing callback: DKIM.sign() turns the PEM text into a
# dict of integers with dkim.crypto.parse_pem_private_key (pure-Python ASN.1)
# and DKIM.gen_header() signs the header hash with
# dkim.crypto.RSASSA_PKCS1_v1_5_sign (pure-Python pow(), holding the GIL:
# 90% of a signature's cost). Both are looked up as globals of the dkim
# module. _FastDKIM carries copies of those two methods (same code objects)
# whose globals are a copy of the dkim module's namespace with just those two
# names rebound to _load_rsa and _sign_rsa below. dkimpy itself, and every
# other user of it in the process, is untouched. Everything else (tag list,
# body hash, header canonicalization and hashing, folding, ed25519) is still
# dkimpy's code. The result is byte for byte what dkimpy makes (PKCS#1 v1.5
# signatures are deterministic): tests/unit/dkim/test_signer.py checks it.

#: The hash functions dkimpy names (C{HashThrough.name}) for RSA.
_RSA_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha1": hashes.SHA1}


def _load_rsa(data: Any) -> Any:
    """Stands in for C{dkim.crypto.parse_pem_private_key} in L{_FastDKIM.sign}:
    a loaded C{cryptography} RSA key is passed through as it is; anything
    else goes to dkimpy's parser.

    @param data: an C{RSAPrivateKey}, or PEM bytes.
    @return: what L{_sign_rsa} takes.
    """
    if isinstance(data, rsa.RSAPrivateKey):
        return data
    return dkimpy_crypto.parse_pem_private_key(data)


def _sign_rsa(digest: Any, private_key: Any) -> bytes:
    """Stands in for C{dkim.crypto.RSASSA_PKCS1_v1_5_sign} in
    L{_FastDKIM.gen_header}: RSASSA-PKCS1-v1_5 (RFC 8017 8.2.1) over the
    finished hash, by OpenSSL, which releases the GIL while it works.

    @param digest: dkimpy's C{HashThrough} (C{name}, C{digest()}).
    @param private_key: an C{RSAPrivateKey} (from L{_load_rsa}), or dkimpy's
        key dict, which goes to dkimpy's own function.
    @return: the signature, as long as the modulus.
    """
    if not isinstance(private_key, rsa.RSAPrivateKey):
        return bytes(dkimpy_crypto.RSASSA_PKCS1_v1_5_sign(digest, private_key))
    algorithm = _RSA_HASHES[digest.name.lower()]()
    return private_key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


def _rebound(function: Any, names: dict[str, Any]) -> Any:
    """A copy of C{function} (same code, defaults) whose module globals are
    a copy of its own with C{names} rebound."""
    namespace = dict(function.__globals__)
    namespace.update(names)
    copy = types.FunctionType(function.__code__, namespace, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__doc__ = function.__doc__
    return copy


#: Whether this dkimpy looks the two names up as L{_FastDKIM} expects. When
#: a later dkimpy does not, signing falls back to dkimpy's own RSA (correct,
#: slower); a unit test says so.
FAST_RSA: bool = (
    "parse_pem_private_key" in dkimpy.DKIM.sign.__code__.co_names
    and "RSASSA_PKCS1_v1_5_sign" in dkimpy.DKIM.gen_header.__code__.co_names)


class _FastDKIM(dkimpy.DKIM):
    """dkimpy's C{DKIM} whose C{sign} and C{gen_header} take a loaded
    C{cryptography} RSA key and sign with OpenSSL (see the comment above)."""

    if FAST_RSA:
        sign = _rebound(dkimpy.DKIM.sign, {"parse_pem_private_key": _load_rsa})
        gen_header = _rebound(dkimpy.DKIM.gen_header,
                              {"RSASSA_PKCS1_v1_5_sign": _sign_rsa})


@functools.lru_cache(maxsize=1024)
def _authors(field: bytes) -> tuple[str, ...]:
    """The addresses of one From field, read by the strict parser
    (L{header_addresses}); memoized, because bulk mail repeats its From field
    and the RFC 5322 parser of C{email.headerregistry} cost as much CPU as
    the signature itself (a failure is not memoized).

    @param field: the raw field, its continuation lines included.
    @return: the addr-specs.
    @raise MessageError: the field is not a valid, unambiguous address list.
    """
    return tuple(header_addresses(field, ["From"]))


def _domain_of(address: str) -> str:
    """The lower-case A-label domain of an address (C{""} when none)."""
    _, at, domain = address.rpartition("@")
    if not at:
        return ""
    domain = domain.strip().rstrip(".")
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return domain.lower()


def _map_key(address: str) -> str:
    """An address as the signing map's keys are written: lower case, A-label domain."""
    local, at, _ = address.rpartition("@")
    return f"{local.lower()}@{_domain_of(address)}" if at else ""


class Signer:
    """Signs messages with the keys of a L{KeyTable}.

    @ivar table: the key table.
    @ivar required: when true, a message no key applies to is a
        L{SigningError} (deferred, never sent unsigned); when false it is
        sent as it is.
    """

    def __init__(self, table: KeyTable, required: bool = False) -> None:
        """
        @param table: the loaded key table.
        @param required: refuse to pass a message no key applies to.
        """
        self.table = table
        self.required = required
        # The RSA keys parsed once, for OpenSSL (see _FastDKIM).
        self._rsa: dict[KeyEntry, rsa.RSAPrivateKey] = {}
        if FAST_RSA:
            for key in table.keys:
                if key.type == "rsa":
                    loaded = serialization.load_pem_private_key(key.private, password=None)
                    if isinstance(loaded, rsa.RSAPrivateKey):
                        self._rsa[key] = loaded

    def choose(self, message: bytes, sender: str | None = None) -> list[KeyEntry]:
        """The keys that sign a message.

        The explicit map (C{[signing]}) is asked first, in this order: the
        envelope sender's address, C{@} its domain, the From address, C{@}
        its domain. Without a match, the From domain's own keys sign.

        @param message: the message bytes.
        @param sender: the envelope sender (MAIL FROM), C{""} or L{None} for
            the null sender (a bounce: only the From field chooses).
        @return: the keys (several for dual signing), or an empty list.
        @raise SigningError: the From field is missing, repeated, unreadable
            or without a domain, while C{required} or while the envelope
            sender chose keys.
        """
        candidates: list[str] = []
        if sender:
            key = _map_key(sender)
            if key:
                candidates += [key, "@" + key.rpartition("@")[2]]
        for who in candidates:
            if who in self.table.signing:
                self._from_address(message)  # committed to signing: From must be readable
                return self.table.keys_for(self.table.signing[who])
        try:
            author = self._from_address(message)
        except SigningError:
            if self.required:
                raise
            return []
        key = _map_key(author)
        for who in (key, "@" + key.rpartition("@")[2]):
            if who in self.table.signing:
                return self.table.keys_for(self.table.signing[who])
        return self.table.keys_for(_domain_of(author))

    @staticmethod
    def _from_address(message: bytes) -> str:
        """The author address of a message (RFC 5322 3.6.2).

        @return: the first From address (all of a multi-author From share one
            domain).
        @raise SigningError: no From field, more than one, an unreadable one,
            no address or no domain, or authors of several domains.
        """
        lines, _ = split_headers(message)
        count = 0
        field: list[bytes] = []
        in_from = False
        for line in lines:
            if line[:1] in (b" ", b"\t"):  # a continuation line (RFC 5322 2.2.3)
                if in_from:
                    field.append(line)
                continue
            m = _FIELD.match(line)
            in_from = m is not None and m.group(1).lower() == b"from"
            if in_from:
                count += 1
                field.append(line)
        if count == 0:
            raise SigningError("cannot be DKIM signed: the message has no From header field")
        if count > 1:
            raise SigningError(f"cannot be DKIM signed: the message has {count} From header "
                               f"fields (RFC 5322 3.6 allows one)")
        try:
            authors = _authors(b"".join(field))
        except MessageError as e:
            raise SigningError(f"cannot be DKIM signed: {e}") from None
        if not authors:
            raise SigningError("cannot be DKIM signed: the From header field holds no address")
        domains = {_domain_of(a) for a in authors}
        if "" in domains:
            raise SigningError(f"cannot be DKIM signed: the From address {authors[0]!r} has "
                               f"no domain")
        if len(domains) > 1:
            raise SigningError(f"cannot be DKIM signed: the From header field names authors "
                               f"of {len(domains)} domains ({', '.join(sorted(domains))})")
        return authors[0]

    @staticmethod
    def _header_list(message: bytes) -> list[bytes]:
        """The C{h=} list: each of L{SIGNED_HEADERS} as often as it occurs,
        and From once more (over-signed)."""
        lines, _ = split_headers(message)
        counts: dict[bytes, int] = {}
        for line in lines:
            m = _FIELD.match(line)
            if m is not None:
                name = m.group(1).lower()
                counts[name] = counts.get(name, 0) + 1
        names: list[bytes] = []
        for header in SIGNED_HEADERS:
            name = header.lower().encode("ascii")
            extra = 1 if name == b"from" else 0
            names += [name] * (counts.get(name, 0) + extra)
        return names

    def sign(self, message: bytes, sender: str | None = None) -> bytes:
        """The DKIM-Signature header field(s) of a message.

        Every key L{choose} gives signs (rsa-sha256 and/or ed25519-sha256,
        relaxed/relaxed, C{d=} the key's domain, C{h=} see
        L{SIGNED_HEADERS}), over the message's wire form (L{wire_form}).

        @param message: the message bytes as queued, LF or CRLF line ends.
        @param sender: the envelope sender, for the signing map; L{None} or
            C{""} for none.
        @return: the field(s) to prepend to the message, with CRLF line ends
            and folded lines; C{b""} when no key applies and signing is not
            required.
        @raise SigningError: signing is required and no key applies, the
            From field cannot be read (see L{choose}), or a signature could
            not be made; the message says why.
        """
        keys = self.choose(message, sender)
        if not keys:
            if self.required:
                author = self._from_address(message)
                raise SigningError(
                    f"cannot be DKIM signed: no key for the From domain "
                    f"{_domain_of(author)} (or for the sender) in the key table, and "
                    f"signing is required")
            return b""
        data = wire_form(message)
        include = self._header_list(data)
        out: list[bytes] = []
        for key in keys:
            private: Any = self._rsa.get(key, key.private)
            try:
                d = _FastDKIM(data, signature_algorithm=key.algorithm.encode("ascii"),
                              linesep=b"\r\n")
                field = d.sign(key.selector.encode("ascii"), key.domain.encode("ascii"),
                               private, canonicalize=(b"relaxed", b"relaxed"),
                               include_headers=include)
            except (dkimpy.DKIMException, ValueError) as e:
                raise SigningError(f"cannot be DKIM signed with {key.selector} of "
                                   f"{key.domain}: {e}") from None
            out.append(field if field.endswith(b"\r\n") else field + b"\r\n")
        return b"".join(out)
