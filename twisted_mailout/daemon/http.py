"""The daemon's HTTP server: the admin API (C{/api/v1}), C{/healthz}, C{/readyz}.

The contract is docs/operations.md (and C{openapi.json} beside this
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

The code is in three modules, and every name is importable from this one:
this module holds L{ControlAPI} (routes, token check, handlers) and the
C{format=ndjson} stream; L{twisted_mailout.daemon.httpjson} the errors, JSON
replies and request parsing; L{twisted_mailout.daemon.httpserver} the
resource tree, the site, L{ReactorWatch}, the endpoints, C{control.json} and
L{HTTPService}. All of them log in this module's namespace.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from importlib import resources as _pkg_resources
from typing import Any

from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import server
from zope.interface import implementer

from twisted_mailout.admin import QueueAdmin
from twisted_mailout.daemon.httpjson import (
    _DOMAIN,
    _JSON,
    _SELECTOR_PARAMS,
    MAX_BODY,
    MAX_FILTER,
    MAX_QUERY_IDS,
    MAX_REASON,
    ApiError,
    _as_error,
    _bad,
    _body,
    _dumps,
    _flag,
    _keys,
    _query,
    _reason,
    _selector,
    _selector_from_query,
    _write_error,
    _write_json,
    error_body,
)
from twisted_mailout.daemon.httpserver import (
    UNIX_PATH_MAX,
    ControlSite,
    HTTPService,
    ReactorWatch,
    build_root,
    default_endpoint,
    endpoint_address,
    remove_control_file,
    write_control_file,
)

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
    # re-exported from httpjson and httpserver
    "MAX_FILTER",
    "MAX_QUERY_IDS",
    "MAX_REASON",
    "UNIX_PATH_MAX",
    "error_body",
]

log = Logger()

#: The actions of C{POST /api/v1/actions/{action}}.
ACTIONS = ("hold", "release", "delete", "bounce", "flush", "requeue")
#: Bytes of ndjson gathered in the listing thread before they are handed to
#: the reactor (the first line always goes at once).
STREAM_CHUNK = 32 * 1024
#: Seconds after which gathered ndjson lines are handed over anyway.
STREAM_FLUSH = 0.1
#: Listings streamed at once; more wait their turn. They have threads of
#: their own, so slow clients never take the store's threads from delivery.
LISTING_THREADS = 4

_NDJSON = b"application/x-ndjson"


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
