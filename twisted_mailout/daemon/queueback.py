"""The two ways in of the C{mailout queue} command (L{queuecli}): the
queue folder itself (L{OfflineBackend}, no daemon running) and the running
daemon's HTTP API (L{ApiBackend}), both offering L{Backend}; with the
command's error (L{CommandError}), its sysexits(3) statuses and its
L{ACTIONS}.

Everything here is importable from L{twisted_mailout.daemon.queuecli} too.
"""

from __future__ import annotations

import dataclasses

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.python.failure import Failure

from twisted_mailout.queue.model import EntryNotFound

if TYPE_CHECKING:
    from twisted.internet import defer

    from twisted_mailout.admin import QueueAdmin, Selector

# The admin layer (and the delivery layer under it) is imported when a
# subcommand runs, not when the parser is built: `mailout sendmail` builds
# the same parser and should not pay for it.

__all__ = [
    "ACTIONS",
    "EX_CANTCREAT",
    "EX_NOINPUT",
    "EX_NOPERM",
    "EX_OK",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "ApiBackend",
    "Backend",
    "CommandError",
    "OfflineBackend",
    "fired",
]

EX_OK = 0
EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77

#: The actions on messages, with the word that says what happened.
ACTIONS = {"hold": "held", "release": "released", "delete": "deleted", "bounce": "bounced",
           "flush": "flushed", "requeue": "requeued"}

T = TypeVar("T")


class CommandError(Exception):
    """A failure the command reports in one line and an exit status.

    @ivar message: the text after C{mailout queue: }.
    @ivar status: the sysexits(3) exit status.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def fired(d: defer.Deferred[T]) -> T:
    """The result of a Deferred that has already fired (the command's store
    work runs through C{inline_io}, which fires at once: no reactor).

    @param d: the Deferred.
    @return: its result.
    @raise Exception: the error it failed with.
    @raise RuntimeError: it has not fired.
    """
    out: list[Any] = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("the operation did not finish at once (it needs a reactor)")
    if isinstance(out[0], Failure):
        out[0].raiseException()
    result: T = out[0]
    return result


class _Clock:
    """The wall clock, as QueueAdmin wants it (C{seconds()})."""

    def seconds(self) -> float:
        return time.time()


# -- the two ways in ----------------------------------------------------------------


class Backend(Protocol):
    """What the subcommands need, offered by the store (L{OfflineBackend})
    and by the daemon's API (L{ApiBackend}). Every method blocks."""

    def rows(self, selector: Selector) -> Iterator[dict[str, Any]]:
        """The C{list --json} rows (L{views.row}) of the selected messages,
        as they are read. @raise EntryNotFound, SelectorError, ControlError."""

    def show(self, qid: str, body: bool) -> dict[str, Any]:
        """One message in full (L{views.detail})."""

    def summary(self, by: str, top: int | None, selector: Selector) -> dict[str, Any]:
        """The queue's shape (L{views.summary})."""

    def act(self, action: str, selector: Selector, reason: str,
            progress: Callable[[int, int], object] | None) -> dict[str, Any]:
        """Run one of L{ACTIONS}; returns C{ActionResult.to_json()}."""

    def suspensions(self) -> list[dict[str, Any]]:
        """The suspensions in force (their JSON forms)."""

    def suspend(self, domain: str, duration: float, reason: str) -> dict[str, Any]:
        """Suspend a destination; returns the suspension."""

    def cancel_suspension(self, sid: str, reason: str) -> dict[str, Any]:
        """End a suspension; returns it."""

    def close(self) -> None:
        """Let go of the folder's lock or the connection."""


class OfflineBackend:
    """The operations on the folder itself, no daemon running.

    @param store: the queue folder, or L{None} for a folder that exists but
        is empty or not yet initialised (an empty queue).
    @param locked: this process holds C{store}'s lock (released by L{close}).
    @param progress: passed to L{QueueAdmin} as its progress callback.
    """

    def __init__(self, store: Any, locked: bool = False) -> None:
        self.store = store
        self.locked = locked
        self.clock = _Clock()
        self._admin: QueueAdmin | None = None
        self._log_observer: Any = None
        self._progress: Callable[[int, int], object] | None = None

    def _get_admin(self) -> QueueAdmin:
        assert self.store is not None
        if self._admin is None:
            from twisted_mailout.admin import QueueAdmin

            self._admin = QueueAdmin(self.store, self.clock, source="cli",
                                     reporting_mta=socket.getfqdn() or "localhost",
                                     progress=self._report)
            fired(self._admin.start())
            if hasattr(self.store, "path"):  # a folder (a read-only database: nothing)
                self._install_admin_log()
        return self._admin

    def _install_admin_log(self) -> None:
        """With no daemon to log them, the command's changes are logged to
        C{DIR/admin.log} (mode 0600, appended; one line per message, as the
        daemon's log has them), so every operator action leaves a record."""
        from twisted.logger import formatEvent, globalLogPublisher

        assert self.store is not None
        path = os.path.join(self.store.path, "admin.log")

        def observer(event: dict[str, Any]) -> None:
            if event.get("log_namespace") != "twisted_mailout.admin":
                return
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                  time.localtime(event.get("log_time", time.time())))
            line = f"{stamp} mailout-queue[{os.getpid()}]: {formatEvent(event)}\n"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                             0o600)
                try:
                    os.write(fd, line.encode("utf-8", "replace"))
                finally:
                    os.close(fd)
            except OSError as e:
                print(f"mailout queue: cannot write {path}: {e.strerror or e}",
                      file=sys.stderr)

        # a plain callable is an ILogObserver (twisted.logger documents it)
        globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
        self._log_observer = observer

    def _report(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(done, total)

    def rows(self, selector: Selector) -> Iterator[dict[str, Any]]:
        """See L{Backend.rows}."""
        if self.store is None:
            if selector.ids:
                raise EntryNotFound("not in the queue: " + ", ".join(selector.ids))
            return iter(())
        return self._get_admin().iter_rows(selector, self.clock.seconds())

    def show(self, qid: str, body: bool) -> dict[str, Any]:
        """See L{Backend.show}."""
        if self.store is None:
            _check_qid(qid)
            raise EntryNotFound(f"no message {qid} in the queue")
        return fired(self._get_admin().show(qid, body))

    def summary(self, by: str, top: int | None, selector: Selector) -> dict[str, Any]:
        """See L{Backend.summary}."""
        if self.store is None:
            if selector.ids:
                raise EntryNotFound("not in the queue: " + ", ".join(selector.ids))
            from twisted_mailout.admin import views

            return views.summary([], self.clock.seconds(), by, top)
        return fired(self._get_admin().summary(by, selector, top))

    def act(self, action: str, selector: Selector, reason: str,
            progress: Callable[[int, int], object] | None) -> dict[str, Any]:
        """See L{Backend.act}."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        if self.store is None:
            if action != "flush":
                selector.require(action)
            if selector.ids:
                raise EntryNotFound("not in the queue: " + ", ".join(selector.ids))
            return {"action": action, "matched": 0, "changed": 0, "queue_ids": [],
                    "skipped": {}, "dsn_queue_ids": []}
        admin = self._get_admin()
        # flush with no selector means all deferred mail: QueueAdmin.flush's
        # default, which it applies to None (an empty Selector is truthy)
        chosen = None if action == "flush" and selector.is_empty else selector
        self._progress = progress
        try:
            method: Callable[[Selector | None, str], defer.Deferred[Any]] = getattr(
                admin, action)
            return fired(method(chosen, reason)).to_json()
        finally:
            self._progress = None

    def suspensions(self) -> list[dict[str, Any]]:
        """See L{Backend.suspensions}."""
        if self.store is None:
            return []
        return self._get_admin().list_suspensions()

    def suspend(self, domain: str, duration: float, reason: str) -> dict[str, Any]:
        """See L{Backend.suspend}.

        @raise CommandError: the folder is not initialised (exit 66).
        """
        if self.store is None:
            raise CommandError("the queue folder is not initialised yet (no new/ in it): "
                               "start the daemon on it once, or queue mail to it first",
                               EX_NOINPUT)
        return fired(self._get_admin().suspend(domain, duration, reason))

    def cancel_suspension(self, sid: str, reason: str) -> dict[str, Any]:
        """See L{Backend.cancel_suspension}."""
        if self.store is None:
            raise EntryNotFound(f"no suspension {sid!r} in force")
        return fired(self._get_admin().cancel_suspension(sid, reason))

    def close(self) -> None:
        """Release the folder's lock if held."""
        obs = self._log_observer
        if obs is not None:
            from twisted.logger import globalLogPublisher

            globalLogPublisher.removeObserver(obs)
            self._log_observer = None
        if self.store is not None and self.locked:
            self.store.unlock()
            self.locked = False


def _check_qid(qid: str) -> None:
    """@raise SelectorError: C{qid} cannot be a queue id."""
    from twisted_mailout.admin import Selector

    Selector(ids=(qid,))


def _selector_params(selector: Selector) -> dict[str, str]:
    """The API's query parameters for a selector (api_contract.md)."""
    out: dict[str, str] = {}
    if selector.ids:
        out["ids"] = ",".join(selector.ids)
    if selector.all:
        out["all"] = "1"
    for key in ("domain", "sender", "recipient", "state"):
        v = getattr(selector, key)
        if v is not None:
            out[key] = v
    if selector.older_than is not None:
        out["older_than"] = f"{selector.older_than:g}"
    return out


def _merge_summaries(parts: list[dict[str, Any]], top: int | None) -> dict[str, Any]:
    """One C{qshape} summary from several over disjoint sets of messages
    (columns added, rows of the same domain added, then sorted as
    L{views.summary<twisted_mailout.admin.views.summary>} sorts them)."""
    out = dict(parts[0])
    width = len(out["total"]["counts"])
    total = [0] * width
    rows: dict[str, list[int]] = {}
    for part in parts:
        total = [a + b for a, b in zip(total, part["total"]["counts"], strict=True)]
        for r in part["rows"]:
            acc = rows.setdefault(r["domain"], [0] * width)
            rows[r["domain"]] = [a + b for a, b in zip(acc, r["counts"], strict=True)]
    ordered = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    if top is not None:
        ordered = ordered[:top]
    out["total"] = {"total": sum(total), "counts": total}
    out["rows"] = [{"domain": k, "total": sum(v), "counts": v} for k, v in ordered]
    out["messages"] = sum(p.get("messages", 0) for p in parts)
    return out


class ApiBackend:
    """The operations through the running daemon's HTTP API.

    @param client: a L{twisted_mailout.daemon.control.ControlClient} (its
        C{get}, C{post}, C{delete} and C{iter_ndjson} block and raise
        C{ControlError(status, code, message)}).
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    #: Queue ids per GET: the API takes at most 2000 characters of ids in
    #: its query (Twisted's request line is bounded), so more are sent in
    #: several requests (ids are 23 characters and a comma).
    IDS_PER_REQUEST = 80

    def _id_chunks(self, selector: Selector) -> list[Selector]:
        ids = selector.ids
        if len(ids) <= self.IDS_PER_REQUEST:
            return [selector]
        return [dataclasses.replace(selector, ids=ids[i:i + self.IDS_PER_REQUEST])
                for i in range(0, len(ids), self.IDS_PER_REQUEST)]

    def rows(self, selector: Selector) -> Iterator[dict[str, Any]]:
        """See L{Backend.rows} (streamed: the client asks for C{format=ndjson};
        many ids go in several requests, every id checked before any row is
        printed)."""
        chunks = self._id_chunks(selector)
        if len(chunks) > 1:
            # an unknown id must fail the command before it prints anything
            for chunk in chunks:
                self.client.get("/api/v1/summary", _selector_params(chunk))
        for chunk in chunks:
            yield from self.client.iter_ndjson("/api/v1/messages", _selector_params(chunk))

    def show(self, qid: str, body: bool) -> dict[str, Any]:
        """See L{Backend.show}."""
        _check_qid(qid)  # a bad id is a usage error here, not a path to send
        got: dict[str, Any] = self.client.get(f"/api/v1/messages/{qid}",
                                              {"body": "1"} if body else {})
        return got

    def summary(self, by: str, top: int | None, selector: Selector) -> dict[str, Any]:
        """See L{Backend.summary}."""
        chunks = self._id_chunks(selector)
        parts: list[dict[str, Any]] = []
        for chunk in chunks:
            params = {**_selector_params(chunk), "by": by}
            if top is not None and len(chunks) == 1:
                params["top"] = str(top)
            parts.append(self.client.get("/api/v1/summary", params))
        if len(parts) == 1:
            return parts[0]
        return _merge_summaries(parts, top)

    def act(self, action: str, selector: Selector, reason: str,
            progress: Callable[[int, int], object] | None) -> dict[str, Any]:
        """See L{Backend.act} (C{progress} is not called: the daemon does
        the work in one request)."""
        if action != "flush":
            selector.require(action)
        got: dict[str, Any] = self.client.post(
            f"/api/v1/actions/{action}", {"selector": selector.to_json(), "reason": reason})
        return got

    def suspensions(self) -> list[dict[str, Any]]:
        """See L{Backend.suspensions}."""
        got: list[dict[str, Any]] = self.client.get("/api/v1/suspensions", {})["suspensions"]
        return got

    def suspend(self, domain: str, duration: float, reason: str) -> dict[str, Any]:
        """See L{Backend.suspend}."""
        got: dict[str, Any] = self.client.post(
            "/api/v1/suspensions", {"domain": domain, "duration": duration, "reason": reason})
        return got

    def cancel_suspension(self, sid: str, reason: str) -> dict[str, Any]:
        """See L{Backend.cancel_suspension}."""
        if not sid or not sid.isascii() or not sid.isalnum():
            raise EntryNotFound(f"no suspension {sid!r} in force")
        got: dict[str, Any] = self.client.delete(f"/api/v1/suspensions/{sid}",
                                                 {"reason": reason})
        return got

    def close(self) -> None:
        """Close the client's connection, if it has one to close."""
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
