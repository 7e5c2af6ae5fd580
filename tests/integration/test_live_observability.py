"""The running daemon's own /metrics, /api/v1/status and status page, after
it has delivered real mail to an aiosmtpd sink: promtool accepts the
exposition, the counters and gauges say what happened, the status data
agrees, and the page drawn in Chromium matches the daemon's API."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import test_status_page_chromium as chromium
from tests.integration.test_metrics_promtool import promtool_check
from tests.support.daemon import Daemon
from tests.support.peers import AiosmtpdSink
from tests.support.wait import wait_for
from twisted_mailout import enqueue
from twisted_mailout.daemon.control import ControlClient

MSG = (b"From: a@origin.test\r\nTo: u@dest.test\r\nSubject: s\r\n"
       b"Message-ID: <%d@origin.test>\r\n\r\nbody\r\n")


@pytest.fixture
def base():
    d = Path(tempfile.mkdtemp(prefix="mo", dir="/tmp"))  # a short Unix socket path
    yield d
    shutil.rmtree(d, ignore_errors=True)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback
        return r.read()


def test_metrics_status_and_page_of_a_live_daemon(base, monkeypatch):
    sink = AiosmtpdSink("127.0.0.1").start()
    q = base / "q"
    d = Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--tls=none", "--resolver=127.0.0.1:53",
               "--http=tcp:0:interface=127.0.0.1", log=base / "daemon.log").start()
    try:
        info = wait_for(lambda: (q / "control.json").exists()
                        and json.loads((q / "control.json").read_text()), 20,
                        what="control.json", detail=d.log)
        tcp = next(e for e in info["endpoints"] if e.startswith("tcp:"))
        port = int(tcp.rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{port}"
        api = ControlClient(tcp, None, timeout=10)
        wait_for(lambda: api.get("/readyz").get("status") == "ready", 20, what="ready",
                 detail=d.log)
        for i in range(5):
            enqueue(str(q), "a@origin.test", ["u@dest.test"], MSG % i)
        wait_for(lambda: len(sink.messages) == 5, 30, what="5 messages at the sink",
                 detail=d.log)
        # one more, suspended and held: the gauges must show it
        api.post("suspensions", {"domain": "slow.test", "duration": 600, "reason": "test"})
        held = enqueue(str(q), "a@origin.test", ["u@slow.test"], MSG % 99)
        wait_for(lambda: [r["queue_id"] for r in api.iter_ndjson("messages")] == [held], 20,
                 what="the held message picked up", detail=d.log)
        api.post("actions/hold", {"selector": {"ids": [held]}, "reason": "test"})

        def scraped():
            text = get(url + "/metrics").decode()
            m = samples(text)
            ok = (m.get(("mailout_recipients_total", (("status", "delivered"),))) == 5
                  and m.get(("mailout_queue_messages", (("queue_name", "hold"),))) == 1)
            return ok and (text, m)

        text, m = wait_for(scraped, 20, what="the metrics of 5 deliveries and 1 hold",
                           detail=d.log)
        checked = promtool_check(text.encode())
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert m[("mailout_messages_enqueued_total", ())] == 6
        assert m[("mailout_suspended_destinations", ())] == 1
        assert m[("mailout_delivery_delay_seconds_count", (("status", "delivered"),))] == 5
        assert m[("mailout_queue_messages", (("queue_name", "deferred"),))] == 0

        status = api.get("status")
        assert sum(status["outcomes"]["delivered"]) == 5
        assert status["since_start"]["delivered"] == 5
        assert status["queue"]["hold"] == 1 and status["queue"]["total"] == 1
        assert [s["domain"] for s in status["suspensions"]] == ["slow.test"]
        assert get(url + "/healthz") and get(url + "/")

        # The page in Chromium, against this daemon's own API.
        monkeypatch.setattr(chromium, "SCREENSHOT",
                            chromium.ARTIFACTS / "status-page-live.png")
        chromium.test_status_page_in_chromium((url + "/", None, False))
    finally:
        d.stop()
        sink.stop()


def test_json_log_of_a_live_daemon_and_its_report(base):
    import subprocess
    import sys

    from tests.support.daemon import env

    sink = AiosmtpdSink("127.0.0.1").start()
    q = base / "q"
    jlog = base / "records.json"
    d = Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--tls=none", "--resolver=127.0.0.1:53",
               f"--json-log={jlog}", log=base / "daemon.log").start()
    try:
        wait_for(lambda: (q / "control.json").exists(), 20, what="control.json", detail=d.log)
        api = ControlClient(f"unix:{q / 'control.sock'}", None, timeout=10)
        wait_for(lambda: api.get("/readyz").get("status") == "ready", 20, what="ready",
                 detail=d.log)
        ids = [enqueue(str(q), "a@origin.test", ["u@dest.test"], MSG % i) for i in range(2)]
        wait_for(lambda: len(sink.messages) == 2, 30, what="2 messages", detail=d.log)
        api.post("suspensions", {"domain": "slow.test", "duration": 600, "reason": "x"})
        held = enqueue(str(q), "a@origin.test", ["u@slow.test"], MSG % 7)
        wait_for(lambda: [r["queue_id"] for r in api.iter_ndjson("messages")] == [held], 20,
                 what="picked up", detail=d.log)
        api.post("actions/delete", {"selector": {"ids": [held]}, "reason": "not wanted"})

        def records():
            lines = [json.loads(x) for x in jlog.read_text().splitlines()] \
                if jlog.exists() else []
            return len(lines) >= 4 and lines

        recs = wait_for(records, 20, what="4 JSON records", detail=d.log)
    finally:
        d.stop()
        sink.stop()
    assert jlog.stat().st_mode & 0o777 == 0o600
    deliveries = [r for r in recs if r["type"] == "Delivery"]
    assert sorted(r["queue_id"] for r in deliveries) == sorted(ids)
    assert all(r["reply"]["code"] == 250 and r["recipient"] == "u@dest.test"
               and r["sender"] == "a@origin.test" for r in deliveries)
    deleted = [r for r in recs if r.get("action") == "delete"]
    assert [(r["queue_id"], r["reason"], r["source"]) for r in deleted] == [
        (held, "not wanted", "api")]
    out = subprocess.run([sys.executable, "-m", "twisted_mailout.daemon.cli", "report",
                          "--json", str(jlog)], env=env(), capture_output=True, text=True,
                         timeout=60, check=True).stdout
    summary = json.loads(out)
    assert summary["totals"]["delivered"] == {"messages": 2, "recipients": 2}
    assert [x["delivered"] for x in summary["destinations"]] == [2]
    assert {"action": "delete", "events": 1, "messages": 1} in summary["admin_actions"]
