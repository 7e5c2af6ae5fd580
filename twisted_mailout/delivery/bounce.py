"""Delivery status notifications (RFC 3464), built with the standard library.

A bounce is a C{multipart/report; report-type=delivery-status} message
(RFC 6522) with three parts: a readable explanation, the
C{message/delivery-status} fields, and the original headers
(C{text/rfc822-headers}). It goes to the envelope sender with the null
sender, so it can never cause another bounce (RFC 5321 6.1).

L{make_dsn} builds the report (pure); L{enqueue_dsn} reads the original
headers from the queue store and queues the report there, as ordinary mail.
"""

from __future__ import annotations

import email.utils
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from typing import Any

from twisted.logger import Logger

from twisted_mailout.envelope import RecipientState
from twisted_mailout.message import split_headers
from twisted_mailout.queue.interface import IQueueStore
from twisted_mailout.queue.model import QueueEntry, RecipientStatus

log = Logger(namespace="twisted_mailout.delivery.scheduler")

__all__ = ["all_reported", "enqueue_dsn", "make_dsn", "report_bounces", "warn_delay"]


def _diagnostic(rs: RecipientStatus) -> str | None:
    if rs.reply is None or rs.reply.local:
        return None
    return "smtp; " + rs.reply.one_line()


def make_dsn(entry: QueueEntry, original_headers: bytes, failed: list[RecipientStatus],
             reporting_mta: str, now: float, action: str = "failed") -> bytes:
    """Build the delivery status notification for C{failed} recipients.

    @param entry: the queued message the report is about.
    @param original_headers: its header block (bytes), returned to the
        sender as C{text/rfc822-headers}.
    @param failed: the recipients to report, each with its last reply.
    @param reporting_mta: this host's name, for C{Reporting-MTA} and From.
    @param now: the report's time, seconds since the epoch.
    @param action: RFC 3464 2.3.3 action: C{"failed"} or C{"delayed"}.
    @return: the report's bytes (CRLF line ends), ready for enqueueing with
        a null sender to C{entry.sender}.
    @raise ValueError: C{failed} is empty or the message had a null sender
        (no report may be sent for it).
    """
    if not failed:
        raise ValueError("no recipients to report")
    if not entry.sender:
        raise ValueError("never report on a message with a null sender")
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{entry.sender}>"
    report["Subject"] = ("Undelivered Mail Returned to Sender" if action == "failed"
                         else "Delayed Mail (still being retried)")
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"

    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
    ]
    if action == "failed":
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. The details follow.", ""]
    else:
        lines += ["Your message has not yet been delivered to one or more recipients.",
                  "Delivery will be attempted again; you need not send it again.", ""]
    for rs in failed:
        where = f" (from {rs.relay})" if rs.relay and rs.reply and not rs.reply.local else ""
        said = rs.reply.one_line() if rs.reply else "no reply"
        lines.append(f"<{rs.address}>: {said}{where}")
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "utf-8"))

    status = MIMEBase("message", "delivery-status")
    blocks: list[Message | str] = []
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Mailout-Queue-ID"] = entry.qid
    per_message["Arrival-Date"] = email.utils.formatdate(entry.arrival, localtime=True)
    blocks.append(per_message)
    for rs in failed:
        b = Message()
        addr_type = "utf-8" if not rs.address.isascii() else "rfc822"
        b["Final-Recipient"] = f"{addr_type}; {rs.address}"
        b["Action"] = action
        b["Status"] = rs.reply.enhanced_status if rs.reply else "4.0.0"
        if rs.relay and rs.reply is not None and not rs.reply.local:
            b["Remote-MTA"] = "dns; " + rs.relay.split("[", 1)[0]
        diag = _diagnostic(rs)
        if diag:
            b["Diagnostic-Code"] = diag
        elif rs.reply is not None:
            b["X-Mailout-Diagnostic"] = rs.reply.one_line()
        b["Last-Attempt-Date"] = email.utils.formatdate(now, localtime=True)
        blocks.append(b)
    status.set_payload(blocks)
    report.attach(status)

    headers = MIMEBase("text", "rfc822-headers")
    body = original_headers
    try:
        text = body.decode("ascii")
        headers.set_payload(text)
    except UnicodeDecodeError:
        headers.set_payload(body.decode("utf-8", "replace"), "utf-8")
    report.attach(headers)
    return report.as_bytes(policy=SMTP)


def enqueue_dsn(store: IQueueStore, entry: QueueEntry, failed: list[RecipientStatus],
                reporting_mta: str, now: float, action: str = "failed") -> str:
    """Build the delivery status notification for C{failed} recipients of
    C{entry} and queue it, with the null sender, to C{entry.sender}.

    Blocks (reads the headers, enqueues durably): run it through C{run_blocking}.

    @param store: the queue store holding C{entry}; the report goes into it.
    @param entry: the queued message the report is about (non-null sender).
    @param failed: the recipients to report, each with its last reply.
    @param reporting_mta: this host's name (C{Reporting-MTA}, RFC 3464 2.2.2).
    @param now: the report's time, seconds since the epoch.
    @param action: RFC 3464 2.3.3 action: C{"failed"} or C{"delayed"}.
    @return: the report's queue id, once it is durable in C{store}.
    @raise ValueError: C{failed} is empty or the sender is null (L{make_dsn}).
    @raise OSError: the original headers cannot be read.
    @raise QueueError: the report could not be queued.
    """
    head, _ = split_headers(store.read_headers(entry))
    dsn = make_dsn(entry, b"".join(head), failed, reporting_mta, now, action)
    return store.enqueue("", [entry.sender], dsn)


def all_reported(entry: QueueEntry) -> bool:
    """Whether every bounced recipient of C{entry} has been reported to the
    sender (or dropped, for a bounce)."""
    return all(rs.state is not RecipientState.BOUNCED or rs.address in entry.bounced_reported
               for rs in entry.recipients)


async def warn_delay(store: IQueueStore, run_blocking: Any, entry: QueueEntry, now: float,
                     delay_warning: float, reporting_mta: str, at: float) -> bool:
    """Queue the one delay warning (RFC 3464 action C{delayed}) of C{entry}
    when it is due: C{delay_warning} seconds after arrival, recipients still
    deferred, a sender to tell, none sent yet; the entry is saved with
    C{delay_warned} set.

    @param run_blocking: runs blocking store work (a thread in the daemon).
    @param now: the attempt's time; C{at}: the report's time (seconds).
    @return: whether a warning was queued (the caller picks it up).
    """
    if (entry.delay_warned or not entry.sender or now - entry.arrival < delay_warning):
        return False
    deferred = [rs for rs in entry.recipients if rs.state is RecipientState.DEFERRED]
    if not deferred:
        return False
    if hasattr(store, "save_with_report"):
        qid = await run_blocking(_report_atomically, store, entry, deferred, reporting_mta,
                                 at, "delayed")
        log.info("{qid}: sender delay notification: {dsn_qid}", qid=entry.qid, dsn_qid=qid)
        return True
    qid = await run_blocking(enqueue_dsn, store, entry, deferred, reporting_mta, at,
                             "delayed")
    log.info("{qid}: sender delay notification: {dsn_qid}", qid=entry.qid, dsn_qid=qid)
    entry.delay_warned = True
    await run_blocking(store.save_many, [entry])
    return True


async def report_bounces(store: IQueueStore, run_blocking: Any, entry: QueueEntry,
                         reporting_mta: str, at: float) -> bool:
    """Report the bounced recipients of C{entry} not yet reported: one DSN to
    the sender (RFC 3464), or a log line each for a bounce (null sender),
    which is never bounced again; the entry is saved unless it is done.

    @return: whether a DSN was queued (the caller picks it up).
    """
    unreported = [rs for rs in entry.recipients if rs.state is RecipientState.BOUNCED
                  and rs.address not in entry.bounced_reported]
    if not unreported:
        return False
    queued = False
    if entry.sender and hasattr(store, "save_with_report"):
        # a shared store: the report and the entry's "reported" state in one
        # transaction, so the report exists exactly once
        qid = await run_blocking(_report_atomically, store, entry, unreported,
                                 reporting_mta, at, "failed")
        log.info("{qid}: sender non-delivery notification: {dsn_qid}", qid=entry.qid,
                 dsn_qid=qid)
        return True
    if not entry.sender:
        for rs in unreported:
            log.warn("{qid}: bounce to <{rcpt}> undeliverable; dropped ({reply})",
                     qid=entry.qid, rcpt=rs.address,
                     reply=rs.reply.one_line() if rs.reply else "")
    else:
        qid = await run_blocking(enqueue_dsn, store, entry, unreported, reporting_mta, at)
        log.info("{qid}: sender non-delivery notification: {dsn_qid}", qid=entry.qid,
                 dsn_qid=qid)
        queued = True
    entry.bounced_reported.extend(rs.address for rs in unreported)
    if not entry.done:
        await run_blocking(store.save_many, [entry])
    return queued


def _report_atomically(store: Any, entry: QueueEntry, rcpts: list[RecipientStatus],
                       reporting_mta: str, at: float, action: str) -> str:
    """Blocking: build the DSN and save it with the entry marked as reported
    (C{store.save_with_report}, one transaction); on any failure the mark
    is undone, so a retry makes the report again."""
    head, _ = split_headers(store.read_headers(entry))
    dsn = make_dsn(entry, b"".join(head), rcpts, reporting_mta, at, action)
    before = (list(entry.bounced_reported), entry.delay_warned)
    if action == "delayed":
        entry.delay_warned = True
    else:
        entry.bounced_reported.extend(rs.address for rs in rcpts)
    try:
        qid: str = store.save_with_report(entry, "", [entry.sender], dsn)
    except BaseException:
        entry.bounced_reported[:], entry.delay_warned = before
        raise
    return qid
