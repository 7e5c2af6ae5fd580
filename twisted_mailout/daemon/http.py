"""The daemon's HTTP server: the admin API (C{/api/v1}), C{/healthz}, C{/readyz}.

The contract is docs/operations-api.md (and C{openapi.json} beside this
module). Every operation is L{twisted_mailout.admin.QueueAdmin}'s; this module
only turns requests into its calls and its answers and errors into JSON:

  - L{ControlAPI}: the routes of C{/api/v1}, the token check, the error
    mapping (L{SelectorError} 400, L{EntryNotFound} 404, L{AdminConflict}
    409, a wrong method 405, anything else 500 with its traceback logged);
  - L{build_root}: the resource tree, with room for more children
    (C{/metrics}, the status page at C{/} and C{/static}) given by the caller;
  - L{ReactorWatch}: the reactor-lag probe behind C{/readyz};
  - L{HTTPService}: listens on every endpoint, checks where each one is
    bound, writes C{DIR/control.json} (how C{mailout queue} finds the daemon)
    and removes it at stop.

Who needs the token: with a token (C{--http-token-file}), every C{/api/}
request that does not come through a Unix socket needs C{Authorization:
Bearer TOKEN} (missing: 401 with C{WWW-Authenticate: Bearer}; wrong: 403).
Without a token, TCP endpoints listen on loopback only, and a request must
name a loopback host or C{localhost} in its C{Host} header (so a web page
cannot reach the API through DNS rebinding). A POST's body must be sent as
C{application/json} (so a web page cannot post a form to it).

Blocking work never runs in the reactor thread: the admin's store calls go
through its C{run_blocking}, and a C{format=ndjson} listing runs
L{QueueAdmin.iter_rows} in a thread that hands lines to the reactor,
honouring the connection's back-pressure and stopping when the client goes.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import resources as _pkg_resources
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from twisted.web.resource import IResource
from zope.interface import implementer

from twisted_mailout.admin import AdminConflict, QueueAdmin, Selector, SelectorError
from twisted_mailout.queue.model import EntryNotFound

__all__ = [
    "ACTIONS",
    "MAX_BODY",
    "ApiError",
    "ControlAPI",
    "ControlSite",
    "HTTPService",
    "ReactorWatch",
    "build_root",
    "default_endpoint",
    "endpoint_address",
    "remove_control_file",
    "write_control_file",
]

log = Logger()

#: The actions of C{POST /api/v1/actions/{action}}.
ACTIONS = ("hold", "release", "delete", "bounce", "flush", "requeue")
#: Largest request body read, in bytes (a selector of 100,000 ids fits).
MAX_BODY = 16 * 1024 * 1024
#: Longest operator's reason, in characters.
MAX_REASON = 1000
#: Longest C{domain}, C{sender} or C{recipient} filter, in characters (an
#: address has at most 64 + 1 + 255).
MAX_FILTER = 320
#: Longest C{ids} query parameter, in characters (about 100 ids; a request
#: line is at most 16 KB: larger selections go in a POST body).
MAX_QUERY_IDS = 2000
#: Bytes of ndjson gathered in the listing thread before they are handed to
#: the reactor (the first line always goes at once).
STREAM_CHUNK = 32 * 1024
#: Seconds after which gathered ndjson lines are handed over anyway.
STREAM_FLUSH = 0.1
#: Listings streamed at once; more wait their turn. They have threads of
#: their own, so slow clients never take the store's threads from delivery.
LISTING_THREADS = 4

_JSON = b"application/json"
_NDJSON = b"application/x-ndjson"
_SELECTOR_PARAMS = ("ids", "all", "domain", "sender", "recipient", "state", "older_than")
_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 500: "internal"}
_DOMAIN = re.compile(r"[^@\s\x00-\x1f\x7f]*[^@\s\x00-\x1f\x7f.][^@\s\x00-\x1f\x7f]*")
_TEXT = re.compile(r"[^\r\n\x00]*")
_FILTER_TEXT = re.compile(r"[^\r\n\x00]*[^\s\x00][^\r\n\x00]*")


class ApiError(Exception):
    """An error reply of the API.

    @ivar status: the HTTP status (400, 401, 403, 404, 405, 409, 500).
    @ivar code: the JSON C{code} (C{bad_request}, C{unauthorized}, ...).
    @ivar message: what went wrong, for people.
    @ivar headers: extra response headers (C{Allow}, C{WWW-Authenticate}).
    """

    def __init__(self, status: int, message: str,
                 headers: Mapping[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = _CODES[status]
        self.message = message
        self.headers = dict(headers or {})


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """The JSON body of an error reply: C{{"error": {"status", "code",
    "message"}}}."""
    return {"error": {"status": status, "code": code, "message": message}}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _as_error(failure: Failure) -> ApiError:
    """Map a failure to the API's error reply; unexpected ones are logged
    with their traceback."""
    e = failure.value
    if isinstance(e, ApiError):
        return e
    if isinstance(e, SelectorError):
        return ApiError(400, str(e))
    if isinstance(e, EntryNotFound):
        return ApiError(404, str(e))
    if isinstance(e, AdminConflict):
        return ApiError(409, str(e))
    log.failure("HTTP API: unexpected error", failure)
    return ApiError(500, f"internal error ({type(e).__name__}); see the daemon's log")


def _json_reply(request: server.Request, status: int, obj: Any,
                headers: Mapping[bytes, bytes] | None = None) -> bytes:
    """Set the status and headers of a JSON reply. @return: its body."""
    body = _dumps(obj)
    request.setResponseCode(status)
    request.setHeader(b"content-type", _JSON)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    for k, v in (headers or {}).items():
        request.setHeader(k, v)
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


def _write_json(request: server.Request, status: int, obj: Any,
                headers: Mapping[bytes, bytes] | None = None) -> None:
    request.write(_json_reply(request, status, obj, headers))
    request.finish()


def _write_error(request: server.Request, err: ApiError) -> None:
    _write_json(request, err.status, error_body(err.status, err.code, err.message),
                err.headers)


# -- parsing requests ------------------------------------------------------------------


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{what} is not UTF-8") from None


def _query(request: server.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each given once (C{ids} may repeat; its values
    are joined with commas).

    @raise ApiError: 400 for an unknown or repeated parameter, or one that is
        not UTF-8.
    """
    out: dict[str, str] = {}
    args: dict[bytes, list[bytes]] = request.args or {}
    for raw_key, raw_values in args.items():
        key = _text(raw_key, "a parameter name")
        if key not in allowed:
            raise _bad(f"unknown parameter {key!r}; this route takes: "
                       + ", ".join(allowed))
        values = [_text(v, f"parameter {key}") for v in raw_values]
        if len(values) > 1 and key != "ids":
            raise _bad(f"parameter {key!r} given more than once")
        out[key] = ",".join(values)
    return out


def _flag(params: Mapping[str, str], key: str) -> bool:
    v = params.get(key)
    if v is None:
        return False
    v = v.lower()
    if v in ("1", "true"):
        return True
    if v in ("0", "false"):
        return False
    raise _bad(f"{key} takes true or false (1 or 0), not {params[key]!r}")


def _selector_from_query(params: Mapping[str, str]) -> Selector:
    d: dict[str, Any] = {}
    if "ids" in params:
        if len(params["ids"]) > MAX_QUERY_IDS:
            raise _bad(f"ids takes at most {MAX_QUERY_IDS} characters in a query; "
                       "ask for fewer ids at a time")
        ids = params["ids"].split(",")
        if not all(ids):
            raise _bad("ids takes queue ids separated by commas, not "
                       f"{params['ids'][:100]!r}")
        d["ids"] = ids
    if "all" in params:
        d["all"] = _flag(params, "all")
    for key in ("domain", "sender", "recipient", "state"):
        if key in params:
            d[key] = params[key]
    if "older_than" in params:
        try:
            older = float(params["older_than"])
        except ValueError:
            raise _bad(f"older_than takes seconds, not {params['older_than']!r}") from None
        if not math.isfinite(older) or older < 0:
            raise _bad(f"older_than takes seconds >= 0, not {params['older_than']!r}")
        d["older_than"] = older
    return _selector(d)


def _selector(d: Any) -> Selector:
    """A L{Selector} from its JSON form, with the filters checked as the
    OpenAPI document states them.

    @raise SelectorError: a bad selector (400).
    """
    if isinstance(d, Mapping):
        for key, value in d.items():
            if value is None:
                raise SelectorError(f"{key} must not be null (leave it out)")
        if "ids" in d and not isinstance(d["ids"], list):
            raise SelectorError("ids must be a list of queue ids")
        for key in ("domain", "sender", "recipient"):
            v = d.get(key)
            if isinstance(v, str) and not (len(v) <= MAX_FILTER and _FILTER_TEXT.fullmatch(v)):
                raise SelectorError(f"{key} needs one line of at most {MAX_FILTER} characters")
        older = d.get("older_than")
        if (isinstance(older, int | float) and not isinstance(older, bool)
                and not (math.isfinite(older) and older >= 0)):
            raise SelectorError("older_than takes seconds >= 0")
    return Selector.from_json(d)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _body(request: server.Request) -> dict[str, Any]:
    """The request's JSON object (an empty body is C{{}}).

    @raise ApiError: 400 for a body that is too big, not JSON, not an
        object, or not sent as C{application/json}.
    """
    content = request.content
    data = content.read(MAX_BODY + 1) if content is not None else b""
    if len(data) > MAX_BODY:
        raise _bad(f"the request body is larger than {MAX_BODY} bytes")
    if not data.strip():
        return {}
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != _JSON:
        raise _bad("send the request body as Content-Type: application/json")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(f"the request body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _bad("the request body must be a JSON object")
    return obj


def _keys(body: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = set(body) - set(allowed)
    if unknown:
        raise _bad("unknown key " + ", ".join(sorted(unknown)) + " in the request body; "
                   "allowed: " + ", ".join(allowed))


def _reason(body: Mapping[str, Any]) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise _bad("reason must be a string")
    if len(reason) > MAX_REASON or not _TEXT.fullmatch(reason):
        raise _bad(f"reason must be one line of at most {MAX_REASON} characters")
    return reason


# -- the ndjson stream -----------------------------------------------------------------


@implementer(IPushProducer)
class _RowStream:
    """One C{format=ndjson} listing: rows made in a thread, written by the
    reactor, paused while the connection's buffer is full, stopped when the
    client goes away or the server stops.

    @param request: the request (its response is ours once L{started} fires).
    @param rows: makes the row iterator (blocking; called in the thread).
    @param run_in_thread: runs a callable in a thread (C{reactor.callInThread}).
    @param call_from_thread: C{reactor.callFromThread}.
    @ivar started: fires with L{None} once the first line is written (or the
        empty listing finished), or fails with the error raised before the
        first row (an unknown id: the caller answers with it).
    """

    def __init__(self, request: server.Request, rows: Callable[[], Iterator[dict[str, Any]]],
                 run_in_thread: Callable[[Callable[[], None]], object],
                 call_from_thread: Callable[..., object]) -> None:
        self._request = request
        self._rows = rows
        self._run_in_thread = run_in_thread
        self._call = call_from_thread
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._registered = False
        self.finished = False
        self.started: defer.Deferred[None] = defer.Deferred()
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        """Start the listing thread. @return: L{started}."""
        self._request.notifyFinish().addBoth(self._gone)
        self._run_in_thread(self._produce)
        return self.started

    # IPushProducer (the reactor thread)
    def pauseProducing(self) -> None:
        """The connection's buffer is full: the thread waits."""
        self._go.clear()

    def resumeProducing(self) -> None:
        """The buffer drained: the thread goes on."""
        self._go.set()

    def stopProducing(self) -> None:
        """The connection is going away: the thread stops."""
        self.stop()

    def stop(self) -> None:
        """Stop the thread at its next row (any thread)."""
        self._stop.set()
        self._go.set()

    def _gone(self, result: object) -> None:
        self.stop()
        self.finished = True

    # the listing thread
    def _wait(self) -> bool:
        while not self._go.wait(0.5):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def _produce(self) -> None:
        try:
            it = self._rows()
            first = next(it, None)
        except Exception:  # noqa: BLE001 - handed to the reactor, which answers with it
            self._call(self._fail_start, Failure())
            return
        self._call(self._begin, None if first is None else _dumps(first) + b"\n")
        if first is None:
            return
        buf: list[bytes] = []
        size = 0
        last = time.monotonic()
        try:
            for row in it:
                line = _dumps(row) + b"\n"
                buf.append(line)
                size += len(line)
                if size >= STREAM_CHUNK or time.monotonic() - last >= STREAM_FLUSH:
                    if not self._wait():
                        return
                    self._call(self._write, b"".join(buf))
                    buf, size, last = [], 0, time.monotonic()
                elif self._stop.is_set():
                    return
        except Exception:  # noqa: BLE001 - reported in the stream and logged
            self._call(self._fail_late, b"".join(buf), Failure())
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._call(self._end, b"".join(buf))

    # the reactor thread
    def _fail_start(self, failure: Failure) -> None:
        self.done.callback(None)
        self.started.errback(failure)

    def _begin(self, first: bytes | None) -> None:
        if self.finished:
            self.started.callback(None)
            self.done.callback(None)
            return
        r = self._request
        r.setResponseCode(200)
        r.setHeader(b"content-type", _NDJSON)
        r.setHeader(b"cache-control", b"no-store")
        r.setHeader(b"x-content-type-options", b"nosniff")
        if first is None:
            r.setHeader(b"content-length", b"0")
            self._finish()
        else:
            r.registerProducer(self, True)
            self._registered = True
            r.write(first)
        self.started.callback(None)

    def _write(self, data: bytes) -> None:
        if not self.finished and data:
            self._request.write(data)

    def _end(self, data: bytes) -> None:
        self._write(data)
        self._finish()

    def _fail_late(self, data: bytes, failure: Failure) -> None:
        err = _as_error(failure)
        self._write(data)
        self._write(_dumps(error_body(err.status, err.code, err.message)) + b"\n")
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            if self._registered:
                self._request.unregisterProducer()
            self.finished = True
            self._request.finish()
        if not self.done.called:
            self.done.callback(None)


# -- the API ---------------------------------------------------------------------------


def _openapi_document() -> bytes:
    return (_pkg_resources.files("twisted_mailout.daemon") / "openapi.json").read_bytes()


class ControlAPI:
    """The routes of C{/api/v1} over one L{QueueAdmin}.

    @param admin: the L{QueueAdmin} (the daemon's: with its scheduler).
    @param reactor: the reactor (C{IReactorTime}, C{IReactorThreads}: its
        C{seconds}, C{callInThread}, C{callFromThread}).
    @param token: the bearer token, or L{None} for none (then every endpoint
        is a loopback or Unix one).
    @param status: makes the status page's data for C{GET /api/v1/status}
        (a dict, or a Deferred firing with one); L{None}: a short built-in
        summary (pid, uptime, outcome counts, suspensions).
    @param wait_started: returns a Deferred firing when the daemon is
        delivering (its queue recovered); the routes that touch the queue
        wait for it. L{None}: do not wait.
    @param run_in_thread: runs a callable in a thread (default: a pool of
        L{LISTING_THREADS} threads of the API's own, apart from the
        reactor's, which the store uses); tests pass one that runs it at
        once.
    @param call_from_thread: hands a call to the reactor thread (default:
        the reactor's C{callFromThread}).
    """

    def __init__(self, admin: QueueAdmin, reactor: Any, token: str | None = None,
                 status: Callable[[], Any] | None = None,
                 wait_started: Callable[[], defer.Deferred[Any]] | None = None,
                 run_in_thread: Callable[[Callable[[], None]], object] | None = None,
                 call_from_thread: Callable[..., object] | None = None) -> None:
        self.admin = admin
        self.reactor = reactor
        self.token = token
        self.status = status
        self.wait_started = wait_started
        self.run_in_thread = run_in_thread
        self.call_from_thread = call_from_thread
        self.started_at = reactor.seconds()
        self._streams: set[_RowStream] = set()
        self._openapi: bytes | None = None
        self._pool: ThreadPool | None = None

    def stop(self) -> None:
        """Stop every listing stream and the listing threads (at the
        server's stop; each thread ends at its next row, within half a
        second when its connection is paused)."""
        for s in list(self._streams):
            s.stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def _in_listing_thread(self, f: Callable[[], None]) -> None:
        if self.run_in_thread is not None:
            self.run_in_thread(f)
            return
        if self._pool is None:
            self._pool = ThreadPool(0, LISTING_THREADS, "mailout-api-listing")
            self._pool.start()
        self._pool.callInThread(f)

    # -- the gate ------------------------------------------------------------------

    def check_access(self, request: server.Request) -> None:
        """Refuse a request that may not use the API.

        @raise ApiError: 401 without the token (when one is needed), 403
            with a wrong one, or, without a token, for a C{Host} header that
            is not a loopback address or C{localhost}.
        """
        if isinstance(request.getHost(), UNIXAddress):
            return
        if self.token is None:
            if not _loopback_host(request.getHeader(b"host")):
                raise ApiError(403, "the API answers only requests for a loopback host "
                                    "(127.0.0.1, [::1] or localhost)")
            return
        raw = request.getHeader(b"authorization")
        challenge = {b"www-authenticate": b'Bearer realm="mailout"'}
        if raw is None:
            raise ApiError(401, "send the token: Authorization: Bearer TOKEN", challenge)
        scheme, _, given = raw.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "send the token: Authorization: Bearer TOKEN", challenge)
        if not hmac.compare_digest(given.strip().encode("latin-1"), self.token.encode("utf-8")):
            raise ApiError(403, "wrong token")

    # -- dispatch ------------------------------------------------------------------

    def route(self, segments: list[str]) -> tuple[dict[str, Callable[..., Any]], tuple[str, ...]]:
        """The handlers of a path under C{/api/v1/}.

        @param segments: the path's segments after C{/api/v1/}, decoded.
        @return: C{({method: handler}, path arguments)}.
        @raise ApiError: 404 for an unknown path.
        """
        match segments:
            case ["messages"]:
                return {"GET": self.list_messages}, ()
            case ["messages", qid]:
                return {"GET": self.show}, (qid,)
            case ["summary"]:
                return {"GET": self.summary}, ()
            case ["actions", action] if action in ACTIONS:
                return {"POST": self.act}, (action,)
            case ["actions", action]:
                raise ApiError(404, f"no action {action!r}; one of " + ", ".join(ACTIONS))
            case ["suspensions"]:
                return {"GET": self.suspensions, "POST": self.suspend}, ()
            case ["suspensions", sid]:
                return {"DELETE": self.cancel_suspension}, (sid,)
            case ["status"]:
                return {"GET": self.status_data}, ()
            case ["openapi.json"]:
                return {"GET": self.openapi}, ()
        raise ApiError(404, "no such API route: /api/v1/" + "/".join(segments))

    async def handle(self, request: server.Request, segments: list[str]) -> None:
        """Answer one request for C{/api/v1/...} (errors included).

        @param request: the request.
        @param segments: the path's segments after C{/api/v1/} (bytes as
            twisted.web gives them).
        """
        over: list[object] = []
        request.notifyFinish().addBoth(over.append)  # answered, or the client left
        try:
            self.check_access(request)
            handlers, args = self.route(segments)
            method = (request.method or b"GET").decode("ascii", "replace").upper()
            if method == "HEAD" and "GET" in handlers:
                method = "GET"
            handler = handlers.get(method)
            if handler is None:
                allowed = ", ".join(sorted({*handlers, *(("HEAD",) if "GET" in handlers
                                                         else ())}))
                raise ApiError(405, f"{method} is not allowed here; use {allowed}",
                               {b"allow": allowed.encode()})
            answer = await handler(request, *args)
            if answer is not None and not over:  # (the client may have left)
                status, obj = answer
                _write_json(request, status, obj)
        except Exception:  # noqa: BLE001 - every error becomes its JSON reply
            err = _as_error(Failure())
            if not over:
                _write_error(request, err)

    async def _started(self) -> None:
        if self.wait_started is not None:
            await self.wait_started()

    # -- handlers (each returns (status, JSON) or None once it has answered) -----------

    async def list_messages(self, request: server.Request) -> tuple[int, Any] | None:
        """C{GET /api/v1/messages}: C{{"messages": [row...], "count": n}},
        or with C{format=ndjson} one row a line, streamed."""
        params = _query(request, (*_SELECTOR_PARAMS, "format"))
        fmt = params.get("format", "json")
        if fmt not in ("json", "ndjson"):
            raise _bad(f"format is json or ndjson, not {fmt!r}")
        sel = _selector_from_query(params)
        await self._started()
        if fmt == "json":
            rows = await self.admin.list_messages(sel)
            return 200, {"messages": rows, "count": len(rows)}
        now = self.reactor.seconds()
        sched = self.admin.scheduler
        flying = sched.in_flight() if sched is not None else frozenset()
        stream = _RowStream(request, lambda: self.admin.iter_rows(sel, now, flying),
                            self._in_listing_thread,
                            self.call_from_thread or self.reactor.callFromThread)
        self._streams.add(stream)
        stream.done.addBoth(lambda _: self._streams.discard(stream))
        await stream.start()  # an error before the first row is answered as usual
        return None

    async def show(self, request: server.Request, qid: str) -> tuple[int, Any]:
        """C{GET /api/v1/messages/{qid}}: L{views.detail}'s object."""
        params = _query(request, ("body",))
        body = _flag(params, "body")
        await self._started()
        return 200, await self.admin.show(qid, body=body)

    async def summary(self, request: server.Request) -> tuple[int, Any]:
        """C{GET /api/v1/summary}: L{views.summary}'s object."""
        params = _query(request, (*_SELECTOR_PARAMS, "by", "top"))
        by = params.get("by", "domain")
        if by not in ("domain", "sender"):
            raise _bad(f"by is domain or sender, not {by!r}")
        top = None
        if "top" in params:
            try:
                top = int(params["top"])
            except ValueError:
                raise _bad(f"top takes a whole number, not {params['top']!r}") from None
            if top < 0:
                raise _bad("top must not be negative")
        sel = _selector_from_query(params)
        await self._started()
        return 200, await self.admin.summary(by, sel, top)

    async def act(self, request: server.Request, action: str) -> tuple[int, Any]:
        """C{POST /api/v1/actions/{action}}: L{ActionResult.to_json}."""
        _query(request, ())
        body = _body(request)
        _keys(body, ("selector", "reason"))
        sel = _selector(body.get("selector"))
        reason = _reason(body)
        await self._started()
        if action == "flush":
            result = await self.admin.flush(sel, reason)
        else:
            result = await getattr(self.admin, action)(sel, reason)
        return 200, result.to_json()

    async def suspensions(self, request: server.Request) -> tuple[int, Any]:
        """C{GET /api/v1/suspensions}: C{{"suspensions": [...]}}."""
        _query(request, ())
        await self._started()
        return 200, {"suspensions": self.admin.list_suspensions()}

    async def suspend(self, request: server.Request) -> tuple[int, Any]:
        """C{POST /api/v1/suspensions}: 201 and the new suspension."""
        _query(request, ())
        body = _body(request)
        _keys(body, ("domain", "duration", "reason"))
        domain = body.get("domain")
        if not isinstance(domain, str) or len(domain) > 255 or not _DOMAIN.fullmatch(domain):
            raise _bad("domain must be a domain name (no @, spaces or control characters)")
        duration = body.get("duration")
        if (isinstance(duration, bool) or not isinstance(duration, int | float)
                or not math.isfinite(duration) or duration <= 0):
            raise _bad("duration must be a number of seconds above 0")
        reason = _reason(body)
        await self._started()
        return 201, await self.admin.suspend(domain, float(duration), reason)

    async def cancel_suspension(self, request: server.Request, sid: str) -> tuple[int, Any]:
        """C{DELETE /api/v1/suspensions/{id}}: the cancelled suspension."""
        _query(request, ())
        body = _body(request)
        _keys(body, ("reason",))
        reason = _reason(body)
        await self._started()
        return 200, await self.admin.cancel_suspension(sid, reason)

    async def status_data(self, request: server.Request) -> tuple[int, Any]:
        """C{GET /api/v1/status}: the status page's data."""
        if self.status is not None:
            return 200, await defer.maybeDeferred(self.status)
        sched = self.admin.scheduler
        return 200, {
            "pid": os.getpid(),
            "started": self.started_at,
            "uptime": self.reactor.seconds() - self.started_at,
            "counts": dict(sched.counts) if sched is not None else {},
            "suspensions": self.admin.list_suspensions(),
        }

    async def openapi(self, request: server.Request) -> tuple[int, Any] | None:
        """C{GET /api/v1/openapi.json}: the OpenAPI 3.1 document."""
        if self._openapi is None:
            self._openapi = _openapi_document()
        request.setResponseCode(200)
        request.setHeader(b"content-type", _JSON)
        request.setHeader(b"content-length", str(len(self._openapi)).encode())
        request.write(self._openapi)
        request.finish()
        return None


def _loopback_host(header: bytes | None) -> bool:
    if header is None:
        return True  # HTTP/1.0 without Host: nothing a browser sends
    try:
        host = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- resources ---------------------------------------------------------------------------


class _APIResource(resource.Resource):
    """C{/api/...}: every request goes to L{ControlAPI.handle}."""

    isLeaf = True

    def __init__(self, api: ControlAPI) -> None:
        super().__init__()
        self.api = api

    def render(self, request: server.Request) -> int:
        path = [_text_or_none(p) for p in request.postpath or []]
        if path[:1] == ["v1"]:
            segments = [p if p is not None else "\ufffd" for p in path[1:]]
            d = defer.Deferred.fromCoroutine(self.api.handle(request, segments))
        else:
            d = defer.Deferred.fromCoroutine(self._not_found(request))
        d.addErrback(lambda f: log.failure("HTTP API: unhandled error", f))
        return server.NOT_DONE_YET

    async def _not_found(self, request: server.Request) -> None:
        try:
            self.api.check_access(request)
            raise ApiError(404, "the API is under /api/v1/")
        except ApiError as e:
            _write_error(request, e)


def _text_or_none(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _JSONResource(resource.Resource):
    """A GET-only JSON resource: C{answer()} gives C{(status, object)}."""

    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, Any]]) -> None:
        super().__init__()
        self.answer = answer

    def render(self, request: server.Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            err = ApiError(405, "use GET", {b"allow": b"GET, HEAD"})
            return _json_reply(request, err.status, error_body(err.status, err.code,
                                                               err.message), err.headers)
        if request.postpath not in ([], [b""]):
            return _json_reply(request, 404, error_body(404, "not_found", "no such resource"))
        status, obj = self.answer()
        return _json_reply(request, status, obj)


class _Root(resource.Resource):
    """C{/}: its children, a JSON index at C{/} itself (unless a status page
    is mounted there) and JSON 404s elsewhere."""

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        if path == b"":
            return _JSONResource(lambda: (200, {
                "service": "twisted_mailout", "api": "/api/v1/",
                "openapi": "/api/v1/openapi.json", "health": "/healthz",
                "ready": "/readyz"}))
        return _JSONResource(lambda: (404, error_body(404, "not_found", "no such resource")))


def build_root(api: ControlAPI, ready: Callable[[], list[str]],
               extra_resources: Mapping[bytes, resource.Resource] | None = None,
               ) -> resource.Resource:
    """The resource tree: C{/api/} (L{ControlAPI}), C{/healthz}, C{/readyz},
    and the caller's children.

    @param api: the L{ControlAPI}.
    @param ready: returns why the daemon is not ready (an empty list when it
        is): C{/readyz} answers 200 or 503 with the reasons.
    @param extra_resources: more children, C{{name: resource}}: C{b"metrics"}
        (Prometheus), C{b""} (the status page at C{/}) and C{b"static"} (its
        assets). An extra child named C{b"api"}, C{b"healthz"} or
        C{b"readyz"} replaces the built-in one.
    @return: the root resource, for a L{ControlSite}.
    """
    root = _Root()
    _put(root, b"api", _APIResource(api))
    _put(root, b"healthz", _JSONResource(lambda: (200, {"status": "alive"})))

    def readiness() -> tuple[int, Any]:
        reasons = ready()
        if reasons:
            return 503, {"status": "not ready", "reasons": reasons}
        return 200, {"status": "ready", "pid": os.getpid(),
                     "uptime": api.reactor.seconds() - api.started_at}

    _put(root, b"readyz", _JSONResource(readiness))
    for name, child in (extra_resources or {}).items():
        _put(root, name, child)
    return root


def _put(parent: resource.Resource, name: bytes, child: resource.Resource | IResource) -> None:
    # putChild is typed with IResource, which mypy cannot see that a Resource
    # provides (zope.interface declarations are not types).
    parent.putChild(name, cast(IResource, child))


class ControlSite(server.Site):
    """A twisted.web C{Site} that logs only what an operator wants to read:
    requests that change something (not GET or HEAD) and failed ones (4xx,
    5xx), one line each in the namespace C{twisted_mailout.daemon.http}, not
    every scrape and poll."""

    noisy = False  # no "Starting factory" lines

    def log(self, request: server.Request) -> None:  # type: ignore[override]
        """Log one finished request (see the class docstring)."""
        if request.method in (b"GET", b"HEAD") and request.code < 400:
            return
        try:
            client = request.getClientAddress()
            who = getattr(client, "host", None) or "unix socket"
        except Exception:  # noqa: BLE001 - only for the log line
            who = "?"
        log.info("HTTP {method} {uri} {code} ({client})",
                 method=(request.method or b"").decode("ascii", "replace"),
                 uri=(request.uri or b"").decode("ascii", "replace")[:200],
                 code=request.code, client=who)


# -- the reactor-lag probe ---------------------------------------------------------------


class ReactorWatch:
    """Ticks every C{interval} seconds and records how late each tick was,
    so C{/readyz} can say the reactor is stalled (some call blocked it).

    @param clock: the reactor (C{IReactorTime}).
    @param interval: seconds between ticks.
    @param stall_after: a tick more than this many seconds late (or none for
        that long past its time) means stalled.
    @ivar lag: how late the last tick was, in seconds.
    """

    def __init__(self, clock: Any, interval: float = 1.0, stall_after: float = 10.0) -> None:
        self.clock = clock
        self.interval = interval
        self.stall_after = stall_after
        self.lag = 0.0
        self._last: float | None = None
        self._loop: task.LoopingCall | None = None

    def start(self) -> None:
        """Start ticking."""
        self._last = self.clock.seconds()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop ticking."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self._last is not None:
            self.lag = max(0.0, now - self._last - self.interval)
        self._last = now

    def stalled(self) -> str | None:
        """Why the reactor counts as stalled, or L{None} when it does not."""
        if self._last is None:
            return None
        late = max(self.lag, self.clock.seconds() - self._last - self.interval)
        if late > self.stall_after:
            return f"the reactor is stalled: a 1 s tick came {late:.1f} s late"
        return None


# -- endpoints and control.json -----------------------------------------------------------


#: Longest path a Unix socket can bind to (C{sun_path} less its NUL).
UNIX_PATH_MAX = 107 if sys.platform.startswith("linux") else 103


def default_endpoint(queue_dir: str) -> str | None:
    """The default API endpoint of a queue folder: C{unix:DIR/control.sock:
    mode=600}, or L{None} (with a warning logged) when the path is too long
    for a Unix socket.

    @param queue_dir: the queue folder.
    """
    path = os.path.join(os.path.abspath(queue_dir), "control.sock")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        log.warn("no HTTP API on the default Unix socket: {path} is longer than a Unix "
                 "socket path may be ({n} bytes); give --http", path=path, n=UNIX_PATH_MAX)
        return None
    return f"unix:{endpoints.quoteStringArgument(path)}:mode=600"


def endpoint_address(address: Any) -> str | None:
    """The C{control.json} form of a bound address: C{unix:/abs/path},
    C{tcp:127.0.0.1:PORT}, C{tcp6:[::1]:PORT}; L{None} for another kind.

    @param address: a listening port's C{getHost()}.
    """
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = os.fsdecode(raw) if isinstance(raw, bytes) else raw
        return f"unix:{os.path.abspath(name)}" if name else None
    if isinstance(address, IPv4Address):
        return f"tcp:{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"tcp6:[{address.host}]:{address.port}"
    return None


def write_control_file(queue_dir: str, endpoints_: list[str], token_file: str | None,
                       started: float) -> str:
    """Write C{DIR/control.json} atomically, mode 0600: C{{"pid",
    "endpoints", "token_file", "started"}}.

    @return: its path.
    @raise OSError: it could not be written.
    """
    path = os.path.join(queue_dir, "control.json")
    tmp = path + ".tmp"
    data = json.dumps({"pid": os.getpid(), "endpoints": endpoints_,
                       "token_file": os.path.abspath(token_file) if token_file else None,
                       "started": started}, indent=1).encode("utf-8") + b"\n"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def remove_control_file(queue_dir: str) -> None:
    """Remove C{DIR/control.json} if this process wrote it."""
    path = os.path.join(queue_dir, "control.json")
    try:
        with open(path, "rb") as f:
            pid = json.loads(f.read()).get("pid")
    except (OSError, ValueError, AttributeError):
        return
    if pid == os.getpid():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class HTTPService(service.Service):
    """Serves one site on several endpoints and advertises them in
    C{DIR/control.json}.

    At start it listens on every endpoint, checks that, without a token,
    every TCP endpoint is bound to a loopback address (refusing the others),
    writes C{control.json} with the bound addresses and starts the
    L{ReactorWatch}; at stop it removes C{control.json}, stops the listing
    streams and stops listening.

    @param reactor: the reactor.
    @param site: the L{ControlSite}.
    @param descriptions: the endpoint strings.
    @param queue_dir: where C{control.json} goes.
    @param api: the L{ControlAPI} (its streams are stopped at stop).
    @param token_file: the token file (its path goes in C{control.json}).
    @param optional: descriptions whose failure to listen is only logged (the
        default socket); any other failure calls C{on_failure}.
    @param on_failure: called with the failure when a required endpoint
        cannot listen (the daemon stops).
    @param watch: the L{ReactorWatch} to run while serving, or L{None}.
    @ivar addresses: the bound addresses (L{endpoint_address} form).
    @ivar listening: a Deferred firing once every endpoint was tried.
    """

    name: str | None = "http"  # type: ignore[assignment]

    def __init__(self, reactor: Any, site: server.Site, descriptions: list[str],
                 queue_dir: str, api: ControlAPI, token_file: str | None = None,
                 optional: frozenset[str] = frozenset(),
                 on_failure: Callable[[Failure], object] | None = None,
                 watch: ReactorWatch | None = None) -> None:
        self.reactor = reactor
        self.site = site
        self.descriptions = list(descriptions)
        self.queue_dir = queue_dir
        self.api = api
        self.token_file = token_file
        self.optional = optional
        self.on_failure = on_failure
        self.watch = watch
        self.ports: list[Any] = []
        self.addresses: list[str] = []
        self.listening: defer.Deferred[None] | None = None
        self._wrote = False

    def startService(self) -> None:
        """Listen on every endpoint, then write C{control.json}."""
        super().startService()
        if self.watch is not None:
            self.watch.start()
        tries = [self._listen(d) for d in self.descriptions]
        self.listening = defer.gatherResults(tries).addCallback(self._advertise)

    def _listen(self, description: str) -> defer.Deferred[None]:
        try:
            ep = endpoints.serverFromString(self.reactor, description)
            d = ep.listen(self.site)
        except Exception:  # noqa: BLE001 - a bad string is reported like a failed listen
            d = defer.fail()

        def bound(port: Any) -> None:
            host = port.getHost()
            if (self.api.token is None and isinstance(host, IPv4Address | IPv6Address)
                    and not ipaddress.ip_address(host.host.partition("%")[0]).is_loopback):
                port.stopListening()
                raise OSError(f"HTTP endpoint {description!r} is bound to {host.host}, not "
                              "to loopback, and no --http-token-file was given")
            if not self.running:  # stopped meanwhile
                port.stopListening()
                return
            self.ports.append(port)
            where = endpoint_address(host)
            if where is not None:
                self.addresses.append(where)
            log.info("HTTP API listening on {where}", where=where or description)
            if isinstance(host, UNIXAddress) and "mode=" not in description:
                log.warn("HTTP endpoint {desc!r}: a Unix socket needs no token; give it "
                         "mode=600 so only this user can use it", desc=description)

        def failed(f: Failure) -> None:
            if description in self.optional:
                log.warn("no HTTP API on {desc}: {err}", desc=description,
                         err=f.getErrorMessage())
                return
            log.failure("cannot serve the HTTP API on {desc}", f, desc=description)
            if self.on_failure is not None and self.running:
                self.on_failure(f)

        return d.addCallback(bound).addErrback(failed)

    def _advertise(self, _: object) -> None:
        if not self.running:
            return
        try:
            write_control_file(self.queue_dir, self.addresses, self.token_file,
                               self.reactor.seconds())
            self._wrote = True
        except OSError as e:
            log.error("cannot write {dir}/control.json ({err}): mailout queue will not find "
                      "this daemon's API", dir=self.queue_dir, err=e.strerror or e)

    def stopService(self) -> defer.Deferred[None]:
        """Remove C{control.json}, stop the streams and the listening ports.

        @return: a Deferred firing when every port has stopped listening.
        """
        super().stopService()
        if self.watch is not None:
            self.watch.stop()
        if self._wrote:
            remove_control_file(self.queue_dir)
            self._wrote = False
        self.api.stop()
        ports, self.ports = self.ports, []
        self.addresses = []
        stops = [defer.maybeDeferred(p.stopListening) for p in ports]
        return defer.gatherResults(stops).addBoth(lambda _: None)
