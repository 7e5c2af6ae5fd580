"""The JSON delivery log (twisted_mailout.daemon.jsonlog): records built from
the events a real scheduler and real Loggers emit, the observer that never
raises, and the file it writes (mode, append, symlinks, rotation)."""

import io
import json
import math
import os
import random
import stat
import sys
import time

import pytest
from twisted.internet import defer, task
from twisted.logger import LogPublisher, Logger, globalLogPublisher

from tests.support.fakes import ScriptedConnector
from twisted_mailout.daemon import jsonlog
from twisted_mailout.daemon.jsonlog import (
    JSONLogFile,
    JSONRecordObserver,
    install,
    open_json_log,
    record_for,
)
from twisted_mailout.delivery.connector import Attempt
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler
from twisted_mailout.envelope import Reply
from twisted_mailout.testing.memorystore import MemoryStore

MSG = b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m1@example.com>\r\n\r\nbody\r\n"
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z

REPLIES = {
    "ok": Reply(250, "2.0.0 Ok: queued as 4F2A1"),
    "nouser": Reply(550, "5.1.1 <nouser@a.test>: Recipient address rejected"),
    "later": Reply(451, "4.7.1 greylisted, try again in 300 seconds"),
    "bare": Reply(554, "transaction failed"),  # no enhanced code from the server
}


def by_local_part(dest, rcpt):
    return REPLIES.get(rcpt.split("@")[0], REPLIES["ok"])


class NoServerConnector(ScriptedConnector):
    """Every recipient deferred with a local reply and no relay (DNS failed)."""

    def deliver(self, dest, sender, recipients, open_source, size=None, smtputf8=False,
                eightbit=False, **kw):
        self.calls.append((dest, sender, list(recipients), b""))
        reply = Reply(451, "4.4.3 cannot find the MX hosts of " + dest, local=True)
        return defer.succeed(Attempt({r: reply for r in recipients}, None))


class Run:
    """A real Scheduler over a MemoryStore and a scripted connector, with a
    JSONRecordObserver on the global log publisher (where the scheduler's
    Loggers emit) stamping records with the scheduler's clock."""

    def __init__(self, connector=None, start=T0, **kw):
        self.clock = task.Clock()
        self.clock.advance(start)
        self.store = MemoryStore(clock=self.clock.seconds)
        kw.setdefault("retry", RetryPolicy(base=300, max=4000, lifetime=3 * 3600,
                                           bounce_lifetime=3600, jitter=0))
        self.sched = Scheduler(self.store, connector or ScriptedConnector(by_local_part),
                               self.clock, reporting_mta="mx.mailout.test",
                               rng=random.Random(0), **kw)
        self.out = io.StringIO()
        self.observer = JSONRecordObserver(self.out, self.clock)

    def __enter__(self):
        globalLogPublisher.addObserver(self.observer)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.observer)

    def records(self):
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


def scheduler_log(path, steps):
    """Write a JSON log at C{path} from a real scheduler: C{steps} is a list
    of C{(seconds_to_advance, sender, recipients)}; each message is enqueued
    after the clock moved on, so its records land in that hour. Returns the
    records."""
    with Run() as run:
        run.sched.start()
        for advance, sender, rcpts in steps:
            run.clock.advance(advance)
            run.store.enqueue(sender, rcpts, MSG)
            run.sched.pickup()
        path.write_text(run.out.getvalue())
        return run.records()


# -- records from a real scheduler ------------------------------------------------


def test_outcomes_of_a_real_scheduler_become_kumomta_shaped_records():
    with Run() as run:
        qid = run.store.enqueue("sender@origin.test",
                                ["ok@a.test", "nouser@a.test", "later@b.test"], MSG)
        run.clock.advance(2.5)  # delay: seconds since arrival
        run.sched.start()
        recs = {r["recipient"]: r for r in run.records()}
    ok, nouser, later = recs["ok@a.test"], recs["nouser@a.test"], recs["later@b.test"]
    assert ok == {
        "type": "Delivery", "time": "2027-01-15T08:00:02.500000Z", "timestamp": T0 + 2.5,
        "queue_id": qid, "sender": "sender@origin.test", "recipient": "ok@a.test",
        "destination": "a.test", "relay": "mx.a.test[192.0.2.1]:25",
        "reply": {"code": 250, "enhanced_code": "2.0.0", "text": "Ok: queued as 4F2A1",
                  "local": False},
        "status": "delivered", "attempts": 1, "delay": 2.5, "tls": None}
    assert nouser["type"] == "Bounce" and nouser["status"] == "bounced"
    assert nouser["reply"] == {"code": 550, "enhanced_code": "5.1.1", "local": False,
                               "text": "<nouser@a.test>: Recipient address rejected"}
    assert later["type"] == "TransientFailure" and later["destination"] == "b.test"
    assert later["reply"]["code"] == 451 and later["reply"]["enhanced_code"] == "4.7.1"
    # the bounce report to the sender is delivered with the null sender
    dsn = recs["sender@origin.test"]
    assert dsn["type"] == "Delivery" and dsn["sender"] == "" and dsn["queue_id"] != qid
    assert len(recs) == 4 and run.observer.written == 4 and run.observer.errors == 0


def test_an_expired_recipient_is_an_expiration_record_with_its_attempts():
    with Run(ScriptedConnector(lambda d, r: REPLIES["later"])) as run:
        run.store.enqueue("s@origin.test", ["x@b.test"], MSG)
        run.sched.start()
        for _ in range(20):
            if any(r["type"] == "Expiration" for r in run.records()):
                break
            run.clock.advance(4000)
        recs = [r for r in run.records() if r["recipient"] == "x@b.test"]
    assert [r["type"] for r in recs[:-1]] == ["TransientFailure"] * (len(recs) - 1)
    last = recs[-1]
    assert last["type"] == "Expiration" and last["status"] == "expired"
    assert last["attempts"] == len(recs) and last["delay"] >= 3 * 3600
    assert [r["attempts"] for r in recs] == list(range(1, len(recs) + 1))


def test_a_reply_no_server_gave_has_no_relay_and_is_local():
    with Run(NoServerConnector(by_local_part)) as run:
        run.store.enqueue("s@origin.test", ["x@nowhere.test"], MSG)
        run.sched.start()
        [rec] = run.records()
    assert rec["relay"] is None
    assert rec["reply"] == {"code": 451, "enhanced_code": "4.4.3", "local": True,
                            "text": "cannot find the MX hosts of nowhere.test"}


def test_a_reply_without_an_enhanced_code_gets_the_derived_one_and_keeps_its_text():
    with Run() as run:
        run.store.enqueue("s@origin.test", ["bare@a.test"], MSG)
        run.sched.start()
        rec = next(r for r in run.records() if r["recipient"] == "bare@a.test")
    assert rec["reply"] == {"code": 554, "enhanced_code": "5.0.0", "text": "transaction failed",
                            "local": False}


def test_without_a_clock_a_record_is_stamped_with_the_events_log_time():
    out = io.StringIO()
    pub = LogPublisher(JSONRecordObserver(out))
    before = time.time()
    Logger(namespace="twisted_mailout.outcome", observer=pub).info(
        "x", qid="Q1", recipient="r@a.test", outcome="delivered", code=250, dsn="2.0.0",
        reply="250 2.0.0 ok", relay="none", delay=1.0, attempts=1, local=False)
    after = time.time()
    [rec] = [json.loads(x) for x in out.getvalue().splitlines()]
    assert before <= rec["timestamp"] <= after
    assert rec["time"].endswith("Z") and rec["time"].startswith(time.strftime(
        "%Y-%m-%dT", time.gmtime(rec["timestamp"])))


# -- admin actions, through a real Logger ------------------------------------------


@pytest.fixture
def admin():
    out = io.StringIO()
    clock = task.Clock()
    clock.advance(T0)
    obs = JSONRecordObserver(out, clock)
    log = Logger(namespace="twisted_mailout.admin", observer=LogPublisher(obs))
    return log, lambda: [json.loads(x) for x in out.getvalue().splitlines()], obs


def test_admin_actions_become_admin_records(admin):
    log, records, _ = admin
    log.info("{qid}: held by {source}: {reason}", action="hold", qid="Q1", reason="spam run",
             source="cli")
    log.info("{qid}: bounced", action="bounce", qid="Q2", reason="customer left",
             source="api", sender="s@origin.test", recipients=["a@x.test", "b@x.test"])
    log.info("suspended {domain}", action="suspend", qid=None, reason="blocklisted",
             source="api", domain="x.test", until=T0 + 600, duration=600.0)
    log.info("flushed {count}", action="flush", qid=None, reason=None, source="cli", count=12)
    hold, bounce, suspend, flush = records()
    assert hold == {"type": "AdminAction", "time": "2027-01-15T08:00:00.000000Z",
                    "timestamp": T0, "action": "hold", "queue_id": "Q1", "reason": "spam run",
                    "source": "cli"}
    assert bounce["type"] == "AdminBounce" and bounce["queue_id"] == "Q2"
    assert bounce["recipients"] == ["a@x.test", "b@x.test"]
    assert bounce["sender"] == "s@origin.test"
    assert suspend["type"] == "AdminAction" and suspend["queue_id"] is None
    assert (suspend["domain"], suspend["until"], suspend["duration"]) == ("x.test", T0 + 600,
                                                                          600.0)
    assert flush["count"] == 12 and flush["reason"] is None


def test_the_admin_layers_actions_are_written_as_admin_records():
    """The real QueueAdmin on a live scheduler: hold, release, bounce,
    suspend, cancel; the bounce's DSN is then an ordinary Delivery."""
    from twisted_mailout.admin import QueueAdmin, Selector

    def fired(d):
        out = []
        d.addBoth(out.append)
        assert out and not hasattr(out[0], "raiseException"), out
        return out[0]

    with Run(ScriptedConnector(lambda d, r: REPLIES["later"] if d == "b.test"
                               else REPLIES["ok"])) as run:
        admin = QueueAdmin(run.store, run.clock, scheduler=run.sched,
                           reporting_mta="mx.mailout.test", source="api")
        fired(admin.start())
        run.sched.start()
        q1 = run.store.enqueue("s@origin.test", ["x@b.test"], MSG)
        q2 = run.store.enqueue("t@origin.test", ["y@b.test"], MSG)
        run.sched.pickup()
        run.observer.out.truncate(0)
        run.observer.out.seek(0)
        fired(admin.hold(Selector(ids=(q1,)), reason="looks like spam"))
        fired(admin.release(Selector(ids=(q1,))))
        fired(admin.bounce(Selector(ids=(q2,)), reason="customer left"))
        s = fired(admin.suspend("b.test", 600, reason="blocklisted"))
        fired(admin.cancel_suspension(s["id"]))
        recs = run.records()
    admin_recs = [r for r in recs if r["type"].startswith("Admin")]
    assert [(r["type"], r["action"], r["queue_id"], r["reason"], r["source"])
            for r in admin_recs] == [
        ("AdminAction", "hold", q1, "looks like spam", "api"),
        ("AdminAction", "release", q1, "", "api"),
        ("AdminBounce", "bounce", q2, "customer left", "api"),
        ("AdminAction", "suspend", None, "blocklisted", "api"),
        ("AdminAction", "cancel-suspension", None, "", "api")]
    suspend = admin_recs[3]
    assert suspend["domain"] == "b.test" and suspend["suspension"] == s["id"]
    assert suspend["until"] == pytest.approx(T0 + 600)
    # the admin bounce's report reached the sender: an ordinary outcome record
    assert any(r["type"] == "Delivery" and r["recipient"] == "t@origin.test"
               and r["sender"] == "" for r in recs)


def test_an_admin_event_without_an_action_and_fields_not_named_are_left_out(admin):
    log, records, obs = admin
    log.info("admin API listening on {endpoint}", endpoint="unix:/q/admin.sock")
    log.info("{qid} released", action="release", qid="Q3", reason="", source="api",
             secret_token="abc")
    [rec] = records()
    assert rec["action"] == "release" and "secret_token" not in rec and "log_format" not in rec
    assert obs.written == 1


def test_other_namespaces_are_ignored():
    out = io.StringIO()
    pub = LogPublisher(JSONRecordObserver(out))
    for ns in ("twisted_mailout.delivery.scheduler", "twisted_mailout.tlsrpt",
               "twisted_mailout.mtasts", "twisted_mailout.admin.api", "twisted_mailout",
               "twisted_mailout.outcomes"):
        Logger(namespace=ns, observer=pub).info("x", action="hold", qid="Q", outcome="bounced",
                                               recipient="r@a.test")
    pub({"log_format": "no namespace at all"})
    Logger(namespace="twisted_mailout.outcome", observer=pub).info("not an outcome")
    assert out.getvalue() == ""


# -- never raise, never write a broken line ----------------------------------------------


class FlakySink:
    def __init__(self):
        self.lines = []
        self.fail = True

    def write(self, data):
        if self.fail:
            raise OSError(28, "No space left on device")
        self.lines.append(data)

    def flush(self):
        pass


def _outcome(log, rcpt):
    log.info("x", qid="Q1", recipient=rcpt, outcome="deferred", code=451, dsn="4.3.0",
             reply="451 4.3.0 later", relay="none", delay=1.0, attempts=1, local=False)


def test_a_failing_write_never_raises_is_counted_and_logged_once_and_writing_resumes():
    sink = FlakySink()
    obs = JSONRecordObserver(sink)
    failures = []

    def watch(event):
        if event.get("log_namespace") == "twisted_mailout.daemon.jsonlog":
            failures.append(event)

    globalLogPublisher.addObserver(watch)
    try:
        pub = LogPublisher(obs)
        log = Logger(namespace="twisted_mailout.outcome", observer=pub)
        for i in range(2):
            _outcome(log, f"r{i}@a.test")
        obs({"log_namespace": "twisted_mailout.outcome", "outcome": "bounced"})  # no raise
        assert (obs.errors, obs.written, sink.lines) == (3, 0, [])
        assert len(failures) == 1 and failures[0]["log_failure"].check(OSError)
        sink.fail = False
        _outcome(log, "r3@a.test")
        sink.fail = True
        _outcome(log, "r4@a.test")  # a new run of failures is logged again
    finally:
        globalLogPublisher.removeObserver(watch)
    assert [json.loads(x)["recipient"] for x in sink.lines] == ["r3@a.test"]
    assert (obs.errors, obs.written, len(failures)) == (4, 1, 2)


def test_odd_field_values_still_give_one_valid_json_line():
    out = io.StringIO()
    obs = JSONRecordObserver(out)

    class TLSInfo:
        def __str__(self):
            return "TLSv1.3 TLS_AES_256_GCM_SHA384"

    base = {"log_namespace": "twisted_mailout.outcome", "log_time": T0, "qid": "Q1",
            "outcome": "delivered", "code": 250, "dsn": "2.0.0", "relay": "none",
            "attempts": 1, "local": False}
    obs(dict(base, recipient="jörg@bücher.test", reply="250 2.0.0 ok\nsecond",
             delay=math.nan, tls=TLSInfo()))
    obs(dict(base, recipient="bad\udcffbyte@a.test", reply=None, delay=math.inf,
             tls={"version": "TLSv1.2", "bits": (128,)}))
    obs(dict(base, recipient="r@a.test", code="250", attempts=True, delay="3"))
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 4
    for line in lines[:-1]:
        line.encode("utf-8")  # always valid UTF-8
    first, second, third = (json.loads(x) for x in lines[:-1])
    assert "jörg@bücher.test" in lines[0]  # UTF-8 as is, greppable
    assert first["delay"] is None and first["tls"] == "TLSv1.3 TLS_AES_256_GCM_SHA384"
    assert first["reply"]["text"] == "ok\nsecond"
    assert second["recipient"] == "bad\udcffbyte@a.test" and second["delay"] is None
    assert second["tls"] == {"version": "TLSv1.2", "bits": [128]}
    assert second["reply"]["text"] == ""
    assert (third["reply"]["code"], third["attempts"], third["delay"]) == (None, None, None)
    assert obs.errors == 0


def test_record_for_is_none_for_what_gets_no_record():
    assert record_for({"log_namespace": "twisted_mailout.outcome", "outcome": "maybe"}) is None
    assert record_for({"log_namespace": "twisted_mailout.admin", "action": ""}) is None
    assert record_for({"log_namespace": "elsewhere", "outcome": "delivered"}) is None
    rec = record_for({"log_namespace": "twisted_mailout.outcome", "outcome": "sent"}, T0)
    assert rec["type"] == "Delivery" and rec["timestamp"] == T0  # Postfix's word accepted
    assert set(jsonlog.TYPE_OF_STATUS.values()) == jsonlog.OUTCOME_TYPES


# -- the file ----------------------------------------------------------------------------


@pytest.fixture
def umask0():
    old = os.umask(0)
    yield
    os.umask(old)


def test_the_file_is_created_0600_whatever_the_umask_and_appended_to(tmp_path, umask0):
    path = tmp_path / "mailout.json"
    f = JSONLogFile(path)
    f.write('{"a":1}\n')
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.fstat(f._file.fileno()).st_size == 8
    assert f._file.mode == "ab"
    f.close()
    g = JSONLogFile(path)
    g.write('{"b":2}\n')
    g.close()
    assert path.read_text() == '{"a":1}\n{"b":2}\n'


def test_an_existing_file_keeps_its_mode_and_so_do_its_rotated_successors(tmp_path, umask0):
    path = tmp_path / "mailout.json"
    path.write_text("")
    os.chmod(path, 0o640)
    f = JSONLogFile(path, rotate_length=10)
    f.write("x" * 11 + "\n")
    f.write("y\n")  # rotates first
    f.close()
    assert (tmp_path / "mailout.json.1").read_text() == "x" * 11 + "\n"
    assert path.read_text() == "y\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_symlink_at_the_path_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    (tmp_path / "mailout.json").symlink_to(target)
    with pytest.raises(OSError):
        JSONLogFile(tmp_path / "mailout.json")
    assert target.read_text() == "precious\n"


def test_rotation_by_size_keeps_whole_lines_and_the_newest_files(tmp_path):
    path = tmp_path / "mailout.json"
    obs = JSONRecordObserver(open_json_log(path, rotate_length=2000, max_rotated_files=3))
    pub = LogPublisher(obs)
    log = Logger(namespace="twisted_mailout.outcome", observer=pub)
    for i in range(100):
        _outcome(log, f"r{i}@a.test")
    obs.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["mailout.json", "mailout.json.1", "mailout.json.2", "mailout.json.3"]
    kept = []
    for name in ("mailout.json.3", "mailout.json.2", "mailout.json.1", "mailout.json"):
        data = (tmp_path / name).read_text()
        assert data.endswith("\n") and (name == "mailout.json" or len(data) >= 2000)
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
        kept += [json.loads(x)["recipient"] for x in data.splitlines()]
    # the newest records, in order, none split or lost within what is kept
    assert kept == [f"r{i}@a.test" for i in range(100 - len(kept), 100)]
    assert obs.written == 100 and obs.errors == 0


def test_a_device_is_written_but_never_rotated(tmp_path):
    f = JSONLogFile(os.devnull, rotate_length=1)
    f.write("abc\n")
    f.write("abc\n")
    assert not f.shouldRotate()
    f.close()


def test_after_close_records_are_counted_as_errors(tmp_path):
    obs = JSONRecordObserver(tmp_path / "j.log")
    obs.close()
    _outcome(Logger(namespace="twisted_mailout.outcome", observer=LogPublisher(obs)),
             "r@a.test")
    assert (obs.written, obs.errors) == (0, 1)


def test_install_adds_the_observer_and_dash_is_standard_output(tmp_path):
    pub = LogPublisher()
    obs = install(tmp_path / "j.log", publisher=pub)
    _outcome(Logger(namespace="twisted_mailout.outcome", observer=pub), "r@a.test")
    obs.close()
    [rec] = [json.loads(x) for x in (tmp_path / "j.log").read_text().splitlines()]
    assert rec["recipient"] == "r@a.test"
    assert open_json_log("-") is sys.stdout
    with pytest.raises(OSError):
        install(tmp_path / "missing" / "j.log", publisher=pub)
