"""twisted_mailout.blocking with the global reactor, in child processes (a
program without a reactor, a program running its own in a thread): fifty
threads sending at once over shared connections, each message arriving
exactly once; Mailer("smtp://...").send() from plain threads; the reactor
thread started on first use and stopped when the main thread ends, after
the mail in flight; the program's reactor used and left to it; refusal in
the reactor thread; the futures manager at exit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_child(tmp_path: Path, code: str, *args: str, timeout: float = 120) -> dict:
    """Run C{code} in a fresh interpreter; its last stdout line is JSON."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, f"child failed ({done.returncode}):\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fifty_threads_send_at_once_and_each_message_arrives_once(tmp_path, sink):
    result = run_child(tmp_path, """
        import json, sys, threading
        from concurrent.futures import ThreadPoolExecutor
        from twisted_mailout import blocking

        port = int(sys.argv[1])
        barrier = threading.Barrier(50)

        def one(i):
            barrier.wait()
            msg = f"Subject: m{i}\\r\\nMessage-ID: <m{i}@origin.test>\\r\\n\\r\\nbody {i}\\r\\n"
            report = blocking.send("a@origin.test", [f"r{i}@dest.test"], msg,
                                   relay=f"127.0.0.1:{port}", tls="none", timeout=60)
            return [r.status.value for r in report]

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(one, range(50)))
        runner = blocking.reactor_thread()
        print(json.dumps({"statuses": statuses, "owned": runner.owned,
                          "reactor_thread": runner._ident != threading.main_thread().ident}))
    """, str(sink.port))
    assert result["statuses"] == [["delivered"]] * 50
    assert result["owned"] and result["reactor_thread"]
    received = sorted(r for m in sink.messages for r in m["rcpt_tos"])
    assert received == sorted(f"r{i}@dest.test" for i in range(50))  # each exactly once
    ids = sorted(re.search(rb"Message-ID: (<m\d+@origin\.test>)", m["data"]).group(1)
                 for m in sink.messages)
    assert ids == sorted(f"<m{i}@origin.test>".encode() for i in range(50))
    assert sink.peak_sessions <= 4  # one pool of connections shared by the threads
    assert sink.open_sessions == 0  # QUIT at exit


def test_mailer_smtp_url_from_plain_threads_and_a_script(tmp_path, sink):
    result = run_child(tmp_path, """
        import json, sys, threading
        from twisted_mailout.apps.builder import build_message
        from twisted_mailout.apps.mailer import Mailer

        port = int(sys.argv[1])
        mailer = Mailer(f"smtp://127.0.0.1:{port}?tls=none")
        def msg(to):
            return build_message(sender="a@origin.test", to=to, subject="s", text="t")

        out = {"main": mailer.send(msg("main@dest.test")).all_delivered}
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(
            mailer.send(msg(f"t{i}@dest.test")).all_delivered)) for i in range(10)]
        for t in threads: t.start()
        for t in threads: t.join()
        out["threads"] = results
        out["future"] = mailer.submit(msg("f@dest.test")).result(60).all_delivered
        smtps = Mailer(f"smtps://127.0.0.1:{port}?tls=none&timeout=5")
        out["smtps"] = [r.status.value for r in smtps.send(msg("s@dest.test"))]
        print(json.dumps(out))
    """, str(sink.port))
    assert result["main"] and result["future"]
    assert result["threads"] == [True] * 10
    # smtps:// to a plaintext server: the handshake fails, a result (not an exception)
    assert result["smtps"] == ["deferred"]
    assert len(sink.messages) == 12


def test_the_mail_in_flight_is_sent_before_the_reactor_stops_at_exit(tmp_path, aiosmtpd_sink):
    import threading

    gate = threading.Event()
    sink = aiosmtpd_sink(data_reply=lambda rec: None if gate.wait(30) else "451 4.3.0 late")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from twisted_mailout import blocking
        futures = [blocking.submit("a@origin.test", [f"r{i}@dest.test"],
                                   b"Subject: s\\r\\n\\r\\nt\\r\\n",
                                   relay=f"127.0.0.1:{sys.argv[1]}", tls="none")
                   for i in range(3)]
        print("submitted", flush=True)
        # the main thread ends here, with three deliveries in flight
    """), str(sink.port)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "submitted"
    from tests.support.wait import wait_for

    wait_for(lambda: sink.open_sessions >= 1, what="a session in flight")
    gate.set()
    assert child.wait(60) == 0
    assert sorted(r for m in sink.messages for r in m["rcpt_tos"]) == [
        "r0@dest.test", "r1@dest.test", "r2@dest.test"]


def test_a_reactor_the_program_runs_is_used_and_the_reactor_thread_is_refused(tmp_path, sink):
    result = run_child(tmp_path, """
        import json, sys, threading
        from twisted.internet import reactor
        from twisted_mailout import blocking
        from twisted_mailout.apps.builder import build_message
        from twisted_mailout.apps.mailer import Mailer

        port = int(sys.argv[1])
        started = threading.Event()
        reactor.callWhenRunning(started.set)
        program = threading.Thread(target=reactor.run,
                                   kwargs={"installSignalHandlers": False})
        program.start()
        started.wait(30)
        out = {}
        report = blocking.send("a@origin.test", ["b@dest.test"], b"Subject: s\\r\\n\\r\\nt\\r\\n",
                               relay=f"127.0.0.1:{port}", tls="none", timeout=30)
        out["delivered"] = report.all_delivered
        runner = blocking.reactor_thread()
        out["owned"] = runner.owned
        out["same_thread"] = runner._ident == program.ident

        def in_reactor():
            try:
                blocking.send("a@origin.test", ["c@dest.test"], b"x\\r\\n",
                              relay=f"127.0.0.1:{port}", tls="none")
            except blocking.ReactorThreadError as e:
                return str(e)
            return "not refused"

        out["refused"] = blocking.call(in_reactor, timeout=30)
        mailer = Mailer(f"smtp://127.0.0.1:{port}?tls=none")
        def send_in_reactor():
            d = mailer.send(build_message(sender="a@origin.test", to="d@dest.test",
                                          subject="s", text="t"))
            name = type(d).__name__
            return d.addCallback(lambda report: [name, report.all_delivered])

        out["deferred_in_reactor"] = blocking.call(send_in_reactor, timeout=30)
        reactor.callFromThread(reactor.stop)
        program.join(30)
        out["stopped_by_program"] = not program.is_alive()
        print(json.dumps(out))
    """, str(sink.port))
    assert result["delivered"] and not result["owned"] and result["same_thread"]
    assert "reactor thread" in result["refused"]
    assert result["deferred_in_reactor"] == ["Deferred", True]
    assert result["stopped_by_program"]
    assert sorted(r for m in sink.messages for r in m["rcpt_tos"]) == ["b@dest.test",
                                                                       "d@dest.test"]


def test_a_futures_manager_sends_its_queue_at_exit(tmp_path, sink):
    run_child(tmp_path, """
        import json, sys
        from twisted_mailout.apps.builder import build_message
        from twisted_mailout.apps.mailer import Mailer

        mailer = Mailer(f"smtp://127.0.0.1:{sys.argv[1]}?tls=none",
                        manager={"use": "futures", "workers": 2, "pipeline": 5})
        for i in range(20):
            mailer.send(build_message(sender="a@origin.test", to=f"r{i}@dest.test",
                                      subject="s", text="t"))
        print(json.dumps({"queued": 20}))
        # no stop(), no result(): the manager is drained at exit
    """, str(sink.port))
    assert sorted(r for m in sink.messages for r in m["rcpt_tos"]) == sorted(
        f"r{i}@dest.test" for i in range(20))
    assert sink.peak_sessions <= 2


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork()")
def test_a_reactor_thread_started_before_fork_is_refused_in_the_child(tmp_path, sink):
    result = run_child(tmp_path, """
        import json, os, sys
        from twisted_mailout import blocking
        port = sys.argv[1]
        blocking.send("a@origin.test", ["parent@dest.test"], b"x\\r\\n",
                      relay=f"127.0.0.1:{port}", tls="none", timeout=30)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                blocking.send("a@origin.test", ["child@dest.test"], b"x\\r\\n",
                              relay=f"127.0.0.1:{port}", tls="none", timeout=5)
                answer = "sent"
            except blocking.ReactorThreadError as e:
                answer = str(e)
            os.write(w, answer.encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        print(json.dumps({"child": os.read(r, 1000).decode()}))
    """, str(sink.port))
    assert "forked" in result["child"]
    assert [m["rcpt_tos"] for m in sink.messages] == [["parent@dest.test"]]


def test_a_flask_handler_sends_over_smtp(tmp_path, sink):
    pytest.importorskip("flask")
    result = run_child(tmp_path, """
        import json, sys
        from flask import Flask, request
        from twisted_mailout.apps.builder import build_message
        from twisted_mailout.apps.mailer import Mailer

        app = Flask(__name__)
        mailer = Mailer(f"smtp://127.0.0.1:{sys.argv[1]}?tls=none")

        @app.post("/signup")
        def signup():
            report = mailer.send(build_message(sender="shop@example.com",
                                               to=request.form["email"], subject="Welcome",
                                               text="Your account is ready."))
            return {"delivered": report.all_delivered}

        with app.test_client() as client:
            answers = [client.post("/signup", data={"email": f"u{i}@dest.test"}).json
                       for i in range(3)]
        print(json.dumps(answers))
    """, str(sink.port))
    assert result == [{"delivered": True}] * 3
    assert sorted(r for m in sink.messages for r in m["rcpt_tos"]) == [
        "u0@dest.test", "u1@dest.test", "u2@dest.test"]
