"""The key table: loading, its errors (file, line, what is wrong), keygen's
files and table update, the TXT record, and check() over a stubbed lookup."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from twisted_mailout.dkim import DNSUnavailable, keys
from twisted_mailout.dkim.keys import KeyFileError, KeyTable, check, keygen, txt_record
from twisted_mailout.errors import ConfigError


def write_key(path: Path, key: object, mode: int = 0o600,
              fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt,  # type: ignore[attr-defined]
                                       serialization.NoEncryption()))
    path.chmod(mode)


def entry(domain: str, selector: str, key_type: str, file: str) -> str:
    return (f'[[key]]\ndomain = "{domain}"\nselector = "{selector}"\ntype = "{key_type}"\n'
            f'private_key = "{file}"\n')


def test_load(table: KeyTable) -> None:
    assert [(k.domain, k.selector, k.type, k.bits) for k in table.keys] == [
        ("example.com", "r1", "rsa", 2048), ("example.com", "e1", "ed25519", 256),
        ("example.net", "n1", "rsa", 2048)]
    assert [k.selector for k in table.keys_for("example.com")] == ["r1", "e1"]
    assert table.keys_for("example.org") == []
    assert table.find("Example.COM", "R1") is table.keys[0]


def test_load_signing_map_and_external_key_formats(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_key(tmp_path / "r.pem", rsa_key)  # PKCS#8 rsa is read too
    ed = ed25519.Ed25519PrivateKey.generate()
    seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    import base64
    (tmp_path / "e.key").write_bytes(base64.b64encode(seed) + b"\n")  # dkimpy's dknewkey format
    (tmp_path / "e.key").chmod(0o400)
    (tmp_path / "k.toml").write_text(
        entry("Bücher.example", "a", "rsa", "r.pem") + entry("example.com", "b", "ed25519",
                                                               str(tmp_path / "e.key")) +
        '[signing]\n"News@Example.org" = "example.com"\n'
        '"@bücher.example" = "xn--bcher-kva.example"\n')
    t = KeyTable.load(tmp_path / "k.toml")
    assert t.keys[0].domain == "xn--bcher-kva.example"
    assert t.signing == {"news@example.org": "example.com",
                         "@xn--bcher-kva.example": "xn--bcher-kva.example"}
    raw = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert t.keys[1].public == base64.b64encode(raw).decode()


def table_error(tmp_path: Path, text: str) -> str:
    (tmp_path / "k.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        KeyTable.load(tmp_path / "k.toml")
    return str(info.value)


@pytest.fixture
def good_key(tmp_path: Path) -> str:
    write_key(tmp_path / "good.key", rsa.generate_private_key(public_exponent=65537,
                                                              key_size=2048))
    return "good.key"


def test_table_errors_name_the_line(tmp_path: Path, good_key: str) -> None:
    ok = entry("example.com", "s1", "rsa", good_key)
    assert "line 3" in table_error(tmp_path, '# c\n\n[[key]\n')
    msg = table_error(tmp_path, ok + "\n[[key]]\ndomain = \"example.com\"\ntype = \"rsa\"\n"
                      "private_key = \"good.key\"\n")
    assert "line 7 ([[key]] #2)" in msg and "'selector' is missing" in msg
    msg = table_error(tmp_path, ok + 'colour = "red"\n')
    assert "unknown field 'colour'" in msg
    assert "not rsa or ed25519" in table_error(tmp_path, entry("example.com", "s", "dsa",
                                                                 good_key))
    assert "not a domain name" in table_error(tmp_path, entry("localhost", "s", "rsa", good_key))
    assert "not a valid selector" in table_error(tmp_path, entry("example.com", "a_b", "rsa",
                                                                   good_key))
    msg = table_error(tmp_path, ok + "\n" + entry("example.com", "S1", "rsa", good_key))
    assert "line 7" in msg and "already given at line 1" in msg
    msg = table_error(tmp_path, ok + '\n[signing]\n"a@example.org" = "example.net"\n')
    assert "line 8" in msg and "no [[key]] for example.net" in msg
    msg = table_error(tmp_path, ok + '\n[signing]\n"example.org" = "example.com"\n')
    assert "user@domain" in msg
    msg = table_error(tmp_path, ok + '\n[signin]\n')
    assert "line 7" in msg and "unknown entry 'signin'" in msg


def test_key_file_errors(tmp_path: Path, good_key: str) -> None:
    msg = table_error(tmp_path, entry("example.com", "s", "rsa", "missing.key"))
    assert "missing.key cannot be read" in msg and "line 1" in msg
    (tmp_path / good_key).chmod(0o640)
    msg = table_error(tmp_path, entry("example.com", "s", "rsa", good_key))
    assert "group or others" in msg and "0640" in msg
    (tmp_path / good_key).chmod(0o600)
    assert "type is ed25519" in table_error(tmp_path, entry("example.com", "s", "ed25519",
                                                              good_key))
    write_key(tmp_path / "small.key", rsa.generate_private_key(public_exponent=65537,
                                                               key_size=1024),
              fmt=serialization.PrivateFormat.TraditionalOpenSSL)
    assert "1024 bits; at least 2048" in table_error(
        tmp_path, entry("example.com", "s", "rsa", "small.key"))
    (tmp_path / "junk.key").write_bytes(b"not a key")
    (tmp_path / "junk.key").chmod(0o600)
    assert "cannot be read as a PEM" in table_error(tmp_path, entry("example.com", "s", "rsa",
                                                                      "junk.key"))
    assert "neither PEM nor" in table_error(tmp_path, entry("example.com", "s", "ed25519",
                                                              "junk.key"))


def test_keygen_files_and_table(tmp_path: Path) -> None:
    table = tmp_path / "keys.toml"
    table.write_text("# our keys\n[signing]\n# none yet\n")
    path, record = keygen(table, "Example.com", "s2026", "rsa")
    assert path == tmp_path / "example.com.s2026.rsa.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = table.read_text()
    assert text.startswith("# our keys\n[signing]\n# none yet\n")
    doc = tomllib.loads(text)
    assert doc["key"] == [{"domain": "example.com", "selector": "s2026", "type": "rsa",
                           "private_key": "example.com.s2026.rsa.key"}]
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    t = KeyTable.load(table)
    assert record == t.keys[0].txt_record()
    # the record: v=DKIM1; k=rsa; p=... in quoted strings of 255 bytes at most
    assert record.startswith('s2026._domainkey.example.com IN TXT "v=DKIM1; k=rsa; p=MII')
    strings = record.split(" IN TXT ", 1)[1]
    parts = [p.strip('"') for p in strings.split('" "')]
    assert len(parts) == 2 and len(parts[0]) == 255 and "".join(parts).endswith(t.keys[0].public)

    path2, record2 = keygen(table, "example.com", "e2026", "ed25519")
    assert stat.S_IMODE(path2.stat().st_mode) == 0o600
    assert record2 == f'e2026._domainkey.example.com IN TXT "v=DKIM1; k=ed25519; p=' \
                      f'{KeyTable.load(table).keys[1].public}"'
    assert [k.type for k in KeyTable.load(table).keys] == ["rsa", "ed25519"]


def test_keygen_creates_the_table_and_never_overwrites(tmp_path: Path) -> None:
    table = tmp_path / "new.toml"
    keygen(table, "example.com", "a", "ed25519")
    assert [k.selector for k in KeyTable.load(table).keys] == ["a"]
    before = table.read_bytes()
    with pytest.raises(ConfigError, match="already has selector 'a'"):
        keygen(table, "example.com", "A", "rsa")
    # a key file in the way (say, left from an earlier table): refused, kept
    (tmp_path / "example.com.b.rsa.key").write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="never overwritten"):
        keygen(table, "example.com", "b", "rsa")
    assert (tmp_path / "example.com.b.rsa.key").read_bytes() == b"precious"
    assert table.read_bytes() == before
    with pytest.raises(ConfigError, match="not a domain name"):
        keygen(table, "-bad-.com", "c", "rsa")
    with pytest.raises(ConfigError, match="not rsa or ed25519"):
        keygen(table, "example.com", "c", "dsa")
    assert sorted(os.listdir(tmp_path)) == ["example.com.a.ed25519.key", "example.com.b.rsa.key",
                                            "new.toml"]


def test_keygen_table_not_writable_leaves_no_key(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path, data: bytes, mode: int) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(keys, "_write_atomically", fail)
    with pytest.raises(KeyFileError, match="cannot be written: Permission denied"):
        keygen(tmp_path / "k.toml", "example.com", "a", "ed25519")
    assert os.listdir(tmp_path) == []


def test_txt_record_short() -> None:
    assert txt_record("s", "example.com", "ed25519", "AAAA") == \
        's._domainkey.example.com IN TXT "v=DKIM1; k=ed25519; p=AAAA"'


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str] | None]:
    records: dict[str, list[str] | None] = {}

    def lookup(name: str, resolver: str | None, timeout: float) -> list[str] | None:
        if name not in records:
            raise DNSUnavailable("no answer")
        return records[name]

    monkeypatch.setattr(keys, "_lookup_txt", lookup)
    return records


def test_check(table: KeyTable, published: dict[str, list[str] | None]) -> None:
    rsa_key = table.find("example.com", "r1")
    assert rsa_key is not None
    name = "r1._domainkey.example.com"
    published[name] = None
    ok, msg = check("example.com", "r1", table, None)
    assert not ok and "no TXT record" in msg and rsa_key.txt_record() in msg
    # split into strings and with spaces, as zone files often hold it
    p = rsa_key.public
    published[name] = [f"v=DKIM1; k=rsa; p={p[:200]} {p[200:]}"]
    assert check("example.com", "r1", table, None) == (
        True, f"{name}: the published rsa key matches example.com.r1.rsa.key")
    published[name] = [f"p={p}"]  # v= and k= are optional (RFC 6376 3.6.1)
    assert check("example.com", "r1", table, None)[0]
    published[name] = [f"v=DKIM1; k=rsa; p={p[:-8]}AAAAAAAA"]
    ok, msg = check("example.com", "r1", table, None)
    assert not ok and "differs" in msg
    published[name] = ["v=DKIM1; k=rsa; p="]
    assert "revoked" in check("example.com", "r1", table, None)[1]
    published[name] = [f"v=DKIM1; k=ed25519; p={p}"]
    assert "k=ed25519" in check("example.com", "r1", table, None)[1]
    published[name] = ["v=spf1 -all"]
    assert not check("example.com", "r1", table, None)[0]
    with pytest.raises(DNSUnavailable):
        check("example.com", "e1", table, None)
    with pytest.raises(ConfigError, match="no selector 'zz'"):
        check("example.com", "zz", table, None)
