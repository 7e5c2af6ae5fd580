"""The daemon's HTTP server (twisted_mailout.daemon.http), in memory: the real
twisted.web site and HTTP parser over a StringTransport, the real QueueAdmin and
Scheduler over a MemoryStore, a scripted connector, a task.Clock; every route,
every error status, the token, the ndjson stream, control.json."""

from __future__ import annotations

import http.client
import io
import json
import os
import queue as queue_mod
import random
import stat
import threading
import time

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import resource

from tests.support.fakes import ScriptedConnector
from twisted_mailout.admin import QueueAdmin
from twisted_mailout.daemon import http as mhttp
from twisted_mailout.daemon.config import (
    Config,
    ConfigError,
    http_endpoint_is_local,
    read_token_file,
)
from twisted_mailout.delivery.scheduler import RetryPolicy, Scheduler
from twisted_mailout.envelope import Reply
from twisted_mailout.testing.memorystore import MemoryStore

MSG = b"From: a@example.com\r\nSubject: hello\r\nMessage-ID: <m1@example.com>\r\n\r\nbody\r\n"
OK = Reply(250, "2.0.0 Ok")
LATER = Reply(451, "4.3.0 try later")
TOKEN = "s3cret-token"
UNIX = UNIXAddress(b"/q/control.sock")
TCP = IPv4Address("TCP", "127.0.0.1", 8025)


class Inline:
    """Runs the listing 'thread' at once, and hands its calls over at once."""

    @staticmethod
    def run(f):
        f()

    @staticmethod
    def call(f, *a):
        f(*a)


class Response:
    def __init__(self, raw: bytes, method: str = "GET"):
        class Sock:
            def makefile(self, mode):
                return io.BytesIO(raw)

        r = http.client.HTTPResponse(Sock(), method=method)
        r.begin()
        self.status = r.status
        self.headers = r.headers
        self.body = r.read()
        self.chunked = r.chunked

    @property
    def json(self):
        assert self.headers["Content-Type"] == "application/json", self.headers
        return json.loads(self.body)

    @property
    def lines(self):
        assert self.headers["Content-Type"] == "application/x-ndjson"
        return [json.loads(x) for x in self.body.splitlines()]

    def error(self, status, code):
        assert self.status == status, (self.status, self.body)
        body = self.json
        assert body["error"]["status"] == status and body["error"]["code"] == code, body
        assert body["error"]["message"]
        return body["error"]["message"]


class Harness:
    """A live scheduler and admin over a MemoryStore, served by the real site."""

    def __init__(self, token=None, status=None, ready=None, live=True, threads=Inline):
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.store = MemoryStore()
        self.replies = {}
        self.connector = ScriptedConnector(lambda d, r: self.replies.get(d, OK))
        self.outcomes = []
        self.sched = None
        if live:
            self.sched = Scheduler(self.store, self.connector, self.clock,
                                   retry=RetryPolicy(base=300, max=4000, lifetime=86400,
                                                     bounce_lifetime=3600, jitter=0),
                                   observers=[self.outcomes.append],
                                   reporting_mta="mx.mailout.test", rng=random.Random(0))
        self.admin = QueueAdmin(self.store, self.clock, scheduler=self.sched,
                                reporting_mta="mx.mailout.test", source="api")
        self.reasons = []
        self.api = mhttp.ControlAPI(self.admin, self.clock, token=token, status=status,
                                    run_in_thread=threads.run, call_from_thread=threads.call)
        self.root = mhttp.build_root(self.api, ready or (lambda: list(self.reasons)))
        self.site = mhttp.ControlSite(self.root, reactor=self.clock)

    def start(self):
        self.admin.start()
        if self.sched is not None:
            self.sched.start()

    def enqueue(self, sender="a@example.com", rcpts=("b@example.org",)):
        qid = self.store.enqueue(sender, list(rcpts), MSG)
        if self.sched is not None:
            self.sched.pickup()
        return qid

    def delivered(self):
        return [o.recipient for o in self.outcomes if o.status.value == "delivered"]

    def connect(self, where=UNIX):
        proto = self.site.buildProtocol(where)
        transport = StringTransport(hostAddress=where, peerAddress=where)
        proto.makeConnection(transport)
        return proto, transport

    def request(self, method, path, body=None, headers=None, where=UNIX, raw_body=None):
        hdrs = {"Host": "localhost", "Connection": "close"}
        if body is not None:
            raw_body = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        if raw_body is not None:
            hdrs["Content-Length"] = str(len(raw_body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in hdrs.items() if v is not None) + "\r\n"
        proto, transport = self.connect(where)
        proto.dataReceived(head.encode() + (raw_body or b""))
        return Response(transport.value(), method)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body=body, **kw)


@pytest.fixture
def h():
    harness = Harness()
    harness.start()
    return harness


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- health ------------------------------------------------------------------------------


def test_healthz_and_readyz(h):
    r = h.get("/healthz")
    assert r.status == 200 and r.json == {"status": "alive"}
    r = h.get("/readyz")
    assert r.status == 200 and r.json["status"] == "ready"
    h.reasons.append("the queue is not open yet (recovery is running)")
    r = h.get("/readyz")
    assert r.status == 503
    assert r.json == {"status": "not ready",
                      "reasons": ["the queue is not open yet (recovery is running)"]}


def test_health_endpoints_take_only_get(h):
    r = h.post("/healthz", {})
    r.error(405, "method_not_allowed")
    assert r.headers["Allow"] == "GET, HEAD"
    h.get("/healthz/more").error(404, "not_found")


def test_root_index_and_unknown_paths_are_json(h):
    r = h.get("/")
    assert r.status == 200 and r.json["api"] == "/api/v1/"
    h.get("/nothing-here").error(404, "not_found")
    h.get("/api/").error(404, "not_found")
    h.get("/api/v2/messages").error(404, "not_found")
    h.get("/api/v1/nothing").error(404, "not_found")


class Data(resource.Resource):
    isLeaf = True

    def __init__(self, data):
        super().__init__()
        self.data = data

    def render_GET(self, request):
        return self.data


def test_extra_resources_are_mounted_and_may_replace_the_index(h):
    root = mhttp.build_root(h.api, lambda: [], {b"metrics": Data(b"m 1\n"),
                                                b"": Data(b"<html>")})
    h.site = mhttp.ControlSite(root, reactor=h.clock)
    r = h.get("/metrics")
    assert r.status == 200 and r.body == b"m 1\n"
    r = h.get("/")
    assert r.body == b"<html>"
    assert h.get("/healthz").json == {"status": "alive"}


# -- listing -----------------------------------------------------------------------------


def test_list_messages_json_with_filters(h):
    h.replies["example.org"] = LATER
    a = h.enqueue(rcpts=["b@example.org"])
    b = h.enqueue(sender="c@example.net", rcpts=["d@example.com"])
    h.clock.advance(0)
    assert h.delivered() == ["d@example.com"]  # b is gone, a deferred
    r = h.get("/api/v1/messages")
    assert r.status == 200
    body = r.json
    assert body["count"] == 1 == len(body["messages"])
    [row] = body["messages"]
    assert row["queue_id"] == a and row["queue_name"] == "deferred"
    assert row["recipients"][0]["last_reply"] == "451 4.3.0 try later"
    h.get(f"/api/v1/messages?ids={b}").error(404, "not_found")
    r = h.get("/api/v1/messages?domain=example.org&state=deferred")
    assert [m["queue_id"] for m in r.json["messages"]] == [a]
    assert h.get("/api/v1/messages?sender=nobody@example.com").json == {
        "messages": [], "count": 0}
    r = h.get(f"/api/v1/messages?ids={a}")
    assert [m["queue_id"] for m in r.json["messages"]] == [a]
    assert r.headers["Cache-Control"] == "no-store"


def test_list_messages_ids_may_repeat_and_unknown_ids_are_404(h):
    h.replies["example.org"] = LATER
    a = h.enqueue()
    b = h.enqueue()
    r = h.get(f"/api/v1/messages?ids={a}&ids={b}")
    assert sorted(m["queue_id"] for m in r.json["messages"]) == sorted([a, b])
    msg = h.get(f"/api/v1/messages?ids={a},NOSUCH1").error(404, "not_found")
    assert "NOSUCH1" in msg


@pytest.mark.parametrize("query", [
    "state=frozen", "older_than=soon", "older_than=-1", "older_than=inf", "all=maybe",
    "bogus=1", "format=xml", "ids=not-a-qid", "ids=a,,b", "domain=%20", "sender=a%0Ab",
    "format=json&format=ndjson", "all=1&ids=ABC", "all=", "all=yes",
    "domain=" + "x" * 321, "ids=" + ",".join(["ABC"] * 600),
])
def test_list_messages_bad_parameters_are_400(h, query):
    h.get("/api/v1/messages?" + query).error(400, "bad_request")


def test_list_ndjson_streams_one_row_a_line(h):
    h.replies["example.org"] = LATER
    qids = sorted(h.enqueue() for _ in range(3))
    r = h.get("/api/v1/messages?format=ndjson")
    assert r.status == 200
    assert r.chunked  # streamed: no Content-Length known in advance
    assert sorted(row["queue_id"] for row in r.lines) == qids


def test_list_ndjson_of_an_empty_selection_is_an_empty_200(h):
    r = h.get("/api/v1/messages?format=ndjson")
    assert r.status == 200 and r.body == b""
    assert r.headers["Content-Type"] == "application/x-ndjson"


def test_list_ndjson_with_an_unknown_id_is_a_404_before_any_row(h):
    h.get("/api/v1/messages?format=ndjson&ids=NOSUCH").error(404, "not_found")


def test_list_ndjson_sends_its_first_line_before_the_listing_ends(h, monkeypatch):
    h.replies["example.org"] = LATER
    for _ in range(3):
        h.enqueue()
    proto, transport = h.connect()
    seen_when_pulling_second = []
    real = h.admin.iter_rows

    def rows(*a, **kw):
        it = real(*a, **kw)
        yield next(it)
        seen_when_pulling_second.append(transport.value())
        yield from it

    monkeypatch.setattr(h.admin, "iter_rows", rows)
    proto.dataReceived(b"GET /api/v1/messages?format=ndjson HTTP/1.1\r\nHost: localhost\r\n"
                       b"Connection: close\r\n\r\n")
    [before] = seen_when_pulling_second
    assert b"200 OK" in before and b'"queue_id"' in before
    assert len(Response(transport.value()).lines) == 3


def test_list_ndjson_error_after_the_first_row_ends_the_stream_with_an_error_line(
        h, monkeypatch, logged):
    h.replies["example.org"] = LATER
    h.enqueue()
    h.enqueue()
    real = h.admin.iter_rows

    def rows(*a, **kw):
        it = real(*a, **kw)
        yield next(it)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(h.admin, "iter_rows", rows)
    r = h.get("/api/v1/messages?format=ndjson")
    assert r.status == 200
    first, last = r.lines
    assert "queue_id" in first
    assert last["error"]["status"] == 500 and last["error"]["code"] == "internal"
    assert any(e.get("log_failure") is not None and "Input/output" in str(e["log_failure"])
               for e in logged)


class Threads:
    """A real listing thread; its calls to the reactor queue up for the test."""

    def __init__(self):
        self.calls = queue_mod.Queue()

    def run(self, f):
        threading.Thread(target=f, daemon=True).start()

    def call(self, f, *a):
        self.calls.put((f, a))

    def pump_one(self, timeout=10):
        f, a = self.calls.get(timeout=timeout)
        f(*a)


def test_ndjson_thread_stops_when_the_client_goes_away(monkeypatch):
    threads = Threads()
    h = Harness(threads=threads)
    h.start()
    h.replies["example.org"] = LATER
    h.enqueue()
    h.enqueue()
    go_on = threading.Event()
    closed = threading.Event()
    real = h.admin.iter_rows

    def rows(*a, **kw):
        try:
            it = real(*a, **kw)
            yield next(it)
            go_on.wait(10)
            yield from it
        finally:
            closed.set()

    monkeypatch.setattr(h.admin, "iter_rows", rows)
    proto, transport = h.connect()
    proto.dataReceived(b"GET /api/v1/messages?format=ndjson HTTP/1.1\r\nHost: x\r\n\r\n")
    threads.pump_one()  # the first line
    assert b'"queue_id"' in transport.value()
    proto.connectionLost(Failure(ConnectionDone()))
    go_on.set()
    assert closed.wait(10), "the listing thread did not stop"


def test_ndjson_thread_waits_while_the_connection_is_paused(monkeypatch):
    threads = Threads()
    h = Harness(threads=threads)
    h.start()
    h.replies["example.org"] = LATER
    for _ in range(3):
        h.enqueue()
    monkeypatch.setattr(mhttp, "STREAM_CHUNK", 1)  # every row is handed over alone
    go_on = threading.Event()
    real = h.admin.iter_rows

    def rows(*a, **kw):
        it = real(*a, **kw)
        yield next(it)
        go_on.wait(10)
        yield from it

    monkeypatch.setattr(h.admin, "iter_rows", rows)
    waiting = threading.Event()
    real_wait = mhttp._RowStream._wait

    def wait(self):
        waiting.set()
        return real_wait(self)

    monkeypatch.setattr(mhttp._RowStream, "_wait", wait)
    proto, transport = h.connect()
    proto.dataReceived(b"GET /api/v1/messages?format=ndjson HTTP/1.1\r\nHost: x\r\n\r\n")
    threads.pump_one()  # the first line
    [stream] = h.api._streams
    stream.pauseProducing()  # as the transport does when its buffer is full
    go_on.set()
    assert waiting.wait(10)  # the second row is ready to go
    assert threads.calls.empty()  # paused: it is not handed over
    stream.resumeProducing()
    for _ in range(3):  # the second row, the third, the end
        threads.pump_one()
    assert len(Response(transport.value()).lines) == 3


def test_stop_ends_every_listing_thread(monkeypatch):
    threads = Threads()
    h = Harness(threads=threads)
    h.start()
    h.replies["example.org"] = LATER
    for _ in range(2):
        h.enqueue()
    closed = threading.Event()
    monkeypatch.setattr(mhttp, "STREAM_CHUNK", 1)
    real = h.admin.iter_rows

    def rows(*a, **kw):
        try:
            yield from real(*a, **kw)
        finally:
            closed.set()

    monkeypatch.setattr(h.admin, "iter_rows", rows)
    proto, _ = h.connect()
    proto.dataReceived(b"GET /api/v1/messages?format=ndjson HTTP/1.1\r\nHost: x\r\n\r\n")
    [stream] = h.api._streams
    stream.pauseProducing()
    h.api.stop()
    assert closed.wait(10)


# -- one message, summary ----------------------------------------------------------------


def test_show_a_message_with_and_without_its_body(h):
    h.replies["example.org"] = LATER
    qid = h.enqueue()
    r = h.get(f"/api/v1/messages/{qid}")
    assert r.status == 200
    d = r.json
    assert d["queue_id"] == qid and d["queue_name"] == "deferred"
    assert ["Subject", "hello"] in d["headers"]
    assert d["recipients"][0]["history"][0]["code"] == 451
    assert "message" not in d
    d = h.get(f"/api/v1/messages/{qid}?body=1").json
    assert d["message"].endswith("body\r\n")


def test_show_unknown_and_malformed_ids(h):
    h.get("/api/v1/messages/NOSUCH").error(404, "not_found")
    h.get("/api/v1/messages/bad%21id").error(400, "bad_request")
    h.get("/api/v1/messages/ABC?body=perhaps").error(400, "bad_request")
    h.get("/api/v1/messages/ABC?extra=1").error(400, "bad_request")


def test_summary_by_domain_and_sender(h):
    h.replies["example.org"] = LATER
    h.replies["example.net"] = LATER
    h.enqueue(rcpts=["b@example.org"])
    h.enqueue(rcpts=["c@example.org", "d@example.net"])
    s = h.get("/api/v1/summary").json
    assert s["by"] == "domain" and s["messages"] == 2
    assert {r["domain"]: r["total"] for r in s["rows"]} == {"example.org": 2, "example.net": 1}
    s = h.get("/api/v1/summary?by=sender&top=1").json
    assert s["rows"] == [{"domain": "example.com", "total": 2, "counts": s["rows"][0]["counts"]}]
    s = h.get("/api/v1/summary?domain=example.net").json
    assert s["messages"] == 1


@pytest.mark.parametrize("query", ["by=recipient", "top=-1", "top=many", "state=x"])
def test_summary_bad_parameters(h, query):
    h.get("/api/v1/summary?" + query).error(400, "bad_request")


# -- actions -----------------------------------------------------------------------------


def test_hold_keeps_mail_from_the_scheduler_until_release(h):
    h.replies["example.org"] = LATER
    qid = h.enqueue()
    r = h.post("/api/v1/actions/hold", {"selector": {"ids": [qid]}, "reason": "check it"})
    assert r.status == 200
    assert r.json == {"action": "hold", "matched": 1, "changed": 1, "queue_ids": [qid],
                      "skipped": {}, "dsn_queue_ids": []}
    h.replies.pop("example.org")
    h.clock.advance(5 * 86400)
    assert h.delivered() == []
    row = h.get(f"/api/v1/messages?ids={qid}").json["messages"][0]
    assert row["queue_name"] == "hold"
    r = h.post("/api/v1/actions/release", {"selector": {"ids": [qid]}})
    assert r.json["changed"] == 1
    h.clock.advance(0)
    assert h.delivered() == ["b@example.org"]


def test_actions_are_logged_with_the_reason_and_source(h, logged):
    h.replies["example.org"] = LATER
    qid = h.enqueue()
    h.post("/api/v1/actions/hold", {"selector": {"all": True}, "reason": "check"})
    [e] = [e for e in logged if e.get("log_namespace") == "twisted_mailout.admin"]
    assert (e["qid"], e["action"], e["reason"], e["source"]) == (qid, "hold", "check", "api")


def test_delete_and_bounce(h):
    h.replies["example.org"] = LATER
    gone = h.enqueue()
    bounced = h.enqueue(sender="s@example.net")
    r = h.post("/api/v1/actions/delete", {"selector": {"ids": [gone]}})
    assert r.json["queue_ids"] == [gone]
    r = h.post("/api/v1/actions/bounce", {"selector": {"ids": [bounced]},
                                          "reason": "spam run"})
    body = r.json
    assert body["queue_ids"] == [bounced] and len(body["dsn_queue_ids"]) == 1
    ids = {m["queue_id"] for m in h.get("/api/v1/messages").json["messages"]}
    assert gone not in ids and bounced not in ids
    h.get(f"/api/v1/messages/{gone}").error(404, "not_found")


def test_flush_takes_no_selector_and_requeue_needs_one(h):
    h.replies["example.org"] = LATER
    qid = h.enqueue()
    h.replies.pop("example.org")
    r = h.post("/api/v1/actions/flush")  # no body at all
    assert r.status == 200 and r.json["queue_ids"] == [qid]
    h.clock.advance(0)
    assert h.delivered() == ["b@example.org"]
    h.post("/api/v1/actions/requeue", {}).error(400, "bad_request")
    h.post("/api/v1/actions/requeue", {"selector": {"all": False}}).error(400, "bad_request")


@pytest.mark.parametrize("action", ["hold", "release", "delete", "bounce", "requeue"])
def test_an_empty_selector_is_refused(h, action):
    qid = h.enqueue()
    h.post(f"/api/v1/actions/{action}", {"reason": "x"}).error(400, "bad_request")
    assert h.get(f"/api/v1/messages/{qid}").status in (200, 404)  # untouched or delivered


def test_action_with_unknown_ids_changes_nothing(h):
    h.replies["example.org"] = LATER
    qid = h.enqueue()
    h.post("/api/v1/actions/hold", {"selector": {"ids": [qid, "NOSUCH"]}}).error(
        404, "not_found")
    assert h.get(f"/api/v1/messages/{qid}").json["queue_name"] == "deferred"


@pytest.mark.parametrize("raw, ctype", [
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b'{"selector": {"all": true}}', "text/plain"),
    (b'{"selector": {"all": true}}', None),
    (b'{"selector": {"all": true}, "extra": 1}', "application/json"),
    (b'{"selector": {"all": "yes"}}', "application/json"),
    (b'{"selector": {"older_than": NaN}}', "application/json"),
    (b'{"selector": {"older_than": -5}}', "application/json"),
    (b'{"selector": {"ids": "ABC"}}', "application/json"),
    (b'{"selector": {"colour": "red"}}', "application/json"),
    (b'{"selector": [1]}', "application/json"),
    (b'{"selector": {"all": true}, "reason": 5}', "application/json"),
    (b'{"selector": {"all": true}, "reason": "two\\nlines"}', "application/json"),
    (b'\xff\xfe', "application/json"),
    (b'{"selector": {"ids": {}}}', "application/json"),
    (b'{"selector": {"domain": null}}', "application/json"),
    (b'{"selector": {"all": true}, "reason": null}', "application/json"),
    (b'{"selector": {"recipient": "' + b"r" * 321 + b'"}}', "application/json"),
])
def test_bad_action_bodies_are_400(h, raw, ctype):
    qid = h.enqueue()
    h.request("POST", "/api/v1/actions/hold", raw_body=raw,
              headers={"Content-Type": ctype}).error(400, "bad_request")
    r = h.get(f"/api/v1/messages?ids={qid}")
    assert r.status == 404 or r.json["messages"][0]["queue_name"] != "hold"


def test_unknown_action_and_wrong_methods(h):
    h.post("/api/v1/actions/explode", {"selector": {"all": True}}).error(404, "not_found")
    r = h.get("/api/v1/actions/hold")
    r.error(405, "method_not_allowed")
    assert r.headers["Allow"] == "POST"
    r = h.request("PUT", "/api/v1/messages")
    r.error(405, "method_not_allowed")
    assert r.headers["Allow"] == "GET, HEAD"
    r = h.request("DELETE", "/api/v1/suspensions")
    assert r.headers["Allow"] == "GET, HEAD, POST"
    r.error(405, "method_not_allowed")


def test_head_answers_like_get_without_a_body(h):
    r = h.request("HEAD", "/api/v1/summary")
    assert r.status == 200 and r.body == b""


# -- suspensions -------------------------------------------------------------------------


def test_suspend_list_conflict_and_cancel(h):
    r = h.post("/api/v1/suspensions", {"domain": "Example.ORG", "duration": 600,
                                        "reason": "their MX is broken"})
    assert r.status == 201
    s = r.json
    assert s["domain"] == "example.org" and s["reason"] == "their MX is broken"
    assert s["until"] == pytest.approx(s["created"] + 600)
    assert h.get("/api/v1/suspensions").json == {"suspensions": [s]}
    msg = h.post("/api/v1/suspensions", {"domain": "example.org", "duration": 60}).error(
        409, "conflict")
    assert s["id"] in msg
    qid = h.enqueue()
    h.clock.advance(1)
    assert h.delivered() == []  # suspended: not attempted
    r = h.request("DELETE", f"/api/v1/suspensions/{s['id']}", body={"reason": "fixed"})
    assert r.status == 200 and r.json == s
    h.clock.advance(0)
    assert h.delivered() == ["b@example.org"]
    assert h.get("/api/v1/suspensions").json == {"suspensions": []}
    h.request("DELETE", f"/api/v1/suspensions/{s['id']}").error(404, "not_found")
    assert qid


@pytest.mark.parametrize("body", [
    {"domain": "example.org"}, {"domain": "example.org", "duration": 0},
    {"domain": "example.org", "duration": -3}, {"domain": "example.org", "duration": "1h"},
    {"domain": "example.org", "duration": True}, {"domain": "a@example.org", "duration": 5},
    {"domain": "exa mple.org", "duration": 5}, {"domain": ".", "duration": 5},
    {"domain": 7, "duration": 5}, {"duration": 5},
    {"domain": "example.org", "duration": 5, "until": 9},
    {"domain": "example.org", "duration": 5, "reason": "a\r\nb"},
    {"domain": "exa\u0000mple.org", "duration": 5}, {"domain": "x\u007f", "duration": 5},
    {"domain": "example.org", "duration": 5, "reason": None},
])
def test_bad_suspensions_are_400(h, body):
    h.post("/api/v1/suspensions", body).error(400, "bad_request")
    assert h.get("/api/v1/suspensions").json == {"suspensions": []}


def test_infinite_duration_is_400(h):
    h.request("POST", "/api/v1/suspensions", raw_body=b'{"domain": "x.org", "duration": '
              b'Infinity}', headers={"Content-Type": "application/json"}).error(
        400, "bad_request")


# -- status, openapi, errors -------------------------------------------------------------


def test_status_built_in_and_given():
    h = Harness()
    h.start()
    s = h.get("/api/v1/status").json
    assert s["pid"] == os.getpid() and s["suspensions"] == [] and "counts" in s
    h = Harness(status=lambda: {"queue": {"total": 3}})
    assert h.get("/api/v1/status").json == {"queue": {"total": 3}}
    h = Harness(status=lambda: defer.succeed({"later": True}))
    assert h.get("/api/v1/status").json == {"later": True}


def test_openapi_document_is_served_and_valid(h):
    r = h.get("/api/v1/openapi.json")
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    doc = json.loads(r.body)
    assert doc["openapi"].startswith("3.1")
    from openapi_spec_validator import validate

    validate(doc)


def test_openapi_document_lists_every_route_and_action():
    from twisted_mailout.daemon.status import STATUS_SCHEMA

    doc = json.loads(mhttp._openapi_document())
    assert set(doc["paths"]) == {
        "/api/v1/messages", "/api/v1/messages/{qid}", "/api/v1/summary",
        "/api/v1/actions/{action}", "/api/v1/suspensions", "/api/v1/suspensions/{id}",
        "/api/v1/status", "/api/v1/openapi.json", "/healthz", "/readyz"}
    [param] = doc["paths"]["/api/v1/actions/{action}"]["post"]["parameters"]
    assert tuple(param["schema"]["enum"]) == mhttp.ACTIONS
    assert doc["components"]["schemas"]["Status"] == STATUS_SCHEMA


def test_an_unexpected_error_is_a_500_logged_with_its_traceback(h, monkeypatch, logged):
    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(h.admin, "summary", broken)
    msg = h.get("/api/v1/summary").error(500, "internal")
    assert "boom" not in msg and "RuntimeError" in msg
    [f] = [e["log_failure"] for e in logged if e.get("log_failure") is not None]
    assert f.check(RuntimeError)


def test_requests_wait_for_the_daemon_to_start():
    h = Harness()
    h.start()
    started = defer.Deferred()
    h.api.wait_started = lambda: started
    proto, transport = h.connect()
    proto.dataReceived(b"GET /api/v1/summary HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert transport.value() == b""
    started.callback(None)
    assert Response(transport.value()).status == 200


def test_changing_requests_and_failures_are_logged_once_reads_are_not(h, logged):
    h.get("/api/v1/summary")
    h.post("/api/v1/actions/flush")
    h.get("/api/v1/messages/NOSUCH")
    lines = [e for e in logged if e.get("log_namespace") == "twisted_mailout.daemon.http"]
    assert [(e["method"], e["code"]) for e in lines] == [("POST", 200), ("GET", 404)]


# -- who may use the API -----------------------------------------------------------------


def test_token_needed_off_the_unix_socket():
    h = Harness(token=TOKEN)
    h.start()
    r = h.get("/api/v1/summary", where=TCP)
    r.error(401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    h.get("/api/v1/summary", where=TCP, headers={"Authorization": "Basic eDp5"}).error(
        401, "unauthorized")
    h.get("/api/v1/summary", where=TCP, headers={"Authorization": "Bearer wrong"}).error(
        403, "forbidden")
    r = h.get("/api/v1/summary", where=TCP, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200
    assert h.get("/api/v1/summary", where=UNIX).status == 200


@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/openapi.json", "/api/v1/nothing",
                                  "/api/", "/api/v1/actions/hold"])
def test_every_api_path_needs_the_token_first(path):
    h = Harness(token=TOKEN)
    h.start()
    h.get(path, where=TCP).error(401, "unauthorized")


def test_health_needs_no_token():
    h = Harness(token=TOKEN)
    h.start()
    assert h.get("/healthz", where=TCP).status == 200
    assert h.get("/readyz", where=TCP).status == 200


def test_a_refused_token_changes_nothing():
    h = Harness(token=TOKEN)
    h.start()
    h.replies["example.org"] = LATER
    qid = h.enqueue()
    h.post("/api/v1/actions/delete", {"selector": {"all": True}}, where=TCP,
           headers={"Authorization": "Bearer nope"}).error(403, "forbidden")
    assert h.get(f"/api/v1/messages/{qid}").status == 200


@pytest.mark.parametrize("host, ok", [
    ("localhost", True), ("localhost:8025", True), ("127.0.0.1:8025", True),
    ("[::1]:8025", True), ("127.1.2.3", True), (None, True),
    ("evil.example:8025", False), ("192.0.2.1", False), ("localhost.evil.example", False),
])
def test_without_a_token_tcp_requests_must_name_a_loopback_host(h, host, ok):
    r = h.get("/api/v1/summary", where=TCP, headers={"Host": host})
    if ok:
        assert r.status == 200
    else:
        r.error(403, "forbidden")


# -- the reactor watch -------------------------------------------------------------------


def test_reactor_watch_reports_a_stall():
    clock = task.Clock()
    w = mhttp.ReactorWatch(clock)
    w.start()
    clock.advance(1)
    clock.advance(1)
    assert w.stalled() is None and w.lag == 0
    clock.advance(15)  # the reactor was blocked: one late tick
    assert "stalled" in w.stalled()
    clock.advance(1)
    assert w.stalled() is None
    w.stop()
    assert not clock.getDelayedCalls()


def test_reactor_watch_sees_a_stall_before_the_late_tick():
    clock = task.Clock()
    w = mhttp.ReactorWatch(clock)
    w.start()
    clock.rightNow += 12  # time passes, no tick has run yet
    assert "stalled" in w.stalled()


# -- endpoints, control.json -------------------------------------------------------------


class FakePort:
    def __init__(self, address):
        self.address = address
        self.listening = True

    def getHost(self):
        return self.address

    def stopListening(self):
        self.listening = False


class ListenReactor(MemoryReactorClock):
    """Listens nowhere; each port reports the address it was asked for."""

    def __init__(self, refuse=()):
        super().__init__()
        self.refuse = refuse
        self.ports = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.refuse:
            from twisted.internet.error import CannotListenError

            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        p = FakePort(IPv4Address("TCP", interface or "0.0.0.0", port or 40001))
        self.ports.append(p)
        return p

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        p = FakePort(UNIXAddress(address.encode() if isinstance(address, str) else address))
        self.ports.append(p)
        return p


def make_service(tmp_path, descriptions, token=None, token_file=None, refuse=(),
                 optional=frozenset()):
    reactor = ListenReactor(refuse)
    h = Harness(token=token)
    failures = []
    svc = mhttp.HTTPService(reactor, h.site, descriptions, str(tmp_path), h.api,
                            token_file=token_file, optional=optional,
                            on_failure=failures.append, watch=mhttp.ReactorWatch(reactor))
    return svc, reactor, failures


def test_control_json_lists_the_bound_endpoints_and_goes_at_stop(tmp_path):
    sock = tmp_path / "control.sock"
    svc, reactor, failures = make_service(
        tmp_path, [f"unix:{sock}:mode=600", "tcp:8025:interface=127.0.0.1"])
    svc.startService()
    path = tmp_path / "control.json"
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid()
    assert info["endpoints"] == [f"unix:{sock}", "tcp:127.0.0.1:8025"]
    assert info["token_file"] is None and info["started"] == reactor.seconds()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert failures == []
    svc.stopService()
    assert not path.exists()
    assert not any(p.listening for p in reactor.ports)
    assert not reactor.getDelayedCalls()  # the watch stopped


def test_control_json_names_the_token_file(tmp_path):
    tf = tmp_path / "token"
    svc, _, _ = make_service(tmp_path, ["tcp:8025"], token=TOKEN, token_file=str(tf))
    svc.startService()
    info = json.loads((tmp_path / "control.json").read_text())
    assert info["token_file"] == str(tf) and info["endpoints"] == ["tcp:0.0.0.0:8025"]
    svc.stopService()


def test_without_a_token_a_port_bound_beyond_loopback_is_refused(tmp_path):
    svc, reactor, failures = make_service(tmp_path, ["tcp:8025"])
    svc.startService()
    [f] = failures
    assert "not to loopback" in f.getErrorMessage()
    assert not reactor.ports[0].listening
    assert json.loads((tmp_path / "control.json").read_text())["endpoints"] == []
    svc.stopService()


def test_a_required_endpoint_that_cannot_listen_fails_the_start(tmp_path):
    svc, _, failures = make_service(tmp_path, ["tcp:25:interface=127.0.0.1"], refuse=(25,))
    svc.startService()
    assert len(failures) == 1
    svc.stopService()


def test_an_optional_endpoint_that_cannot_listen_is_only_logged(tmp_path, logged):
    desc = "tcp:25:interface=127.0.0.1"
    svc, _, failures = make_service(tmp_path, [desc, "tcp:26:interface=127.0.0.1"],
                                    refuse=(25,), optional=frozenset([desc]))
    svc.startService()
    assert failures == []
    assert any("no HTTP API on" in e.get("log_format", "") for e in logged)
    info = json.loads((tmp_path / "control.json").read_text())
    assert info["endpoints"] == ["tcp:127.0.0.1:26"]
    svc.stopService()


def test_control_json_of_another_process_is_left_alone(tmp_path):
    path = tmp_path / "control.json"
    path.write_text(json.dumps({"pid": os.getpid() + 1, "endpoints": []}))
    mhttp.remove_control_file(str(tmp_path))
    assert path.exists()


def test_default_endpoint(tmp_path, logged):
    d = mhttp.default_endpoint(str(tmp_path / "q"))
    assert d == f"unix:{tmp_path / 'q' / 'control.sock'}:mode=600"
    assert (mhttp.default_endpoint("/tmp/with:colon")
            == r"unix:/tmp/with\:colon/control.sock:mode=600")
    long_dir = "/tmp/" + "x" * 120
    assert mhttp.default_endpoint(long_dir) is None
    assert any("longer than a Unix socket path" in e.get("log_format", "") for e in logged)


def test_endpoint_address_forms():
    assert mhttp.endpoint_address(UNIXAddress(b"/q/control.sock")) == "unix:/q/control.sock"
    assert mhttp.endpoint_address(IPv4Address("TCP", "127.0.0.1", 80)) == "tcp:127.0.0.1:80"
    assert mhttp.endpoint_address(IPv6Address("TCP", "::1", 80)) == "tcp6:[::1]:80"
    assert mhttp.endpoint_address(object()) is None


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("desc, local", [
    ("unix:/run/x.sock:mode=600", True),
    ("tcp:8025:interface=127.0.0.1", True),
    (r"tcp6:8025:interface=\:\:1", True),
    ("tcp:8025", False),
    ("tcp:8025:interface=0.0.0.0", False),
    ("tcp:8025:interface=192.0.2.7", False),
    ("tcp:8025:interface=localhost", False),
])
def test_http_endpoint_is_local(desc, local):
    assert http_endpoint_is_local(desc) is local


@pytest.mark.parametrize("desc", ["tcp", "tcp:port", "nonsense:1", ""])
def test_bad_endpoint_strings_are_config_errors(desc):
    with pytest.raises(ConfigError, match="not a server endpoint"):
        http_endpoint_is_local(desc)


def write_token(tmp_path, text, mode=0o600):
    p = tmp_path / "token"
    p.write_text(text)
    p.chmod(mode)
    return str(p)


def test_read_token_file(tmp_path):
    assert read_token_file(write_token(tmp_path, "  abc123 \nsecond line\n")) == "abc123"
    with pytest.raises(ConfigError, match="readable by every user"):
        read_token_file(write_token(tmp_path, "abc", 0o644))
    with pytest.raises(ConfigError, match="first line is empty"):
        read_token_file(write_token(tmp_path, "\nabc\n"))
    with pytest.raises(ConfigError, match="No such file"):
        read_token_file(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token_file(str(tmp_path))


def test_config_needs_a_token_for_an_endpoint_beyond_loopback(tmp_path):
    base = {"queue": str(tmp_path / "q"), "relay": "127.0.0.1:2525"}
    with pytest.raises(ConfigError, match="--http-token-file"):
        Config(**base, http=("tcp:8025",))
    Config(**base, http=("tcp:8025:interface=127.0.0.1",))
    Config(**base, http=("tcp:8025",), http_token_file=write_token(tmp_path, "t"))
    with pytest.raises(ConfigError, match="readable by every user"):
        Config(**base, http_token_file=write_token(tmp_path, "t", 0o604))


def test_twistd_options(tmp_path):
    from twisted_mailout.daemon.tap import Options

    tf = write_token(tmp_path, "t")
    o = Options()
    o.parseOptions(["--queue", str(tmp_path / "q"), "--relay", "127.0.0.1:2525",
                    "--http", "tcp:8025", "--http", "unix:/tmp/a.sock", "--http-token-file",
                    tf, "--no-http"])
    c = o["config"]
    assert c.http == ("tcp:8025", "unix:/tmp/a.sock")
    assert c.http_token_file == tf and c.http_default is False
    o = Options()
    o.parseOptions(["--queue", str(tmp_path / "q")])
    assert o["config"].http == () and o["config"].http_default is True
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError, match="loopback"):
        Options().parseOptions(["--queue", str(tmp_path / "q"), "--http", "tcp:8025"])


# -- the service's wiring ------------------------------------------------------------


class ServiceReactor(ListenReactor):
    def getThreadPool(self):
        return None


class StubScheduler:
    def __init__(self):
        self.started = defer.Deferred()
        self.start_calls = 0
        self.counts = {}
        self.suspensions = None

    def start(self):
        self.start_calls += 1
        return self.started

    def pickup(self):
        return defer.succeed(0)

    def stop(self, timeout):
        return defer.succeed(None)

    def in_flight(self):
        return frozenset()


class StubAdmin:
    def __init__(self):
        self.loaded = defer.Deferred()
        self.scheduler = None

    def start(self):
        return self.loaded


def make_delivery_service(tmp_path, **config):
    from twisted_mailout.daemon.service import DeliveryService

    q = tmp_path / "q"
    cfg = Config(queue=str(q), relay="127.0.0.1:2525", tls="none",
                 resolvers=("127.0.0.1:53",), poll_interval=60, **config)
    svc = DeliveryService(cfg, ServiceReactor())
    svc.scheduler = StubScheduler()
    svc.admin = StubAdmin()
    return svc


def test_service_loads_suspensions_before_the_scheduler_starts_and_serves_meanwhile(tmp_path):
    svc = make_delivery_service(tmp_path, http=("tcp:8025:interface=127.0.0.1",))
    svc.startService()
    try:
        info = json.loads((tmp_path / "q" / "control.json").read_text())
        assert info["endpoints"] == [f"unix:{tmp_path / 'q' / 'control.sock'}",
                                     "tcp:127.0.0.1:8025"]
        assert svc.scheduler.start_calls == 0  # the suspensions are still loading
        assert "the queue is not open yet (recovery is running)" in svc.not_ready()
        waiting = svc.wait_delivering()
        assert not waiting.called
        svc.admin.loaded.callback(0)
        assert svc.scheduler.start_calls == 1
        assert not waiting.called  # recovery still running
        svc.scheduler.started.callback(0)
        assert waiting.called and svc.delivering
        assert svc.not_ready() == []
    finally:
        svc.stopService()
    assert not (tmp_path / "q" / "control.json").exists()
    assert "the queue's lock is not held" in svc.not_ready()


def test_service_with_no_http_and_no_endpoints_serves_nothing(tmp_path):
    svc = make_delivery_service(tmp_path, http_default=False)
    assert svc.http_endpoints() == ([], frozenset())
    svc.startService()
    try:
        assert not (tmp_path / "q" / "control.json").exists()
        assert svc.reactor.ports == []
    finally:
        svc.stopService()


def test_service_default_socket_is_optional_and_given_endpoints_are_not(tmp_path):
    svc = make_delivery_service(tmp_path, http=("tcp:8025:interface=127.0.0.1",))
    eps, optional = svc.http_endpoints()
    default = f"unix:{tmp_path / 'q' / 'control.sock'}:mode=600"
    assert eps == [default, "tcp:8025:interface=127.0.0.1"]
    assert optional == frozenset([default])
    svc.queue.unlock()


def test_service_stops_when_a_given_endpoint_cannot_listen(tmp_path, logged):
    svc = make_delivery_service(tmp_path, http=("tcp:25:interface=127.0.0.1",))
    svc.reactor.refuse = (25,)
    svc.startService()
    assert not svc.running
    assert any("failed to start" in (e.get("log_format") or "") for e in logged)
    from twisted_mailout.queue import Queue

    Queue(str(tmp_path / "q")).lock()  # released


def test_service_failed_start_fails_the_waiting_requests(tmp_path):
    from twisted_mailout.queue import QueueError

    svc = make_delivery_service(tmp_path)
    svc.startService()
    waiting = svc.wait_delivering()
    svc.admin.loaded.errback(QueueError("suspensions.json is malformed"))
    assert not svc.running
    failures = []
    waiting.addErrback(failures.append)
    assert failures and failures[0].check(QueueError)


def test_listings_run_in_the_apis_own_threads_stopped_with_it():
    threads = Threads()
    h = Harness(threads=threads)
    h.api.run_in_thread = None  # the default: the API's own pool
    h.start()
    h.replies["example.org"] = LATER
    h.enqueue()
    proto, transport = h.connect()
    proto.dataReceived(b"GET /api/v1/messages?format=ndjson HTTP/1.1\r\nHost: x\r\n\r\n")
    threads.pump_one()  # the first line, from a thread of the pool
    threads.pump_one()  # the end
    assert len(Response(transport.value()).lines) == 1
    pool = h.api._pool
    assert pool is not None and pool.name == "mailout-api-listing"
    assert pool.max == mhttp.LISTING_THREADS
    h.api.stop()
    assert h.api._pool is None and not pool.started
    assert not any(t.is_alive() for t in pool.threads)


def test_a_token_with_non_ascii_characters():
    h = Harness(token="clé-ü")
    h.start()
    raw = ("GET /api/v1/summary HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
           "Authorization: Bearer clé-ü\r\n\r\n").encode()
    proto, transport = h.connect(TCP)
    proto.dataReceived(raw)
    assert Response(transport.value()).status == 200


def test_a_client_gone_before_the_answer_gets_nothing_written(logged):
    h = Harness()
    h.start()
    started = defer.Deferred()
    h.api.wait_started = lambda: started
    proto, transport = h.connect()
    proto.dataReceived(b"GET /api/v1/summary HTTP/1.1\r\nHost: x\r\n\r\n")
    proto.connectionLost(Failure(ConnectionDone()))
    started.callback(None)
    assert transport.value() == b""
    # nothing was written to the gone request (finish() would raise, logged)
    assert [e for e in logged if e.get("log_failure") is not None] == []
