"""JSON delivery records: one JSON object a line per recipient outcome and per
operator action (C{twistd mailout --log-format json --json-log PATH}).

The Postfix-style text log stays the default and is not touched: this is a
second, machine-readable log beside it, for C{jq}, log shippers and
C{mailout report} (L{twisted_mailout.daemon.report}).

What is written
===============

L{JSONRecordObserver} is a C{twisted.logger} observer. It looks at every event
of the process but writes only two kinds, both contract namespaces
(docs/design.md, "Logging"):

  - C{twisted_mailout.outcome}: one event per recipient outcome, emitted by
    C{Scheduler._emit} with the fields of
    L{RecipientResult.log_fields<twisted_mailout.outcome.RecipientResult.log_fields>}
    plus C{sender}, C{destination} and C{tls};
  - C{twisted_mailout.admin}: one event per operator action, with the fields
    C{action} (C{hold}, C{release}, C{delete}, C{bounce}, C{flush},
    C{requeue}, C{suspend}, C{cancel-suspension}), C{qid} (L{None} for a
    suspension), C{reason}, C{source} (C{"cli"} or C{"api"}), and optionally
    C{domain}, C{suspension} (the suspension's id), C{count}, C{sender},
    C{recipient}, C{recipients}, C{until}, C{duration}. An event of that
    namespace without an C{action} is not an action and is skipped.

Every other event is ignored, cheaply (one string comparison).

The record is modelled on KumoMTA's log record
(U{https://docs.kumomta.com/reference/log_record/}); C{type} uses KumoMTA's
names where KumoMTA has one:

  ==================  ================================================
  C{type}             written for
  ==================  ================================================
  C{Delivery}         outcome C{delivered} (a 2xx)
  C{TransientFailure} outcome C{deferred} (a 4xx, or no server reached)
  C{Bounce}           outcome C{bounced} (a 5xx)
  C{Expiration}       outcome C{expired} (still deferred when the queue
                      lifetime ran out; bounced)
  C{Reception}        outcome C{queued} (not emitted by the daemon today)
  C{AdminBounce}      admin action C{bounce}
  C{AdminAction}      every other admin action (ours: KumoMTA logs
                      no record for them)
  ==================  ================================================

An outcome record::

    {"type": "Bounce", "time": "2026-12-03T05:06:30.123456Z",
     "timestamp": 1796274390.123456, "queue_id": "Q1a2b", "sender": "a@b.example",
     "recipient": "x@y.example", "destination": "y.example",
     "relay": "mx.y.example[192.0.2.1]:25",
     "reply": {"code": 550, "enhanced_code": "5.1.1", "text": "no such user",
               "local": false},
     "status": "bounced", "attempts": 1, "delay": 0.512, "tls": "TLSv1.3"}

  - C{timestamp}: seconds since the epoch (float); C{time} the same instant in
    ISO 8601, UTC.
  - C{queue_id}: the queue id; C{sender}: the envelope sender (C{""} for the
    null sender); C{recipient}; C{destination}: the recipient domain, or the
    relay's key when relaying.
  - C{relay}: C{"host[ip]:port"} of the server that answered, L{None} when
    none did.
  - C{reply}: C{code} (RFC 5321 4.2), C{enhanced_code} (RFC 3463, a string
    C{"5.1.1"}; KumoMTA splits it into class/subject/detail), C{text} (the
    reply text on one line, without the code and the enhanced code: KumoMTA's
    C{content}), C{local} (C{true} when no server gave the reply: DNS,
    connection, timeout).
  - C{status}: this project's word (L{Status<twisted_mailout.outcome.Status>}),
    one to one with C{type}.
  - C{attempts}: attempts so far; C{delay}: seconds since the message arrived
    in the queue; C{tls}: how the session was protected as the connector
    reports it (for example C{"TLSv1.3"}), L{None} when unknown or plaintext.

An admin record::

    {"type": "AdminAction", "time": "...", "timestamp": 1796274390.5,
     "action": "hold", "queue_id": "Q1a2b", "reason": "spam run", "source": "cli"}

plus the optional fields named above when the event has them.

Writing
=======

Records are written on the thread that emits the event (the reactor's, for
the scheduler), one C{write} of one whole line, then a flush: a line is never
split or interleaved with another. L{open_json_log} opens the file safely:
created mode 0600 (no C{umask} games, which would race with the queue's
threads creating files), C{O_APPEND}, C{O_NOFOLLOW} (a symlink planted at the
path is refused: use C{-} for standard output), unbuffered, rotated by size
with C{twisted.python.logfile.LogFile} (C{PATH.1}, C{PATH.2}, ...).

The observer never raises: C{twisted.logger} removes an observer that raises,
and a full disk must not stop the JSON log for good. A record that cannot be
written is counted (L{JSONRecordObserver.errors}); the first failure of a run
of failures is logged once (namespace C{twisted_mailout.daemon.jsonlog}).
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import os
import stat
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Protocol, cast

from twisted.logger import ILogObserver, LogEvent, Logger, LogPublisher, globalLogPublisher
from twisted.python.logfile import LogFile
from zope.interface import implementer

from twisted_mailout.outcome import Status

__all__ = [
    "ADMIN_ACTION",
    "ADMIN_BOUNCE",
    "ADMIN_NAMESPACE",
    "ADMIN_TYPES",
    "BOUNCE",
    "DELIVERY",
    "EXPIRATION",
    "OUTCOME_NAMESPACE",
    "OUTCOME_TYPES",
    "RECEPTION",
    "TYPE_OF_STATUS",
    "TRANSIENT_FAILURE",
    "JSONLogFile",
    "JSONRecordObserver",
    "LineSink",
    "SecondsClock",
    "admin_record",
    "dumps",
    "install",
    "open_json_log",
    "outcome_record",
    "record_for",
]

log = Logger()

#: The namespace of the outcome events (a contract, docs/design.md).
OUTCOME_NAMESPACE = "twisted_mailout.outcome"
#: The namespace of the operator's action events (a contract).
ADMIN_NAMESPACE = "twisted_mailout.admin"
_NAMESPACES = frozenset({OUTCOME_NAMESPACE, ADMIN_NAMESPACE})

DELIVERY = "Delivery"
TRANSIENT_FAILURE = "TransientFailure"
BOUNCE = "Bounce"
EXPIRATION = "Expiration"
RECEPTION = "Reception"
ADMIN_BOUNCE = "AdminBounce"
ADMIN_ACTION = "AdminAction"

#: C{type} of an outcome record, by L{Status}.
TYPE_OF_STATUS: dict[Status, str] = {
    Status.DELIVERED: DELIVERY,
    Status.DEFERRED: TRANSIENT_FAILURE,
    Status.BOUNCED: BOUNCE,
    Status.EXPIRED: EXPIRATION,
    Status.QUEUED: RECEPTION,
}
#: The C{type}s of outcome records.
OUTCOME_TYPES = frozenset(TYPE_OF_STATUS.values())
#: The C{type}s of admin records.
ADMIN_TYPES = frozenset({ADMIN_BOUNCE, ADMIN_ACTION})

#: Optional fields of an admin event copied into its record when present.
_ADMIN_EXTRA = ("domain", "suspension", "count", "sender", "recipient", "recipients", "until",
                "duration")

#: Rotate the file when it reaches this many bytes (C{--json-log} default).
DEFAULT_ROTATE_LENGTH = 100_000_000
#: Rotated files kept (C{PATH.1} ... C{PATH.10}); older ones are removed.
DEFAULT_MAX_ROTATED_FILES = 10


class SecondsClock(Protocol):
    """The part of C{IReactorTime} the observer uses (a reactor or a
    C{twisted.internet.task.Clock})."""

    def seconds(self) -> float:
        """Seconds since the epoch."""
        ...


class LineSink(Protocol):
    """Where records go: a text stream (C{IO[str]}, e.g. C{sys.stdout} or
    C{io.StringIO}) or a L{JSONLogFile}."""

    def write(self, data: str, /) -> object:
        """Write C{data}: one whole line, newline included."""

    def flush(self) -> object:
        """Push what was written to the operating system."""


# -- records ------------------------------------------------------------------


def _iso(ts: float) -> str:
    dt = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _clean(value: Any) -> Any:
    """C{value} made JSON-safe: non-finite floats become L{None}, enums their
    value, tuples/sets lists, bytes text, other objects C{str(value)}."""
    if value is None or isinstance(value, bool | int | str):
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return _clean(value.value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _reply_text(line: Any, code: int | None, dsn: str | None) -> str:
    """The reply text of an outcome event's one-line C{reply}
    (C{"550 5.1.1 no such user"}) without the code and the enhanced code."""
    if not isinstance(line, str):
        return ""
    text = line
    if code is not None:
        prefix = str(code)
        if text == prefix:
            return ""
        if text.startswith(prefix + " "):
            text = text[len(prefix) + 1:]
    if dsn and (text == dsn or text.startswith(dsn + " ")):
        text = text[len(dsn) + 1:]
    return text


def outcome_record(event: LogEvent, timestamp: float) -> dict[str, Any] | None:
    """The record of one outcome event (namespace C{twisted_mailout.outcome}).

    @param event: the C{twisted.logger} event (a dict) as C{Scheduler._emit}
        emits it: the fields of C{RecipientResult.log_fields()} plus
        C{sender}, C{destination}, C{tls}.
    @param timestamp: when it happened, seconds since the epoch.
    @return: the record (see the module docstring), or L{None} when the event
        has no valid C{outcome} field (not an outcome).
    """
    try:
        status = Status.parse(event["outcome"])
    except (KeyError, ValueError, TypeError):
        return None
    code = _int(event.get("code"))
    dsn = event.get("dsn") if isinstance(event.get("dsn"), str) else None
    relay = event.get("relay")
    return {
        "type": TYPE_OF_STATUS[status],
        "time": _iso(timestamp),
        "timestamp": timestamp,
        "queue_id": _clean(event.get("qid")),
        "sender": _clean(event.get("sender")),
        "recipient": _clean(event.get("recipient")),
        "destination": _clean(event.get("destination")),
        "relay": None if relay in (None, "none") else _clean(relay),
        "reply": {"code": code, "enhanced_code": dsn,
                  "text": _reply_text(event.get("reply"), code, dsn),
                  "local": bool(event.get("local", False))},
        "status": status.value,
        "attempts": _int(event.get("attempts")),
        "delay": _number(event.get("delay")),
        "tls": _clean(event.get("tls")),
    }


def admin_record(event: LogEvent, timestamp: float) -> dict[str, Any] | None:
    """The record of one operator action event (namespace
    C{twisted_mailout.admin}).

    @param event: the C{twisted.logger} event: C{action}, C{qid}, C{reason},
        C{source}, and optionally C{domain}, C{suspension}, C{count},
        C{sender}, C{recipient}, C{recipients}, C{until}, C{duration}.
    @param timestamp: when it happened, seconds since the epoch.
    @return: the record, type C{AdminBounce} for the action C{bounce} and
        C{AdminAction} for the others; L{None} when the event has no
        C{action} (another admin log line, not an action).
    """
    action = event.get("action")
    if not isinstance(action, str) or not action:
        return None
    rec: dict[str, Any] = {
        "type": ADMIN_BOUNCE if action == "bounce" else ADMIN_ACTION,
        "time": _iso(timestamp),
        "timestamp": timestamp,
        "action": action,
        "queue_id": _clean(event.get("qid")),
        "reason": _clean(event.get("reason")),
        "source": _clean(event.get("source")),
    }
    for name in _ADMIN_EXTRA:
        if name in event:
            rec[name] = _clean(event[name])
    return rec


def record_for(event: LogEvent, timestamp: float | None = None) -> dict[str, Any] | None:
    """The JSON record of a log event, or L{None} for an event that gets none.

    @param event: any C{twisted.logger} event.
    @param timestamp: seconds since the epoch; the event's C{log_time} when
        L{None} (and the present time when it has none).
    @return: L{outcome_record} for namespace C{twisted_mailout.outcome},
        L{admin_record} for C{twisted_mailout.admin}, L{None} otherwise.
    """
    ns = event.get("log_namespace")
    if ns not in _NAMESPACES:
        return None
    if timestamp is None:
        timestamp = _number(event.get("log_time"))
        if timestamp is None:
            timestamp = time.time()
    if ns == OUTCOME_NAMESPACE:
        return outcome_record(event, timestamp)
    return admin_record(event, timestamp)


def dumps(record: Mapping[str, Any]) -> str:
    """One record as one line of JSON, without the newline.

    Non-ASCII text is written as UTF-8 (addresses stay greppable); a string
    that UTF-8 cannot encode (a lone surrogate) makes the whole line ASCII
    with C{\\u} escapes instead, so the line is always valid UTF-8.

    @param record: a record from L{record_for} (JSON-safe values).
    @return: the line.
    @raise ValueError: a non-finite float or a circular structure.
    @raise TypeError: a value JSON cannot encode.
    """
    line = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return line


# -- the file -------------------------------------------------------------------


class JSONLogFile(LogFile):
    """A L{LogFile} opened safely, that rotates by size.

    The file is opened C{O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW |
    O_CLOEXEC}, unbuffered: each L{write} is one C{write(2)} of one line. A new
    file is created with C{mode} (0600: the log holds addresses) through
    C{open(2)}'s mode argument, never by changing the process's umask (the
    queue's threads create files at the same time). An existing file keeps
    its mode, and files made by a rotation take that mode too. A path that is
    not a regular file (a FIFO, C{/dev/null}) is written but never rotated.

    @ivar path: the absolute path.
    """

    def __init__(self, path: str | os.PathLike[str], rotate_length: int | None =
                 DEFAULT_ROTATE_LENGTH, max_rotated_files: int | None =
                 DEFAULT_MAX_ROTATED_FILES, mode: int = 0o600) -> None:
        """Open (or create) the file.

        @param path: the log file's path.
        @param rotate_length: rotate when the file reaches this many bytes;
            L{None} or 0 never rotates (an external logrotate then; call
            C{reopen()} after it moved the file).
        @param max_rotated_files: rotated files kept (C{PATH.1} newest);
            L{None} keeps them all.
        @param mode: permission bits of a file created here (the umask may
            narrow them further).
        @raise OSError: the file cannot be opened (missing folder, no
            permission, a symlink at C{path}: C{ELOOP}).
        """
        self._create_mode = mode
        self._regular = True
        full = os.path.abspath(os.fspath(path))
        super().__init__(os.path.basename(full), os.path.dirname(full),
                         rotateLength=rotate_length or None, defaultMode=None,
                         maxRotatedFiles=max_rotated_files)

    def _openFile(self) -> None:
        """Open C{self.path} for appending (see the class docstring); sets
        C{self.size} to its length."""
        self.closed = False
        flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
        mode = self.defaultMode if self.defaultMode is not None else self._create_mode
        fd = os.open(self.path, flags, mode)
        try:
            st = os.fstat(fd)
            self._regular = stat.S_ISREG(st.st_mode)
            self._file = cast(Any, os.fdopen(fd, "ab", 0))
        except BaseException:
            os.close(fd)
            raise
        self.size = st.st_size if self._regular else 0

    def shouldRotate(self) -> bool:
        """Rotate when the file, a regular one, has reached the rotate length."""
        return bool(self._regular and self.rotateLength and self.size >= self.rotateLength)

    def write(self, data: str | bytes) -> None:
        """Append C{data} (text is encoded as UTF-8), rotating first when due.

        @param data: one whole line.
        @raise OSError: the write failed (disk full...).
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        super().write(data)


def open_json_log(path: str | os.PathLike[str], *, rotate_length: int | None =
                  DEFAULT_ROTATE_LENGTH, max_rotated_files: int | None =
                  DEFAULT_MAX_ROTATED_FILES, mode: int = 0o600) -> LineSink:
    """Where C{--json-log PATH} writes.

    @param path: a file path, or C{"-"} for standard output (flushed after each
        line).
    @param rotate_length: see L{JSONLogFile}.
    @param max_rotated_files: see L{JSONLogFile}.
    @param mode: see L{JSONLogFile}.
    @return: the sink (a L{JSONLogFile}, or C{sys.stdout}).
    @raise OSError: the file cannot be opened.
    """
    if os.fspath(path) == "-":
        return sys.stdout
    return JSONLogFile(path, rotate_length, max_rotated_files, mode)


# -- the observer -----------------------------------------------------------------


@implementer(ILogObserver)
class JSONRecordObserver:
    """The C{twisted.logger} observer that writes the JSON records.

    @ivar out: the L{LineSink}.
    @ivar written: records written (C{int}).
    @ivar errors: records lost because building or writing them failed.
    """

    def __init__(self, out: LineSink | IO[str] | str | os.PathLike[str],
                 clock: SecondsClock | None = None) -> None:
        """
        @param out: where to write: a L{LineSink} (a text stream, a
            L{JSONLogFile}) or a path given to L{open_json_log} with its
            defaults.
        @param clock: when given, records are stamped with C{clock.seconds()}
            (tests use a C{task.Clock}); otherwise with the event's
            C{log_time}, the instant the text log shows too.
        @raise OSError: C{out} is a path that cannot be opened.
        """
        self.out: LineSink = (open_json_log(out) if isinstance(out, str | os.PathLike)
                              else out)
        self.clock = clock
        self.written = 0
        self.errors = 0
        self._failing = False

    def __call__(self, event: LogEvent) -> None:
        """Write the record of C{event}, if it gets one. Never raises.

        @param event: any C{twisted.logger} event.
        """
        if event.get("log_namespace") not in _NAMESPACES:
            return
        try:
            ts = self.clock.seconds() if self.clock is not None else None
            rec = record_for(event, ts)
            if rec is None:
                return
            self.out.write(dumps(rec) + "\n")
            self.out.flush()
        except Exception:  # noqa: BLE001 - an observer that raises is removed
            self._failed()
            return
        self.written += 1
        self._failing = False

    def _failed(self) -> None:
        """Count a lost record; log the first of a run of failures (called
        inside the C{except} block, so the failure is the current one)."""
        self.errors += 1
        if self._failing:
            return
        self._failing = True
        try:
            log.failure("JSON log: a record could not be written ({errors} lost so far); "
                        "records are dropped until a write succeeds", errors=self.errors)
        except Exception:  # noqa: BLE001, S110 - nothing left to tell it to
            pass

    def close(self) -> None:
        """Close the sink when it is a file this module opened (never
        standard output). Later records are counted as L{errors}."""
        if isinstance(self.out, JSONLogFile) and not self.out.closed:
            self.out.close()


def install(path: str | os.PathLike[str], *, publisher: LogPublisher | None = None,
            clock: SecondsClock | None = None, rotate_length: int | None =
            DEFAULT_ROTATE_LENGTH, max_rotated_files: int | None =
            DEFAULT_MAX_ROTATED_FILES) -> JSONRecordObserver:
    """Open the JSON log and add its observer to the log publisher: the one
    call the daemon makes for C{--json-log PATH}.

    The observer stays for the life of the process (records of work that
    finishes during a graceful stop are written too); the file is unbuffered,
    so nothing is lost at exit without a close.

    @param path: the file, or C{"-"} for standard output.
    @param publisher: the publisher to observe; C{globalLogPublisher} when
        L{None} (every C{Logger} of the process emits there).
    @param clock: see L{JSONRecordObserver}.
    @param rotate_length: see L{JSONLogFile}.
    @param max_rotated_files: see L{JSONLogFile}.
    @return: the observer (remove it with C{publisher.removeObserver}).
    @raise OSError: the file cannot be opened.
    """
    obs = JSONRecordObserver(open_json_log(path, rotate_length=rotate_length,
                                           max_rotated_files=max_rotated_files), clock)
    (globalLogPublisher if publisher is None else publisher).addObserver(cast(ILogObserver, obs))
    return obs
