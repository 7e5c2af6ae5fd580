"""`mailout queue` on real queue folders in tmp_path, no daemon: the offline
path (QueueAdmin over the folder, under its lock), the choice of path, the
printing, the exit codes; and the online path against a fake control client
(the daemon's API itself is tested with the daemon)."""

from __future__ import annotations

import io
import json
import os
import time
import types
from pathlib import Path

import pytest

from twisted_mailout.daemon import cli, queuecli
from twisted_mailout.daemon.control import ControlError
from twisted_mailout.envelope import RecipientState, Reply
from twisted_mailout.queue.model import Suspension
from twisted_mailout.queue.store import Queue, QueueLocked

MSG = b"From: a@example.com\r\nSubject: hello there\r\nMessage-ID: <m1@example.com>\r\n\r\nbody\r\n"
LATER = Reply(451, "4.3.0 try later")


def mailout(capsys, *args: str, stdin: str | None = None,
            monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    """Run `mailout queue ARGS` in this process: (exit status, stdout, stderr)."""
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        status = cli.main(["queue", *args])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def q(tmp_path):
    """A queue folder with three messages waiting in new/ (not picked up)."""
    path = tmp_path / "q"
    store = Queue(str(path))
    store.ids = [
        store.enqueue("a@example.com", ["x@example.org", "y@example.net"], MSG),
        store.enqueue("b@other.test", ["z@example.org"], MSG),
        store.enqueue("", ["c@example.com"], MSG),  # a bounce
    ]
    return store


def defer_one(store: Queue, qid: str, next_attempt: float) -> None:
    """Pick everything up and make QID's first recipient deferred until
    NEXT_ATTEMPT, after one attempt (as the scheduler records it)."""
    store.pickup()
    e = store.load(qid)
    r = e.recipients[0]
    r.attempts = 1
    r.move(RecipientState.DEFERRED, LATER, next_attempt=next_attempt, relay="mx[192.0.2.1]:25")
    r.record(time.time() - 60, LATER, "mx[192.0.2.1]:25")
    store.save_many([e])


def rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def lock_is_free(path) -> bool:
    other = Queue(str(path), create=False)
    try:
        other.lock()
    except QueueLocked:
        return False
    other.unlock()
    return True


# --------------------------------------------------------------------------- the folder


def test_a_missing_folder_is_a_usage_error_and_is_not_created(tmp_path, capsys):
    status, out, err = mailout(capsys, "--queue", str(tmp_path / "nope"), "list", "--json")
    assert status == 64 and out == ""
    assert err.startswith("mailout queue: ") and "not a mailout queue folder" in err
    assert not (tmp_path / "nope").exists()


def test_a_file_is_not_a_queue_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    status, _, err = mailout(capsys, "--queue", str(tmp_path / "f"), "list")
    assert status == 64 and "not a folder" in err


def test_a_folder_holding_other_things_is_not_a_queue(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    status, _, err = mailout(capsys, "--queue", str(tmp_path / "d"), "summary")
    assert status == 64 and "not a mailout queue folder" in err and "notes.txt" in err
    assert sorted(os.listdir(tmp_path / "d")) == ["notes.txt"]  # nothing added


@pytest.mark.parametrize("content", [[], ["tmp", "messages"]])
def test_an_empty_or_uninitialised_folder_is_an_empty_queue(tmp_path, capsys, content):
    d = tmp_path / "d"
    d.mkdir()
    for sub in content:
        (d / sub).mkdir()
    assert mailout(capsys, "-q", str(d), "list") == (0, "Mail queue is empty\n", "")
    assert mailout(capsys, "-q", str(d), "list", "--json") == (0, "", "")
    status, out, _ = mailout(capsys, "-q", str(d), "summary", "--json")
    assert status == 0 and json.loads(out)["total"]["total"] == 0
    assert mailout(capsys, "-q", str(d), "hold", "ALL") == (0, "0 messages held\n", "")
    status, _, err = mailout(capsys, "-q", str(d), "delete", "0123ABC")
    assert status == 66 and "0123ABC" in err
    assert mailout(capsys, "-q", str(d), "suspensions", "--json") == (0, "", "")
    assert sorted(os.listdir(d)) == sorted(content)  # left as it was


def test_no_queue_and_no_api_is_a_usage_error(capsys):
    status, _, err = mailout(capsys, "list")
    assert status == 64 and "--queue" in err


# --------------------------------------------------------------------------- list


def test_list_json_is_one_row_a_line(q, capsys):
    status, out, err = mailout(capsys, "-q", q.path, "list", "--json")
    assert status == 0 and err == ""
    got = rows(out)
    assert [r["queue_id"] for r in got] == q.ids
    first = got[0]
    assert set(first) >= {"queue_id", "queue_name", "arrival_time", "message_size", "sender",
                          "recipients"}
    assert first["queue_name"] == "incoming" and first["sender"] == "a@example.com"
    assert first["message_size"] > len(MSG) - 10
    assert isinstance(first["arrival_time"], int)
    assert abs(first["arrival_time"] - time.time()) < 60
    assert [r["address"] for r in first["recipients"]] == ["x@example.org", "y@example.net"]
    assert set(first["recipients"][0]) >= {"address", "state", "attempts", "next_attempt",
                                           "last_reply"}
    assert got[2]["sender"] == ""


def test_list_rows_show_deferred_state_and_last_reply(q, capsys):
    later = time.time() + 3600
    defer_one(q, q.ids[0], later)
    [row] = rows(mailout(capsys, "-q", q.path, "list", "--json", q.ids[0])[1])
    assert row["queue_name"] == "deferred"
    r = row["recipients"][0]
    assert r["state"] == "deferred" and r["attempts"] == 1
    assert r["next_attempt"] == pytest.approx(later)
    assert r["last_reply"] == "451 4.3.0 try later"


def test_list_filters_combine(q, capsys):
    def ids(*sel):
        status, out, err = mailout(capsys, "-q", q.path, "list", "--json", *sel)
        assert status == 0, err
        return [r["queue_id"] for r in rows(out)]

    assert ids("--domain", "example.org") == q.ids[:2]
    assert ids("--domain", "example.org", "--sender", "@other.test") == [q.ids[1]]
    assert ids("--sender", "<>") == [q.ids[2]]
    assert ids("--recipient", "Y@example.NET") == [q.ids[0]]
    assert ids("--state", "incoming", "--older-than", "1h") == []
    assert ids("--older-than", "0") == q.ids
    assert ids(q.ids[1], q.ids[2], "--sender", "<>") == [q.ids[2]]


def test_list_table_is_mailq_like(q, capsys):
    defer_one(q, q.ids[0], time.time() + 600)
    mailout(capsys, "-q", q.path, "hold", q.ids[1])
    status, out, _ = mailout(capsys, "-q", q.path, "list")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("-Queue ID-") and "--Size--" in lines[0]
    assert "----Arrival Time----" in lines[0] and "-Sender/Recipient-" in lines[0]
    first = next(line for line in lines if line.startswith(q.ids[0]))
    assert first.split()[1].isdigit() and first.endswith("a@example.com")
    assert next(line for line in lines if line.startswith(q.ids[1])).startswith(q.ids[1] + "!")
    assert next(line for line in lines if line.startswith(q.ids[2])).endswith("MAILER-DAEMON")
    block = out.split(q.ids[0], 1)[1].split("\n\n", 1)[0]
    assert "x@example.org  deferred  attempts=1  next=" in block
    assert "(451 4.3.0 try later)" in block
    assert "y@example.net  pending  attempts=0" in block
    size = sum(r["message_size"] for r in rows(mailout(capsys, "-q", q.path, "list",
                                                            "--json")[1]))
    assert lines[-1] == f"-- {(size + 1023) // 1024} Kbytes in 3 requests."


def test_list_of_an_unknown_id_exits_66(q, capsys):
    status, out, err = mailout(capsys, "-q", q.path, "list", q.ids[0], "ABCDEF0123")
    assert status == 66 and out == ""
    assert err == "mailout queue: not in the queue: ABCDEF0123\n"


@pytest.mark.parametrize("args,word", [
    (["--state", "bogus"], "--state"),
    (["not/an/id"], "not a queue id"),
    (["ALL", "ABC"], "not both"),
])
def test_a_bad_selector_exits_64(q, capsys, args, word):
    status, _, err = mailout(capsys, "-q", q.path, "list", *args)
    assert status == 64 and err.startswith("mailout queue: ") and word in err


@pytest.mark.parametrize("args", [
    ["list", "--older-than", "5x"],
    ["summary", "--by", "recipient"],
    ["summary", "--top", "0"],
    ["suspend", "--domain", "example.org"],
    ["frobnicate"],
    [],
])
def test_usage_errors_exit_64(q, capsys, args):
    status, _, err = mailout(capsys, "-q", q.path, *args)
    assert status == 64 and "usage:" in err


def test_list_json_streams_its_first_line_at_once():
    """The first row is flushed before the second is even read."""

    class Stream(io.StringIO):
        flushed: list[str]

        def flush(self):
            self.flushed.append(self.getvalue())

    out = Stream()
    out.flushed = []

    def source():
        yield {"queue_id": "A"}
        assert out.flushed == ['{"queue_id":"A"}\n'], out.flushed
        yield {"queue_id": "B"}

    assert queuecli.print_ndjson(source(), out) == 2
    assert out.getvalue().splitlines() == ['{"queue_id":"A"}', '{"queue_id":"B"}']


def test_read_only_commands_leave_the_lock_free_and_the_queue_unchanged(q, capsys):
    before = sorted(os.listdir(os.path.join(q.path, "new")))
    for args in (["list"], ["list", "--json"], ["summary"], ["show", q.ids[0]],
                 ["suspensions"]):
        assert mailout(capsys, "-q", q.path, *args)[0] == 0
    assert sorted(os.listdir(os.path.join(q.path, "new"))) == before  # nothing picked up
    assert lock_is_free(q.path)


# --------------------------------------------------------------------------- show


def test_show_prints_the_envelope_history_and_headers(q, capsys):
    defer_one(q, q.ids[0], time.time() + 600)
    status, out, _ = mailout(capsys, "-q", q.path, "show", q.ids[0])
    assert status == 0
    assert f"Queue ID:     {q.ids[0]}" in out and "Queue:        deferred" in out
    assert "Sender:       a@example.com" in out
    assert "x@example.org  deferred  attempts=1" in out and "relay=mx[192.0.2.1]:25" in out
    assert "deferred  451 4.3.0 try later via mx[192.0.2.1]:25" in out  # its history
    assert "  Subject: hello there" in out
    assert "body" not in out.split("Headers:")[1]

    status, out, _ = mailout(capsys, "-q", q.path, "show", q.ids[0], "--body")
    assert status == 0 and out.endswith("\nSubject: hello there\nMessage-ID: <m1@example.com>"
                                        "\n\nbody\n")


def test_show_json_is_the_detail_object(q, capsys):
    defer_one(q, q.ids[0], time.time() + 600)
    status, out, _ = mailout(capsys, "-q", q.path, "show", "--json", "--body", q.ids[0])
    d = json.loads(out)
    assert status == 0 and d["queue_id"] == q.ids[0]
    assert ["Subject", "hello there"] in d["headers"]
    assert d["recipients"][0]["history"][0]["code"] == 451
    assert d["recipients"][0]["reply"] == {"code": 451, "text": "4.3.0 try later",
                                           "local": False}
    assert d["message"].endswith("body\r\n")


def test_show_of_an_incoming_message_and_of_unknown_ids(q, capsys):
    status, out, _ = mailout(capsys, "-q", q.path, "show", q.ids[1])
    assert status == 0 and "Queue:        incoming" in out
    assert mailout(capsys, "-q", q.path, "show", "ABC123")[:2] == (66, "")
    status, _, err = mailout(capsys, "-q", q.path, "show", "../etc")
    assert status == 64 and "not a queue id" in err


# --------------------------------------------------------------------------- summary


def test_summary_is_qshape_table(q, capsys):
    status, out, _ = mailout(capsys, "-q", q.path, "summary")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                                "1280+"]
    assert lines[1].split() == ["TOTAL", "3", "3"] + ["0"] * 9
    assert lines[2].split() == ["example.org", "2", "2"] + ["0"] * 9
    assert {line.split()[0] for line in lines[3:]} == {"example.com", "example.net"}
    # right-aligned: every line is as long as the widest, the last column ends them all
    assert len({len(line) for line in lines}) == 1


def test_summary_by_sender_top_and_json(q, capsys):
    status, out, _ = mailout(capsys, "-q", q.path, "summary", "--by", "sender", "--top", "1",
                             "--json")
    s = json.loads(out)
    assert status == 0 and s["by"] == "sender" and s["total"]["total"] == 3
    assert len(s["rows"]) == 1
    status, out, _ = mailout(capsys, "-q", q.path, "summary", "--sender", "<>")
    assert status == 0 and out.splitlines()[1].split()[:2] == ["TOTAL", "1"]


# --------------------------------------------------------------------------- actions


def test_hold_then_release(q, capsys):
    status, out, err = mailout(capsys, "-q", q.path, "hold", "--domain", "example.org",
                               "--reason", "looks like spam")
    assert (status, out, err) == (0, "2 messages held\n", "")
    held = {r["queue_id"] for r in rows(mailout(capsys, "-q", q.path, "list", "--json",
                                                "--state", "hold")[1])}
    assert held == set(q.ids[:2])
    assert lock_is_free(q.path)  # let go at the end

    status, out, _ = mailout(capsys, "-q", q.path, "hold", q.ids[0], q.ids[2])
    assert status == 0
    assert out == f"1 message held\n{q.ids[0]}: not held: already held\n"

    status, out, _ = mailout(capsys, "-q", q.path, "release", "ALL")
    assert status == 0 and out.startswith("3 messages released\n")
    assert not rows(mailout(capsys, "-q", q.path, "list", "--json", "--state", "hold")[1])
    e = q.load(q.ids[0])
    assert not e.held and e.held_total >= 0


def test_ids_from_standard_input_accept_list_json_lines(q, capsys, monkeypatch):
    listed = mailout(capsys, "-q", q.path, "list", "--json", "--domain", "example.org")[1]
    status, out, _ = mailout(capsys, "-q", q.path, "delete", "-", "--reason", "cleanup",
                             stdin=listed, monkeypatch=monkeypatch)
    assert (status, out) == (0, "2 messages deleted\n")
    status, out, _ = mailout(capsys, "-q", q.path, "list", "--json")
    assert [r["queue_id"] for r in rows(out)] == [q.ids[2]]
    # plain ids, one a line, comments and blank lines skipped
    status, out, _ = mailout(capsys, "-q", q.path, "hold", "-",
                             stdin=f"# the bounce\n\n{q.ids[2]}\n", monkeypatch=monkeypatch)
    assert (status, out) == (0, "1 message held\n")


def test_delete_leaves_no_bounce(q, capsys):
    status, out, _ = mailout(capsys, "-q", q.path, "delete", q.ids[0])
    assert (status, out) == (0, "1 message deleted\n")
    left = rows(mailout(capsys, "-q", q.path, "list", "--json")[1])
    assert [r["queue_id"] for r in left] == q.ids[1:]


def test_an_action_on_an_unknown_id_changes_nothing(q, capsys):
    status, out, err = mailout(capsys, "-q", q.path, "hold", q.ids[0], "FFFF0000")
    assert status == 66 and out == "" and "FFFF0000" in err
    assert not any(r["queue_name"] == "hold"
                   for r in rows(mailout(capsys, "-q", q.path, "list", "--json")[1]))
    assert lock_is_free(q.path)


def test_an_action_needs_a_selector(q, capsys):
    status, out, err = mailout(capsys, "-q", q.path, "delete")
    assert status == 64 and out == "" and "say which messages" in err
    assert len(rows(mailout(capsys, "-q", q.path, "list", "--json")[1])) == 3


def test_bounce_queues_a_report_to_the_sender_with_the_reason(q, capsys):
    status, out, _ = mailout(capsys, "-q", q.path, "bounce", q.ids[0], "--reason",
                             "mailbox migration")
    assert status == 0
    first, second = out.splitlines()
    assert first == "1 message bounced"
    assert second.startswith("1 failure report queued to the senders: ")
    dsn_id = second.rsplit(" ", 1)[1]
    listed = {r["queue_id"]: r for r in rows(mailout(capsys, "-q", q.path, "list",
                                                      "--json")[1])}
    assert q.ids[0] not in listed
    dsn = listed[dsn_id]
    assert dsn["sender"] == "" and [r["address"] for r in dsn["recipients"]] == [
        "a@example.com"]
    with open(os.path.join(q.path, "new", dsn_id), "rb") as f:  # not picked up yet
        text = f.read().decode()
    assert "mailbox migration" in text and "x@example.org" in text


def test_bouncing_a_bounce_only_removes_it(q, capsys):
    status, out, _ = mailout(capsys, "-q", q.path, "bounce", "--sender", "<>")
    assert (status, out) == (0, "1 message bounced\n")
    assert len(rows(mailout(capsys, "-q", q.path, "list", "--json")[1])) == 2


def test_flush_makes_deferred_mail_due_and_leaves_the_rest(q, capsys):
    later = time.time() + 3600
    defer_one(q, q.ids[0], later)
    before = time.time()
    status, out, _ = mailout(capsys, "-q", q.path, "flush")
    assert (status, out) == (0, "1 message flushed\n")  # only the deferred one selected
    r = q.load(q.ids[0]).recipients[0]
    assert r.state is RecipientState.DEFERRED and before <= r.next_attempt <= time.time()
    # a held message is not flushed
    defer_one(q, q.ids[0], later)
    mailout(capsys, "-q", q.path, "hold", q.ids[0])
    status, out, _ = mailout(capsys, "-q", q.path, "flush", q.ids[0])
    assert (status, out) == (0, f"0 messages flushed\n{q.ids[0]}: not flushed: held\n")
    assert q.load(q.ids[0]).recipients[0].next_attempt == pytest.approx(later)


def test_requeue_makes_deferred_mail_due(q, capsys):
    defer_one(q, q.ids[0], time.time() + 3600)
    status, out, _ = mailout(capsys, "-q", q.path, "requeue", "--domain", "example.org")
    assert (status, out) == (0, "2 messages requeued\n")
    assert q.load(q.ids[0]).recipients[0].next_attempt <= time.time()


def test_a_bulk_action_reports_progress_by_batch(q, capsys, monkeypatch):
    monkeypatch.setattr("twisted_mailout.admin.operations.BATCH", 1)
    seen = []
    b = queuecli.open_backend(q.path)
    try:
        from twisted_mailout.admin import Selector

        result = b.act("hold", Selector(all=True), "", lambda done, total: seen.append(
            (done, total)))
    finally:
        b.close()
    assert result["changed"] == 3 and seen == [(1, 3), (2, 3), (3, 3)]


def test_the_progress_bar_shows_only_on_a_terminal_for_many_messages(capsys):
    bar = queuecli._ProgressBar("hold", enabled=False)
    bar(500, 1000)
    assert bar._bar is None
    bar = queuecli._ProgressBar("hold", enabled=True)
    bar(1, 1)
    assert bar._bar is None
    bar(500, 1000)
    try:
        assert bar._bar is not None
    finally:
        bar.close()
    assert bar._bar is None


def test_an_action_holds_the_lock_for_the_whole_command(q):
    b = queuecli.open_backend(q.path, writes=True)
    try:
        assert isinstance(b, queuecli.OfflineBackend) and b.locked
        assert not lock_is_free(q.path)
    finally:
        b.close()
    assert lock_is_free(q.path)
    b = queuecli.open_backend(q.path, writes=False)
    try:
        assert isinstance(b, queuecli.OfflineBackend) and not b.locked
        assert lock_is_free(q.path)
    finally:
        b.close()


# --------------------------------------------------------------------------- suspensions


def test_suspend_list_and_cancel(q, capsys):
    before = time.time()
    status, out, _ = mailout(capsys, "-q", q.path, "suspend", "--domain", "Example.ORG",
                             "--duration", "2h", "--reason", "their MX is down")
    assert status == 0 and out.startswith("suspended example.org until ")
    [saved] = q.suspensions()  # in the folder: a daemon started later applies it
    assert saved.domain == "example.org" and saved.reason == "their MX is down"
    assert before + 7200 <= saved.until <= time.time() + 7200
    assert out.rstrip().endswith(f"(suspension {saved.id})")

    status, out, _ = mailout(capsys, "-q", q.path, "suspensions", "--json")
    assert status == 0 and rows(out) == [saved.to_json()]
    status, out, _ = mailout(capsys, "-q", q.path, "suspensions")
    assert out.splitlines()[0].split() == ["ID", "DOMAIN", "UNTIL", "REASON"]
    assert out.splitlines()[1].startswith(f"{saved.id}  example.org  ")
    assert out.splitlines()[1].endswith("their MX is down")

    status, _, err = mailout(capsys, "-q", q.path, "suspend", "--domain", "example.org",
                             "--duration", "60")
    assert status == 69 and "already suspended" in err

    status, out, _ = mailout(capsys, "-q", q.path, "cancel-suspension", saved.id)
    assert (status, out) == (0, f"suspension {saved.id} of example.org cancelled\n")
    assert q.suspensions() == []
    assert mailout(capsys, "-q", q.path, "suspensions")[1] == "No destination is suspended\n"
    status, _, err = mailout(capsys, "-q", q.path, "cancel-suspension", saved.id)
    assert status == 66 and saved.id in err


def test_an_expired_suspension_is_not_listed(q, capsys):
    q.save_suspensions([Suspension("abc", "example.org", "old", 1.0, 2.0)])
    assert mailout(capsys, "-q", q.path, "suspensions", "--json") == (0, "", "")


@pytest.mark.parametrize("domain,duration", [("", "60"), ("a b", "60"), ("example.org", "0")])
def test_a_bad_suspension_exits_64(q, capsys, domain, duration):
    status, _, err = mailout(capsys, "-q", q.path, "suspend", "--domain", domain,
                             "--duration", duration)
    assert status == 64 and err.startswith("mailout queue: ")
    assert q.suspensions() == []


def test_suspend_on_an_uninitialised_folder_says_so(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    status, _, err = mailout(capsys, "-q", str(tmp_path / "d"), "suspend", "--domain",
                             "example.org", "--duration", "60")
    assert status == 66 and "not initialised" in err


@pytest.mark.parametrize("text,seconds", [
    ("90", 90), ("1.5", 1.5), ("30s", 30), ("30m", 1800), ("2h", 7200), ("1d", 86400),
    ("1W", 604800), (" 2h ", 7200), ("0", 0),
])
def test_durations(text, seconds):
    assert queuecli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-5", "1h30m", "5x", "inf", "nan", "1e400"])
def test_bad_durations(text):
    with pytest.raises(Exception, match="not a duration"):
        queuecli.parse_duration(text)


# --------------------------------------------------------------------------- a daemon runs


class FakeClient:
    def __init__(self, answers=None, fail=None):
        self.calls = []
        self.answers = answers or {}
        self.fail = fail
        self.closed = False

    def _answer(self, call):
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail
        return self.answers[call[0], call[1]]

    def get(self, path, params=None):
        return self._answer(("GET", path, params))

    def post(self, path, body):
        return self._answer(("POST", path, body))

    def delete(self, path, body=None):
        return self._answer(("DELETE", path, body))

    def iter_ndjson(self, path, params=None):
        self.calls.append(("NDJSON", path, params))
        if self.fail is not None:
            raise self.fail
        yield from self.answers["NDJSON", path]

    def close(self):
        self.closed = True


@pytest.fixture
def daemon(q, monkeypatch):
    """The folder locked as by a running daemon, and a fake control module
    whose find_daemon gives a FakeClient."""
    q.lock()
    client = FakeClient()
    found = []

    def find_daemon(path):
        found.append(path)
        return daemon.client

    daemon = types.SimpleNamespace(client=client, found=found, queue=q)
    fake = types.SimpleNamespace(find_daemon=find_daemon, ControlError=ControlError,
                                 ControlClient=None)
    monkeypatch.setattr(queuecli, "_control", lambda: fake)
    yield daemon
    q.unlock()


def test_with_a_daemon_running_list_uses_its_api(daemon, capsys):
    row = {"queue_id": "A1", "queue_name": "active", "arrival_time": 1, "message_size": 10,
           "sender": "s@x.test", "recipients": []}
    daemon.client.answers["NDJSON", "/api/v1/messages"] = [row]
    status, out, _ = mailout(capsys, "-q", daemon.queue.path, "list", "--json", "--domain",
                             "example.org", "--older-than", "1h")
    assert status == 0 and rows(out) == [row]
    assert daemon.found == [daemon.queue.path]
    assert daemon.client.calls == [("NDJSON", "/api/v1/messages", {
        "domain": "example.org", "older_than": "3600"})]
    assert daemon.client.closed


def test_with_a_daemon_running_actions_post_to_its_api(daemon, capsys):
    daemon.client.answers["POST", "/api/v1/actions/hold"] = {
        "action": "hold", "matched": 3, "changed": 2, "queue_ids": ["A", "B"],
        "skipped": {"C": "already held"}, "dsn_queue_ids": []}
    status, out, _ = mailout(capsys, "-q", daemon.queue.path, "hold", "ALL", "--reason", "r")
    assert (status, out) == (0, "2 messages held\nC: not held: already held\n")
    assert daemon.client.calls == [("POST", "/api/v1/actions/hold",
                                    {"selector": {"all": True}, "reason": "r"})]


def test_with_a_daemon_running_the_folder_is_not_touched(daemon, capsys):
    daemon.client.answers["POST", "/api/v1/actions/delete"] = {
        "action": "delete", "matched": 3, "changed": 3, "queue_ids": [], "skipped": {},
        "dsn_queue_ids": []}
    before = sorted(os.listdir(os.path.join(daemon.queue.path, "new")))
    assert mailout(capsys, "-q", daemon.queue.path, "delete", "ALL")[0] == 0
    assert sorted(os.listdir(os.path.join(daemon.queue.path, "new"))) == before


def test_with_a_daemon_running_the_other_commands_use_its_api(daemon, capsys):
    c = daemon.client
    s = {"id": "s1", "domain": "example.org", "reason": "r", "created": 1.0,
         "until": time.time() + 60}
    c.answers.update({
        ("GET", "/api/v1/summary"): {"by": "domain", "buckets": ["5", "1280+"],
                                     "total": {"total": 1, "counts": [1, 0]},
                                     "rows": [{"domain": "d.test", "total": 1,
                                               "counts": [1, 0]}], "messages": 1},
        ("GET", "/api/v1/messages/ABC"): {"queue_id": "ABC"},
        ("GET", "/api/v1/suspensions"): {"suspensions": [s]},
        ("POST", "/api/v1/suspensions"): s,
        ("DELETE", "/api/v1/suspensions/s1"): s,
    })
    path = daemon.queue.path
    status, out, _ = mailout(capsys, "-q", path, "summary", "--by", "sender", "--top", "5")
    assert status == 0 and out.splitlines()[2].split() == ["d.test", "1", "1", "0"]
    assert json.loads(mailout(capsys, "-q", path, "show", "--json", "--body", "ABC")[1]) == {
        "queue_id": "ABC"}
    assert rows(mailout(capsys, "-q", path, "suspensions", "--json")[1]) == [s]
    assert mailout(capsys, "-q", path, "suspend", "--domain", "example.org", "--duration",
                   "1m", "--reason", "r")[1].startswith("suspended example.org until ")
    assert mailout(capsys, "-q", path, "cancel-suspension", "s1", "--reason", "ok")[0] == 0
    assert c.calls == [
        ("GET", "/api/v1/summary", {"by": "sender", "top": "5"}),
        ("GET", "/api/v1/messages/ABC", {"body": "1"}),
        ("GET", "/api/v1/suspensions", {}),
        ("POST", "/api/v1/suspensions", {"domain": "example.org", "duration": 60.0,
                                         "reason": "r"}),
        ("DELETE", "/api/v1/suspensions/s1", {"reason": "ok"}),
    ]


@pytest.mark.parametrize("status,code,exit_status", [
    (400, "bad_request", 64), (404, "not_found", 66), (409, "conflict", 69),
    (401, "unauthorized", 77), (403, "forbidden", 77), (500, "internal", 70),
    (0, "unreachable", 75),
])
def test_api_errors_become_exit_statuses(daemon, capsys, status, code, exit_status):
    daemon.client.fail = ControlError(status, code, f"it said {code}")
    got, out, err = mailout(capsys, "-q", daemon.queue.path, "release", "ABC")
    assert (got, out, err) == (exit_status, "", f"mailout queue: it said {code}\n")
    got, out, err = mailout(capsys, "-q", daemon.queue.path, "list", "--json")
    assert (got, out, err) == (exit_status, "", f"mailout queue: it said {code}\n")


def test_a_daemon_without_a_reachable_api_exits_75(daemon, capsys):
    daemon.client = None  # find_daemon found no (live) control.json
    status, out, err = mailout(capsys, "-q", daemon.queue.path, "list")
    assert status == 75 and out == ""
    assert "a mailout daemon runs on" in err and "control.json" in err


def test_without_the_control_client_a_running_daemon_exits_75(q, capsys, monkeypatch):
    real = queuecli.importlib.import_module

    def no_control(name, *a):
        if name == "twisted_mailout.daemon.control":
            raise ImportError("no module named control")
        return real(name, *a)

    monkeypatch.setattr(queuecli.importlib, "import_module", no_control)
    q.lock()
    try:
        status, _, err = mailout(capsys, "-q", q.path, "hold", "ALL")
    finally:
        q.unlock()
    assert status == 75 and "control API" in err
    assert not any(r["queue_name"] == "hold"
                   for r in rows(mailout(capsys, "-q", q.path, "list", "--json")[1]))


def test_an_explicit_api_url_does_not_need_the_folder(tmp_path, capsys, monkeypatch):
    made = []
    client = FakeClient({("GET", "/api/v1/suspensions"): {"suspensions": []}})

    def control_client(endpoint, token=None):
        made.append((endpoint, token))
        return client

    monkeypatch.setattr(queuecli, "_control", lambda: types.SimpleNamespace(
        ControlClient=control_client, ControlError=ControlError))
    token = tmp_path / "token"
    token.write_text("s3cret\nignored\n")
    status, out, _ = mailout(capsys, "--api", "http://127.0.0.1:8025/", "--token-file",
                             str(token), "suspensions")
    assert (status, out) == (0, "No destination is suspended\n")
    assert made == [("tcp:127.0.0.1:8025", "s3cret")]
    status, _, err = mailout(capsys, "--api", "http://127.0.0.1:8025", "--token-file",
                             str(tmp_path / "missing"), "suspensions")
    assert status == 64 and "token file" in err


@pytest.mark.parametrize("url,endpoint", [
    ("http://127.0.0.1:8025", "tcp:127.0.0.1:8025"),
    ("HTTP://localhost:80/", "tcp:localhost:80"),
    ("https://127.0.0.1:8443", "ssl:127.0.0.1:8443"),
    ("http://[::1]:8025", "tcp6:[::1]:8025"),
    ("unix:/var/spool/mailout/control.sock", "unix:/var/spool/mailout/control.sock"),
    ("tcp:127.0.0.1:8025", "tcp:127.0.0.1:8025"),
])
def test_api_urls(url, endpoint):
    assert queuecli.api_endpoint(url) == endpoint


@pytest.mark.parametrize("url", ["ftp://h:1", "http://h", "http://h:80/api/v1",
                                 "http://u@h:80", "http://:80"])
def test_bad_api_urls(url):
    with pytest.raises(queuecli.CommandError) as e:
        queuecli.api_endpoint(url)
    assert e.value.status == 64


def test_a_bad_api_endpoint_is_a_usage_error(capsys):
    status, _, err = mailout(capsys, "--api", "smtp:127.0.0.1:25", "list")
    assert status == 64 and "not an API endpoint" in err


def test_offline_actions_are_logged_in_the_queue_folder(q, capsys):
    status, _, _ = mailout(capsys, "-q", q.path, "delete", q.ids[0], "--reason", "spam run")
    assert status == 0
    log = (Path(q.path) / "admin.log").read_text()
    assert f"{q.ids[0]}: delete by the operator (cli): spam run" in log
    assert os.stat(Path(q.path) / "admin.log").st_mode & 0o777 == 0o600
    mailout(capsys, "-q", q.path, "list")  # reading logs nothing
    assert (Path(q.path) / "admin.log").read_text() == log


def test_many_ids_through_the_api_go_in_several_requests():
    """The API takes at most ~2000 characters of ids per GET: a listing or a
    summary of 200 ids is split, every id checked before any row prints, and
    the summaries merged."""
    from twisted_mailout.admin import Selector
    from twisted_mailout.daemon.queueback import ApiBackend

    ids = [f"{i:023X}" for i in range(1, 201)]

    class Client:
        def __init__(self):
            self.calls = []

        def get(self, path, params):
            self.calls.append((path, params))
            n = len(params["ids"].split(","))
            assert len(params["ids"]) <= 2000
            return {"by": "domain", "buckets": ["5"], "messages": n,
                    "total": {"total": n, "counts": [n]},
                    "rows": [{"domain": "example.org", "total": n, "counts": [n]}]}

        def iter_ndjson(self, path, params):
            self.calls.append((path, params))
            for qid in params["ids"].split(","):
                yield {"queue_id": qid}

    c = Client()
    backend = ApiBackend(c)
    got = [r["queue_id"] for r in backend.rows(Selector(ids=tuple(ids)))]
    assert got == ids
    assert [p for p, _ in c.calls] == ["/api/v1/summary"] * 3 + ["/api/v1/messages"] * 3
    c.calls.clear()
    s = backend.summary("domain", None, Selector(ids=tuple(ids)))
    assert len(c.calls) == 3
    assert s["total"] == {"total": 200, "counts": [200]} and s["messages"] == 200
    assert s["rows"] == [{"domain": "example.org", "total": 200, "counts": [200]}]
