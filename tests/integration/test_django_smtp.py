"""The Django backend delivering now over SMTP (MAILOUT_DELIVERY = "smtp://...")
from a process that runs no reactor, as a Django site does: each scenario runs
in a child Python (a fresh process whose reactor never ran) against an aiosmtpd
sink on loopback in this process. The sink's record of sessions (each message
carries its client's address and port) shows which messages shared a session.

Scenarios: a plain thread (a view) sends; send_mass_mail reuses one session for
N messages; ``with connection:`` keeps one session over several send_messages()
calls and QUITs at the end; fifty threads share one connection and every
message arrives once; open() and close() from many threads between their
sends lose nothing; fail_silently matches Django's own SMTP backend on
the relay's refusals, a connection refused and a 4xx after DATA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("django")

REPO = Path(__file__).resolve().parents[2]

CHILD = r'''
import json, sys, threading, warnings
warnings.simplefilter("ignore")
import django
from django.conf import settings
port, scenario = int(sys.argv[1]), sys.argv[2]
settings.configure(
    EMAIL_BACKEND="twisted_mailout.contrib.django.EmailBackend",
    MAILOUT_DELIVERY=f"smtp://127.0.0.1:{port}?tls=none&timeout=20",
    DEFAULT_FROM_EMAIL="Shop <shop@origin.test>",
    INSTALLED_APPS=[],
)
django.setup()
from django.core import mail
from twisted.internet import reactor
out = {"reactor_ran_before": bool(reactor.running or getattr(reactor, "_startedBefore", False))}

def msg(i, to=None):
    return mail.EmailMessage(f"m{i}", f"body {i}", None, [to or f"r{i}@dest.test"])

if scenario == "view":
    result = {}
    def view():  # what a Django view does, in a thread of the server's
        result["sent"] = mail.send_mail("Welcome", "Your account is ready.", None,
                                        ["zoe@dest.test"])
    t = threading.Thread(target=view)
    t.start(); t.join(60)
    out.update(result)
elif scenario == "mass":
    out["sent"] = mail.send_mass_mail(
        [(f"m{i}", f"body {i}", None, [f"r{i}@dest.test"]) for i in range(10)])
elif scenario == "with":
    with mail.get_connection() as conn:
        out["first"] = conn.send_messages([msg(0), msg(1)])
        out["second"] = conn.send_messages([msg(2)])
        out["open_again"] = conn.open()
elif scenario == "threads":
    conn = mail.get_connection()
    start = threading.Barrier(50)
    counts, errors = [], []
    def worker(i):
        try:
            start.wait()
            counts.append(conn.send_messages([msg(i)]))
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads: t.start()
    for t in threads: t.join(120)
    out["counts"], out["errors"] = counts, errors
elif scenario == "with_threads":
    # open() and close() of one connection from many threads, between others' sends
    conn = mail.get_connection()
    start = threading.Barrier(20)
    counts, errors = [], []
    def worker(i):
        try:
            start.wait()
            if i % 2:
                with conn:
                    counts.append(conn.send_messages([msg(i)]))
                    counts.append(conn.send_messages([msg(100 + i)]))
            else:
                counts.append(conn.send_messages([msg(i)]))
                conn.close()
                counts.append(conn.send_messages([msg(100 + i)]))
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads: t.start()
    for t in threads: t.join(120)
    out["counts"], out["errors"] = counts, errors
    out["left_open"] = conn._client is not None
elif scenario == "fail_silently":
    from twisted_mailout.apps.django import REFUSALS
    def outcome(backend, messages, **kwargs):
        try:
            return mail.get_connection(backend, **kwargs).send_messages(messages)
        except REFUSALS as e:
            return "refusal " + type(e).__name__
        except Exception as e:
            return "raise " + type(e).__name__
    cases = {
        "refused": ([msg(0, "refuse@dest.test")], {}),
        "partly refused": ([mail.EmailMessage("s", "b", None,
                                              ["refuse@dest.test", "ok@dest.test"])], {}),
        "one of two refused": ([msg(0, "refuse@dest.test"), msg(1)], {}),
        "connection refused": ([msg(0)], {"port": int(sys.argv[3])}),
        "451 after DATA": ([msg(0, "later@dest.test"), msg(1, "later2@dest.test")], {}),
    }
    for name, (messages, extra) in cases.items():
        for silent in (False, True):
            kw = dict(extra, fail_silently=silent)
            theirs = outcome("django.core.mail.backends.smtp.EmailBackend", messages,
                             host="127.0.0.1", port=kw.pop("port", port), **kw)
            kw = dict(extra, fail_silently=silent)
            ours = outcome(None, messages, **kw)
            out[f"{name}/{'silent' if silent else 'loud'}"] = [theirs, ours]
print(json.dumps(out))
'''


def run_child(tmp_path, port, scenario, *extra):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    r = subprocess.run([sys.executable, str(script), str(port), scenario, *map(str, extra)],
                       capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.pop("reactor_ran_before") is False
    return out


def sessions(messages):
    """How many messages each SMTP session carried (by client address and port)."""
    return Counter(tuple(m["peer"]) for m in messages)


def test_a_view_sends_over_smtp_with_no_reactor_running(sink, tmp_path):
    out = run_child(tmp_path, sink.port, "view")
    assert out == {"sent": 1}
    [m] = sink.wait_idle()
    assert m["mail_from"] == "shop@origin.test" and m["rcpt_tos"] == ["zoe@dest.test"]
    assert b"Subject: Welcome" in m["data"]


def test_send_mass_mail_reuses_one_session(sink, tmp_path):
    out = run_child(tmp_path, sink.port, "mass")
    assert out == {"sent": 10}
    got = sink.wait_idle()
    assert sorted(m["rcpt_tos"][0] for m in got) == sorted(f"r{i}@dest.test" for i in range(10))
    assert list(sessions(got).values()) == [10]
    assert sink.peak_sessions == 1


def test_an_open_connection_keeps_its_session_until_close(sink, tmp_path):
    out = run_child(tmp_path, sink.port, "with")
    assert out == {"first": 2, "second": 1, "open_again": False}
    got = sink.wait_idle()  # close() ended the session (the child also exited)
    assert len(got) == 3 and list(sessions(got).values()) == [3]


def test_fifty_threads_share_one_connection_and_every_message_arrives_once(sink, tmp_path):
    out = run_child(tmp_path, sink.port, "threads")
    assert out["errors"] == [] and out["counts"] == [1] * 50
    got = sink.wait_idle()
    subjects = Counter(line.split(b":", 1)[1].strip().decode()
                       for m in got for line in m["data"].splitlines()
                       if line.startswith(b"Subject:"))
    assert subjects == Counter({f"m{i}": 1 for i in range(50)})
    # the connection's sessions are shared: a few for fifty messages
    assert len(sessions(got)) <= 4 and sink.peak_sessions <= 4


def test_open_and_close_from_many_threads_between_their_sends(sink, tmp_path):
    out = run_child(tmp_path, sink.port, "with_threads")
    assert out["errors"] == [] and out["counts"] == [1] * 40
    assert out["left_open"] is False  # the last user closed the sessions
    got = sink.wait_idle()
    subjects = Counter(line.split(b":", 1)[1].strip().decode()
                       for m in got for line in m["data"].splitlines()
                       if line.startswith(b"Subject:"))
    assert subjects == Counter({f"m{i}": 1 for i in [*range(20), *range(100, 120)]})


def test_fail_silently_matches_djangos_smtp_backend_on_the_relays_refusals(
        aiosmtpd_sink, tmp_path):
    def rcpt(address):
        return "550 5.1.1 No such user" if address.startswith("refuse") else None

    def data(record):
        return "451 4.3.0 Try later" if record["rcpt_tos"][0].startswith("later") else None

    sink = aiosmtpd_sink(rcpt_reply=rcpt, data_reply=data)
    closed = aiosmtpd_sink()
    closed_port = closed.port
    closed.stop()  # nothing listens there now: connection refused
    out = run_child(tmp_path, sink.port, "fail_silently", closed_port)
    expected = {
        "refused": ("refusal", 0),
        "partly refused": (1, 1),
        "one of two refused": ("refusal", 1),
        "connection refused": ("refusal", 0),
        "451 after DATA": ("refusal", 0),
    }
    for name, (loud, silent) in expected.items():
        theirs, ours = out[f"{name}/loud"]
        assert str(theirs).split()[0] == str(ours).split()[0] == str(loud), (name, out)
        theirs, ours = out[f"{name}/silent"]
        assert theirs == ours == silent, (name, out)
