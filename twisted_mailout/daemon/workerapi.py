"""The parent's HTTP API with C{--workers N}: one API over N workers.

Each worker serves the usual API (L{twisted_mailout.daemon.http.ControlAPI})
over its share of the queue on C{DIR/workers/I.sock}. The parent serves the
same routes, with the same token rules, on C{DIR/control.sock} and every
C{--http} endpoint, and answers each by asking the workers:

  - C{GET /messages}, C{/summary}, C{/status}: every worker; the answers are
    merged (L{merge_json}: counts added, lists joined, a destination's or a
    domain's rows added up);
  - C{GET /messages/QID}: the one worker that owns C{QID} (L{shard_of});
  - C{POST /actions/ACTION}: every worker (each acts on its own share); the
    results are merged, so C{matched} and C{changed} count the whole queue;
  - suspensions: kept by worker 0 (it saves C{DIR/suspensions.json}); after a
    change the other workers reload them (L{WorkersAPI.reload});
  - C{/metrics}: every worker's metrics, each sample labelled
    C{worker="I"} (L{MergedMetrics}).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import treq
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web import resource, server
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from twisted_mailout.daemon.http import ApiError, ControlAPI
from twisted_mailout.queue.shard import shard_of

__all__ = ["MergedMetrics", "WorkerClient", "WorkersAPI", "merge_json"]

#: Numbers that are not counts: the first worker's value is kept.
_FIRST = frozenset({"now", "started", "uptime", "window", "bucket", "interval", "pid",
                    "version", "created", "until", "last_time", "last_delivered", "time",
                    "last_code", "last_reply", "by", "action"})
#: Lists of rows merged by the value of this key (its other numbers added).
_ROW_KEYS = ("destination", "domain", "sender")


@implementer(IAgentEndpointFactory)
class _UnixFactory:
    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor, self.path = reactor, path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path, timeout=10)


class WorkerClient:
    """HTTP requests to one worker's API on its Unix socket.

    @param reactor: the reactor.
    @param path: the socket (C{DIR/workers/I.sock}).
    """

    def __init__(self, reactor: Any, path: str) -> None:
        self.path = path
        self.http = treq.client.HTTPClient(
            Agent.usingEndpointFactory(reactor, _UnixFactory(reactor, path)))

    async def request(self, method: str, path: str, body: bytes | None = None,
                      timeout: float = 60.0) -> tuple[int, bytes]:
        """One request.

        @param method: C{"GET"}, C{"POST"}, C{"DELETE"}.
        @param path: the path and query (C{/api/v1/...?...}).
        @param body: a JSON body, or L{None}.
        @param timeout: seconds for the whole answer.
        @return: C{(status, body bytes)}.
        @raise Exception: the worker cannot be reached (connection refused,
            timeout).
        """
        headers: Any = {b"content-type": [b"application/json"]} if body is not None else None
        resp = await self.http.request(method, "http://worker" + path, data=body,
                                       headers=headers, timeout=timeout)
        data = await treq.content(resp)
        return resp.code, data


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def merge_json(values: Sequence[Any], key: str | None = None) -> Any:
    """Merge the JSON answers of several workers into one.

    Dicts are merged key by key; numbers are added (except those in
    L{_FIRST}: times, intervals, ids, which are the first worker's); lists of
    numbers of the same length are added element by element (series of the
    status page), except time axes; lists of rows that name a destination,
    domain or sender are merged by that name; suspensions (rows with an
    C{id}) are joined without repeats; other lists are joined; anything else
    is the first value that is not null.

    @param values: the answers, in worker order.
    @param key: the key these values were found under (for the rules above).
    @return: the merged answer.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if all(isinstance(v, dict) for v in present):
        keys: list[str] = []
        for v in present:
            keys.extend(k for k in v if k not in keys)
        return {k: merge_json([v.get(k) for v in present], k) for k in keys}
    if all(_is_number(v) for v in present):
        if key in _FIRST:
            return max(present) if key in ("now", "uptime", "last_time", "last_delivered") \
                else first
        return sum(present)
    if all(isinstance(v, list) for v in present):
        if key == "time" or key in _FIRST:
            return first
        if all(all(_is_number(x) for x in v) for v in present) and \
                len({len(v) for v in present}) == 1 and first:
            return [sum(col) for col in zip(*present, strict=True)]
        if all(v == first for v in present) and not any(isinstance(x, dict) for x in first):
            return first  # the same labels from every worker (a summary's buckets)
        rows = [x for v in present for x in v]
        if rows and all(isinstance(r, dict) for r in rows):
            name = next((k for k in _ROW_KEYS if all(k in r for r in rows)), None)
            if name is not None:
                grouped: dict[Any, list[dict[str, Any]]] = {}
                for r in rows:
                    grouped.setdefault(r[name], []).append(r)
                return [merge_json(g) if len(g) > 1 else g[0] for g in grouped.values()]
            if all("id" in r for r in rows):
                seen: dict[Any, Any] = {}
                for r in rows:
                    seen.setdefault(r["id"], r)
                return list(seen.values())
        return rows
    return first


class WorkersAPI(ControlAPI):
    """The routes of C{/api/v1} answered by asking the workers (see the
    module docstring). Token and loopback rules are L{ControlAPI}'s.

    @param reactor: the reactor.
    @param clients: one L{WorkerClient} per worker, in index order.
    @param reload: called after worker 0 changed the suspensions, with the
        indexes of the other workers; returns a Deferred firing once they
        reloaded them.
    @param token: as for L{ControlAPI}.
    """

    def __init__(self, reactor: Any, clients: Sequence[WorkerClient],
                 reload: Callable[[list[int]], defer.Deferred[Any]],
                 token: str | None = None) -> None:
        super().__init__(admin=None, reactor=reactor, token=token)  # type: ignore[arg-type]
        self.clients = list(clients)
        self.reload = reload

    # -- forwarding -----------------------------------------------------------

    async def _ask(self, request: server.Request, targets: Sequence[int],
                   path: str | None = None) -> list[Any]:
        """Send C{request} (or C{path} with its method and body) to the
        workers C{targets}; their JSON answers, in order.

        @raise ApiError: a worker answered an error (its status and message),
            or could not be reached (503).
        """
        method = (request.method or b"GET").decode("ascii", "replace").upper()
        if method == "HEAD":
            method = "GET"
        if path is None:
            path = (request.uri or b"/").decode("utf-8", "replace")
        body = None
        if method in ("POST", "DELETE") and request.content is not None:
            request.content.seek(0)
            body = request.content.read() or None

        async def one(i: int) -> tuple[int, bytes]:
            try:
                return await self.clients[i].request(method, path, body)
            except Exception as e:  # noqa: BLE001 - reported as 503
                raise ApiError(503, f"worker {i} did not answer: {e}") from None

        answers = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(i)) for i in targets],
            consumeErrors=True).addErrback(lambda f: f.value.subFailure.raiseException())
        out = []
        for status, data in answers:
            try:
                obj = json.loads(data) if data else None
            except ValueError:
                raise ApiError(502, "a worker answered something that is not JSON") from None
            if status >= 400:
                err = obj.get("error", {}) if isinstance(obj, dict) else {}
                raise ApiError(status, str(err.get("message", f"a worker answered {status}")))
            out.append(obj)
        return out

    @property
    def _all(self) -> list[int]:
        return list(range(len(self.clients)))

    # -- the routes ------------------------------------------------------------------

    async def list_messages(self, request: server.Request) -> tuple[int, Any] | None:
        """C{GET /api/v1/messages}: every worker's rows; with
        C{format=ndjson}, one row a line (gathered, then written)."""
        parts = urlsplit((request.uri or b"").decode("utf-8", "replace"))
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                 if k != "format"]
        fmt = dict(parse_qsl(parts.query)).get("format", "json")
        if fmt not in ("json", "ndjson"):
            raise ApiError(400, f"format is json or ndjson, not {fmt!r}")
        answers = await self._ask(request, self._all,
                                  parts.path + ("?" + urlencode(query) if query else ""))
        rows = [r for a in answers for r in (a or {}).get("messages", [])]
        rows.sort(key=lambda r: str(r.get("queue_id", "")))
        if fmt == "json":
            return 200, {"messages": rows, "count": len(rows)}
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()
        return None

    async def show(self, request: server.Request, qid: str) -> tuple[int, Any]:
        """C{GET /api/v1/messages/{qid}}: from the worker owning C{qid}."""
        (answer,) = await self._ask(request, [shard_of(qid, len(self.clients))])
        return 200, answer

    async def summary(self, request: server.Request) -> tuple[int, Any]:
        """C{GET /api/v1/summary}: the workers' summaries added up (C{top}
        applied to the merged rows)."""
        parts = urlsplit((request.uri or b"").decode("utf-8", "replace"))
        params = parse_qsl(parts.query, keep_blank_values=True)
        top_text = dict(params).get("top")
        query = [(k, v) for k, v in params if k != "top"]
        answers = await self._ask(request, self._all,
                                  parts.path + ("?" + urlencode(query) if query else ""))
        merged = merge_json(answers)
        if isinstance(merged, dict) and isinstance(merged.get("rows"), list):
            merged["rows"].sort(key=lambda r: (-int(r.get("total", 0)),
                                               str(r.get(merged.get("by", "domain"), ""))))
            if top_text is not None:
                try:
                    top = int(top_text)
                except ValueError:
                    raise ApiError(400, f"top takes a whole number, not {top_text!r}") from None
                if top < 0:
                    raise ApiError(400, "top must not be negative")
                merged["rows"] = merged["rows"][:top]
        return 200, merged

    async def act(self, request: server.Request, action: str) -> tuple[int, Any]:
        """C{POST /api/v1/actions/{action}}: every worker acts on its share;
        the results added up."""
        answers = await self._ask(request, self._all)
        return 200, merge_json(answers)

    async def suspensions(self, request: server.Request) -> tuple[int, Any]:
        """C{GET /api/v1/suspensions}: those in force in any worker."""
        return 200, merge_json(await self._ask(request, self._all))

    async def suspend(self, request: server.Request) -> tuple[int, Any]:
        """C{POST /api/v1/suspensions}: made (and saved) by worker 0, then
        reloaded by the others."""
        (answer,) = await self._ask(request, [0])
        await self.reload(self._all[1:])
        return 201, answer

    async def cancel_suspension(self, request: server.Request, sid: str) -> tuple[int, Any]:
        """C{DELETE /api/v1/suspensions/{id}}: by worker 0, then reloaded."""
        (answer,) = await self._ask(request, [0])
        await self.reload(self._all[1:])
        return 200, answer

    async def status_data(self, request: server.Request) -> tuple[int, Any]:
        """C{GET /api/v1/status}: the workers' status data merged, with
        C{workers} (how many answer)."""
        answers = await self._ask(request, self._all)
        merged = merge_json(answers)
        if isinstance(merged, dict):
            merged["workers"] = len(answers)
        return 200, merged


class MergedMetrics(resource.Resource):
    """C{/metrics} of the parent: each worker's exposition, every sample
    labelled C{worker="I"}, one C{# HELP}/C{# TYPE} per family.

    @param clients: the workers' L{WorkerClient}s.
    """

    isLeaf = True

    def __init__(self, clients: Sequence[WorkerClient]) -> None:
        super().__init__()
        self.clients = list(clients)

    def render_GET(self, request: server.Request) -> int:
        d = defer.Deferred.fromCoroutine(self._gather())

        def write(body: bytes) -> None:
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(body)
            request.finish()

        def failed(f: Any) -> None:
            request.setResponseCode(503)
            request.write(f"workers' metrics unavailable: {f.getErrorMessage()}\n".encode())
            request.finish()

        d.addCallbacks(write, failed)
        return server.NOT_DONE_YET

    async def _gather(self) -> bytes:
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        texts = []
        for i, c in enumerate(self.clients):
            try:
                status, data = await c.request("GET", "/metrics", timeout=10)
            except Exception:  # noqa: BLE001 - a worker restarting: left out
                continue
            if status == 200:
                texts.append((i, data.decode("utf-8", "replace")))
        if not texts:
            raise RuntimeError("no worker answered")
        families: dict[str, Any] = {}
        for i, text in texts:
            for fam in text_string_to_metric_families(text):
                have = families.get(fam.name)
                if have is None:
                    have = families[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                       fam.unit)
                for s in fam.samples:
                    have.samples.append(s._replace(labels={**s.labels, "worker": str(i)}))
        return _expose(families.values())


def _expose(families: Any) -> bytes:
    from prometheus_client import generate_latest

    class _Collector:
        def collect(self) -> Any:
            return list(families)

    class _Registry:
        def collect(self) -> Any:
            return _Collector().collect()

    return generate_latest(_Registry())
