"""End-to-end tests of the ``mailout`` command and the ``twistd mailout`` daemon.

Everything here runs real processes (``python -m twisted_mailout.daemon.cli``, twistd)
against real loopback peers (the aiosmtpd sink of ``tests/peers.py``); every
wait is bounded and every process and sink is stopped at teardown.
"""

from __future__ import annotations

import copy
import datetime
import email.message
import email.utils
import fcntl
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from email.header import Header
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, Daemon, env, queue_list
from tests.support.wait import wait_for

CLI = [sys.executable, "-m", "twisted_mailout.daemon.cli"]

# twistd's entry point, for the venv test (whose venv has no bin/twistd).
TWISTD_CODE = ("import sys; from twisted.scripts.twistd import run; "
               "sys.argv[0] = 'twistd'; sys.exit(run())")

SENDER = "sender@example.com"


# --------------------------------------------------------------------------- helpers


def run_cli(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, env=env(), capture_output=True,
                          timeout=timeout)


def sendmail(queue, *args: str, stdin: bytes) -> subprocess.CompletedProcess:
    return run_cli("sendmail", "--queue", str(queue), *args, stdin=stdin)


def files_in(folder: Path) -> list[str]:
    """Names in C{folder} (an empty list when it does not exist)."""
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def queued_message(queue: Path, qid: str) -> bytes:
    """The message bytes of C{new/QID}, without its envelope line (see queue.py)."""
    data = (queue / "new" / qid).read_bytes()
    head, sep, body = data.partition(b"\n")
    assert head.startswith(b"X-Mailout-Envelope: ") and sep, data[:200]
    return body


def header_block(message: bytes) -> list[bytes]:
    """The raw header lines of C{message} (LF line ends), continuation lines kept."""
    head = message.split(b"\n\n", 1)[0]
    return head.split(b"\n")


def field_values(message: bytes, name: str) -> list[bytes]:
    prefix = name.lower().encode() + b":"
    return [line[len(prefix):].strip() for line in header_block(message)
            if line.lower().startswith(prefix)]


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def assert_clean_stop(d: Daemon, code: int | None) -> None:
    """The daemon stopped through its SIGTERM handler, not killed by the signal.

    twistd ends a SIGTERM shutdown by re-raising SIGTERM on itself
    (twisted.scripts.twistd.runApp, app._exitWithSignal), so its exit status is
    "terminated by SIGTERM" (-15 for subprocess) even after a clean stop; the
    log shows whether the services were stopped and the reactor finished.
    """
    log = d.log()
    assert code in (0, -signal.SIGTERM), (code, log)
    for line in ("Received SIGTERM, shutting down", "mailout stopped", "Main loop terminated",
                 "Server Shut Down"):
        assert line in log, (line, log)


def wait_started(d: Daemon, timeout: float = 30) -> None:
    """Wait until the daemon has recovered its queue (log line), failing fast if it died."""

    def started():
        if d.proc.poll() is not None:
            out, err = d.proc.communicate(timeout=10)
            raise AssertionError(
                f"daemon exited with {d.proc.returncode}\nstdout: {out!r}\nstderr: {err!r}\n"
                f"log:\n{d.log()}")
        return "messages recovered" in d.log()

    wait_for(started, timeout, what=f"daemon on {d.queue} to start", detail=d.log)


@pytest.fixture
def daemons():
    """Factory: C{start(queue, *args, log=None) -> Daemon} (started and
    up); every daemon is stopped at teardown."""
    started: list[Daemon] = []

    def start(queue, *args: str, log=None, wait: bool = True) -> Daemon:
        d = Daemon(queue, *args, log=log)
        started.append(d)
        d.start()
        if wait:
            wait_started(d)
        return d

    yield start
    for d in started:
        d.stop()


# --------------------------------------------------------------------------- 1. sendmail

MESSAGE = b"From: Sender <sender@example.com>\nSubject: hello\n\nHello,\nworld.\n"


def test_sendmail_queues_stdin_and_prints_queue_id(tmp_path):
    q = tmp_path / "q"
    r = sendmail(q, "-f", SENDER, "rcpt@example.org", "other@example.net", stdin=MESSAGE)
    assert r.returncode == 0, r.stderr
    qid = r.stdout.decode().strip()
    assert re.fullmatch(r"[0-9A-Za-z]+", qid), r.stdout
    assert files_in(q / "new") == [qid]
    assert files_in(q / "tmp") == []
    assert queued_message(q, qid).endswith(b"\n\nHello,\nworld.\n")
    [row] = queue_list(q)
    assert row["queue_id"] == qid
    assert row["sender"] == SENDER
    assert [(rc["address"], rc["state"]) for rc in row["recipients"]] == [
        ("rcpt@example.org", "pending"), ("other@example.net", "pending")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_sendmail_t_takes_recipients_from_headers_and_removes_bcc(tmp_path, eol):
    q = tmp_path / "q"
    msg = eol.join([b"From: sender@example.com",
                    b"To: Alice <alice@example.org>",
                    b"Cc: carol@example.org, Dave <dave@example.net>",
                    b"Bcc: hidden@example.net,",
                    b"  Second Hidden <hidden2@example.com>",
                    b"Subject: with bcc",
                    b"",
                    b"Bcc: this line is body text and must stay",
                    b""])
    r = sendmail(q, "-t", "-f", SENDER, stdin=msg)
    assert r.returncode == 0, r.stderr
    qid = r.stdout.decode().strip()
    raw = queued_message(q, qid)
    assert raw.endswith(eol.join([b"Subject: with bcc", b"", b"Bcc: this line is body text "
                                  b"and must stay", b""]))
    queued = raw.replace(b"\r\n", b"\n")
    assert not [line for line in header_block(queued) if line.lower().startswith(b"bcc")], raw
    assert b"hidden" not in queued.split(b"\n\n", 1)[0], raw  # continuation line gone too
    assert field_values(queued, "To") == [b"Alice <alice@example.org>"]
    assert field_values(queued, "Cc") == [b"carol@example.org, Dave <dave@example.net>"]
    [row] = queue_list(q)
    assert row["queue_id"] == qid
    assert [rc["address"] for rc in row["recipients"]] == [
        "alice@example.org", "carol@example.org", "dave@example.net",
        "hidden@example.net", "hidden2@example.com"]


@pytest.mark.parametrize("has_id,has_date", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_sendmail_adds_message_id_and_date_only_when_missing(tmp_path, has_id, has_date):
    q = tmp_path / "q"
    given_id = b"<given.1234@example.com>"
    given_date = b"Tue, 01 Jul 2003 10:52:37 +0200"
    msg = b"Subject: ids\n"
    if has_id:
        msg += b"Message-ID: " + given_id + b"\n"
    if has_date:
        msg += b"Date: " + given_date + b"\n"
    msg += b"\nbody\n"
    r = sendmail(q, "-f", SENDER, "rcpt@example.org", stdin=msg)
    assert r.returncode == 0, r.stderr
    queued = queued_message(q, r.stdout.decode().strip())
    ids = field_values(queued, "Message-ID")
    dates = field_values(queued, "Date")
    assert len(ids) == 1 and len(dates) == 1, queued
    if has_id:
        assert ids == [given_id]
    else:
        assert re.fullmatch(rb"<[^<>@\s]+@[^<>@\s]+>", ids[0]), ids
    if has_date:
        assert dates == [given_date]
    else:
        when = email.utils.parsedate_to_datetime(dates[0].decode())
        now = datetime.datetime.now(datetime.UTC)
        assert abs((now - when).total_seconds()) < 120, dates
    if has_id and has_date:
        assert queued == msg  # kept byte for byte
    assert queued.endswith(msg)  # added fields go first; the rest is untouched


MSG_NO_TO = b"Subject: nobody\n\nbody\n"

BAD_INPUTS = {
    "empty stdin": (b"", ["-f", SENDER, "rcpt@example.org"], 65, "empty"),
    "blank stdin": (b"\n  \n", ["-f", SENDER, "rcpt@example.org"], 65, "empty"),
    "no recipients": (MESSAGE, ["-f", SENDER], 64, "no recipients"),
    "-t without recipient headers": (MSG_NO_TO, ["-t", "-f", SENDER], 64, "no recipients"),
    "CRLF in recipient": (MESSAGE, ["-f", SENDER, "a@example.org\r\nRCPT TO:<evil@example.net>"],
                          64, "bad address"),
    "LF in recipient": (MESSAGE, ["-f", SENDER, "a@example.org\nX"], 64, "bad address"),
    "CR in sender": (MESSAGE, ["-f", "s@example.com\rDATA", "rcpt@example.org"], 64,
                     "bad address"),
    "no @": (MESSAGE, ["-f", SENDER, "rcpt.example.org"], 64, "bad address"),
    "space in local part": (MESSAGE, ["-f", SENDER, "a b@example.org"], 64, "bad address"),
    "bad domain label": (MESSAGE, ["-f", SENDER, "a@-bad-.example.org"], 64, "bad address"),
    "display name instead of address": (MESSAGE, ["-f", SENDER, "Al <al@example.org>"], 64,
                                        "bad address"),
    "one good one bad": (MESSAGE, ["-f", SENDER, "ok@example.org", "bad@@example.org"], 64,
                         "bad address"),
    # recipient injection: a bare CR in To: read by -t once queued an extra RCPT TO
    "-t with a bare CR in To": (
        b"From: s@example.com\r\nTo: <victim@example.org\rRCPT TO:<evil@example.org>>\r\n"
        b"Subject: x\r\n\r\nbody\r\n", ["-t", "-f", SENDER], 65,
        "the To header field contains a control character (CR)"),
    "-t with NUL in Bcc": (b"To: a@example.org\nBcc: b@example.org\x00c@example.org\n\nbody\n",
                           ["-t", "-f", SENDER], 65, "the Bcc header field"),
    "-t with glued addresses in Cc": (
        b"To: a@example.org\nCc: victim@example.org<evil@example.org>\n\nbody\n",
        ["-t", "-f", SENDER, "arg@example.org"], 65, "the Cc header field"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_sendmail_rejects_bad_input_and_queues_nothing(tmp_path, case):
    stdin, args, code, words = BAD_INPUTS[case]
    q = tmp_path / "q"
    r = sendmail(q, *args, stdin=stdin)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stdout == b"", "no queue id may be printed"
    err = r.stderr.decode()
    assert err.startswith("mailout sendmail: ") and words in err, err
    assert "Traceback" not in err
    for sub in ("tmp", "new", "cur", "messages", "state"):
        assert files_in(q / sub) == [], sub
    assert not q.exists(), "bad input must not even create the queue folder"


def test_sendmail_unwritable_queue_folder_exits_73(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder\n")
    q = blocker / "q"
    r = sendmail(q, "-f", SENDER, "rcpt@example.org", stdin=MESSAGE)
    assert r.returncode == 73, (r.returncode, r.stderr)
    assert r.stdout == b""
    err = r.stderr.decode()
    assert err.startswith("mailout sendmail: ") and str(q) in err and "Traceback" not in err, err
    assert blocker.read_bytes() == b"not a folder\n"


def test_sendmail_write_error_exits_73_and_leaves_nothing(tmp_path):
    """A write that fails half-way (here: RLIMIT_FSIZE, which root cannot bypass,
    like a full disk) leaves no partial file in tmp/ and nothing in new/."""
    q = tmp_path / "q"
    code = ("import resource, runpy, sys; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "sys.argv[0] = 'mailout'; "
            "runpy.run_module('twisted_mailout.daemon.cli', run_name='__main__')")
    big = b"Subject: big\n\n" + (b"x" * 70 + b"\n") * 2000
    r = subprocess.run([sys.executable, "-c", code, "sendmail", "--queue", str(q), "-f", SENDER,
                        "rcpt@example.org"], input=big, env=env(), capture_output=True,
                       timeout=60)
    assert r.returncode == 73, (r.returncode, r.stderr)
    assert r.stdout == b""
    err = r.stderr.decode()
    assert err.startswith("mailout sendmail: cannot write") and "Traceback" not in err, err
    assert files_in(q / "tmp") == [] and files_in(q / "new") == []


# --------------------------------------------------------------------------- 2. queue list


def cli_rows(q) -> list[dict]:
    """`mailout queue --queue Q list --json`: one JSON object a line."""
    r = run_cli("queue", "--queue", str(q), "list", "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.decode().splitlines()]


def test_queue_list_after_a_run_shows_delivered_and_deferred(tmp_path, sink, daemons):
    sink.rcpt_reply = lambda a: "451 4.3.0 Try later" if a.startswith("later@") else None
    q = tmp_path / "q"
    msg = b"Subject: half now, half later\nMessage-ID: <half@example.com>\n\nbody\n"
    r = sendmail(q, "-f", SENDER, "ok@example.org", "later@example.net", stdin=msg)
    assert r.returncode == 0, r.stderr
    qid = r.stdout.decode().strip()
    before = time.time()
    d = daemons(q, f"--relay=127.0.0.1:{sink.port}")

    def deferred_row():
        rows = queue_list(q)
        if len(rows) == 1 and rows[0]["queue_name"] == "deferred":
            states = {rc["address"]: rc["state"] for rc in rows[0]["recipients"]}
            if states == {"ok@example.org": "delivered", "later@example.net": "deferred"}:
                return rows[0]
        return None

    row = wait_for(deferred_row, 30, what="one delivered, one deferred recipient",
                   detail=d.log)
    [got] = sink.wait_for_messages(1, timeout=10)
    assert got["mail_from"] == SENDER and got["rcpt_tos"] == ["ok@example.org"]
    assert [x["rcpt"] for x in sink.refused] == ["later@example.net"]

    assert_clean_stop(d, d.stop())
    rows = cli_rows(q)  # the command, on the state on disk, daemon stopped
    assert rows == [row]
    assert row["queue_id"] == qid
    assert row["sender"] == SENDER
    assert row["origin"] == "mailout" and row["message_size"] >= len(msg)
    assert before - 60 <= row["arrival_time"] <= time.time()
    ok, later = row["recipients"]
    assert ok["address"] == "ok@example.org"
    assert ok["state"] == "delivered" and ok["attempts"] == 1
    assert ok["next_attempt"] is None
    assert ok["last_reply"].startswith("250 ")
    assert ok["relay"] and str(sink.port) in ok["relay"]

    assert later["address"] == "later@example.net"
    assert later["state"] == "deferred" and later["attempts"] == 1
    assert later["last_reply"] == "451 4.3.0 Try later"
    # --retry-base=60 --retry-max=600 (Daemon's defaults): next try 1 to 10 minutes on.
    assert before + 30 <= later["next_attempt"] <= time.time() + 601, later["next_attempt"]

    shown = run_cli("queue", "--queue", str(q), "show", "--json", qid)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["recipients"][1]["reply"] == {"code": 451, "text": "4.3.0 Try later",
                                                "local": False}
    assert [h["code"] for h in detail["recipients"][1]["history"]] == [451]
    assert ["Subject", "half now, half later"] in detail["headers"]

    text = run_cli("queue", "--queue", str(q), "list")
    assert text.returncode == 0, text.stderr
    out = text.stdout.decode()
    assert out.splitlines()[0].startswith("-Queue ID-")
    assert any(line.startswith(qid) and line.endswith(SENDER) for line in out.splitlines())
    assert "later@example.net  deferred  attempts=1  next=" in out
    assert "(451 4.3.0 Try later)" in out
    assert "ok@example.org  delivered  attempts=1" in out
    assert out.endswith(" Kbytes in 1 request.\n")


def test_queue_list_of_a_missing_folder_is_a_usage_error(tmp_path):
    r = run_cli("queue", "--queue", str(tmp_path / "nope"), "list", "--json")
    assert r.returncode == 64 and b"not a mailout queue folder" in r.stderr, r
    assert not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------- 3. one daemon


def test_second_daemon_on_the_same_queue_refuses_to_start(tmp_path, sink, daemons):
    q = tmp_path / "q"
    first = daemons(q, f"--relay=127.0.0.1:{sink.port}")
    second = Daemon(q, f"--relay=127.0.0.1:{sink.port}", log=tmp_path / "second.log")
    second.start()
    try:
        out, err = second.proc.communicate(timeout=15)
    finally:
        second.stop()
    assert second.proc.returncode != 0
    said = (out + err).decode(errors="replace") + second.log()
    assert "another mailout daemon is already running" in said, said
    assert "Traceback" not in said, said
    assert (q / "lock").read_text().strip() == str(first.proc.pid)  # not clobbered

    assert first.proc.poll() is None, "the first daemon must keep running"
    r = sendmail(q, "-f", SENDER, "rcpt@example.org", stdin=MESSAGE)
    assert r.returncode == 0, r.stderr
    [got] = sink.wait_for_messages(1, timeout=30)
    assert got["rcpt_tos"] == ["rcpt@example.org"]
    wait_for(lambda: queue_list(q) == [], 30, what="the message to leave the queue")
    assert first.proc.poll() is None


# --------------------------------------------------------------------------- 4. SIGTERM


def test_sigterm_stops_cleanly_releases_lock_and_restart_delivers(tmp_path, sink, daemons):
    q = tmp_path / "q"
    first = daemons(q, f"--relay=127.0.0.1:{sink.port}")
    r = sendmail(q, "-f", SENDER, "one@example.org", stdin=MESSAGE)
    assert r.returncode == 0, r.stderr
    sink.wait_for_messages(1, timeout=30)

    first.proc.send_signal(signal.SIGTERM)
    try:
        code = first.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"daemon still running 20 s after SIGTERM\n{first.log()}")
    assert_clean_stop(first, code)

    fd = os.open(q / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

    # The daemon has exited and the lock is free: no process holds the
    # queue, so what is checked now is final, with no waiting. Mail queued
    # while it is down stays queued, and nothing more reached the server
    # (every session of the daemon has ended at the server).
    r = sendmail(q, "-f", SENDER, "two@example.org", stdin=MESSAGE)
    assert r.returncode == 0, r.stderr
    qid = r.stdout.decode().strip()
    assert [row["queue_id"] for row in queue_list(q)] == [qid]
    assert len(sink.wait_idle(timeout=30)) == 1, \
        "nothing may be delivered while the daemon is down"

    second = daemons(q, f"--relay=127.0.0.1:{sink.port}", log=tmp_path / "second.log")
    [line] = wait_for(lambda: [ln for ln in second.log().splitlines()
                               if "to=<two@example.org>" in ln and ", status=" in ln],
                      30, what="the outcome line of two@ after the restart")
    assert "status=sent" in line, line
    msgs = sink.messages  # the server had it before the daemon logged it as sent
    assert [m["rcpt_tos"] for m in msgs] == [["one@example.org"], ["two@example.org"]]
    wait_for(lambda: queue_list(q) == [], 30, what="the queue to empty")
    assert_clean_stop(second, second.stop())


# --------------------------------------------------------------------------- 5. zope/repoze


def _maildir_name() -> str:
    """A unique name as zope.sendmail's and repoze.sendmail's Maildir make them."""
    return (f"{int(time.time())}.{os.getpid()}.{socket.gethostname()}."
            f"{random.randrange(0x7FFFFFFF)}")


def _drop(queue: Path, name: str, data: bytes) -> None:
    """Write like a Maildir writer: into tmp/, then rename into new/."""
    (queue / "tmp" / name).write_bytes(data)
    os.rename(queue / "tmp" / name, queue / "new" / name)


def test_zope_and_repoze_queue_files_are_drained(tmp_path, aiosmtpd_sink, daemons):
    sink = aiosmtpd_sink()
    q = tmp_path / "q"
    for sub in ("tmp", "new", "cur"):  # what zope.sendmail's Maildir creates
        (q / sub).mkdir(parents=True)

    zope_msg = (b"From: a@example.com\n"
                b"To: b@example.org, c@example.org\n"
                b"Subject: from zope\n"
                b"Message-ID: <zope.1@example.com>\n"
                b"Date: Tue, 01 Jul 2003 10:52:37 +0200\n"
                b"\n"
                b"Hello from zope.sendmail.\n"
                b".a line starting with a dot\n")
    zope_name = _maildir_name()
    _drop(q, zope_name, b"X-Zope-From: a@example.com\n"
                        b"X-Zope-To: b@example.org, c@example.org\n" + zope_msg)

    corrupt_name = _maildir_name() + "x"
    _drop(q, corrupt_name, b"Subject: no envelope at all\n\nlost\n")

    d = daemons(q, f"--relay=127.0.0.1:{sink.port}")

    repoze_to = ["first.recipient.with.a.long.name@example.org",
                 "second.recipient.with.a.long.name@example.net", "x@example.org"]
    m = email.message.Message()
    m["From"] = "Repoze <r@example.com>"
    m["To"] = ", ".join(repoze_to)
    m["Subject"] = "from repoze"
    m["Message-Id"] = "<repoze.1@example.com>"
    m["Date"] = "Wed, 02 Jul 2003 10:52:37 +0200"
    m.set_payload("Hello from repoze.sendmail.\n")
    expected_repoze = m.as_bytes()  # the same message without the envelope fields
    m = copy.deepcopy(m)
    m["X-Actually-From"] = Header("r@example.com", "utf-8")
    m["X-Actually-To"] = Header(",".join(repoze_to), "utf-8")
    repoze_raw = m.as_bytes()
    assert b"X-Actually-To: =?utf-8?" in repoze_raw  # encoded, as repoze writes it
    _drop(q, _maildir_name(), repoze_raw)

    msgs = sink.wait_for_messages(2, timeout=30)
    by_sender = {x["mail_from"]: x for x in msgs}
    assert len(msgs) == 2 and set(by_sender) == {"a@example.com", "r@example.com"}, msgs
    zope = by_sender["a@example.com"]
    assert zope["rcpt_tos"] == ["b@example.org", "c@example.org"]
    assert zope["data"] == crlf(zope_msg)
    repoze = by_sender["r@example.com"]
    assert repoze["rcpt_tos"] == repoze_to
    assert repoze["data"] == crlf(expected_repoze)

    wait_for(lambda: corrupt_name in files_in(q / "corrupt"), 30,
             what=f"{corrupt_name} in corrupt/",
             detail=d.log)
    assert (q / "corrupt" / corrupt_name).read_bytes() == b"Subject: no envelope at all\n\nlost\n"
    wait_for(lambda: queue_list(q) == [] and files_in(q / "new") == [], 30,
             what="the queue to empty")
    wait_for(lambda: corrupt_name in d.log(), 10, what="the log to name the corrupt file")
    line = next(x for x in d.log().splitlines() if corrupt_name in x)
    assert "corrupt" in line and "envelope" in line, line
    assert len(sink.messages) == 2
    assert_clean_stop(d, d.stop())


# --------------------------------------------------------------------------- 6. venv install


def _long_options() -> set[str]:
    from twisted_mailout.daemon import tap

    names = {p[0] for p in tap.Options.optParameters}
    names |= {n[len("opt_"):].replace("_", "-") for n in dir(tap.Options) if n.startswith("opt_")}
    names -= {"help", "version"}
    return names


def test_fresh_venv_install_ships_the_plugin(tmp_path):
    venv = tmp_path / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    # `pip install .` as a user runs it: the build backend (setuptools, as
    # pyproject.toml requires) comes from the package index in an isolated
    # build environment; the runtime dependencies are the system's.
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", str(ROOT)],
                       capture_output=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")[-3000:]

    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    empty = tmp_path / "empty"
    empty.mkdir()
    twistd = venv / "bin" / "twistd"
    # With --no-deps Twisted is not installed into the venv, so it has no bin/twistd
    # of its own: run twistd's entry point with the venv's interpreter then.
    cmd = [str(twistd)] if twistd.exists() else [str(py), "-c", TWISTD_CODE]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *args], capture_output=True, timeout=60, env=clean,
                              cwd=str(empty))

    h = run("--help")
    assert h.returncode == 0, h.stderr
    assert re.search(rb"^\s+mailout\s", h.stdout, re.M), h.stdout.decode()

    h = run("mailout", "--help")
    assert h.returncode == 0, h.stderr
    text = h.stdout.decode()
    wanted = _long_options() | {
        "queue", "relay", "resolver", "mx-port", "helo", "tls", "cafile", "max-connections",
        "max-per-destination", "poll-interval", "retry-base", "retry-max",
        "max-queue-lifetime"}
    missing = sorted(o for o in wanted if f"--{o}=" not in text)
    assert not missing, f"not documented by `twistd mailout --help`: {missing}\n{text}"

    r = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, timeout=60, env=clean, cwd=str(empty), check=True)
    site = Path(r.stdout.decode().strip())
    assert site.is_relative_to(venv), site
    plugin = site / "twisted" / "plugins" / "mailout_plugin.py"
    assert plugin.is_file(), sorted(str(p.relative_to(site)) for p in site.rglob("*mailout*"))
    assert plugin.read_bytes() == (ROOT / "twisted" / "plugins" / "mailout_plugin.py").read_bytes()
    assert not (site / "twisted" / "__init__.py").exists()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()
    [record] = site.glob("twisted_mailout-*.dist-info/RECORD")
    recorded = {line.split(",", 1)[0] for line in record.read_text().splitlines()}
    assert "twisted/plugins/mailout_plugin.py" in recorded
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py"} & recorded

    # The plugin and the package twistd loads are the venv's own copies.
    probe = ("import json, twisted, twisted_mailout, twisted.plugins.mailout_plugin as p; "
             "print(json.dumps([twisted_mailout.__file__, p.__file__, twisted.__file__]))")
    r = subprocess.run([str(py), "-c", probe], capture_output=True, timeout=60, env=clean,
                       cwd=str(empty))
    assert r.returncode == 0, r.stderr
    pkg_file, plugin_file, twisted_file = json.loads(r.stdout)
    assert Path(pkg_file).is_relative_to(site), pkg_file
    assert Path(plugin_file).is_relative_to(site), plugin_file
    assert not Path(twisted_file).is_relative_to(site), "Twisted itself must stay the system's"

    m = subprocess.run([str(venv / "bin" / "mailout"), "sendmail", "--help"], capture_output=True,
                       timeout=60, env=clean, cwd=str(empty))
    assert m.returncode == 0 and b"--queue" in m.stdout, m


# --------------------------------------------------------------------------- 7. demo


def test_demo_runs_and_reports_expected_outcomes():
    r = run_cli("demo", timeout=90)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (out, r.stderr.decode(errors="replace"))
    assert "status=sent" in out and "status=bounced" in out, out
    assert "All outcomes as expected" in out, out


@pytest.mark.parametrize("args,words", [
    ([], "--queue=DIR is required"),
    (["--queue={q}", "--tls=bogus"], "--tls must be one of"),
    (["--queue={q}", "--relay=host:99999"], "port out of range"),
    (["--queue={q}", "--resolver=dns.example"], "expected an IPv4 address"),
    (["--queue={q}", "--tls=verify", "--cafile={q}/../missing.pem"], "No such file"),
    (["--queue={q}", "--retry-base=600", "--retry-max=60"], "--retry-max must not be less"),
    (["--queue={q}", "--retry-jitter=2"], "--retry-jitter must be between 0 and 1"),
    (["--queue={q}", "--delay-warning=0"], "--delay-warning must be positive"),
])
def test_daemon_refuses_bad_options_with_a_clear_message(tmp_path, args, words):
    args = [a.format(q=tmp_path / "q") for a in args]
    r = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                        "-n", "--pidfile=", f"--logfile={tmp_path / 'log'}", "mailout", *args],
                       env=env(), capture_output=True, timeout=60, cwd=str(tmp_path))
    out = (r.stdout + r.stderr).decode()
    assert r.returncode != 0
    assert words in out, out
    assert "Traceback" not in out
