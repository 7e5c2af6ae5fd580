"""Test helpers: capture what an application sends, and assert on it.

    from twisted_mailout.testing import capture_mail

    with capture_mail() as outbox:
        app.register_user("zoe@example.org")      # sends through a Mailer
    outbox.assert_sent(1, to="zoe@example.org", subject_contains="Welcome")

While L{capture_mail} is active, every L{Mailer} and the Django backend
deliver to its in-memory outbox instead of their configured delivery (queue,
SMTP, ...), from any thread. With pytest, the C{mail_outbox} fixture does the
same for one test (available once the C{pytest11} entry point is installed,
or with C{from twisted_mailout.testing import mail_outbox} in a conftest).

The package also holds L{twisted_mailout.testing.memory.StubSMTP} (the real
SMTP client run in memory against a scripted server, for code that delivers
now), L{twisted_mailout.testing.memorystore} (an in-memory queue store) and
L{twisted_mailout.testing.loopback} (DNS and SMTP peers on loopback).
"""

from __future__ import annotations

import contextlib
import email.utils
from collections.abc import Iterable, Iterator
from typing import TypedDict, Unpack, cast

from twisted_mailout.apps.deliveries import MemoryDelivery, SentMessage, _pop_capture, _push_capture

__all__ = ["CapturedMessage", "Criteria", "Outbox", "capture_mail", "mail_outbox"]


class Criteria(TypedDict, total=False):
    """What L{Outbox.find} and L{Outbox.assert_sent} take as keywords (every
    one optional; see L{CapturedMessage.matches})."""

    to: str | Iterable[str]
    sender: str
    subject: str
    subject_contains: str
    text_contains: str
    html_contains: str
    attachment: str
    header: tuple[str, str]


class CapturedMessage:
    """One message in an L{Outbox}: the envelope and the parsed message.

    @ivar message_id: the id the delivery returned.
    @ivar sender: the envelope sender. @ivar recipients: the envelope recipients.
    @ivar data: the bytes as delivered (Bcc already removed by the mailer).
    @ivar message: an C{email.message.EmailMessage} (C{email.policy.default}).
    """

    def __init__(self, sent: SentMessage):
        self.message_id = sent.message_id
        self.sender = sent.sender
        self.recipients = list(sent.recipients)
        self.data = sent.data
        self.message = sent.message

    def __repr__(self) -> str:
        return (f"<CapturedMessage from=<{self.sender}> to={self.recipients} "
                f"subject={self.subject!r}>")

    def header_addresses(self, name: str) -> list[str]:
        """The addresses (addr-spec only) in header field C{name}."""
        return [a for _, a in email.utils.getaddresses(self.message.get_all(name, [])) if a]

    @property
    def to(self) -> list[str]:
        """Addresses in C{To}."""
        return self.header_addresses("To")

    @property
    def cc(self) -> list[str]:
        """Addresses in C{Cc}."""
        return self.header_addresses("Cc")

    @property
    def subject(self) -> str:
        """The decoded Subject (C{""} when none)."""
        return str(self.message.get("Subject", ""))

    def _body(self, subtype: str) -> str | None:
        part = self.message.get_body(preferencelist=(subtype,))
        return part.get_content().replace("\r\n", "\n") if part is not None else None

    @property
    def text(self) -> str | None:
        """The text/plain body (decoded, LF line ends), or L{None}."""
        return self._body("plain")

    @property
    def html(self) -> str | None:
        """The text/html body (decoded, LF line ends), or L{None}."""
        return self._body("html")

    @property
    def attachments(self) -> list[tuple[str | None, str, bytes]]:
        """C{(filename, content_type, bytes)} of each attachment."""
        return [(p.get_filename(), p.get_content_type(),
                 cast(bytes, p.get_payload(decode=True)))
                for p in self.message.iter_attachments()]

    @property
    def inline(self) -> dict[str, tuple[str, bytes]]:
        """Inline parts by Content-ID (without angle brackets):
        C{{cid: (content_type, bytes)}}."""
        out: dict[str, tuple[str, bytes]] = {}
        for p in self.message.walk():
            cid = p.get("Content-ID")
            if cid and not p.is_multipart():
                out[str(cid).strip().strip("<>")] = (p.get_content_type(),
                                                     cast(bytes, p.get_payload(decode=True)))
        return out

    def matches(self, *, to: str | Iterable[str] | None = None, sender: str | None = None,
                subject: str | None = None, subject_contains: str | None = None,
                text_contains: str | None = None, html_contains: str | None = None,
                attachment: str | None = None,
                header: tuple[str, str] | None = None) -> bool:
        """Whether this message matches every criterion given (see
        L{Outbox.find}).

        @param to: an envelope recipient, or several (all required).
        @param sender: the envelope sender (MAIL FROM), equal.
        @param subject: the C{Subject}, equal.
        @param subject_contains: text in the C{Subject}.
        @param text_contains: text in the plain text body.
        @param html_contains: text in the HTML body.
        @param attachment: an attachment's file name.
        @param header: C{(name, value)}: a header field C{name} with exactly
            that value (one of its occurrences).
        """
        if to is not None:
            wanted = [to] if isinstance(to, str) else list(to)
            if not all(w in self.recipients for w in wanted):
                return False
        if sender is not None and self.sender != sender:
            return False
        if subject is not None and self.subject != subject:
            return False
        if subject_contains is not None and subject_contains not in self.subject:
            return False
        if text_contains is not None and text_contains not in (self.text or ""):
            return False
        if html_contains is not None and html_contains not in (self.html or ""):
            return False
        if attachment is not None and attachment not in [a[0] for a in self.attachments]:
            return False
        if header is not None:
            name, value = header
            if value not in [str(v) for v in self.message.get_all(name, [])]:
                return False
        return True


class Outbox:
    """What was sent while a L{capture_mail} was active.

    @ivar delivery: the underlying L{MemoryDelivery}.
    """

    def __init__(self, delivery: MemoryDelivery | None = None):
        self.delivery = delivery or MemoryDelivery()

    @property
    def messages(self) -> list[CapturedMessage]:
        """Every message taken so far, in order."""
        with self.delivery._lock:
            sent = list(self.delivery.outbox)
        return [CapturedMessage(s) for s in sent]

    def __len__(self) -> int:
        return len(self.delivery.outbox)

    def __iter__(self) -> Iterator[CapturedMessage]:
        return iter(self.messages)

    def __getitem__(self, index: int) -> CapturedMessage:
        return self.messages[index]

    def clear(self) -> None:
        """Forget what was sent."""
        self.delivery.clear()

    def find(self, **criteria: Unpack[Criteria]) -> list[CapturedMessage]:
        """The messages matching every criterion: C{to} (an envelope
        recipient or a list of them, all required), C{sender} (envelope),
        C{subject} (equal), C{subject_contains}, C{text_contains},
        C{html_contains}, C{attachment} (a file name), C{header} (a
        C{(name, value)} pair).

        @param criteria: a L{Criteria}: the keywords of
            L{CapturedMessage.matches}.
        """
        return [m for m in self.messages if m.matches(**criteria)]

    def _summary(self) -> str:
        if not len(self):
            return "nothing was sent"
        return "sent: " + "; ".join(
            f"from=<{m.sender}> to={','.join(m.recipients)} subject={m.subject!r}"
            for m in self.messages)

    def assert_sent(self, count: int | None = None,
                    **criteria: Unpack[Criteria]) -> list[CapturedMessage]:
        """Assert that messages matching C{criteria} (see L{find}) were sent:
        exactly C{count} of them, or at least one when C{count} is L{None}.

        @return: the matching messages.
        @raise AssertionError: with what was sent, when they were not.
        """
        found = self.find(**criteria)
        if (count is None and not found) or (count is not None and len(found) != count):
            want = "at least one" if count is None else str(count)
            crit = ", ".join(f"{k}={v!r}" for k, v in criteria.items()) or "any"
            raise AssertionError(f"expected {want} message(s) matching {crit}, found "
                                 f"{len(found)}; {self._summary()}")
        return found

    def assert_nothing_sent(self) -> None:
        """@raise AssertionError: something was sent."""
        if len(self):
            raise AssertionError(f"expected no mail; {self._summary()}")


@contextlib.contextmanager
def capture_mail() -> Iterator[Outbox]:
    """Swap every mailer's delivery for an in-memory outbox while the block
    runs (nested captures: the innermost wins). Thread-safe.

    @return: a context manager giving the L{Outbox}.
    """
    outbox = Outbox()
    _push_capture(outbox.delivery)
    try:
        yield outbox
    finally:
        _pop_capture(outbox.delivery)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is not needed at run time
    mail_outbox = None
else:

    @pytest.fixture
    def mail_outbox() -> Iterator[Outbox]:
        """pytest fixture: an L{Outbox} capturing every mailer's mail for
        the test."""
        with capture_mail() as outbox:
            yield outbox
