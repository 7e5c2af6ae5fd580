"""A small blocking client of the daemon's HTTP API, for C{mailout queue}.

The daemon advertises its API in C{DIR/control.json} (docs/operations.md):
C{{"pid", "endpoints": ["unix:/abs/DIR/control.sock", "tcp:127.0.0.1:PORT",
...], "token_file", "started"}}. L{find_daemon} reads it and returns a
L{ControlClient} for the best endpoint (the Unix socket, which needs no
token, else a TCP one with the token read from C{token_file}).

Standard library only (C{http.client}, with a connection class for Unix
sockets); no reactor. Every failure is one L{ControlError}: an error reply
of the API (its C{status}, C{code} and C{message}), or a connection that
could not be made or broke (status 0, code C{"unreachable"}).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["ControlClient", "ControlError", "find_daemon", "read_control_file"]

#: Seconds a connection may take to be made.
CONNECT_TIMEOUT = 10.0


class ControlError(Exception):
    """The API answered with an error, or could not be reached.

    @ivar status: the HTTP status (400, 401, 403, 404, 405, 409, 500, ...),
        or 0 when there was no answer.
    @ivar code: the API's error code (C{bad_request}, C{unauthorized},
        C{forbidden}, C{not_found}, C{method_not_allowed}, C{conflict},
        C{internal}), or C{unreachable} (no answer) or C{bad_reply} (an
        answer that is not the API's JSON).
    @ivar message: what went wrong, for people.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {code})" if status else message)
        self.status = status
        self.code = code
        self.message = message


class UnixHTTPConnection(http.client.HTTPConnection):
    """C{http.client.HTTPConnection} over a Unix socket.

    @param path: the socket's path.
    @param timeout: seconds each socket operation may take (L{None}: no
        limit); connecting takes at most L{CONNECT_TIMEOUT}.
    """

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        """Connect to the socket."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(self.path)
            s.settimeout(self.timeout)
        except BaseException:
            s.close()
            raise
        self.sock = s


def _status_code(status: int) -> str:
    return {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 409: "conflict"}.get(status, "internal"
                                                             if status >= 500 else "bad_reply")


class ControlClient:
    """Blocking calls to the daemon's API on one endpoint.

    @param endpoint: C{"unix:/path"}, C{"tcp:HOST:PORT"}, C{"tcp6:[HOST]:PORT"}
        or C{"ssl:HOST:PORT"} (the forms of C{control.json}).
    @param token: the bearer token, or L{None}.
    @param timeout: seconds to wait for an answer (L{None}: as long as it
        takes; a bulk action on a large queue takes a while).
    @raise ValueError: an endpoint of another form.
    """

    def __init__(self, endpoint: str, token: str | None = None,
                 timeout: float | None = None) -> None:
        self.endpoint = endpoint
        self.token = token
        self.timeout = timeout
        kind, _, rest = endpoint.partition(":")
        self._kind = kind
        if kind == "unix":
            if not rest:
                raise ValueError(f"no socket path in {endpoint!r}")
            self._path = rest
        elif kind in ("tcp", "tcp6", "ssl"):
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"no port in {endpoint!r}")
            self._host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            self._port = int(port)
        else:
            raise ValueError(f"not an API endpoint: {endpoint!r}")

    def __repr__(self) -> str:
        return f"ControlClient({self.endpoint!r})"

    def _connection(self) -> http.client.HTTPConnection:
        if self._kind == "unix":
            return UnixHTTPConnection(self._path, self.timeout)
        if self._kind == "ssl":
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    @staticmethod
    def _url(path: str, params: Mapping[str, Any] | None = None) -> str:
        if not path.startswith("/"):
            path = "/api/v1/" + path
        query = []
        for k, v in (params or {}).items():
            if v is None or v is False or (isinstance(v, list | tuple) and not v):
                continue
            if v is True:
                text = "1"
            elif isinstance(v, list | tuple):
                text = ",".join(str(x) for x in v)
            else:
                text = str(v)
            query.append((k, text))
        return path + ("?" + urllib.parse.urlencode(query) if query else "")

    def _send(self, method: str, url: str,
              body: Mapping[str, Any] | None) -> tuple[http.client.HTTPConnection,
                                                       http.client.HTTPResponse]:
        headers = {"Accept": "application/json, application/x-ndjson"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ControlError(0, "unreachable", f"cannot reach the daemon's API at "
                               f"{self.endpoint}: {e}") from None
        return conn, resp

    @staticmethod
    def _error(resp: http.client.HTTPResponse, data: bytes) -> ControlError:
        try:
            err = json.loads(data)["error"]
            return ControlError(int(err["status"]), str(err["code"]), str(err["message"]))
        except (ValueError, KeyError, TypeError):
            text = data.decode("utf-8", "replace").strip()[:300]
            return ControlError(resp.status, _status_code(resp.status),
                                f"HTTP {resp.status} {resp.reason}: {text}")

    def _call(self, method: str, path: str, params: Mapping[str, Any] | None = None,
              body: Mapping[str, Any] | None = None) -> Any:
        conn, resp = self._send(method, self._url(path, params), body)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ControlError(0, "unreachable", f"the daemon's API at {self.endpoint} "
                               f"broke off its answer: {e}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise self._error(resp, data)
        try:
            return json.loads(data)
        except ValueError:
            raise ControlError(resp.status, "bad_reply",
                               f"the answer of {self.endpoint} is not JSON") from None

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """C{GET} a route.

        @param path: C{"/api/v1/summary"}, or relative to it (C{"summary"}).
        @param params: query parameters: lists become comma-separated
            (C{ids}), C{True} is C{1}, C{None} and C{False} are left out.
        @return: the decoded JSON answer.
        @raise ControlError: an error reply, no answer, or one not JSON.
        """
        return self._call("GET", path, params)

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """C{POST} a JSON object (C{{}} when L{None}).

        @return: the decoded JSON answer.
        @raise ControlError: as L{get}.
        """
        return self._call("POST", path, body=body if body is not None else {})

    def delete(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """C{DELETE} a route (with an optional JSON body, e.g. C{{"reason"}}).

        @return: the decoded JSON answer.
        @raise ControlError: as L{get}.
        """
        return self._call("DELETE", path, body=body)

    def iter_ndjson(self, path: str,
                    params: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Stream C{format=ndjson} rows, one at a time, as they arrive.

        @param path: C{"messages"} (or C{"/api/v1/messages"}).
        @param params: query parameters (as L{get}); C{format=ndjson} is added.
        @return: an iterator of row objects (close it to stop early).
        @raise ControlError: an error reply, no answer, a broken stream, or an
            error reported at the stream's end (a line C{{"error": ...}}).
        """
        query = dict(params or {})
        query["format"] = "ndjson"
        conn, resp = self._send("GET", self._url(path, query), None)
        try:
            if resp.status >= 400:
                raise self._error(resp, resp.read())
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise ControlError(0, "unreachable", f"the daemon's API at "
                                       f"{self.endpoint} broke off the listing: {e}") from None
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise ControlError(resp.status, "bad_reply",
                                       "a listing line is not JSON") from None
                if isinstance(obj, dict) and set(obj) == {"error"}:
                    raise self._error(resp, line)
                yield obj
        finally:
            conn.close()


def read_control_file(queue_dir: str) -> dict[str, Any] | None:
    """The daemon's C{DIR/control.json}, or L{None} when there is none or it
    is unreadable or malformed."""
    try:
        with open(os.path.join(queue_dir, "control.json"), "rb") as f:
            info = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return None
    if not isinstance(info.get("endpoints"), list):
        return None
    return info


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def _lock_pid(queue_dir: str) -> int | None:
    try:
        with open(os.path.join(queue_dir, "lock"), "rb") as f:
            return int(f.read().strip() or b"0") or None
    except (OSError, ValueError):
        return None


def find_daemon(queue_dir: str, timeout: float | None = None) -> ControlClient | None:
    """The client of the daemon running on a queue folder, from its
    C{control.json}.

    @param queue_dir: the queue folder.
    @param timeout: passed to L{ControlClient}.
    @return: a L{ControlClient} for its Unix socket (when it exists), else
        for its first TCP endpoint with the token of its C{token_file} (when
        this user can read it); L{None} when there is no C{control.json},
        its process is gone (or is not the one holding the queue's lock),
        or it lists no endpoint this client can use.
    """
    info = read_control_file(queue_dir)
    if info is None or not _alive(info["pid"]):
        return None
    holder = _lock_pid(queue_dir)
    if holder is not None and holder != info["pid"]:
        return None  # a stale file left by a daemon that died
    eps = [e for e in info["endpoints"] if isinstance(e, str)]
    for e in eps:
        if e.startswith("unix:") and os.path.exists(e[5:]):
            return ControlClient(e, None, timeout)
    token = None
    token_file = info.get("token_file")
    if isinstance(token_file, str):
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip() or None
        except (OSError, UnicodeDecodeError):
            token = None
    for e in eps:
        if e.partition(":")[0] in ("tcp", "tcp6", "ssl"):
            try:
                return ControlClient(e, token, timeout)
            except ValueError:
                continue
    return None
