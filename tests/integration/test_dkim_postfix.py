"""DKIM signatures verified after a real SMTP hop to Postfix (issue 12 item
1's tests): the daemon signs 8-bit, long-line, multipart and plain messages
with rsa-sha256 and with ed25519-sha256 keys and delivers them to Postfix's
smtp-sink, which stores what it receives; the stored copy (with the Received
field smtp-sink adds on top) is verified by dkimpy through the loopback DNS
zone and by OpenDKIM's opendkim-testmsg, a verifier that is not the signer,
in a private network namespace (see test_dkim_verify.py). A tampered copy of
each fails both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dkim
import dns.resolver
import pytest

from tests.integration.test_dkim_verify import (
    MESSAGES,
    NAMESPACE_SCRIPT,
    _opendkim_testmsg_or_skip,
)
from tests.support.daemon import Daemon
from tests.support.peers import DnsServerProcess, SmtpSink, zone
from tests.support.wait import wait_for
from twisted_mailout import enqueue
from twisted_mailout.dkim.keys import KeyTable, keygen

#: One signing domain per key type, so each message carries one signature.
DOMAINS = {"rsa": "rsa.example.test", "ed25519": "ed.example.test"}


def _message(key_type: str, name: str) -> bytes:
    """The test message C{name}, from the domain of C{key_type}'s key."""
    return MESSAGES[name].replace(b"example.test", DOMAINS[key_type].encode())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The key table (an rsa key of rsa.example.test, an ed25519 key of
    ed.example.test) and the zone publishing them."""
    folder = tmp_path_factory.mktemp("dkim-postfix")
    table_path = folder / "keys" / "keys.toml"
    table_path.parent.mkdir(mode=0o700)
    for key_type, domain in DOMAINS.items():
        keygen(table_path, domain, "s1", key_type)
    records = {}
    for k in KeyTable.load(table_path).keys:
        text = f"v=DKIM1; k={k.type}; p={k.public}"
        records[f"{k.selector}._domainkey.{k.domain}"] = {
            "TXT": [[text[i:i + 255] for i in range(0, len(text), 255)]]}
    return table_path, zone(records, authoritative_for=("test",))


@pytest.fixture(scope="module")
def received(keys: tuple[Path, dict],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every message of the matrix as smtp-sink stored it, by C{TYPE-NAME}:
    its Received field, then the message (CRLF line ends)."""
    if not SmtpSink.available():
        if os.environ.get("CI") == "true":
            pytest.fail("smtp-sink is missing: install Debian's postfix")
        pytest.skip("Postfix's smtp-sink is not installed")
    table_path, _ = keys
    tmp = tmp_path_factory.mktemp("dkim-postfix-run")
    q = tmp / "q"
    expected = {}
    for key_type, domain in DOMAINS.items():
        for name in MESSAGES:
            rcpt = f"{key_type}-{name}@dest.test"
            enqueue(str(q), f"sender@{domain}", [rcpt], _message(key_type, name))
            expected[rcpt] = f"{key_type}-{name}"
    sink = SmtpSink("127.0.0.1").start()
    try:
        d = Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--tls=none",
                   "--resolver=127.0.0.1:53", f"--dkim-keys={table_path}", "--dkim-required",
                   "--no-http", log=tmp / "daemon.log").start()
        try:
            sink.wait_for_messages(len(expected), timeout=60)
            wait_for(lambda: d.log().count("status=sent") >= len(expected), 20,
                     what="the sent lines", detail=d.log)
        finally:
            d.stop()
    finally:
        out = {}
        try:
            for record in sink.messages():
                [rcpt] = record["rcpt_tos"]
                out[expected[rcpt]] = record["received"].replace(b"\n", b"\r\n") + \
                    record["data"]
        finally:
            sink.stop()
    assert sorted(out) == sorted(expected.values())
    return out


@pytest.mark.parametrize("key_type", sorted(DOMAINS))
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_dkimpy_verifies_the_copy_postfix_stored(keys: tuple[Path, dict],
                                                 received: dict[str, bytes],
                                                 dns_server: DnsServerProcess,
                                                 key_type: str, name: str) -> None:
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = dns_server.port

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        answer = res.resolve(qname.decode(), "TXT")
        return b"".join(answer.rrset[0].strings)

    data = received[f"{key_type}-{name}"]
    assert data.startswith(b"Received: ")
    head = data.split(b"\r\n\r\n", 1)[0]
    algorithm = {"rsa": b"a=rsa-sha256;", "ed25519": b"a=ed25519-sha256;"}[key_type]
    assert head.count(b"DKIM-Signature:") == 1 and algorithm in head
    # the body arrived as it was queued (line ends aside), 8-bit bytes and long lines too
    sent = _message(key_type, name).replace(b"\n", b"\r\n")
    assert data.endswith(sent.split(b"\r\n\r\n", 1)[1])
    assert dkim.verify(data, dnsfunc=dnsfunc)
    tampered = data.replace(b"\r\n\r\n", b"\r\n\r\nX", 1)
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


@pytest.fixture(scope="module")
def dns_server(keys: tuple[Path, dict]) -> DnsServerProcess:
    server = DnsServerProcess(keys[1])
    server.start()
    yield server
    server.stop()


def test_opendkim_testmsg_verifies_the_copy_postfix_stored(keys: tuple[Path, dict],
                                                           received: dict[str, bytes],
                                                           tmp_path: Path) -> None:
    testmsg = _opendkim_testmsg_or_skip()
    if subprocess.run(["unshare", "-rnm", "true"], capture_output=True).returncode != 0:
        pytest.fail("unshare -rnm is not permitted here: opendkim-testmsg needs a private "
                    "namespace to ask the loopback zone on port 53")
    (tmp_path / "zone.json").write_text(json.dumps(keys[1]))
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    for name, data in received.items():
        (tmp_path / f"{name}.eml").write_bytes(data.replace(b"\r\n", b"\n"))
        bad = data.replace(b"\r\n\r\n", b"\r\n\r\nX", 1).replace(b"\r\n", b"\n")
        (tmp_path / f"{name}-tampered.eml").write_bytes(bad)
    env = dict(os.environ, WORK=str(tmp_path), PYTHON=sys.executable, TESTMSG=testmsg,
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    subprocess.run(["unshare", "-rnm", "sh", "-c", NAMESPACE_SCRIPT], env=env, check=True,
                   timeout=120)
    for name in received:
        rc = (tmp_path / f"{name}.eml.rc").read_text().strip()
        assert rc == "0", f"{name}: {(tmp_path / f'{name}.eml.out').read_text()}"
        bad_rc = (tmp_path / f"{name}-tampered.eml.rc").read_text().strip()
        assert bad_rc != "0", f"{name}-tampered passed"
