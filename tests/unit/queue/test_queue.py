"""The queue folder: durable enqueue, pickup of our own and foreign formats,
corrupt files, the daemon lock, recovery."""

import json
import os
import subprocess
import sys
from email.header import Header
from email.message import Message

import pytest

import twisted_mailout
from twisted_mailout.envelope import AddressError, RecipientState, Reply
from twisted_mailout.message import MessageError
from twisted_mailout.queue.store import Queue, QueueError, QueueLocked

MSG = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n"


def files(path, sub):
    return sorted(os.listdir(os.path.join(path, sub)))


def test_enqueue_writes_one_file_in_new_and_returns_its_id(tmp_path):
    q = str(tmp_path / "q")
    qid = twisted_mailout.enqueue(q, "a@example.com", ["b@example.org"], MSG)
    assert files(q, "new") == [qid]
    assert files(q, "tmp") == []
    data = open(os.path.join(q, "new", qid), "rb").read()
    first, rest = data.split(b"\n", 1)
    env = json.loads(first.split(b": ", 1)[1])
    assert env["sender"] == "a@example.com"
    assert env["recipients"] == ["b@example.org"]
    assert rest.endswith(MSG)  # the message bytes travel unchanged
    assert b"Message-ID: <" in rest and b"\r\nDate: " in rest
    assert oct(os.stat(q).st_mode & 0o777) == "0o700"
    assert oct(os.stat(os.path.join(q, "new", qid)).st_mode & 0o777) == "0o600"


def test_enqueue_keeps_existing_message_id_and_date(tmp_path):
    msg = b"Message-ID: <x@y>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n\nhi\n"
    q = Queue(str(tmp_path))
    qid = q.enqueue("a@example.com", ["b@example.org"], msg)
    assert open(os.path.join(q.path, "new", qid), "rb").read().split(b"\n", 1)[1] == msg


def test_enqueue_accepts_str_and_email_message(tmp_path):
    m = Message()
    m["Subject"] = "hi"
    m.set_payload("text\n")
    q = Queue(str(tmp_path))
    q.enqueue("a@example.com", "b@example.org", m)
    q.enqueue(None, ["b@example.org"], "Subject: x\n\nstr body\n")
    assert len(files(q.path, "new")) == 2


@pytest.mark.parametrize("sender,rcpts,msg,exc", [
    ("a@example.com", [], MSG, AddressError),
    ("a@example.com", ["b@example.org\r\nRCPT TO:<evil@x.test>"], MSG, AddressError),
    ("a@exa\nmple.com", ["b@example.org"], MSG, AddressError),
    ("a@example.com", ["no-at-sign"], MSG, AddressError),
    ("a@example.com", ["b@@example.org"], MSG, AddressError),
    ("a@example.com", ["b@localhost"], MSG, AddressError),
    ("a@example.com", ["a b@example.org"], MSG, AddressError),
    ("a@example.com", ["b@example.org"], b"", MessageError),
    ("a@example.com", ["b@example.org"], b"  \r\n", MessageError),
])
def test_bad_input_raises_and_leaves_nothing(tmp_path, sender, rcpts, msg, exc):
    q = str(tmp_path / "q")
    with pytest.raises(exc):
        twisted_mailout.enqueue(q, sender, rcpts, msg)
    for sub in ("tmp", "new", "messages", "state"):
        assert not os.path.exists(os.path.join(q, sub)) or files(q, sub) == []


def test_unwritable_queue_folder_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        target = str(blocker / "q")
    else:
        os.chmod(tmp_path, 0o500)
        target = str(tmp_path / "q")
    with pytest.raises(QueueError, match="cannot"):
        twisted_mailout.enqueue(target, "a@example.com", ["b@example.org"], MSG)


def test_pickup_moves_own_file_and_writes_state(tmp_path):
    q = Queue(str(tmp_path))
    qid = q.enqueue("a@example.com", ["b@example.org", "c@example.org"], MSG)
    assert q.incoming() == [f"new/{qid}"]
    [entry], problems = q.pickup()
    assert entry.qid == qid and problems == []
    assert entry.size == len(q.read_message(entry))
    assert [r.address for r in entry.recipients] == ["b@example.org", "c@example.org"]
    assert all(r.state is RecipientState.PENDING for r in entry.recipients)
    assert files(q.path, "new") == []
    assert files(q.path, "messages") == [qid]
    assert q.read_message(entry).endswith(MSG)
    assert q.load(qid).to_json() == entry.to_json()


def test_state_changes_survive_reload(tmp_path):
    q = Queue(str(tmp_path))
    q.enqueue("a@example.com", ["b@example.org", "c@example.org"], MSG)
    [entry], _ = q.pickup()
    entry.recipients[0].attempts = 1
    entry.recipients[0].move(RecipientState.DELIVERED, Reply(250, "2.0.0 ok"))
    entry.recipients[1].attempts = 1
    entry.recipients[1].move(RecipientState.DEFERRED, Reply(451, "4.3.0 later"), 1234.5)
    q.save(entry)
    again = q.load(entry.qid)
    assert again.recipients[0].state is RecipientState.DELIVERED
    assert again.recipients[1].next_attempt == 1234.5
    assert again.recipients[1].reply == Reply(451, "4.3.0 later")
    assert not again.done
    assert files(q.path, "state") == [entry.qid + ".json"]  # no tmp files left


def test_zope_sendmail_file_is_picked_up_without_envelope_lines(tmp_path):
    q = Queue(str(tmp_path))
    body = b"From: a@example.com\nSubject: zope\n\nHello from Zope\n"
    # zope.sendmail's QueuedMailDelivery writes exactly these two lines first.
    data = b"X-Zope-From: a@example.com\nX-Zope-To: b@example.org, c@example.org\n" + body
    with open(os.path.join(q.path, "new", "1700000000.M1P2Q3.host"), "wb") as f:
        f.write(data)
    [entry], _ = q.pickup()
    assert entry.origin == "zope"
    assert entry.sender == "a@example.com"
    assert [r.address for r in entry.recipients] == ["b@example.org", "c@example.org"]
    assert q.read_message(entry) == body
    assert files(q.path, "new") == []
    assert q.load(entry.qid).origin == "zope"  # kept when reloaded (no state file yet)


def test_repoze_sendmail_file_is_picked_up_without_envelope_headers(tmp_path):
    # repoze.sendmail / pyramid_mailer add these as (RFC 2047 encoded) headers.
    m = Message()
    m["From"] = "a@example.com"
    m["Subject"] = "pyramid"
    m.set_payload("Hello from Pyramid\n")
    original = m.as_bytes()
    m["X-Actually-From"] = Header("a@example.com", "utf-8")
    m["X-Actually-To"] = Header(",".join(["b@example.org", "c@example.org"]), "utf-8")
    q = Queue(str(tmp_path))
    with open(os.path.join(q.path, "new", "1700000001.M1P2Q3.host"), "wb") as f:
        f.write(m.as_bytes())
    [entry], _ = q.pickup()
    assert entry.origin == "repoze"
    assert entry.sender == "a@example.com"
    assert [r.address for r in entry.recipients] == ["b@example.org", "c@example.org"]
    assert q.read_message(entry) == original


@pytest.mark.parametrize("content", [
    b"just some text without any envelope\n",
    b'X-Mailout-Envelope: {"v":1,"sender":"a@example.com"\n',
    b'X-Mailout-Envelope: {"v":1,"sender":"a@example.com","recipients":["bad"]}\nx\n',
    b"X-Zope-From: a@example.com\nX-Zope-To: \nbody\n",
    b"\xff\xfe\x00garbage",
])
def test_unparseable_file_goes_to_corrupt_and_rest_continue(tmp_path, content):
    q = Queue(str(tmp_path))
    with open(os.path.join(q.path, "new", "0bad"), "wb") as f:
        f.write(content)
    good = q.enqueue("a@example.com", ["b@example.org"], MSG)
    entries, problems = q.pickup()
    assert [e.qid for e in entries] == [good]
    assert [p.split(":")[0] for p in problems] == ["new/0bad"]
    assert "0bad" in files(q.path, "corrupt")
    assert open(os.path.join(q.path, "corrupt", "0bad"), "rb").read() == content


def test_only_one_daemon_per_queue_folder(tmp_path):
    q1 = Queue(str(tmp_path))
    q1.lock()
    q2 = Queue(str(tmp_path))
    with pytest.raises(QueueLocked, match="already running"):
        q2.lock()
    # Another process is refused too.
    code = ("import sys; from twisted_mailout.queue.store import Queue, QueueLocked\n"
            "try:\n Queue(sys.argv[1]).lock()\nexcept QueueLocked: sys.exit(3)\n")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 3
    q1.unlock()
    q2.lock()
    q2.unlock()


def test_recovery_repairs_interrupted_steps(tmp_path):
    q = Queue(str(tmp_path))
    # 1. enqueue died before its rename: a leftover in tmp/ was never acknowledged.
    with open(os.path.join(q.path, "tmp", ".partial"), "wb") as f:
        f.write(b"half")
    # 2. removal died between unlinking the message and its state.
    done = q.enqueue("a@example.com", ["b@example.org"], MSG)
    q.pickup()
    entry = q.load(done)
    entry.recipients[0].move(RecipientState.DELIVERED, Reply(250, "ok"))
    q.save(entry)
    os.unlink(os.path.join(q.path, "messages", done))
    # 3. a state write died before its rename.
    with open(os.path.join(q.path, "state", "X.json.tmp"), "wb") as f:
        f.write(b"{")
    # 4. a corrupt state file.
    bad = q.enqueue("a@example.com", ["c@example.org"], MSG)
    q.pickup()
    with open(os.path.join(q.path, "state", bad + ".json"), "wb") as f:
        f.write(b"not json")
    # 5. a picked-up message whose first attempt never finished: no state yet.
    fresh = q.enqueue("a@example.com", ["d@example.org", "e@example.org"], MSG)
    q.pickup()
    due, problems, _ = q.recover()
    assert due == [(fresh, None)]  # no state: pending, due at once
    assert [r.state for r in q.load(fresh).recipients] == [RecipientState.PENDING] * 2
    assert len(problems) == 4, problems
    assert files(q.path, "tmp") == []
    assert files(q.path, "state") == []
    assert bad in files(q.path, "corrupt") and bad + ".json" in files(q.path, "corrupt")
    assert files(q.path, "messages") == [fresh]


def test_a_picked_up_message_is_pending_until_its_first_outcome(tmp_path):
    q = Queue(str(tmp_path))
    qid = q.enqueue("a@example.com", ["b@example.org"], MSG)
    entries, problems = q.pickup()
    assert [e.qid for e in entries] == [qid] and problems == []
    assert files(q.path, "state") == []  # nothing to write: the envelope line says it all
    again = q.load(qid)
    assert again.recipients[0].state is RecipientState.PENDING
    assert [(x.entry.qid, x.where) for x in q.list_entries()] == [(qid, "active")]


def test_rewritten_pickup_interrupted_before_removing_its_source(tmp_path):
    q = Queue(str(tmp_path))
    data = b"X-Zope-From: a@example.com\nX-Zope-To: b@example.org\n\nbody\n"
    for _ in range(2):  # the second copy stands for the source left behind
        with open(os.path.join(q.path, "new", "1.M2P3.host"), "wb") as f:
            f.write(data)
        entries, _ = q.pickup()
    assert files(q.path, "new") == []
    assert len(files(q.path, "messages")) == 1
    assert entries == []  # the repeat found the message already there


def test_remove_deletes_message_then_state(tmp_path):
    q = Queue(str(tmp_path))
    qid = q.enqueue("a@example.com", ["b@example.org"], MSG)
    q.pickup()
    q.remove(qid)
    assert files(q.path, "messages") == [] and files(q.path, "state") == []


# -- batches and two-phase enqueue ---------------------------------------------


def test_enqueue_many_publishes_every_item_in_order_and_the_daemon_picks_them_up(tmp_path):
    q = str(tmp_path / "q")
    items = [("a@example.com", [f"r{i}@example.org"], MSG) for i in range(20)]
    qids = twisted_mailout.enqueue_many(q, items)
    assert len(set(qids)) == 20 and files(q, "new") == sorted(qids)
    assert files(q, "tmp") == []
    entries, problems = Queue(q).pickup()
    assert problems == []
    assert sorted(e.recipients[0].address for e in entries) == sorted(
        f"r{i}@example.org" for i in range(20))


def test_enqueue_many_is_all_or_nothing_when_one_item_is_bad(tmp_path):
    q = str(tmp_path / "q")
    items = [("a@example.com", ["ok@example.org"], MSG), ("a@example.com", ["no at sign"], MSG)]
    with pytest.raises(AddressError, match="item 1"):
        twisted_mailout.enqueue_many(q, items)
    with pytest.raises(MessageError, match="item 0"):
        twisted_mailout.enqueue_many(q, [("a@example.com", ["b@example.org"], b"")])
    with pytest.raises(TypeError, match="item 0"):
        twisted_mailout.enqueue_many(q, [("a@example.com", ["b@example.org"])])
    assert files(q, "new") == [] and files(q, "tmp") == []


def test_enqueue_many_leaves_nothing_when_the_disk_write_fails(tmp_path, monkeypatch):
    import twisted_mailout.queue.store as qmod

    q = str(tmp_path / "q")
    calls = []
    real = qmod.write_durably

    def failing(path, data, sync=True):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(path, data, sync)

    monkeypatch.setattr(qmod, "write_durably", failing)
    with pytest.raises(QueueError, match="No space left"):
        twisted_mailout.enqueue_many(q, [("a@example.com", ["b@example.org"], MSG)] * 5)
    assert files(q, "new") == [] and files(q, "tmp") == []


def test_staged_message_is_invisible_until_published_and_gone_when_discarded(tmp_path):
    queue = Queue(str(tmp_path / "q"))
    kept = queue.stage("a@example.com", ["b@example.org"], MSG)
    dropped = queue.stage("a@example.com", ["c@example.org"], MSG)
    assert files(queue.path, "new") == [] and queue.pickup()[0] == []
    assert sorted(files(queue.path, "tmp")) == sorted([kept.qid, dropped.qid])
    queue.discard([dropped])
    assert queue.publish([kept]) == [kept.qid]
    assert files(queue.path, "new") == [kept.qid] and files(queue.path, "tmp") == []


def test_a_failed_quarantine_is_logged_and_the_file_stays(tmp_path, monkeypatch):
    """(Review F14: the failure used to be swallowed without a trace.)"""
    from twisted.logger import formatEvent, globalLogPublisher

    q = Queue(str(tmp_path))
    with open(os.path.join(q.path, "new", "0bad"), "wb") as f:
        f.write(b"no envelope at all\n")
    real_rename = os.rename

    def rename(src, dst):
        if os.sep + "corrupt" + os.sep in dst:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        monkeypatch.setattr(os, "rename", rename)
        entries, problems = q.pickup()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert entries == [] and len(problems) == 1
    [line] = [formatEvent(e) for e in events if e.get("log_level").name == "error"]
    assert "cannot move" in line and "0bad" in line and "Input/output error" in line
    assert files(q.path, "new") == ["0bad"] and files(q.path, "corrupt") == []


def test_bulk_save_replaces_every_state_with_one_sync(tmp_path, monkeypatch):
    """An operator's action on many messages saves them in one batch: every
    state is replaced, through one syncfs(2), and no temporary file stays."""
    import twisted_mailout.queue.store as store_mod

    q = Queue(str(tmp_path / "q"))
    ids = [q.enqueue("a@example.com", [f"r{i}@example.org"], b"Subject: s\r\n\r\nb\r\n")
           for i in range(Queue.BULK_SYNC + 4)]
    q.pickup()
    syncs = []
    real = store_mod.syncfs
    monkeypatch.setattr(store_mod, "syncfs", lambda p: syncs.append(p) or real(p))
    entries = [q.load(i) for i in ids]
    for e in entries:
        e.hold(1000.0)
    q.save_many(entries)
    assert len(syncs) == 1
    assert all(q.load(i).held for i in ids)
    assert not [n for n in os.listdir(tmp_path / "q" / "state") if n.endswith(".tmp")]
