"""The status page's data (status_data, redacted settings) and its
twisted.web resource (StatusPage), served in memory by a real Site."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.web import pages, resource, server

from twisted_mailout.daemon.config import Config
from twisted_mailout.daemon.history import History
from twisted_mailout.daemon.status import (
    CONTENT_SECURITY_POLICY,
    REDACTED,
    STATUS_SCHEMA,
    StatusPage,
    load_assets,
    redacted_settings,
    status_data,
)

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_800_000_000.0
PASSWORD = "hunter2-not-for-the-page"


class FakeAdmin:
    def __init__(self, suspensions):
        self.suspensions = suspensions

    def list_suspensions(self):
        return list(self.suspensions)


SUSPENSION = {"id": "s1", "domain": "slow.example", "reason": "greylisting storm",
              "created": T0 - 600, "until": T0 + 3000}


@pytest.fixture
def config(tmp_path):
    pw = tmp_path / "secret-password-file"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    return Config(queue=str(tmp_path / "q"), relay="smtp://relay.example:587",
                  auth_user="me@example.com", auth_password_file=str(pw),
                  retry_base=120.0)


@pytest.fixture
def history():
    clock = task.Clock()
    clock.advance(T0)
    h = History(clock)
    h.sample({"incoming": 1, "active": 2, "deferred": 30, "hold": 4})
    h.record("delivered", qid="Q1", recipient="a@example.org")
    h.record("deferred", qid="Q2", recipient="b@slow.example", reply="451 4.7.1 greylisted",
             code=451)
    clock.advance(61)
    h.record("bounced", qid="Q3", recipient="c@dead.example", reply="550 5.1.1 no such user",
             code=550)
    h.record("expired", qid="Q4", recipient="d@slow.example", reply="451 4.7.1 greylisted",
             code=451, outcome="expired")
    h.sample({"incoming": 0, "active": 1, "deferred": 31, "hold": 4})
    return h


def test_status_data(history, config):
    data = status_data(history, admin=FakeAdmin([SUSPENSION]), config=config,
                       started=T0 - 100)
    jsonschema.validate(data, STATUS_SCHEMA)
    text = json.dumps(data)
    assert data["now"] == T0 + 61
    assert data["uptime"] == 161
    assert data["version"]
    assert data["queue"] == {"incoming": 0, "active": 1, "deferred": 31, "hold": 4,
                             "total": 36}
    assert data["totals"] == {"delivered": 1, "deferred": 1, "bounced": 2}
    assert data["outcomes"]["delivered"][-2:] == [1, 0]
    assert data["outcomes"]["bounced"][-2:] == [0, 2]
    assert data["depth"]["total"] == [37, 36]
    assert data["depth"]["time"] == [T0, T0 + 61]
    assert [d["destination"] for d in data["destinations"]] == ["slow.example"]
    assert data["destinations"][0]["last_reply"] == "451 4.7.1 greylisted"
    assert [(b["queue_id"], b["outcome"]) for b in data["bounces"]] == [
        ("Q4", "expired"), ("Q3", "bounced")]
    assert data["suspensions"] == [SUSPENSION]
    settings = data["settings"]
    assert settings["relay"] == "smtp://relay.example:587"
    assert settings["retry_base"] == 120.0
    assert settings["auth_user"] == "me@example.com"
    assert settings["auth_password_file"] == REDACTED
    assert settings["auth_token_file"] is None
    assert settings["resolvers"] == []
    assert settings["helo_name"] == config.helo_name
    assert config.auth_password_file not in text
    assert "secret-password-file" not in text
    assert PASSWORD not in text


def test_given_counts_win_over_the_last_sample(history):
    data = status_data(history, queue_counts={"deferred": 5, "hold": 1})
    assert data["queue"] == {"incoming": 0, "active": 0, "deferred": 5, "hold": 1, "total": 6}


def test_without_history_config_or_admin():
    data = status_data(None, now=T0)
    jsonschema.validate(data, STATUS_SCHEMA)
    assert data["uptime"] is None and data["started"] is None
    assert data["queue"]["total"] == 0
    assert len(data["outcomes"]["time"]) == 60
    assert data["outcomes"]["time"][-1] == T0
    assert data["depth"]["time"] == []
    assert data["suspensions"] == [] and data["settings"] == {}


def test_schema_is_not_vacuous(history):
    data = status_data(history)
    del data["queue"]["hold"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, STATUS_SCHEMA)


def test_redaction_of_extra_settings():
    shown = redacted_settings(None, {
        "http": ["ssl:8443:privateKey=/etc/k.pem:certKey=/etc/c.pem", "tcp:8025"],
        "http_token_file": "/etc/mailout/token",
        "api_secret": "",
        "upstream": "smtp://user:pa55@relay.example:587",
        "weird": Path("/x"),
    })
    assert shown["http"] == ["ssl:8443:privateKey=(redacted):certKey=(redacted)", "tcp:8025"]
    assert shown["http_token_file"] == REDACTED
    assert shown["api_secret"] is None
    assert shown["upstream"] == "smtp://user:(redacted)@relay.example:587"
    assert shown["weird"] == "/x"
    assert "/etc/" not in json.dumps(shown)


# -- the resource, through a real twisted.web Site in memory ------------------------


def fetch(root, path, method="GET", headers=()):
    """One HTTP/1.1 request to a Site over a StringTransport:
    (status, {lower-case header: value}, body)."""
    site = server.Site(root)
    proto = site.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close",
             *(f"{k}: {v}" for k, v in headers)]
    proto.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    proto.connectionLost(None)
    return int(status_line.split()[1]), hdrs, body


class Root(resource.Resource):
    """A root as http.py's: its children, 404 elsewhere."""

    def getChild(self, path, request):
        return pages.notFound()


def mounted(page):
    root = Root()
    root.putChild(b"", page)
    root.putChild(b"static", page.static)
    return root


@pytest.fixture(scope="module")
def page():
    return StatusPage()


@pytest.fixture(params=["root", "mounted"])
def site_root(request, page):
    """The page as the root resource, or mounted as http.py does."""
    return page if request.param == "root" else mounted(page)


def test_the_page(site_root):
    status, hdrs, body = fetch(site_root, "/")
    assert status == 200
    assert hdrs["content-type"] == "text/html; charset=utf-8"
    assert hdrs["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert hdrs["x-content-type-options"] == "nosniff"
    assert hdrs["x-frame-options"] == "DENY"
    assert body.startswith(b"<!doctype html>")
    assert b'src="static/status.js"' in body


@pytest.mark.parametrize("name,ctype", [
    ("status.js", "text/javascript; charset=utf-8"),
    ("status.css", "text/css; charset=utf-8"),
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    ("uPlot.min.css", "text/css; charset=utf-8"),
    ("uPlot.LICENSE", "text/plain; charset=utf-8"),
    ("favicon.svg", "image/svg+xml"),
])
def test_static_assets(site_root, name, ctype):
    status, hdrs, body = fetch(site_root, f"/static/{name}")
    assert status == 200
    assert hdrs["content-type"] == ctype
    assert body == (ROOT / "twisted_mailout/daemon/static" / name).read_bytes()
    assert int(hdrs["content-length"]) == len(body)
    # revalidation: the same ETag gets a 304 without the body
    status, _, body = fetch(site_root, f"/static/{name}",
                            headers=[("If-None-Match", hdrs["etag"])])
    assert status == 304 and body == b""


@pytest.mark.parametrize("path", ["/static/nothing.js", "/static/", "/static/a/status.js",
                                  "/static/../status.py", "/nothing"])
def test_unknown_paths_are_404(page, path):
    for r in (page, mounted(page)):
        status, _, body = fetch(r, path)
        assert status == 404, (path, body)


def test_head_and_other_methods(site_root):
    status, hdrs, body = fetch(site_root, "/static/status.js", method="HEAD")
    assert status == 200 and body == b""
    assert hdrs["content-type"].startswith("text/javascript")
    status, hdrs, body = fetch(site_root, "/", method="HEAD")
    assert status == 200 and body == b"" and int(hdrs["content-length"]) > 1000
    for path in ("/", "/static/status.js"):
        status, hdrs, _ = fetch(site_root, path, method="POST")
        assert status == 405
        assert hdrs["allow"] == "GET, HEAD"


def test_the_page_refers_only_to_shipped_assets():
    assets = load_assets()
    html = assets["index.html"].data.decode()
    referred = re.findall(r'(?:src|href)="static/([^"]+)"', html)
    assert {"uPlot.iife.min.js", "uPlot.min.css", "status.js", "status.css",
            "favicon.svg"} <= set(referred)
    assert set(referred) <= set(assets)
    # no inline script or style: the page's CSP forbids them
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
    assert "<style" not in html and " style=" not in html


def test_static_files_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "static/*" in data["tool"]["setuptools"]["package-data"]["twisted_mailout.daemon"]


def test_the_script_never_writes_markup():
    js = load_assets()["status.js"].data.decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js
    assert "document.write" not in js and "eval(" not in js
