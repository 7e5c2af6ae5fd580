"""The Django backend's contract with Django (issue 15 item 6): C{fail_silently}
exactly as Django's own SMTP backend (compared case by case with that backend
against an aiosmtpd sink), C{get_connection(backend=...)} with Django's SMTP
options mapped onto the delivery, a connection shared by threads, and
C{mail.outbox} under Django's test environment beside our own capture.

The direct SMTP cases (sessions reused, threads on one SMTP connection, no
reactor running) are in tests/integration/test_django_smtp.py."""

from __future__ import annotations

import email
import os
import smtplib
import threading

import pytest

django = pytest.importorskip("django")

from tests.support.django_settings import configure  # noqa: E402

configure()

from django.core import mail  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test.utils import (  # noqa: E402
    override_settings,
    setup_test_environment,
    teardown_test_environment,
)

from twisted_mailout import AddressError, DeliveryError, QueueError  # noqa: E402
from twisted_mailout.apps.deliveries import (  # noqa: E402
    Delivery,
    MemoryDelivery,
    SMTPDelivery,
    sysexit_reply,
)
from twisted_mailout.apps.django import REFUSALS, check_address, smtp_options  # noqa: E402
from twisted_mailout.contrib.django import EmailBackend  # noqa: E402
from twisted_mailout.queue.store import Queue  # noqa: E402
from twisted_mailout.testing import capture_mail  # noqa: E402

OURS = "twisted_mailout.contrib.django.EmailBackend"
DJANGO_SMTP = "django.core.mail.backends.smtp.EmailBackend"
LOCMEM = "django.core.mail.backends.locmem.EmailBackend"
DJANGO_61 = django.VERSION >= (6, 1)


def connection(backend, **kwargs):
    """C{mail.get_connection} (deprecated in Django 6.1, still the API of 5.2)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mail.get_connection(backend, **kwargs)


# -- fail_silently, compared with Django's SMTP backend -----------------------

INJECTED = "<victim@example.org\rRCPT TO:<evil@example.org>>"

#: name -> (from_email, to, subject): each is sent alone, as to= and as bcc=
CASES = {
    "good": ("shop@origin.test", ["b@dest.test"], "s"),
    "display name": ("Shop <shop@origin.test>", ["Zoë <zoe@dest.test>"], "s"),
    "no domain": ("shop@origin.test", ["not-an-address"], "s"),
    "CR in an address": ("shop@origin.test", [INJECTED], "s"),
    "addresses glued": ("shop@origin.test", ["victim@example.org<evil@example.org>"], "s"),
    "closing paren": ("shop@origin.test", ["victim@example.org)<evil@example.org>"], "s"),
    "two angle addresses": ("shop@origin.test", ["<v@example.org> <evil@example.org>"], "s"),
    "CR in the sender": (INJECTED, ["b@dest.test"], "s"),
    "sender glued": ("victim@example.org<evil@example.org>", ["b@dest.test"], "s"),
    "newline in the subject": ("shop@origin.test", ["b@dest.test"], "s\r\nBcc: evil@example.org"),
    "no recipients": ("shop@origin.test", [], "s"),
    "NUL in an address": ("shop@origin.test", ["victim@example.org\x00"], "s"),
}


def refuse_like_an_mta(address):
    """What a real MTA says to an address without a domain (aiosmtpd takes it)."""
    return None if "@" in address else "501 5.1.3 Bad recipient address syntax"


def outcome(send):
    """C{send()}'s count, or C{"raise"} with the exception."""
    try:
        return send(), None
    except Exception as e:
        return "raise", e


@pytest.fixture
def mta(aiosmtpd_sink):
    return aiosmtpd_sink(rcpt_reply=refuse_like_an_mta)


@pytest.mark.parametrize("fail_silently", [False, True], ids=["loud", "silent"])
@pytest.mark.parametrize("field", ["to", "bcc"])
@pytest.mark.parametrize("case", list(CASES))
def test_fail_silently_as_djangos_smtp_backend(mta, tmp_path, case, field, fail_silently):
    sender, rcpts, subject = CASES[case]

    def message():
        return mail.EmailMessage(subject, "body", sender, **{field: rcpts})

    theirs, their_error = outcome(lambda: connection(
        DJANGO_SMTP, host=mta.hostname, port=mta.port,
        fail_silently=fail_silently).send_messages([message()]))
    ours, our_error = outcome(lambda: connection(
        OURS, delivery=f"queue://{tmp_path}", fail_silently=fail_silently
    ).send_messages([message()]))
    if case == "NUL in an address" and not DJANGO_61:
        # Django 5.2 sends a NUL to the server; 6.1 refuses it, and so do we, always
        assert (theirs, ours) == (1, "raise")
        assert isinstance(our_error, AddressError)
        return
    assert ours == theirs, (their_error, our_error)
    if their_error is None:
        assert len(Queue(str(tmp_path)).incoming()) == ours
        return
    if isinstance(their_error, smtplib.SMTPException):
        # the server refused: ours is a refusal by the delivery
        assert isinstance(our_error, REFUSALS)
    else:
        # Django refused to make the message, before any connection: so do we
        assert isinstance(their_error, ValueError)
        assert isinstance(our_error, ValueError) and not isinstance(our_error, DeliveryError)
    assert len(Queue(str(tmp_path)).incoming()) == 0


def test_the_table_covers_both_kinds_of_error():
    """Some cases raise whatever fail_silently says, others only when loud."""
    assert check_address("Zoë <zoe@dest.test>") is None
    assert check_address("not-an-address") is None  # Django passes it to the server
    for bad in (INJECTED, "a@b.test, c@d.test", "victim@example.org<evil@example.org>"):
        with pytest.raises(AddressError):
            check_address(bad)


class Scripted(Delivery):
    """A synchronous delivery that raises, for each message, the next
    exception of C{script} (L{None}: takes it)."""

    scheme = "scripted"

    def __init__(self, script):
        self.script = list(script)
        self.taken = []

    def url(self):
        return "scripted://"

    def send(self, sender, recipients, message, *, message_id=None):
        error = self.script.pop(0)
        if error is not None:
            raise error
        self.taken.append(recipients)
        return "id"


REFUSED = {
    "DeliveryError": DeliveryError(sysexit_reply(67), ["b@dest.test"]),
    "QueueError": QueueError("No space left on device"),
    "OSError": OSError(28, "No space left on device"),
    "AddressError": AddressError("the delivery refuses it"),
}


@pytest.mark.parametrize("error", list(REFUSED))
def test_a_refusal_counts_the_message_out_and_the_next_one_is_sent(error):
    messages = [mail.EmailMessage(f"m{i}", "b", None, [f"r{i}@dest.test"]) for i in range(3)]
    silent = Scripted([None, REFUSED[error], None])
    assert EmailBackend(True, delivery=silent).send_messages(messages) == 2
    assert silent.taken == [["r0@dest.test"], ["r2@dest.test"]]
    loud = Scripted([None, REFUSED[error], None])
    with pytest.raises(type(REFUSED[error])):
        EmailBackend(delivery=loud).send_messages(messages)
    assert loud.taken == [["r0@dest.test"]]  # sent before the failure, none after


def test_a_bug_or_a_configuration_error_is_raised_even_when_silent():
    messages = [mail.EmailMessage("m", "b", None, ["b@dest.test"])]
    for error in (RuntimeError("no reactor"), TypeError("bug"), KeyError("bug")):
        with pytest.raises(type(error)):
            EmailBackend(True, delivery=Scripted([error])).send_messages(messages)


def test_empty_list_and_messages_without_recipients():
    backend = EmailBackend(delivery=Scripted([]))
    assert backend.send_messages([]) == 0
    assert backend.send_messages([mail.EmailMessage("x", "m", None, [])]) == 0


def test_open_and_close_of_a_delivery_without_sessions(tmp_path):
    backend = EmailBackend(delivery=f"queue://{tmp_path}")
    assert backend.open() is False  # nothing to open (Django: "already open")
    with backend as conn:
        assert conn.send_messages([mail.EmailMessage("s", "m", None, ["b@dest.test"])]) == 1
    backend.close()  # closing twice is fine
    assert len(Queue(str(tmp_path)).incoming()) == 1


# -- get_connection(backend=...) and Django's SMTP options ----------------------------

def test_get_connection_with_our_backend_path_when_another_is_the_default(tmp_path):
    with override_settings(EMAIL_BACKEND=LOCMEM, MAILOUT_DELIVERY=f"queue://{tmp_path}"):
        conn = connection(OURS, fail_silently=True)
        assert isinstance(conn, EmailBackend) and conn.fail_silently is True
        assert mail.send_mail("s", "m", None, ["b@dest.test"], connection=conn) == 1
        other = connection(OURS, delivery="file://" + str(tmp_path / "eml"))
        assert other.send_messages([mail.EmailMessage("s", "m", None, ["b@dest.test"])]) == 1
    assert len(Queue(str(tmp_path)).incoming()) == 1
    assert len(os.listdir(tmp_path / "eml")) == 1


def smtp(conn):
    delivery = conn.mailer.delivery
    assert isinstance(delivery, SMTPDelivery)
    return (delivery.scheme, delivery.relay, delivery.tls, delivery._auth, delivery.timeout)


def test_djangos_smtp_options_override_the_delivery():
    with override_settings(MAILOUT_DELIVERY="smtp://relay.test:2525?tls=none&timeout=30"):
        assert smtp(connection(OURS)) == ("smtp", "relay.test:2525", "none", None, 30.0)
        # send_mail(auth_user=None, auth_password=None): nothing changes
        assert smtp(connection(OURS, username=None, password=None)) == (
            "smtp", "relay.test:2525", "none", None, 30.0)
        assert smtp(connection(OURS, username="u", password="p@ss")) == (
            "smtp", "relay.test:2525", "none", ("u", "p@ss"), 30.0)
        assert smtp(connection(OURS, host="other.test")) == (
            "smtp", "other.test:587", "none", None, 30.0)
        assert smtp(connection(OURS, port=25, timeout=5)) == (
            "smtp", "relay.test:25", "none", None, 5.0)
        assert smtp(connection(OURS, use_tls=True)) == (
            "smtp", "relay.test:2525", "verify", None, 30.0)
        assert smtp(connection(OURS, use_ssl=True)) == (
            "smtps", "smtps://relay.test:465", "verify", None, 30.0)
        assert smtp(connection(OURS, use_tls=False)) == (
            "smtp", "relay.test:2525", "may", None, 30.0)
        assert smtp(connection(OURS, host="::1", port=25)) == (
            "smtp", "[::1]:25", "none", None, 30.0)
    with override_settings(MAILOUT_DELIVERY="smtps://u:p@relay.test?tls=secure"):
        assert smtp(connection(OURS)) == ("smtps", "smtps://relay.test:465", "secure",
                                          ("u", "p"), 60.0)
        assert smtp(connection(OURS, use_ssl=True)) == (  # a stricter level is kept
            "smtps", "smtps://relay.test:465", "secure", ("u", "p"), 60.0)
        assert smtp(connection(OURS, use_ssl=False)) == (
            "smtp", "relay.test:587", "may", ("u", "p"), 60.0)
        assert smtp(connection(OURS, password="")) == (  # Django logs in only with both
            "smtps", "smtps://relay.test:465", "secure", None, 60.0)


def test_a_host_sends_to_that_relay_whatever_the_delivery(tmp_path):
    with override_settings(MAILOUT_DELIVERY=f"queue://{tmp_path}"):
        assert smtp(connection(OURS, host="relay.test", port=25, username="u",
                               password="p", use_tls=True)) == (
            "smtp", "relay.test:25", "verify", ("u", "p"), 60.0)
        with pytest.raises(ImproperlyConfigured, match="apply to smtp:// and smtps://"):
            connection(OURS, username="u", password="p")
        with pytest.raises(ImproperlyConfigured, match="apply to smtp:// and smtps://"):
            mail.send_mail("s", "m", None, ["b@dest.test"], auth_user="u", auth_password="p")
    assert smtp(EmailBackend(delivery={"url": "null://"}, host="relay.test")) == (
        "smtp", "relay.test:587", "may", None, 60.0)


def test_smtp_options_errors():
    with pytest.raises(ImproperlyConfigured, match="mutually exclusive"):
        smtp_options("smtp://relay.test", use_tls=True, use_ssl=True)
    with pytest.raises(ImproperlyConfigured, match="need a relay host"):
        smtp_options("smtp://", port=25)
    with pytest.raises(ImproperlyConfigured, match="need a relay host"):
        smtp_options("smtp://", username="u", password="p")
    with pytest.raises(ImproperlyConfigured, match="Delivery object"):
        smtp_options(MemoryDelivery(), host="relay.test")
    with pytest.raises(ImproperlyConfigured, match="client certificates"):
        EmailBackend(delivery="smtp://relay.test", ssl_certfile="/etc/c.pem")
    with pytest.raises(ImproperlyConfigured, match="timeout"):
        EmailBackend(delivery="smtp://relay.test", timeout=-1)
    # nothing given: the configuration itself, untouched
    config = {"url": "smtp://relay.test"}
    assert smtp_options(config) is config
    # MX routing keeps its own settings, with a new timeout
    assert smtp_options("smtp://?mx_port=2525", timeout=3) == {
        "scheme": "smtp", "relay": None, "mx_port": 2525, "tls": "may", "timeout": 3}


# -- one connection, many threads ---------------------------------------------------

def test_one_connection_shared_by_fifty_threads(tmp_path):
    conn = connection(OURS, delivery=f"queue://{tmp_path}")
    start = threading.Barrier(50)
    counts, errors = [], []

    def worker(i):
        try:
            start.wait()
            counts.append(conn.send_messages(
                [mail.EmailMessage(f"m{i}", "b", None, [f"r{i}@dest.test"])]))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and counts == [1] * 50
    q = Queue(str(tmp_path))
    entries, problems = q.pickup_all()
    subjects = sorted(email.message_from_bytes(q.read_message(e))["Subject"] for e in entries)
    assert problems == [] and subjects == sorted(f"m{i}" for i in range(50))


# -- mail.outbox under Django's test environment, beside ours ----------------------

def test_djangos_test_environment_and_our_capture_side_by_side(tmp_path):
    with override_settings(EMAIL_BACKEND=OURS, MAILOUT_DELIVERY=f"queue://{tmp_path}"):
        setup_test_environment()
        try:
            # what Django's test runner does: EMAIL_BACKEND is locmem, mail.outbox is []
            assert mail.send_mail("to locmem", "m", None, ["b@dest.test"]) == 1
            assert [m.subject for m in mail.outbox] == ["to locmem"]
            # our backend, named, still sends through its delivery; capture_mail sees it
            with capture_mail() as outbox:
                conn = connection(OURS)
                assert mail.send_mail("to ours", "m", None, ["c@dest.test"],
                                      connection=conn) == 1
                assert mail.send_mail("locmem again", "m", None, ["d@dest.test"]) == 1
            outbox.assert_sent(1, to="c@dest.test", subject="to ours")
            assert [m.subject for m in mail.outbox] == ["to locmem", "locmem again"]
            # and without the capture, into the queue
            assert connection(OURS).send_messages(
                [mail.EmailMessage("queued", "m", None, ["e@dest.test"])]) == 1
        finally:
            teardown_test_environment()
    assert not hasattr(mail, "outbox")
    assert len(Queue(str(tmp_path)).incoming()) == 1


# -- Django 6.1's MAILERS (run where that Django is installed: see the module docstring) --

needs_61 = pytest.mark.skipif(not DJANGO_61, reason="Django >= 6.1 (MAILERS) not installed")


@needs_61
def test_mailers_options_and_the_deprecated_get_connection_kwargs(tmp_path):
    mailers = {
        "default": {"BACKEND": OURS, "OPTIONS": {"delivery": f"queue://{tmp_path}"}},
        "relay": {"BACKEND": OURS, "OPTIONS": {"delivery": f"queue://{tmp_path}",
                                               "host": "relay.test", "port": 25,
                                               "use_tls": True, "timeout": 9}},
    }
    with override_settings(MAILERS=mailers):
        relay = mail.mailers["relay"]
        assert relay.alias == "relay"
        assert smtp(relay) == ("smtp", "relay.test:25", "verify", None, 9.0)
        # get_connection(fail_silently=..., username=...) builds MAILERS["default"]
        conn = connection(None, fail_silently=True)
        assert conn.fail_silently is True and conn.alias == "default"
        assert conn.send_messages([mail.EmailMessage("s", "m", None, ["not-an-address"]),
                                   mail.EmailMessage("s", "m", None, ["b@dest.test"])]) == 1
        with pytest.raises(RuntimeError, match="not supported with MAILERS"):
            connection(OURS)  # Django's rule, not ours: name the backend in MAILERS
        assert mail.send_mail("s", "m", None, ["c@dest.test"], using="default") == 1
    assert len(Queue(str(tmp_path)).incoming()) == 2


@needs_61
def test_mailers_under_djangos_test_environment(tmp_path):
    mailers = {"default": {"BACKEND": OURS, "OPTIONS": {"delivery": f"queue://{tmp_path}"}}}
    with override_settings(MAILERS=mailers):
        setup_test_environment()
        try:
            assert mail.send_mail("to locmem", "m", None, ["b@dest.test"]) == 1
            assert [(m.subject, m.sent_using) for m in mail.outbox] == [("to locmem", "default")]
            # our backend made by hand (as a test of the backend itself would) still sends
            with capture_mail() as outbox:
                assert EmailBackend(delivery=f"queue://{tmp_path}").send_messages(
                    [mail.EmailMessage("to ours", "m", None, ["c@dest.test"])]) == 1
            outbox.assert_sent(1, subject="to ours")
            assert len(mail.outbox) == 1
        finally:
            teardown_test_environment()
    assert len(Queue(str(tmp_path)).incoming()) == 0
