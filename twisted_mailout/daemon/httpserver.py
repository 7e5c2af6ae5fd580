"""The server around the admin API: the resource tree, the site, C{/readyz}'s
probe, the endpoints, C{DIR/control.json} and the listening service.

Part of L{twisted_mailout.daemon.http} (which re-exports every name here):

  - L{build_root}: the resource tree (C{/api/} to L{ControlAPI},
    C{/healthz}, C{/readyz}), with room for more children (C{/metrics}, the
    status page at C{/} and C{/static}) given by the caller;
  - L{ControlSite}: the site, logging only changing and failed requests;
  - L{ReactorWatch}: the reactor-lag probe behind C{/readyz};
  - L{default_endpoint}, L{endpoint_address}, L{write_control_file},
    L{remove_control_file}: endpoint strings and C{control.json};
  - L{HTTPService}: listens on every endpoint, checks where each one is
    bound, writes C{DIR/control.json} (how C{mailout queue} finds the daemon)
    and removes it at stop.

Its log lines are in the namespace C{twisted_mailout.daemon.http}, as they
were before this module was split from it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.resource import IResource

from twisted_mailout.daemon.httpjson import ApiError, _json_reply, _write_error, error_body

if TYPE_CHECKING:
    from twisted_mailout.daemon.http import ControlAPI

__all__ = [
    "UNIX_PATH_MAX",
    "ControlSite",
    "HTTPService",
    "ReactorWatch",
    "build_root",
    "default_endpoint",
    "endpoint_address",
    "remove_control_file",
    "write_control_file",
]

log = Logger(namespace="twisted_mailout.daemon.http")


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
                 queue_dir: str | None, api: ControlAPI, token_file: str | None = None,
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
        if not self.running or self.queue_dir is None:
            return  # (a shared queue has no folder: no control.json)
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
        if self._wrote and self.queue_dir is not None:
            remove_control_file(self.queue_dir)
            self._wrote = False
        self.api.stop()
        ports, self.ports = self.ports, []
        self.addresses = []
        stops = [defer.maybeDeferred(p.stopListening) for p in ports]
        return defer.gatherResults(stops).addBoth(lambda _: None)
