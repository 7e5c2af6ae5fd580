"""The PostgreSQL queue's schema and connections (issue 13): the numbered
migrations that C{mailout db upgrade} applies (L{upgrade}), the version
check (L{schema_version}), how a connection is made (L{connect}: autocommit,
keepalives over TCP) and how a URI is shown (L{redact_uri}, without its
password). The store itself is L{twisted_mailout.queue.postgres}.

psycopg is imported inside the functions: importing this module needs no
driver.
"""

from __future__ import annotations

import time
from typing import Any

from twisted_mailout.errors import QueueError
from twisted_mailout.queue.model import new_queue_id, queued_bytes

__all__ = [
    "MIGRATIONS",
    "SCHEMA",
    "DatabaseUnavailable",
    "SchemaOutOfDate",
    "connect",
    "enqueue_in",
    "is_postgres_uri",
    "listen",
    "one_line",
    "redact_uri",
    "schema_version",
    "upgrade",
]

#: The PostgreSQL schema holding every table and function of the store.
SCHEMA = "mailout"

#: The numbered migrations: C{(version, name, SQL)}, applied in order, each
#: in its own transaction, by L{upgrade}. Never edit one that shipped: add
#: the next.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "the queue", """
CREATE TABLE mailout.message (
    qid           text PRIMARY KEY,
    data          bytea NOT NULL,        -- envelope line, then the message
    state         jsonb,                 -- NULL until first saved (all pending)
    incoming      boolean NOT NULL DEFAULT true,  -- published, not yet picked up
    held          boolean NOT NULL DEFAULT false,
    owner         text,                  -- the lease: who works on it
    token         bigint,                -- its fencing token
    lease_expires timestamptz,           -- and until when (the database's clock)
    enqueued      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX message_incoming ON mailout.message (qid) WHERE incoming;
CREATE INDEX message_lease ON mailout.message (lease_expires) WHERE NOT incoming;
CREATE INDEX message_owner ON mailout.message (owner) WHERE owner IS NOT NULL;
CREATE SEQUENCE mailout.lease_token;
CREATE TABLE mailout.quarantine (
    qid    text PRIMARY KEY,
    data   bytea NOT NULL,
    state  jsonb,
    reason text NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE mailout.suspension (
    id       text PRIMARY KEY,
    position integer NOT NULL,
    doc      jsonb NOT NULL
);
CREATE FUNCTION mailout.notify_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mailout_new', '');
    RETURN NULL;
END $$;
CREATE TRIGGER message_notify AFTER INSERT ON mailout.message
    FOR EACH STATEMENT EXECUTE FUNCTION mailout.notify_new();
"""),
    (2, "enqueue() in SQL", r"""
CREATE FUNCTION mailout.enqueue(sender text, recipients text[], message bytea)
RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    qid text;
    arrival double precision := extract(epoch from clock_timestamp());
    head text;
    head_end integer;
    eol text;
    extra text := '';
    env jsonb;
    r text;
BEGIN
    IF recipients IS NULL OR cardinality(recipients) = 0 THEN
        RAISE EXCEPTION 'mailout.enqueue: no recipients' USING ERRCODE = '22023';
    END IF;
    IF message IS NULL OR length(message) = 0 THEN
        RAISE EXCEPTION 'mailout.enqueue: empty message' USING ERRCODE = '22023';
    END IF;
    IF coalesce(sender, '') ~ '[[:space:]<>]' AND sender <> '<>' THEN
        RAISE EXCEPTION 'mailout.enqueue: bad sender %', sender USING ERRCODE = '22023';
    END IF;
    FOREACH r IN ARRAY recipients LOOP
        IF r IS NULL OR r !~ '^[^@[:space:]<>]+@[^@[:space:]<>]+$' THEN
            RAISE EXCEPTION 'mailout.enqueue: bad recipient %', r USING ERRCODE = '22023';
        END IF;
    END LOOP;
    -- the queue id: 13 hex digits of microseconds since the epoch, 10 random
    qid := upper(lpad(to_hex((arrival * 1000000)::bigint), 13, '0'))
           || upper(substr(md5(random()::text || clock_timestamp()::text), 1, 10));
    -- Message-ID and Date when missing (RFC 5322 3.6), as enqueue() adds them;
    -- the header block is read in bytea's escape form (a line end is \012)
    head := encode(substring(message for 65536), 'escape');
    head_end := least(nullif(position('\015\012\015\012' in head), 0),
                      nullif(position('\012\012' in head), 0));
    IF head_end IS NOT NULL THEN
        head := substring(head for head_end);
    END IF;
    head := lower(head);
    eol := CASE WHEN position('\x0d0a'::bytea in message) > 0 THEN chr(13) || chr(10)
                ELSE chr(10) END;
    IF NOT (head ~ '(^|\\012)message-id:') THEN
        extra := extra || 'Message-ID: <' || lower(qid) || '.sql@mailout.invalid>' || eol;
    END IF;
    IF NOT (head ~ '(^|\\012)date:') THEN
        extra := extra || to_char(now() AT TIME ZONE 'UTC',
                                  '"Date: "Dy, DD Mon YYYY HH24:MI:SS "+0000"') || eol;
    END IF;
    env := jsonb_build_object('v', 1, 'sender', coalesce(nullif(sender, '<>'), ''),
                              'recipients', to_jsonb(recipients), 'arrival', arrival);
    IF encode(message, 'escape') ~ '\\[23][0-7][0-7]' THEN
        env := env || '{"8bit": true}'::jsonb;
    END IF;
    INSERT INTO mailout.message (qid, data) VALUES (
        qid,
        convert_to('X-Mailout-Envelope: ' || env::text || chr(10) || extra, 'UTF8') || message);
    RETURN qid;
END $$;
"""),
    (3, "claims without an outcome", """
ALTER TABLE mailout.message ADD COLUMN claims integer NOT NULL DEFAULT 0;
"""),
    (4, "durable staging", """
ALTER TABLE mailout.message ADD COLUMN staged timestamptz;
CREATE INDEX message_staged ON mailout.message (staged) WHERE staged IS NOT NULL;
"""),
    (5, "operators' requests", """
CREATE TABLE mailout.admin_request (
    id      bigserial PRIMARY KEY,
    owner   text NOT NULL,          -- the daemon asked to give messages back
    requester text NOT NULL,        -- to whom (the operator's command)
    qids    text[] NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    done    timestamptz
);
CREATE INDEX admin_request_pending ON mailout.admin_request (owner) WHERE done IS NULL;
"""),
    (6, "destinations, for claims that keep connections busy", r"""
ALTER TABLE mailout.message ADD COLUMN dest text;
CREATE FUNCTION mailout.set_dest() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    nl integer := position('\x0a'::bytea in NEW.data);
BEGIN
    -- the domain of the first recipient in the envelope line
    -- ("X-Mailout-Envelope: " is 20 bytes, then the JSON, then LF)
    BEGIN
        NEW.dest := lower(split_part(
            (convert_from(substring(NEW.data from 21 for nl - 21), 'UTF8')::jsonb
             -> 'recipients' ->> 0), '@', 2));
    EXCEPTION WHEN others THEN
        NEW.dest := NULL;  -- a malformed line: pickup quarantines the message
    END;
    RETURN NEW;
END $$;
CREATE TRIGGER message_dest BEFORE INSERT ON mailout.message
    FOR EACH ROW EXECUTE FUNCTION mailout.set_dest();
CREATE INDEX message_incoming_dest ON mailout.message (dest, qid) WHERE incoming;
"""),
)



_VERSION_TABLE = """
CREATE SCHEMA IF NOT EXISTS mailout;
CREATE TABLE IF NOT EXISTS mailout.schema_version (
    version integer PRIMARY KEY,
    name    text NOT NULL,
    applied timestamptz NOT NULL DEFAULT now()
)"""

#: Advisory lock key serialising concurrent upgrades ("mailout" in ASCII).
_UPGRADE_LOCK = 0x6D61696C6F7574


class DatabaseUnavailable(QueueError, OSError):
    """The database cannot be reached or failed the statement now (retried
    by the caller as any I/O error)."""


class SchemaOutOfDate(QueueError):
    """The database's schema is missing or older than this version of the
    code: run C{mailout db upgrade --queue URI}."""


def one_line(e: BaseException) -> str:
    """libpq's message on one line (it spans several), for logs."""
    return " ".join(str(e).split()) or type(e).__name__


def is_postgres_uri(queue: str) -> bool:
    """Whether C{--queue} names a PostgreSQL store (C{postgresql://} or
    C{postgres://}, a libpq connection URI) rather than a folder."""
    return queue.startswith(("postgresql://", "postgres://"))


def redact_uri(uri: str) -> str:
    """C{uri} without its password, for logs and C{location}:
    C{postgresql://USER@HOST:PORT/DB}, or C{postgresql:///DB?host=/SOCKET/DIR}
    for a Unix socket."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(uri)
    except Exception:  # noqa: BLE001 - a malformed URI is shown without its userinfo
        head, _, rest = uri.partition("://")
        return f"{head}://{rest.rpartition('@')[2]}"
    host = str(params.get("host") or "")
    db = str(params.get("dbname") or "")
    user = params.get("user")
    port = params.get("port")
    if not host or host.startswith("/"):
        query = "&".join(f"{k}={v}" for k, v in (("host", host), ("port", port),
                                                  ("user", user)) if v)
        return f"postgresql:///{db}" + (f"?{query}" if query else "")
    return (f"postgresql://{str(user) + '@' if user else ''}{host}"
            f"{':' + str(port) if port else ''}/{db}")


#: libpq connection parameters used unless the URI sets them.
_TCP_DEFAULTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                 "keepalives_interval": 3, "keepalives_count": 3, "tcp_user_timeout": 15000}


def connect(uri: str, password: str | None = None) -> Any:
    """A psycopg connection to C{uri} in autocommit mode (transactions are
    opened explicitly).

    @raise DatabaseUnavailable: it cannot be made (the message has the URI
        without its password, and libpq's reason).
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    kwargs: dict[str, Any] = {"autocommit": True, "application_name": "mailout"}
    if password is not None:
        kwargs["password"] = password
    try:
        given = conninfo_to_dict(uri)
    except psycopg.Error as e:
        raise DatabaseUnavailable(f"{redact_uri(uri)}: not a connection URI: "
                                  f"{one_line(e)}") from None
    # over TCP, a cut network fails a call in seconds instead of hanging a
    # thread for the kernel's retransmission time (hours); the URI may say
    # otherwise
    for key, value in _TCP_DEFAULTS.items():
        if key not in given:
            kwargs[key] = value
    try:
        return psycopg.connect(uri, **kwargs)
    except psycopg.Error as e:
        raise DatabaseUnavailable(f"cannot connect to {redact_uri(uri)}: "
                                  f"{one_line(e)}") from None


def schema_version(conn: Any) -> int | None:
    """The schema version applied in the database of C{conn} (a psycopg
    connection), or L{None} when the store was never created there."""
    row = conn.execute("SELECT to_regclass('mailout.schema_version')").fetchone()
    if row is None or row[0] is None:
        return None
    row = conn.execute("SELECT max(version) FROM mailout.schema_version").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def upgrade(uri: str, password: str | None = None) -> list[tuple[int, str]]:
    """Create or upgrade the store's schema in the database of C{uri}
    (C{mailout db upgrade}): the migrations not yet applied, in order, each
    in one transaction, under an advisory lock (two upgrades at once wait
    for each other).

    @param uri: a libpq connection URI.
    @param password: the password, when not in C{PGPASSFILE}/C{PGPASSWORD}.
    @return: C{[(version, name)]} of the migrations applied now (empty when
        the schema was up to date).
    @raise DatabaseUnavailable: the database cannot be reached.
    @raise QueueError: a migration failed (it is rolled back; the message
        names it).
    """
    import psycopg

    conn = connect(uri, password)
    applied: list[tuple[int, str]] = []
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
            for statement in _VERSION_TABLE.split(";"):
                conn.execute(statement)
        for version, name, sql in MIGRATIONS:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
                current = schema_version(conn) or 0
                if version <= current:
                    continue
                try:
                    conn.execute(sql)
                except psycopg.Error as e:
                    raise QueueError(f"migration {version} ({name}) failed: "
                                     f"{one_line(e)}") from None
                conn.execute("INSERT INTO mailout.schema_version (version, name) "
                             "VALUES (%s, %s)", (version, name))
                applied.append((version, name))
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(f"{redact_uri(uri)}: {one_line(e)}") from None
    finally:
        conn.close()
    return applied

def listen(uri: str, password: str | None, location: str, owner: str, on_new: Any,
           stop: Any, retry: float = 5.0, on_admin: Any = None) -> None:
    """The loop of L{PostgresStore.listen<twisted_mailout.queue.postgres.PostgresStore.listen>}
    (its parameters, and C{uri}, C{password}, C{location} and C{owner} of
    the store). Blocks until C{stop} (a C{threading.Event}) is set."""
    import psycopg
    from twisted.logger import Logger

    log = Logger()
    while not stop.is_set():
        conn = None
        try:
            conn = connect(uri, password)
            conn.execute("LISTEN mailout_new")
            if on_admin is not None:
                conn.execute("LISTEN mailout_admin")
                on_admin(owner)
                on_admin("suspensions")
            on_new()
            while not stop.is_set():
                for n in conn.notifies(timeout=1.0, stop_after=1):
                    if n.channel == "mailout_admin":
                        if on_admin is not None and n.payload in (owner,
                                                                  "suspensions"):
                            on_admin(n.payload)
                    else:
                        on_new()
        except (psycopg.Error, DatabaseUnavailable) as e:
            log.warn("{where}: LISTEN for new mail failed ({err}); again in {retry:g}s, "
                     "polling meanwhile", where=location,
                     err=one_line(e),
                     retry=retry)
            stop.wait(retry)
        finally:
            if conn is not None:
                conn.close()


def enqueue_in(conn: Any, sender: str | None, recipients: Any, message: object) -> str:
    """Enqueue in the caller's own database transaction (the transactional
    outbox): the message exists if and only if the caller commits.

    @param conn: an open DB-API connection (psycopg 3's, or Django's
        C{connection}) or a cursor, to a database whose queue schema is up
        to date. Nothing is committed here: in autocommit mode the INSERT
        commits at once.
    @param sender: envelope sender; C{""}, C{"<>"} or L{None} for null.
    @param recipients: envelope recipients (a C{str} is one).
    @param message: C{bytes}, C{str} or C{email.message.Message}; Message-ID
        and Date added when missing.
    @return: the queue id.
    @raise AddressError: a bad sender or recipient, or none.
    @raise MessageError: an empty message.
    @raise Exception: the database driver's own error when the INSERT fails
        (the caller's transaction is then aborted, as for any statement).
    """
    _, _, data = queued_bytes(sender, recipients, message, time.time())
    qid = new_queue_id()
    sql = "INSERT INTO mailout.message (qid, data) VALUES (%s, %s)"
    if hasattr(conn, "cursor"):
        cur = conn.cursor()
        try:
            cur.execute(sql, (qid, data))
        finally:
            cur.close()
    else:
        conn.execute(sql, (qid, data))
    return qid
