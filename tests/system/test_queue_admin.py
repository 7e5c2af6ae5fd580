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
                out, err = d.proc.communicate(timeout=10)
                raise AssertionError(f"daemon exited with {d.proc.returncode}\nstdout: {out!r}"
                                     f"\nstderr: {err!r}\nlog:\n{d.log()}")
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


# --------------------------------------------------------------------------- live


def test_live_hold_flush_and_release_through_the_api(tmp_path, sink, daemons):
    q = tmp_path / "q"
    held = enqueue(str(q), SENDER, ["held@example.org"], message("held"))
    other = enqueue(str(q), SENDER, ["other@example.org"], message("other"))
    sink.rcpt_reply = lambda a: "451 4.3.0 Try later"
    # an hour between retries: only the operator's actions make mail due sooner
    d = daemons(q, f"--relay=127.0.0.1:{sink.port}", "--retry-base=3600", "--retry-max=7200")
    for qid, rcpt in ((held, "held@example.org"), (other, "other@example.org")):
        wait_for(lambda qid=qid, rcpt=rcpt: states(q, qid) == {rcpt: ("deferred", 1)}, 30,
                 what=f"{rcpt} deferred", detail=d.log)
    assert (q / "control.json").exists()

    assert ok(mailout(q, "hold", held, "--reason", "wait for the customer")) == (
        "1 message held\n")
    listed = [json.loads(line) for line in ok(mailout(q, "list", "--json")).splitlines()]
    assert {r["queue_id"]: r["queue_name"] for r in listed} == {held: "hold",
                                                               other: "deferred"}
    sink.rcpt_reply = None
    assert ok(mailout(q, "flush", "ALL")) == f"1 message flushed\n{held}: not flushed: held\n"
    # the flushed one is attempted at once (not in an hour)...
    [got] = sink.wait_for_messages(1, timeout=30)
    assert got["rcpt_tos"] == ["other@example.org"]
    wait_for(lambda: row_of(q, other) is None, 10, what="the flushed message done",
             detail=d.log)
    # ...the held one is not
    assert states(q, held) == {"held@example.org": ("deferred", 1)}
    assert row_of(q, held)["queue_name"] == "hold"

    assert ok(mailout(q, "release", held)) == "1 message released\n"
    sink.wait_for_messages(2, timeout=30)
    assert subjects(sink) == ["other", "held"]
    wait_for(lambda: queue_list(q) == [], 10, what="an empty queue", detail=d.log)
    log = d.log()
    assert f"{held}: hold by the operator (api): wait for the customer" in log
    assert f"{held}: release by the operator (api)" in log


def test_live_delete_and_bounce_through_the_api(tmp_path, sink, daemons):
    q = tmp_path / "q"
    gone = enqueue(str(q), SENDER, ["gone@example.org"], message("gone"))
    returned = enqueue(str(q), SENDER, ["ret@example.org"], message("returned"))
    sink.rcpt_reply = lambda a: None if a == SENDER else "451 4.3.0 Try later"
    d = daemons(q, f"--relay=127.0.0.1:{sink.port}", "--retry-base=3600", "--retry-max=7200")
    for qid in (gone, returned):
        wait_for(lambda qid=qid: [s for s, _ in states(q, qid).values()] == ["deferred"], 30,
                 what="deferred", detail=d.log)

    assert ok(mailout(q, "delete", gone, "--reason", "spam")) == "1 message deleted\n"
    assert row_of(q, gone) is None and files_named(q, gone) == []
    out = ok(mailout(q, "bounce", "--recipient", "ret@example.org", "--reason",
                     "the recipient left"))
    assert out.startswith("1 message bounced\n1 failure report queued to the senders: ")
    [dsn] = sink.wait_for_messages(1, timeout=30)  # the report, delivered at once
    assert dsn["mail_from"] == "" and dsn["rcpt_tos"] == [SENDER]
    assert b"the recipient left" in dsn["data"] and b"ret@example.org" in dsn["data"]
    wait_for(lambda: queue_list(q) == [], 10, what="an empty queue", detail=d.log)
    assert [m["rcpt_tos"] for m in sink.messages] == [[SENDER]]
    log = d.log()
    assert f"{gone}: delete by the operator (api): spam" in log
    assert f"{returned}: bounce by the operator (api): the recipient left" in log


def test_live_suspension_survives_a_restart_and_is_cancelled_through_the_api(
        tmp_path, sink, daemons):
    q = tmp_path / "q"
    relay = f"--relay=127.0.0.1:{sink.port}"
    d = daemons(q, relay)
    out = ok(mailout(q, "suspend", "--domain", "example.org", "--duration", "2h"))
    sid = out.rstrip().rsplit(" ", 1)[1].rstrip(")")
    first = enqueue(str(q), SENDER, ["a@example.org", "b@example.net"], message("first"))
    wait_for(lambda: states(q, first) == {"a@example.org": ("pending", 0),
                                          "b@example.net": ("delivered", 1)}, 30,
             what="b delivered, a left pending", detail=d.log)
    status = mailout(q, "suspend", "--domain", "example.org", "--duration", "60")
    assert status.returncode == 69 and "already suspended" in status.stderr
    stop(d)

    d = daemons(q, relay)
    second = enqueue(str(q), SENDER, ["c@example.org", "d@example.net"], message("second"))
    wait_for(lambda: states(q, second) == {"c@example.org": ("pending", 0),
                                           "d@example.net": ("delivered", 1)}, 30,
             what="d delivered, c left pending", detail=d.log)
    [s] = [json.loads(line) for line in ok(mailout(q, "suspensions", "--json")).splitlines()]
    assert s["id"] == sid and s["domain"] == "example.org"

    assert ok(mailout(q, "cancel-suspension", sid, "--reason", "back up")) == (
        f"suspension {sid} of example.org cancelled\n")
    wait_for(lambda: queue_list(q) == [], 30, what="an empty queue", detail=d.log)
    assert sorted(r for m in sink.messages for r in m["rcpt_tos"]) == [
        "a@example.org", "b@example.net", "c@example.org", "d@example.net"]


def test_live_reading_commands_and_errors_through_the_api(tmp_path, sink, daemons):
    q = tmp_path / "q"
    qid = enqueue(str(q), SENDER, ["x@example.org"], message("shown"))
    sink.rcpt_reply = lambda a: "451 4.3.0 Try later"
    d = daemons(q, f"--relay=127.0.0.1:{sink.port}", "--retry-base=3600",
                "--retry-max=7200")
    wait_for(lambda: states(q, qid) == {"x@example.org": ("deferred", 1)}, 30,
             what="deferred", detail=d.log)

    table = ok(mailout(q, "list"))
    assert "x@example.org  deferred  attempts=1  next=" in table
    assert "(451 4.3.0 Try later)" in table and table.endswith(" in 1 request.\n")
    detail = json.loads(ok(mailout(q, "show", "--json", qid)))
    assert detail["queue_id"] == qid and ["Subject", "shown"] in detail["headers"]
    assert detail["recipients"][0]["reply"]["code"] == 451
    assert "body of shown" in ok(mailout(q, "show", "--body", qid))
    summary = ok(mailout(q, "summary")).splitlines()
    assert summary[1].split()[:3] == ["TOTAL", "1", "1"]
    assert summary[2].split()[:2] == ["example.org", "1"]

    r = mailout(q, "show", "ABCDEF0123")
    assert r.returncode == 66 and r.stderr.startswith("mailout queue: ")
    r = mailout(q, "hold", "--state", "bogus")
    assert r.returncode == 64 and "bogus" in r.stderr
    r = mailout(q, "cancel-suspension", "nope")
    assert r.returncode == 66
    assert "Traceback" not in d.log()


def test_a_daemon_without_its_api_is_not_worked_around(tmp_path, sink, daemons):
    q = tmp_path / "q"
    qid = enqueue(str(q), SENDER, ["x@example.org"], message("x"))
    sink.rcpt_reply = lambda a: "451 4.3.0 Try later"
    d = daemons(q, f"--relay=127.0.0.1:{sink.port}", "--retry-base=3600",
                "--retry-max=7200", "--no-http")
    wait_for(lambda: states(q, qid) == {"x@example.org": ("deferred", 1)}, 30,
             what="deferred", detail=d.log)
    for args in (["list"], ["hold", "ALL"]):
        r = mailout(q, *args)
        assert r.returncode == 75 and r.stdout == "", r
        assert r.stderr.startswith(f"mailout queue: a mailout daemon runs on {q}"), r.stderr
    assert row_of(q, qid)["queue_name"] == "deferred"  # not held behind its back
