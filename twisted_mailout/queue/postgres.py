"""The PostgreSQL queue store: one queue that many daemons share (issue 13).

L{PostgresStore} implements L{IQueueStore} over tables in the PostgreSQL
schema C{mailout}, created and upgraded by L{upgrade} (C{mailout db
upgrade}), never implicitly. Every method blocks on the database and is
called through the daemon's thread pool (L{IQueueStore}'s "Threads"); each
thread has its own connection (psycopg 3, synchronous).

Work is claimed in short committed transactions before any SMTP: L{pickup}
takes waiting rows with C{SELECT ... FOR UPDATE SKIP LOCKED} (PostgreSQL's
documented queue idiom) under a lease: the owner, a fencing token from a
sequence (new at every claim), and an expiry computed from the database's
clock (C{now() + lease_duration}), extended by L{renew}. A write checks the
owner and the token in the same statement; a row another daemon claimed
since (its lease had expired) is not written and L{LeaseLost} names it.

Message bytes are read into memory when an entry is claimed or loaded (in
the thread pool), so that L{open_body}, which the SMTP session calls in the
reactor thread, never waits on the database (see L{PostgresStore.body_cache}).

psycopg is imported when a store is made or the schema upgraded: the rest of
the package does not need it (install C{twisted_mailout[postgresql]}).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from twisted_mailout.errors import QueueError
from twisted_mailout.queue.pgschema import (
    MIGRATIONS,
    SCHEMA,
    DatabaseUnavailable,
    SchemaOutOfDate,
    connect,
    enqueue_in,
    is_postgres_uri,
    listen,
    one_line,
    redact_uri,
    schema_version,
    upgrade,
)
from twisted_mailout.queue.interface import IQueueStore
from twisted_mailout.queue.model import (
    CorruptEntry,
    EntryNotFound,
    Lease,
    LeaseLost,
    ListedEntry,
    Pickup,
    QueueEntry,
    Recovery,
    StagedMessage,
    Suspension,
    check_batch,
    header_block,
    new_queue_id,
    parse_envelope_line,
    queued_bytes,
)

__all__ = [
    "MIGRATIONS",
    "SCHEMA",
    "DatabaseUnavailable",
    "PostgresStore",
    "SchemaOutOfDate",
    "connect",
    "enqueue_in",
    "is_postgres_uri",
    "redact_uri",
    "schema_version",
    "upgrade",
]

#: Seconds after which a staged message nobody published or discarded (its
#: writer died between the two phases) is removed by L{PostgresStore.recover}.
STAGED_GRACE = 3600.0

#: A message claimed this many times with no outcome saved in between is
#: quarantined at its next claim: each daemon that took it died (or hung)
#: before recording anything, so it may be what kills them.
MAX_CLAIMS = 5


_ENTRY_COLUMNS = ("qid, substring(data from 1 for 65536), length(data), state, owner, "
                  "extract(epoch from lease_expires)")


class PostgresStore:
    """A queue in PostgreSQL, shared by any number of daemons (see the
    module docstring).

    @param uri: a libpq connection URI (C{postgresql://host/db?...}); no
        password in it when it is shown to anyone (use C{password},
        C{PGPASSFILE} or C{PGPASSWORD}).
    @param owner: this daemon's owner id; C{HOST-PID-RANDOM} when L{None}.
    @param lease_duration: seconds a lease lasts unless renewed.
    @param password: the password, or L{None}.
    @param body_cache: bytes of message data kept in memory for
        L{open_body} (least recently used dropped first).
    @raise DatabaseUnavailable: the database cannot be reached.
    @raise SchemaOutOfDate: the schema is missing or older than the code.
    @ivar location: the URI without its password.
    """

    def __init__(self, uri: str, owner: str | None = None, lease_duration: float = 60.0,
                 password: str | None = None, body_cache: int = 64 * 1024 * 1024) -> None:
        if not lease_duration > 0:
            raise ValueError("the lease duration must be above 0 seconds")
        self.uri = uri
        self.password = password
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.lease_duration: float | None = float(lease_duration)
        self.location = redact_uri(uri)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._tokens: dict[str, int] = {}  # qid -> our fencing token
        self._staged: dict[str, bytes] = {}
        self._synced: set[str] = set()  # staged rows inserted, not yet published
        self._known_suspensions: set[str] = set()
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._body_bytes = 0
        self._shared = {"incoming": 0, "claimed": 0, "hold": 0, "owners": 0}
        self.body_cache = body_cache
        version = schema_version(self._conn())
        latest = MIGRATIONS[-1][0]
        if version is None or version < latest:
            raise SchemaOutOfDate(
                f"{self.location}: the queue's schema is "
                f"{'missing' if version is None else f'at version {version}'}, this code "
                f"needs version {latest}: run `mailout db upgrade --queue URI`")

    # -- connections ---------------------------------------------------------

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect(self.uri, self.password)
        return conn

    def _run(self, work: Any) -> Any:
        """C{work(conn)} in one transaction on this thread's connection;
        database trouble becomes L{DatabaseUnavailable} (and the connection
        is dropped, so the next call reconnects)."""
        import psycopg

        conn = self._conn()
        try:
            with conn.transaction():
                return work(conn)
        except psycopg.OperationalError as e:
            try:
                conn.close()
            finally:
                self._local.conn = None
            raise DatabaseUnavailable(f"{self.location}: {one_line(e)}") from None
        except psycopg.Error as e:
            if conn.closed:
                self._local.conn = None
            raise DatabaseUnavailable(f"{self.location}: {one_line(e)}") from None

    def listen(self, on_new: Any, stop: threading.Event, retry: float = 5.0,
               on_admin: Any = None) -> None:
        """Call C{on_new()} whenever mail is published (LISTEN on the channel
        C{mailout_new}, which an INSERT trigger notifies), until C{stop} is
        set. Blocks: run it in a thread of its own, on its own connection.
        When the connection fails it reconnects after C{retry} seconds, and
        calls C{on_new()} once after each (re)connection, for what was
        published meanwhile; a lost notification only costs the polling
        interval, so the daemon keeps polling too.

        @param on_new: called in this thread; it must be cheap and
            thread-safe (the daemon hands it to the reactor).
        @param stop: set to end the loop (checked at least every second).
        @param retry: seconds between reconnection attempts.
        @param on_admin: called (in this thread) as C{on_admin(what)}: with
            this owner's name when an operator asks it to give messages back
            (L{ask_release}), with C{"suspensions"} when an operator changed
            the suspensions (L{save_suspensions}); both once after each
            (re)connection. L{None}: not listened for.
        """
        listen(self.uri, self.password, self.location, self.owner, on_new, stop, retry,
               on_admin)

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- bodies ----------------------------------------------------------------

    def _keep_body(self, qid: str, data: bytes) -> None:
        with self._lock:
            old = self._bodies.pop(qid, None)
            if old is not None:
                self._body_bytes -= len(old)
            self._bodies[qid] = data
            self._body_bytes += len(data)
            while self._body_bytes > self.body_cache and len(self._bodies) > 1:
                _, dropped = self._bodies.popitem(last=False)
                self._body_bytes -= len(dropped)

    def _forget(self, qids: Iterable[str]) -> None:
        with self._lock:
            for qid in qids:
                self._tokens.pop(qid, None)
                data = self._bodies.pop(qid, None)
                if data is not None:
                    self._body_bytes -= len(data)

    def _data(self, qid: str) -> bytes:
        with self._lock:
            data = self._bodies.get(qid)
            if data is not None:
                self._bodies.move_to_end(qid)
                return data
        row = self._run(lambda c: c.execute(
            "SELECT data FROM mailout.message WHERE qid = %s", (qid,)).fetchone())
        if row is None:
            raise FileNotFoundError(f"{qid} is not in the queue")
        data = bytes(row[0])
        self._keep_body(qid, data)
        return data

    # -- rows to entries -------------------------------------------------------

    def _entry(self, row: Sequence[Any]) -> QueueEntry:
        qid, head, length, state, owner, expires = row[:6]
        head = bytes(head)
        try:
            if state is None:
                entry = QueueEntry.pending(qid, parse_envelope_line(head, time.time()))
            else:
                entry = QueueEntry.from_json(state)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"{qid}: {e}") from None
        entry.size = int(length) - entry.body_offset
        entry.lease = Lease(owner, float(expires)) if owner and expires is not None else None
        return entry

    # -- producers ---------------------------------------------------------------

    def enqueue(self, sender: str | None, recipients: Any, message: object) -> str:
        """See L{IQueueStore.enqueue}: one committed INSERT."""
        return self.publish([self.stage(sender, recipients, message, sync=False)])[0]

    def enqueue_many(self, items: Iterable[tuple[Any, Any, Any]]) -> list[str]:
        """See L{IQueueStore.enqueue_many}: every item checked first, then one
        INSERT transaction for the batch (no staged rows: the commit is the
        only durable step)."""
        staged: list[StagedMessage] = []
        try:
            for sender, recipients, message in check_batch(items):
                staged.append(self.stage(sender, recipients, message, sync=False))
        except BaseException:
            self.discard(staged)
            raise
        return self.publish(staged)

    def stage(self, sender: str | None, recipients: Any, message: object,
              sync: bool = True) -> StagedMessage:
        """See L{IQueueStore.stage}. With C{sync}, the message is inserted
        now as a staged row (committed, so durable, and seen by no daemon
        and no listing); without, it is kept in this object until
        L{sync_staged} inserts a batch (or L{publish} inserts it visible)."""
        _, _, data = queued_bytes(sender, recipients, message, time.time())
        qid = new_queue_id()
        with self._lock:
            self._staged[qid] = data
        s = StagedMessage(qid, f"memory:{qid}", len(data))
        if sync:
            self.sync_staged([s])
            return StagedMessage(qid, f"row:{qid}", len(data))
        return s

    def sync_staged(self, staged: Sequence[StagedMessage]) -> None:
        """See L{IQueueStore.sync_staged}: the messages still in memory are
        inserted as staged rows, in one transaction."""
        with self._lock:
            rows = [(s.qid, self._staged[s.qid]) for s in staged if s.qid in self._staged]
        if not rows:
            return

        def insert(conn: Any) -> None:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO mailout.message (qid, data, incoming, staged) "
                                "VALUES (%s, %s, false, now())", rows)

        self._run(insert)
        with self._lock:
            for qid, _ in rows:
                self._staged.pop(qid, None)
                self._synced.add(qid)

    def publish(self, staged: Sequence[StagedMessage]) -> list[str]:
        """See L{IQueueStore.publish}: in one transaction, staged rows become
        incoming and messages still in memory are inserted incoming (the
        commit makes them all visible, and durable)."""
        with self._lock:
            rows = [(s.qid, self._staged.pop(s.qid)) for s in staged if s.qid in self._staged]
            synced = [s.qid for s in staged if s.qid in self._synced]
            self._synced.difference_update(synced)
        if len(rows) + len(synced) != len(staged):
            raise QueueError("publish: a staged message is missing (published or discarded)")

        def work(conn: Any) -> int:
            with conn.cursor() as cur:
                if rows:
                    cur.executemany("INSERT INTO mailout.message (qid, data) VALUES (%s, %s)",
                                    rows)
            if not synced:
                return 0
            n = len(conn.execute(
                "UPDATE mailout.message SET staged = NULL, incoming = true "
                "WHERE qid = ANY(%s) AND staged IS NOT NULL RETURNING qid",
                (synced,)).fetchall())
            conn.execute("SELECT pg_notify('mailout_new', '')")  # (the trigger is on INSERT)
            return n

        if self._run(work) != len(synced):
            raise QueueError("publish: a staged message was removed before it was published "
                             f"(staged more than {STAGED_GRACE:g}s ago?)")
        return [s.qid for s in staged]

    def discard(self, staged: Sequence[StagedMessage]) -> None:
        """See L{IQueueStore.discard}: staged rows deleted, best effort."""
        with self._lock:
            for s in staged:
                self._staged.pop(s.qid, None)
            synced = [s.qid for s in staged if s.qid in self._synced]
            self._synced.difference_update(synced)
        if synced:
            try:
                self._run(lambda c: c.execute(
                    "DELETE FROM mailout.message WHERE qid = ANY(%s) AND staged IS NOT NULL",
                    (synced,)))
            except QueueError:
                pass  # recover removes them after the grace period

    # -- the daemon ----------------------------------------------------------------

    def _claimed(self, rows: Sequence[Sequence[Any]], problems: list[str]) -> list[QueueEntry]:
        entries = []
        for row in rows:
            qid, token, data = row[0], int(row[6]), bytes(row[7])
            if row[9] > MAX_CLAIMS:
                why = (f"claimed {row[9] - 1} times and no daemon recorded an outcome: it "
                       f"may be what stops them")
                self.quarantine(qid, why)
                problems.append(f"{qid}: quarantined: {why}")
                continue
            try:
                entry = self._entry((qid, data[:65536], len(data), *row[3:6]))
            except CorruptEntry as e:
                self.quarantine(qid, str(e))
                problems.append(f"{qid}: quarantined: {e}")
                continue
            with self._lock:
                self._tokens[qid] = token
            self._keep_body(qid, data)
            entries.append(entry)
        return entries

    def _claim(self, where: str, limit: int | None, params: dict[str, Any],
               by_destination: bool = False) -> list[Any]:
        """Claim rows matching C{where} (oldest first), at most C{limit}, in
        one transaction. With C{by_destination}, the destination of the
        oldest waiting message is claimed first, as far as C{limit} allows,
        and the rest by age: a daemon then gets a run of one destination's
        mail, which its connections to that destination carry."""
        update = """
            UPDATE mailout.message m
               SET incoming = false, owner = %(me)s, token = nextval('mailout.lease_token'),
                   lease_expires = now() + make_interval(secs => %(secs)s),
                   claims = m.claims + 1
              FROM picked WHERE m.qid = picked.qid
            RETURNING m.qid, NULL, NULL, m.state, m.owner,
                      extract(epoch from m.lease_expires), m.token, m.data, m.held, m.claims"""
        bound = "LIMIT %(limit)s" if limit is not None else ""
        plain = f"""
            WITH picked AS (
                SELECT qid FROM mailout.message WHERE staged IS NULL AND ({where})
                ORDER BY qid {bound} FOR UPDATE SKIP LOCKED) {update}"""
        first_dest = f"""
            WITH picked AS (
                SELECT qid FROM mailout.message
                 WHERE staged IS NULL AND incoming AND ({where}) AND dest = (
                       SELECT dest FROM mailout.message WHERE staged IS NULL AND incoming
                          AND ({where}) ORDER BY qid LIMIT 1)
                 ORDER BY qid {bound} FOR UPDATE SKIP LOCKED) {update}"""
        args = {"me": self.owner, "secs": self.lease_duration, "limit": limit, **params}

        def work(conn: Any) -> list[Any]:
            rows: list[Any] = []
            if by_destination and limit is not None:
                rows = list(conn.execute(first_dest, args).fetchall())
                if len(rows) >= limit:
                    return rows
                args["limit"] = limit - len(rows)
            return rows + list(conn.execute(plain, args).fetchall())

        return list(self._run(work))

    def recover(self) -> Recovery:
        """See L{IQueueStore.recover}: take every picked-up entry that no
        live owner holds (this owner's from an earlier run included)."""
        problems: list[str] = []
        stale = self._run(lambda c: c.execute(
            "DELETE FROM mailout.message WHERE staged < now() - make_interval(secs => %s) "
            "RETURNING qid", (STAGED_GRACE,)).fetchall())
        if stale:
            problems.append(f"removed {len(stale)} staged messages never published (their "
                            f"writer stopped between the two phases)")
        rows = self._claim("NOT incoming AND (owner IS NULL OR owner = %(me)s "
                           "OR lease_expires <= now())", None, {})
        due: list[tuple[str, float | None]] = []
        on_hold: list[str] = []
        saved = {r[0] for r in rows if r[3] is not None}
        for entry in self._claimed(rows, problems):
            if entry.held:
                on_hold.append(entry.qid)
            else:
                due.append((entry.qid, entry.next_attempt() if entry.qid in saved else None))
        due.sort()
        return Recovery(due, problems, on_hold)

    def pickup(self, limit: int | None = None) -> Pickup:
        """See L{IQueueStore.pickup}: new mail, then entries whose lease
        expired (not held ones: those wait for the operator), oldest first,
        claimed in one transaction."""
        problems: list[str] = []
        rows = self._claim("incoming OR (NOT held AND (owner IS NULL OR "
                           "(lease_expires <= now() AND owner <> %(me)s)))", limit, {},
                           by_destination=True)
        picked = Pickup(self._claimed(rows, problems), problems)
        try:
            row = self._run(lambda c: c.execute(
                "SELECT count(*) FILTER (WHERE incoming), "
                "count(*) FILTER (WHERE NOT incoming AND NOT held), "
                "count(*) FILTER (WHERE held), "
                "count(DISTINCT owner) FILTER (WHERE lease_expires > now()) "
                "FROM mailout.message WHERE staged IS NULL").fetchone())
            self._shared = {"incoming": int(row[0]), "claimed": int(row[1]),
                            "hold": int(row[2]), "owners": int(row[3])}
        except DatabaseUnavailable:
            pass  # the counts are for the metrics: the last ones stand
        return picked

    def backlog(self) -> int:
        """Messages waiting in the shared queue, claimed by no daemon yet, as
        counted by the last L{pickup} (no I/O: for the metrics and the status
        page, read in the reactor thread)."""
        return self._shared["incoming"]

    def shared_counts(self) -> dict[str, int]:
        """The whole shared queue as counted by the last L{pickup} (no I/O):
        C{{"incoming": unclaimed, "claimed": held by a daemon or released
        after a claim, "hold": on hold, "owners": daemons holding live
        leases}}."""
        return dict(self._shared)

    def renew(self) -> float:
        """See L{IQueueStore.renew}."""
        def work(conn: Any) -> float:
            conn.execute("UPDATE mailout.message SET lease_expires = now() + "
                         "make_interval(secs => %s) WHERE owner = %s AND lease_expires > now()",
                         (self.lease_duration, self.owner))
            row = conn.execute("SELECT extract(epoch from now() + make_interval(secs => %s))",
                               (self.lease_duration,)).fetchone()
            return float(row[0])

        return float(self._run(work))

    def release(self, qids: Sequence[str]) -> None:
        """See L{IQueueStore.release}."""
        if not qids:
            return
        def work(conn: Any) -> None:
            conn.execute("UPDATE mailout.message SET owner = NULL, token = NULL, "
                         "lease_expires = NULL WHERE qid = ANY(%s) AND owner = %s",
                         (list(qids), self.owner))
            conn.execute("SELECT pg_notify('mailout_new', '')")  # another daemon may take them

        self._run(work)
        self._forget(qids)

    def load(self, qid: str) -> QueueEntry:
        """See L{IQueueStore.load}; the message bytes are cached for
        L{open_body}."""
        row = self._run(lambda c: c.execute(
            "SELECT qid, NULL, NULL, state, owner, extract(epoch from lease_expires), "
            "token, data FROM mailout.message WHERE qid = %s", (qid,)).fetchone())
        if row is None:
            raise EntryNotFound(qid)
        data = bytes(row[7])
        entry = self._entry((qid, data[:65536], len(data), *row[3:6]))
        self._keep_body(qid, data)
        if row[4] == self.owner and row[6] is not None:
            with self._lock:
                self._tokens[qid] = int(row[6])
        return entry

    def _tokens_of(self, qids: Iterable[str]) -> list[tuple[str, int]]:
        with self._lock:
            return [(q, self._tokens.get(q, -1)) for q in qids]

    def _lost(self, conn: Any, missing: list[str]) -> set[str]:
        """Of the rows C{missing} from a fenced write, those still there
        (held by another owner, or under another token): lost leases."""
        if not missing:
            return set()
        rows = conn.execute("SELECT qid FROM mailout.message WHERE qid = ANY(%s)",
                            (missing,)).fetchall()
        return {r[0] for r in rows}

    def save_many(self, entries: Sequence[QueueEntry]) -> None:
        """See L{IQueueStore.save_many}: one transaction; each row is
        written only under this owner's lease and fencing token."""
        if not entries:
            return
        by_qid = {e.qid: e for e in entries}
        fenced = self._tokens_of(by_qid)
        states = [json.dumps(by_qid[q].to_json()) for q, _ in fenced]
        held = [bool(by_qid[q].held) for q, _ in fenced]

        def work(conn: Any) -> set[str]:
            written = conn.execute(
                "UPDATE mailout.message m SET state = v.state::jsonb, held = v.held, claims = 0 "
                "FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::boolean[]) "
                "AS v(qid, token, state, held) "
                "WHERE m.qid = v.qid AND m.owner = %s AND m.token = v.token RETURNING m.qid",
                ([q for q, _ in fenced], [t for _, t in fenced], states, held,
                 self.owner)).fetchall()
            done = {r[0] for r in written}
            return self._lost(conn, [q for q, _ in fenced if q not in done])

        lost = self._run(work)
        if lost:
            self._forget(lost)
            raise LeaseLost(frozenset(lost), f"not saved by {self.owner}")

    def save_with_report(self, entry: QueueEntry, sender: str, recipients: list[str],
                         message: bytes) -> str:
        """Save C{entry}'s state and enqueue a report about it (a DSN) in one
        transaction, fenced as L{save_many}: both are written or neither,
        so a report exists exactly once whichever daemon dies when.

        @param entry: the entry, its state already saying the report is made
            (C{bounced_reported}, C{delay_warned}).
        @param sender: the report's envelope sender (C{""}: null).
        @param recipients: its recipients.
        @param message: its bytes.
        @return: the report's queue id.
        @raise LeaseLost: another owner holds C{entry} now; nothing written.
        @raise DatabaseUnavailable: nothing written (retried by the caller).
        """
        _, _, data = queued_bytes(sender, recipients, message, time.time())
        qid = new_queue_id()
        [(_, token)] = self._tokens_of([entry.qid])

        def work(conn: Any) -> bool:
            written = conn.execute(
                "UPDATE mailout.message SET state = %s::jsonb, held = %s, claims = 0 "
                "WHERE qid = %s AND owner = %s AND token = %s RETURNING qid",
                (json.dumps(entry.to_json()), bool(entry.held), entry.qid, self.owner,
                 token)).fetchone()
            if written is None:
                return False  # (the transaction commits nothing else)
            conn.execute("INSERT INTO mailout.message (qid, data) VALUES (%s, %s)",
                         (qid, data))
            return True

        if not self._run(work):
            self._forget([entry.qid])
            raise LeaseLost(frozenset({entry.qid}), f"report not made by {self.owner}")
        return qid

    # -- an operator's hands on a shared queue ---------------------------------

    def seize(self, qids: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
        """Claim C{qids} for this owner (an operator's command) where no live
        daemon holds them: new mail, released rows, expired leases, and this
        owner's own.

        @return: C{(seized, held)}: the queue ids now held here, and
            C{{owner: [queue ids]}} of those a live daemon holds (ask it with
            L{ask_release}). Unknown ids are in neither.
        """
        if not qids:
            return [], {}
        problems: list[str] = []
        rows = self._claim("qid = ANY(%(qids)s) AND (incoming OR owner IS NULL OR "
                           "owner = %(me)s OR lease_expires <= now())", None,
                           {"qids": list(qids)})
        seized = [e.qid for e in self._claimed(rows, problems)]
        others = self._run(lambda c: c.execute(
            "SELECT owner, qid FROM mailout.message WHERE qid = ANY(%s) AND owner <> %s "
            "AND lease_expires > now() ORDER BY qid", (list(qids), self.owner)).fetchall())
        held: dict[str, list[str]] = {}
        for owner, qid in others:
            held.setdefault(owner, []).append(qid)
        return seized, held

    def ask_release(self, owner: str, qids: Sequence[str]) -> int:
        """Ask the daemon C{owner} to give C{qids} back (it finishes what it
        has in flight on them, then releases their leases), through the
        table C{mailout.admin_request} and a NOTIFY on C{mailout_admin}.

        @return: the request's id (see L{request_done}).
        """
        def work(conn: Any) -> int:
            rid = conn.execute("INSERT INTO mailout.admin_request (owner, requester, qids) "
                               "VALUES (%s, %s, %s) RETURNING id",
                               (owner, self.owner, list(qids))).fetchone()[0]
            conn.execute("SELECT pg_notify('mailout_admin', %s)", (owner,))
            return int(rid)

        return int(self._run(work))

    def request_done(self, rid: int) -> bool:
        """Whether request C{rid} has been carried out."""
        row = self._run(lambda c: c.execute(
            "SELECT done IS NOT NULL FROM mailout.admin_request WHERE id = %s",
            (rid,)).fetchone())
        return bool(row and row[0])

    def pending_requests(self) -> list[tuple[int, list[str]]]:
        """The operators' requests to this owner not carried out yet:
        C{[(id, queue ids)]}, oldest first."""
        rows = self._run(lambda c: c.execute(
            "SELECT id, qids FROM mailout.admin_request WHERE owner = %s AND done IS NULL "
            "ORDER BY id", (self.owner,)).fetchall())
        return [(int(r[0]), list(r[1])) for r in rows]

    def finish_request(self, rid: int, qids: Sequence[str]) -> None:
        """Carry out request C{rid}: hand this owner's leases on C{qids} to
        the command that asked (its owner name, for a minute: it claims them
        at once), so that no daemon, this one included, takes them meanwhile;
        and mark the request done. One transaction."""
        def work(conn: Any) -> None:
            conn.execute(
                "UPDATE mailout.message m SET owner = r.requester, token = NULL, "
                "lease_expires = now() + interval '60 seconds' FROM mailout.admin_request r "
                "WHERE r.id = %s AND m.qid = ANY(%s) AND m.owner = %s",
                (rid, list(qids), self.owner))
            conn.execute("UPDATE mailout.admin_request SET done = now() WHERE id = %s",
                         (rid,))

        self._run(work)
        self._forget(qids)

    def remove_many(self, qids: Sequence[str]) -> None:
        """See L{IQueueStore.remove_many}: one transaction, fenced as
        L{save_many}."""
        if not qids:
            return
        fenced = self._tokens_of(dict.fromkeys(qids))

        def work(conn: Any) -> set[str]:
            gone = conn.execute(
                "DELETE FROM mailout.message m USING unnest(%s::text[], %s::bigint[]) "
                "AS v(qid, token) WHERE m.qid = v.qid AND m.owner = %s AND m.token = v.token "
                "RETURNING m.qid",
                ([q for q, _ in fenced], [t for _, t in fenced], self.owner)).fetchall()
            done = {r[0] for r in gone}
            return self._lost(conn, [q for q, _ in fenced if q not in done])

        lost = self._run(work)
        self._forget(q for q in qids if q not in lost)
        if lost:
            self._forget(lost)
            raise LeaseLost(frozenset(lost), f"not removed by {self.owner}")

    def quarantine(self, qid: str, why: str) -> None:
        """See L{IQueueStore.quarantine}: moved to C{mailout.quarantine}."""
        def work(conn: Any) -> None:
            conn.execute("INSERT INTO mailout.quarantine (qid, data, state, reason) "
                         "SELECT qid, data, state, %s FROM mailout.message WHERE qid = %s "
                         "ON CONFLICT (qid) DO UPDATE SET reason = excluded.reason",
                         (why, qid))
            conn.execute("DELETE FROM mailout.message WHERE qid = %s", (qid,))

        try:
            self._run(work)
        except QueueError:
            from twisted.logger import Logger

            Logger().failure("{qid}: cannot quarantine it", qid=qid)
        self._forget([qid])

    def open_body(self, entry: QueueEntry) -> IO[bytes]:
        """See L{IQueueStore.open_body}: from the bytes read when the entry
        was claimed or loaded (in the thread pool). Only when they were
        dropped from the cache (more than C{body_cache} bytes claimed) are
        they read here, in the caller's thread."""
        data = self._data(entry.qid)
        return io.BytesIO(data[entry.body_offset:])

    def read_headers(self, entry: QueueEntry, limit: int = 256 * 1024) -> bytes:
        """See L{IQueueStore.read_headers}."""
        data = self._data(entry.qid)
        return header_block(data[entry.body_offset:entry.body_offset + limit])

    # -- administration -----------------------------------------------------------

    def list_entries(self) -> list[ListedEntry]:
        """See L{IQueueStore.list_entries}."""
        return list(self.iter_entries())

    def iter_entries(self) -> Iterator[ListedEntry]:
        """See L{IQueueStore.iter_entries}: a server-side cursor on a
        connection of its own, so a listing of 100,000 rows streams."""
        conn = connect(self.uri, self.password)
        try:
            conn.autocommit = False
            with conn.cursor(name="mailout_list") as cur:
                cur.itersize = 500
                cur.execute(f"SELECT {_ENTRY_COLUMNS}, incoming FROM mailout.message "
                            "WHERE staged IS NULL ORDER BY incoming DESC, qid")
                for row in cur:
                    try:
                        entry = self._entry(row)
                    except CorruptEntry:
                        continue
                    if row[6]:
                        yield ListedEntry(entry, "incoming", row[0])
                    else:
                        yield ListedEntry(entry, "active", None,
                                          entry.lease.owner if entry.lease else None)
            conn.rollback()
        finally:
            conn.close()

    def suspensions(self) -> list[Suspension]:
        """See L{IQueueStore.suspensions}; they are remembered as the ones
        this store object knows (see L{save_suspensions})."""
        rows = self._run(lambda c: c.execute(
            "SELECT doc FROM mailout.suspension "
            "ORDER BY (doc->>'created')::double precision, id").fetchall())
        try:
            out = [Suspension.from_json(r[0]) for r in rows]
        except (ValueError, KeyError, TypeError) as e:
            raise QueueError(f"{self.location}: a saved suspension is malformed: {e}") from None
        with self._lock:
            self._known_suspensions = {s.id for s in out}
        return out

    def save_suspensions(self, suspensions: Sequence[Suspension]) -> None:
        """See L{IQueueStore.save_suspensions}, for a store several daemons
        write: in one transaction, the suspensions given are written, and
        those this store object knew (loaded or saved here) and that are not
        given any more are deleted; a suspension another daemon saved
        meanwhile, which this one never knew, is kept (no lost update). Every
        daemon on the queue is told to reload them (NOTIFY)."""
        docs = [(s.id, i, json.dumps(s.to_json())) for i, s in enumerate(suspensions)]
        given = {s.id for s in suspensions}
        with self._lock:
            gone = sorted(self._known_suspensions - given)

        def work(conn: Any) -> None:
            if gone:
                conn.execute("DELETE FROM mailout.suspension WHERE id = ANY(%s)", (gone,))
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO mailout.suspension (id, position, doc) "
                                "VALUES (%s, %s, %s::jsonb) ON CONFLICT (id) DO UPDATE "
                                "SET doc = excluded.doc", docs)
            conn.execute("SELECT pg_notify('mailout_admin', 'suspensions')")

        self._run(work)
        with self._lock:
            self._known_suspensions = given


if TYPE_CHECKING:  # mypy proves that PostgresStore implements the interface
    _implements: IQueueStore = PostgresStore("")
