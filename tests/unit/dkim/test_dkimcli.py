"""mailout dkim keygen/check: exit statuses and output (check over a stubbed lookup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from twisted_mailout.daemon import dkimcli
from twisted_mailout.dkim import DNSUnavailable, keys
from twisted_mailout.dkim.keys import KeyTable


def test_keygen_prints_the_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "keys.toml"
    assert dkimcli.run(["keygen", "--keys", str(table), "--domain", "example.com",
                        "--selector", "s1", "--type", "ed25519"]) == 0
    out, err = capsys.readouterr()
    assert out == KeyTable.load(table).keys[0].txt_record() + "\n"
    assert "example.com.s1.ed25519.key" in err
    assert dkimcli.run(["keygen", "--keys", str(table), "--domain", "example.com",
                        "--selector", "s1"]) == 64
    (tmp_path / "example.com.s2.rsa.key").write_text("x")
    assert dkimcli.run(["keygen", "--keys", str(table), "--domain", "example.com",
                        "--selector", "s2"]) == 73
    assert "never overwritten" in capsys.readouterr().err


def test_usage_errors_exit_64(tmp_path: Path) -> None:
    for argv in (["keygen", "--keys", "k"], ["bogus"], [],
                 ["keygen", "--keys", "k", "--domain", "d", "--selector", "s", "--type", "dsa"]):
        with pytest.raises(SystemExit) as info:
            dkimcli.run(argv)
        assert info.value.code == 64, argv


def test_check_statuses(table_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    table = KeyTable.load(table_path)
    answers: dict[str, object] = {}
    asked: list[str | None] = []

    def lookup(name: str, resolver: str | None, timeout: float) -> list[str] | None:
        asked.append(resolver)
        answer = answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    monkeypatch.setattr(keys, "_lookup_txt", lookup)
    key = table.find("example.com", "r1")
    assert key is not None
    argv = ["check", "--keys", str(table_path), "--domain", "example.com", "--selector", "r1",
            "--resolver", "127.0.0.1:5353"]
    answers["r1._domainkey.example.com"] = [f"v=DKIM1; k=rsa; p={key.public}"]
    assert dkimcli.run(argv) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert asked == ["127.0.0.1:5353"]
    answers["r1._domainkey.example.com"] = None
    assert dkimcli.run(argv) == 1
    assert key.txt_record() in capsys.readouterr().out
    answers["r1._domainkey.example.com"] = DNSUnavailable("timed out")
    assert dkimcli.run(argv) == 69
    assert dkimcli.run([*argv[:-2], "--selector", "nope"]) == 64
    assert dkimcli.run([*argv[:2], str(table_path.parent / "missing.toml"), *argv[3:]]) == 64
