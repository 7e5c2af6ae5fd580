"""Schemathesis against the running daemon's TCP endpoint, with its token: every
response conforms to the shipped OpenAPI document (status codes, content
types, headers, bodies), no request makes a 5xx, requests the document
rules out are refused, and the token is not ignored.

Bounded: a few dozen examples per operation, well under a minute. Two checks
are left out on purpose: `positive_data_acceptance` (the document cannot say
that an action needs a non-empty selector, or that ids and all=true exclude
each other: both are a 400 by design) and the stateful
`ensure_resource_availability`/`use_after_free` (a suspension may be created
for a fraction of a second and be gone, as it should, before it is fetched).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, Daemon, env
from tests.support.peers import IN_CI, free_port
from tests.support.wait import wait_for
from twisted_mailout import enqueue
from twisted_mailout.daemon.control import ControlClient

DOCUMENT = ROOT / "twisted_mailout" / "daemon" / "openapi.json"
TOKEN = "schemathesis-t0ken"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,negative_data_rejection,"
          "missing_required_header,unsupported_method,allow_header_conformance,ignored_auth")
#: Examples per operation and phase: enough to reach every parameter and body
#: shape, few enough for the whole run to stay under a minute.
MAX_EXAMPLES = 25


def schemathesis_command() -> list[str]:
    from importlib.metadata import entry_points

    if not any(e.name == "schemathesis" for e in entry_points(group="console_scripts")):
        if IN_CI:
            pytest.fail("schemathesis is missing but CI=true (pip install schemathesis)")
        pytest.skip("schemathesis is not installed")
    return [sys.executable, "-c",
            "import sys; from importlib.metadata import entry_points; "
            "[ep] = [e for e in entry_points(group='console_scripts') "
            "if e.name == 'schemathesis']; sys.exit(ep.load()())"]


def test_the_api_conforms_to_its_openapi_document():
    command = schemathesis_command()
    base = Path(tempfile.mkdtemp(prefix="mo", dir="/tmp"))
    try:
        token = base / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        q = base / "q"
        # Mail to nowhere: the relay port has no listener, so it stays deferred
        # and the listings, summaries and actions have something to work on.
        nowhere = free_port()
        for i in range(3):
            enqueue(str(q), "a@origin.test", [f"u{i}@example.org", "v@example.net"],
                    f"Subject: m{i}\r\nMessage-ID: <m{i}@test>\r\n\r\nbody\r\n".encode())
        d = Daemon(q, f"--relay=127.0.0.1:{nowhere}", "--tls=none",
                   "--resolver=127.0.0.1:53", "--http=tcp:0:interface=127.0.0.1",
                   f"--http-token-file={token}", log=base / "daemon.log").start()
        try:
            info = wait_for(lambda: (q / "control.json").exists()
                            and json.loads((q / "control.json").read_text()), 20,
                            what="control.json", detail=d.log)
            tcp = next(e for e in info["endpoints"] if e.startswith("tcp:"))
            client = ControlClient(tcp, TOKEN, timeout=10)
            wait_for(lambda: client.get("/readyz").get("status") == "ready", 20,
                     what="a ready daemon", detail=d.log)
            url = "http://" + tcp.removeprefix("tcp:")
            t0 = time.monotonic()
            out = subprocess.run(
                [*command, "run", str(DOCUMENT), "--url", url,
                 "--header", f"Authorization: Bearer {TOKEN}",
                 "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES),
                 "--request-timeout", "10", "--no-color"],
                env=env(), cwd=str(base), capture_output=True, text=True, timeout=120)
            took = time.monotonic() - t0
            report = (out.stdout + out.stderr)[-6000:]
            assert out.returncode == 0, report
            assert "11/11" in out.stdout, report  # every operation was tested
            assert took < 60, f"schemathesis took {took:.0f} s\n{report}"
            log = d.log()
            assert "Traceback" not in log and "Unhandled" not in log, log[-6000:]
        finally:
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
