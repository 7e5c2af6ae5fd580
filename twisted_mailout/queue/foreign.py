"""Files dropped by other mail queues: zope.sendmail and repoze.sendmail.

Both write Maildir folders whose files carry the envelope inside the message
(docs/queue-format.md, "Foreign formats"):

- zope.sendmail (C{QueuedMailDelivery}): the first two lines are
  C{X-Zope-From: SENDER} and C{X-Zope-To: RCPT, RCPT};
- repoze.sendmail / pyramid_mailer: header fields C{X-Actually-From} and
  C{X-Actually-To} anywhere in the header block.

L{rewrite_foreign} turns such a file into our own format (one envelope line,
then the message without those lines), so the rest of the queue knows one
format only. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib

from twisted_mailout.envelope import AddressError, validate_envelope
from twisted_mailout.message import header_values, remove_headers
from twisted_mailout.queue.model import (
    CorruptEntry,
    EnvelopeLine,
    QueueEntry,
    encode_envelope_line,
)

__all__ = ["foreign_qid", "rewrite_foreign"]


def foreign_qid(name: str) -> str:
    """The queue id of a foreign file: C{"F"} and 22 hex digits of a hash
    of its file name, so repeating an interrupted pickup finds the same entry.

    @param name: the file's name in C{new/} or C{cur/} (without the folder).
    """
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=11)
    return "F" + digest.hexdigest().upper()


def _split_list(value: str) -> list[str]:
    return [r.strip() for r in value.split(",") if r.strip()]


def rewrite_foreign(name: str, data: bytes, arrival: float) -> tuple[QueueEntry, bytes]:
    """Parse a zope.sendmail or repoze.sendmail file and rewrite it in our
    own format.

    @param name: its file name (for the queue id and the C{source} field).
    @param data: the whole file.
    @param arrival: when it was queued (its mtime), seconds since the epoch.
    @return: C{(entry, rewritten)}: the entry (every recipient pending) and
        the bytes to store: an envelope line with C{origin} C{"zope"} or
        C{"repoze"}, then the message without its envelope lines or fields.
    @raise CorruptEntry: no envelope of either kind, a bad address, or an
        empty message.
    """
    if data.startswith(b"X-Zope-From:"):
        try:
            line1, line2, rest = data.split(b"\n", 2)
        except ValueError:
            raise CorruptEntry("zope.sendmail file without X-Zope-To line") from None
        if not line2.startswith(b"X-Zope-To:"):
            raise CorruptEntry("zope.sendmail file without X-Zope-To line")
        try:
            sender = line1[len(b"X-Zope-From:"):].strip().decode("utf-8")
            rcpts_raw = line2[len(b"X-Zope-To:"):].strip().decode("utf-8")
            sender, rcpts = validate_envelope(sender, _split_list(rcpts_raw))
        except (UnicodeDecodeError, AddressError) as e:
            raise CorruptEntry(f"bad zope.sendmail envelope: {e}") from e
        origin, body = "zope", rest
    else:
        froms = header_values(data, "X-Actually-From")
        tos = header_values(data, "X-Actually-To")
        if not (froms and tos):
            raise CorruptEntry(
                "no envelope: neither X-Mailout-Envelope, X-Zope-From/X-Zope-To "
                "nor X-Actually-From/X-Actually-To"
            )
        try:
            sender, rcpts = validate_envelope(froms[0].strip(), _split_list(tos[0]))
        except AddressError as e:
            raise CorruptEntry(f"bad repoze.sendmail envelope: {e}") from e
        origin = "repoze"
        body = remove_headers(data, ["X-Actually-From", "X-Actually-To"])
    if not body.strip():
        raise CorruptEntry("empty message")
    eightbit = not body.isascii()
    head = encode_envelope_line(sender, rcpts, arrival, eightbit=eightbit, origin=origin,
                                source=name)
    line = EnvelopeLine(sender, rcpts, arrival, origin, eightbit, len(head))
    return QueueEntry.pending(foreign_qid(name), line), head + body
