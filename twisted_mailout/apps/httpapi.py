"""Deliveries through the HTTP APIs of mail services: the part they share.

L{HTTPAPIDelivery} is the base of C{ses://} (L{twisted_mailout.apps.ses})
and C{sendgrid://} (L{twisted_mailout.apps.sendgrid}). Like
L{SMTPDelivery<twisted_mailout.apps.deliveries.SMTPDelivery>} it is
asynchronous: C{send} is called in the reactor thread and returns a
C{Deferred} firing with a L{DeliveryReport}, one L{RecipientResult} per
envelope recipient; C{send_blocking} waits for it from another thread.

A provider's answer becomes an SMTP-like reply, so that applications read
the report of an HTTP delivery as they read an SMTP one:

| answer | status | reply |
| --- | --- | --- |
| 2xx | delivered | C{250 2.0.0 Ok ID} (ID: the provider's message id) |
| 429, throttling | deferred | C{451 4.7.0 ...} |
| 5xx | deferred | C{451 4.3.0 ...} |
| no connection, no answer in time | deferred | C{451 4.4.1} / C{4.4.2} / C{4.4.3} (DNS), C{local} |
| a refusal of the message (400, 413, 422, the provider's own codes) | bounced | C{5xx 5.x.x ...} |
| credentials (401, 403 unless the provider says otherwise) | deferred | C{451 4.7.0} |
| a wrong endpoint (404, 405) | deferred | C{451 4.3.5} |

Each subclass names its provider's refusals (L{HTTPAPIDelivery.interpret}).
The reply text is one line: the enhanced status code (RFC 3463), the
provider, the HTTP status, the provider's error code and message.

The work that could block (resolving credentials, signing, converting a
message) runs in the reactor's thread pool; the request itself goes through
treq on the reactor. The message bytes are sent as given (SES) or converted
(SendGrid); no retry is made here (an application that wants retries uses
the queue and the daemon).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import treq
from twisted.internet import defer, error, threads
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.web import client as webclient

from twisted_mailout import api
from twisted_mailout.api import DeliveryReport, default_reactor
from twisted_mailout.apps.base import (
    Delivery,
    Envelope,
    MessageInput,
    Recipients,
    new_message_id,
    prepare,
)
from twisted_mailout.envelope import AddressError, Reply
from twisted_mailout.message import MessageError
from twisted_mailout.outcome import RecipientResult

__all__ = ["HTTPAPIDelivery", "HTTPAnswer", "HTTPRequest", "MAX_ANSWER", "by_status",
           "check_endpoint"]

log = Logger()

#: The most of an answer's body read (bytes); the rest is dropped.
MAX_ANSWER = 1 << 20


@dataclasses.dataclass(frozen=True)
class HTTPRequest:
    """One request to a provider, ready to send.

    @ivar method: C{"POST"}.
    @ivar url: the absolute URL.
    @ivar headers: header name -> value (secrets included: never logged).
    @ivar body: the request body.
    """

    method: str
    url: str
    headers: dict[str, str]
    body: bytes

    def __repr__(self) -> str:  # the headers hold the credentials
        return f"<HTTPRequest {self.method} {self.url} ({len(self.body)} bytes)>"


@dataclasses.dataclass(frozen=True)
class HTTPAnswer:
    """A provider's answer.

    @ivar code: the HTTP status code.
    @ivar headers: lower-case header name -> values.
    @ivar body: the body (at most L{MAX_ANSWER} bytes).
    """

    code: int
    headers: Mapping[str, Sequence[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header C{name} (any case), or L{None}."""
        values = self.headers.get(name.lower())
        return values[0] if values else None


def by_status(provider: str, code: int, what: str) -> Reply:
    """The reply an HTTP status gives when the provider named no error of its
    own that decides (the fallback of every provider's table).

    @param provider: C{"SES"}, C{"SendGrid"}: the start of the text.
    @param code: the HTTP status code.
    @param what: the provider's error code and message, for the text.
    @return: 2xx: 250 (delivered); 429: 451 4.7.0; 5xx: 451 4.3.0; 400 and
        422: 554 5.6.0; 413: 552 5.3.4 (bounced); 401, 403: 451 4.7.0;
        404, 405: 451 4.3.5 (a wrong endpoint); any other: 451 4.3.0.
    """
    text = f"{provider} HTTP {code}" + (f" {what}" if what else "")
    if 200 <= code < 300:
        return Reply(250, f"2.0.0 Ok {text}")
    if code == 429:
        return Reply(451, f"4.7.0 throttled: {text}")
    if code >= 500:
        return Reply(451, f"4.3.0 {text}")
    if code in (400, 422):
        return Reply(554, f"5.6.0 refused: {text}")
    if code == 413:
        return Reply(552, f"5.3.4 message too big: {text}")
    if code in (401, 403):
        return Reply(451, f"4.7.0 credentials refused: {text}")
    if code in (404, 405):
        return Reply(451, f"4.3.5 wrong endpoint: {text}")
    return Reply(451, f"4.3.0 unexpected answer: {text}")


_CLEAN = re.compile(r"\s+")


def one_line(text: str, limit: int = 900) -> str:
    """C{text} on one line (whitespace runs become one space), cut at C{limit}
    characters: a reply text from a provider's message."""
    text = _CLEAN.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_endpoint(endpoint: str, what: str) -> str:
    """Check an C{endpoint=} value: C{http://} or C{https://}, a host, no
    path beyond C{/}, no query, no user or password.

    @param endpoint: e.g. C{"https://api.sendgrid.com"}, C{"http://127.0.0.1:8080"}.
    @param what: the delivery, for the message.
    @return: the endpoint without a trailing C{/}.
    @raise ValueError: any other form.
    """
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise ValueError(f"{what}: bad endpoint {endpoint!r}: {e}") from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or parts.username is not None or parts.path not in ("", "/")):
        raise ValueError(f"{what}: endpoint must be http(s)://host[:port], not {endpoint!r}")
    return endpoint.rstrip("/")


class _TimedOut(Exception):
    """The whole exchange took longer than the delivery's timeout."""


class HTTPAPIDelivery(Delivery):
    """The base of the HTTP API deliveries (see the module docstring).

    Subclasses set L{provider}, L{batch_size} and L{scheme}, and implement
    L{build_request} (blocking work allowed: it runs in the reactor's thread
    pool) and L{interpret}.

    @param endpoint: the API's base URL, C{scheme://host[:port]}.
    @param timeout: seconds for one request, from connecting to the end of
        the answer; positive.
    @param reactor: the reactor; the global one when L{None}.
    @param http_client: the treq C{HTTPClient} (or anything with its
        C{request} method, e.g. C{treq.testing.StubTreq}) to send with; one
        of this delivery's own, with a persistent connection pool, when
        L{None}.
    @raise ValueError: a bad endpoint or timeout.
    """

    asynchronous = True
    #: The provider's name, in reply texts.
    provider: ClassVar[str] = ""
    #: The most envelope recipients of one request; more are sent in several.
    batch_size: ClassVar[int] = 50

    def __init__(self, *, endpoint: str, timeout: float = 60.0, reactor: Any = None,
                 http_client: Any = None) -> None:
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.endpoint = check_endpoint(endpoint, f"{self.scheme}://")
        self.timeout = float(timeout)
        self.reactor = reactor
        self._pool: webclient.HTTPConnectionPool | None = None
        self._client = http_client
        parts = urlsplit(self.endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        #: C{"host:port"} of the API, the C{relay} of the results it gave.
        self.relay = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- what subclasses provide ----------------------------------------------

    def build_request(self, env: Envelope, recipients: list[str]) -> HTTPRequest:
        """The request that hands the message to the provider for
        C{recipients}. Runs in the reactor's thread pool (it may block).

        @param env: the validated envelope and message bytes.
        @param recipients: at most L{batch_size} of C{env.recipients}.
        @raise MessageError: the message cannot be expressed for the
            provider (the Deferred of L{send} fails with it).
        @raise Exception: anything else (e.g. no credentials) gives each of
            C{recipients} a deferred result (451 4.3.0) with its message.
        """
        raise NotImplementedError

    def interpret(self, answer: HTTPAnswer) -> Reply:
        """The reply a provider's answer gives (see the module docstring).

        @param answer: the answer.
        @return: a L{Reply}: 2xx delivered, 4xx deferred, 5xx bounced.
        """
        raise NotImplementedError

    # -- sending ----------------------------------------------------------------

    def _http(self) -> Any:
        """The HTTP client, made on first use (in the reactor thread)."""
        if self._client is None:
            reactor = default_reactor(self.reactor)
            self._pool = webclient.HTTPConnectionPool(reactor, persistent=True)
            agent: Any = webclient.Agent(reactor, connectTimeout=self.timeout, pool=self._pool)
            self._client = treq.client.HTTPClient(agent)
        return self._client

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> defer.Deferred[DeliveryReport]:
        """Hand the message to the provider now (in the reactor thread).

        @param sender: envelope sender; C{""}/C{"<>"}/L{None} for the null sender.
        @param recipients: the envelope recipients (a C{str} is one).
        @param message: C{bytes}, C{str} or C{email.message.Message}.
        @param message_id: the results' C{queue_id}; a new id when L{None}.
        @return: a C{Deferred} firing with a L{DeliveryReport} (recipients in
            the order given, after duplicates are dropped); it fails only for
            bad input (L{AddressError}, L{MessageError}). Cancelling it aborts
            the request in flight; recipients not yet sent get no result.
        """
        try:
            env = prepare(sender, recipients, message)
        except (AddressError, MessageError) as e:
            return defer.fail(e)
        mid = message_id or new_message_id()
        return defer.Deferred.fromCoroutine(self._deliver(env, mid))

    async def _deliver(self, env: Envelope, mid: str) -> DeliveryReport:
        results: list[RecipientResult] = []
        size = self.batch_size
        for start in range(0, len(env.recipients), size):
            batch = env.recipients[start:start + size]
            reply = await self._one(env, batch)
            relay = None if reply.local else self.relay
            results += [RecipientResult.from_reply(r, reply, relay=relay, queue_id=mid)
                        for r in batch]
        return DeliveryReport(results)

    async def _one(self, env: Envelope, batch: list[str]) -> Reply:
        """One request for C{batch}: the reply for each of its recipients."""
        reactor = default_reactor(self.reactor)
        try:
            request = await threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), self.build_request, env, batch)
        except (MessageError, defer.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - credentials, configuration: a result
            log.failure("{provider}: the request could not be made", Failure(),
                        provider=self.provider)
            return Reply(451, f"4.3.0 {self.provider}: {one_line(str(e)) or type(e).__name__}",
                         local=True)
        try:
            answer = await self._exchange(request)
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure maps to a reply
            return self._failure_reply(e)
        return self.interpret(answer)

    async def _exchange(self, request: HTTPRequest) -> HTTPAnswer:
        """Send C{request} and read the answer, within L{timeout}.

        @raise _TimedOut: no whole answer in time.
        @raise Exception: what treq and the agent raise.
        """
        reactor = default_reactor(self.reactor)
        work = defer.Deferred.fromCoroutine(self._request(request))
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            work.cancel()

        timer = reactor.callLater(self.timeout, expire)
        try:
            return await work
        except Exception as e:
            if timed_out:
                raise _TimedOut() from None
            if _cancelled(e):  # the agent wraps a cancellation in ResponseNeverReceived
                raise defer.CancelledError() from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _request(self, request: HTTPRequest) -> HTTPAnswer:
        response = await self._http().request(
            request.method, request.url, headers=request.headers, data=request.body,
            unbuffered=True)
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            if size < MAX_ANSWER:
                chunks.append(data[: MAX_ANSWER - size])
            size += len(data)

        await treq.collect(response, collect)
        headers = {k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs]
                   for k, vs in response.headers.getAllRawHeaders()}
        return HTTPAnswer(response.code, headers, b"".join(chunks))

    def _failure_reply(self, e: BaseException) -> Reply:
        """The reply when no answer came (local: no server said it)."""
        where = f"{self.provider} ({self.relay})"
        if isinstance(e, _TimedOut):
            return Reply(451, f"4.4.2 {where}: no answer within {self.timeout:g} s "
                              "(the provider may have accepted the message)", local=True)
        if isinstance(e, error.DNSLookupError):
            return Reply(451, f"4.4.3 {where}: DNS lookup failed: {one_line(str(e))}", local=True)
        if isinstance(e, (error.ConnectionRefusedError, error.ConnectError,
                          error.TimeoutError)):
            return Reply(451, f"4.4.1 {where}: cannot connect: {one_line(str(e))}", local=True)
        reasons = getattr(e, "reasons", None) or []
        texts = [one_line(r.getErrorMessage()) for r in reasons if isinstance(r, Failure)]
        if any(_is_tls(r) for r in reasons):
            return Reply(451, f"4.7.5 {where}: TLS failed: {'; '.join(texts)}", local=True)
        if isinstance(e, (webclient.ResponseNeverReceived, webclient.ResponseFailed,
                          error.ConnectionLost, error.ConnectionDone)):
            why = "; ".join(texts) or type(e).__name__
            return Reply(451, f"4.4.2 {where}: connection lost before the answer "
                              f"(the provider may have accepted the message): {why}",
                         local=True)
        log.failure("{provider}: unexpected failure", Failure(e), provider=self.provider)
        return Reply(451, f"4.3.0 {where}: {type(e).__name__}: {one_line(str(e))}", local=True)

    def send_blocking(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
                      message_id: str | None = None) -> DeliveryReport:
        """L{send} from a thread other than the reactor's, waiting for the
        report. The reactor must be running in another thread.

        @return: the L{DeliveryReport}.
        @raise RuntimeError: called in the reactor thread (it would wait for
            itself) or the reactor is not running (L{api.blocking_call}).
        @raise AddressError, MessageError: bad input.
        """
        report: DeliveryReport = api.blocking_call(
            default_reactor(self.reactor), self.send, sender, recipients, message,
            message_id=message_id)
        return report

    def disconnect(self) -> defer.Deferred[None]:
        """Close the idle connections of this delivery's own pool (in the
        reactor thread).

        @return: a Deferred firing when they are closed.
        """
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()

    def close(self) -> None:
        """Close the idle connections (L{disconnect}), from any thread."""
        if self._pool is None:
            return
        reactor = default_reactor(self.reactor)
        if threadable.isInIOThread() or not reactor.running:
            self.disconnect()
        else:
            reactor.callFromThread(self.disconnect)


def _cancelled(e: BaseException) -> bool:
    """C{e} is a cancellation, or the agent's failure wrapping one."""
    if isinstance(e, defer.CancelledError):
        return True
    reasons = getattr(e, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(defer.CancelledError) for r in reasons)


def _is_tls(reason: Any) -> bool:
    """The failure comes from the TLS layer (pyOpenSSL)."""
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - Twisted[tls] is a dependency
        return False
    return isinstance(reason, Failure) and reason.check(SSL.Error) is not None
