"""`mailout report` (twisted_mailout.daemon.report): summaries of JSON logs
written by the real observer from a real scheduler's events, masking of
reply texts, --since, rotated and compressed inputs, malformed lines and the
exit codes."""

import argparse
import bz2
import gzip
import io
import json
import lzma
import random

import pytest
from twisted.internet import task
from twisted.logger import LogPublisher, Logger

from tests.unit.daemon.test_jsonlog import T0, scheduler_log
from twisted_mailout.daemon import report
from twisted_mailout.daemon.jsonlog import JSONRecordObserver
from twisted_mailout.daemon.report import EX_NOINPUT, EX_USAGE, mask

H = 3600


def args(*logfiles, since=None, top=10, as_json=False):
    return argparse.Namespace(logfiles=list(logfiles), since=since, top=top, json=as_json)


def run_report(*logfiles, now=None, stdin=None, **kw):
    out, err = io.StringIO(), io.StringIO()
    code = report.main(args(*logfiles, **kw), now=now, stdin=stdin, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*logfiles, **kw):
    code, out, err = run_report(*logfiles, as_json=True, **kw)
    assert code == 0, err
    return json.loads(out), err


#: Three messages over three hours, with a queue lifetime of 3 h (Run):
#: 08:00 ok@a.test delivered, nouser@a.test bounced (a DSN to the sender,
#: delivered), later@b.test deferred; 09:01 later@b.test deferred again and
#: ok@c.test delivered; nothing at 10:xx; 11:01 later@b.test expired (a DSN,
#: delivered) and bare@a.test bounced (a DSN, delivered).
STEPS = [
    (0, "s@origin.test", ["ok@a.test", "nouser@a.test", "later@b.test"]),
    (3700, "t@origin.test", ["ok@c.test"]),
    (2 * H, "u@origin.test", ["bare@a.test"]),
]


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "mailout.json"
    records = scheduler_log(path, STEPS)
    return path, records


def test_totals_hours_destinations_and_reasons_of_a_real_log(log):
    path, records = log
    assert [(r["time"][11:16], r["type"], r["recipient"]) for r in records] == [
        ("08:00", "Delivery", "ok@a.test"), ("08:00", "Bounce", "nouser@a.test"),
        ("08:00", "TransientFailure", "later@b.test"), ("08:00", "Delivery", "s@origin.test"),
        ("09:01", "TransientFailure", "later@b.test"), ("09:01", "Delivery", "ok@c.test"),
        ("11:01", "Expiration", "later@b.test"), ("11:01", "Delivery", "s@origin.test"),
        ("11:01", "Bounce", "bare@a.test"), ("11:01", "Delivery", "u@origin.test")]
    doc, err = run_json(str(path))
    assert err == "" and doc["records"] == 10 and doc["malformed"] == 0
    assert doc["totals"] == {
        "delivered": {"messages": 5, "recipients": 5},  # 2 messages and 3 DSNs
        "deferred": {"messages": 1, "recipients": 1, "deferrals": 2},
        "bounced": {"messages": 2, "recipients": 2},
        "expired": {"messages": 1, "recipients": 1},
        "admin_actions": {"events": 0, "messages": 0}}
    # every hour from the first record's to the last one's, the quiet one too
    assert [(h["hour"], h["delivered"], h["deferred"], h["bounced"], h["expired"], h["admin"])
            for h in doc["hours"]] == [
        ("2027-01-15T08:00:00Z", 2, 1, 1, 0, 0), ("2027-01-15T09:00:00Z", 1, 1, 0, 0, 0),
        ("2027-01-15T10:00:00Z", 0, 0, 0, 0, 0), ("2027-01-15T11:00:00Z", 2, 0, 1, 1, 0)]
    assert doc["hours"][0]["timestamp"] == 1_800_000_000
    assert [(d["destination"], d["total"], d["delivered"], d["deferred"], d["bounced"],
             d["expired"]) for d in doc["destinations"]] == [
        ("a.test", 3, 1, 0, 2, 0), ("b.test", 3, 0, 2, 0, 1), ("origin.test", 3, 3, 0, 0, 0),
        ("c.test", 1, 1, 0, 0, 0)]
    b = doc["destinations"][1]
    assert (b["average_delay"], b["max_delay"]) == (None, None)  # nothing delivered there
    assert doc["bounce_reasons"] == [
        {"count": 1, "code": 451, "enhanced_code": "4.7.1",
         "text": "greylisted, try again in {n} seconds (delivery time expired after {n}.{n} "
                 "days)",
         "example": "greylisted, try again in 300 seconds (delivery time expired after 0.1 "
                    "days)"},
        {"count": 1, "code": 550, "enhanced_code": "5.1.1",
         "text": "<{addr}>: Recipient address rejected",
         "example": "<nouser@a.test>: Recipient address rejected"},
        {"count": 1, "code": 554, "enhanced_code": "5.0.0", "text": "transaction failed",
         "example": "transaction failed"}]
    assert doc["deferral_reasons"] == [
        {"count": 2, "code": 451, "enhanced_code": "4.7.1",
         "text": "greylisted, try again in {n} seconds",
         "example": "greylisted, try again in 300 seconds"}]


def test_the_text_report_has_pflogsumms_sections(log):
    path, records = log
    code, out, err = run_report(str(path), top=2)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "mailout report: 10 records, 2027-01-15T08:00:00Z to 2027-01-15T11:01:40Z"
    for heading in ("Grand totals", "Per-hour traffic (UTC)", "Top 2 destinations by volume",
                    "Top 2 deferral reasons", "Top 2 bounce reasons"):
        assert heading in lines
    delivered = next(x for x in lines if x.startswith("  delivered"))
    assert delivered.split() == ["delivered", "5", "5"]
    deferred = next(x for x in lines if x.startswith("  deferred"))
    assert deferred.split() == ["deferred", "1", "1", "(2", "deferrals)"]
    assert "2027-01-15 10:00" in out  # the quiet hour is a row of zeros
    assert next(x for x in lines if "2027-01-15 10:00" in x).split()[2:] == ["0"] * 5
    dest_rows = lines[lines.index("Top 2 destinations by volume") + 3:][:2]
    assert [r.split() for r in dest_rows] == [  # 2 of 4 kept
        ["3", "1", "0", "2", "0", "0.0", "s", "0.0", "s", "a.test"],
        ["3", "0", "2", "0", "1", "-", "-", "b.test"]]
    assert "         1  550 5.1.1 <{addr}>: Recipient address rejected" in lines
    assert "         2  451 4.7.1 greylisted, try again in {n} seconds" in lines
    assert "Admin actions" not in lines


def test_admin_actions_are_counted_by_action(tmp_path):
    out = io.StringIO()
    clock = task.Clock()
    clock.advance(T0)
    log = Logger(namespace="twisted_mailout.admin", observer=LogPublisher(
        JSONRecordObserver(out, clock)))
    for qid in ("Q1", "Q2", "Q3"):
        log.info("hold", action="hold", qid=qid, reason="spam", source="cli")
    log.info("bounce", action="bounce", qid="Q1", reason="gone", source="api")
    log.info("flush", action="flush", qid=None, reason=None, source="cli", count=40)
    log.info("suspend", action="suspend", qid=None, reason="blocked", source="api",
             domain="x.test")
    path = tmp_path / "admin.json"
    path.write_text(out.getvalue())
    doc, _ = run_json(str(path))
    assert doc["totals"]["admin_actions"] == {"events": 6, "messages": 44}
    assert doc["admin_actions"] == [
        {"action": "hold", "events": 3, "messages": 3},
        {"action": "bounce", "events": 1, "messages": 1},
        {"action": "flush", "events": 1, "messages": 40},
        {"action": "suspend", "events": 1, "messages": 0}]
    assert doc["hours"][0]["admin"] == 6 and doc["bounce_reasons"] == []
    code, text, _ = run_report(str(path))
    assert "Admin actions" in text.splitlines()
    assert any(x.split() == ["flush", "1", "40"] for x in text.splitlines())


# -- masking -----------------------------------------------------------------------


@pytest.mark.parametrize("text, masked", [
    ("try again in 300 seconds", "try again in {n} seconds"),
    ("<bob@example.org>: Recipient address rejected: User unknown",
     "<{addr}>: Recipient address rejected: User unknown"),
    ("mailbox for jörg.o-neil+tag@bücher.example is full", "mailbox for {addr} is full"),
    ("[192.0.2.17] blocked using zen.spamhaus.org", "[{ip}] blocked using zen.spamhaus.org"),
    ("connect to mx.example.org[2001:db8::25]:25: Connection refused",
     "connect to mx.example.org[{ip}]:{n}: Connection refused"),
    ("Service unavailable; Client host [2001:db8:0:0:0:0:0:1] blocked",
     "Service unavailable; Client host [{ip}] blocked"),
    ("OK id=1rB7xY-0003Ab-Qz queued as 8a5475ccbbc611eda12250ebf67f93bd",
     "OK id={id} queued as {id}"),
    ("d2e1a72fcca58-6b26b7a88f0si12345pfb.123 - gsmtp", "{id}.{n} - gsmtp"),
    ("at 12:30:45   please\n   retry", "at {n}:{n}:{n} please retry"),  # not an address
    ("TLSv1.3 required by mx1.example.org", "TLSv{n}.{n} required by mx{n}.example.org"),
    ("Version 1.2.3.4.5 is old", "Version {n}.{n}.{n}.{n}.{n} is old"),  # not an IP
])
def test_mask(text, masked):
    assert mask(text) == masked


def test_mask_cuts_long_texts():
    assert len(mask("word " * 500)) == 200


def test_similar_replies_group_and_different_codes_do_not(tmp_path):
    recs = []
    for i, (code, enh, text) in enumerate([
            (450, "4.2.0", "<a1@x.test>: Recipient address rejected: Greylisted for 300 s"),
            (450, "4.2.0", "<zz9@y.test>: Recipient address rejected: Greylisted for 60 s"),
            (450, "4.2.0", "<q@x.test>: Recipient address rejected: Greylisted for 5 s"),
            (451, "4.2.0", "<q@x.test>: Recipient address rejected: Greylisted for 5 s"),
            (450, "4.7.1", "<q@x.test>: Recipient address rejected: Greylisted for 5 s")]):
        recs.append({"type": "TransientFailure", "timestamp": T0 + i, "queue_id": f"Q{i}",
                     "recipient": f"r{i}@x.test", "destination": "x.test",
                     "reply": {"code": code, "enhanced_code": enh, "text": text}})
    path = tmp_path / "j.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    doc, _ = run_json(str(path))
    assert [(r["count"], r["code"], r["enhanced_code"]) for r in doc["deferral_reasons"]] == [
        (3, 450, "4.2.0"), (1, 450, "4.7.1"), (1, 451, "4.2.0")]
    assert doc["deferral_reasons"][0]["text"] == (
        "<{addr}>: Recipient address rejected: Greylisted for {n} s")
    assert doc["deferral_reasons"][0]["example"] == recs[0]["reply"]["text"]
    assert doc["totals"]["deferred"] == {"messages": 5, "recipients": 5, "deferrals": 5}


# -- --since, inputs ------------------------------------------------------------------


def test_since_counts_only_the_last_hours(log):
    path, records = log
    last = max(r["timestamp"] for r in records)
    doc, _ = run_json(str(path), since=1.5, now=last + 60)
    window = [r for r in records if r["timestamp"] >= last + 60 - 1.5 * H]
    assert 0 < len(window) < len(records)
    assert doc["records"] == len(window)
    assert doc["outside_window"] == len(records) - len(window)
    assert doc["window"]["since"] == last + 60 - 1.5 * H
    assert doc["totals"]["bounced"]["recipients"] == sum(
        1 for r in window if r["type"] == "Bounce")
    code, text, _ = run_report(str(path), since=1.5, now=last + 60)
    assert text.splitlines()[0] == ("mailout report: 4 records, 2027-01-15T11:01:40Z to "
                                    "2027-01-15T11:01:40Z (since 2027-01-15T09:32:40Z)")


def test_rotated_and_compressed_files_together_give_the_whole_logs_summary(log, tmp_path):
    path, _ = log
    whole, _ = run_json(str(path))
    lines = path.read_bytes().splitlines(keepends=True)
    parts = [lines[:3], lines[3:5], lines[5:7], lines[7:9], lines[9:]]
    (tmp_path / "m.json.4.xz").write_bytes(lzma.compress(b"".join(parts[0])))
    (tmp_path / "m.json.3.bz2").write_bytes(bz2.compress(b"".join(parts[1])))
    (tmp_path / "m.json.2.gz").write_bytes(gzip.compress(b"".join(parts[2])))
    (tmp_path / "m.json.1").write_bytes(b"".join(parts[3]))
    stdin = io.BytesIO(gzip.compress(b"".join(parts[4])))  # a .gz piped in
    names = [str(tmp_path / n) for n in ("m.json.1", "m.json.2.gz", "m.json.4.xz",
                                         "m.json.3.bz2")] + ["-"]
    doc, err = run_json(*names, stdin=stdin)
    assert doc == whole and err == ""


def test_a_large_log_is_streamed_never_read_whole():
    class Lazy(io.RawIOBase):
        """Makes 30000 records on demand; refuses to be read whole."""

        def __init__(self):
            self.i = 0
            self.buf = b""
            self.biggest = 0

        def readable(self):
            return True

        def readall(self):
            raise AssertionError("the whole input was asked for")

        def readinto(self, b):
            self.biggest = max(self.biggest, len(b))
            while len(self.buf) < len(b) and self.i < 30000:
                self.buf += json.dumps({"type": "Delivery", "timestamp": T0 + self.i,
                                        "queue_id": f"Q{self.i}", "recipient": "r@a.test",
                                        "delay": 1.0}).encode() + b"\n"
                self.i += 1
            n = min(len(b), len(self.buf))
            b[:n], self.buf = self.buf[:n], self.buf[n:]
            return n

    raw = Lazy()
    doc, _ = run_json("-", stdin=io.BufferedReader(raw))
    assert doc["totals"]["delivered"] == {"messages": 30000, "recipients": 30000}
    assert raw.biggest <= 64 * 1024
    assert doc["delivery_delay"] == {"average": 1.0, "max": 1.0}


# -- malformed input, exit codes -----------------------------------------------------------


def test_malformed_lines_are_counted_and_skipped_with_one_warning(log, tmp_path):
    path, records = log
    good = path.read_bytes().splitlines(keepends=True)
    bad = [b"not json\n", b"[1, 2]\n", b'{"type": "Delivery"}\n',
           b'{"type": "Delivery", "timestamp": "yesterday"}\n',
           b'{"type": 7, "timestamp": 1}\n', b'{"type": "Bounce", "timestamp": NaN}\n',
           b'{"type": "Delivery", "timestamp": 1, "recipient": "\xff\xfe"}\n',
           b"[" * 100000 + b"\n", b"x" * (report.MAX_LINE + 10) + b"\n",
           b'{"type": "Delivery", "timestamp": ' + str(T0).encode()]  # cut short
    mixed = tmp_path / "mixed.json"
    mixed.write_bytes(good[0] + bad[0] + b"\n   \n" + b"".join(good[1:]) + b"".join(bad[1:]))
    code, out, err = run_report(str(mixed), as_json=True)
    assert code == 0
    doc = json.loads(out)
    whole, _ = run_json(str(path))
    assert doc["malformed"] == len(bad)
    assert {k: v for k, v in doc.items() if k != "malformed"} == {
        k: v for k, v in whole.items() if k != "malformed"}
    assert err.splitlines() == [
        f"mailout report: warning: {len(bad)} malformed lines skipped "
        f"(the first at {mixed}:2)"]


def test_records_of_unknown_types_are_ignored_not_malformed(tmp_path):
    path = tmp_path / "j.json"
    path.write_text(json.dumps({"type": "Reception", "timestamp": T0}) + "\n"
                    + json.dumps({"type": "Delivery", "timestamp": T0, "queue_id": "Q"}) + "\n")
    doc, err = run_json(str(path))
    assert (doc["records"], doc["malformed"], doc["ignored"]) == (1, 0, {"Reception": 1})
    assert err == ""


def test_an_empty_log_is_a_report_of_nothing(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("")
    code, out, err = run_report(str(path))
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "mailout report: no records"
    assert out.count("(none)") == 4
    doc, _ = run_json(str(path))
    assert doc["records"] == 0 and doc["hours"] == [] and doc["delivery_delay"] == {
        "average": None, "max": None}


def test_unreadable_input_exits_66_and_prints_no_report(log, tmp_path):
    path, _ = log
    code, out, err = run_report(str(path), str(tmp_path / "missing.json"))
    assert (code, out) == (EX_NOINPUT, "")
    assert err == f"mailout report: cannot open {tmp_path / 'missing.json'}: " \
                  "No such file or directory\n"
    assert run_report(str(tmp_path))[0] == EX_NOINPUT  # a folder
    truncated = tmp_path / "m.json.1.gz"
    truncated.write_bytes(gzip.compress(path.read_bytes())[:-20])
    code, out, err = run_report(str(path), str(truncated))
    assert (code, out) == (EX_NOINPUT, "")
    assert err.startswith(f"mailout report: cannot read {truncated} after line ")


@pytest.mark.parametrize("kw, files, message", [
    ({"since": 0}, ["x"], "--since takes a number of hours greater than 0"),
    ({"since": -2}, ["x"], "--since takes a number of hours greater than 0"),
    ({"since": float("nan")}, ["x"], "--since takes a number of hours greater than 0"),
    ({"top": 0}, ["x"], "--top takes a number greater than 0"),
    ({}, [], "give at least one LOGFILE (or - for standard input)"),
    ({}, ["-", "-"], "standard input (-) can be given once"),
])
def test_bad_usage_exits_64(kw, files, message):
    code, out, err = run_report(*files, **kw)
    assert (code, out, err) == (EX_USAGE, "", f"mailout report: {message}\n")


def test_run_parses_arguments_and_refuses_bad_ones_with_64(log, capsys):
    path, _ = log
    assert report.run(["--top", "1", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["destinations"]) == 1 and doc["records"] == 10
    for argv in ([], ["--since", "soon", str(path)], ["--bogus", str(path)]):
        with pytest.raises(SystemExit) as e:
            report.run(argv)
        assert e.value.code == EX_USAGE


def test_add_arguments_gives_main_what_it_reads(log):
    path, _ = log
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    ns = parser.parse_args(["--since", "48", "--top", "3", str(path), "-"])
    assert (ns.since, ns.top, ns.json, ns.logfiles) == (48.0, 3, False, [str(path), "-"])
    out = io.StringIO()
    assert report.main(ns, now=T0 + 3 * H, stdin=io.BytesIO(b""), stdout=out,
                       stderr=io.StringIO()) == 0
    assert "Top 3 destinations by volume" in out.getvalue()


def test_summary_is_deterministic_whatever_the_order_of_records(log):
    path, _ = log
    lines = path.read_text().splitlines(keepends=True)
    random.Random(5).shuffle(lines)
    shuffled = path.with_name("shuffled.json")
    shuffled.write_text("".join(lines))
    assert run_report(str(shuffled)) == run_report(str(path))


def test_quiet_hours_are_left_out_of_a_log_longer_than_a_month(tmp_path):
    path = tmp_path / "j.json"
    path.write_text("".join(json.dumps({"type": "Delivery", "timestamp": T0 + d * 86400,
                                        "queue_id": f"Q{d}"}) + "\n" for d in (0, 1, 40)))
    doc, _ = run_json(str(path))
    assert [h["hour"][:13] for h in doc["hours"]] == [
        "2027-01-15T08", "2027-01-16T08", "2027-02-24T08"]
    assert len(run_json(str(path), since=24 * 30, now=T0 + 40 * 86400)[0]["hours"]) == 1
