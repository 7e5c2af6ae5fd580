"""DKIM signatures verified through a loopback DNS zone serving the keys:
dkimpy's verifier asking the zone over the network, OpenDKIM's
opendkim-testmsg (a verifier that is not the signer), and mailout dkim check.

opendkim-testmsg resolves through the C library (/etc/resolv.conf, port 53),
so it runs in a private user, network and mount namespace (unshare -rnm) in
which the loopback DNS server listens on 127.0.0.1:53 and /etc/resolv.conf
is bind-mounted to point at it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dkim
import dns.resolver
import pytest

from tests.support.peers import DnsServerProcess, zone
from twisted_mailout.dkim.keys import KeyTable, keygen
from twisted_mailout.dkim.signer import Signer, wire_form

OPENDKIM_TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"

# Every message has From and Date, the fields RFC 5322 3.6 requires: libopendkim
# refuses a message without them ("dkim_chunk(): Syntax error"); the queue
# adds Date to any message that lacks it, so these are what the daemon sends.
MESSAGES = {
    "plain": b"From: Alice <alice@example.test>\nTo: bob@example.org\nSubject: hi\n"
             b"Date: Mon, 02 Feb 2026 10:00:00 +0000\nMessage-ID: <1@example.test>\n\nHello.\n",
    "8bit": ("From: =?utf-8?q?J=C3=BCrgen?= <j@example.test>\nTo: b@example.org\n"
             "Date: Mon, 02 Feb 2026 10:00:00 +0000\n"
             "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\nMIME-Version: 1.0\n"
             "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
             "Grüße aus Köln, 東京 ✓   \n\n\n").encode(),
    "long": b"From: a@example.test\nTo: b@example.org\nSubject: long\n"
            b"Date: Mon, 02 Feb 2026 10:00:00 +0000\n\n" +
            (b"y" * 997 + b"\n") * 20,
    "multipart": b"From: a@example.test\nTo: b@example.org\nSubject: mp\nMIME-Version: 1.0\n"
                 b"Date: Mon, 02 Feb 2026 10:00:00 +0000\n"
                 b'Content-Type: multipart/mixed; boundary="B"\n'
                 b"List-Unsubscribe: <https://example.test/u/1>\n"
                 b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\n\n"
                 b"--B\nContent-Type: text/plain\n\none\n--B\nContent-Type: text/html\n\n"
                 b"<b>two</b>\n--B--\n",
}


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyTable, dict]:
    """An rsa and an ed25519 key of example.test, and the zone publishing them."""
    folder = tmp_path_factory.mktemp("dkim")
    keygen(folder / "keys.toml", "example.test", "r2026", "rsa")
    keygen(folder / "keys.toml", "example.test", "e2026", "ed25519")
    table = KeyTable.load(folder / "keys.toml")
    records = {}
    for k in table.keys:
        text = f"v=DKIM1; k={k.type}; p={k.public}"
        records[f"{k.selector}._domainkey.{k.domain}"] = {
            "TXT": [[text[i:i + 255] for i in range(0, len(text), 255)]]}
    return table, zone(records, authoritative_for=("test",))


@pytest.fixture(scope="module")
def dns_server(keyset: tuple[KeyTable, dict]) -> DnsServerProcess:
    server = DnsServerProcess(keyset[1])
    server.start()
    yield server
    server.stop()


def only(table: KeyTable, key_type: str) -> KeyTable:
    return KeyTable([k for k in table.keys if k.type == key_type], {}, table.path)


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_dkimpy_verifies_through_the_zone(keyset: tuple[KeyTable, dict],
                                          dns_server: DnsServerProcess, name: str) -> None:
    table, _ = keyset
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = dns_server.port
    asked: list[bytes] = []

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        asked.append(qname)
        answer = res.resolve(qname.decode(), "TXT")
        return b"".join(answer.rrset[0].strings)

    msg = MESSAGES[name]
    signed = Signer(table).sign(msg) + wire_form(msg)
    d = dkim.DKIM(signed)
    assert d.verify(idx=0, dnsfunc=dnsfunc) and d.verify(idx=1, dnsfunc=dnsfunc)
    assert sorted(asked) == [b"e2026._domainkey.example.test.", b"r2026._domainkey.example.test."]
    assert not dkim.verify(signed[:-3] + b"!\r\n", dnsfunc=dnsfunc)


def _opendkim_testmsg_or_skip() -> str:
    if os.path.exists(OPENDKIM_TESTMSG):
        return OPENDKIM_TESTMSG
    if os.environ.get("CI") == "true":
        pytest.fail(f"{OPENDKIM_TESTMSG} is missing: install Debian's opendkim-tools")
    pytest.skip("opendkim-testmsg is not installed (Debian opendkim-tools)")


NAMESPACE_SCRIPT = r"""
set -u
ip link set lo up
mount --bind "$WORK/resolv.conf" /etc/resolv.conf
"$PYTHON" -m twisted_mailout.testing.loopback dns --zone "$WORK/zone.json" \
    --interface 127.0.0.1 --port 53 --port-file "$WORK/port" --max-lifetime 120 \
    > "$WORK/dns.log" 2>&1 &
i=0
while [ ! -s "$WORK/port" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
for f in "$WORK"/*.eml; do
    "$TESTMSG" < "$f" > "$f.out" 2>&1
    echo $? > "$f.rc"
done
kill %1 2>/dev/null || true
"""


def test_opendkim_testmsg_verifies(keyset: tuple[KeyTable, dict], tmp_path: Path) -> None:
    testmsg = _opendkim_testmsg_or_skip()
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rnm", "true"], capture_output=True).returncode != 0:
        pytest.fail("unshare -rnm is not permitted here: opendkim-testmsg needs a private "
                    "namespace to ask the loopback zone on port 53")
    table, zone_doc = keyset
    (tmp_path / "zone.json").write_text(json.dumps(zone_doc))
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    expected: dict[str, int] = {}
    for key_type in ("rsa", "ed25519"):
        signer = Signer(only(table, key_type))
        for name, msg in MESSAGES.items():
            signed = signer.sign(msg) + wire_form(msg)
            (tmp_path / f"{key_type}-{name}.eml").write_bytes(signed.replace(b"\r\n", b"\n"))
            expected[f"{key_type}-{name}"] = 0
            bad = signed.replace(b"\r\n\r\n", b"\r\n\r\nX", 1).replace(b"\r\n", b"\n")
            (tmp_path / f"{key_type}-{name}-tampered.eml").write_bytes(bad)
    env = dict(os.environ, WORK=str(tmp_path), PYTHON=sys.executable, TESTMSG=testmsg,
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    subprocess.run(["unshare", "-rnm", "sh", "-c", NAMESPACE_SCRIPT], env=env, check=True,
                   timeout=120)
    for name in expected:
        rc = (tmp_path / f"{name}.eml.rc").read_text().strip()
        assert rc == "0", f"{name}: {(tmp_path / f'{name}.eml.out').read_text()}"
        bad_rc = (tmp_path / f"{name}-tampered.eml.rc").read_text().strip()
        assert bad_rc != "0", f"{name}-tampered passed"


def test_mailout_dkim_check_against_the_zone(keyset: tuple[KeyTable, dict],
                                             dns_server: DnsServerProcess) -> None:
    table, _ = keyset
    base = [sys.executable, "-m", "twisted_mailout.daemon.dkimcli", "check", "--keys",
            str(table.path), "--domain", "example.test", "--resolver",
            f"127.0.0.1:{dns_server.port}"]
    for selector in ("r2026", "e2026"):
        done = subprocess.run([*base, "--selector", selector], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr + done.stdout
        assert done.stdout.startswith("ok: ")
    # a key in the table that is not published: 1, with the record to publish
    keygen(table.path, "example.test", "new", "ed25519")
    done = subprocess.run([*base, "--selector", "new"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "new._domainkey.example.test IN TXT" in done.stdout
    # a resolver that does not answer: 69
    dead = [*base[:-1], "127.0.0.1:9", "--selector", "r2026", "--timeout", "1"]
    done = subprocess.run(dead, capture_output=True, text=True, timeout=60)
    assert done.returncode == 69, done.stderr
