"""`mailout queue` end to end: the command (a real process) on a queue folder
and the real daemon (twistd) delivering to an aiosmtpd sink on loopback.

Offline: the command works on the folder while no daemon runs (under the
folder's lock), and a daemon started afterwards acts on what it did: held
mail is not delivered until released, deleted mail never arrives, an admin
bounce reaches the sender, flush makes deferred mail due at once, and a
suspension holds its destination across restarts until cancelled.

Every wait is for a positive signal (a message at the sink, a recipient's
saved state); nothing sleeps to prove that something did not happen.
"""

from __future__ import annotations

import email
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, env, queue_list
from tests.support.wait import wait_for
from twisted_mailout.queue.store import enqueue

CLI = [sys.executable, "-m", "twisted_mailout.daemon.cli"]
SENDER = "author@origin.test"


def mailout(q: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """`mailout queue --queue Q ARGS` as a process (text output)."""
    r = subprocess.run([*CLI, "queue", "--queue", str(q), *args], input=stdin, env=env(),
                       capture_output=True, timeout=60)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


def message(subject: str) -> bytes:
    return (f"From: {SENDER}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@origin.test>"
            f"\r\n\r\nbody of {subject}\r\n").encode()


def subjects(sink) -> list[str]:
    return [email.message_from_bytes(m["data"])["Subject"] for m in sink.messages]


def row_of(q: Path, qid: str) -> dict | None:
    rows = [r for r in queue_list(q) if r["queue_id"] == qid]
    return rows[0] if rows else None


def states(q: Path, qid: str) -> dict[str, tuple[str, int]]:
    """{recipient: (state, attempts)} of one queued message ({} when gone)."""
    row = row_of(q, qid)
    return {} if row is None else {r["address"]: (r["state"], r["attempts"])
                                   for r in row["recipients"]}


def files_named(q: Path, qid: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(q) for f in fs if f == qid]


@pytest.fixture
def daemons(tmp_path):
    """Factory: C{start(queue, *args) -> Daemon}, started and its queue
    recovered; each gets its own log file; all stopped at teardown."""
    started: list[Daemon] = []

    def start(queue: Path, *args: str) -> Daemon:
        d = Daemon(queue, *args, log=tmp_path / f"daemon{len(started)}.log")
        started.append(d)
        d.start()

        def up():
            if d.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {d.proc.returncode}\n{d.log()}")
            return "messages recovered" in d.log()

        wait_for(up, 30, what="the daemon to start", detail=d.log)
        return d

    yield start
    for d in started:
        d.stop()


def stop(d: Daemon) -> None:
    code = d.stop()
    assert code in (0, -15), (code, d.log())
    assert "Traceback" not in d.log(), d.log()


# --------------------------------------------------------------------------- offline


def test_held_mail_waits_until_released(tmp_path, sink, daemons):
    q = tmp_path / "q"
    held = enqueue(str(q), SENDER, ["held@example.org"], message("held"))
    other = enqueue(str(q), SENDER, ["other@example.org"], message("other"))
    assert ok(mailout(q, "hold", held, "--reason", "looks odd")) == "1 message held\n"
    [row] = [json.loads(line) for line in ok(mailout(q, "list", "--json", "--state", "hold"))
             .splitlines()]
    assert row["queue_id"] == held and row["queue_name"] == "hold"

    d = daemons(q, f"--relay=127.0.0.1:{sink.port}")
    # the other message, picked up and scheduled with it, is delivered...
    wait_for(lambda: row_of(q, other) is None, 30, what="the other message delivered",
             detail=d.log)
    assert subjects(sink) == ["other"]
    # ...while the held one stays, untried, on hold
    assert states(q, held) == {"held@example.org": ("pending", 0)}
    assert row_of(q, held)["queue_name"] == "hold"
    assert "to=<held@example.org>" not in d.log()
    stop(d)

    assert ok(mailout(q, "release", held)) == "1 message released\n"
    d = daemons(q, f"--relay=127.0.0.1:{sink.port}")
    wait_for(lambda: len(sink.messages) == 2, 30, what="the released message", detail=d.log)
    assert subjects(sink) == ["other", "held"]
    wait_for(lambda: queue_list(q) == [], 10, what="an empty queue", detail=d.log)


def test_deleted_mail_never_arrives(tmp_path, sink, daemons):
    q = tmp_path / "q"
    gone = enqueue(str(q), SENDER, ["gone@example.org"], message("gone"))
    kept = enqueue(str(q), SENDER, ["kept@example.org"], message("kept"))
    out = ok(mailout(q, "delete", "--recipient", "gone@example.org", "--reason", "spam"))
    assert out == "1 message deleted\n"
    assert files_named(q, gone) == [] and row_of(q, gone) is None

    d = daemons(q, f"--relay=127.0.0.1:{sink.port}")
    wait_for(lambda: queue_list(q) == [], 30, what="an empty queue", detail=d.log)
    assert row_of(q, kept) is None
    assert subjects(sink) == ["kept"]
    assert "gone@example.org" not in d.log()
    assert all(m["mail_from"] == SENDER for m in sink.messages)  # and no bounce for it


def test_an_admin_bounce_reaches_the_sender(tmp_path, sink, daemons):
    q = tmp_path / "q"
    qid = enqueue(str(q), SENDER, ["x@example.org", "y@example.net"], message("returned"))
    out = ok(mailout(q, "bounce", qid, "--reason", "the recipients left the company"))
    first, second = out.splitlines()
    assert first == "1 message bounced"
    assert second.startswith("1 failure report queued to the senders: ")
    dsn_id = second.rsplit(" ", 1)[1]
    assert row_of(q, qid) is None

    d = daemons(q, f"--relay=127.0.0.1:{sink.port}")
    [got] = sink.wait_for_messages(1, timeout=30)
    assert got["mail_from"] == "" and got["rcpt_tos"] == [SENDER]
    report = email.message_from_bytes(got["data"])
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(p for p in report.walk()
                  if p.get_content_type() == "message/delivery-status")
    text = got["data"].decode(errors="replace")
    assert "the recipients left the company" in text
    for rcpt in ("x@example.org", "y@example.net"):
        assert f"rfc822;{rcpt}" in text.replace(" ", "").lower()
    assert "Action: failed" in str(status)
    wait_for(lambda: queue_list(q) == [], 10, what="an empty queue", detail=d.log)
    assert f"{dsn_id}: to=<{SENDER}>" in d.log()
    assert all(m["rcpt_tos"] == [SENDER] for m in sink.messages)  # never the recipients


def test_flush_makes_deferred_mail_due_at_once(tmp_path, sink, daemons):
    q = tmp_path / "q"
    qid = enqueue(str(q), SENDER, ["later@example.org"], message("later"))
    sink.rcpt_reply = lambda a: "451 4.3.0 Try later"
    # an hour between retries: without flush, nothing happens for an hour
    args = (f"--relay=127.0.0.1:{sink.port}", "--retry-base=3600", "--retry-max=7200")
    d = daemons(q, *args)
    wait_for(lambda: states(q, qid) == {"later@example.org": ("deferred", 1)}, 30,
             what="the recipient deferred", detail=d.log)
    stop(d)
    [r] = row_of(q, qid)["recipients"]
    assert r["next_attempt"] > time.time() + 1800 and r["last_reply"] == "451 4.3.0 Try later"

    assert ok(mailout(q, "flush")) == "1 message flushed\n"
    [r] = row_of(q, qid)["recipients"]
    assert r["state"] == "deferred" and r["next_attempt"] <= time.time()

    sink.rcpt_reply = None
    d = daemons(q, *args)
    [got] = sink.wait_for_messages(1, timeout=30)
    assert got["rcpt_tos"] == ["later@example.org"]
    wait_for(lambda: queue_list(q) == [], 10, what="an empty queue", detail=d.log)


def test_a_suspension_holds_its_destination_across_restarts_until_cancelled(
        tmp_path, sink, daemons):
    q = tmp_path / "q"
    first = enqueue(str(q), SENDER, ["a@example.org", "b@example.net"], message("first"))
    out = ok(mailout(q, "suspend", "--domain", "example.org", "--duration", "1h", "--reason",
                     "their MX is down"))
    assert out.startswith("suspended example.org until ")
    sid = out.rstrip().rsplit(" ", 1)[1].rstrip(")")
    relay = f"--relay=127.0.0.1:{sink.port}"

    d = daemons(q, relay)
    # the message is attempted: its other recipient delivered, the suspended one not
    wait_for(lambda: states(q, first) == {"a@example.org": ("pending", 0),
                                          "b@example.net": ("delivered", 1)}, 30,
             what="b delivered, a left pending", detail=d.log)
    stop(d)

    second = enqueue(str(q), SENDER, ["c@example.org", "d@example.net"], message("second"))
    d = daemons(q, relay)  # restarted: the suspension is still in force
    wait_for(lambda: states(q, second) == {"c@example.org": ("pending", 0),
                                           "d@example.net": ("delivered", 1)}, 30,
             what="d delivered, c left pending", detail=d.log)
    assert states(q, first)["a@example.org"] == ("pending", 0)
    assert sorted(r for m in sink.messages for r in m["rcpt_tos"]) == [
        "b@example.net", "d@example.net"]
    stop(d)

    listed = [json.loads(line) for line in ok(mailout(q, "suspensions", "--json"))
              .splitlines()]
    assert [(s["id"], s["domain"], s["reason"]) for s in listed] == [
        (sid, "example.org", "their MX is down")]
    assert ok(mailout(q, "cancel-suspension", sid)) == (
        f"suspension {sid} of example.org cancelled\n")

    d = daemons(q, relay)
    wait_for(lambda: queue_list(q) == [], 30, what="an empty queue", detail=d.log)
    assert sorted(r for m in sink.messages for r in m["rcpt_tos"]) == [
        "a@example.org", "b@example.net", "c@example.org", "d@example.net"]
