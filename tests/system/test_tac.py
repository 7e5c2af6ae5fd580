"""The .tac files under tac/ run under twistd and work."""

import os
import subprocess
import sys

from tests.support.peers import AiosmtpdSink

from tests.support.daemon import ROOT, env, queue_list
from tests.support.wait import wait_for
from twisted_mailout import enqueue

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def test_sendmail_tac_sends_and_exits(tmp_path):
    sink = AiosmtpdSink("127.0.0.1").start()
    try:
        e = env()
        e.update(MAILOUT_RELAY=f"127.0.0.1:{sink.port}", MAILOUT_TO="bob@example.org",
                 MAILOUT_FROM="alice@example.com", MAILOUT_SUBJECT="from the tac",
                 MAILOUT_STATUS_FILE=str(tmp_path / "status"), MAILOUT_TIMEOUT="10")
        p = subprocess.run([*TWISTD, "-n", "--pidfile=", f"--logfile={tmp_path / 'log'}", "-y",
                            str(ROOT / "tac" / "sendmail.tac")], env=e, cwd=tmp_path,
                           timeout=60, capture_output=True)
        assert p.returncode == 0, p.stderr
        [m] = sink.messages
        assert m["mail_from"] == "alice@example.com" and m["rcpt_tos"] == ["bob@example.org"]
        assert b"Subject: from the tac" in m["data"]
        assert (tmp_path / "status").read_text() == "0\n"
        assert "status=delivered" in (tmp_path / "log").read_text()
    finally:
        sink.stop()


def test_mailout_tac_delivers_the_queue(tmp_path):
    sink = AiosmtpdSink("127.0.0.1").start()
    q = tmp_path / "q"
    enqueue(str(q), "alice@example.com", ["bob@example.org"], b"Subject: tac\r\n\r\nhi\r\n")
    e = env()
    e.update(MAILOUT_QUEUE=str(q), MAILOUT_RELAY=f"127.0.0.1:{sink.port}",
             MAILOUT_POLL_INTERVAL="0.2")
    p = subprocess.Popen([*TWISTD, "-n", "--pidfile=", f"--logfile={tmp_path / 'log'}", "-y",
                          str(ROOT / "tac" / "mailout.tac")], env=e, cwd=tmp_path)
    try:
        [m] = sink.wait_for_messages(1, timeout=30)
        assert m["rcpt_tos"] == ["bob@example.org"]
        wait_for(lambda: queue_list(q) == [], 20, what="an empty queue")
    finally:
        p.terminate()
        p.wait(30)
        sink.stop()
    assert not os.listdir(q / "messages")
