"""The live status page (issue 11, item 3): its data and its web resource.

L{status_data} builds the JSON of C{GET /api/v1/status} (served by
L{twisted_mailout.daemon.http}, behind the API's token): the last hour of
outcomes and queue depth (L{History}), the queue's counts by queue name, the
destinations with the most deferred mail and their last reply, the recent
bounces, the suspensions in force, the daemon's settings (redacted: no
secret, no path of a secret), the version and the uptime.

L{StatusPage} is the twisted.web resource of the page itself (C{GET /}) and of
its assets (C{/static/...}): C{index.html}, C{status.js}, C{status.css} and
the chart library, uPlot 1.6.32 (MIT; C{uPlot.iife.min.js}, C{uPlot.min.css}
and C{uPlot.LICENSE} from C{npm pack uplot}, C{dist/}), shipped in the
package (C{twisted_mailout/daemon/static/}) so the page works with no
network. The page polls C{api/v1/status} every 5 s and redraws; when the API
answers 401 it asks for the token, keeps it in the tab's C{sessionStorage}
and sends it as C{Authorization: Bearer}. The page needs no token (it holds
no mail); the data does. Every text from the data (a remote server's reply,
a recipient) is put in the page as text, never as markup.

Mounting (L{twisted_mailout.daemon.http})::

    page = StatusPage()
    root.putChild(b"", page)               # GET /
    root.putChild(b"static", page.static)  # GET /static/NAME

or use the page as the root resource and put the other children on it (it
serves itself at C{/} and C{static} as its child).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.resources
import re
import time
from collections.abc import Mapping
from typing import Any, Protocol, cast

from twisted.internet import task
from twisted.web import http, pages, resource
from twisted.web.resource import IResource
from twisted.web.server import Request

from twisted_mailout.daemon.config import Config
from twisted_mailout.daemon.history import QUEUE_NAMES, History

__all__ = ["CONTENT_SECURITY_POLICY", "REDACTED", "STATUS_SCHEMA", "VERSION",
           "StaticAssets", "StatusPage", "load_assets", "redacted_settings", "status_data"]


def _version() -> str:
    try:
        return importlib.metadata.version("twisted-mailout")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


#: The installed package's version (read once, at import).
VERSION = _version()

#: What a secret setting shows when it is set.
REDACTED = "(set)"

#: A setting whose name has one of these words holds a secret, or names
#: where one is (a password file, a token command): only whether it is set
#: is shown.
_SECRET_WORDS = ("password", "token", "secret", "credential", "key")

#: Secrets inside a value: endpoint options (C{ssl:443:privateKey=...}) and
#: the password of a URL (C{smtp://user:pass@host}).
_SECRET_OPTION = re.compile(r"(?i)\b((?:private|cert)?key|password|passwd|token|secret)"
                            r"=[^:]*")
_URL_PASSWORD = re.compile(r"(//[^/:@\s]*):[^@/\s]*@")


class _Suspensions(Protocol):
    def list_suspensions(self) -> list[dict[str, Any]]: ...


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1:(redacted)@", _SECRET_OPTION.sub(r"\1=(redacted)", value))
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_value(v) for v in value]
    return _json_value(str(value))


def redacted_settings(config: Config | None,
                      extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The daemon's settings as the status page shows them.

    Every field of the L{Config} (and of C{extra}) by name, with its value,
    except secrets: a setting whose name has C{password}, C{token},
    C{secret}, C{credential} or C{key} in it (the AUTH password file and
    variable, the XOAUTH2 token file and command, the API's token file...)
    shows L{REDACTED} when set and L{None} when not, so neither a secret nor
    where one is kept is shown. Inside the other values, endpoint options
    such as C{privateKey=PATH} and the password of a URL are replaced by
    C{(redacted)}.

    @param config: the daemon's L{Config}, or L{None}.
    @param extra: more settings (name -> value), for those not in
        L{Config}: the HTTP endpoints, for example.
    @return: C{{name: value}} with JSON values (str, int, float, bool,
        None, lists of them), names in the order of L{Config}'s fields,
        then C{helo_name} (the EHLO name used), then C{extra}'s.
    """
    items: list[tuple[str, Any]] = []
    if config is not None:
        items.extend((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
        items.append(("helo_name", config.helo_name))
    if extra:
        items.extend(extra.items())
    out: dict[str, Any] = {}
    for name, value in items:
        if any(w in name.lower() for w in _SECRET_WORDS):
            out[name] = REDACTED if value not in (None, "", False, (), []) else None
        else:
            out[name] = _json_value(value)
    return out


def status_data(history: History | None, *, admin: _Suspensions | None = None,
                config: Config | None = None, queue_counts: Mapping[str, int] | None = None,
                started: float | None = None, now: float | None = None,
                settings: Mapping[str, Any] | None = None,
                version: str = VERSION,
                throttles: list[dict[str, Any]] | None = None,
                shared_queue: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The JSON of C{GET /api/v1/status}: everything the status page shows.

    Pure and fast (no I/O: milliseconds whatever the queue's size); call it
    in the reactor thread.

    @param history: the daemon's L{History}, or L{None} (empty series).
    @param admin: what lists the suspensions in force (the daemon's
        L{QueueAdmin<twisted_mailout.admin.QueueAdmin>}: its
        C{list_suspensions()}, no I/O), or L{None}.
    @param config: the daemon's L{Config} (shown redacted, see
        L{redacted_settings}), or L{None}.
    @param queue_counts: messages per queue name now (C{incoming},
        C{active}, C{deferred}, C{hold}); L{None}: the history's last depth
        sample (zeros before the first).
    @param started: when the daemon started, seconds since the epoch, or
        L{None} (then C{uptime} is L{None}).
    @param now: seconds since the epoch; L{None}: the history's clock (the
        reactor), else C{time.time()}.
    @param settings: more settings to show (L{redacted_settings}'s C{extra}).
    @param version: the version shown.
    @param shared_queue: the whole queue several daemons share (a
        PostgreSQL queue: C{{"incoming", "claimed", "hold", "owners"}}), or
        L{None} for a queue this daemon holds alone (C{queue} is then the
        whole queue; with a shared one it is this daemon's share).
    @param throttles: what the throttling rules hold in force
        (L{ThrottleRules.in_force<twisted_mailout.delivery.throttle.ThrottleRules.in_force>}),
        or L{None} for none.
    @return: a dict with these keys (L{STATUS_SCHEMA} is its JSON Schema)::

        {"version": str, "now": float epoch seconds,
         "started": float or None, "uptime": float seconds or None,
         "queue": {"incoming": int, "active": int, "deferred": int,
                   "hold": int, "total": int},
         "window": int seconds (3600), "bucket": int seconds (60),
         "outcomes": {"time": [int epoch seconds, start of each minute,
                      oldest first, the last one still filling],
                      "delivered": [int], "deferred": [int], "bounced": [int]},
         "totals": {"delivered": int, "deferred": int, "bounced": int}
                   (recipients over the window; expired counts as bounced),
         "since_start": the same since the daemon started,
         "depth": {"interval": float seconds, "time": [float epoch seconds],
                   "total": [int], "incoming": [int], "active": [int],
                   "deferred": [int], "hold": [int]},
         "destinations": [{"destination", "deferred" (over the window),
                           "last_reply", "last_code", "last_time",
                           "last_delivered"}] (most deferred first, <= 20),
         "bounces": [{"time", "queue_id", "recipient", "destination",
                      "reply", "code", "outcome"}] (newest first, <= 50),
         "suspensions": [{"id", "domain", "reason", "created", "until"}],
         "shared_queue": {"incoming", "claimed", "hold", "owners"} or None,
         "throttles": [{"key", "kind" ("suspend" or "rate"), "rule",
                        "reason", "until", and "rate" for kind rate}],
         "settings": {name: value}}
    """
    if now is None:
        now = history.clock.seconds() if history is not None else time.time()
    snap = (history if history is not None else History(task.Clock())).snapshot(now)
    counts = queue_counts if queue_counts is not None else (
        history.latest_depth() if history is not None else None) or {}
    queue = {name: int(counts.get(name, 0)) for name in QUEUE_NAMES}
    queue["total"] = sum(queue.values())
    return {
        "version": version,
        "now": now,
        "started": started,
        "uptime": None if started is None else max(0.0, now - started),
        "queue": queue,
        **snap,
        "suspensions": admin.list_suspensions() if admin is not None else [],
        "throttles": list(throttles or []),
        "shared_queue": dict(shared_queue) if shared_queue is not None else None,
        "settings": redacted_settings(config, settings),
    }


_INTS = {"type": "array", "items": {"type": "integer"}}
_NUMS = {"type": "array", "items": {"type": "number"}}
_COUNTS = {"type": "object", "required": ["delivered", "deferred", "bounced"],
           "properties": {s: {"type": "integer", "minimum": 0}
                          for s in ("delivered", "deferred", "bounced")}}
_OPT_STR = {"type": ["string", "null"]}
_OPT_INT = {"type": ["integer", "null"]}
_OPT_NUM = {"type": ["number", "null"]}

#: The JSON Schema (2020-12, as OpenAPI 3.1 uses) of L{status_data}'s result:
#: the response of C{GET /api/v1/status}.
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["version", "now", "started", "uptime", "queue", "window", "bucket",
                 "outcomes", "totals", "since_start", "depth", "destinations", "bounces",
                 "suspensions", "throttles", "settings"],
    "properties": {
        "version": {"type": "string"},
        "now": {"type": "number"},
        "started": _OPT_NUM,
        "uptime": _OPT_NUM,
        "queue": {"type": "object",
                  "required": [*QUEUE_NAMES, "total"],
                  "additionalProperties": {"type": "integer", "minimum": 0}},
        "window": {"type": "integer"},
        "bucket": {"type": "integer"},
        "outcomes": {"type": "object", "required": ["time", "delivered", "deferred", "bounced"],
                     "properties": {"time": _INTS, "delivered": _INTS, "deferred": _INTS,
                                    "bounced": _INTS}},
        "totals": _COUNTS,
        "since_start": _COUNTS,
        "depth": {"type": "object", "required": ["interval", "time", "total", *QUEUE_NAMES],
                  "properties": {"interval": {"type": "number"}, "time": _NUMS,
                                 "total": _INTS},
                  "additionalProperties": _INTS},
        "destinations": {"type": "array", "items": {
            "type": "object",
            "required": ["destination", "deferred", "last_reply", "last_code", "last_time",
                         "last_delivered"],
            "properties": {"destination": {"type": "string"},
                           "deferred": {"type": "integer"}, "last_reply": _OPT_STR,
                           "last_code": _OPT_INT, "last_time": {"type": "number"},
                           "last_delivered": _OPT_NUM}}},
        "bounces": {"type": "array", "items": {
            "type": "object",
            "required": ["time", "queue_id", "recipient", "destination", "reply", "code",
                         "outcome"],
            "properties": {"time": {"type": "number"}, "queue_id": _OPT_STR,
                           "recipient": {"type": "string"},
                           "destination": {"type": "string"}, "reply": _OPT_STR,
                           "code": _OPT_INT,
                           "outcome": {"enum": ["bounced", "expired"]}}}},
        "suspensions": {"type": "array", "items": {
            "type": "object", "required": ["id", "domain", "reason", "created", "until"],
            "properties": {"id": {"type": "string"}, "domain": {"type": "string"},
                           "reason": {"type": "string"}, "created": {"type": "number"},
                           "until": {"type": "number"}}}},
        "shared_queue": {"type": ["object", "null"],
                         "properties": {k: {"type": "integer", "minimum": 0}
                                        for k in ("incoming", "claimed", "hold", "owners")}},
        "throttles": {"type": "array", "items": {
            "type": "object", "required": ["key", "kind", "rule", "reason", "until"],
            "properties": {"key": {"type": "string"}, "kind": {"enum": ["suspend", "rate"]},
                           "rule": {"type": "string"}, "reason": {"type": "string"},
                           "until": {"type": "number"}, "rate": {"type": "string"}}}},
        "settings": {"type": "object"},
    },
}


# -- the page ------------------------------------------------------------------

#: The page's Content-Security-Policy: its own scripts, styles and API only;
#: no inline script, no frame, no form posting elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".LICENSE": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


class _Asset:
    """One file: its bytes, content type and entity tag."""

    def __init__(self, data: bytes, content_type: str) -> None:
        self.data = data
        self.content_type = content_type
        self.etag = b'"' + hashlib.sha256(data).hexdigest()[:32].encode() + b'"'


def load_assets(package: str = "twisted_mailout.daemon",
                folder: str = "static") -> dict[str, _Asset]:
    """Read the page's files from the package data (blocking: call it once,
    at start, as L{StatusPage} does).

    @param package: the package holding the folder.
    @param folder: the folder's name in it.
    @return: C{{file name: asset}} for the files of a known type (html,
        js, css, png, svg, txt, LICENSE).
    @raise FileNotFoundError: the folder is missing (a broken install).
    """
    root = importlib.resources.files(package).joinpath(folder)
    out = {}
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = _Asset(entry.read_bytes(), _TYPES[suffix])
    if "index.html" not in out:
        raise FileNotFoundError(f"{package}/{folder}/index.html is missing")
    return out


def _serve(request: Request, asset: _Asset, cache: bytes) -> bytes:
    request.setHeader(b"Content-Type", asset.content_type.encode())
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", cache)
    if request.setETag(asset.etag) == http.CACHED:
        return b""
    request.setHeader(b"Content-Length", str(len(asset.data)).encode())
    return b"" if request.method == b"HEAD" else asset.data


def _not_found(request: Request) -> bytes:
    request.setResponseCode(http.NOT_FOUND)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"not found\n"


def _only_get(request: Request) -> bytes | None:
    """A 405 answer for a method other than GET and HEAD, else L{None}."""
    if request.method in (b"GET", b"HEAD"):
        return None
    request.setResponseCode(http.NOT_ALLOWED)
    request.setHeader(b"Allow", b"GET, HEAD")
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"method not allowed\n"


class StaticAssets(resource.Resource):
    """C{/static/NAME}: the page's files, held in memory (a few dozen KB),
    so a request never touches the disk. C{GET} and C{HEAD}; an unknown or
    nested name is a 404. Each answer has an C{ETag} (a C{If-None-Match}
    gets a 304) and C{Cache-Control: no-cache} (revalidated, so an upgrade
    shows at once).

    @param assets: C{{name: asset}} from L{load_assets}.
    """

    isLeaf = True

    def __init__(self, assets: Mapping[str, _Asset]) -> None:
        super().__init__()
        self.assets = dict(assets)

    def render(self, request: Request) -> bytes:
        """The file named by the one path segment left (GET, HEAD), a 404
        for another name, a 405 for another method."""
        refused = _only_get(request)
        if refused is not None:
            return refused
        path = request.postpath or []
        asset = self.assets.get(path[0].decode("utf-8", "replace")) if len(path) == 1 else None
        if asset is None:
            return _not_found(request)
        return _serve(request, asset, b"no-cache")


class StatusPage(resource.Resource):
    """C{GET /}: the status page (C{index.html}, with a strict
    Content-Security-Policy, L{CONTENT_SECURITY_POLICY}); its child
    C{static} is L{StaticAssets}. Other children may be added with
    C{putChild} (the page can be the root resource); another unknown child
    is a 404.

    Reads the package's files when made (blocking, once: make it at start).

    @param assets: C{{name: asset}}; L{None}: L{load_assets}().
    @ivar static: the L{StaticAssets} resource (mount it at C{/static}).
    @raise FileNotFoundError: the package's static folder is missing.
    """

    def __init__(self, assets: Mapping[str, _Asset] | None = None) -> None:
        super().__init__()
        self.static = StaticAssets(load_assets() if assets is None else assets)
        # putChild is typed with IResource, which mypy cannot see a Resource
        # provides (zope.interface declarations are not types).
        self.putChild(b"static", cast(IResource, self.static))

    def getChild(self, path: bytes, request: Request) -> IResource:
        """C{self} for the empty segment at the end (C{/} when the page is
        the root), a 404 resource otherwise."""
        if path == b"" and not request.postpath:
            return cast(IResource, self)
        return pages.notFound("not found", "")

    def render(self, request: Request) -> bytes:
        """The page's HTML (GET, HEAD); a 405 for another method."""
        refused = _only_get(request)
        if refused is not None:
            return refused
        if request.postpath not in ([], [b""]):
            return _not_found(request)
        request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode())
        request.setHeader(b"X-Frame-Options", b"DENY")
        return _serve(request, self.static.assets["index.html"], b"no-cache")
