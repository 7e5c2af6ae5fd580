"""The status page in a real browser: Debian's headless Chromium, driven by
Playwright.

By default the test serves the real L{StatusPage} and a C{/api/v1/status}
that answers L{status_data} for a known hour of history (behind a bearer
token, as the daemon's API on TCP) with twisted.web on 127.0.0.1:0, in a
subprocess (this module run as C{python -m ... serve}). It checks that:

  - the page asks for the token on 401, says so on 403, and loads with the
    right one (kept in sessionStorage: a reload needs no token);
  - no console error and no uncaught exception (except the browser's own
    "Failed to load resource" lines for the 401/403 answers it was given);
  - both charts drew: uPlot holds exactly the API's series, and each
    series' colour is on the canvas;
  - every number and row the page shows matches the JSON it was sent;
  - the page redraws on its next poll;
  - what comes from a remote server is shown as text, not markup, and the
    settings show no secret.

A screenshot is kept at C{test-artifacts/status-page.png}.

Against a live daemon: set C{MAILOUT_STATUS_URL} (the page's URL, e.g.
C{http://127.0.0.1:8025/}) and, if its API needs one, C{MAILOUT_STATUS_TOKEN};
the checks that need the known history are then left out.

Needs C{/usr/bin/chromium} (apt: chromium) and the Python package
C{playwright}; without them the test skips, or fails when CI=true.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import ROOT, env
from tests.support.peers import IN_CI
from tests.support.wait import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TOKEN = "status-page-test-token-7f3a"
PASSWORD = "hunter2-never-on-the-page"
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOT = ARTIFACTS / "status-page.png"
#: A reply a hostile server could send: the page must show it as text.
HOSTILE_REPLY = '550 5.1.1 <img src=x onerror="window.pwned=1"><b>no</b> such user'
DESTINATIONS = ("greylist.example", "slow.example", "[relay.example]:587")
SERIES_COLORS = {  # status.js's COLORS
    "total": "#1c7ed6", "incoming": "#868e96", "active": "#15aabf", "deferred": "#d9822b",
    "hold": "#7048e8", "delivered": "#2b8a3e", "bounced": "#c92a2a"}


# -- the server (run in a subprocess) ------------------------------------------------


def known_history(now: float) -> Any:
    """A History holding a known last hour ending at C{now}."""
    from twisted_mailout.daemon.history import History

    class Clock:
        fixed: float | None = None

        def seconds(self) -> float:
            return time.time() if self.fixed is None else self.fixed

        def callLater(self, *a: Any, **kw: Any) -> Any:
            raise NotImplementedError

    clock = Clock()
    history = History(clock)
    last = int(now // 60)
    for k in range(60):
        start = (last - 59 + k) * 60
        for _ in range((k * 7) % 13):
            history.record("delivered", recipient=f"r{k}@ok.example", when=start)
        for i in range(k % 5):
            dest = DESTINATIONS[i % 3]
            history.record("deferred", qid=f"D{k}x{i}", recipient=f"u{i}@{dest}",
                           destination=dest, reply=f"451 4.7.1 try again ({dest}, {k})",
                           code=451, when=start)
        if k % 10 == 0:
            history.record("bounced", qid=f"B{k}", recipient=f"gone{k}@dead.example",
                           reply="550 5.1.1 no such user", code=550, when=start)
        clock.fixed = start + 1 if start + 1 <= now else now
        history.sample({"incoming": k % 3, "active": 1 + k % 4, "deferred": 10 + k % 7,
                        "hold": 2 if k > 30 else 0})
    history.record("expired", qid="BX", recipient="late@slow.example",
                   reply=HOSTILE_REPLY, code=550, outcome="expired", when=now)
    clock.fixed = None
    return history


def serve(port_file: str, secret_file: str, queue_dir: str) -> None:
    """Serve the page and the status API on 127.0.0.1:0 until killed; write
    the port to C{port_file} (atomically) once listening."""
    from twisted.internet import endpoints, reactor
    from twisted.web import pages, resource, server

    from twisted_mailout.daemon.config import Config
    from twisted_mailout.daemon.status import StatusPage, status_data

    frozen = time.time()
    started = frozen - 3 * 86400 - 3723
    history = known_history(frozen)
    served = [0]
    config = Config(queue=queue_dir, relay="smtp://relay.example:587",
                    auth_user="ops@example.com", auth_password_file=secret_file)

    class Admin:
        def list_suspensions(self) -> list[dict[str, Any]]:
            return [{"id": "s-1", "domain": "slow.example", "reason": "storm of 421s",
                     "created": started + 60, "until": frozen + 1800}]

    class API(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            if request.postpath != [b"v1", b"status"]:
                request.setResponseCode(404)
                return b'{"error": {"status": 404, "code": "not_found", "message": "no"}}'
            auth = request.getHeader(b"Authorization")
            if auth is None:
                request.setResponseCode(401)
                request.setHeader(b"WWW-Authenticate", b"Bearer")
                return (b'{"error": {"status": 401, "code": "unauthorized", '
                        b'"message": "a bearer token is needed"}}')
            if auth != b"Bearer " + TOKEN.encode():
                request.setResponseCode(403)
                return (b'{"error": {"status": 403, "code": "forbidden", '
                        b'"message": "wrong token"}}')
            # The clock of the data hardly moves (a millisecond a request), so
            # the hour stays the known one whenever the browser asks, and yet
            # each answer differs from the last (the page's redraw shows).
            served[0] += 1
            data = status_data(history, admin=Admin(), config=config, started=started,
                               now=frozen + served[0] / 1000)
            return json.dumps(data).encode()

    class Root(resource.Resource):
        def getChild(self, path: bytes, request: Any) -> Any:
            return pages.notFound()

    page = StatusPage()
    root = Root()
    root.putChild(b"", page)
    root.putChild(b"static", page.static)
    root.putChild(b"api", API())

    def listening(port: Any) -> None:
        tmp = port_file + ".tmp"
        Path(tmp).write_text(str(port.getHost().port))
        os.replace(tmp, port_file)

    ep = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    ep.listen(server.Site(root)).addCallbacks(listening, lambda f: reactor.stop())
    reactor.run()


# -- the browser side -----------------------------------------------------------------


def require_browser() -> None:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install playwright)")
    if missing:
        message = "the status page test needs " + " and ".join(missing)
        if IN_CI:
            pytest.fail(message + " but CI=true")
        pytest.skip(message)


@pytest.fixture
def page_server(tmp_path):
    """The URL of the page (the live daemon's with MAILOUT_STATUS_URL), its
    token (or None), and whether the history is the known one."""
    url = os.environ.get("MAILOUT_STATUS_URL")
    if url:
        yield url, os.environ.get("MAILOUT_STATUS_TOKEN") or None, False
        return
    secret = tmp_path / "relay-password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_status_page_chromium", "serve",
         str(port_file), str(secret), str(tmp_path / "queue")],
        cwd=str(ROOT), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError("the page server exited: "
                                     + proc.stdout.read().decode(errors="replace"))
            return port_file.exists()

        wait_for(ready, 20, what="the page server's port file")
        yield f"http://127.0.0.1:{port_file.read_text()}/", TOKEN, True
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# The page's formatting, again (status.js: fmtCount, fmtTime, fmtDuration, fmtValue).

def fmt_count(n: int) -> str:
    return f"{n:,}"


def fmt_time(t: float | None) -> str:
    if t is None:
        return "—"
    return datetime.fromtimestamp(math.floor(t), UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "—"
    s = math.floor(s)
    d, h, m, sec = s // 86400, s % 86400 // 3600, s % 3600 // 60, s % 60
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {sec:02d}s"
    return f"{sec}s"


def fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, list):
        return ", ".join(fmt_value(x) for x in v) if v else "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


READ_PAGE = """() => {
  const text = id => document.getElementById(id).textContent;
  const rows = id => Array.from(document.querySelectorAll('#' + id + ' tbody tr'))
      .map(tr => Array.from(tr.cells).map(td => td.textContent));
  const s = window.mailoutStatus;
  const chart = c => ({data: c.data.map(a => Array.from(a)),
                       labels: c.series.slice(1).map(x => x.label)});
  const colours = (id, wanted) => {
    const canvas = document.querySelector('#' + id + ' canvas');
    if (!canvas) { return null; }
    const img = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const rgb = wanted.map(h => [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16)));
    const counts = wanted.map(() => 0);
    let painted = 0;
    for (let i = 0; i < img.length; i += 4) {
      if (img[i + 3] === 0) { continue; }
      painted++;
      rgb.forEach((c, k) => {
        if (Math.abs(img[i] - c[0]) <= 12 && Math.abs(img[i + 1] - c[1]) <= 12 &&
            Math.abs(img[i + 2] - c[2]) <= 12) { counts[k]++; }
      });
    }
    return {painted: painted, width: canvas.width, height: canvas.height, counts: counts};
  };
  const tiles = {};
  ['total', 'incoming', 'active', 'deferred', 'hold'].forEach(
      n => { tiles['queue-' + n] = text('queue-' + n); });
  ['delivered', 'deferred', 'bounced'].forEach(
      n => { tiles['total-' + n] = text('total-' + n); });
  return {
    renderedNow: document.body.dataset.renderedNow, renders: s.renders,
    version: text('version'), uptime: text('uptime'), updated: text('updated'),
    tiles: tiles, destinations: rows('destinations'), bounces: rows('bounces'),
    suspensions: rows('suspensions'), settings: rows('settings'),
    charts: {depth: chart(s.charts.depth), outcomes: chart(s.charts.outcomes)},
    canvas: {depth: colours('chart-depth', %(depth)s),
             outcomes: colours('chart-outcomes', %(outcomes)s)},
    tokenHidden: document.getElementById('token-form').hidden,
    pwned: window.pwned === 1,
  };
}"""

DEPTH_SERIES = ["total", "incoming", "active", "deferred", "hold"]
OUTCOME_SERIES = ["delivered", "deferred", "bounced"]


def read_page(page: Any) -> dict[str, Any]:
    script = READ_PAGE % {
        "depth": json.dumps([SERIES_COLORS[n] for n in DEPTH_SERIES]),
        "outcomes": json.dumps([SERIES_COLORS[n] for n in OUTCOME_SERIES])}
    return page.evaluate(script)


def check_page_matches(shown: dict[str, Any], data: dict[str, Any]) -> None:
    """Every number and row shown is the JSON's."""
    assert shown["version"] == data["version"]
    assert shown["uptime"] == fmt_duration(data["uptime"])
    assert shown["updated"] == fmt_time(data["now"])
    for name in ("total", "incoming", "active", "deferred", "hold"):
        assert shown["tiles"][f"queue-{name}"] == fmt_count(data["queue"][name]), name
    for name in OUTCOME_SERIES:
        assert shown["tiles"][f"total-{name}"] == fmt_count(data["totals"][name]), name
        assert data["totals"][name] == sum(data["outcomes"][name])

    def table(rows: list[list[str]]) -> list[list[str]]:
        return rows or [["none"]]

    assert shown["destinations"] == table([
        [d["destination"], fmt_count(d["deferred"]), d["last_reply"] or "—",
         fmt_time(d["last_time"]), fmt_time(d["last_delivered"])]
        for d in data["destinations"]])
    assert shown["bounces"] == table([
        [fmt_time(b["time"]), b["queue_id"] or "—", b["recipient"], b["reply"] or "—",
         b["outcome"]] for b in data["bounces"]])
    assert shown["suspensions"] == table([
        [s["id"], s["domain"], s["reason"] or "—", fmt_time(s["created"]),
         fmt_time(s["until"])] for s in data["suspensions"]])
    assert shown["settings"] == table([[k, fmt_value(v)] for k, v in data["settings"].items()])

    depth = data["depth"]
    assert shown["charts"]["depth"]["labels"] == DEPTH_SERIES
    assert shown["charts"]["depth"]["data"] == [depth["time"],
                                                *(depth[n] for n in DEPTH_SERIES)]
    outcomes = data["outcomes"]
    assert shown["charts"]["outcomes"]["labels"] == OUTCOME_SERIES
    assert shown["charts"]["outcomes"]["data"] == [outcomes["time"],
                                                   *(outcomes[n] for n in OUTCOME_SERIES)]
    assert len(outcomes["time"]) == data["window"] // data["bucket"]


def check_charts_drew(shown: dict[str, Any], data: dict[str, Any]) -> None:
    """Both canvases are painted, in each series' colour where the series
    has points to draw."""
    for name, series, values in (
            ("depth", DEPTH_SERIES, data["depth"]),
            ("outcomes", OUTCOME_SERIES, data["outcomes"])):
        canvas = shown["canvas"][name]
        assert canvas is not None, f"no canvas in the {name} chart"
        assert canvas["width"] > 200 and canvas["height"] > 100
        assert canvas["painted"] > 1000, (name, canvas)
        for label, count in zip(series, canvas["counts"], strict=True):
            # a series of zeros lies under the next one drawn on the axis
            if len(values[label]) >= 2 and any(values[label]):
                assert count > 5, f"the {name} chart drew no {label} line: {canvas}"


def test_status_page_in_chromium(page_server):
    require_browser()
    from playwright.sync_api import sync_playwright

    url, token, known = page_server
    ARTIFACTS.mkdir(exist_ok=True)
    console: list[tuple[str, str, str]] = []
    uncaught: list[str] = []
    answers: list[Any] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.on("console", lambda m: console.append(
                (m.type, m.text, (m.location or {}).get("url", ""))))
            page.on("pageerror", lambda e: uncaught.append(str(e)))
            page.on("response", lambda r: answers.append(r)
                    if r.url.endswith("/api/v1/status") and r.status == 200 else None)
            page.goto(url)
            page.wait_for_function(
                "() => (window.mailoutStatus && window.mailoutStatus.renders >= 1)"
                " || !document.getElementById('token-form').hidden", timeout=15_000)
            asked = page.is_visible("#token-form")
            if known:
                assert asked, "the API answered 401 but the page asked for no token"
            if asked:
                assert token is not None, "the page asks for a token: set MAILOUT_STATUS_TOKEN"
                # No token yet: the API said 401 and the page asks for one.
                assert "needs" in page.text_content("#token-why")
                if known:
                    page.fill("#token", "not-the-token")
                    page.click("#token-form button")
                    page.wait_for_function(
                        "() => document.getElementById('token-why').textContent"
                        ".includes('refused') && !document.getElementById('token-form').hidden",
                        timeout=10_000)
                page.fill("#token", token)
                page.click("#token-form button")

            page.wait_for_function(
                "() => window.mailoutStatus && window.mailoutStatus.renders >= 1",
                timeout=15_000)
            shown = read_page(page)
            data = answer_for(answers, shown["renderedNow"])
            assert shown["tokenHidden"]
            check_page_matches(shown, data)
            check_charts_drew(shown, data)
            assert not shown["pwned"]
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # It polls: the next answer (5 s later) is drawn too.
            first = shown["renderedNow"]
            page.wait_for_function("first => document.body.dataset.renderedNow !== first",
                                   arg=first, timeout=15_000)
            again = read_page(page)
            assert again["renders"] > shown["renders"]
            check_page_matches(again, answer_for(answers, again["renderedNow"]))

            if known:
                check_known_history(page, data, shown)
                # The token is kept for the tab: a reload needs none.
                answers.clear()
                page.reload()
                page.wait_for_function("() => window.mailoutStatus.renders >= 1",
                                       timeout=15_000)
                assert page.is_hidden("#token-form")
        finally:
            browser.close()

    assert not uncaught, uncaught
    refused = ("Failed to load resource: the server responded with a status of 401",
               "Failed to load resource: the server responded with a status of 403")
    errors = [c for c in console if c[0] == "error"
              and not (c[1].startswith(refused) and c[2].endswith("/api/v1/status"))]
    assert not errors, errors
    if known:
        assert any(c[1].startswith(refused[0]) for c in console if c[0] == "error")
    assert SCREENSHOT.stat().st_size > 10_000


def answer_for(answers: list[Any], rendered_now: str) -> dict[str, Any]:
    """The API's answer the page drew: the one whose C{now} it shows in
    C{body[data-rendered-now]} (JavaScript's and Python's shortest float
    reprs agree)."""
    for r in reversed(answers):
        body = r.json()
        if float(body["now"]) == float(rendered_now):
            return body
    raise AssertionError(f"no answer with now={rendered_now} among {len(answers)}")


def check_known_history(page: Any, data: dict[str, Any], shown: dict[str, Any]) -> None:
    """What only the known history can tell."""
    assert data["queue"] == {"incoming": 59 % 3, "active": 1 + 59 % 4, "deferred": 10 + 59 % 7,
                             "hold": 2, "total": 2 + 4 + 13 + 2}
    assert data["totals"]["delivered"] == sum((k * 7) % 13 for k in range(60))
    assert data["totals"]["bounced"] == 6 + 1
    assert {d["destination"] for d in data["destinations"]} == set(DESTINATIONS)
    assert shown["tiles"]["total-delivered"] == fmt_count(data["totals"]["delivered"])
    # the hostile reply is text in the first bounce row, not markup
    assert shown["bounces"][0][3] == HOSTILE_REPLY
    assert shown["bounces"][0][4] == "expired"
    assert page.query_selector("#bounces img") is None
    assert page.query_selector("#bounces b") is None
    # the settings: values shown, secrets not
    settings = dict((row[0], row[1]) for row in shown["settings"])
    assert settings["relay"] == "smtp://relay.example:587"
    assert settings["auth_user"] == "ops@example.com"
    assert settings["auth_password_file"] == "(set)"
    assert settings["max_connections"] == "20"
    html = page.content()
    assert PASSWORD not in html and "relay-password" not in html
    assert TOKEN not in html
    assert shown["suspensions"][0][:3] == ["s-1", "slow.example", "storm of 421s"]
    assert shown["uptime"].startswith("3d 1h 2m")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(*sys.argv[2:])
    else:
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else __file__} "
                 "serve PORT_FILE SECRET_FILE QUEUE_DIR")
