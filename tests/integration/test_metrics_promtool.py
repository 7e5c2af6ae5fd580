"""/metrics over HTTP, checked by Prometheus's own linter (`promtool check metrics`).

A child process (this module run with ``python -m``) serves
``Metrics.resource()`` with twisted.web on 127.0.0.1 under the real reactor,
after real emitters made one event of every kind the metrics read: a
scheduler over a memory store (pickups, outcomes, a bounce and a deferral), a
real connector under StubSMTP (a DNS failure, a plaintext session), the
TLS-RPT functions, and destinations whose names need escaping. The test
fetches /metrics and pipes it to ``promtool check metrics``; promtool is
Debian's ``prometheus`` package, and the test fails (not skips) without it
when CI=true. The live daemon's endpoint is checked by the daemon's own tests.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import ROOT, env
from tests.support.peers import IN_CI
from tests.support.wait import wait_for

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def require_promtool() -> str:
    """The promtool path; skip without it, or fail when CI=true."""
    if not (os.path.isfile(PROMTOOL) and os.access(PROMTOOL, os.X_OK)):
        if IN_CI:
            pytest.fail("promtool is missing but CI=true (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return PROMTOOL


def promtool_check(text: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([require_promtool(), "check", "metrics"], input=text,
                          capture_output=True, timeout=60, check=False)


class Server:
    """The child process serving /metrics; its port comes in a file."""

    def __init__(self, workdir: Path) -> None:
        self.port_file = workdir / "port"
        self.log = workdir / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.test_metrics_promtool",
             str(self.port_file)],
            cwd=str(ROOT), env=env(), stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def port(self) -> int:
        def ready() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the metrics server exited ({self.proc.returncode}):\n"
                                     + self.log.read_text(errors="replace"))
            text = self.port_file.read_text() if self.port_file.exists() else ""
            return int(text) if text.strip() else None

        return wait_for(ready, timeout=30, what="the metrics server's port",
                        detail=lambda: self.log.read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def server(tmp_path: Path) -> Any:
    s = Server(tmp_path)
    yield s
    s.stop()


def fetch(port: int, accept: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
        return response.status, response.headers.get("content-type", ""), response.read()


def test_promtool_rejects_what_it_should() -> None:
    # The check below means something: promtool fails a counter without
    # _total and a line that does not parse.
    assert promtool_check(b"# TYPE x counter\nx 1\n").returncode != 0
    assert promtool_check(b"garbage{\n").returncode != 0


def test_metrics_over_http_pass_promtool_check_metrics(server: Server) -> None:
    require_promtool()
    port = server.port()
    status, ctype, body = fetch(port)
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    text = body.decode()
    # What the child's events made, as served:
    for line in ('mailout_recipients_total{status="delivered"} 1.0',
                 'mailout_recipients_total{status="bounced"} 1.0',
                 'mailout_recipients_total{status="deferred"} 2.0',
                 "mailout_messages_enqueued_total 1.0",
                 'mailout_queue_messages{queue_name="deferred"} 1.0',
                 'mailout_connections{state="idle"} 2.0',
                 'mailout_dns_failures_total{kind="nxdomain"} 1.0',
                 'mailout_tls_sessions_total{level="may",result="plaintext"} 1.0',
                 'mailout_tlsrpt_sessions_total{policy_type="sts",result="certificate-expired"}'
                 " 2.0",
                 'destination="relay \\"quoted\\" \\\\ key"'):
        assert line in text, line
    checked = promtool_check(body)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()

    # OpenMetrics when Prometheus asks for it (its default Accept header).
    status, ctype, body = fetch(port, "application/openmetrics-text; version=1.0.0")
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# -- the child process ----------------------------------------------------------------


class _Live:
    """A fixed LiveState."""

    def queue_counts(self) -> dict[str, int]:
        return {"active": 0, "deferred": 1}

    def oldest_arrival(self) -> float:
        import time
        return time.time() - 42

    def connections(self) -> tuple[int, int]:
        return (1, 2)

    def suspended(self) -> int:
        return 1


def _make_events() -> None:
    """One event of every kind, from the real emitters (see the module docstring)."""
    from twisted.internet import task

    from tests.support.fakes import ScriptedConnector
    from twisted_mailout.delivery.scheduler import Scheduler
    from twisted_mailout.envelope import Reply
    from twisted_mailout.outcome import RecipientResult, Status
    from twisted_mailout.testing.memory import StubSMTP
    from twisted_mailout.testing.memorystore import MemoryStore
    from twisted_mailout.tls import tlsrpt

    replies = {"ok": Reply(250, "2.0.0 ok"), "gone": Reply(550, "5.1.1 no such user"),
               "later": Reply(451, "4.3.0 later")}
    clock = task.Clock()
    clock.advance(1_800_000_000)
    store = MemoryStore(clock=clock.seconds)
    sched = Scheduler(store, ScriptedConnector(lambda d, r: replies[r.split("@", 1)[0]]), clock,
                      rng=random.Random(0))
    store.enqueue("", ["ok@a.test", "gone@a.test", "later@b.test"],
                  b"Subject: m\r\nMessage-ID: <m@o.test>\r\n\r\nbody\r\n")
    sched.start()

    stub = StubSMTP(zone={"records": {"good.test": {"MX": [[10, "mx.good.test"]]},
                                      "mx.good.test": {"A": ["192.0.2.10"]}}})
    stub.result(stub.send("s@o.test", ["x@good.test", "y@gone.test"], b"Subject: s\r\n\r\nb\r\n"))
    stub.close()

    tlsrpt.log_success("tlsa", "a.test")
    tlsrpt.log_failure("sts", "a.test", "certificate-expired", count=2)

    # A destination name that needs escaping (a relay key may hold anything).
    _METRICS.observe_outcome(RecipientResult("z@q", Status.DEFERRED, 421, "x", local=True),
                             destination='relay "quoted" \\ key')


def _serve(port_file: str) -> None:
    global _METRICS
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from twisted_mailout.daemon.metrics import Metrics

    _METRICS = Metrics(_Live(), admit_after=1)
    globalLogPublisher.addObserver(_METRICS.log_observer)
    _make_events()
    root = Resource()
    root.putChild(b"metrics", _METRICS.resource(reactor))
    port: Any = reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
    tmp = port_file + ".tmp"
    Path(tmp).write_text(str(port.getHost().port))
    os.replace(tmp, port_file)
    reactor.run()  # type: ignore[attr-defined]


_METRICS: Any = None

if __name__ == "__main__":
    _serve(sys.argv[1])
