"""A loopback stand-in for SendGrid's v3 Mail Send API, for the tests of
C{sendgrid://}.

L{MAIL_SEND_SCHEMA} is a JSON Schema (draft 2020-12) of the request body,
written from SendGrid's documentation (the Mail Send reference and its
OpenAPI description, C{tsg_mail_v3}): the documented fields only
(C{additionalProperties: false}, so a misspelt field fails), their types,
lengths and counts, the required ones, the disposition values, the headers
that may not be set. L{semantic_errors} adds the documented rules a schema
cannot say: each address once per personalization across C{to}, C{cc} and
C{bcc}; at most 1,000 recipients per personalization; C{text/plain} before
C{text/html}; a subject somewhere; C{reply_to} and C{reply_to_list} not
both.

L{SendGridServer} serves C{POST /v3/mail/send} on 127.0.0.1 in a thread
(C{http.server}), checks the bearer key and the body as SendGrid does, and
answers 202 with an C{X-Message-Id}, or SendGrid's error document
(C{{"errors": [{"message", "field"}]}}) with 400 or 401; a scripted answer
can be queued with L{SendGridServer.answer_next}.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jsonschema

_PERSON = {
    "type": "object",
    "properties": {"email": {"type": "string", "format": "email", "minLength": 3},
                   "name": {"type": "string"}},
    "required": ["email"],
    "additionalProperties": False,
}
_PEOPLE = {"type": "array", "items": _PERSON, "maxItems": 1000}
_RESERVED = ["x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type",
             "content-transfer-encoding", "to", "from", "subject", "reply-to", "cc", "bcc"]
_HEADERS = {
    "type": "object",
    "additionalProperties": {"type": "string"},
    # header names are compared without regard to case
    "propertyNames": {"not": {"pattern": "^(?i:" + "|".join(_RESERVED) + ")$"}},
}

#: The request body of C{POST /v3/mail/send}, as documented.
MAIL_SEND_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["personalizations", "from"],
    "additionalProperties": False,
    "properties": {
        "personalizations": {
            "type": "array", "minItems": 1, "maxItems": 1000,
            "items": {
                "type": "object",
                "required": ["to"],
                "additionalProperties": False,
                "properties": {
                    "from": _PERSON,
                    "to": {**_PEOPLE, "minItems": 1},
                    "cc": _PEOPLE,
                    "bcc": _PEOPLE,
                    "subject": {"type": "string", "minLength": 1},
                    "headers": _HEADERS,
                    "substitutions": {"type": "object",
                                      "additionalProperties": {"type": "string"}},
                    "dynamic_template_data": {"type": "object"},
                    "custom_args": {"type": "object"},
                    "send_at": {"type": "integer"},
                },
            },
        },
        "from": _PERSON,
        "reply_to": _PERSON,
        "reply_to_list": {"type": "array", "items": _PERSON, "maxItems": 1000,
                          "uniqueItems": True},
        "subject": {"type": "string", "minLength": 1},
        "content": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": ["type", "value"], "additionalProperties": False,
                "properties": {"type": {"type": "string", "minLength": 1},
                               "value": {"type": "string", "minLength": 1}},
            },
        },
        "attachments": {
            "type": "array",
            "items": {
                "type": "object", "required": ["content", "filename"],
                "additionalProperties": False,
                "properties": {
                    "content": {"type": "string", "minLength": 1,
                                "pattern": "^[A-Za-z0-9+/]*={0,2}$"},
                    "type": {"type": "string", "minLength": 1},
                    "filename": {"type": "string", "minLength": 1},
                    "disposition": {"enum": ["inline", "attachment"]},
                    "content_id": {"type": "string"},
                },
            },
        },
        "template_id": {"type": "string"},
        "headers": _HEADERS,
        "categories": {"type": "array", "maxItems": 10, "uniqueItems": True,
                       "items": {"type": "string", "maxLength": 255}},
        "custom_args": {"type": ["string", "object"]},
        "send_at": {"type": "integer"},
        "batch_id": {"type": "string"},
        "asm": {"type": "object"},
        "ip_pool_name": {"type": "string", "minLength": 2, "maxLength": 64},
        "mail_settings": {"type": "object"},
        "tracking_settings": {"type": "object"},
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(
    MAIL_SEND_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def schema_errors(body: Any) -> list[dict[str, str]]:
    """SendGrid-style errors for what the schema refuses in C{body}.

    @return: C{[{"message": str, "field": "a.0.b"}]}, empty when valid.
    """
    return [{"message": e.message, "field": ".".join(str(p) for p in e.absolute_path) or "null"}
            for e in _VALIDATOR.iter_errors(body)]


def semantic_errors(body: dict[str, Any]) -> list[dict[str, str]]:
    """The documented rules a schema cannot express (see the module docstring)."""
    errors = []
    for i, p in enumerate(body.get("personalizations", [])):
        addresses = [x["email"].lower() for k in ("to", "cc", "bcc") for x in p.get(k, [])]
        if len(addresses) != len(set(addresses)):
            errors.append({"message": "Each email address in the personalization block should "
                                      "be unique between to, cc, and bcc.",
                           "field": f"personalizations.{i}"})
        if len(addresses) > 1000:
            errors.append({"message": "too many recipients", "field": f"personalizations.{i}"})
        if "subject" not in body and "subject" not in p and "template_id" not in body:
            errors.append({"message": "The subject is required. You can get around this "
                                      "requirement if you use a template with a subject "
                                      "defined or if every personalization has a subject "
                                      "defined.", "field": "subject"})
    types = [c["type"] for c in body.get("content", [])]
    if "text/plain" in types and types.index("text/plain") != 0:
        errors.append({"message": "If present, text/plain content must be first",
                       "field": "content"})
    if "reply_to" in body and "reply_to_list" in body:
        errors.append({"message": "reply_to and reply_to_list are mutually exclusive",
                       "field": "reply_to"})
    return errors


@dataclass
class Received:
    """One request the server took: its headers and its JSON body."""

    headers: dict[str, str]
    body: Any
    message_id: str | None = None


@dataclass
class SendGridServer:
    """The stand-in (see the module docstring).

    @ivar api_key: the key it accepts.
    @ivar received: every request whose body parsed, in order.
    @ivar port: the TCP port, once started.
    """

    api_key: str = "SG.test-key"
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _scripted: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        """C{http://127.0.0.1:PORT}."""
        return f"http://127.0.0.1:{self.port}"

    def answer_next(self, code: int, body: Any = None,
                    headers: dict[str, str] | None = None) -> None:
        """Answer the next request with C{code} and C{body} (JSON) instead of
        checking it."""
        data = json.dumps(body).encode() if body is not None else b""
        with self._lock:
            self._scripted.append((code, headers or {}, data))

    def start(self) -> SendGridServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                with owner._lock:
                    scripted = owner._scripted.pop(0) if owner._scripted else None
                if scripted is not None:
                    self._answer(*scripted)
                    return
                if self.path != "/v3/mail/send":
                    self._errors(404, [{"message": "not found", "field": "null"}])
                    return
                if self.headers.get("Authorization") != f"Bearer {owner.api_key}":
                    self._errors(401, [{"message": "The provided authorization grant is "
                                                   "invalid, expired, or revoked",
                                        "field": "null"}])
                    return
                if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                    self._errors(415, [{"message": "Content-Type should be application/json",
                                        "field": "null"}])
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._errors(400, [{"message": "Bad Request", "field": "null"}])
                    return
                item = Received(dict(self.headers.items()), body)
                with owner._lock:
                    owner.received.append(item)
                errors = schema_errors(body) or semantic_errors(body)
                if errors:
                    self._errors(400, errors)
                    return
                item.message_id = uuid.uuid4().hex[:22]
                self._answer(202, {"X-Message-Id": item.message_id}, b"")

            def _errors(self, code: int, errors: list[dict[str, str]]) -> None:
                self._answer(code, {"Content-Type": "application/json"},
                             json.dumps({"errors": errors}).encode())

            def _answer(self, code: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
