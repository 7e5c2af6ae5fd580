"""The admin API's JSON on the wire: error replies, JSON replies, reading requests.

Part of L{twisted_mailout.daemon.http} (which re-exports every name here):

  - L{ApiError} and the error mapping (L{SelectorError} 400, L{EntryNotFound}
    404, L{AdminConflict} 409, anything else 500 with its traceback logged);
  - writing a JSON reply (C{application/json}, C{no-store}, C{nosniff});
  - reading a request: query parameters, selectors (as strict as the
    OpenAPI document states them), the JSON body, the operator's reason.

Its log lines are in the namespace C{twisted_mailout.daemon.http}, as they
were before this module was split from it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from twisted_mailout.admin import AdminConflict, Selector, SelectorError
from twisted_mailout.queue.model import EntryNotFound

__all__ = [
    "MAX_BODY",
    "MAX_FILTER",
    "MAX_QUERY_IDS",
    "MAX_REASON",
    "ApiError",
    "error_body",
]

log = Logger(namespace="twisted_mailout.daemon.http")

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

_JSON = b"application/json"
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
