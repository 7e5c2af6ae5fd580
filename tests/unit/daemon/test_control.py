"""The blocking API client of `mailout queue` (twisted_mailout.daemon.control),
against a small standard-library HTTP server on loopback and on a Unix socket
(in a thread), and find_daemon over control.json files."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from twisted_mailout.daemon.control import ControlClient, ControlError, find_daemon


class Handler(BaseHTTPRequestHandler):
    """Records each request; answers from the server's `answer(handler)`."""

    protocol_version = "HTTP/1.1"

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.server.seen.append(self)
        status, ctype, chunks = self.server.answer(self)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if isinstance(chunks, bytes):
            self.send_header("Content-Length", str(len(chunks)))
            self.end_headers()
            self.wfile.write(chunks)
        else:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for c in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, *a):
        pass


def ok(obj, status=200):
    return status, "application/json", json.dumps(obj).encode()


class TCPServer(ThreadingHTTPServer):
    daemon_threads = True


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)


def serve(server, answer):
    server.seen = []
    server.answer = answer
    t = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    t.start()
    return server


@pytest.fixture
def tcp():
    servers = []

    def start(answer):
        s = serve(TCPServer(("127.0.0.1", 0), Handler), answer)
        servers.append(s)
        return s, ControlClient(f"tcp:127.0.0.1:{s.server_address[1]}", "tok", timeout=10)

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def unix():
    d = tempfile.mkdtemp(prefix="mo", dir="/tmp")
    path = os.path.join(d, "control.sock")
    servers = []

    def start(answer):
        s = serve(UnixServer(path, Handler), answer)
        servers.append(s)
        return s, ControlClient(f"unix:{path}", timeout=10)

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()
    os.unlink(path)
    os.rmdir(d)


def test_get_with_parameters_and_the_token(tcp):
    server, client = tcp(lambda h: ok({"messages": [], "count": 0}))
    assert client.get("messages", {"ids": ["A1", "B2"], "all": True, "domain": None,
                                    "state": "deferred", "sender": False, "older_than": 60,
                                    "recipient": []}) == {"messages": [], "count": 0}
    [h] = server.seen
    assert h.command == "GET"
    assert h.path == "/api/v1/messages?ids=A1%2CB2&all=1&state=deferred&older_than=60"
    assert h.headers["Authorization"] == "Bearer tok"


def test_post_and_delete_send_json(tcp):
    server, client = tcp(lambda h: ok({"ok": True}, 201))
    assert client.post("/api/v1/actions/hold", {"selector": {"all": True}}) == {"ok": True}
    assert client.post("actions/flush") == {"ok": True}
    assert client.delete("suspensions/abc", {"reason": "done"}) == {"ok": True}
    assert client.delete("suspensions/abc") == {"ok": True}
    posted, flushed, deleted, bare = server.seen
    assert posted.path == "/api/v1/actions/hold"
    assert posted.headers["Content-Type"] == "application/json"
    assert json.loads(posted.body) == {"selector": {"all": True}}
    assert json.loads(flushed.body) == {}
    assert (deleted.command, json.loads(deleted.body)) == ("DELETE", {"reason": "done"})
    assert bare.body == b"" and bare.headers["Content-Type"] is None


def test_over_a_unix_socket_without_a_token(unix):
    server, client = unix(lambda h: ok({"status": "alive"}))
    assert client.get("/healthz") == {"status": "alive"}
    [h] = server.seen
    assert h.headers["Authorization"] is None and h.path == "/healthz"


def test_error_replies_become_one_control_error(tcp):
    body = {"error": {"status": 404, "code": "not_found", "message": "no message X"}}
    _, client = tcp(lambda h: ok(body, 404))
    with pytest.raises(ControlError) as e:
        client.get("messages/X")
    assert (e.value.status, e.value.code, e.value.message) == (404, "not_found", "no message X")


@pytest.mark.parametrize("status, code", [(502, "internal"), (418, "bad_reply"),
                                          (401, "unauthorized")])
def test_error_replies_that_are_not_the_apis_json(tcp, status, code):
    _, client = tcp(lambda h: (status, "text/html", b"<h1>no</h1>"))
    with pytest.raises(ControlError) as e:
        client.get("summary")
    assert (e.value.status, e.value.code) == (status, code)
    assert "<h1>no</h1>" in e.value.message


def test_an_answer_that_is_not_json(tcp):
    _, client = tcp(lambda h: (200, "text/plain", b"hello"))
    with pytest.raises(ControlError) as e:
        client.get("summary")
    assert e.value.code == "bad_reply"


def test_nothing_listening_is_unreachable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ControlError) as e:
        ControlClient(f"tcp:127.0.0.1:{port}").get("summary")
    assert (e.value.status, e.value.code) == (0, "unreachable")
    with pytest.raises(ControlError) as e:
        ControlClient("unix:/nonexistent/control.sock").get("summary")
    assert e.value.code == "unreachable"


def test_iter_ndjson_yields_rows_as_they_come(tcp):
    second_sent = threading.Event()
    first_read = threading.Event()

    def chunks():
        yield b'{"queue_id": "A"}\n'
        first_read.wait(10)  # the client has the first row before the second is sent
        second_sent.set()
        yield b'{"queue_id": "B"}\n{"queue_id": "C"}\n'

    server, client = tcp(lambda h: (200, "application/x-ndjson", chunks()))
    it = client.iter_ndjson("messages", {"domain": "example.org"})
    assert next(it) == {"queue_id": "A"}
    assert not second_sent.is_set()
    first_read.set()
    assert list(it) == [{"queue_id": "B"}, {"queue_id": "C"}]
    assert server.seen[0].path == "/api/v1/messages?domain=example.org&format=ndjson"


def test_iter_ndjson_raises_the_error_line_and_error_replies(tcp):
    err = {"error": {"status": 500, "code": "internal", "message": "disk"}}
    _, client = tcp(lambda h: (200, "application/x-ndjson",
                               [b'{"queue_id": "A"}\n', json.dumps(err).encode() + b"\n"]))
    it = client.iter_ndjson("messages")
    assert next(it) == {"queue_id": "A"}
    with pytest.raises(ControlError) as e:
        next(it)
    assert (e.value.status, e.value.code, e.value.message) == (500, "internal", "disk")
    _, client = tcp(lambda h: ok({"error": {"status": 404, "code": "not_found",
                                            "message": "no X"}}, 404))
    with pytest.raises(ControlError) as e:
        list(client.iter_ndjson("messages", {"ids": ["X"]}))
    assert e.value.status == 404


@pytest.mark.parametrize("endpoint", ["http://x", "tcp:host", "tcp:host:port", "unix:", "x"])
def test_bad_endpoints(endpoint):
    with pytest.raises(ValueError):
        ControlClient(endpoint)


def test_tcp6_endpoint_form():
    c = ControlClient("tcp6:[::1]:8025")
    assert (c._host, c._port) == ("::1", 8025)


# -- find_daemon -------------------------------------------------------------------------


def write_control(q, pid=None, endpoints=(), token_file=None, lock_pid=None):
    (q / "control.json").write_text(json.dumps({
        "pid": os.getpid() if pid is None else pid, "endpoints": list(endpoints),
        "token_file": token_file, "started": 1.0}))
    if lock_pid is not None:
        (q / "lock").write_text(f"{lock_pid}\n")


def test_find_daemon_prefers_the_unix_socket(tmp_path):
    sock = tmp_path / "control.sock"
    sock.write_text("")  # exists
    write_control(tmp_path, endpoints=["tcp:127.0.0.1:8025", f"unix:{sock}"],
                  lock_pid=os.getpid())
    c = find_daemon(str(tmp_path))
    assert c.endpoint == f"unix:{sock}" and c.token is None


def test_find_daemon_uses_tcp_with_the_token_file(tmp_path):
    tf = tmp_path / "token"
    tf.write_text("tok123\n")
    write_control(tmp_path, endpoints=[f"unix:{tmp_path}/gone.sock", "tcp:127.0.0.1:8025"],
                  token_file=str(tf))
    c = find_daemon(str(tmp_path))
    assert (c.endpoint, c.token) == ("tcp:127.0.0.1:8025", "tok123")


def test_find_daemon_without_a_running_daemon(tmp_path):
    assert find_daemon(str(tmp_path)) is None  # no control.json
    (tmp_path / "control.json").write_text("{not json")
    assert find_daemon(str(tmp_path)) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    write_control(tmp_path, pid=int(dead.stdout), endpoints=["tcp:127.0.0.1:8025"])
    assert find_daemon(str(tmp_path)) is None  # its process is gone
    write_control(tmp_path, endpoints=["tcp:127.0.0.1:8025"], lock_pid=1)
    assert find_daemon(str(tmp_path)) is None  # another process holds the lock
    write_control(tmp_path, endpoints=["ssh:somewhere"], lock_pid=os.getpid())
    assert find_daemon(str(tmp_path)) is None  # nothing usable
