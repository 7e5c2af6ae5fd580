"""The DKIM key table (a TOML file), key generation and the DNS check.

The table names the signing keys and, optionally, which signing domain a
sender uses (like OpenDKIM's KeyTable and SigningTable)::

    [[key]]
    domain = "example.com"          # signing domain (d=)
    selector = "s2026"              # selector (s=)
    type = "rsa"                    # rsa (rsa-sha256) or ed25519 (ed25519-sha256)
    private_key = "example.com.s2026.rsa.key"   # relative to the table's folder

    [signing]                       # optional explicit map
    "news@example.com" = "example.net"   # sender address or @domain -> signing domain

Private keys are read when the table loads; a key file that group or others
may access, an rsa key under 2048 bits, a key whose kind differs from
C{type}, or any other mistake is a L{ConfigError} naming the file, the line
and what is wrong. See C{docs/deliverability.md}.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from twisted_mailout.dkim import DNSUnavailable
from twisted_mailout.errors import ConfigError

__all__ = [
    "KEY_TYPES", "MIN_RSA_BITS", "KeyEntry", "KeyFileError", "KeyTable", "check", "keygen",
    "txt_record",
]

#: The key types and the signature algorithm each signs with (RFC 6376 3.3,
#: RFC 8463 3).
KEY_TYPES: Mapping[str, str] = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}

#: The smallest rsa key accepted, in bits (RFC 8301 3.2 says 1024 at least;
#: the large mailbox providers ask for 2048).
MIN_RSA_BITS = 2048

#: The bits of a key file's mode that must be clear: no access by group or others.
_UNSAFE_MODE = 0o077

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_KEY_FIELDS = ("domain", "selector", "type", "private_key")


class KeyFileError(ConfigError):
    """L{keygen} could not create a file: the key file exists already (it is
    never overwritten), or a folder cannot be written."""


def _domain_name(value: str) -> str | None:
    """The domain C{value} in lower-case A-label form, or L{None} when it is
    not a host name (RFC 5321 2.3.5; IDNA for U-labels)."""
    value = value.strip().rstrip(".")
    try:
        ascii_name = value.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        return None
    return ascii_name


def _selector_name(value: str) -> str | None:
    """The selector C{value} (RFC 6376 3.1: dot-separated sub-domain labels)
    in lower case, or L{None} when it is not one."""
    labels = value.split(".")
    if not value or not all(_LABEL.match(x) for x in labels):
        return None
    return value.lower()


def txt_record(selector: str, domain: str, key_type: str, public: str) -> str:
    """The DNS record publishing a public key (RFC 6376 3.6.1, 3.6.2.2).

    @param selector: the selector (C{s=}).
    @param domain: the signing domain (C{d=}), A-label form.
    @param key_type: C{"rsa"} or C{"ed25519"}.
    @param public: the C{p=} value (base64).
    @return: one zone-file line,
        C{'S._domainkey.D IN TXT "v=DKIM1; k=rsa; p=..."'}, the text split
        into quoted strings of at most 255 bytes (an rsa-2048 key needs two).
    """
    text = f"v=DKIM1; k={key_type}; p={public}"
    parts = [text[i:i + 255] for i in range(0, len(text), 255)]
    quoted = " ".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain} IN TXT {quoted}"


@dataclass(frozen=True)
class KeyEntry:
    """One signing key of the table, loaded.

    @ivar domain: the signing domain (C{d=}), lower-case A-label form.
    @ivar selector: the selector (C{s=}), lower case.
    @ivar type: C{"rsa"} or C{"ed25519"}.
    @ivar path: the private key file (absolute).
    @ivar private: the key as dkimpy takes it: PKCS#1 PEM with LF line ends
        (rsa), or the base64 of the 32-byte seed (ed25519).
    @ivar public: the public key as published in C{p=}: base64 of the
        SubjectPublicKeyInfo DER (rsa, RFC 6376 3.6.1) or of the 32 raw key
        bytes (ed25519, RFC 8463 4).
    @ivar bits: the key size in bits (256 for ed25519).
    """

    domain: str
    selector: str
    type: str
    path: Path
    private: bytes = field(repr=False)
    public: str
    bits: int

    @property
    def algorithm(self) -> str:
        """The signature algorithm (C{a=}): C{"rsa-sha256"} or C{"ed25519-sha256"}."""
        return KEY_TYPES[self.type]

    def txt_record(self) -> str:
        """The DNS TXT record that publishes this key; see L{txt_record}."""
        return txt_record(self.selector, self.domain, self.type, self.public)


def _public_value(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The C{p=} value of a private key's public half (base64 text)."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode("ascii")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _parse_private_key(data: bytes, key_type: str, where: str
                       ) -> tuple[bytes, str, int]:
    """Read a private key file's bytes.

    @param data: the file's content: PEM (PKCS#1 or PKCS#8, rsa or ed25519),
        or for ed25519 also the base64 32-byte seed that dkimpy's C{dknewkey}
        writes.
    @param key_type: the table's C{type} for it.
    @param where: the file and line, for error messages.
    @return: C{(private, public, bits)} as L{KeyEntry} holds them.
    @raise ConfigError: not a key, a key of another type, an rsa key under
        L{MIN_RSA_BITS} bits.
    """
    key: Any
    stripped = data.strip()
    if key_type == "ed25519" and not stripped.startswith(b"-----"):
        try:
            seed = base64.b64decode(stripped, validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ConfigError(f"{where}: the private key file is neither PEM nor the base64 "
                              f"of a 32-byte ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    else:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: the private key file cannot be read as a PEM "
                              f"private key without a password ({e})") from None
    if key_type == "rsa":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{where}: type is rsa but the key file holds a "
                              f"{type(key).__name__} key")
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{where}: the rsa key has {key.key_size} bits; at least "
                              f"{MIN_RSA_BITS} are required (make a new one with mailout dkim "
                              f"keygen)")
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        return pem, _public_value(key), key.key_size
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{where}: type is ed25519 but the key file holds a "
                          f"{type(key).__name__} key")
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return base64.b64encode(seed), _public_value(key), 256


def _read_key_file(path: Path, where: str) -> bytes:
    """The bytes of a private key file that only its owner may access.

    @raise ConfigError: the file cannot be read, or its mode gives group or
        others any access.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"{where}: the private key {path} is not a regular file")
            if mode & _UNSAFE_MODE:
                raise ConfigError(
                    f"{where}: the private key {path} may be accessed by group or others "
                    f"(mode {stat.S_IMODE(mode):04o}); refused: chmod 600 it")
            return f.read()
    except OSError as e:
        raise ConfigError(f"{where}: the private key {path} cannot be read: "
                          f"{e.strerror or e}") from None


def _header_lines(text: str, header: str) -> list[int]:
    """The 1-based line numbers of the table headers C{[[header]]}."""
    pattern = re.compile(r"^\s*\[\[\s*" + re.escape(header) + r"\s*\]\]")
    return [i + 1 for i, line in enumerate(text.splitlines()) if pattern.match(line)]


def _key_line(text: str, key: str, default: int) -> int:
    """The 1-based line where C{key = ...} is written (quoted or bare), else C{default}."""
    pattern = re.compile(r"""^\s*(["']?)""" + re.escape(key) + r"""\1\s*=""")
    for i, line in enumerate(text.splitlines()):
        if pattern.match(line):
            return i + 1
    return default


class KeyTable:
    """The DKIM keys and the signing map, loaded from a table file.

    @ivar path: the table file, or L{None} for a table built in memory.
    @ivar keys: the keys (L{KeyEntry}), in the file's order.
    @ivar signing: the explicit map: lower-case C{"user@domain"} or
        C{"@domain"} (A-label form) to a signing domain that has keys.
    """

    def __init__(self, keys: Iterable[KeyEntry], signing: Mapping[str, str] | None = None,
                 path: Path | None = None) -> None:
        """
        @param keys: the loaded keys; (domain, selector) pairs must be unique.
        @param signing: the explicit map, normalised as L{signing} is.
        @param path: the file the table came from.
        @raise ConfigError: a repeated (domain, selector), or a map entry
            whose signing domain has no key.
        """
        self.path = path
        self.keys: tuple[KeyEntry, ...] = tuple(keys)
        self.signing: dict[str, str] = dict(signing or {})
        self._by_domain: dict[str, list[KeyEntry]] = {}
        seen: set[tuple[str, str]] = set()
        for entry in self.keys:
            if (entry.domain, entry.selector) in seen:
                raise ConfigError(f"selector {entry.selector!r} of {entry.domain} is given "
                                  f"twice")
            seen.add((entry.domain, entry.selector))
            self._by_domain.setdefault(entry.domain, []).append(entry)
        for who, domain in self.signing.items():
            if domain not in self._by_domain:
                raise ConfigError(f"[signing] {who!r} = {domain!r}: there is no [[key]] "
                                  f"for {domain}")

    def __repr__(self) -> str:
        return f"<KeyTable {self.path} keys={[(k.domain, k.selector, k.type) for k in self.keys]}>"

    def keys_for(self, domain: str) -> list[KeyEntry]:
        """The keys of a signing domain.

        @param domain: lower-case A-label domain.
        @return: its keys in table order (rsa and ed25519 both sign: dual
            signing), or an empty list.
        """
        return list(self._by_domain.get(domain, ()))

    def find(self, domain: str, selector: str) -> KeyEntry | None:
        """The key of C{domain} with C{selector} (case-insensitive), or L{None}."""
        d, s = _domain_name(domain), selector.lower()
        for entry in self._by_domain.get(d or "", ()):
            if entry.selector == s:
                return entry
        return None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyTable:
        """Read a key table file and every private key it names.

        @param path: the TOML table; private key paths in it are relative to
            its folder (or absolute).
        @return: the loaded table.
        @raise ConfigError: the file cannot be read or parsed, a field is
            missing, unknown or invalid, a key is unreadable, accessible by
            group or others, of another type than C{type}, or an rsa key
            under 2048 bits; the message names the file and the line.
        """
        p = Path(path).absolute()
        try:
            text = p.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"DKIM key table {p}: cannot be read: {e}") from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"DKIM key table {p}: not valid TOML: {e}") from None
        return cls._from_document(doc, text, p)

    @classmethod
    def _from_document(cls, doc: Mapping[str, Any], text: str, p: Path,
                       read_keys: bool = True) -> KeyTable:
        """Build the table from the parsed TOML C{doc} of C{text} (for line numbers)."""
        unknown = sorted(set(doc) - {"key", "signing"})
        if unknown:
            line = _key_line(text, unknown[0], 1)
            line = next((i + 1 for i, s in enumerate(text.splitlines())
                         if re.match(r"^\s*\[+\s*" + re.escape(unknown[0]), s)), line)
            raise ConfigError(f"{p} line {line}: unknown entry {unknown[0]!r} (expected "
                              f"[[key]] and [signing])")
        raw_keys = doc.get("key", [])
        key_lines = _header_lines(text, "key")
        if not isinstance(raw_keys, list):
            raise ConfigError(f"{p} line {_key_line(text, 'key', 1)}: 'key' must be written "
                              f"as [[key]] tables")
        entries: list[KeyEntry] = []
        seen: dict[tuple[str, str], int] = {}
        for n, raw in enumerate(raw_keys):
            line = key_lines[n] if n < len(key_lines) else 1
            where = f"{p} line {line} ([[key]] #{n + 1})"
            entry = cls._entry(raw, where, p.parent, read_keys)
            if (entry.domain, entry.selector) in seen:
                raise ConfigError(f"{where}: selector {entry.selector!r} of {entry.domain} "
                                  f"is already given at line {seen[entry.domain, entry.selector]}")
            seen[entry.domain, entry.selector] = line
            entries.append(entry)
        signing: dict[str, str] = {}
        raw_map = doc.get("signing", {})
        if not isinstance(raw_map, dict):
            raise ConfigError(f"{p} line {_key_line(text, 'signing', 1)}: 'signing' must be a "
                              f"table of \"sender\" = \"domain\" entries")
        domains = {e.domain for e in entries}
        map_line = next((i + 1 for i, s in enumerate(text.splitlines())
                         if re.match(r"^\s*\[\s*signing\s*\]", s)), 1)
        for who, target in raw_map.items():
            where = f"{p} line {_key_line(text, who, map_line)} ([signing] {who!r})"
            if not isinstance(target, str):
                raise ConfigError(f"{where}: the signing domain must be a string")
            local, at, dom = who.rpartition("@")
            dom_ascii = _domain_name(dom) if at else None
            if not at or dom_ascii is None or any(c in local for c in " \t\"<>"):
                raise ConfigError(f"{where}: expected a sender address (user@domain) or "
                                  f"@domain")
            domain = _domain_name(target)
            if domain is None:
                raise ConfigError(f"{where}: {target!r} is not a domain name")
            if domain not in domains:
                raise ConfigError(f"{where}: there is no [[key]] for {domain}")
            signing[f"{local.lower()}@{dom_ascii}"] = domain
        return cls(entries, signing, p)

    @staticmethod
    def _entry(raw: Any, where: str, folder: Path, read_keys: bool) -> KeyEntry:
        """One C{[[key]]} table, checked, and its key read (unless C{read_keys}
        is false: then C{private}, C{public} and C{bits} are empty)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a [[key]] table")
        unknown = sorted(set(raw) - set(_KEY_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r} (the fields are "
                              f"{', '.join(_KEY_FIELDS)})")
        for name in _KEY_FIELDS:
            if name not in raw:
                raise ConfigError(f"{where}: the field {name!r} is missing")
            if not isinstance(raw[name], str):
                raise ConfigError(f"{where}: {name} must be a string")
        domain = _domain_name(raw["domain"])
        if domain is None:
            raise ConfigError(f"{where}: domain {raw['domain']!r} is not a domain name")
        selector = _selector_name(raw["selector"])
        if selector is None:
            raise ConfigError(f"{where}: selector {raw['selector']!r} is not a valid selector "
                              f"(letters, digits, hyphens, dot-separated labels)")
        key_type = raw["type"].lower()
        if key_type not in KEY_TYPES:
            raise ConfigError(f"{where}: type {raw['type']!r} is not rsa or ed25519")
        if not raw["private_key"]:
            raise ConfigError(f"{where}: private_key is empty")
        path = (folder / raw["private_key"]).absolute()
        if not read_keys:
            return KeyEntry(domain, selector, key_type, path, b"", "", 0)
        data = _read_key_file(path, where)
        private, public, bits = _parse_private_key(data, key_type, where)
        return KeyEntry(domain, selector, key_type, path, private, public, bits)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace C{path} by C{data} with one rename (a temporary file in the
    same folder, synced first), then sync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def keygen(table_path: str | os.PathLike[str], domain: str, selector: str,
           type: str = "rsa") -> tuple[Path, str]:
    """Make a key pair, store the private key beside the table and add it
    to the table.

    The private key is written to C{DOMAIN.SELECTOR.TYPE.key} in the table's
    folder, mode 0600, created exclusively (an existing file is never
    overwritten); rsa keys are 2048-bit PKCS#1 PEM (as C{opendkim-genkey}
    writes), ed25519 keys PKCS#8 PEM. The table gets a C{[[key]]} entry
    appended (the file is created if missing; its existing text, comments
    included, is kept) and is replaced with one atomic rename.

    @param table_path: the key table file.
    @param domain: the signing domain (U-labels are stored in A-label form).
    @param selector: the selector.
    @param type: C{"rsa"} or C{"ed25519"}.
    @return: C{(key_path, record)}: the private key file, and the DNS TXT
        record line to publish (see L{txt_record}).
    @raise ConfigError: a bad domain, selector or type; the table exists and
        cannot be read or parsed, or already has that selector for the
        domain.
    @raise KeyFileError: the key file exists already, or a file cannot be
        written (a L{ConfigError} too).
    """
    table = Path(table_path).absolute()
    d = _domain_name(domain)
    if d is None:
        raise ConfigError(f"{domain!r} is not a domain name")
    s = _selector_name(selector)
    if s is None:
        raise ConfigError(f"{selector!r} is not a valid selector (letters, digits, hyphens, "
                          f"dot-separated labels)")
    key_type = type.lower()
    if key_type not in KEY_TYPES:
        raise ConfigError(f"type {type!r} is not rsa or ed25519")
    text = ""
    table_mode = 0o644
    if table.exists():
        try:
            text = table.read_text("utf-8")
            table_mode = stat.S_IMODE(table.stat().st_mode)
            doc = tomllib.loads(text)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"DKIM key table {table}: cannot be read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"DKIM key table {table}: not valid TOML: {e}") from None
        existing = KeyTable._from_document(doc, text, table, read_keys=False)
        if existing.find(d, s) is not None:
            raise ConfigError(f"DKIM key table {table} already has selector {s!r} for {d}")
    elif not table.parent.is_dir():
        raise ConfigError(f"the folder of {table} does not exist")

    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    key_path = table.parent / f"{d}.{s}.{key_type}.key"
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{key_path} exists already; it is never overwritten (choose "
                          f"another selector)") from None
    except OSError as e:
        raise KeyFileError(f"{key_path} cannot be created: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        block = (f'[[key]]\ndomain = "{d}"\nselector = "{s}"\ntype = "{key_type}"\n'
                 f'private_key = "{key_path.name}"\n')
        if text and not text.endswith("\n"):
            text += "\n"
        new_text = f"{text}\n{block}" if text.strip() else (
            "# DKIM key table (docs/deliverability.md)\n\n" + block)
        tomllib.loads(new_text)  # what is written must parse
        _write_atomically(table, new_text.encode("utf-8"), table_mode)
    except BaseException as e:
        key_path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise KeyFileError(f"DKIM key table {table} cannot be written: "
                              f"{e.strerror or e}") from None
        raise
    return key_path, txt_record(s, d, key_type, _public_value(key))


def _parse_tags(text: str) -> dict[str, str]:
    """The tag=value list of a key record (RFC 6376 3.2), whitespace removed
    from values; a malformed list gives what could be read."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip(), re.sub(r"\s+", "", value))
    return tags


def _lookup_txt(name: str, resolver: str | None, timeout: float) -> list[str] | None:
    """The TXT records at C{name}, each record's strings joined (RFC 6376
    3.6.2.2), with dnspython (a dependency of dkimpy).

    @param resolver: C{HOST:PORT} (C{[v6]:PORT}, or C{HOST} for port 53), or
        L{None} for the system's resolver.
    @return: the records, or L{None} when the name does not exist (NXDOMAIN)
        or has no TXT record.
    @raise DNSUnavailable: the resolver did not answer (timeout, SERVFAIL, ...).
    @raise ValueError: a malformed C{resolver}.
    """
    import dns.exception
    import dns.resolver

    if resolver is None:
        res = dns.resolver.Resolver()
    else:
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", resolver)
        if m is None:
            raise ValueError(f"resolver {resolver!r} is not HOST:PORT")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4) or 53)
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [host]
        res.port = port
    res.lifetime = timeout
    try:
        answer = res.resolve(name, "TXT", raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout,
            OSError) as e:
        raise DNSUnavailable(f"the DNS did not answer for {name}: {e}") from None
    except dns.exception.DNSException as e:
        raise DNSUnavailable(f"the lookup of {name} failed: {e}") from None
    if answer.rrset is None:
        return None
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]


def check(domain: str, selector: str, table: KeyTable, resolver: str | None = None,
          timeout: float = 5.0) -> tuple[bool, str]:
    """Look up a selector's key record and compare it with the table's key.

    Blocking (it waits for the DNS): for the command line, or a thread.

    @param domain: the signing domain.
    @param selector: the selector.
    @param table: the loaded key table holding that key.
    @param resolver: C{HOST:PORT} of the DNS resolver to ask, or L{None} for
        the system's (C{/etc/resolv.conf}).
    @param timeout: the longest wait for the answer, in seconds.
    @return: C{(ok, message)}: C{ok} is true when a C{v=DKIM1} record at
        C{SELECTOR._domainkey.DOMAIN} has the table key's type and public key;
        C{message} says what was found, or what to publish.
    @raise ConfigError: the table has no such key.
    @raise DNSUnavailable: the resolver could not answer.
    @raise ValueError: a malformed C{resolver}.
    """
    entry = table.find(domain, selector)
    if entry is None:
        raise ConfigError(f"the key table {table.path} has no selector {selector!r} for "
                          f"{domain}")
    name = f"{entry.selector}._domainkey.{entry.domain}"
    records = _lookup_txt(name, resolver, timeout)
    if not records:
        return False, (f"{name}: no TXT record; publish:\n{entry.txt_record()}")
    keys = [_parse_tags(r) for r in records]
    dkim = [t for t in keys if t.get("v", "DKIM1") == "DKIM1" and "p" in t]
    if len(dkim) > 1:
        return False, f"{name}: {len(dkim)} key records; a verifier needs exactly one"
    if not dkim:
        return False, f"{name}: the TXT record is not a DKIM key record: {records[0]!r}"
    tags = dkim[0]
    k = tags.get("k", "rsa").lower()
    if not tags["p"]:
        return False, f"{name}: the key is revoked (empty p=)"
    if k != entry.type:
        return False, f"{name}: the record has k={k}, the table's key is {entry.type}"
    if tags["p"] != entry.public:
        return False, (f"{name}: the published key differs from {entry.path.name}; "
                       f"publish:\n{entry.txt_record()}")
    if "s" in tags.get("t", "").split(":"):
        note = " (t=s: the signing domain must equal the From domain exactly)"
    elif "y" in tags.get("t", "").split(":"):
        note = " (t=y: testing mode, verifiers may ignore failures)"
    else:
        note = ""
    return True, f"{name}: the published {entry.type} key matches {entry.path.name}{note}"
