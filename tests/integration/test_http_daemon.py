"""The HTTP API of the real daemon (`twistd -n mailout`), over its default Unix
socket and a TCP loopback endpoint with a bearer token: control.json, the
token's refusals, a hold that keeps mail from an aiosmtpd sink until it is
released, the admin log lines, and the refusals at start."""

from __future__ import annotations

import email
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, Daemon, env
from tests.support.peers import AiosmtpdSink
from tests.support.wait import wait_for
from twisted_mailout import enqueue
from twisted_mailout.daemon.control import ControlClient, ControlError, find_daemon


@pytest.fixture
def base():
    """A short folder (a Unix socket path must fit in 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="mo", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def token_file(base):
    p = base / "token"
    p.write_text("t0ken-for-the-test\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def sink():
    s = AiosmtpdSink("127.0.0.1").start()
    yield s
    s.stop()


def message(tag: str) -> bytes:
    return (f"Message-ID: <{tag}.{time.monotonic_ns()}@test>\r\nFrom: a@origin.test\r\n"
            f"To: u@held.test\r\nSubject: {tag}\r\n\r\nbody of {tag}\r\n").encode()


def subjects(sink) -> list[str]:
    return [email.message_from_bytes(m["data"])["Subject"] for m in sink.messages]


def control(q: Path) -> dict:
    return json.loads((q / "control.json").read_text())


def started(d: Daemon, q: Path) -> dict:
    """Wait for control.json and a ready daemon; return control.json."""
    info = wait_for(lambda: (q / "control.json").exists() and control(q), 20,
                    what="control.json", detail=d.log)
    client = ControlClient(f"unix:{q / 'control.sock'}", timeout=10)
    wait_for(lambda: client.get("/readyz").get("status") == "ready", 20, what="ready",
             detail=d.log)
    return info


def test_control_json_the_token_and_a_hold_on_the_live_daemon(base, token_file, sink):
    q = base / "q"
    d = Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--tls=none",
               "--resolver=127.0.0.1:53", "--http=tcp:0:interface=127.0.0.1",
               f"--http-token-file={token_file}", log=base / "daemon.log").start()
    try:
        info = started(d, q)
        # control.json: the process, the bound addresses, the token file; 0600
        assert info["pid"] == d.proc.pid
        unix_ep, tcp_ep = info["endpoints"]
        assert unix_ep == f"unix:{q / 'control.sock'}"
        assert tcp_ep.startswith("tcp:127.0.0.1:") and not tcp_ep.endswith(":0")
        assert info["token_file"] == str(token_file)
        assert stat.S_IMODE((q / "control.json").stat().st_mode) == 0o600
        assert stat.S_IMODE((q / "control.sock").stat().st_mode) == 0o600

        local = find_daemon(str(q))
        assert local is not None and local.endpoint == unix_ep and local.token is None

        # TCP: nothing under /api/ without the right token; health needs none
        for token, status in ((None, 401), ("wrong", 403)):
            with pytest.raises(ControlError) as e:
                ControlClient(tcp_ep, token, timeout=10).get("summary")
            assert e.value.status == status
        with pytest.raises(ControlError) as e:
            ControlClient(tcp_ep, None, timeout=10).post(
                "actions/delete", {"selector": {"all": True}})
        assert e.value.status == 401
        remote = ControlClient(tcp_ep, "t0ken-for-the-test", timeout=10)
        assert remote.get("summary")["messages"] == 0
        assert ControlClient(tcp_ep, None, timeout=10).get("/healthz") == {"status": "alive"}

        # Suspend held.test so the first message waits, hold it, lift the suspension.
        s = remote.post("suspensions", {"domain": "held.test", "duration": 600,
                                        "reason": "until it is held"})
        first = enqueue(str(q), "a@origin.test", ["u@held.test"], message("first"))
        wait_for(lambda: [r["queue_id"] for r in local.iter_ndjson("messages")] == [first],
                 20, what="the first message picked up", detail=d.log)
        res = remote.post("actions/hold", {"selector": {"ids": [first]},
                                           "reason": "looks odd"})
        assert res["queue_ids"] == [first]
        remote.delete(f"suspensions/{s['id']}", {"reason": "held now"})

        # The next message to the same domain goes through; the held one stays.
        enqueue(str(q), "a@origin.test", ["u@held.test"], message("second"))
        wait_for(lambda: "second" in subjects(sink), 20, what="the second message",
                 detail=d.log)
        assert subjects(sink) == ["second"]
        [row] = local.get("messages", {"ids": [first]})["messages"]
        assert row["queue_name"] == "hold"

        res = local.post("actions/release", {"selector": {"ids": [first]}})
        assert res["queue_ids"] == [first]
        wait_for(lambda: "first" in subjects(sink), 20, what="the released message",
                 detail=d.log)
        wait_for(lambda: local.get("messages")["count"] == 0, 20, what="an empty queue")

        log = d.log()
        assert f"{first}: hold by the operator (api): looks odd" in log
        assert f"{first}: release by the operator (api)" in log
        assert "suspended held.test until" in log
        assert "suspension of held.test cancelled by the operator (api): held now" in log
        assert "HTTP POST /api/v1/actions/hold 200 (127.0.0.1)" in log
        assert "HTTP GET /api/v1/summary 401 (127.0.0.1)" in log
        assert "Traceback" not in log
    finally:
        code = d.stop()
    # twistd ends a SIGTERM stop by re-raising the signal (see test_daemon_cli)
    assert code in (0, -signal.SIGTERM), d.log()
    assert "mailout stopped" in d.log()
    assert not (q / "control.json").exists()
    assert find_daemon(str(q)) is None


def test_no_http_and_no_endpoint_serves_nothing(base, sink):
    q = base / "q"
    d = Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--tls=none",
               "--resolver=127.0.0.1:53", "--no-http", log=base / "daemon.log").start()
    try:
        enqueue(str(q), "a@origin.test", ["u@held.test"], message("plain"))
        wait_for(lambda: "plain" in subjects(sink), 20, what="delivery", detail=d.log)
        assert not (q / "control.json").exists() and not (q / "control.sock").exists()
        assert "no HTTP API (--no-http and no --http)" in d.log()
    finally:
        d.stop()


def run_twistd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                           "-n", "--pidfile=", "mailout", *args], env=env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["world-readable", "empty", "missing", "beyond-loopback"])
def test_the_daemon_refuses_to_start(base, case):
    q = base / "q"
    tf = base / "token"
    tf.write_text("" if case == "empty" else "secret\n")
    tf.chmod(0o644 if case == "world-readable" else 0o600)
    args = [f"--queue={q}", "--relay=127.0.0.1:2525", "--resolver=127.0.0.1:53"]
    if case == "beyond-loopback":
        args.append("--http=tcp:0")
    else:
        args += ["--http=tcp:0:interface=127.0.0.1",
                 f"--http-token-file={base / 'nothing' if case == 'missing' else tf}"]
    out = run_twistd(*args)
    assert out.returncode != 0
    expected = {"world-readable": "readable by every user", "empty": "first line is empty",
                "missing": "No such file", "beyond-loopback": "--http-token-file"}[case]
    assert expected in out.stderr + out.stdout
    assert not (q / "control.json").exists()
    assert os.path.exists(tf)
