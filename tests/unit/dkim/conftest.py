"""Keys for the DKIM unit tests: made once per session (rsa-2048 costs ~0.1 s)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from twisted_mailout.dkim.keys import KeyTable, keygen


@pytest.fixture(scope="session")
def key_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with keys.toml: rsa and ed25519 keys of example.com, an rsa
    key of example.net; copied per test by L{table_path}."""
    folder = tmp_path_factory.mktemp("dkimkeys")
    table = folder / "keys.toml"
    keygen(table, "example.com", "r1", "rsa")
    keygen(table, "example.com", "e1", "ed25519")
    keygen(table, "example.net", "n1", "rsa")
    return folder


@pytest.fixture
def table_path(key_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the session's key folder; returns its keys.toml."""
    dest = tmp_path / "keys"
    shutil.copytree(key_folder, dest)
    return dest / "keys.toml"


@pytest.fixture
def table(table_path: Path) -> KeyTable:
    """The loaded copy."""
    return KeyTable.load(table_path)


@pytest.fixture
def dnsfunc(table: KeyTable) -> object:
    """A dnsfunc for dkim.verify serving the public keys of L{table}."""
    records = {}
    for k in table.keys:
        name = f"{k.selector}._domainkey.{k.domain}.".encode()
        records[name] = f"v=DKIM1; k={k.type}; p={k.public}".encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc
