"""Recipient injection through header fields and envelope addresses: a bare CR,
LF, NUL or other control character, or an address list that two readers
would split differently, is refused with an error naming the field, and
nothing is queued or sent, at every entry point that reads addresses:
C{recipients_from_headers} (C{mailout sendmail -t}), the Mailer, the Django
backend, the builder, and C{twisted_mailout.enqueue}.

The C{mailout sendmail -t} process itself is run in
C{tests/system/test_daemon_cli.py}; here its code runs in this process.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from twisted_mailout import AddressError, MessageError, enqueue
from twisted_mailout.apps.builder import build_message, parse_display_address
from twisted_mailout.apps.deliveries import MemoryDelivery
from twisted_mailout.apps.mailer import Mailer
from twisted_mailout.daemon import cli
from twisted_mailout.envelope import parse_address, parse_sender
from twisted_mailout.message import header_addresses, parse_address_list, recipients_from_headers

SENDER = "sender@example.com"
INJECTED = "<victim@example.org\rRCPT TO:<evil@example.org>>"

# Control characters that must never reach an address (the name the error gives).
CONTROLS = {
    "\r": "CR",
    "\x00": "NUL",
    "\x0b": "U+000B",
    "\x0c": "U+000C",
    "\x1b": "U+001B",
    "\x1c": "U+001C",  # str.splitlines() breaks lines here
    "\x7f": "U+007F",
    "\x85": "U+0085",  # NEL
    "\u2028": "U+2028",  # LINE SEPARATOR
}

# Address lists that Python's two address parsers, or a reader and a relay,
# could split into more recipients than the writer meant: each is refused.
SMUGGLING = {
    "addresses glued": "victim@example.org<evil@example.org>",
    "closing paren": "victim@example.org)<evil@example.org>",
    "two angle addresses": "<victim@example.org> <evil@example.org>",
    "extra closing bracket": "<victim@example.org>>, x",
    "unterminated quote": '"victim, evil@example.org',
    "unterminated angle": "Victim <victim@example.org",
    "backslash before comma": "victim@example.org\\, evil@example.org",
    "encoded word as address": "=?utf-8?q?evil=40example.org?=",
    "quote inside local part": 'vic"tim, evil"@example.org',
    "space-separated": "victim@example.org evil@example.org",
    "trailing dot": "victim@example.org.",
}

# Values whose commas or at-signs hide in quotes, comments or encoded words:
# each holds exactly the addresses given.
ONE_ADDRESS = {
    "comma in quoted name": ('"Victim, evil@example.org" <victim@example.org>',
                             ["victim@example.org"]),
    "escaped quote in name": ('"x\\", evil@example.org" <victim@example.org>',
                              ["victim@example.org"]),
    "comma in leading comment": ("(x, evil@example.org) victim@example.org",
                                 ["victim@example.org"]),
    "comma in trailing comment": ("victim@example.org (x, evil@example.org)",
                                  ["victim@example.org"]),
    "comma in encoded name": ("=?utf-8?q?Victim=2C_evil=40example=2Eorg?= <victim@example.org>",
                              ["victim@example.org"]),
    "group": ("Team: a@example.org, b@example.org;", ["a@example.org", "b@example.org"]),
    "empty group": ("undisclosed-recipients:;", []),
    "obsolete route": ("<@relay.example.net:victim@example.org>", ["victim@example.org"]),
    "period in name": ("John Q. Public <jqp@example.org>", ["jqp@example.org"]),
    "tab between addresses": ("a@example.org,\tb@example.org", ["a@example.org", "b@example.org"]),
}


def message(*fields: str, eol: str = "\r\n") -> bytes:
    head = "".join(f + eol for f in ("From: Sender <sender@example.com>", *fields))
    return (head + "Subject: hello" + eol + eol + "body" + eol).encode("utf-8")


def files_under(folder: Path) -> list[str]:
    """Every file below C{folder}, as paths relative to it (none when it is missing)."""
    out = []
    for root, _, names in os.walk(folder):
        out.extend(os.path.relpath(os.path.join(root, n), folder) for n in names)
    return sorted(out)


def queued_messages(folder: Path) -> list[str]:
    """Files in a queue folder that hold a message (the lock file is not one)."""
    return [f for f in files_under(folder) if f.split(os.sep)[0] in
            ("tmp", "new", "cur", "messages", "state")]


# --------------------------------------------------------------------------- the parser


def test_the_reported_to_field_is_refused_naming_the_field():
    data = message("To: " + INJECTED)
    with pytest.raises(MessageError, match=r"the To header field contains a control "
                                           r"character \(CR\)"):
        recipients_from_headers(data)


@pytest.mark.parametrize("field", ["To", "Cc", "Bcc", "to", "BCC"])
@pytest.mark.parametrize("char", list(CONTROLS))
def test_a_control_character_in_any_recipient_field_is_refused(field, char):
    data = message("To: ok@example.org", f"{field}: victim@example.org{char}evil@example.org")
    with pytest.raises(MessageError) as e:
        recipients_from_headers(data)
    name = {"to": "To", "BCC": "Bcc"}.get(field, field)  # named as RFC 5322 spells it
    assert f"the {name} header field" in str(e.value)
    assert CONTROLS[char] in str(e.value)


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
def test_a_bare_cr_in_a_folded_continuation_line_is_refused(eol):
    data = message("To: a@example.org,", "\t<victim@example.org\rRCPT TO:<evil@example.org>>",
                   eol=eol)
    with pytest.raises(MessageError, match="CR"):
        recipients_from_headers(data)


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
def test_line_ends_and_folding_are_not_control_characters(eol):
    data = message("To: Ann <a@example.org>,", "\tBob <b@example.org>", "Cc: c@example.org",
                   eol=eol)
    assert recipients_from_headers(data) == ["a@example.org", "b@example.org", "c@example.org"]


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_ambiguous_or_invalid_address_lists_are_refused(case):
    value = SMUGGLING[case]
    with pytest.raises(MessageError, match="the Cc header field"):
        recipients_from_headers(message("To: ok@example.org", "Cc: " + value))
    with pytest.raises(MessageError):
        parse_address_list(value)


@pytest.mark.parametrize("case", list(ONE_ADDRESS))
def test_quoted_commented_and_encoded_commas_hide_no_recipient(case):
    value, expected = ONE_ADDRESS[case]
    assert parse_address_list(value) == expected
    assert recipients_from_headers(message("To: " + value)) == expected


def test_recipients_in_order_without_duplicates():
    data = message("To: a@example.org, b@example.org", "Cc: B <b@example.org>, c@example.org",
                   "Bcc: d@example.org, a@example.org")
    assert recipients_from_headers(data) == ["a@example.org", "b@example.org", "c@example.org",
                                             "d@example.org"]


def test_other_fields_are_not_read_for_recipients():
    data = message("To: a@example.org", "Reply-To: x@example.org\rRCPT TO:<evil@example.org>")
    assert recipients_from_headers(data) == ["a@example.org"]
    with pytest.raises(MessageError, match="the Reply-To header field"):
        header_addresses(data, ["Reply-To"])


# --------------------------------------------------------------------------- envelope addresses


@pytest.mark.parametrize("char", ["\r", "\n", "\r\n", "\x00", "\x01", "\t", "\x0b", "\x1f",
                                  "\x7f"])
@pytest.mark.parametrize("where", ["local", "domain", "after"])
def test_the_envelope_parser_refuses_control_characters(char, where):
    text = {"local": f"vic{char}tim@example.org", "domain": f"victim@exa{char}mple.org",
            "after": f"<victim@example.org>{char}RCPT TO:<evil@example.org>"}[where]
    with pytest.raises(AddressError, match="control character"):
        parse_address(text)
    with pytest.raises(AddressError, match="control character"):
        parse_sender(text)


def test_enqueue_refuses_an_injected_recipient_and_queues_nothing(tmp_path):
    q = tmp_path / "q"
    for rcpts in (["victim@example.org\rRCPT TO:<evil@example.org>"],
                  ["ok@example.org", "victim@example.org\x00"],
                  "victim@example.org\r\nRCPT TO:<evil@example.org>"):
        with pytest.raises(AddressError, match="control character"):
            enqueue(str(q), SENDER, rcpts, message("To: ok@example.org"))
    with pytest.raises(AddressError, match="control character"):
        enqueue(str(q), "sender@example.com\rRCPT TO:<evil@example.org>", ["ok@example.org"],
                message("To: ok@example.org"))
    assert queued_messages(q) == []


def test_direct_sendmail_refuses_an_injected_recipient_before_any_connection():
    from twisted.internet.testing import MemoryReactorClock

    from twisted_mailout import sendmail

    reactor = MemoryReactorClock()
    for sender, rcpts in ((SENDER, ["victim@example.org\rRCPT TO:<evil@example.org>"]),
                          (SENDER, "victim@example.org\nRCPT TO:<evil@example.org>"),
                          ("s@example.com\r\nRCPT TO:<evil@example.org>", ["ok@example.org"])):
        failures: list = []
        sendmail(sender, rcpts, message("To: ok@example.org"), reactor=reactor,
                 relay="127.0.0.1:2525").addErrback(failures.append)
        [failure] = failures
        assert failure.check(AddressError) and "control character" in str(failure.value)
    assert reactor.tcpClients == [] and reactor.getDelayedCalls() == []


# --------------------------------------------------------------------------- sendmail -t


def run_sendmail(monkeypatch, capsys, queue: Path, stdin: bytes, *args: str):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = cli.main(["sendmail", "--queue", str(queue), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_sendmail_t_refuses_the_injected_to_field_and_queues_nothing(tmp_path, monkeypatch,
                                                                       capsys):
    q = tmp_path / "q"
    code, out, err = run_sendmail(monkeypatch, capsys, q, message("To: " + INJECTED),
                                  "-t", "-f", SENDER)
    assert code == cli.EX_DATAERR, err
    assert out == ""
    assert err.startswith("mailout sendmail: the To header field contains a control character")
    assert queued_messages(q) == []


def test_sendmail_t_refuses_a_smuggled_cc_even_with_recipient_arguments(tmp_path, monkeypatch,
                                                                        capsys):
    q = tmp_path / "q"
    data = message("To: a@example.org", "Cc: " + SMUGGLING["addresses glued"])
    code, out, err = run_sendmail(monkeypatch, capsys, q, data,
                                  "-t", "-f", SENDER, "arg@example.org")
    assert code == cli.EX_DATAERR, err
    assert "the Cc header field" in err and out == ""
    assert queued_messages(q) == []


def test_sendmail_t_still_queues_a_clean_message(tmp_path, monkeypatch, capsys):
    q = tmp_path / "q"
    code, out, err = run_sendmail(monkeypatch, capsys, q,
                                  message('To: "Victim, Evil" <victim@example.org>'),
                                  "-t", "-f", SENDER)
    assert code == 0, err
    assert len(queued_messages(q)) == 1
    from twisted_mailout.queue.store import Queue

    [entry], problems = Queue(str(q)).pickup_all()
    assert problems == []
    assert [r.address for r in entry.recipients] == ["victim@example.org"]


# --------------------------------------------------------------------------- the Mailer


@pytest.mark.parametrize("field", ["To", "Cc", "Bcc"])
def test_the_mailer_refuses_an_injected_field_and_sends_nothing(field):
    outbox = MemoryDelivery()
    mailer = Mailer(outbox)
    data = message("To: ok@example.org", f"{field}: {INJECTED}")
    with pytest.raises(MessageError, match=f"the {field} header field"):
        mailer.send(data)
    with pytest.raises(MessageError, match=f"the {field} header field"):
        mailer.send_blocking(data)
    assert outbox.outbox == []


@pytest.mark.parametrize("field", ["From", "Sender"])
def test_the_mailer_refuses_an_injected_sender_field(field):
    outbox = MemoryDelivery()
    data = message("To: ok@example.org").replace(b"From: ", b"X-Old-From: ") \
        if field == "From" else message("To: ok@example.org")
    data = f"{field}: <s@example.com\rRCPT TO:<evil@example.org>>\r\n".encode() + data
    with pytest.raises(MessageError, match=f"the {field} header field"):
        Mailer(outbox).send(data)
    assert outbox.outbox == []


def test_the_mailer_queues_nothing_for_a_smuggled_recipient(tmp_path):
    q = tmp_path / "q"
    mailer = Mailer(f"queue://{q}")
    with pytest.raises(MessageError, match="the To header field"):
        mailer.send(message("To: " + SMUGGLING["closing paren"]))
    assert queued_messages(q) == []


def test_the_mailer_takes_one_recipient_from_a_comma_in_a_display_name():
    outbox = MemoryDelivery()
    Mailer(outbox).send(message('To: "Victim, evil@example.org" <victim@example.org>'))
    [m] = outbox.outbox
    assert m.recipients == ["victim@example.org"]


# --------------------------------------------------------------------------- the builder


@pytest.mark.parametrize("value", [INJECTED, "victim@example.org\x00", "Vic\x00tim <v@example.org>",
                                   "Victim <victim@example.org>\x7f",
                                   SMUGGLING["addresses glued"], SMUGGLING["closing paren"]])
def test_the_builder_refuses_injected_addresses(value):
    with pytest.raises((AddressError, MessageError)):
        parse_display_address(value)
    with pytest.raises((AddressError, MessageError)):
        build_message(sender=SENDER, to=[value], subject="s", text="t")


# --------------------------------------------------------------------------- the Django backend


django = pytest.importorskip("django")

from tests.support.django_settings import configure  # noqa: E402

configure()

from django.core.mail import EmailMessage  # noqa: E402

from twisted_mailout.contrib.django import EmailBackend  # noqa: E402


@pytest.mark.parametrize("kind", ["to", "cc", "bcc", "from_email"])
@pytest.mark.parametrize("value", [INJECTED, "victim@example.org\x00",
                                   SMUGGLING["addresses glued"], SMUGGLING["closing paren"]])
def test_the_django_backend_refuses_injected_addresses_and_queues_nothing(tmp_path, kind, value):
    q = tmp_path / "q"
    backend = EmailBackend(url=f"queue://{q}")
    fields = {"to": ["ok@example.org"], "from_email": SENDER}
    fields[kind] = value if kind == "from_email" else [value]
    msg = EmailMessage("s", "body", **fields)
    with pytest.raises((AddressError, MessageError)):
        backend.send_messages([msg])
    assert queued_messages(q) == []
    # fail_silently too, as Django's own backends: refused before anything is sent
    with pytest.raises((AddressError, MessageError)):
        EmailBackend(url=f"queue://{q}", fail_silently=True).send_messages([msg])
    assert queued_messages(q) == []


def test_the_django_backend_takes_one_recipient_from_a_comma_in_a_display_name(tmp_path):
    outbox = MemoryDelivery()
    backend = EmailBackend(delivery=outbox)
    msg = EmailMessage("s", "body", SENDER, ['"Victim, evil@example.org" <victim@example.org>'])
    assert backend.send_messages([msg]) == 1
    [m] = outbox.outbox
    assert m.recipients == ["victim@example.org"]
